//! Identity servers: each answers with its name, over TCP and UDP, so a
//! client can tell which backend it reached.
//!
//! TCP: on accept the server writes `<name>\n`, then answers every line it
//! reads with `<name>\n` (the line `peer`: with the address it sees the
//! client at), until EOF. UDP: every datagram is answered with `<name>`
//! (`peer`: with the client's address). Everything stops when the
//! `Servers` is dropped.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts a TCP and a UDP identity server inside `ns`.
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = ns.run(|| {
            let tcp = TcpListener::bind(("0.0.0.0", tcp_port)).expect("bind TCP");
            let udp = UdpSocket::bind(("0.0.0.0", udp_port)).expect("bind UDP");
            (tcp, udp)
        });
        tcp.set_nonblocking(true).expect("nonblocking listener");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp timeout");
        let mut threads = Vec::new();
        {
            let (stop, name) = (stop.clone(), name.to_owned());
            threads.push(std::thread::spawn(move || serve_tcp(tcp, &name, &stop)));
        }
        {
            let (stop, name) = (stop.clone(), name.to_owned());
            threads.push(std::thread::spawn(move || serve_udp(udp, &name, &stop)));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(listener: TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut w = match conn.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                        return;
                    }
                    for line in BufReader::new(conn).lines() {
                        let answer = match line {
                            Ok(l) if l.trim() == "peer" => peer.to_string(),
                            Ok(_) => name.clone(),
                            Err(_) => return,
                        };
                        if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_udp(sock: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let answer = if &buf[..n] == b"peer" {
                from.to_string()
            } else {
                name.to_owned()
            };
            let _ = sock.send_to(answer.as_bytes(), from);
        }
    }
}

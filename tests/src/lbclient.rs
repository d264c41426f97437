//! Clients of the [`crate::lblab`] services: a TCP connection to the VIP
//! that knows which backend it reached, and one UDP request. Run them
//! inside a client namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use crate::lblab::{VIP, VIP_TCP_PORT, VIP_UDP_PORT};

/// How long a client waits for an answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub fn vip_tcp() -> SocketAddr {
    SocketAddr::from((VIP, VIP_TCP_PORT))
}

pub fn vip_udp() -> SocketAddr {
    SocketAddr::from((VIP, VIP_UDP_PORT))
}

/// A connection to the VIP and the name its backend greeted it with.
pub struct Conn {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
    pub backend: String,
}

impl Conn {
    /// Must run inside the client namespace.
    pub fn open() -> Result<Self, String> {
        let s =
            TcpStream::connect_timeout(&vip_tcp(), TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        let peer = s.peer_addr().map_err(|e| e.to_string())?;
        if peer != vip_tcp() {
            return Err(format!("peer is {peer}, not the VIP"));
        }
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(s);
        let backend = read_line(&mut reader)?;
        Ok(Conn {
            writer,
            reader,
            backend,
        })
    }

    /// One request/response on the open connection: the backend's name.
    pub fn ping(&mut self) -> Result<String, String> {
        self.writer
            .write_all(b"ping\n")
            .map_err(|e| format!("write: {e}"))?;
        read_line(&mut self.reader)
    }
}

pub fn read_line(r: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Ok(line.trim().to_owned()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// One UDP request from a fresh socket (a fresh source port, so a new
/// flow); retried on the same socket (the same flow) if lost.
pub fn udp_request() -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        s.send_to(b"who", vip_udp())
            .map_err(|e| format!("send: {e}"))?;
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if from != vip_udp() {
                return Err(format!("answer from {from}, not the VIP"));
            }
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    Err("no answer after 3 tries".into())
}

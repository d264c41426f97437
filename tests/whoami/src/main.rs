//! whoami: a test server that answers with its name, and a bounded client.
//!
//! ```text
//! whoami serve [--tcp PORT]... [--udp PORT]... [--http PORT]... [--name NAME] [--term-delay-ms MS]
//!     TCP: writes "<name>\n" on accept, then answers each line read with "<name>\n"
//!     (the line "peer": "<name> <client address:port as seen here>\n"; the line
//!     "bytes N": N bytes, byte i being i % 251, then it closes; N <= 1 GiB).
//!     UDP: answers each datagram with "<name>" ("peer": "<name> <client>"; one
//!     longer than 64 bytes: "<name> <its length>").
//!     HTTP: `GET /` (any path) answers 200 with "<name> <client>\n" (curl, wget).
//!     Name: --name, else /etc/hostname.
//!     On SIGTERM it keeps serving for --term-delay-ms (default 0), then exits 0.
//! whoami ask tcp|udp HOST:PORT [--count N] [--interval-ms MS] [--timeout-ms MS] [--peer]
//!     [--size BYTES]
//!     N requests (default 1), one new connection / socket each; prints
//!     "<unix-ms> ok <name>" (with --peer: "<unix-ms> ok <name> <client as the
//!     server saw it>") or "<unix-ms> err <why>" per request, then
//!     "total N ok K err E"; exits 1 if any failed. UDP with --size: each
//!     datagram padded to BYTES (at most 65,000). --latency: then
//!     "latency-us p50 A p99 B max C elapsed-ms D" over the requests that
//!     succeeded (each from its connect to its answer).
//! whoami sink PORT
//!     accepts one TCP connection, reads it to the end (60 s idle cap) and
//!     prints "received N bytes checksum C".
//! whoami blast HOST:PORT BYTES
//!     sends BYTES of a fixed pattern, waits for the sink to close, and prints
//!     "sent N bytes in MS ms checksum C".
//! whoami health | sick | well
//!     health check: exit 1 while /tmp/sick exists; sick/well create/remove it.
//! ```
//! Every loop is bounded by count and timeouts.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("ask") => return ask(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("blast") => blast(&args[1..]),
        Some("source") => source(&args[1..]),
        Some("health") => {
            return if std::path::Path::new("/tmp/sick").exists() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        Some("sick") => std::fs::write("/tmp/sick", b"sick").map_err(|e| e.to_string()),
        Some("well") => std::fs::remove_file("/tmp/sick").or(Ok(())),
        _ => Err(
            "usage: whoami serve|ask|sink|blast|source|health|sick|well (see the source)".into(),
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("whoami: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].as_str())
        .collect()
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match flag(args, name).last() {
        Some(v) => v.parse().map_err(|_| format!("{name} {v:?}: not a number")),
        None => Ok(default),
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let name = match flag(args, "--name").last() {
        Some(n) => n.to_string(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "whoami".into()),
    };
    let term_delay = Duration::from_millis(num(args, "--term-delay-ms", 0u64)?);
    // SAFETY: installing an async-signal-safe handler (it only stores an atomic).
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    for p in flag(args, "--tcp") {
        let l = TcpListener::bind((
            "0.0.0.0",
            p.parse::<u16>().map_err(|_| format!("--tcp {p:?}"))?,
        ))
        .map_err(|e| format!("tcp {p}: {e}"))?;
        let name = name.clone();
        thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || tcp_conn(conn, &name));
            }
        });
    }
    for p in flag(args, "--http") {
        let l = TcpListener::bind((
            "0.0.0.0",
            p.parse::<u16>().map_err(|_| format!("--http {p:?}"))?,
        ))
        .map_err(|e| format!("http {p}: {e}"))?;
        let name = name.clone();
        thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || http_conn(conn, &name));
            }
        });
    }
    for p in flag(args, "--udp") {
        let s = UdpSocket::bind((
            "0.0.0.0",
            p.parse::<u16>().map_err(|_| format!("--udp {p:?}"))?,
        ))
        .map_err(|e| format!("udp {p}: {e}"))?;
        let name = name.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let answer = if &buf[..n] == b"peer" {
                    format!("{name} {from}")
                } else if n > 64 {
                    format!("{name} {n}")
                } else {
                    name.clone()
                };
                let _ = s.send_to(answer.as_bytes(), from);
            }
        });
    }
    println!("whoami {name} serving");
    while !TERM.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "whoami {name}: SIGTERM, serving {} ms more",
        term_delay.as_millis()
    );
    thread::sleep(term_delay);
    Ok(())
}

fn tcp_conn(conn: TcpStream, name: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let Ok(mut w) = conn.try_clone() else { return };
    // One write per line: two small writes meet Nagle and delayed ACKs (40 ms).
    if w.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    for line in BufReader::new(conn.take(1 << 20)).lines() {
        let answer = match line {
            Ok(l) if l.trim() == "peer" => format!("{name} {peer}"),
            Ok(l) if l.starts_with("bytes ") => {
                if let Ok(n) = l["bytes ".len()..].trim().parse::<usize>() {
                    send_pattern(&mut w, n.min(1 << 30));
                }
                return;
            }
            Ok(_) => name.to_owned(),
            Err(_) => return,
        };
        if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// Writes `n` bytes, byte i being `i % 251`.
fn send_pattern(w: &mut TcpStream, n: usize) {
    let block: Vec<u8> = (0..251 * 256).map(|i| (i % 251) as u8).collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len());
        if w.write_all(&block[..k]).is_err() {
            return;
        }
        left -= k;
    }
}

/// One HTTP/1.x exchange: reads the request head (at most 8 KiB, 10 s),
/// answers "<name> <client>\n" and closes.
fn http_conn(conn: TcpStream, name: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let Ok(mut w) = conn.try_clone() else { return };
    let mut head = Vec::new();
    let mut r = BufReader::new(conn.take(8192));
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => head.push(line),
        }
    }
    let ok = head
        .first()
        .is_some_and(|l| l.starts_with("GET ") || l.starts_with("HEAD "));
    let (status, body) = if ok {
        ("200 OK", format!("{name} {peer}\n"))
    } else {
        ("405 Method Not Allowed", "GET only\n".to_string())
    };
    let _ = write!(
        w,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn ask(args: &[String]) -> ExitCode {
    let (Some(proto), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: whoami ask tcp|udp HOST:PORT [--count N] [--interval-ms MS] [--timeout-ms MS] [--peer]"
        );
        return ExitCode::FAILURE;
    };
    let parsed = (|| -> Result<(SocketAddr, u64, u64, u64), String> {
        let addr = target
            .to_socket_addrs()
            .map_err(|e| format!("{target}: {e}"))?
            .next()
            .ok_or("no address")?;
        Ok((
            addr,
            num(args, "--count", 1u64)?,
            num(args, "--interval-ms", 0u64)?,
            num(args, "--timeout-ms", 2000u64)?,
        ))
    })();
    let (addr, count, interval, timeout) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("whoami: {e}");
            return ExitCode::FAILURE;
        }
    };
    let count = count.min(1_000_000);
    let timeout = Duration::from_millis(timeout.clamp(1, 60_000));
    let peer = args.iter().any(|a| a == "--peer");
    let size = match num(args, "--size", 0usize) {
        Ok(n) => n.min(65_000),
        Err(e) => {
            eprintln!("whoami: {e}");
            return ExitCode::FAILURE;
        }
    };
    let latency = args.iter().any(|a| a == "--latency");
    let mut took: Vec<u128> = Vec::new();
    let start = std::time::Instant::now();
    let (mut ok, mut err) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let t = std::time::Instant::now();
        let r = if proto == "udp" {
            ask_udp(addr, timeout, peer, size)
        } else {
            ask_tcp(addr, timeout, peer)
        };
        match r {
            Ok(name) => {
                ok += 1;
                if latency {
                    took.push(t.elapsed().as_micros());
                }
                let _ = writeln!(out, "{} ok {name}", now_ms());
            }
            Err(e) => {
                err += 1;
                let _ = writeln!(out, "{} err {e}", now_ms());
            }
        }
        if interval > 0 {
            thread::sleep(Duration::from_millis(interval));
        }
    }
    let _ = writeln!(out, "total {count} ok {ok} err {err}");
    if latency && !took.is_empty() {
        took.sort_unstable();
        let at = |q: usize| took[(took.len() * q / 100).min(took.len() - 1)];
        let _ = writeln!(
            out,
            "latency-us p50 {} p99 {} max {} elapsed-ms {}",
            at(50),
            at(99),
            took[took.len() - 1],
            start.elapsed().as_millis()
        );
    }
    if err == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn ask_tcp(addr: SocketAddr, timeout: Duration, peer: bool) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    if s.peer_addr().map_err(|e| e.to_string())? != addr {
        return Err("peer is not the address asked".into());
    }
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?.take(512));
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    if line.trim().is_empty() {
        return Err("closed without an answer".into());
    }
    if peer {
        s.write_all(b"peer\n").map_err(|e| format!("write: {e}"))?;
        line.clear();
        r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if line.trim().is_empty() {
            return Err("no answer to \"peer\"".into());
        }
    }
    Ok(line.trim().to_string())
}

fn ask_udp(addr: SocketAddr, timeout: Duration, peer: bool, size: usize) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut ask: Vec<u8> = if peer {
        b"peer".to_vec()
    } else {
        b"who".to_vec()
    };
    if size > ask.len() {
        ask.resize(size, b'.');
    }
    s.send_to(&ask, addr).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
    if from != addr {
        return Err(format!("answer from {from}, not {addr}"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// FNV-1a over a stream, fed chunk by chunk.
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn sink(args: &[String]) -> Result<(), String> {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or("usage: whoami sink PORT")?;
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("sink listening on {port}");
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let (mut n, mut sum) = (0u64, Checksum::new());
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = s
            .read(&mut buf)
            .map_err(|e| format!("read after {n} bytes: {e}"))?;
        if k == 0 {
            break;
        }
        sum.feed(&buf[..k]);
        n += k as u64;
    }
    println!("received {n} bytes checksum {:016x}", sum.0);
    Ok(())
}

/// What `blast` and `source` send, over and over: 64 KiB, byte `i` the
/// top byte of `i * 2654435761`.
fn pattern() -> Vec<u8> {
    (0..1u32 << 16)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// `source PORT BYTES`: to each connection in turn, BYTES of [`pattern`],
/// then the end; until stopped.
fn source(args: &[String]) -> Result<(), String> {
    let (Some(port), Some(bytes)) = (
        args.first().and_then(|p| p.parse::<u16>().ok()),
        args.get(1).and_then(|b| b.parse::<u64>().ok()),
    ) else {
        return Err("usage: whoami source PORT BYTES".into());
    };
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("source listening on {port}");
    let chunk = pattern();
    while !TERM.load(Ordering::SeqCst) {
        let Ok((mut s, peer)) = l.accept() else {
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
        let mut sent = 0u64;
        while sent < bytes {
            let k = ((bytes - sent) as usize).min(chunk.len());
            if s.write_all(&chunk[..k]).is_err() {
                break;
            }
            sent += k as u64;
        }
        println!("sent {sent} bytes to {peer}");
    }
    Ok(())
}

fn blast(args: &[String]) -> Result<(), String> {
    let (Some(target), Some(bytes)) = (
        args.first(),
        args.get(1).and_then(|b| b.parse::<u64>().ok()),
    ) else {
        return Err("usage: whoami blast HOST:PORT BYTES".into());
    };
    let addr = target
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let chunk = pattern();
    let (mut sent, mut sum) = (0u64, Checksum::new());
    let start = std::time::Instant::now();
    while sent < bytes {
        let k = ((bytes - sent) as usize).min(chunk.len());
        s.write_all(&chunk[..k])
            .map_err(|e| format!("write after {sent} bytes: {e}"))?;
        sum.feed(&chunk[..k]);
        sent += k as u64;
    }
    // Delivered when the sink, having read to the end, closes.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.read(&mut [0u8; 1]);
    println!(
        "sent {sent} bytes in {} ms checksum {:016x}",
        start.elapsed().as_millis(),
        sum.0
    );
    Ok(())
}

//! The UDP and TCP loops: parse (malformed packets dropped and counted),
//! hand to the zone handler, encode with truncation.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use hickory_proto::{rr::Record, serialize::binary::BinEncoder};
use hickory_server::{
    net::{NetError, xfer::Protocol},
    server::{Request, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tracing::warn;

use super::{DnsStats, zone::Handler};

/// Encodes a response in at most `max` bytes: records that do not fit are
/// left out and the TC flag set.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max: u16,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let mut bytes = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut bytes);
    enc.set_max_size(max);
    let info = response
        .destructive_emit(&mut enc)
        .map_err(|e| NetError::from(e.to_string()))?;
    Ok((info, bytes))
}

/// Sends responses over a TCP connection (2-byte length prefix).
#[derive(Clone)]
struct TcpResponder {
    out: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
}

#[async_trait::async_trait]
impl ResponseHandler for TcpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, u16::MAX)?;
        let mut out = self.out.lock().await;
        // A client that does not read cannot hold the task forever.
        let write = async {
            out.write_all(&(bytes.len() as u16).to_be_bytes()).await?;
            out.write_all(&bytes).await
        };
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .map_err(|_| NetError::from("write timeout".to_string()))??;
        Ok(info)
    }
}

/// Parses a query; `None` (counted) when it is malformed or not a query.
fn parse(raw: Vec<u8>, src: SocketAddr, protocol: Protocol, stats: &DnsStats) -> Option<Request> {
    match Request::from_bytes(raw, src, protocol) {
        Ok(r) if r.metadata.message_type == hickory_proto::op::MessageType::Query => Some(r),
        _ => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The UDP socket's receive buffer. The default (about 200 KB) holds some
/// 270 queries, 13 ms of a 20,000 q/s flood: any pause of the server
/// longer than that drops queries, mesh names among them. 4 MiB holds
/// about a quarter of a second.
const UDP_RECEIVE_BUFFER: i32 = 4 << 20;

/// Sets the socket's receive buffer to `bytes`: past the system's
/// rmem_max with CAP_NET_ADMIN (which the agent has), else as far as
/// rmem_max allows.
fn grow_receive_buffer(sock: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads an int from a valid pointer for the
        // length given; fd is the socket's own.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
    warn!("could not grow the DNS socket's receive buffer");
}

/// UDP workers: one per core, as Knot's UDP workers, at most 4. Each has
/// a socket of its own on the same address (`SO_REUSEPORT`: the kernel
/// spreads clients over them by their address) and a thread with a
/// current-thread runtime of its own, so neither the agent's other work
/// nor another worker's load delays its answers.
fn udp_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// A UDP socket on `addr` that other sockets of this process share.
fn shared_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Serves DNS on `addr` over UDP and TCP until the process ends. Never
/// forwards to `addr` itself. The calling task serves TCP and one UDP
/// socket; the other UDP workers run on threads of their own.
pub async fn serve(addr: SocketAddr, handler: Arc<Handler>) -> std::io::Result<()> {
    let local = crate::iface::local_addrs();
    let self_local = if addr.ip().is_unspecified() {
        local.clone()
    } else {
        Vec::new()
    };
    for u in handler.exclude_self(addr, &self_local) {
        warn!(upstream = %u, "not forwarding to this DNS server itself");
    }
    handler.set_local(local);
    // Every socket bound before any serves: a port in use fails here.
    let socks = (0..udp_workers())
        .map(|_| shared_udp(addr))
        .collect::<std::io::Result<Vec<_>>>()?;
    let tcp = TcpListener::bind(addr).await?;
    let mut socks = socks.into_iter();
    let first = socks
        .next()
        .ok_or_else(|| std::io::Error::other("no UDP worker"))?;
    for (i, sock) in socks.enumerate() {
        let h = handler.clone();
        std::thread::Builder::new()
            .name(format!("dns-udp-{}", i + 1))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(error = %e, "DNS UDP worker: no runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    match UdpSocket::from_std(sock) {
                        Ok(udp) => serve_udp(udp, h).await,
                        Err(e) => warn!(error = %e, "DNS UDP worker"),
                    }
                });
            })?;
    }
    let h = handler.clone();
    let clients = Arc::new(tokio::sync::Semaphore::new(super::MAX_TCP_CLIENTS));
    tokio::spawn(async move {
        loop {
            let (conn, src) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: back off
                    // instead of spinning on accept.
                    warn!(error = %e, "DNS TCP accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !h.admits(src.ip()) {
                continue;
            }
            // At the limit, the new client is closed at once.
            let Ok(permit) = clients.clone().try_acquire_owned() else {
                h.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                serve_tcp_conn(conn, src, h).await;
                drop(permit);
            });
        }
    });
    serve_udp(UdpSocket::from_std(first)?, handler).await;
    Ok(())
}

/// Keeps a UDP response's bytes, truncated (TC) to what the client can
/// take, for the caller to send: an answer from memory leaves with the
/// rest of its batch, a forwarded one when its upstream answered.
#[derive(Clone)]
struct Collect {
    max: u16,
    out: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Collect {
    fn new(max: u16) -> Self {
        Collect {
            max,
            out: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The response, if one was made.
    fn take(&self) -> Option<Vec<u8>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Collect {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, self.max)?;
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(info)
    }
}

/// One UDP worker. Queries come in batches (`recvmmsg`); a query answered
/// before from memory gets its kept answer ([`super::cache`]); others
/// answered from memory are answered at once; these answers leave together
/// (`sendmmsg`); a forwarded one becomes a task of its own, so it never
/// holds the others.
async fn serve_udp(udp: UdpSocket, handler: Arc<Handler>) {
    use std::os::fd::AsRawFd;
    grow_receive_buffer(&udp, UDP_RECEIVE_BUFFER);
    let udp = Arc::new(udp);
    let fd = udp.as_raw_fd();
    let mut inbox = super::batch::Inbox::default();
    let mut outbox: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(super::batch::BATCH);
    // Answer buffers of earlier batches, used again.
    let mut spare: Vec<Vec<u8>> = Vec::with_capacity(super::batch::BATCH);
    let mut cache = super::cache::AnswerCache::default();
    loop {
        if let Err(e) = udp.readable().await {
            warn!(error = %e, "DNS UDP receive");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        match udp.try_io(tokio::io::Interest::READABLE, || inbox.recv(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!(error = %e, "DNS UDP receive");
                continue;
            }
        }
        for (bytes, src) in inbox.datagrams() {
            let Some(src) = src else { continue };
            if !handler.admits(src.ip()) {
                continue;
            }
            let Some(raw) = bytes else {
                handler.stats.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // Before answering: what is kept is never newer than its zone.
            let generation = handler.generation();
            let view = handler.view(src.ip());
            if let Some(hit) = cache.get(generation, view.as_deref(), raw) {
                let (qtype, result) = hit.counted();
                handler.stats.count(qtype, result);
                handler.stats.kept_answers.fetch_add(1, Ordering::Relaxed);
                let mut answer = spare.pop().unwrap_or_default();
                hit.write(raw, &mut answer);
                outbox.push((answer, src));
                continue;
            }
            let Some(req) = parse(raw.to_vec(), src, Protocol::Udp, &handler.stats) else {
                continue;
            };
            let collect = Collect::new(req.max_payload());
            if handler.forwards(&req) {
                let (h, udp) = (handler.clone(), udp.clone());
                tokio::spawn(async move {
                    h.handle(&req, collect.clone()).await;
                    if let Some(answer) = collect.take()
                        && let Err(e) = udp.send_to(&answer, src).await
                    {
                        warn!(error = %e, "DNS UDP send");
                    }
                });
                continue;
            }
            let info = handler.handle(&req, collect.clone()).await;
            if let Some(answer) = collect.take() {
                if let Some(q) = req.queries.queries().first() {
                    cache.keep(generation, view, raw, &answer, q.query_type(), &info);
                }
                outbox.push((answer, src));
            }
        }
        if outbox.is_empty() {
            continue;
        }
        let sent = udp
            .try_io(tokio::io::Interest::WRITABLE, || {
                super::batch::send(fd, &outbox)
            })
            .unwrap_or(0);
        // What the socket would not take now waits its turn.
        for (i, (answer, dst)) in outbox.drain(..).enumerate() {
            if i >= sent
                && let Err(e) = udp.send_to(&answer, dst).await
            {
                warn!(error = %e, "DNS UDP send");
            }
            if spare.len() < super::batch::BATCH {
                spare.push(answer);
            }
        }
    }
}

/// One TCP client: length-prefixed queries until EOF, an idle gap of
/// 10 s, or a malformed query.
async fn serve_tcp_conn(conn: TcpStream, src: SocketAddr, h: Arc<Handler>) {
    let (mut r, w) = conn.into_split();
    let out = Arc::new(tokio::sync::Mutex::new(w));
    loop {
        let read = async {
            let len = r.read_u16().await? as usize;
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let Ok(Ok(raw)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
            return;
        };
        let Some(req) = parse(raw, src, Protocol::Tcp, &h.stats) else {
            return;
        };
        h.handle(&req, TcpResponder { out: out.clone() }).await;
    }
}

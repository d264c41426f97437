//! Tunnel probes: whether each peer's tunnel carries traffic both ways.
//!
//! Gossip travels on the underlay in plain UDP; container traffic travels
//! in VXLAN. A firewall or a cloud security group can pass the one and not
//! the other, and then services on the peer vanish from the containers'
//! view while the cluster looks healthy. So once a second the agent sends
//! a small datagram from this host's overlay address to every peer's
//! ([`PORT`]): it leaves through the host link, so the data plane
//! encapsulates it exactly as container traffic, and the peer's agent
//! answers the same way. A peer whose answers stop is reported, with the
//! port to open (`meshctl status`, `mesh_peer_tunnel_up`).
//!
//! The socket is bound to the overlay address only, which the underlay
//! cannot reach (the data plane drops plain frames for this node's /24).
//! An answer must echo the probe's random token.
//!
//! Beside it, an ICMP echo to the same address asks the peer's data plane
//! and kernel, not its agent: the host answers it while its agent is down
//! (the programs and maps stay pinned). A peer whose gossip fell silent
//! but whose data plane answers has a crashed or restarting agent, not a
//! dead host (`Probe::data_plane_up`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;
use tracing::debug;

use crate::status::Tunnel;

/// The UDP port probes are sent to, on overlay addresses only.
pub const PORT: u16 = 7947;
/// How often every peer is probed.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A peer that has not answered for this long is reported.
pub const SILENT_AFTER: Duration = Duration::from_secs(3);

const PING: &[u8; 4] = b"MSP?";
const PONG: &[u8; 4] = b"MSP!";
/// Magic, a 64-bit token, a 64-bit send time (ns since the probe started).
const LEN: usize = 20;

#[derive(Debug)]
struct Peer {
    addr: Ipv4Addr,
    /// When probing this peer began.
    since: Instant,
    last_ok: Option<Instant>,
    rtt: Duration,
    /// When its host last answered an ICMP echo through the tunnel.
    last_echo: Option<Instant>,
}

/// The peers to probe and what they answered.
pub struct Probe {
    vxlan_port: u16,
    token: u64,
    start: Instant,
    peers: Mutex<BTreeMap<String, Peer>>,
}

impl Probe {
    /// The peers to probe by name and overlay address (the others are
    /// forgotten).
    pub fn set_targets(&self, targets: BTreeMap<String, Ipv4Addr>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|name, p| targets.get(name) == Some(&p.addr));
        for (name, addr) in targets {
            peers.entry(name).or_insert_with(|| Peer {
                addr,
                since: Instant::now(),
                last_ok: None,
                rtt: Duration::ZERO,
                last_echo: None,
            });
        }
    }

    /// Every peer's tunnel as of now.
    pub fn report(&self) -> Vec<Tunnel> {
        let now = Instant::now();
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .iter()
            .map(|(name, p)| {
                let quiet = now.duration_since(p.last_ok.unwrap_or(p.since));
                Tunnel {
                    peer: name.clone(),
                    up: quiet < SILENT_AFTER,
                    ever_up: p.last_ok.is_some(),
                    silent_s: quiet.as_secs_f64(),
                    rtt_ms: p.rtt.as_secs_f64() * 1e3,
                    vxlan_port: self.vxlan_port,
                }
            })
            .collect()
    }

    /// Whether `peer`'s host answered an ICMP echo through the tunnel
    /// within `within`: its data plane forwards, whatever its agent does.
    pub fn data_plane_up(&self, peer: &str, within: Duration) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .get(peer)
            .and_then(|p| p.last_echo)
            .is_some_and(|t| t.elapsed() < within)
    }

    fn echoed(&self, from: Ipv4Addr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.values_mut().find(|p| p.addr == from) {
            p.last_echo = Some(Instant::now());
        }
    }

    fn answered(&self, from: Ipv4Addr, sent_ns: u64) {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.values_mut().find(|p| p.addr == from) {
            let sent = self.start + Duration::from_nanos(sent_ns);
            p.rtt = now.saturating_duration_since(sent);
            p.last_ok = Some(now);
        }
    }

    fn targets(&self) -> Vec<Ipv4Addr> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.values().map(|p| p.addr).collect()
    }
}

/// Binds `local:PORT` and probes the targets [`Probe::set_targets`] gives,
/// answering the peers' probes, until the process ends (on the current
/// tokio runtime).
pub fn spawn(local: Ipv4Addr, vxlan_port: u16) -> std::io::Result<Arc<Probe>> {
    let sock = std::net::UdpSocket::bind(SocketAddr::from((local, PORT)))?;
    sock.set_nonblocking(true)?;
    let sock = UdpSocket::from_std(sock)?;
    let probe = Arc::new(Probe {
        vxlan_port,
        token: rand::random(),
        start: Instant::now(),
        peers: Mutex::default(),
    });
    let p = probe.clone();
    tokio::spawn(async move { run(sock, p).await });
    match echo::Socket::bind(local) {
        Ok(icmp) => {
            let p = probe.clone();
            tokio::spawn(async move { echo::run(icmp, p).await });
        }
        Err(e) => tracing::warn!(
            error = %e,
            "no ICMP probes (needs CAP_NET_RAW): a peer whose agent is down is taken for a dead host"
        ),
    }
    Ok(probe)
}

/// ICMP echo through the tunnel, answered by the peer's kernel.
mod echo {
    use std::{
        net::Ipv4Addr,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        sync::Arc,
    };

    use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Ipv4HeaderSlice};
    use tokio::io::unix::AsyncFd;

    use super::{INTERVAL, Probe};

    /// A raw ICMP socket bound to this host's overlay address.
    pub struct Socket(AsyncFd<OwnedFd>);

    impl Socket {
        pub fn bind(local: Ipv4Addr) -> std::io::Result<Self> {
            // SAFETY: plain socket(2); the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a descriptor socket(2) just returned, owned once.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(local).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a valid sockaddr_in of its own size.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: the descriptor is owned by the AsyncFd and stays open
            // as long as it is registered.
            Ok(Socket(unsafe { AsyncFd::register(fd) }?))
        }
    }

    /// Sends an echo request to every target once per [`INTERVAL`] and
    /// notes whose host answered.
    pub async fn run(sock: Socket, probe: Arc<Probe>) {
        let id = probe.token as u16;
        let mut seq: u16 = 0;
        let mut tick = tokio::time::interval(INTERVAL);
        let mut buf = [0u8; 1500];
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq = seq.wrapping_add(1);
                    // The ICMP message alone: a raw socket's kernel adds the
                    // IPv4 header (from the bound address).
                    let echo = Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq });
                    let mut msg = Vec::with_capacity(16);
                    if Icmpv4Header::with_checksum(echo, b"mesh").write(&mut msg).is_err() {
                        continue;
                    }
                    msg.extend_from_slice(b"mesh");
                    for addr in probe.targets() {
                        send(&sock, &msg, addr);
                    }
                }
                r = sock.0.readable() => {
                    let Ok(mut guard) = r else { continue };
                    if let Ok(Ok(n)) = guard.try_io(|fd| recv(fd.get_ref().as_raw_fd(), &mut buf))
                        && let Some(from) = echo_reply_from(&buf[..n], id)
                    {
                        probe.echoed(from);
                    }
                }
            }
        }
    }

    fn send(sock: &Socket, msg: &[u8], to: Ipv4Addr) {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid buffer and sockaddr_in; a full socket buffer
        // just loses this probe.
        unsafe {
            libc::sendto(
                sock.0.get_ref().as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
        }
    }

    fn recv(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: a valid buffer of its own length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The sender of `packet` (IPv4 and ICMP, as a raw socket reads it) if
    /// it is an echo reply to one of ours (`id`).
    pub fn echo_reply_from(packet: &[u8], id: u16) -> Option<Ipv4Addr> {
        let ip = Ipv4HeaderSlice::from_slice(packet).ok()?;
        let icmp = etherparse::Icmpv4Slice::from_slice(packet.get(ip.slice().len()..)?).ok()?;
        match icmp.icmp_type() {
            Icmpv4Type::EchoReply(IcmpEchoHeader { id: got, .. }) if got == id => {
                Some(ip.source_addr())
            }
            _ => None,
        }
    }
}

async fn run(sock: UdpSocket, probe: Arc<Probe>) {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let sent_ns = probe.start.elapsed().as_nanos() as u64;
                let msg = encode(PING, probe.token, sent_ns);
                for addr in probe.targets() {
                    if let Err(e) = sock.send_to(&msg, (addr, PORT)).await {
                        debug!(%addr, error = %e, "tunnel probe not sent");
                    }
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let SocketAddr::V4(from) = from else { continue };
                match decode(&buf[..n]) {
                    Some((PING, token, sent_ns)) => {
                        // Answered as it came (the token is the asker's).
                        let _ = sock.send_to(&encode(PONG, token, sent_ns), from).await;
                    }
                    Some((PONG, token, sent_ns)) if token == probe.token => {
                        probe.answered(*from.ip(), sent_ns);
                    }
                    _ => debug!(%from, "not a tunnel probe of ours: ignored"),
                }
            }
        }
    }
}

fn encode(magic: &[u8; 4], token: u64, sent_ns: u64) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[..4].copy_from_slice(magic);
    m[4..12].copy_from_slice(&token.to_be_bytes());
    m[12..].copy_from_slice(&sent_ns.to_be_bytes());
    m
}

fn decode(b: &[u8]) -> Option<(&'static [u8; 4], u64, u64)> {
    if b.len() != LEN {
        return None;
    }
    let magic = match &b[..4] {
        m if m == PING => PING,
        m if m == PONG => PONG,
        _ => return None,
    };
    let token = u64::from_be_bytes(b[4..12].try_into().ok()?);
    let sent = u64::from_be_bytes(b[12..].try_into().ok()?);
    Some((magic, token, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_echo_replies_to_our_id_count() {
        use etherparse::PacketBuilder;
        let reply = |id: u16| {
            let mut v = Vec::new();
            PacketBuilder::ipv4([10, 42, 2, 1], [10, 42, 1, 1], 64)
                .icmpv4_echo_reply(id, 1)
                .write(&mut v, b"mesh")
                .expect("packet");
            v
        };
        assert_eq!(
            echo::echo_reply_from(&reply(7), 7),
            Some(Ipv4Addr::new(10, 42, 2, 1))
        );
        assert_eq!(echo::echo_reply_from(&reply(8), 7), None);
        let mut request = Vec::new();
        PacketBuilder::ipv4([10, 42, 2, 1], [10, 42, 1, 1], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut request, b"mesh")
            .expect("packet");
        assert_eq!(echo::echo_reply_from(&request, 7), None);
        assert_eq!(echo::echo_reply_from(&request[..10], 7), None);
    }

    #[test]
    fn probes_round_trip_and_anything_else_is_refused() {
        let m = encode(PING, 7, 99);
        assert_eq!(decode(&m), Some((PING, 7, 99)));
        assert_eq!(decode(&encode(PONG, 1, 2)), Some((PONG, 1, 2)));
        assert_eq!(decode(&m[..LEN - 1]), None);
        assert_eq!(decode(b"MSP?xxxxxxxxxxxxxxxxxxxxx"), None);
        let mut bad = m;
        bad[0] = b'X';
        assert_eq!(decode(&bad), None);
    }
}

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
const INTERVAL: Duration = Duration::from_secs(1);
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
    Ok(probe)
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

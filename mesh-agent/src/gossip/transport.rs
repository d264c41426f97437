//! Gossip over UDP, every datagram authenticated and encrypted with the
//! cluster key (ChaCha20-Poly1305): `MAGIC | nonce (12) | ciphertext+tag`.
//!
//! Inside the seal, a header before chitchat's message: the part (whole,
//! first or second of two), the sender's session and counter and its send
//! time (replay protection, `replay.rs`) and the destination address (a
//! datagram captured on its way to one node is refused by every other).
//! chitchat fills messages up to the largest UDP payload; one that does not
//! fit once sealed goes as two datagrams, put together again on receipt.
//! Messages are compressed (zstd, when that makes them smaller) before
//! sealing: chitchat's digests name every node in every round and repeat
//! much. A compressed message never opens to more than
//! [`MAX_DECOMPRESSED`] bytes.
//!
//! A reply (SynAck, Ack) to an address that is not a known node's (a
//! node of the cluster state, or a seed) carries no state: a spoofed source
//! never gets more bytes back than it sent. The peer answers with its own
//! state, which makes it known for the next round.
//!
//! A datagram that is too short, has no magic, does not authenticate (the
//! wrong key, or garbage), is replayed, stale or misaddressed, or does not
//! decode is dropped and counted; the receive loop never stops for it.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use chitchat::{
    ChitchatMessage, Deserializable, Serializable,
    transport::{Socket, Transport},
};
use tracing::debug;

use super::{
    compact::{Directories, Reads},
    replay::{Replay, Verdict},
};

const MAGIC: &[u8; 4] = b"MSH2";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bound to the key: a message for another purpose never authenticates.
const AAD: &[u8] = b"mesh gossip v2";
/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
/// part (1) | session (8) | counter (8) | sent_ms (8) | destination (16).
const HEADER_LEN: usize = 41;
/// Most message bytes one datagram carries.
const MAX_PART: usize = MAX_DATAGRAM - MAGIC.len() - NONCE_LEN - TAG_LEN - HEADER_LEN;
const WHOLE: u8 = 0;
const FIRST: u8 = 1;
const SECOND: u8 = 2;
/// Flag on the part byte: the message is zstd-compressed.
const COMPRESSED: u8 = 0x80;
/// Flag on the part byte: its digest is relative to a directory
/// (`compact.rs`); sent only to peers that publish [`super::COMPACT_KEY`].
const COMPACT: u8 = 0x40;
/// With [`COMPACT`]: relative to exactly what the receiver last said
/// (`compact.rs`, `exact`); sent only to peers that read it.
const EXACT: u8 = 0x20;
/// Messages shorter than this go as they are.
const COMPRESS_FROM: usize = 256;
/// The most a compressed message may open to (two datagrams' worth).
pub const MAX_DECOMPRESSED: usize = 2 * MAX_DATAGRAM;
/// First halves waiting for their second one, and for how long.
const MAX_PARTIAL: usize = 16;
const PARTIAL_TTL: Duration = Duration::from_secs(2);

/// A 32-byte cluster key.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// From a key file: 32 raw bytes, or 64 hex digits (whitespace around
    /// them ignored).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() == 32 {
            let mut k = [0u8; 32];
            k.copy_from_slice(bytes);
            return Ok(ClusterKey(k));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the key is neither 32 bytes nor 64 hex digits".to_string())?;
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "the key is neither 32 bytes nor 64 hex digits ({} bytes)",
                bytes.len()
            ));
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ClusterKey(k))
    }

    pub fn from_bytes(k: [u8; 32]) -> Self {
        ClusterKey(k)
    }
}

/// Gossip datagrams by what became of them (for /metrics and tests).
#[derive(Debug, Default)]
pub struct GossipStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Shorter than a header, or no magic.
    pub garbage: AtomicU64,
    /// Did not authenticate: the wrong cluster key, or tampered.
    pub bad_auth: AtomicU64,
    /// Authenticated but not a gossip message (or half of one that never
    /// found its other half).
    pub undecodable: AtomicU64,
    /// Too large to send even in two datagrams.
    pub oversize: AtomicU64,
    /// Seen before (a replay), or too many senders to remember.
    pub replayed: AtomicU64,
    /// Sent longer ago (or later) than the freshness window: a replay, or
    /// a clock far off.
    pub stale: AtomicU64,
    /// Sealed for another address than any of this node's.
    pub misaddressed: AtomicU64,
    /// Messages sent as two datagrams.
    pub split: AtomicU64,
    /// Replies to unknown addresses sent without their state.
    pub withheld: AtomicU64,
    /// Messages sent with a compact digest.
    pub compact: AtomicU64,
    /// Of those, exact ones (relative to what the peer last said).
    pub compact_exact: AtomicU64,
    /// Compact digests received that did not read back (a directory no
    /// longer known, or numbers that failed the check): dropped.
    pub compact_refused: AtomicU64,
    /// Exchanges begun with a peer because this node learned something
    /// new (`push.rs`), not in a gossip round.
    pub pushed: AtomicU64,
}

/// The addresses replies may carry state to: the cluster's nodes and the
/// seeds. Kept current by [`super::start`].
#[derive(Debug, Default)]
pub struct KnownPeers(RwLock<HashSet<IpAddr>>);

impl KnownPeers {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }

    pub fn replace(&self, ips: HashSet<IpAddr>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ips;
    }
}

/// What each peer reads of compact digests (by its gossip address and
/// port: nodes may share an address; absent:
/// chitchat's messages only).
#[derive(Default)]
pub struct Readers(RwLock<HashMap<SocketAddr, Reads>>);

impl Readers {
    pub fn reads(&self, peer: SocketAddr) -> Reads {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .copied()
            .unwrap_or(Reads::Chitchat)
    }

    pub fn replace(&self, readers: HashMap<SocketAddr, Reads>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = readers;
    }
}

/// A chitchat transport that seals every datagram with the cluster key.
pub struct Sealed {
    pub key: ClusterKey,
    pub stats: Arc<GossipStats>,
    pub known: Arc<KnownPeers>,
    /// Peers that read compact digests, and which forms.
    pub compact: Arc<Readers>,
}

#[async_trait::async_trait]
impl Transport for Sealed {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}/udp for gossip"))?;
        let cipher = ChaCha20Poly1305::new_from_slice(&self.key.0)
            .map_err(|e| anyhow::anyhow!("cluster key: {e}"))?;
        let dirs = Arc::new(Mutex::new(Directories::default()));
        let mut tx = Sender::new(cipher.clone(), self.stats.clone());
        tx.dirs = dirs.clone();
        tx.compact_peers = self.compact.clone();
        let mut rx = Receiver::new(cipher, self.stats.clone(), listen.ip());
        rx.dirs = dirs;
        Ok(Box::new(SealedSocket {
            socket,
            tx,
            rx,
            known: self.known.clone(),
            buf: vec![0u8; MAX_DATAGRAM],
        }))
    }
}

/// This node's own addresses, for the destination check.
struct Local {
    /// The listen address, when it is a specific one.
    only: Option<IpAddr>,
    cache: Vec<IpAddr>,
    refreshed: Option<Instant>,
}

impl Local {
    fn new(listen: IpAddr) -> Self {
        Local {
            only: (!listen.is_unspecified()).then_some(listen),
            cache: Vec::new(),
            refreshed: None,
        }
    }

    fn owns(&mut self, ip: IpAddr) -> bool {
        if let Some(only) = self.only {
            return ip == only;
        }
        if self.cache.contains(&ip) {
            return true;
        }
        // An address added since: look again, at most once a second.
        if self
            .refreshed
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.cache = crate::iface::local_addrs();
            self.refreshed = Some(Instant::now());
        }
        self.cache.contains(&ip)
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    tx: Sender,
    rx: Receiver,
    known: Arc<KnownPeers>,
    buf: Vec<u8>,
}

/// Seals messages into datagrams: this agent's session and counter.
struct Sender {
    cipher: ChaCha20Poly1305,
    stats: Arc<GossipStats>,
    session: u64,
    counter: u64,
    /// Compress messages that shrink (always, but in tests of the rest).
    compress: bool,
    /// Directories of digests sent and received (shared with the receiver).
    dirs: Arc<Mutex<Directories>>,
    /// Peers that read compact digests, and which forms.
    compact_peers: Arc<Readers>,
    /// One zstd context for every message (making one per message was 2%
    /// of a 200-node cluster's CPU); None if it could not be made.
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// Opens datagrams: the replay windows, halves waiting for their other
/// half, this node's addresses.
struct Receiver {
    cipher: ChaCha20Poly1305,
    stats: Arc<GossipStats>,
    replay: Replay,
    /// (session, counter, bytes, when) of first halves.
    partial: VecDeque<(u64, u64, Vec<u8>, Instant)>,
    local: Local,
    /// Directories of digests sent and received (shared with the sender).
    dirs: Arc<Mutex<Directories>>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut n = [0u8; N];
    // SAFETY: getrandom writes at most `N` bytes into our buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), N, 0) };
    if got != N as isize {
        // Never reuse a nonce silently: mix the clock in as a last resort.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes();
        for (i, b) in n.iter_mut().enumerate() {
            *b ^= t[i % t.len()];
        }
    }
    n
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The header inside the seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    part: u8,
    session: u64,
    counter: u64,
    sent_ms: u64,
    dest: IpAddr,
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.part);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        let dest = match self.dest {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        out.extend_from_slice(&dest.octets());
    }

    fn read(b: &[u8]) -> Option<(Header, &[u8])> {
        let (h, rest) = b.split_at_checked(HEADER_LEN)?;
        let u64_at = |i: usize| {
            h.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let dest: [u8; 16] = h.get(25..41)?.try_into().ok()?;
        let dest = std::net::Ipv6Addr::from(dest);
        Some((
            Header {
                part: h[0],
                session: u64_at(1)?,
                counter: u64_at(9)?,
                sent_ms: u64_at(17)?,
                dest: dest.to_ipv4_mapped().map_or(IpAddr::V6(dest), IpAddr::V4),
            },
            rest,
        ))
    }
}

fn seal(cipher: &ChaCha20Poly1305, h: &Header, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut plain = Vec::with_capacity(HEADER_LEN + body.len());
    h.write(&mut plain);
    plain.extend_from_slice(body);
    let nonce = random::<NONCE_LEN>();
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &plain,
                aad: AAD,
            },
        )
        .map_err(|_| anyhow::anyhow!("sealing a gossip message"))?;
    let mut datagram = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
    datagram.extend_from_slice(MAGIC);
    datagram.extend_from_slice(&nonce);
    datagram.extend_from_slice(&sealed);
    Ok(datagram)
}

/// A reply to an unknown address, without the state it would carry.
fn withhold(msg: ChitchatMessage) -> (ChitchatMessage, bool) {
    match msg {
        ChitchatMessage::SynAck { .. } => (
            ChitchatMessage::SynAck {
                digest: Default::default(),
                delta: Default::default(),
            },
            true,
        ),
        ChitchatMessage::Ack { .. } => (
            ChitchatMessage::Ack {
                delta: Default::default(),
            },
            true,
        ),
        other => (other, false),
    }
}

#[async_trait::async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let msg = if self.known.contains(to.ip()) {
            msg
        } else {
            let (m, cut) = withhold(msg);
            if cut {
                self.tx.stats.withheld.fetch_add(1, Ordering::Relaxed);
            }
            m
        };
        for datagram in self.tx.seal(to, &msg)? {
            // A send failure is transient (a peer gone, no route yet).
            if self.socket.send_to(&datagram, to).await.is_ok() {
                self.tx.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.tx
                    .stats
                    .bytes_sent
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "gossip recv");
                    continue;
                }
            };
            let stats = self.rx.stats.clone();
            match self.rx.accept(from, &self.buf[..len]) {
                Ok(Some(msg)) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes_received
                        .fetch_add(len as u64, Ordering::Relaxed);
                    return Ok((from, msg));
                }
                Ok(None) => {
                    // The first half of a message: wait for the second.
                    stats
                        .bytes_received
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(reason) => {
                    let s = &stats;
                    let counter = match reason {
                        Reject::Garbage => &s.garbage,
                        Reject::Auth => &s.bad_auth,
                        Reject::Decode => &s.undecodable,
                        Reject::Replayed => &s.replayed,
                        Reject::Stale => &s.stale,
                        Reject::Misaddressed => &s.misaddressed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    debug!(%from, len, ?reason, "gossip datagram dropped");
                }
            }
        }
    }
}

impl Sender {
    fn new(cipher: ChaCha20Poly1305, stats: Arc<GossipStats>) -> Self {
        Sender {
            cipher,
            stats,
            session: u64::from_le_bytes(random::<8>()),
            counter: 0,
            compress: true,
            dirs: Arc::default(),
            compact_peers: Arc::default(),
            zstd: zstd::bulk::Compressor::new(1).ok(),
        }
    }

    /// The datagrams that carry `msg` to `dest`: one, or two when it does
    /// not fit one once sealed (none, counted, beyond that).
    fn seal(&mut self, to: SocketAddr, msg: &ChitchatMessage) -> anyhow::Result<Vec<Vec<u8>>> {
        let dest = to.ip();
        let mut body = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut body);
        let mut flag = 0;
        {
            let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            let reads = self.compact_peers.reads(to);
            if let Some((c, exact)) = dirs.outgoing(to, &body, Instant::now(), reads) {
                body = c;
                flag |= COMPACT;
                if exact {
                    flag |= EXACT;
                    self.stats.compact_exact.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.compact.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.compress
            && body.len() >= COMPRESS_FROM
            && let Ok(c) = match &mut self.zstd {
                Some(z) => z.compress(&body),
                None => zstd::bulk::compress(&body, 1),
            }
            && c.len() < body.len()
        {
            body = c;
            flag |= COMPRESSED;
        }
        let parts: Vec<(u8, &[u8])> = if body.len() <= MAX_PART {
            vec![(WHOLE | flag, &body[..])]
        } else if body.len() <= 2 * MAX_PART {
            self.stats.split.fetch_add(1, Ordering::Relaxed);
            let (a, b) = body.split_at(MAX_PART);
            vec![(FIRST | flag, a), (SECOND | flag, b)]
        } else {
            self.stats.oversize.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        };
        let sent_ms = now_ms();
        parts
            .into_iter()
            .map(|(part, bytes)| {
                self.counter += 1;
                let h = Header {
                    part,
                    session: self.session,
                    counter: self.counter,
                    sent_ms,
                    dest,
                };
                seal(&self.cipher, &h, bytes)
            })
            .collect()
    }
}

impl Receiver {
    fn new(cipher: ChaCha20Poly1305, stats: Arc<GossipStats>, listen: IpAddr) -> Self {
        Receiver {
            cipher,
            stats,
            replay: Replay::default(),
            partial: VecDeque::new(),
            local: Local::new(listen),
            dirs: Arc::default(),
            zstd: zstd::bulk::Decompressor::new().ok(),
        }
    }

    /// One datagram from `from`: a message, half of one (None), or why it
    /// is dropped.
    fn accept(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<ChitchatMessage>, Reject> {
        let plain = open(&self.cipher, datagram)?;
        let (h, body) = Header::read(&plain).ok_or(Reject::Decode)?;
        if !self.local.owns(h.dest) {
            return Err(Reject::Misaddressed);
        }
        match self.replay.check(h.session, h.counter, h.sent_ms, now_ms()) {
            Verdict::Fresh => {}
            Verdict::Replayed | Verdict::Full => return Err(Reject::Replayed),
            Verdict::Stale => return Err(Reject::Stale),
        }
        let compressed = h.part & COMPRESSED != 0;
        let compact = h.part & COMPACT != 0;
        let exact = h.part & EXACT != 0;
        if exact && !compact {
            return Err(Reject::Decode);
        }
        let whole = match h.part & !(COMPRESSED | COMPACT | EXACT) {
            WHOLE => body.to_vec(),
            FIRST => {
                self.partial
                    .retain(|(_, _, _, t)| t.elapsed() < PARTIAL_TTL);
                if self.partial.len() >= MAX_PARTIAL {
                    self.partial.pop_front();
                    self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                }
                self.partial
                    .push_back((h.session, h.counter, body.to_vec(), Instant::now()));
                return Ok(None);
            }
            SECOND => {
                let i = self
                    .partial
                    .iter()
                    .position(|(s, c, _, _)| *s == h.session && *c + 1 == h.counter)
                    .ok_or(Reject::Decode)?;
                let (_, _, mut first, _) = self.partial.remove(i).ok_or(Reject::Decode)?;
                first.extend_from_slice(body);
                first
            }
            _ => return Err(Reject::Decode),
        };
        let whole = if compressed {
            match &mut self.zstd {
                Some(z) => z.decompress(&whole, MAX_DECOMPRESSED),
                None => zstd::bulk::decompress(&whole, MAX_DECOMPRESSED),
            }
            .map_err(|_| Reject::Decode)?
        } else {
            whole
        };
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let whole = if compact {
            // A directory this node no longer remembers: undecodable (the
            // peer learns this node's current one from its next digest).
            match dirs.expand(&whole, MAX_DECOMPRESSED, from, exact) {
                Some(w) => w,
                None => {
                    dirs.refused_from(from);
                    self.stats.compact_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Reject::Decode);
                }
            }
        } else {
            whole
        };
        dirs.note_from(from, &whole, Instant::now());
        drop(dirs);
        let mut slice = whole.as_slice();
        ChitchatMessage::deserialize(&mut slice)
            .map(Some)
            .map_err(|_| Reject::Decode)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Garbage,
    Auth,
    Decode,
    Replayed,
    Stale,
    Misaddressed,
}

/// Authenticates and decrypts one datagram.
fn open(cipher: &ChaCha20Poly1305, datagram: &[u8]) -> Result<Vec<u8>, Reject> {
    if datagram.len() < MAGIC.len() + NONCE_LEN + TAG_LEN || &datagram[..MAGIC.len()] != MAGIC {
        return Err(Reject::Garbage);
    }
    let (nonce, sealed) = datagram[MAGIC.len()..].split_at(NONCE_LEN);
    cipher
        .decrypt(
            <&Nonce>::try_from(nonce).map_err(|_| Reject::Garbage)?,
            Payload {
                msg: sealed,
                aad: AAD,
            },
        )
        .map_err(|_| Reject::Auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sender of the datagrams in these tests.
    const PEER: SocketAddr =
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9)), 7000);

    #[test]
    fn keys_from_files() {
        assert!(ClusterKey::from_file_bytes(&[7u8; 32]).is_ok());
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert_eq!(
            ClusterKey::from_file_bytes(hex.as_bytes()).expect("hex").0[1],
            0x11
        );
        for bad in [
            &b"short"[..],
            &[0u8; 31],
            b"zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ] {
            assert!(ClusterKey::from_file_bytes(bad).is_err());
        }
    }

    fn pair(key: [u8; 32], listen: &str) -> (Sender, Receiver) {
        let c = ChaCha20Poly1305::new_from_slice(&key).expect("key");
        let stats = Arc::new(GossipStats::default());
        (
            Sender::new(c.clone(), stats.clone()),
            Receiver::new(c, stats, listen.parse().expect("ip")),
        )
    }

    fn one(tx: &mut Sender, dest: &str, msg: &ChitchatMessage) -> Vec<u8> {
        let to = SocketAddr::new(dest.parse().expect("ip"), 7000);
        let mut d = tx.seal(to, msg).expect("seal");
        assert_eq!(d.len(), 1);
        d.remove(0)
    }

    /// chitchat's message from `bytes`.
    fn chitchat(bytes: &[u8]) -> ChitchatMessage {
        let mut b = bytes;
        ChitchatMessage::deserialize(&mut b).expect("a chitchat message")
    }

    #[test]
    fn digests_go_compact_to_peers_that_read_them() {
        use crate::gossip::compact::{cluster, message, refs};
        let key = [7u8; 32];
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7000".parse().expect("addr"),
            "127.0.0.2:7000".parse().expect("addr"),
        );
        // Two nodes, each a sender and a receiver sharing its directories;
        // each reads compact digests and knows the other does.
        let node = |me: SocketAddr, other: SocketAddr| {
            let (mut tx, mut rx) = pair(key, &me.ip().to_string());
            let dirs = Arc::new(Mutex::new(Directories::default()));
            tx.dirs = dirs.clone();
            rx.dirs = dirs;
            tx.compact_peers
                .replace(HashMap::from([(other, Reads::Exact)]));
            (tx, rx)
        };
        let (mut tx_a, mut rx_a) = node(a, b);
        let (mut tx_b, mut rx_b) = node(b, a);
        // chitchat's own empty SYN-ACK: its delta's bytes follow the
        // digest's count.
        let mut empty = Vec::new();
        ChitchatMessage::SynAck {
            digest: Default::default(),
            delta: Default::default(),
        }
        .serialize(&mut empty);
        let delta = &empty[6..];
        // B opens with its digest of 200 nodes (full: it knows nothing of
        // A's directory); A answers relative to it.
        let syn = chitchat(&message(0, &refs(&cluster(200, 500)), b"\x04\x00mesh"));
        let d = tx_b.seal(a, &syn).expect("seal");
        assert_eq!(rx_a.accept(b, &d[0]), Ok(Some(syn)));
        assert_eq!(tx_b.stats.compact.load(Ordering::Relaxed), 0);
        let mut ours = cluster(200, 530);
        ours.push(("node-zz".into(), 1, 252, 7));
        let synack_bytes = message(1, &refs(&ours), delta);
        let synack = chitchat(&synack_bytes);
        let full = {
            let mut plain = Sender::new(
                ChaCha20Poly1305::new_from_slice(&key).expect("key"),
                Arc::default(),
            );
            plain.seal(b, &synack).expect("seal")[0].len()
        };
        let d = tx_a.seal(b, &synack).expect("seal");
        assert_eq!(tx_a.stats.compact.load(Ordering::Relaxed), 1);
        println!(
            "SYN-ACK with a digest of 201 nodes: {full} bytes sealed, {} compact",
            d[0].len()
        );
        assert!(d[0].len() * 2 < full, "{} vs {full}", d[0].len());
        assert_eq!(rx_b.accept(a, &d[0]), Ok(Some(chitchat(&synack_bytes))));
        // A node that does not read them gets chitchat's bytes.
        tx_a.compact_peers.replace(HashMap::new());
        let d = tx_a.seal(b, &synack).expect("seal");
        assert_eq!(tx_a.stats.compact.load(Ordering::Relaxed), 1);
        assert_eq!(rx_b.accept(a, &d[0]), Ok(Some(synack)));
    }

    #[test]
    fn datagrams_that_do_not_open_are_classified() {
        let (mut tx, mut rx) = pair([1u8; 32], "127.0.0.1");
        let (_, mut other) = pair([2u8; 32], "127.0.0.1");
        let msg = ChitchatMessage::BadCluster;
        let datagram = one(&mut tx, "127.0.0.1", &msg);
        assert_eq!(
            other.accept(PEER, &datagram).err(),
            Some(Reject::Auth),
            "wrong key"
        );
        let mut flipped = datagram.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            rx.accept(PEER, &flipped).err(),
            Some(Reject::Auth),
            "tampered"
        );
        assert_eq!(
            rx.accept(PEER, &datagram),
            Ok(Some(ChitchatMessage::BadCluster))
        );
        assert_eq!(
            rx.accept(PEER, &datagram).err(),
            Some(Reject::Replayed),
            "the same datagram twice"
        );
        assert_eq!(
            rx.accept(PEER, &one(&mut tx, "127.0.0.2", &msg)).err(),
            Some(Reject::Misaddressed),
            "sealed for another node"
        );
        assert_eq!(rx.accept(PEER, b"MSH2short").err(), Some(Reject::Garbage));
        assert_eq!(rx.accept(PEER, &[0u8; 100]).err(), Some(Reject::Garbage));
        let junk = Header {
            part: WHOLE,
            session: 9,
            counter: 1,
            sent_ms: now_ms(),
            dest: "127.0.0.1".parse().expect("ip"),
        };
        let sealed = seal(&tx.cipher, &junk, b"\xffjunk").expect("seal");
        assert_eq!(rx.accept(PEER, &sealed).err(), Some(Reject::Decode));
        let old = Header {
            counter: 2,
            sent_ms: now_ms() - 10 * 60_000,
            ..junk
        };
        let sealed = seal(&tx.cipher, &old, b"").expect("seal");
        assert_eq!(rx.accept(PEER, &sealed).err(), Some(Reject::Stale));
        // Header fields survive the trip.
        let mut buf = Vec::new();
        junk.write(&mut buf);
        assert_eq!(buf.len(), HEADER_LEN);
        assert_eq!(Header::read(&buf), Some((junk, &[][..])));
    }

    #[test]
    fn a_message_too_large_for_one_datagram_goes_in_two() {
        let (mut tx, mut rx) = pair([1u8; 32], "127.0.0.1");
        // As if it did not compress.
        tx.compress = false;
        // As large as chitchat makes them: its whole payload budget.
        let msg = ChitchatMessage::Syn {
            cluster_id: "x".repeat(65_480),
            digest: Default::default(),
        };
        assert!(msg.serialized_len() > MAX_PART);
        let parts = tx
            .seal("127.0.0.1:7000".parse().expect("addr"), &msg)
            .expect("seal");
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|d| d.len() <= MAX_DATAGRAM));
        assert_eq!(rx.accept(PEER, &parts[0]), Ok(None), "the first half waits");
        assert_eq!(rx.accept(PEER, &parts[1]), Ok(Some(msg)));
        // A second half alone does not decode.
        let again = ChitchatMessage::Syn {
            cluster_id: "y".repeat(65_480),
            digest: Default::default(),
        };
        let parts = tx
            .seal("127.0.0.1:7000".parse().expect("addr"), &again)
            .expect("seal");
        assert_eq!(rx.accept(PEER, &parts[1]).err(), Some(Reject::Decode));
        assert_eq!(tx.stats.split.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn messages_are_compressed_and_bombs_refused() {
        let (mut tx, mut rx) = pair([1u8; 32], "127.0.0.1");
        let msg = ChitchatMessage::Syn {
            cluster_id: "node17 127.0.0.17:7000 ".repeat(400),
            digest: Default::default(),
        };
        let d = one(&mut tx, "127.0.0.1", &msg);
        assert!(
            d.len() * 10 < msg.serialized_len(),
            "{} -> {}",
            msg.serialized_len(),
            d.len()
        );
        assert_eq!(rx.accept(PEER, &d), Ok(Some(msg)));
        // A frame that opens to more than MAX_DECOMPRESSED is refused.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_DECOMPRESSED + 1], 1).expect("zstd");
        let h = Header {
            part: WHOLE | COMPRESSED,
            session: 77,
            counter: 1,
            sent_ms: now_ms(),
            dest: "127.0.0.1".parse().expect("ip"),
        };
        let sealed = seal(&tx.cipher, &h, &bomb).expect("seal");
        assert_eq!(rx.accept(PEER, &sealed).err(), Some(Reject::Decode));
    }

    #[test]
    fn replies_to_unknown_addresses_carry_no_state() {
        let syn = ChitchatMessage::Syn {
            cluster_id: "mesh".into(),
            digest: Default::default(),
        };
        let (m, cut) = withhold(syn);
        assert!(!cut, "a Syn is not a reply");
        assert!(matches!(m, ChitchatMessage::Syn { .. }));
        let (m, cut) = withhold(ChitchatMessage::Ack {
            delta: Default::default(),
        });
        assert!(cut);
        assert!(m.serialized_len() < 8, "{}", m.serialized_len());
        let known = KnownPeers::default();
        known.replace(["10.0.0.1".parse().expect("ip")].into());
        assert!(known.contains("10.0.0.1".parse().expect("ip")));
        assert!(!known.contains("10.0.0.2".parse().expect("ip")));
    }
}

//! Gossip over UDP, every datagram authenticated and encrypted with the
//! cluster key (XChaCha20-Poly1305, a random 192-bit nonce per datagram:
//! with one key shared by the whole cluster, random 96-bit nonces would
//! risk a repeat): `MAGIC | nonce (24) | ciphertext+tag`. A nonce comes
//! from the OS's random source or the datagram is not sent.
//!
//! Inside the seal, a header before chitchat's message: the part (whole,
//! first or second of two) and its flags, the sender's session and counter
//! and its send time (replay protection, `replay.rs`), the destination
//! address (a datagram captured on its way to one node is refused by every
//! other) and the reference (below). chitchat fills messages up to the
//! largest UDP payload; one that does not fit once sealed goes as two
//! datagrams, put together again on receipt.
//!
//! Messages are compressed (zstd) when that makes them smaller. chitchat's
//! digests name every node in every round, so two nodes' digests are
//! nearly the same bytes: a message to a peer is compressed against the
//! last digest-carrying message heard from that peer (zstd with that
//! message as a raw-content dictionary), named in the header by its hash.
//! The peer keeps the last few such messages it sent to each node and
//! opens it with the same one; a reference it no longer holds drops the
//! datagram (counted), and the next round goes through. The messages are
//! opaque bytes here: nothing depends on chitchat's wire format. A
//! compressed message never opens to more than [`MAX_DECOMPRESSED`] bytes.
//!
//! A reply (SynAck, Ack) to an address that is not a known node's (a
//! node of the cluster state, or a seed) carries no state: a spoofed source
//! never gets more bytes back than it sent. The peer answers with its own
//! state, which makes it known for the next round.
//!
//! The key is a keyring (memberlist's model): datagrams are sealed with
//! the primary key and opened with any key of the ring, tried in order, so
//! the cluster key rotates with no node lost: add the new key on every
//! host, make it primary on every host, remove the old one (`Keys::set`
//! swaps the ring in place; the agent reads its key file again when it
//! changes).
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
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use chitchat::{
    ChitchatMessage, Deserializable, Serializable,
    transport::{Socket, Transport},
};
use tracing::debug;

use super::replay::{Replay, Verdict};

const MAGIC: &[u8; 4] = b"MSH3";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bound to the key: a message for another purpose never authenticates.
const AAD: &[u8] = b"mesh gossip v3";
/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;
/// part (1) | session (8) | counter (8) | sent_ms (8) | destination (16) |
/// reference (8).
const HEADER_LEN: usize = 49;
/// Most message bytes one datagram carries.
const MAX_PART: usize = MAX_DATAGRAM - MAGIC.len() - NONCE_LEN - TAG_LEN - HEADER_LEN;
const WHOLE: u8 = 0;
const FIRST: u8 = 1;
const SECOND: u8 = 2;
/// Flag on the part byte: the message is zstd-compressed (against the
/// header's reference when that is not 0).
const COMPRESSED: u8 = 0x80;
/// Messages shorter than this go as they are.
const COMPRESS_FROM: usize = 256;
/// The most a compressed message may open to (two datagrams' worth).
pub const MAX_DECOMPRESSED: usize = 2 * MAX_DATAGRAM;
/// First halves waiting for their second one, and for how long.
const MAX_PARTIAL: usize = 16;
const PARTIAL_TTL: Duration = Duration::from_secs(2);
/// Messages kept per peer that it may compress against (sent to it since
/// the one it last heard: more than this many in flight is rare).
const SENT_KEPT: usize = 3;
/// Peers whose messages are kept; beyond this the tables start afresh.
const MAX_PEERS: usize = 4096;

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

    /// The key's check value: 8 hex digits of a MAC of nothing under it
    /// (tells keys apart in logs and `meshctl status` and says nothing of
    /// the key).
    pub fn id(&self) -> String {
        let cipher = XChaCha20Poly1305::new(&self.0.into());
        let tag = cipher
            .encrypt(
                &XNonce::default(),
                Payload {
                    msg: b"",
                    aad: b"mesh key check value",
                },
            )
            .unwrap_or_default();
        tag.iter().take(4).map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }
}

/// The most keys a keyring holds.
pub const MAX_KEYS: usize = 8;

/// The cluster's keys: the first is the primary (it seals), every one
/// opens.
#[derive(Clone)]
pub struct Keyring(Vec<ClusterKey>);

impl Keyring {
    /// From a key file: one key (32 raw bytes, or 64 hex digits), or one key
    /// of 64 hex digits per line, the primary first (blank lines and lines
    /// starting with `#` are skipped).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() == 32 {
            return ClusterKey::from_file_bytes(bytes).map(|k| Keyring(vec![k]));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| {
            "the key file is neither 32 bytes nor lines of 64 hex digits".to_string()
        })?;
        let mut keys: Vec<ClusterKey> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let k = ClusterKey::from_file_bytes(line.as_bytes())
                .map_err(|e| format!("line {}: {e}", i + 1))?;
            if keys.iter().any(|o| o.0 == k.0) {
                return Err(format!("line {}: the same key twice", i + 1));
            }
            keys.push(k);
        }
        if keys.is_empty() {
            return Err("the key file holds no key".into());
        }
        if keys.len() > MAX_KEYS {
            return Err(format!("{} keys; at most {MAX_KEYS}", keys.len()));
        }
        Ok(Keyring(keys))
    }

    /// The keys' check values, the primary first.
    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(ClusterKey::id).collect()
    }
}

impl From<ClusterKey> for Keyring {
    fn from(k: ClusterKey) -> Self {
        Keyring(vec![k])
    }
}

/// The keyring gossip uses now, shared by its sockets and whoever replaces
/// it.
#[derive(Clone)]
pub struct Keys(Arc<RwLock<Ciphers>>);

struct Ciphers {
    /// The primary first.
    all: Vec<XChaCha20Poly1305>,
    ids: Vec<String>,
}

impl Keys {
    pub fn new(ring: &Keyring) -> Self {
        Keys(Arc::new(RwLock::new(Ciphers::of(ring))))
    }

    /// Replaces the keyring: the next datagram is sealed with its primary.
    pub fn set(&self, ring: &Keyring) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Ciphers::of(ring);
    }

    /// The check values of the keys in use, the primary first.
    pub fn ids(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).ids.clone()
    }

    fn primary(&self) -> XChaCha20Poly1305 {
        let c = self.0.read().unwrap_or_else(|p| p.into_inner());
        c.all[0].clone()
    }

    /// Opens `datagram` with the first key that authenticates it.
    fn open(&self, datagram: &[u8]) -> Result<Vec<u8>, Reject> {
        let c = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut last = Reject::Auth;
        for cipher in &c.all {
            match open(cipher, datagram) {
                Ok(plain) => return Ok(plain),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl From<ClusterKey> for Keys {
    fn from(k: ClusterKey) -> Self {
        Keys::new(&k.into())
    }
}

impl Ciphers {
    fn of(ring: &Keyring) -> Self {
        Ciphers {
            all: ring.0.iter().map(ClusterKey::cipher).collect(),
            ids: ring.ids(),
        }
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
    /// Not sent: the OS's random source failed (no nonce).
    pub no_nonce: AtomicU64,
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
    /// Messages sent compressed against a message of the peer's.
    pub referenced: AtomicU64,
    /// Received against a message this node no longer holds: dropped.
    pub unknown_reference: AtomicU64,
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

/// A chitchat transport that seals every datagram with the cluster key.
pub struct Sealed {
    pub keys: Keys,
    pub stats: Arc<GossipStats>,
    pub known: Arc<KnownPeers>,
}

#[async_trait::async_trait]
impl Transport for Sealed {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}/udp for gossip"))?;
        let refs = Arc::new(Mutex::new(References::default()));
        let mut tx = Sender::new(self.keys.clone(), self.stats.clone())?;
        tx.refs = refs.clone();
        let mut rx = Receiver::new(self.keys.clone(), self.stats.clone(), listen.ip());
        rx.refs = refs;
        Ok(Box::new(SealedSocket {
            socket,
            tx,
            rx,
            known: self.known.clone(),
            buf: vec![0u8; MAX_DATAGRAM],
        }))
    }
}

/// The messages compression refers to, shared by a node's sender and
/// receiver: what it sent to each peer lately (the peer may compress
/// against any of them) and the last it heard from each (what it
/// compresses against), each with its hash.
#[derive(Default)]
struct References {
    sent: HashMap<SocketAddr, VecDeque<Kept>>,
    heard: HashMap<SocketAddr, Kept>,
}

/// A message kept as a reference, with its hash.
type Kept = (u64, Arc<[u8]>);

impl References {
    fn note_sent(&mut self, to: SocketAddr, msg: &[u8]) {
        if self.sent.len() >= MAX_PEERS && !self.sent.contains_key(&to) {
            self.sent.clear();
        }
        let kept = self.sent.entry(to).or_default();
        if kept.len() == SENT_KEPT {
            kept.pop_front();
        }
        kept.push_back((hash(msg), msg.into()));
    }

    fn note_heard(&mut self, from: SocketAddr, msg: &[u8]) {
        if self.heard.len() >= MAX_PEERS && !self.heard.contains_key(&from) {
            self.heard.clear();
        }
        self.heard.insert(from, (hash(msg), msg.into()));
    }

    /// The message sent to `peer` that `reference` names; any peer's when
    /// the peer's address as seen differs from the one it gossips under
    /// (a source address the kernel chose).
    fn sent_to(&self, peer: SocketAddr, reference: u64) -> Option<Arc<[u8]>> {
        let find = |kept: &VecDeque<Kept>| {
            kept.iter()
                .find(|(h, _)| *h == reference)
                .map(|(_, m)| m.clone())
        };
        self.sent
            .get(&peer)
            .and_then(find)
            .or_else(|| self.sent.values().find_map(find))
    }
}

/// A message's name as a reference: FNV-1a, finished with SplitMix64; never
/// 0 (the header's "none").
fn hash(msg: &[u8]) -> u64 {
    mesh_common::hash::name(msg).max(1)
}

/// Messages that carry a digest: the ones worth compressing against.
fn has_digest(msg: &ChitchatMessage) -> bool {
    matches!(
        msg,
        ChitchatMessage::Syn { .. } | ChitchatMessage::SynAck { .. }
    )
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
    keys: Keys,
    stats: Arc<GossipStats>,
    session: u64,
    counter: u64,
    /// Compress messages that shrink (always, but in tests of the rest).
    compress: bool,
    refs: Arc<Mutex<References>>,
    /// One zstd context for every message (making one per message was 2%
    /// of a 200-node cluster's CPU); None if it could not be made.
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// Opens datagrams: the replay windows, halves waiting for their other
/// half, this node's addresses.
struct Receiver {
    keys: Keys,
    stats: Arc<GossipStats>,
    replay: Replay,
    /// (session, counter, bytes, when) of first halves.
    partial: VecDeque<(u64, u64, Vec<u8>, Instant)>,
    local: Local,
    refs: Arc<Mutex<References>>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

/// `N` bytes from the OS's random source; an error, never a weaker
/// fallback, when it fails.
pub(crate) fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut n = [0u8; N];
    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("the OS's random source: {e}"))?;
    Ok(n)
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
    /// The hash of the peer's message this one is compressed against, or 0.
    reference: u64,
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
        out.extend_from_slice(&self.reference.to_be_bytes());
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
                reference: u64_at(41)?,
            },
            rest,
        ))
    }
}

fn seal(cipher: &XChaCha20Poly1305, h: &Header, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut plain = Vec::with_capacity(HEADER_LEN + body.len());
    h.write(&mut plain);
    plain.extend_from_slice(body);
    let nonce = random::<NONCE_LEN>()?;
    let sealed = cipher
        .encrypt(
            &XNonce::from(nonce),
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
        let datagrams = match self.tx.seal(to, &msg) {
            Ok(d) => d,
            Err(e) => {
                // No nonce: this message is not sent; the next round is
                // another try (an error here would end chitchat's loop).
                self.tx.stats.no_nonce.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "gossip message not sent");
                return Ok(());
            }
        };
        for datagram in datagrams {
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
                        Reject::UnknownReference => &s.unknown_reference,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    debug!(%from, len, ?reason, "gossip datagram dropped");
                }
            }
        }
    }
}

impl Sender {
    fn new(keys: Keys, stats: Arc<GossipStats>) -> anyhow::Result<Self> {
        Ok(Sender {
            keys,
            stats,
            session: u64::from_le_bytes(random::<8>()?),
            counter: 0,
            compress: true,
            refs: Arc::default(),
            zstd: zstd::bulk::Compressor::new(1).ok(),
        })
    }

    /// `body` compressed, against `reference` when given; None when that
    /// does not make it smaller.
    fn compressed(&mut self, body: &[u8], reference: Option<&[u8]>) -> Option<Vec<u8>> {
        let z = match &mut self.zstd {
            Some(z) => z,
            None => {
                return zstd::bulk::compress(body, 1)
                    .ok()
                    .filter(|c| c.len() < body.len());
            }
        };
        z.set_dictionary(1, reference.unwrap_or_default()).ok()?;
        z.compress(body).ok().filter(|c| c.len() < body.len())
    }

    /// The datagrams that carry `msg` to `dest`: one, or two when it does
    /// not fit one once sealed (none, counted, beyond that).
    fn seal(&mut self, to: SocketAddr, msg: &ChitchatMessage) -> anyhow::Result<Vec<Vec<u8>>> {
        let dest = to.ip();
        let mut body = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut body);
        let (mut flag, mut reference) = (0, 0);
        if self.compress && body.len() >= COMPRESS_FROM {
            let heard = {
                let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
                if has_digest(msg) {
                    refs.note_sent(to, &body);
                }
                refs.heard.get(&to).cloned()
            };
            // A zstd context without the zstd library's own allocation
            // cannot compress against a reference: plain then.
            let against = heard.filter(|_| self.zstd.is_some());
            if let Some(c) = self.compressed(&body, against.as_ref().map(|(_, m)| &m[..])) {
                body = c;
                flag = COMPRESSED;
                if let Some((h, _)) = against {
                    reference = h;
                    self.stats.referenced.fetch_add(1, Ordering::Relaxed);
                }
            }
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
        let cipher = self.keys.primary();
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
                    reference,
                };
                seal(&cipher, &h, bytes)
            })
            .collect()
    }
}

impl Receiver {
    fn new(keys: Keys, stats: Arc<GossipStats>, listen: IpAddr) -> Self {
        Receiver {
            keys,
            stats,
            replay: Replay::default(),
            partial: VecDeque::new(),
            local: Local::new(listen),
            refs: Arc::default(),
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
        let plain = self.keys.open(datagram)?;
        let (h, body) = Header::read(&plain).ok_or(Reject::Decode)?;
        if !self.local.owns(h.dest) {
            return Err(Reject::Misaddressed);
        }
        match self.replay.check(h.session, h.counter, h.sent_ms, now_ms()) {
            Verdict::Fresh => {}
            Verdict::Replayed | Verdict::Full => return Err(Reject::Replayed),
            Verdict::Stale => return Err(Reject::Stale),
        }
        let whole = match h.part & !COMPRESSED {
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
        let whole = if h.part & COMPRESSED != 0 {
            self.decompress(from, &whole, h.reference)?
        } else if h.reference != 0 {
            return Err(Reject::Decode);
        } else {
            whole
        };
        let mut slice = whole.as_slice();
        let msg = ChitchatMessage::deserialize(&mut slice).map_err(|_| Reject::Decode)?;
        if has_digest(&msg) && whole.len() >= COMPRESS_FROM {
            self.refs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note_heard(from, &whole);
        }
        Ok(Some(msg))
    }

    /// A compressed message opened, against the message of this node's
    /// that `reference` names (0: none).
    fn decompress(
        &mut self,
        from: SocketAddr,
        c: &[u8],
        reference: u64,
    ) -> Result<Vec<u8>, Reject> {
        let against = if reference == 0 {
            None
        } else {
            let refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
            Some(
                refs.sent_to(from, reference)
                    .ok_or(Reject::UnknownReference)?,
            )
        };
        let z = match (&mut self.zstd, &against) {
            (Some(z), _) => z,
            (None, None) => {
                return zstd::bulk::decompress(c, MAX_DECOMPRESSED).map_err(|_| Reject::Decode);
            }
            (None, Some(_)) => return Err(Reject::Decode),
        };
        z.set_dictionary(against.as_deref().unwrap_or_default())
            .map_err(|_| Reject::Decode)?;
        z.decompress(c, MAX_DECOMPRESSED)
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
    UnknownReference,
}

/// Authenticates and decrypts one datagram.
fn open(cipher: &XChaCha20Poly1305, datagram: &[u8]) -> Result<Vec<u8>, Reject> {
    if datagram.len() < MAGIC.len() + NONCE_LEN + TAG_LEN || &datagram[..MAGIC.len()] != MAGIC {
        return Err(Reject::Garbage);
    }
    let (nonce, sealed) = datagram[MAGIC.len()..].split_at(NONCE_LEN);
    cipher
        .decrypt(
            <&XNonce>::try_from(nonce).map_err(|_| Reject::Garbage)?,
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

    #[test]
    fn keyrings_from_files() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let hex = |k: &[u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let one = Keyring::from_file_bytes(&a).expect("raw");
        let two = Keyring::from_file_bytes(
            format!("# rotating\n{}\n\n  {}  \n", hex(&b), hex(&a)).as_bytes(),
        )
        .expect("two");
        assert_eq!(two.ids().len(), 2);
        assert_eq!(two.ids()[1], one.ids()[0], "the same key, the same id");
        assert_ne!(two.ids()[0], two.ids()[1]);
        assert_eq!(one.ids()[0].len(), 8);
        for bad in [
            format!("{}\n{}", hex(&a), hex(&a)),
            "# nothing\n".to_string(),
            format!("{}\nnot hex", hex(&a)),
            (0..9).map(|i| hex(&[i as u8 + 10; 32]) + "\n").collect(),
        ] {
            assert!(Keyring::from_file_bytes(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_primary_seals_and_every_key_of_the_ring_opens() {
        let (a, b) = (
            ClusterKey::from_bytes([1; 32]),
            ClusterKey::from_bytes([2; 32]),
        );
        let (mut tx, _) = pair([1; 32], "127.0.0.1");
        let (_, mut rx) = pair([2; 32], "127.0.0.1");
        let to: SocketAddr = "127.0.0.1:7946".parse().expect("addr");
        let msg = ChitchatMessage::BadCluster;
        // Sealed with a, opened by a ring of b only: refused.
        let d = tx.seal(to, &msg).expect("seal").remove(0);
        assert_eq!(rx.accept(PEER, &d).err(), Some(Reject::Auth));
        // The receiver accepts a too (b primary): opened.
        rx.keys.set(&Keyring(vec![b.clone(), a.clone()]));
        let d = tx.seal(to, &msg).expect("seal").remove(0);
        assert!(rx.accept(PEER, &d).is_ok());
        // The sender makes b primary: the receiver, b only again, opens it.
        tx.keys.set(&Keyring(vec![b.clone(), a]));
        rx.keys.set(&Keyring(vec![b]));
        let d = tx.seal(to, &msg).expect("seal").remove(0);
        assert!(rx.accept(PEER, &d).is_ok());
    }

    fn pair(key: [u8; 32], listen: &str) -> (Sender, Receiver) {
        let c = Keys::from(ClusterKey::from_bytes(key));
        let stats = Arc::new(GossipStats::default());
        (
            Sender::new(c.clone(), stats.clone()).expect("random"),
            Receiver::new(c, stats, listen.parse().expect("ip")),
        )
    }

    fn one(tx: &mut Sender, dest: &str, msg: &ChitchatMessage) -> Vec<u8> {
        let to = SocketAddr::new(dest.parse().expect("ip"), 7000);
        let mut d = tx.seal(to, msg).expect("seal");
        assert_eq!(d.len(), 1);
        d.remove(0)
    }

    /// A SYN whose bytes do not compress on their own (a digest's numbers
    /// and names stand for them), with `changed` of them different.
    fn noisy_syn(changed: usize) -> ChitchatMessage {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut text: Vec<u8> = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 26) as u8
            })
            .collect();
        for i in 0..changed {
            text[i * 97] = b'Z';
        }
        ChitchatMessage::Syn {
            cluster_id: String::from_utf8(text).expect("ascii"),
            digest: Default::default(),
        }
    }

    #[test]
    fn messages_go_compressed_against_what_the_peer_last_said() {
        let key = [7u8; 32];
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7000".parse().expect("addr"),
            "127.0.0.2:7000".parse().expect("addr"),
        );
        // Two nodes, each a sender and a receiver sharing its references.
        let node = |me: SocketAddr| {
            let (mut tx, mut rx) = pair(key, &me.ip().to_string());
            let refs = Arc::new(Mutex::new(References::default()));
            tx.refs = refs.clone();
            rx.refs = refs;
            (tx, rx)
        };
        let (mut tx_a, mut rx_a) = node(a);
        let (mut tx_b, mut rx_b) = node(b);
        // B speaks first: nothing to refer to.
        let first = noisy_syn(0);
        let d = tx_b.seal(a, &first).expect("seal");
        assert_eq!(tx_b.stats.referenced.load(Ordering::Relaxed), 0);
        let alone = d[0].len();
        assert_eq!(rx_a.accept(b, &d[0]), Ok(Some(first)));
        // A answers with nearly the same bytes, against what B said.
        let answer = noisy_syn(20);
        let d = tx_a.seal(b, &answer).expect("seal");
        assert_eq!(tx_a.stats.referenced.load(Ordering::Relaxed), 1);
        println!(
            "a 4 kB message: {alone} bytes sealed alone, {} against the peer's",
            d[0].len()
        );
        assert!(d[0].len() * 10 < alone, "{} vs {alone}", d[0].len());
        assert_eq!(rx_b.accept(a, &d[0]), Ok(Some(answer)));
        // A node that no longer holds the message referred to drops it.
        let (_, mut forgetful) = pair(key, "127.0.0.2");
        let d = tx_a.seal(b, &noisy_syn(30)).expect("seal");
        assert_eq!(
            forgetful.accept(a, &d[0]).err(),
            Some(Reject::UnknownReference)
        );
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
        assert_eq!(rx.accept(PEER, b"MSH3short").err(), Some(Reject::Garbage));
        assert_eq!(rx.accept(PEER, &[0u8; 100]).err(), Some(Reject::Garbage));
        let junk = Header {
            part: WHOLE,
            session: 9,
            counter: 1,
            sent_ms: now_ms(),
            dest: "127.0.0.1".parse().expect("ip"),
            reference: 0,
        };
        let sealed = seal(&tx.keys.primary(), &junk, b"\xffjunk").expect("seal");
        assert_eq!(rx.accept(PEER, &sealed).err(), Some(Reject::Decode));
        let old = Header {
            counter: 2,
            sent_ms: now_ms() - 10 * 60_000,
            ..junk
        };
        let sealed = seal(&tx.keys.primary(), &old, b"").expect("seal");
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
            reference: 0,
        };
        let sealed = seal(&tx.keys.primary(), &h, &bomb).expect("seal");
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

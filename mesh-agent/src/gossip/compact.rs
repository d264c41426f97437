//! Compact digests. chitchat's SYN and SYN-ACK carry a digest that names
//! every node (its id, generation and gossip address) with three numbers
//! (heartbeat, last GC version, max version: 8 bytes each) in every round,
//! so idle gossip grows with the number of nodes, and compression cannot
//! take much from the names: they differ within one message.
//!
//! But a node's peers know its node list, and roughly its numbers. A digest
//! goes relative to the receiver's own last one (its *directory*: the ids
//! in order, named by a hash): per directory node one byte that says how
//! its numbers follow (0: not in this digest), then whatever the directory
//! lacks in chitchat's own encoding. A heartbeat goes whole (a varint) or
//! as its low 16 bits, which the receiver reads against the largest
//! heartbeat of that node in its own digests, and a GC version the
//! receiver's digests already say is not sent: heartbeats grow by one per round, so
//! after hours of uptime a whole one takes 3-4 bytes. The sender uses the
//! short forms only where what the peer last said bounds the receiver's
//! reading (fresh enough, close enough), and a check over every number
//! makes a reading that went wrong anyway undecodable, never wrong. The
//! receiver rebuilds chitchat's message: the same digest (its entries in
//! the directory's order, then the others; chitchat reads them into a
//! map). Each node remembers the
//! directories of the digests it sent and received lately, the largest
//! numbers of its own digests per node, and what each peer last said
//! ([`Directories`]).
//!
//! Pure functions over chitchat's wire format (0.11: `magic u16 | version
//! u8 | type u8 | digest | rest`, a digest being `count u16 | (id, heartbeat
//! u64, gc u64, max u64) x count`, an id `len u16 | name | generation u64 |
//! ip tag (4 or 6) | ip | port u16`, little-endian). Anything that does not
//! parse is sent and read as chitchat made it.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_common::hash::mix64;

/// Bytes before the digest: magic, version, message type.
const HEAD: usize = 4;
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
/// Directories remembered (membership changes in flight at once).
const DIRECTORIES: usize = 64;
/// Peers whose last directory is remembered.
const PEERS: usize = 4096;

/// One digest entry: its id's bytes and the three numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry<'a> {
    id: &'a [u8],
    numbers: [u64; 3],
}

/// Where a message's digest starts (its count), its entries and where it
/// ends.
type Digest<'a> = (usize, Vec<Entry<'a>>, usize);

/// The digest of a serialized SYN or SYN-ACK.
fn digest_of(body: &[u8]) -> Option<Digest<'_>> {
    if body.len() < HEAD + 2 || !matches!(body[3], SYN | SYN_ACK) {
        return None;
    }
    let count = u16::from_le_bytes([body[HEAD], body[HEAD + 1]]) as usize;
    let mut at = HEAD + 2;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (e, next) = entry_at(body, at)?;
        entries.push(e);
        at = next;
    }
    Some((HEAD, entries, at))
}

/// The entry at `at` and the offset after it.
fn entry_at(b: &[u8], at: usize) -> Option<(Entry<'_>, usize)> {
    let len = u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize;
    // name, generation (8), ip tag
    let tag_at = at + 2 + len + 8;
    let ip_len = match *b.get(tag_at)? {
        4 => 4,
        6 => 16,
        _ => return None,
    };
    let id_end = tag_at + 1 + ip_len + 2;
    let id = b.get(at..id_end)?;
    let mut numbers = [0u64; 3];
    for (i, n) in numbers.iter_mut().enumerate() {
        let o = id_end + 8 * i;
        *n = u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?);
    }
    Some((Entry { id, numbers }, id_end + 24))
}

/// The ids of a digest, in its order: a directory's content.
#[derive(Debug)]
pub struct Directory {
    hash: u64,
    ids: Vec<Box<[u8]>>,
    index: FastMap<Box<[u8]>, usize>,
}

/// A stable hash of bytes, 8 at a time (a message's worth of ids or
/// numbers is hashed per message: byte-wise FNV cost 5 us there).
fn words(b: &[u8]) -> u64 {
    let mut h = b.len() as u64;
    let mut it = b.chunks_exact(8);
    for c in &mut it {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    let mut last = [0u8; 8];
    last[..it.remainder().len()].copy_from_slice(it.remainder());
    mix64(h ^ u64::from_le_bytes(last) ^ 0xa5)
}

/// The maps' hasher: [`words`] (std's SipHash was a third of the cost).
#[derive(Default)]
struct Fast(u64);

impl Hasher for Fast {
    fn write(&mut self, b: &[u8]) {
        self.0 = mix64(self.0 ^ words(b));
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fast>>;

/// A digest's entries in its directory's order (by id hash, then bytes)
/// and the directory's hash. Not the digest's order: a digest rebuilt from
/// a compact one lists the nodes a directory lacked last, and both ends
/// must name the same set alike. The last few orders are kept: a cluster
/// at rest sends the same ids in the same order every time (chitchat's,
/// and a rebuilt digest's).
#[derive(Debug, Default)]
struct Orders {
    /// (hash of the ids in the digest's order, directory hash, positions),
    /// most recent first.
    last: VecDeque<(u64, u64, Vec<u32>)>,
}

const ORDERS: usize = 4;

impl Orders {
    fn of<'a>(&mut self, entries: &[Entry<'a>]) -> (u64, Vec<Entry<'a>>) {
        let keys: Vec<u64> = entries.iter().map(|e| words(e.id)).collect();
        let raw = keys.iter().fold(entries.len() as u64, |h, k| mix64(h ^ k));
        let sorted = |perm: &[u32]| perm.iter().map(|&i| entries[i as usize]).collect();
        if let Some((_, dir, perm)) = self
            .last
            .iter()
            .find(|(r, _, p)| *r == raw && p.len() == entries.len())
        {
            return (*dir, sorted(perm));
        }
        let mut perm: Vec<u32> = (0..entries.len() as u32).collect();
        perm.sort_unstable_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            keys[a]
                .cmp(&keys[b])
                .then_with(|| entries[a].id.cmp(entries[b].id))
        });
        let dir = perm.iter().fold(0x6469_7265_6374_6f72_u64, |h, &i| {
            mix64(h ^ keys[i as usize])
        });
        let out = sorted(&perm);
        self.last.push_front((raw, dir, perm));
        self.last.truncate(ORDERS);
        (dir, out)
    }
}

impl Directory {
    fn new(hash: u64, entries: &[Entry<'_>]) -> Self {
        let ids: Vec<Box<[u8]>> = entries.iter().map(|e| e.id.into()).collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Directory { hash, ids, index }
    }
}

/// What a peer's last digest said: its directory, each of its nodes'
/// numbers in that order (`u32::MAX`: too large to keep), and when it came.
#[derive(Debug)]
struct PeerView {
    dir: u64,
    numbers: Vec<[u32; 3]>,
    /// [`ref_check`] of `numbers`: what an exact digest names it by.
    check: u32,
    at: Instant,
}

/// Recent directories by hash, the last digest each peer sent, and the
/// largest numbers of this node's own digests for each node.
#[derive(Debug, Default)]
pub struct Directories {
    recent: VecDeque<Directory>,
    peers: HashMap<SocketAddr, PeerView>,
    orders: Orders,
    /// Per node id, the largest heartbeat, GC version and max version of
    /// the digests this node sent (its own view, which peers see): what a
    /// heartbeat's low bits and an "unchanged" version are read against.
    /// Not what peers said: a peer ahead of this node's view would move
    /// the reference away from what the sender saw of it.
    seen: FastMap<Box<[u8]>, [u64; 3]>,
    /// Per peer, the last digests this node sent it ([`SAID`]): what an
    /// exact digest from it is relative to.
    said: HashMap<SocketAddr, VecDeque<Said>>,
}

/// A digest this node sent a peer: its directory, its numbers in that
/// order (as the peer's [`PeerView`] keeps them) and their check.
#[derive(Debug)]
struct Said {
    dir: u64,
    check: u32,
    numbers: Vec<[u32; 3]>,
}

/// Digests remembered per peer: the last few, in case the peer answers an
/// earlier one while the later ones are on their way (in a small cluster
/// two nodes exchange a SYN and a SYN-ACK each way every round).
const SAID: usize = 4;

/// A digest entry's numbers as references keep them (`u32::MAX`: too large).
fn narrow(n: [u64; 3]) -> [u32; 3] {
    n.map(|x| u32::try_from(x).unwrap_or(u32::MAX))
}

/// Node ids whose numbers are remembered (generations come and go).
const SEEN: usize = 16_384;

impl Directories {
    /// Remembers the directory and the numbers of the digest in `body` (a
    /// SYN or SYN-ACK this node sent); its hash.
    pub fn note(&mut self, body: &[u8]) -> Option<u64> {
        let (_, entries, _) = digest_of(body)?;
        Some(self.note_entries(&entries).0)
    }

    /// A message this node sends to `peer` at `now`: its digest noted (peers
    /// may answer relative to its directory), and the message relative to
    /// what `peer` last said when `compact` (the peer reads it), it knows
    /// enough and it is smaller so. One parse for both.
    pub fn outgoing(
        &mut self,
        peer: SocketAddr,
        body: &[u8],
        now: Instant,
        reads: Reads,
    ) -> Option<(Vec<u8>, bool)> {
        let digest = digest_of(body)?;
        let (dir, numbers) = self.note_entries(&digest.1);
        if self.said.len() >= PEERS && !self.said.contains_key(&peer) {
            self.said.clear();
        }
        let said = self.said.entry(peer).or_default();
        said.push_front(Said {
            dir,
            check: ref_check(&numbers),
            numbers,
        });
        said.truncate(SAID);
        if reads == Reads::Chitchat {
            return None;
        }
        self.relative(peer, body, &digest, now, reads)
    }

    /// Notes a digest this node sends: its directory, and its numbers
    /// into `seen`. Its directory's hash and its numbers in that order.
    fn note_entries(&mut self, entries: &[Entry<'_>]) -> (u64, Vec<[u32; 3]>) {
        let (hash, entries) = self.orders.of(entries);
        self.note_directory(hash, &entries);
        for e in &entries {
            match self.seen.get_mut(e.id) {
                Some(n) => {
                    for (have, new) in n.iter_mut().zip(e.numbers) {
                        *have = (*have).max(new);
                    }
                }
                None => {
                    if self.seen.len() >= SEEN {
                        self.seen.clear();
                    }
                    self.seen.insert(e.id.into(), e.numbers);
                }
            }
        }
        (hash, entries.iter().map(|e| narrow(e.numbers)).collect())
    }

    fn note_directory(&mut self, hash: u64, entries: &[Entry<'_>]) {
        // Most recent first; built only when new (the common case, a
        // cluster at rest, builds nothing).
        match self.recent.iter().position(|r| r.hash == hash) {
            Some(0) => {}
            Some(i) => {
                if let Some(r) = self.recent.remove(i) {
                    self.recent.push_front(r);
                }
            }
            None => {
                self.recent.push_front(Directory::new(hash, entries));
                self.recent.truncate(DIRECTORIES);
            }
        }
    }

    /// Remembers a digest `peer` sent (received at `now`).
    pub fn note_from(&mut self, peer: SocketAddr, body: &[u8], now: Instant) {
        let Some((_, entries, _)) = digest_of(body) else {
            return;
        };
        let (dir, entries) = self.orders.of(&entries);
        self.note_directory(dir, &entries);
        if self.peers.len() >= PEERS && !self.peers.contains_key(&peer) {
            self.peers.clear();
        }
        let numbers: Vec<[u32; 3]> = entries.iter().map(|e| narrow(e.numbers)).collect();
        self.peers.insert(
            peer,
            PeerView {
                dir,
                check: ref_check(&numbers),
                numbers,
                at: now,
            },
        );
    }

    fn get(&self, hash: u64) -> Option<&Directory> {
        self.recent.iter().find(|d| d.hash == hash)
    }

    /// `body` (a serialized message) relative to what `peer` last said, at
    /// `now`, when it knows enough and it is smaller so.
    pub fn compact_for(
        &self,
        peer: SocketAddr,
        body: &[u8],
        now: Instant,
        reads: Reads,
    ) -> Option<(Vec<u8>, bool)> {
        self.relative(peer, body, &digest_of(body)?, now, reads)
    }

    fn relative(
        &self,
        peer: SocketAddr,
        body: &[u8],
        digest: &Digest<'_>,
        now: Instant,
        reads: Reads,
    ) -> Option<(Vec<u8>, bool)> {
        let v = self.peers.get(&peer)?;
        let d = self.get(v.dir)?;
        compact(
            body,
            digest,
            d,
            v,
            now.saturating_duration_since(v.at),
            reads,
        )
        .filter(|(c, _)| c.len() < body.len())
    }

    /// A compact message back in chitchat's bytes (`None`: not one, a
    /// directory or a node this node does not know, numbers that do not
    /// check out, or more than `max` bytes).
    /// After a compact message from `peer` was refused: forget what it
    /// said, so this node's next message to it goes whole. Otherwise two
    /// nodes whose views of each other went stale (each refusing the
    /// other's exact digests, so neither view moves) would stay so.
    pub fn refused_from(&mut self, peer: SocketAddr) {
        self.peers.remove(&peer);
    }

    /// `exact`: relative to a digest this node sent `from` (the
    /// transport's flag says so).
    pub fn expand(&self, c: &[u8], max: usize, from: SocketAddr, exact: bool) -> Option<Vec<u8>> {
        let hash = u64::from_le_bytes(c.get(HEAD..HEAD + 8)?.try_into().ok()?);
        let said = if exact {
            let check = u32::from_le_bytes(c.get(HEAD + 12..HEAD + 16)?.try_into().ok()?);
            let s = self
                .said
                .get(&from)?
                .iter()
                .find(|s| s.dir == hash && s.check == check)?;
            Some(s.numbers.as_slice())
        } else {
            None
        };
        expand(c, self.get(hash)?, &self.seen, said, max)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= ((byte & 0x7f) as u64).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// An entry's first byte: how its numbers follow. 0: not in this digest.
/// The low two bits: the heartbeat as a varint (1), its low 13 bits (2:
/// bits 8-12 in the first byte's top five, then one byte) or its low 16
/// bits (3), read against the largest heartbeat for the node in the
/// receiver's own digests. `SAME_GC`: the GC version is the receiver's own
/// largest, else a varint follows. Then the max version, a varint.
///
/// Measured with 200 nodes under churn on a saturated machine: 8 low bits
/// (and a max version "the same as yours") were refused for 1 compact
/// digest in 8. A receiver's view of a node can lag by tens of seconds and
/// then jump, further than elapsed time says; 13 bits leave half an hour
/// (the sender takes them only within 1,024 rounds of what the peer said),
/// 16 bits hours.
const HB_VARINT: u8 = 1;
const HB_LOW13: u8 = 2;
const HB_LOW16: u8 = 3;
const SAME_GC: u8 = 4;
/// Where a 13-bit heartbeat's bits 8-12 sit in the first byte.
const LOW13_SHIFT: u8 = 3;
/// How far from what the peer said a heartbeat may be for 13 bits.
const LOW13_NEAR: u64 = 1024;

/// The compact forms a peer reads (what it publishes under
/// `gossip::COMPACT_KEY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reads {
    /// Only chitchat's own messages.
    Chitchat,
    /// Compact digests with whole and 16-bit heartbeats (the first release
    /// of them: "compact").
    Compact,
    /// And 13-bit heartbeats ("compact2").
    Compact13,
    /// And digests relative to exactly what it said ("compact3", see
    /// [`exact`]).
    Exact,
}

/// Exact references. A digest a node sends goes relative to the numbers
/// of the peer's own last digest to it, which the peer remembers for each
/// node it sent one to ([`Directories`]'s `said`) and finds by their check.
/// Then an unchanged GC or max version costs nothing, and a heartbeat only
/// the difference: 0-3 rounds in an answer, the rounds since the peer last
/// spoke in a SYN, nearly the same for every node, so the bytes compress.
/// After the reference's check, the difference most heartbeats share (a
/// zigzag varint: the rounds since the peer spoke). Per entry a first byte:
/// [`exact::PRESENT`], the heartbeat's form (bits 1-2: its difference from
/// the shared one in bits 5-7, zigzag; a zigzag varint follows; the whole
/// heartbeat follows), [`exact::SAME_GC`], [`exact::SAME_MAX`]; then what
/// it says follows, in that order.
mod exact {
    pub const PRESENT: u8 = 1;
    pub const HB_SHIFT: u8 = 1;
    pub const HB_SMALL: u8 = 0;
    pub const HB_DELTA: u8 = 1;
    pub const HB_WHOLE: u8 = 2;
    pub const SAME_GC: u8 = 8;
    pub const SAME_MAX: u8 = 16;
    pub const SMALL_SHIFT: u8 = 5;
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// The check that names a set of reference numbers (as [`PeerView`] keeps
/// them).
fn ref_check(numbers: &[[u32; 3]]) -> u32 {
    numbers
        .iter()
        .flatten()
        .fold(numbers.len() as u64, |h, &x| mix64(h ^ x as u64)) as u32
}

/// The heartbeat difference most entries share: the rounds since the
/// peer spoke (the median of the differences to what it said). Sent once;
/// each entry then says how far it is from it, mostly a few rounds.
fn common_difference(values: &[Option<[u64; 3]>], said: &[[u32; 3]]) -> i64 {
    let mut d: Vec<i64> = values
        .iter()
        .zip(said)
        .filter_map(|(n, r)| {
            let (hb, rh) = ((*n)?[0], r[0]);
            (rh != u32::MAX && hb.abs_diff(rh as u64) < 1 << 40).then(|| hb as i64 - rh as i64)
        })
        .collect();
    if d.is_empty() {
        return 0;
    }
    let mid = d.len() / 2;
    *d.select_nth_unstable(mid).1
}

/// One entry relative to `r` (what the peer said of that node), its
/// heartbeat relative to `r`'s plus `base`.
fn put_exact(out: &mut Vec<u8>, [hb, gc, max]: [u64; 3], r: [u32; 3], base: i64) {
    use exact::*;
    let known = |x: u32| (x != u32::MAX).then_some(x as u64);
    let mut tag = PRESENT;
    let mut tail = Vec::new();
    match known(r[0]).filter(|rh| hb.abs_diff(*rh) < 1 << 40) {
        Some(rh) => {
            let z = zigzag(hb as i64 - rh as i64 - base);
            if z < 8 {
                tag |= HB_SMALL << HB_SHIFT | (z as u8) << SMALL_SHIFT;
            } else {
                tag |= HB_DELTA << HB_SHIFT;
                put_varint(&mut tail, z);
            }
        }
        None => {
            tag |= HB_WHOLE << HB_SHIFT;
            put_varint(&mut tail, hb);
        }
    }
    if known(r[1]) == Some(gc) {
        tag |= SAME_GC;
    } else {
        put_varint(&mut tail, gc);
    }
    if known(r[2]) == Some(max) {
        tag |= SAME_MAX;
    } else {
        put_varint(&mut tail, max);
    }
    out.push(tag);
    out.extend_from_slice(&tail);
}

/// One entry of an exact digest whose first byte was `tag`, relative to
/// `r`; `at` moves past it.
fn read_exact(c: &[u8], at: &mut usize, tag: u8, r: [u32; 3], base: i64) -> Option<[u64; 3]> {
    use exact::*;
    let known = |x: u32| (x != u32::MAX).then_some(x as u64);
    let form = (tag >> HB_SHIFT) & 3;
    if tag & PRESENT == 0 || (form != HB_SMALL && tag >> SMALL_SHIFT != 0) {
        return None;
    }
    let plus = |z: u64| known(r[0])?.checked_add_signed(unzigzag(z).checked_add(base)?);
    let hb = match form {
        HB_SMALL => plus((tag >> SMALL_SHIFT) as u64)?,
        HB_DELTA => plus(varint(c, at)?)?,
        HB_WHOLE => varint(c, at)?,
        _ => return None,
    };
    let gc = if tag & SAME_GC != 0 {
        known(r[1])?
    } else {
        varint(c, at)?
    };
    let max = if tag & SAME_MAX != 0 {
        known(r[2])?
    } else {
        varint(c, at)?
    };
    Some([hb, gc, max])
}

/// Within this the peer's digest bounds the receiver's reading: its own
/// heartbeats for a node cannot have run 16,384 rounds past what it said
/// (16 bits read right within 32,768), nor its GC version moved (GC runs
/// an hour after a deletion).
const FRESH: Duration = Duration::from_secs(600);

/// The value with `low` as its low `bits` bits nearest to `reference`
/// (as QUIC reads packet numbers).
fn nearest(low: u64, bits: u32, reference: u64) -> u64 {
    let win = 1u64 << bits;
    let half = win / 2;
    let c = (reference & !(win - 1)) | low;
    if c.saturating_add(half) <= reference && c <= u64::MAX - win {
        c + win
    } else if c > reference.saturating_add(half) && c >= win {
        c - win
    } else {
        c
    }
}

/// The check over every number a compact digest stands for, in directory
/// order: a reading against a reference that moved fails it.
fn check(numbers: &[[u64; 3]]) -> u32 {
    numbers
        .iter()
        .flatten()
        .fold(numbers.len() as u64, |h, &x| mix64(h ^ x)) as u32
}

/// `head | directory hash u64 | check u32 | (exact: the reference's check
/// u32) | per directory node: a first byte and what it says follows | extra
/// count (varint) | extra entries as chitchat encodes them | the rest of
/// the message`; and whether it is exact (relative to what the peer said,
/// [`exact`]), which the transport flags.
fn compact(
    body: &[u8],
    (start, entries, end): &Digest<'_>,
    d: &Directory,
    v: &PeerView,
    age: Duration,
    reads: Reads,
) -> Option<(Vec<u8>, bool)> {
    let (start, end) = (*start, *end);
    let mut values: Vec<Option<[u64; 3]>> = vec![None; d.ids.len()];
    let mut extras: Vec<&[u8]> = Vec::new();
    let mut at = start + 2;
    for e in entries {
        let len = e.id.len() + 24;
        match d.index.get(e.id) {
            Some(&i) => values[i] = Some(e.numbers),
            None => extras.push(body.get(at..at + len)?),
        }
        at += len;
    }
    let mut out = Vec::with_capacity(body.len() / 4);
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&d.hash.to_le_bytes());
    let present: Vec<[u64; 3]> = values.iter().flatten().copied().collect();
    out.extend_from_slice(&check(&present).to_le_bytes());
    let exact = reads == Reads::Exact && age < FRESH;
    let base = if exact {
        common_difference(&values, &v.numbers)
    } else {
        0
    };
    if exact {
        out.extend_from_slice(&v.check.to_le_bytes());
        put_varint(&mut out, zigzag(base));
    }
    for (i, n) in values.iter().enumerate() {
        if exact {
            match *n {
                Some(n) => {
                    let r = v.numbers.get(i).copied().unwrap_or([u32::MAX; 3]);
                    put_exact(&mut out, n, r, base)
                }
                None => out.push(0),
            }
            continue;
        }
        let Some([hb, gc, max]) = *n else {
            out.push(0);
            continue;
        };
        let theirs = v.numbers.get(i).copied().unwrap_or([u32::MAX; 3]);
        let known = |x: u32| (x != u32::MAX).then_some(x as u64);
        let (mut tag, mut hb_bytes) = (HB_VARINT, Vec::new());
        put_varint(&mut hb_bytes, hb);
        let near = |within: u64| known(theirs[0]).is_some_and(|r| hb.abs_diff(r) < within);
        if age < FRESH && hb_bytes.len() > 1 && reads >= Reads::Compact13 && near(LOW13_NEAR) {
            let high = ((hb >> 8) & 0x1f) as u8;
            (tag, hb_bytes) = (HB_LOW13 | high << LOW13_SHIFT, vec![hb as u8]);
        } else if age < FRESH && hb_bytes.len() > 2 && near(16_384) {
            (tag, hb_bytes) = (HB_LOW16, (hb as u16).to_le_bytes().to_vec());
        }
        if age < FRESH && known(theirs[1]) == Some(gc) {
            tag |= SAME_GC;
        }
        out.push(tag);
        out.extend_from_slice(&hb_bytes);
        if tag & SAME_GC == 0 {
            put_varint(&mut out, gc);
        }
        put_varint(&mut out, max);
    }
    put_varint(&mut out, extras.len() as u64);
    for x in extras {
        out.extend_from_slice(x);
    }
    out.extend_from_slice(&body[end..]);
    Some((out, exact))
}

fn expand(
    c: &[u8],
    d: &Directory,
    seen: &FastMap<Box<[u8]>, [u64; 3]>,
    said: Option<&[[u32; 3]]>,
    max: usize,
) -> Option<Vec<u8>> {
    if c.len() < HEAD + 12 || !matches!(c[3], SYN | SYN_ACK) {
        return None;
    }
    let want = u32::from_le_bytes(c.get(HEAD + 8..HEAD + 12)?.try_into().ok()?);
    let mut at = HEAD + 12;
    let base = match said {
        Some(_) => {
            at += 4;
            unzigzag(varint(c, &mut at)?)
        }
        None => 0,
    };
    let mut entries: Vec<u8> = Vec::new();
    let mut present: Vec<[u64; 3]> = Vec::new();
    for (i, id) in d.ids.iter().enumerate() {
        let tag = *c.get(at)?;
        at += 1;
        if tag == 0 {
            continue;
        }
        if let Some(r) = said {
            let [hb, gc, mx] = read_exact(c, &mut at, tag, *r.get(i)?, base)?;
            entries.extend_from_slice(id);
            for n in [hb, gc, mx] {
                entries.extend_from_slice(&n.to_le_bytes());
            }
            present.push([hb, gc, mx]);
            continue;
        }
        if tag & 3 != HB_LOW13 && tag & !(3 | SAME_GC) != 0 {
            return None;
        }
        let reference = seen.get(id);
        let hb = match tag & 3 {
            HB_VARINT => varint(c, &mut at)?,
            HB_LOW13 => {
                let low = (((tag >> LOW13_SHIFT) as u64) << 8) | *c.get(at)? as u64;
                at += 1;
                nearest(low, 13, reference?[0])
            }
            HB_LOW16 => {
                let low = u16::from_le_bytes(c.get(at..at + 2)?.try_into().ok()?) as u64;
                at += 2;
                nearest(low, 16, reference?[0])
            }
            _ => return None,
        };
        let gc = if tag & SAME_GC != 0 {
            reference?[1]
        } else {
            varint(c, &mut at)?
        };
        let mx = varint(c, &mut at)?;
        entries.extend_from_slice(id);
        for n in [hb, gc, mx] {
            entries.extend_from_slice(&n.to_le_bytes());
        }
        present.push([hb, gc, mx]);
    }
    if check(&present) != want {
        return None;
    }
    let mut count = present.len();
    let extras = varint(c, &mut at)?;
    for _ in 0..extras {
        let (_, next) = entry_at(c, at)?;
        entries.extend_from_slice(c.get(at..next)?);
        at = next;
        count += 1;
    }
    let count = u16::try_from(count).ok()?;
    let rest = c.get(at..)?;
    if HEAD + 2 + entries.len() + rest.len() > max {
        return None;
    }
    let mut out = Vec::with_capacity(HEAD + 2 + entries.len() + rest.len());
    out.extend_from_slice(&c[..HEAD]);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&entries);
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
pub(crate) fn message(kind: u8, nodes: &[(&str, u64, u8, u64)], rest: &[u8]) -> Vec<u8> {
    let mut b = vec![0x53, 0xb0, 0, kind];
    b.extend_from_slice(&(nodes.len() as u16).to_le_bytes());
    for (name, generation, octet, hb) in nodes {
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&generation.to_le_bytes());
        b.extend_from_slice(&[4, 192, 168, 91, *octet]);
        b.extend_from_slice(&7946u16.to_le_bytes());
        // Max versions count a node's key updates: small, and the same
        // in every view.
        for n in [*hb, 0, 10 + *octet as u64] {
            b.extend_from_slice(&n.to_le_bytes());
        }
    }
    b.extend_from_slice(rest);
    b
}

/// `n` nodes named `node-000`..., heartbeats from `hb`.
#[cfg(test)]
pub(crate) fn cluster(n: usize, hb: u64) -> Vec<(String, u64, u8, u64)> {
    (0..n)
        .map(|i| {
            (
                format!("node-{i:03}"),
                1_796_000_000_000 + i as u64 * 7_919,
                (i % 250) as u8 + 1,
                hb + i as u64 * 3,
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) fn refs(v: &[(String, u64, u8, u64)]) -> Vec<(&str, u64, u8, u64)> {
    v.iter()
        .map(|(a, b, c, d)| (a.as_str(), *b, *c, *d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 91, 2)),
        7946,
    );
    /// The other end: what the peer knows this node as.
    const ME: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 91, 1)),
        7946,
    );

    /// A digest's entries as a set.
    type Set = Vec<(Vec<u8>, [u64; 3])>;

    /// A message as chitchat reads it: its head, its digest's entries as a
    /// set, and the rest.
    fn meaning(b: &[u8]) -> (Vec<u8>, Set, Vec<u8>) {
        let (start, entries, end) = digest_of(b).expect("a digest");
        let mut set: Vec<_> = entries.iter().map(|e| (e.id.to_vec(), e.numbers)).collect();
        set.sort();
        (b[..start].to_vec(), set, b[end..].to_vec())
    }

    fn same(read: Option<Vec<u8>>, body: &[u8]) -> bool {
        read.is_some_and(|r| r.len() == body.len() && meaning(&r) == meaning(body))
    }

    /// `n` nodes whose heartbeats spread over `up` rounds of uptime (a
    /// fixed pseudo-random spread: nodes started at different times), plus
    /// `plus`.
    fn spread(n: usize, up: u64, plus: u64) -> Vec<(String, u64, u8, u64)> {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        cluster(n, 0)
            .into_iter()
            .map(|(a, b, c, _)| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (a, b, c, (x >> 33) % up + plus)
            })
            .collect()
    }

    /// Node B sent `theirs` to A (noting it); A heard it `age` ago and
    /// answers with `ours` in the forms B `reads`: what A sends, whether it
    /// is exact, and B's reading of it.
    fn exchange(
        theirs: &[(String, u64, u8, u64)],
        ours: &[(String, u64, u8, u64)],
        age: Duration,
        reads: Reads,
    ) -> (Vec<u8>, Vec<u8>, bool, Option<Vec<u8>>) {
        let (mut a, mut b) = (Directories::default(), Directories::default());
        let sent = message(SYN, &refs(theirs), b"\x00\x07cluster");
        let t0 = Instant::now();
        b.outgoing(ME, &sent, t0, Reads::Chitchat);
        a.note_from(PEER, &sent, t0);
        let body = message(SYN_ACK, &refs(ours), b"the delta, untouched");
        let (c, exact) = a
            .compact_for(PEER, &body, t0 + age, reads)
            .expect("compact");
        let read = b.expand(&c, 1 << 20, ME, exact);
        (body, c, exact, read)
    }

    #[test]
    fn a_digest_goes_relative_to_the_peers_and_comes_back_the_same() {
        // The peer's view: 200 nodes. Ours: one fewer, one it does not know
        // yet, newer heartbeats; heard a moment ago, 30 s ago, an hour ago.
        let theirs = spread(200, 16_000, 1_000);
        let mut ours: Vec<_> = theirs
            .iter()
            .map(|(a, b, c, d)| (a.clone(), *b, *c, d + 7))
            .collect();
        ours.remove(17);
        ours.push(("node-new".into(), 42, 251, 1));
        for reads in [Reads::Compact, Reads::Compact13, Reads::Exact] {
            for age in [0, 30, 3600] {
                let (body, c, exact, read) =
                    exchange(&theirs, &ours, Duration::from_secs(age), reads);
                println!(
                    "digest of 200 nodes, the peer ({reads:?}) heard {age} s ago: {} bytes, compact {} (exact: {exact})",
                    body.len(),
                    c.len()
                );
                assert!(c.len() * 4 < body.len(), "{} -> {}", body.len(), c.len());
                assert!(same(read, &body), "heard {age} s ago");
                assert_eq!(exact, reads == Reads::Exact && age < 600);
                // A reader of the first compact forms never gets 13 bits.
                if reads == Reads::Compact {
                    assert!(tags(&c, 200).iter().all(|t| t & 3 != HB_LOW13));
                } else if reads == Reads::Compact13 && age < 600 {
                    assert!(tags(&c, 200).iter().any(|t| t & 3 == HB_LOW13));
                }
            }
        }
        // A node without that directory cannot read it, nor past the size
        // bound; an exact one needs what it said to the sender.
        for reads in [Reads::Compact13, Reads::Exact] {
            let (body, c, exact, _) = exchange(&theirs, &ours, Duration::ZERO, reads);
            assert_eq!(Directories::default().expand(&c, 1 << 20, ME, exact), None);
            let sent = message(SYN, &refs(&theirs), b"\x00\x07cluster");
            let mut b = Directories::default();
            b.note(&sent);
            assert_eq!(b.expand(&c, 1 << 20, ME, exact).is_some(), !exact);
            b.outgoing(ME, &sent, Instant::now(), Reads::Chitchat);
            assert_eq!(b.expand(&c, body.len() - 1, ME, exact), None);
            assert!(b.expand(&c, body.len(), ME, exact).is_some());
            // Not relative to what it said to another node.
            // The same address, another port: another node.
            let other = SocketAddr::new(ME.ip(), 7947);
            assert_eq!(b.expand(&c, 1 << 20, other, exact).is_some(), !exact);
        }
    }

    #[test]
    fn an_exact_digest_is_read_against_what_the_receiver_said_to_the_sender() {
        let said = |plus: u64| spread(100, 1_000_000, plus);
        let (mut a, mut b) = (Directories::default(), Directories::default());
        let t0 = Instant::now();
        // B tells A its view; A hears it.
        let first = message(SYN, &refs(&said(0)), b"");
        b.outgoing(ME, &first, t0, Reads::Exact);
        a.note_from(PEER, &first, t0);
        // A answers relative to it, heartbeats 2 rounds on, one node 300.
        let mut ours = said(2);
        ours[40].3 += 298;
        let body = message(SYN_ACK, &refs(&ours), b"");
        let (c, exact) = a
            .compact_for(PEER, &body, t0, Reads::Exact)
            .expect("compact");
        assert!(exact);
        let z = |b: &[u8]| zstd::bulk::compress(b, 1).map_or(0, |c| c.len());
        println!(
            "100 nodes, 2 rounds on: chitchat {} bytes ({} compressed), exact {} ({})",
            body.len(),
            z(&body),
            c.len(),
            z(&c)
        );
        assert!(same(b.expand(&c, 1 << 20, ME, true), &body));
        // Meanwhile B sent A a newer digest: the answer is read against
        // the one it answers.
        b.outgoing(ME, &message(SYN, &refs(&said(1)), b""), t0, Reads::Exact);
        assert!(same(b.expand(&c, 1 << 20, ME, true), &body));
        // SAID newer ones: that one is forgotten; refused, never read wrong.
        for plus in 10..10 + SAID as u64 - 1 {
            assert!(same(b.expand(&c, 1 << 20, ME, true), &body));
            b.outgoing(ME, &message(SYN, &refs(&said(plus)), b""), t0, Reads::Exact);
        }
        assert_eq!(b.expand(&c, 1 << 20, ME, true), None);
    }

    #[test]
    fn a_reading_against_a_reference_that_moved_is_refused_not_wrong() {
        let theirs = spread(50, 16_000, 100_000);
        // Node 9's heartbeat 2,000 rounds ahead of what B said: 16 bits,
        // the others 13.
        let ours: Vec<_> = theirs
            .iter()
            .enumerate()
            .map(|(i, (a, b, c, d))| (a.clone(), *b, *c, d + if i == 9 { 2_000 } else { 3 }))
            .collect();
        // Before A's digest arrives, B hears of node 9 (16 low bits) or 3
        // (13) far ahead, a long partition healing: read against that, the
        // low bits are wrong.
        for (node, ahead) in [(9, 40_000), (3, 5_000)] {
            let (mut a, mut b) = (Directories::default(), Directories::default());
            let sent = message(SYN, &refs(&theirs), b"\x00\x07cluster");
            b.note(&sent);
            let t0 = Instant::now();
            a.note_from(PEER, &sent, t0);
            let body = message(SYN_ACK, &refs(&ours), b"");
            let (c, _) = a
                .compact_for(PEER, &body, t0, Reads::Compact13)
                .expect("compact");
            // (The tags follow the directory's order, not this list's.)
            let t = tags(&c, 50);
            let count = |form| t.iter().filter(|x| *x & 3 == form).count();
            assert_eq!((count(HB_LOW16), count(HB_LOW13)), (1, 49));
            assert!(
                same(b.expand(&c, 1 << 20, ME, false), &body),
                "read right before"
            );
            let mut jump = theirs.clone();
            jump[node].3 += ahead;
            b.note(&message(SYN, &refs(&jump), b"\x00\x07cluster"));
            assert_eq!(
                b.expand(&c, 1 << 20, ME, false),
                None,
                "node {node}, {ahead} ahead"
            );
        }
    }

    /// The first bytes of a compact digest's `n` directory entries.
    fn tags(c: &[u8], n: usize) -> Vec<u8> {
        let mut at = HEAD + 12;
        let mut out = Vec::new();
        for _ in 0..n {
            let tag = c[at];
            out.push(tag);
            at += 1;
            if tag == 0 {
                continue;
            }
            match tag & 3 {
                HB_VARINT => {
                    varint(c, &mut at);
                }
                HB_LOW13 => at += 1,
                _ => at += 2,
            }
            if tag & SAME_GC == 0 {
                varint(c, &mut at);
            }
            varint(c, &mut at);
        }
        out
    }

    /// What uptime does to a digest of 200 nodes: heartbeats grow by one
    /// per gossip round (about 2.3 a second at the default dead-after), so
    /// whole they take 1 byte in a fresh cluster, 2-3 after 2 hours and 4
    /// after 10 days. Printed, compressed as sent, for a SYN-ACK (the peer
    /// heard a moment ago) and a SYN (30 s ago).
    #[test]
    fn digest_size_by_uptime() {
        let z = |b: &[u8]| zstd::bulk::compress(b, 1).map_or(0, |c| c.len());
        for (uptime, up) in [
            ("fresh", 60u64),
            ("2 hours", 16_000),
            ("10 days", 2_000_000),
        ] {
            // Ours: 30 rounds on (the peer spoke 13 s ago), each node's
            // heartbeat a few rounds either way (gossip reached us and the
            // peer at different times).
            let theirs = spread(200, up, 0);
            let ours: Vec<_> = theirs
                .iter()
                .enumerate()
                .map(|(i, (a, b, c, d))| (a.clone(), *b, *c, d + 28 + (i * 7 % 5) as u64))
                .collect();
            let mut line = String::new();
            for reads in [Reads::Compact, Reads::Compact13, Reads::Exact] {
                let (body, reply, _, read) = exchange(&theirs, &ours, Duration::ZERO, reads);
                assert!(same(read, &body));
                let (_, syn, _, read) = exchange(&theirs, &ours, Duration::from_secs(30), reads);
                assert!(same(read, &body));
                if line.is_empty() {
                    line = format!("chitchat {} bytes ({} compressed)", body.len(), z(&body));
                }
                line += &format!(
                    "; {reads:?}: as a reply {} ({}), 30 s later {} ({})",
                    reply.len(),
                    z(&reply),
                    syn.len(),
                    z(&syn)
                );
            }
            println!("digest of 200 nodes, {uptime}: {line}");
        }
    }

    #[test]
    fn anything_else_stays_as_chitchat_made_it() {
        let mut a = Directories::default();
        let now = Instant::now();
        // No directory from that peer yet.
        let body = message(SYN, &refs(&cluster(5, 1)), b"");
        assert_eq!(a.compact_for(PEER, &body, now, Reads::Exact), None);
        a.note_from(PEER, &body, now);
        // An ACK has no digest; a truncated message does not parse.
        let ack = [0x53, 0xb0, 0, 2, 0, 0];
        assert_eq!(a.compact_for(PEER, &ack, now, Reads::Exact), None);
        assert_eq!(
            a.compact_for(PEER, &body[..body.len() - 3], now, Reads::Exact),
            None
        );
        assert_eq!(a.note(&body[..20]), None);
    }

    #[test]
    fn garbage_never_expands_or_panics() {
        let mut d = Directories::default();
        let body = message(SYN, &refs(&cluster(3, 9)), b"x");
        let h = d.note(&body).expect("hash");
        let mut c = vec![0x53, 0xb0, 0, SYN];
        c.extend_from_slice(&h.to_le_bytes());
        for tail in [
            &[][..],
            &[0xff; 12][..],
            &[1, 2, 3, 4, 0x1f, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 2, 9, 0, 0][..],
            &[0, 0, 0, 0, 0, 0, 0, 9, 0xff, 0xff][..],
        ] {
            let mut x = c.clone();
            x.extend_from_slice(tail);
            assert_eq!(d.expand(&x, 1 << 16, ME, false), None, "{tail:?}");
            assert_eq!(d.expand(&x, 1 << 16, ME, true), None, "{tail:?}");
        }
        // Every node absent, no extras: an empty digest.
        let mut empty = c.clone();
        empty.extend_from_slice(&check(&[]).to_le_bytes());
        empty.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            d.expand(&empty, 1 << 16, ME, false),
            Some(vec![0x53, 0xb0, 0, SYN, 0, 0])
        );
        // Exact: with the reference this node said, whatever follows.
        d.outgoing(ME, &body, Instant::now(), Reads::Chitchat);
        let said: Vec<[u32; 3]> = cluster(3, 9)
            .iter()
            .map(|(_, _, _, hb)| [*hb as u32, 0, 0])
            .collect();
        let r = d.said.get(&ME).and_then(|s| s.front()).map(|s| s.check);
        assert_eq!(r.map(|_| said.len()), Some(3));
        let mut x = c.clone();
        x.extend_from_slice(&[0; 4]);
        x.extend_from_slice(&r.unwrap_or(0).to_le_bytes());
        for tail in [
            &[][..],
            &[0xff; 12][..],
            &[1, 1, 1, 0x1f, 0xff, 0xff, 0xff][..],
            &[0x21, 0x41, 0xe5, 0][..],
            &[
                0x03, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
            ][..],
            &[0x19, 0x19, 0x19, 0][..],
        ] {
            let mut y = x.clone();
            y.extend_from_slice(tail);
            assert_eq!(d.expand(&y, 1 << 16, ME, true), None, "{tail:?}");
        }
    }

    #[test]
    fn low_bits_are_read_nearest_to_the_reference() {
        assert_eq!(nearest(0x10, 8, 0x1fe), 0x210);
        assert_eq!(nearest(0xf0, 8, 0x205), 0x1f0);
        assert_eq!(nearest(5, 8, 3), 5);
        assert_eq!(nearest(250, 8, 3), 250);
        assert_eq!(nearest(0xfffe, 16, 0x1_0003), 0xfffe);
        assert_eq!(nearest(7, 16, u64::MAX - 3), u64::MAX - 0xffff + 7);
    }
}

//! Compact digests. chitchat's SYN and SYN-ACK carry a digest that names
//! every node (its id, generation and gossip address) with three numbers
//! (heartbeat, last GC version, max version: 8 bytes each) in every round,
//! so idle gossip grows with the number of nodes, and compression cannot
//! take much from the names: they differ within one message.
//!
//! But a node's peers know its node list. A digest can go relative to the
//! receiver's own last one (its *directory*, named by a hash): for each of
//! the directory's nodes only the three numbers (varints, the heartbeat
//! plus one; 0: not in this digest), then whatever the directory lacks in
//! chitchat's own encoding. The receiver rebuilds chitchat's message: the
//! same digest (its entries in the directory's order, then the others).
//! Each node remembers the directories of the digests it sent and received
//! lately ([`Directories`]), and the last one each peer sent it.
//!
//! Pure functions over chitchat's wire format (0.11: `magic u16 | version
//! u8 | type u8 | digest | rest`, a digest being `count u16 | (id, heartbeat
//! u64, gc u64, max u64) x count`, an id `len u16 | name | generation u64 |
//! ip tag (4 or 6) | ip | port u16`, little-endian). Anything that does not
//! parse is sent and read as chitchat made it.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

/// Bytes before the digest: magic, version, message type.
const HEAD: usize = 4;
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
/// Directories remembered (membership changes in flight at once).
const DIRECTORIES: usize = 16;
/// Peers whose last directory is remembered.
const PEERS: usize = 4096;

/// One digest entry: its id's bytes and the three numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry<'a> {
    id: &'a [u8],
    numbers: [u64; 3],
}

/// The digest of a serialized SYN or SYN-ACK: where it starts (its count),
/// its entries and where it ends.
fn digest_of(body: &[u8]) -> Option<(usize, Vec<Entry<'_>>, usize)> {
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
    index: HashMap<Box<[u8]>, usize>,
}

/// The hash that names the directory of `entries`.
fn directory_hash(entries: &[Entry<'_>]) -> u64 {
    let mut bytes = Vec::with_capacity(entries.iter().map(|e| e.id.len()).sum());
    for e in entries {
        // Each id starts with its length: the concatenation is unambiguous.
        bytes.extend_from_slice(e.id);
    }
    mesh_common::hash::name(&bytes)
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

    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// Recent directories by hash, and the last one each peer sent.
#[derive(Debug, Default)]
pub struct Directories {
    recent: VecDeque<Directory>,
    peers: HashMap<IpAddr, u64>,
}

impl Directories {
    /// Remembers the directory of the digest in `body` (a SYN or SYN-ACK
    /// this node sent or received); its hash.
    pub fn note(&mut self, body: &[u8]) -> Option<u64> {
        let (_, entries, _) = digest_of(body)?;
        let hash = directory_hash(&entries);
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
                self.recent.push_front(Directory::new(hash, &entries));
                self.recent.truncate(DIRECTORIES);
            }
        }
        Some(hash)
    }

    /// Remembers the directory of a digest `peer` sent.
    pub fn note_from(&mut self, peer: IpAddr, body: &[u8]) {
        if let Some(h) = self.note(body) {
            if self.peers.len() >= PEERS && !self.peers.contains_key(&peer) {
                self.peers.clear();
            }
            self.peers.insert(peer, h);
        }
    }

    fn get(&self, hash: u64) -> Option<&Directory> {
        self.recent.iter().find(|d| d.hash == hash)
    }

    /// `body` (a serialized message) relative to `peer`'s last directory,
    /// when there is one and it is smaller so.
    pub fn compact_for(&self, peer: IpAddr, body: &[u8]) -> Option<Vec<u8>> {
        let d = self.get(*self.peers.get(&peer)?)?;
        compact(body, d).filter(|c| c.len() < body.len())
    }

    /// A compact message back in chitchat's bytes (`None`: not one, or a
    /// directory this node does not know), at most `max` bytes.
    pub fn expand(&self, c: &[u8], max: usize) -> Option<Vec<u8>> {
        let hash = u64::from_le_bytes(c.get(HEAD..HEAD + 8)?.try_into().ok()?);
        expand(c, self.get(hash)?, max)
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

/// `head | hash u64 | per directory entry: heartbeat+1, gc, max (varints;
/// 0 alone: absent) | extra count (varint) | extra entries as chitchat
/// encodes them | the rest of the message`.
fn compact(body: &[u8], d: &Directory) -> Option<Vec<u8>> {
    let (start, entries, end) = digest_of(body)?;
    let mut values: Vec<Option<[u64; 3]>> = vec![None; d.ids.len()];
    let mut extras: Vec<&[u8]> = Vec::new();
    let mut at = start + 2;
    for e in &entries {
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
    for v in &values {
        match v {
            None => out.push(0),
            Some([hb, gc, max]) => {
                put_varint(&mut out, hb.checked_add(1)?);
                put_varint(&mut out, *gc);
                put_varint(&mut out, *max);
            }
        }
    }
    put_varint(&mut out, extras.len() as u64);
    for x in extras {
        out.extend_from_slice(x);
    }
    out.extend_from_slice(&body[end..]);
    Some(out)
}

fn expand(c: &[u8], d: &Directory, max: usize) -> Option<Vec<u8>> {
    if c.len() < HEAD + 8 || !matches!(c[3], SYN | SYN_ACK) {
        return None;
    }
    let mut at = HEAD + 8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0usize;
    for id in &d.ids {
        let hb = varint(c, &mut at)?;
        if hb == 0 {
            continue;
        }
        let (gc, mx) = (varint(c, &mut at)?, varint(c, &mut at)?);
        entries.extend_from_slice(id);
        for n in [hb - 1, gc, mx] {
            entries.extend_from_slice(&n.to_le_bytes());
        }
        count += 1;
    }
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

/// A serialized message of `kind` whose digest has `nodes` (name,
/// generation, last octet, heartbeat), then `rest` (chitchat's magic).
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
        for n in [*hb, 0, hb / 10] {
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

    #[test]
    fn a_digest_goes_relative_to_the_peers_directory_and_comes_back_exact() {
        let peer: IpAddr = "192.168.91.2".parse().expect("ip");
        // The peer's view: 200 nodes. Ours: the same but one, and one it
        // does not know yet; newer heartbeats; a SYN-ACK with a delta.
        let theirs = cluster(200, 1_000);
        let mut ours = cluster(200, 1_050);
        ours.remove(17);
        ours.push(("node-new".into(), 42, 251, 1));
        let (mut a, mut b) = (Directories::default(), Directories::default());
        // The peer sent its digest (and remembered its directory).
        let sent = message(SYN, &refs(&theirs), b"\x00\x07cluster");
        b.note(&sent);
        a.note_from(peer, &sent);
        let body = message(SYN_ACK, &refs(&ours), b"the delta, untouched");
        let c = a.compact_for(peer, &body).expect("compact");
        println!(
            "digest of 200 nodes: {} bytes, compact {}",
            body.len(),
            c.len()
        );
        assert!(c.len() * 4 < body.len(), "{} -> {}", body.len(), c.len());
        assert_eq!(b.expand(&c, 1 << 20).as_deref(), Some(&body[..]));
        // A node without that directory cannot read it; nor is it readable
        // past the size bound.
        assert_eq!(Directories::default().expand(&c, 1 << 20), None);
        assert_eq!(b.expand(&c, body.len() - 1), None);
    }

    /// What uptime does to a digest of 200 nodes: heartbeats grow by one
    /// per gossip round (about 2.3 a second at the default dead-after), so
    /// their varints take 1 byte in a fresh cluster, 3 after 2 hours and 4
    /// after 10 days. Printed, compressed as sent.
    #[test]
    fn digest_size_by_uptime() {
        let peer: IpAddr = "192.168.91.2".parse().expect("ip");
        // Nodes started at different times: heartbeats spread over the
        // uptime (a fixed pseudo-random spread).
        let spread = |n: Vec<(String, u64, u8, u64)>, up: u64, plus: u64| {
            let mut x = 0x2545_f491_4f6c_dd1d_u64;
            n.into_iter()
                .map(|(a, b, c, _)| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (a, b, c, (x >> 33) % up + plus)
                })
                .collect::<Vec<_>>()
        };
        for (uptime, up) in [("fresh", 60u64), ("2 hours", 16_000), ("10 days", 2_000_000)] {
            let mut d = Directories::default();
            let theirs = message(SYN, &refs(&spread(cluster(200, 0), up, 0)), b"");
            d.note_from(peer, &theirs);
            let ours = message(SYN_ACK, &refs(&spread(cluster(200, 0), up, 5)), b"");
            let c = d.compact_for(peer, &ours).expect("compact");
            let z = |b: &[u8]| zstd::bulk::compress(b, 1).map_or(0, |c| c.len());
            println!(
                "digest of 200 nodes, {uptime}: chitchat {} bytes ({} compressed), compact {} ({} compressed)",
                ours.len(),
                z(&ours),
                c.len(),
                z(&c)
            );
        }
    }

    #[test]
    fn anything_else_stays_as_chitchat_made_it() {
        let peer: IpAddr = "192.168.91.2".parse().expect("ip");
        let mut a = Directories::default();
        // No directory from that peer yet.
        let body = message(SYN, &refs(&cluster(5, 1)), b"");
        assert_eq!(a.compact_for(peer, &body), None);
        a.note_from(peer, &body);
        // An ACK has no digest; a truncated message does not parse.
        let ack = [0x4b, 0x2c, 0, 2, 0, 0];
        assert_eq!(a.compact_for(peer, &ack), None);
        assert_eq!(a.compact_for(peer, &body[..body.len() - 3]), None);
        assert_eq!(a.note(&body[..20]), None);
    }

    #[test]
    fn garbage_never_expands_or_panics() {
        let mut d = Directories::default();
        let body = message(SYN, &refs(&cluster(3, 9)), b"x");
        let h = d.note(&body).expect("hash");
        let mut c = vec![0x4b, 0x2c, 0, SYN];
        c.extend_from_slice(&h.to_le_bytes());
        for tail in [
            &[][..],
            &[0xff; 12][..],
            &[1, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 9, 0xff, 0xff][..],
        ] {
            let mut x = c.clone();
            x.extend_from_slice(tail);
            let _ = d.expand(&x, 1 << 16);
        }
        // Every node absent, no extras: an empty digest.
        let mut empty = c.clone();
        empty.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            d.expand(&empty, 1 << 16),
            Some(vec![0x4b, 0x2c, 0, SYN, 0, 0])
        );
    }
}

//! The cluster consistency check (`meshctl check`), with no I/O: what a
//! node's kernel holds, reduced to a digest that can be compared across
//! nodes, and the comparison.
//!
//! Every node of a cluster should hold the same services (VIP:port/proto,
//! each with the same backends and, Maglev being a function of its
//! members, the same ring) and the same published ports, and a node table
//! naming every node but itself. Backend ids and veths are each node's own,
//! so the digest names backends by address and a ring by the addresses of
//! its slots. A node publishes its [`Report`] in gossip (sealed with the
//! cluster key: the check has no port of its own): the digest of its
//! kernel, and what its kernel lacks or holds beyond what its agent wrote
//! (`drift`: a map changed behind the agent's back). Services fall into
//! [`BUCKETS`] buckets by name, each with its own hash, so a differing
//! service is named, not just counted, with a report of a few hundred
//! bytes whatever the number of services.

use std::collections::BTreeMap;

use mesh_common::hash::fnv1a;
use serde::{Deserialize, Serialize};

/// Buckets the services fall into (by the hash of their address).
pub const BUCKETS: usize = 32;
/// The drift lines a report carries at most (the count is whole).
pub const MAX_DRIFT_LINES: usize = 8;
/// The rounds a node's answer names at most (several nodes may ask at
/// once).
pub const MAX_ROUNDS: usize = 8;

/// The rounds a node has answered (`checkack`: `ASKER/N`, space
/// separated, the newest last) with `round` added. Apart from the report,
/// which changes only when the kernel does: a round costs every node a
/// few bytes of gossip, not a report.
pub fn answer(acks: &str, round: &str) -> String {
    let mut v: Vec<&str> = acks.split_whitespace().filter(|r| *r != round).collect();
    v.push(round);
    let excess = v.len().saturating_sub(MAX_ROUNDS);
    v[excess..].join(" ")
}

/// The rounds in a `checkack` value (bounded: a peer's word).
pub fn acks(v: &str) -> Vec<String> {
    v.split_whitespace()
        .filter(|r| r.len() <= 80)
        .take(MAX_ROUNDS)
        .map(str::to_owned)
        .collect()
}

/// One service as a node's kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Service {
    /// `VIP:PORT/PROTO`.
    pub addr: String,
    /// `IP:PORT STATE` of each backend, sorted.
    pub backends: Vec<String>,
    /// The ring's slots by backend address, hashed (0: no ring).
    pub ring: u64,
}

/// The comparable part of a node's kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub services: usize,
    /// Per bucket: the hash of its services (hex, 8 digits each).
    pub buckets: String,
    pub published: usize,
    pub published_hash: String,
    /// Node table entries (other nodes' slices) and their hash.
    pub nodes: usize,
    pub nodes_hash: String,
}

/// What a node says of its own kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub digest: Digest,
    /// Differences between its kernel and what its agent wrote, at most
    /// [`MAX_DRIFT_LINES`] of them, and how many there were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(default)]
    pub drift_count: usize,
    /// When it last found its kernel drifted (ms since the epoch; 0: never).
    #[serde(default)]
    pub drift_at_ms: u64,
}

fn hex(v: u64) -> String {
    format!("{:08x}", v as u32)
}

fn bucket_of(addr: &str) -> usize {
    (fnv1a(addr.as_bytes()) % BUCKETS as u64) as usize
}

fn service_hash(s: &Service) -> u64 {
    let mut text = format!("{}|{:016x}", s.addr, s.ring);
    for b in &s.backends {
        text.push('|');
        text.push_str(b);
    }
    fnv1a(text.as_bytes())
}

fn set_hash(items: &[String]) -> u64 {
    let mut sorted: Vec<&String> = items.iter().collect();
    sorted.sort();
    fnv1a(
        sorted
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    )
}

/// The digest of services, published ports (`PORT/PROTO -> VIP:PORT`) and
/// node table entries (`SLICE underlay MAC VNI`).
pub fn digest(services: &[Service], published: &[String], nodes: &[String]) -> Digest {
    let mut buckets = [0u64; BUCKETS];
    for s in services {
        let b = &mut buckets[bucket_of(&s.addr)];
        // Order-free within a bucket.
        *b ^= service_hash(s);
    }
    Digest {
        services: services.len(),
        buckets: buckets.iter().map(|h| hex(*h)).collect(),
        published: published.len(),
        published_hash: hex(set_hash(published)),
        nodes: nodes.len(),
        nodes_hash: hex(set_hash(nodes)),
    }
}

/// A ring's hash by the backends of its slots, each as `address << 16 |
/// port` (0 for a slot naming none): the same on every node whose ring
/// picks the same backends in the same slots, whatever their ids there.
/// 0 for an empty ring.
pub fn ring_hash(slots: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    let mut any = false;
    for s in slots {
        h = mesh_common::hash::mix64(h ^ s);
        any = true;
    }
    if any { h } else { 0 }
}

/// A backend as [`ring_hash`] takes it.
pub fn backend_key(ip_be: u32, port_be: u16) -> u64 {
    (u64::from(u32::from_be(ip_be)) << 16) | u64::from(u16::from_be(port_be))
}

/// The node table entries another node should hold: `mine` (this node's)
/// without that node's own entries (`theirs`), with this node's
/// (`own`).
pub fn expected_nodes(mine: &[String], theirs: &[String], own: &[String]) -> Vec<String> {
    mine.iter()
        .filter(|e| !theirs.contains(e))
        .chain(own)
        .cloned()
        .collect()
}

/// How `theirs` differs from what this node expects of it: its services
/// and published ports as this node's (`mine`, with `services` to name
/// them), its node table as `nodes_hash` (see [`expected_nodes`]). Empty:
/// it agrees.
pub fn compare(
    mine: &Digest,
    services: &[Service],
    nodes_hash: &str,
    theirs: &Digest,
) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (bucket_hashes(&mine.buckets), bucket_hashes(&theirs.buckets));
    let differing: Vec<usize> = (0..BUCKETS).filter(|&i| a.get(i) != b.get(i)).collect();
    if !differing.is_empty() || mine.services != theirs.services {
        let names: Vec<&str> = services
            .iter()
            .filter(|s| differing.contains(&bucket_of(&s.addr)))
            .map(|s| s.addr.as_str())
            .collect();
        let which = if names.is_empty() {
            "a service this node does not have".to_string()
        } else {
            format!("one of {}", names.join(", "))
        };
        out.push(format!(
            "services: {} there, {} here; backends or ring differ for {which}",
            theirs.services, mine.services
        ));
    }
    if mine.published_hash != theirs.published_hash {
        out.push(format!(
            "published ports: {} there, {} here, not the same",
            theirs.published, mine.published
        ));
    }
    if nodes_hash != theirs.nodes_hash {
        out.push(format!(
            "node table: {} entries there, not the other nodes' slices as this node knows them",
            theirs.nodes
        ));
    }
    out
}

fn bucket_hashes(s: &str) -> Vec<&str> {
    (0..s.len() / 8)
        .filter_map(|i| s.get(i * 8..i * 8 + 8))
        .collect()
}

/// The differences between a kernel's table and what was written to it,
/// as lines: `what KEY: kernel A, written B` (None: absent).
pub fn drift<K: Ord + std::fmt::Display, V: PartialEq + std::fmt::Debug>(
    what: &str,
    kernel: &BTreeMap<K, V>,
    written: &BTreeMap<K, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in written {
        match kernel.get(k) {
            None => out.push(format!("{what} {k}: missing from the kernel")),
            Some(v) if v != w => out.push(format!("{what} {k}: kernel {v:?}, written {w:?}")),
            Some(_) => {}
        }
    }
    for k in kernel.keys().filter(|k| !written.contains_key(*k)) {
        out.push(format!("{what} {k}: in the kernel, never written"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(addr: &str, backends: &[&str]) -> Service {
        Service {
            addr: addr.into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ring: 7,
        }
    }

    #[test]
    fn equal_kernels_agree_and_a_missing_backend_is_named_by_its_service() {
        let a = vec![
            svc(
                "10.43.0.5:80/tcp",
                &["10.42.1.2:80 active", "10.42.2.2:80 active"],
            ),
            svc("10.43.0.9:53/udp", &["10.42.1.3:53 active"]),
        ];
        let published = vec!["8080/tcp -> 10.43.0.5:80".to_string()];
        let nodes = vec!["10.42.2.0 192.168.0.2 02:00:00:00:00:02 4242".to_string()];
        let da = digest(&a, &published, &nodes);
        assert!(compare(&da, &a, &da.nodes_hash, &digest(&a, &published, &nodes)).is_empty());
        let mut b = a.clone();
        b[0].backends.pop();
        let db = digest(&b, &published, &nodes);
        let diff = compare(&da, &a, &da.nodes_hash, &db);
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(diff[0].contains("10.43.0.5:80/tcp"), "{diff:?}");
        assert!(!diff[0].contains("10.43.0.9"), "{diff:?}");
        // Another ring, the same members: differs too.
        let mut c = a.clone();
        c[1].ring = 8;
        assert!(
            compare(&da, &a, &da.nodes_hash, &digest(&c, &published, &nodes))[0]
                .contains("10.43.0.9:53/udp")
        );
        // Published ports and the node table.
        let dp = digest(&a, &[], &nodes);
        assert!(compare(&da, &a, &da.nodes_hash, &dp)[0].starts_with("published ports"));
        let dn = digest(&a, &published, &[]);
        assert!(compare(&da, &a, &da.nodes_hash, &dn)[0].starts_with("node table"));
    }

    #[test]
    fn the_node_table_another_node_should_hold_is_mine_with_mine_for_its_own() {
        let mine = vec!["b".to_string(), "c".to_string()];
        let theirs_own = vec!["b".to_string()];
        let own = vec!["a".to_string()];
        let want = expected_nodes(&mine, &theirs_own, &own);
        assert_eq!(
            digest(&[], &[], &want).nodes_hash,
            digest(&[], &[], &["a".into(), "c".into()]).nodes_hash
        );
    }

    #[test]
    fn drift_names_what_is_missing_changed_and_extra() {
        let written = BTreeMap::from([(1, "x"), (2, "y")]);
        let kernel = BTreeMap::from([(2, "z"), (3, "w")]);
        let d = drift("backend", &kernel, &written);
        assert_eq!(
            d,
            [
                "backend 1: missing from the kernel",
                "backend 2: kernel \"z\", written \"y\"",
                "backend 3: in the kernel, never written"
            ]
        );
    }

    #[test]
    fn a_ring_hashes_by_its_slots_backends_in_order() {
        let (a, b) = (
            backend_key(1u32.to_be(), 80u16.to_be()),
            backend_key(2u32.to_be(), 80u16.to_be()),
        );
        assert_eq!(ring_hash([a, b, a]), ring_hash([a, b, a]));
        assert_ne!(ring_hash([a, b, a]), ring_hash([b, a, a]));
        assert_eq!(ring_hash([]), 0);
    }

    #[test]
    fn answers_keep_the_newest_rounds() {
        let mut a = String::new();
        for i in 0..10 {
            a = answer(&a, &format!("n1/{i}"));
        }
        assert_eq!(acks(&a).len(), MAX_ROUNDS);
        assert_eq!(acks(&a).last().map(String::as_str), Some("n1/9"));
        assert_eq!(answer("n2/1 n1/1", "n2/1"), "n1/1 n2/1");
    }

    #[test]
    fn a_report_round_trips_in_json() {
        let r = Report {
            digest: digest(&[svc("10.43.0.5:80/tcp", &[])], &[], &[]),
            drift: vec!["x".into()],
            drift_count: 1,
            drift_at_ms: 5,
        };
        let back: Report =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(back, r);
        assert_eq!(r.digest.buckets.len(), BUCKETS * 8);
    }
}

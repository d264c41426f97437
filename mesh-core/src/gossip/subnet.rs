//! Node subnets: every node owns one /24 of the cluster CIDR, agreed
//! through gossip with no leader.
//!
//! A node's first choice is a stable hash of its name; taken ones are
//! skipped in order. Each node publishes its claim with the time it made
//! it. When two live nodes claim the same /24, the older claim wins (then
//! the smaller node name): the same answer on every node, so the loser
//! moves and the winner stays. A node creates its Docker network only once
//! its claim has stood unchallenged for a settle period, so nodes starting
//! at the same instant still end up apart.

use std::net::Ipv4Addr;

use crate::vip::Cidr;

/// A claim as published in gossip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    /// Index of the /24 within the cluster CIDR.
    pub index: u32,
    /// When the claim was made (ms since the epoch).
    pub since_ms: u64,
}

/// The /24s of `cluster` (index 0 is left out: its .0 network would be
/// the cluster's own network address).
pub fn count(cluster: Cidr) -> u32 {
    if cluster.prefix >= 24 {
        0
    } else {
        (1u32 << (24 - cluster.prefix)) - 1
    }
}

pub fn subnet(cluster: Cidr, index: u32) -> Cidr {
    Cidr {
        base: Ipv4Addr::from(u32::from(cluster.base) + (index << 8)),
        prefix: 24,
    }
}

/// The index of `s` in `cluster`, if it is one of its /24s.
pub fn index_of(cluster: Cidr, s: Cidr) -> Option<u32> {
    (s.prefix == 24 && cluster.contains(s.base))
        .then(|| (u32::from(s.base) - u32::from(cluster.base)) >> 8)
        .filter(|i| *i > 0)
}

fn preferred(node: &str, n: u32) -> u32 {
    1 + (mesh_common::hash::fnv1a(node.as_bytes()) % n as u64) as u32
}

/// Whether `a` beats `b` for the same /24.
pub fn beats(a: &Claim, b: &Claim) -> bool {
    (a.since_ms, &a.node) < (b.since_ms, &b.node)
}

/// What `me` should claim given the live peers' claims: keep `mine` unless
/// a peer's claim on it beats it; otherwise the first free index from this
/// node's preferred one. None when the cluster CIDR is full.
pub fn choose(cluster: Cidr, me: &str, mine: Option<&Claim>, peers: &[Claim]) -> Option<u32> {
    let n = count(cluster);
    if n == 0 {
        return None;
    }
    if let Some(m) = mine {
        let lost = peers
            .iter()
            .any(|p| p.index == m.index && p.node != me && beats(p, m));
        if !lost {
            return Some(m.index);
        }
    }
    let start = preferred(me, n);
    (0..n)
        .map(|i| 1 + (start - 1 + i) % n)
        .find(|i| !peers.iter().any(|p| p.index == *i && p.node != me))
}

/// Gossip value of a claim: "INDEX SINCE_MS".
pub fn encode(c: &Claim) -> String {
    format!("{} {}", c.index, c.since_ms)
}

pub fn decode(node: &str, v: &str) -> Option<Claim> {
    let mut f = v.split_whitespace();
    let index = f.next()?.parse().ok()?;
    let since_ms = f.next()?.parse().ok()?;
    Some(Claim {
        node: node.to_string(),
        index,
        since_ms,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cidr() -> Cidr {
        "10.42.0.0/16".parse().expect("cidr")
    }

    pub(crate) fn claim(node: &str, index: u32, since_ms: u64) -> Claim {
        Claim {
            node: node.into(),
            index,
            since_ms,
        }
    }

    #[test]
    fn subnets_of_the_cluster() {
        assert_eq!(count(cidr()), 255);
        assert_eq!(subnet(cidr(), 7).to_string(), "10.42.7.0/24");
        assert_eq!(
            index_of(cidr(), "10.42.7.0/24".parse().expect("cidr")),
            Some(7)
        );
        assert_eq!(
            index_of(cidr(), "10.43.7.0/24".parse().expect("cidr")),
            None
        );
        assert_eq!(
            decode("a", &encode(&claim("a", 3, 99))),
            Some(claim("a", 3, 99))
        );
        assert_eq!(decode("a", "x y"), None);
    }

    #[test]
    fn simultaneous_claims_end_up_apart_and_stable() {
        // Force a collision: a tiny cluster of three /24s and many nodes
        // claiming at the same instant; run rounds until nothing changes.
        let small: Cidr = "10.42.0.0/22".parse().expect("cidr");
        let names = ["alpha", "beta", "gamma"];
        let mut claims: Vec<Option<Claim>> = vec![None; names.len()];
        for _round in 0..10 {
            let snapshot: Vec<Claim> = claims.iter().flatten().cloned().collect();
            let mut changed = false;
            for (i, name) in names.iter().enumerate() {
                let peers: Vec<Claim> = snapshot
                    .iter()
                    .filter(|c| c.node != *name)
                    .cloned()
                    .collect();
                let pick = choose(small, name, claims[i].as_ref(), &peers).expect("room");
                if claims[i].as_ref().map(|c| c.index) != Some(pick) {
                    claims[i] = Some(claim(name, pick, 1000));
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let mut idx: Vec<u32> = claims.iter().flatten().map(|c| c.index).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(
            idx.len(),
            3,
            "three nodes, three different /24s: {claims:?}"
        );
    }

    #[test]
    fn the_older_claim_keeps_its_subnet() {
        let c = cidr();
        let old = claim("zeta", 5, 100);
        let young = claim("alpha", 5, 200);
        assert_eq!(
            choose(c, "zeta", Some(&old), std::slice::from_ref(&young)),
            Some(5),
            "older keeps it"
        );
        let moved = choose(c, "alpha", Some(&young), std::slice::from_ref(&old)).expect("room");
        assert_ne!(moved, 5, "younger moves");
        // A full cluster: no subnet rather than a taken one.
        let tiny: Cidr = "10.42.0.0/23".parse().expect("cidr");
        assert_eq!(choose(tiny, "b", None, &[claim("a", 1, 1)]), None);
    }
}

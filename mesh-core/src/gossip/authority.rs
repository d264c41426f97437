//! What a peer may say, with no I/O. Every node holding the cluster key can
//! gossip, so what a node publishes is checked against what it owns
//! before anything uses it:
//! - a /24 claim must be one of the cluster CIDR's /24s;
//! - one /24 has one holder: of several nodes claiming it (this one
//!   included), the oldest claim wins, then the smaller name, the same
//!   answer on every node (after a partition heals too); the others' claims
//!   are ignored, and this node learns that it lost its own;
//! - a node's endpoints must be addresses of its own /24.
//!
//! A node's identity (its name bound to its underlay address) is checked
//! where its generations are merged (`peers::from_states`).

use std::collections::BTreeMap;

use super::{
    peers::{Endpoint, Peer},
    subnet::{self, Claim},
};
use crate::vip::Cidr;

/// What was ignored, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub node: String,
    /// `claim`, `endpoint` or `identity`: the metrics label.
    pub kind: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.node, self.reason)
    }
}

/// The peers with only what they may say.
#[derive(Debug, Default)]
pub struct Vetted {
    pub peers: BTreeMap<String, Peer>,
    pub rejected: Vec<Rejection>,
    /// The claim that beats this node's own on its /24, if one does.
    pub lost_to: Option<Claim>,
}

/// Refuses the peers whose encryption differs from this node's (`encrypt`:
/// it runs with `--encrypt`): an encrypting node takes no plain VXLAN and
/// a plain one cannot open WireGuard, so neither side would reach the
/// other's containers; such a peer is left out altogether (no tunnel, no
/// backends) and said so on this side, as the joining node says it on its
/// own.
pub fn same_encryption(v: &mut Vetted, encrypt: bool) {
    let (theirs, ours) = if encrypt {
        ("does not encrypt", "this node does (--encrypt)")
    } else {
        ("encrypts (--encrypt)", "this node does not")
    };
    let refused: Vec<String> = v
        .peers
        .iter()
        .filter(|(_, p)| p.wg.is_some() != encrypt)
        .map(|(name, _)| name.clone())
        .collect();
    for name in refused {
        v.peers.remove(&name);
        v.rejected.push(Rejection {
            node: name,
            kind: "encryption",
            reason: format!(
                "{theirs} while {ours}: refused; every node of a cluster must use the same \
                 --encrypt"
            ),
        });
    }
}

/// Vets the peers' claims and endpoints against `mine` (None when this
/// node holds no claim, e.g. alone or with a fixed subnet). `networks`:
/// the /16s of the overlay networks besides `mesh`, of which a node holds
/// the slice with its /24's index.
pub fn vet(
    mut peers: BTreeMap<String, Peer>,
    cluster: Cidr,
    mine: Option<&Claim>,
    networks: &[Cidr],
) -> Vetted {
    let mut out = Vetted::default();
    let n = subnet::count(cluster);
    for (name, p) in peers.iter_mut() {
        out.rejected.extend(
            std::mem::take(&mut p.ignored)
                .into_iter()
                .map(|reason| Rejection {
                    node: name.clone(),
                    kind: "identity",
                    reason,
                }),
        );
    }
    // Claims in range.
    for (name, p) in peers.iter_mut() {
        if let Some(c) = &p.subnet
            && (c.index == 0 || c.index > n)
        {
            out.rejected.push(Rejection {
                node: name.clone(),
                kind: "claim",
                reason: format!("claims /24 number {}, not one of {cluster}'s", c.index),
            });
            p.subnet = None;
        }
    }
    // One holder per /24: the winner of every contested index.
    let mut best: BTreeMap<u32, Claim> = BTreeMap::new();
    for c in peers.values().filter_map(|p| p.subnet.as_ref()).chain(mine) {
        let e = best.entry(c.index).or_insert_with(|| c.clone());
        if subnet::beats(c, e) {
            *e = c.clone();
        }
    }
    if let Some(m) = mine
        && let Some(w) = best.get(&m.index)
        && w.node != m.node
    {
        out.lost_to = Some(w.clone());
    }
    for (name, p) in peers.iter_mut() {
        let Some(c) = &p.subnet else { continue };
        if let Some(w) = best.get(&c.index)
            && w.node != *name
        {
            out.rejected.push(Rejection {
                node: name.clone(),
                kind: "claim",
                reason: format!(
                    "claims {} held by {} (the older claim)",
                    subnet::subnet(cluster, c.index),
                    w.node
                ),
            });
            p.subnet = None;
        }
    }
    // Endpoints inside the node's own /24 (or its slice of a network) only.
    for (name, p) in peers.iter_mut() {
        let own = p.subnet.as_ref().map(|c| subnet::subnet(cluster, c.index));
        let index = p.subnet.as_ref().map(|c| c.index);
        let inside = |e: &Endpoint| {
            own.is_some_and(|s| s.contains(e.ip))
                || networks
                    .iter()
                    .any(|n| n.contains(e.ip) && index == Some((u32::from(e.ip) >> 8) & 0xff))
        };
        let dropped = p.endpoints.iter().filter(|e| !inside(e)).count();
        if dropped > 0 {
            // Copied only then: the decoder's copy is shared otherwise.
            std::sync::Arc::make_mut(&mut p.endpoints).retain(inside);
        }
        if dropped > 0 {
            out.rejected.push(Rejection {
                node: name.clone(),
                kind: "endpoint",
                reason: match own {
                    Some(s) => format!("{dropped} endpoint(s) outside its /24 {s}"),
                    None => format!("{dropped} endpoint(s) but no /24 of its own"),
                },
            });
        }
    }
    out.peers = peers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        gossip::subnet::tests::{cidr, claim},
        labels::Proto,
    };

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            service: "web".into(),
            created: "2026".into(),
            ip: ip.parse().expect("ip"),
            ports: vec![(80, 80, Proto::Tcp)],
            state: 0,
            publish: vec![],
            container: String::new(),
        }
    }

    fn peer(c: Option<Claim>, eps: &[&str]) -> Peer {
        Peer {
            underlay: Some("192.168.1.2".parse().expect("ip")),
            mac: Some([2, 0, 0, 0, 0, 1]),
            subnet: c,
            endpoints: std::sync::Arc::new(eps.iter().map(|e| ep(e)).collect()),
            ..Peer::default()
        }
    }

    #[test]
    fn endpoints_outside_the_own_24_are_ignored() {
        let peers = BTreeMap::from([
            (
                "b".to_string(),
                peer(
                    Some(claim("b", 2, 10)),
                    &["10.42.2.5", "10.42.3.5", "8.8.8.8"],
                ),
            ),
            ("c".to_string(), peer(None, &["10.42.9.9"])),
        ]);
        let v = vet(peers, cidr(), Some(&claim("a", 1, 5)), &[]);
        assert_eq!(*v.peers["b"].endpoints, vec![ep("10.42.2.5")]);
        assert!(v.peers["c"].endpoints.is_empty());
        assert_eq!(v.rejected.len(), 2, "{:?}", v.rejected);
        assert!(v.rejected.iter().all(|r| r.kind == "endpoint"));
        assert_eq!(v.lost_to, None);
    }

    #[test]
    fn claims_out_of_range_are_ignored() {
        let peers = BTreeMap::from([
            ("b".to_string(), peer(Some(claim("b", 0, 10)), &[])),
            ("c".to_string(), peer(Some(claim("c", u32::MAX, 10)), &[])),
            ("d".to_string(), peer(Some(claim("d", 256, 10)), &[])),
        ]);
        let v = vet(peers, cidr(), None, &[]);
        assert!(v.peers.values().all(|p| p.subnet.is_none()));
        assert_eq!(v.rejected.len(), 3);
    }

    #[test]
    fn one_holder_per_24_the_same_everywhere() {
        // b and c both claim /24 4 (after a partition): b's is older.
        let peers = BTreeMap::from([
            (
                "b".to_string(),
                peer(Some(claim("b", 4, 100)), &["10.42.4.2"]),
            ),
            (
                "c".to_string(),
                peer(Some(claim("c", 4, 200)), &["10.42.4.3"]),
            ),
        ]);
        let v = vet(peers.clone(), cidr(), Some(&claim("a", 1, 5)), &[]);
        assert_eq!(v.peers["b"].subnet, Some(claim("b", 4, 100)));
        assert_eq!(v.peers["c"].subnet, None, "the younger claim loses");
        assert!(v.peers["c"].endpoints.is_empty());
        // c itself sees that it lost, and to whom.
        let mut from_c = peers;
        let mine = from_c.remove("c").and_then(|p| p.subnet);
        let v = vet(from_c, cidr(), mine.as_ref(), &[]);
        assert_eq!(v.lost_to, Some(claim("b", 4, 100)));
        // A peer claiming this node's /24 with a younger claim is ignored.
        let peers = BTreeMap::from([("z".to_string(), peer(Some(claim("z", 1, 50)), &[]))]);
        let v = vet(peers, cidr(), Some(&claim("a", 1, 5)), &[]);
        assert_eq!(v.peers["z"].subnet, None);
        assert_eq!(v.lost_to, None);
    }

    #[test]
    fn endpoints_in_the_nodes_slice_of_a_network_are_its_own() {
        let front: Cidr = "10.44.0.0/16".parse().expect("cidr");
        let peers = BTreeMap::from([(
            "b".to_string(),
            peer(
                Some(claim("b", 2, 7)),
                &["10.42.2.5", "10.44.2.9", "10.44.3.9", "10.45.2.9"],
            ),
        )]);
        let v = vet(peers, cidr(), Some(&claim("a", 1, 5)), &[front]);
        let kept: Vec<String> = v.peers["b"]
            .endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect();
        // Its slice of front (10.44.2.0/24) is its own; another node's
        // slice, and a network this node does not serve, are not.
        assert_eq!(kept, ["10.42.2.5", "10.44.2.9"]);
        assert_eq!(v.rejected.len(), 1, "{:?}", v.rejected);
    }

    #[test]
    fn a_peer_whose_encryption_differs_is_refused_with_the_reason() {
        let mut enc = peer(Some(claim("b", 2, 7)), &["10.42.2.5"]);
        enc.wg = Some(crate::gossip::peers::WgKey {
            key: [1; 32],
            port: 51820,
        });
        let plain = peer(Some(claim("c", 3, 7)), &["10.42.3.5"]);
        let peers = BTreeMap::from([("b".to_string(), enc), ("c".to_string(), plain)]);
        let mut v = vet(peers.clone(), cidr(), None, &[]);
        same_encryption(&mut v, true);
        assert_eq!(v.peers.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(v.rejected.len(), 1);
        assert_eq!(v.rejected[0].kind, "encryption");
        assert!(
            v.rejected[0]
                .to_string()
                .starts_with("c: does not encrypt while this node does (--encrypt): refused"),
            "{}",
            v.rejected[0]
        );
        let mut v = vet(peers, cidr(), None, &[]);
        same_encryption(&mut v, false);
        assert_eq!(v.peers.keys().collect::<Vec<_>>(), ["c"]);
        assert!(
            v.rejected[0]
                .to_string()
                .starts_with("b: encrypts (--encrypt) while this node does not")
        );
    }
}

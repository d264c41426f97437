//! Overlay networks as objects of the cluster (`meshctl network create`),
//! as `docker network create -d overlay` gives Swarm users.
//!
//! A network is a name and a /16. Every node serves its slice of every
//! network: the /24 with the same index as its /24 of the cluster CIDR
//! (`gossip::subnet`), so joining a network needs no claim of its own and
//! an address still names its node. Slice 0, which no node takes, holds the
//! network's VIPs. Its VXLAN network identifier is the /16's top 16 bits,
//! unique because networks never overlap. The default network, `mesh`, is
//! the cluster CIDR with its own VNI (`--vni`); it cannot be created or
//! removed.
//!
//! No store: every node keeps the table it knows (in its state directory)
//! and publishes it in gossip, one key per network; every node merges what
//! its live peers publish the same way, so the table outlives the node that
//! created a network. Removal is a tombstone that outlives the network.
//! Per name: the latest removal kills every creation made before it; of
//! the creations left, the oldest wins (then the smaller node name), as
//! /24 claims are settled; the others are reported.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::vip::Cidr;

/// The default network.
pub const DEFAULT: &str = "mesh";
/// The prefix of the gossip keys, one per network (`net:NAME`).
pub const KEY_PREFIX: &str = "net:";
/// The prefix of the keys naming this node's containers on a network
/// (`netuse:NAME`), so `network rm` anywhere knows who uses it.
pub const USE_PREFIX: &str = "netuse:";
/// Live networks besides `mesh`: each costs 256 entries of the slice
/// table (`mesh_common::maps::MAX_SLICES`) and a key in gossip.
pub const MAX_NETWORKS: usize = 64;
/// How long a removed network's tombstone is kept (ms): a host away for
/// longer brings back what was removed meanwhile.
pub const TOMBSTONE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Where default subnets come from: the /16s of 10.0.0.0/8 from 10.44 on.
const POOL_FIRST: u32 = 44;

/// A network as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Def {
    pub subnet: String,
    /// When it was created (ms since the epoch) and on which node.
    pub created_ms: u64,
    pub creator: String,
    /// When it was removed: a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_ms: Option<u64>,
}

impl Def {
    pub fn cidr(&self) -> Option<Cidr> {
        self.subnet.parse().ok().filter(|c: &Cidr| c.prefix == 16)
    }

    pub fn live(&self) -> bool {
        self.removed_ms.is_none()
    }
}

/// A network this node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub cidr: Cidr,
    pub vni: u32,
}

impl Network {
    /// This node's slice: the /24 at `index` (the index of its /24 of the
    /// cluster CIDR).
    pub fn slice(&self, index: u32) -> Cidr {
        Cidr {
            base: Ipv4Addr::from(u32::from(self.cidr.base) + (index << 8)),
            prefix: 24,
        }
    }

    /// The /24 of its VIPs (slice 0).
    pub fn vips(&self) -> Cidr {
        self.slice(0)
    }
}

/// The VNI of a non-default network: its /16's top 16 bits.
pub fn vni_of(cidr: Cidr) -> u32 {
    u32::from(cidr.base) >> 16
}

/// The address space networks must stay out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// The default network's CIDR.
    pub cluster: Cidr,
    /// Where the default network's VIPs come from (`--vip-cidr`).
    pub vip: Cidr,
    /// The default network's VNI (`--vni`).
    pub cluster_vni: u32,
}

impl Space {
    /// What `c` collides with among these and `live`, as words.
    fn clash(&self, c: Cidr, live: &[Network]) -> Option<String> {
        if overlaps(c, self.cluster) {
            Some(format!("the cluster CIDR {}", self.cluster))
        } else if overlaps(c, self.vip) {
            Some(format!("the VIP range {}", self.vip))
        } else if vni_of(c) == self.cluster_vni {
            Some(format!(
                "VNI {} (the {DEFAULT} network's)",
                self.cluster_vni
            ))
        } else {
            live.iter()
                .find(|n| overlaps(n.cidr, c))
                .map(|n| format!("network {} ({})", n.name, n.cidr))
        }
    }
}

/// What the cluster's table says, and which records lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Every name's winning record (live or a tombstone).
    pub table: BTreeMap<String, Def>,
    /// Records that lost to another of the same name, and live networks
    /// that cannot be served (overlaps), as sentences.
    pub conflicts: Vec<String>,
}

/// Merges the records of every node (this node's table first) by the rules
/// in the module's header.
pub fn merge<'a>(tables: impl IntoIterator<Item = &'a BTreeMap<String, Def>>) -> Merged {
    let mut by_name: BTreeMap<&str, Vec<&Def>> = BTreeMap::new();
    for t in tables {
        for (name, d) in t {
            by_name.entry(name).or_default().push(d);
        }
    }
    let mut out = Merged::default();
    for (name, records) in by_name {
        let removed = records.iter().filter_map(|d| d.removed_ms).max();
        let mut alive: Vec<&Def> = records
            .iter()
            .copied()
            .filter(|d| d.live() && removed.is_none_or(|r| d.created_ms > r))
            .collect();
        alive.sort_by(|a, b| (a.created_ms, &a.creator).cmp(&(b.created_ms, &b.creator)));
        alive.dedup();
        let winner = match (alive.first(), removed) {
            (Some(w), _) => (*w).clone(),
            (None, Some(r)) => {
                let last = records
                    .iter()
                    .max_by_key(|d| (d.created_ms, &d.creator))
                    .map_or_else(|| records[0], |d| *d);
                Def {
                    removed_ms: Some(r),
                    ..last.clone()
                }
            }
            (None, None) => continue,
        };
        for lost in alive.iter().skip(1) {
            if lost.subnet != winner.subnet {
                out.conflicts.push(format!(
                    "network {name}: node {} created it with subnet {} at {} ms; node {}'s older \
                     one ({}) wins",
                    lost.creator, lost.subnet, lost.created_ms, winner.creator, winner.subnet
                ));
            }
        }
        out.table.insert(name.to_owned(), winner);
    }
    out
}

/// Drops the tombstones older than [`TOMBSTONE_MS`] at `now_ms`.
pub fn forget_old(table: &mut BTreeMap<String, Def>, now_ms: u64) {
    table.retain(|_, d| {
        d.removed_ms
            .is_none_or(|r| now_ms.saturating_sub(r) < TOMBSTONE_MS)
    });
}

/// The networks to serve from a merged table: the live ones, oldest
/// first, without those that overlap an older one, the cluster CIDR or the
/// VIP range, or whose VNI is the default network's (reported in
/// `conflicts`).
pub fn serve(m: &Merged, space: &Space) -> (Vec<Network>, Vec<String>) {
    let mut live: Vec<(&String, &Def)> = m.table.iter().filter(|(_, d)| d.live()).collect();
    live.sort_by(|a, b| (a.1.created_ms, a.0).cmp(&(b.1.created_ms, b.0)));
    let mut out: Vec<Network> = Vec::new();
    let mut conflicts = Vec::new();
    for (name, d) in live {
        let Some(cidr) = d.cidr() else {
            conflicts.push(format!(
                "network {name}: subnet {:?} is not a /16",
                d.subnet
            ));
            continue;
        };
        if let Some(t) = space.clash(cidr, &out) {
            conflicts.push(format!(
                "network {name}: its subnet {cidr} collides with {t}; not served"
            ));
            continue;
        }
        out.push(Network {
            name: name.clone(),
            cidr,
            vni: vni_of(cidr),
        });
    }
    (out, conflicts)
}

pub fn overlaps(a: Cidr, b: Cidr) -> bool {
    let p = a.prefix.min(b.prefix);
    let mask = u32::MAX << (32 - p);
    u32::from(a.base) & mask == u32::from(b.base) & mask
}

/// Why a network cannot be created.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error(
        "{0:?} is not a network name: 1 to 40 characters, lowercase letters, digits, '-', '_' \
         and '.', starting with a letter or digit"
    )]
    Name(String),
    #[error("{0:?} is Docker's or mesh's own network")]
    Reserved(String),
    #[error("network {0} exists (subnet {1})")]
    Exists(String, String),
    #[error("{0}: a network's subnet is a /16 (each node gets a /24 of it)")]
    NotSixteen(String),
    #[error("{0} collides with {1}")]
    Collides(String, String),
    #[error("no free /16 left in 10.{POOL_FIRST}.0.0-10.255.0.0; give one with --subnet")]
    NoSubnet,
    #[error("the cluster has {MAX_NETWORKS} networks besides mesh: remove one first")]
    TooMany,
}

/// A new network `name` (with `subnet`, or the first free /16 of the pool)
/// given the current merged table; the record to add.
pub fn create(
    m: &Merged,
    space: &Space,
    name: &str,
    subnet: Option<&str>,
    creator: &str,
    now_ms: u64,
) -> Result<Def, CreateError> {
    check_name(name)?;
    if let Some(d) = m.table.get(name).filter(|d| d.live()) {
        return Err(CreateError::Exists(name.to_owned(), d.subnet.clone()));
    }
    if m.table.values().filter(|d| d.live()).count() >= MAX_NETWORKS {
        return Err(CreateError::TooMany);
    }
    let (live, _) = serve(m, space);
    let clash = |c: Cidr| space.clash(c, &live);
    let cidr = match subnet {
        Some(s) => {
            let c: Cidr = s
                .parse()
                .map_err(|_| CreateError::NotSixteen(s.to_owned()))?;
            if c.prefix != 16 {
                return Err(CreateError::NotSixteen(s.to_owned()));
            }
            if let Some(t) = clash(c) {
                return Err(CreateError::Collides(c.to_string(), t));
            }
            c
        }
        None => (POOL_FIRST..=255)
            .map(|b| Cidr {
                base: Ipv4Addr::new(10, b as u8, 0, 0),
                prefix: 16,
            })
            .find(|c| clash(*c).is_none())
            .ok_or(CreateError::NoSubnet)?,
    };
    Ok(Def {
        subnet: cidr.to_string(),
        created_ms: now_ms,
        creator: creator.to_owned(),
        removed_ms: None,
    })
}

fn check_name(name: &str) -> Result<(), CreateError> {
    if matches!(name, DEFAULT | "bridge" | "host" | "none" | "ingress") {
        return Err(CreateError::Reserved(name.to_owned()));
    }
    let ok = (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(CreateError::Name(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    fn def(subnet: &str, at: u64, by: &str) -> Def {
        Def {
            subnet: subnet.into(),
            created_ms: at,
            creator: by.into(),
            removed_ms: None,
        }
    }

    fn table(entries: &[(&str, Def)]) -> BTreeMap<String, Def> {
        entries
            .iter()
            .map(|(n, d)| ((*n).to_owned(), d.clone()))
            .collect()
    }

    const CLUSTER: &str = "10.42.0.0/16";
    const VIP: &str = "10.43.0.0/16";

    fn space() -> Space {
        Space {
            cluster: cidr(CLUSTER),
            vip: cidr(VIP),
            cluster_vni: 4242,
        }
    }

    fn serve_m(m: &Merged) -> (Vec<Network>, Vec<String>) {
        serve(m, &space())
    }

    #[test]
    fn the_older_creation_wins_the_same_on_every_node() {
        let a = table(&[("front", def("10.44.0.0/16", 10, "n1"))]);
        let b = table(&[("front", def("10.50.0.0/16", 20, "n2"))]);
        let ab = merge([&a, &b]);
        let ba = merge([&b, &a]);
        assert_eq!(ab.table, ba.table);
        assert_eq!(ab.table["front"].subnet, "10.44.0.0/16");
        assert_eq!(ab.conflicts.len(), 1, "{:?}", ab.conflicts);
        assert!(ab.conflicts[0].contains("n2"), "{:?}", ab.conflicts);
    }

    #[test]
    fn a_removal_kills_what_was_created_before_it_not_after() {
        let created = table(&[("front", def("10.44.0.0/16", 10, "n1"))]);
        let mut dead = def("10.44.0.0/16", 10, "n1");
        dead.removed_ms = Some(30);
        let removed = table(&[("front", dead)]);
        let m = merge([&created, &removed]);
        assert!(!m.table["front"].live());
        assert!(serve_m(&m).0.is_empty());
        // Created again after the removal: live, whoever still has the
        // tombstone.
        let again = table(&[("front", def("10.45.0.0/16", 40, "n2"))]);
        let m = merge([&created, &removed, &again]);
        assert!(m.table["front"].live());
        assert_eq!(m.table["front"].subnet, "10.45.0.0/16");
    }

    #[test]
    fn overlapping_networks_the_younger_is_not_served() {
        let t = table(&[
            ("a", def("10.44.0.0/16", 10, "n1")),
            ("b", def("10.44.0.0/16", 20, "n2")),
            ("c", def("10.42.0.0/16", 5, "n1")),
            ("d", def("10.46.0.0/24", 5, "n1")),
        ]);
        let (nets, conflicts) = serve_m(&merge([&t]));
        let names: Vec<_> = nets.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(conflicts.len(), 3, "{conflicts:?}");
        assert_eq!(nets[0].vni, (10 << 8) | 44);
    }

    #[test]
    fn create_picks_a_free_16_and_refuses_what_would_collide() {
        let t = table(&[("a", def("10.44.0.0/16", 10, "n1"))]);
        let m = merge([&t]);
        let c = |name: &str, subnet: Option<&str>| create(&m, &space(), name, subnet, "n1", 100);
        assert_eq!(c("b", None).expect("created").subnet, "10.45.0.0/16");
        assert_eq!(
            c("b", Some("10.60.0.0/16")).expect("created").subnet,
            "10.60.0.0/16"
        );
        assert!(matches!(c("a", None), Err(CreateError::Exists(..))));
        assert!(matches!(c("mesh", None), Err(CreateError::Reserved(_))));
        assert!(matches!(c("Bad Name", None), Err(CreateError::Name(_))));
        assert!(matches!(
            c("b", Some("10.44.0.0/16")),
            Err(CreateError::Collides(..))
        ));
        assert!(matches!(
            c("b", Some("10.43.0.0/16")),
            Err(CreateError::Collides(..))
        ));
        assert!(matches!(
            c("b", Some("10.61.0.0/24")),
            Err(CreateError::NotSixteen(_))
        ));
        assert!(matches!(
            c("b", Some("nonsense")),
            Err(CreateError::NotSixteen(_))
        ));
    }

    #[test]
    fn sixty_four_live_networks_and_old_tombstones_go() {
        let mut t: BTreeMap<String, Def> = (0..MAX_NETWORKS)
            .map(|i| {
                (
                    format!("n{i}"),
                    def(&format!("10.{}.0.0/16", 100 + i), 1, "a"),
                )
            })
            .collect();
        let m = merge([&t]);
        assert_eq!(serve_m(&m).0.len(), MAX_NETWORKS);
        assert_eq!(
            create(&m, &space(), "one-more", None, "a", 2),
            Err(CreateError::TooMany)
        );
        // A removed one frees its place; its tombstone goes after a week.
        let mut dead = t["n0"].clone();
        dead.removed_ms = Some(10);
        t.insert("n0".into(), dead);
        assert!(create(&merge([&t]), &space(), "one-more", None, "a", 20).is_ok());
        forget_old(&mut t, 10 + TOMBSTONE_MS - 1);
        assert!(t.contains_key("n0"));
        forget_old(&mut t, 10 + TOMBSTONE_MS);
        assert!(!t.contains_key("n0"));
    }

    #[test]
    fn a_node_slice_and_the_vip_slice() {
        let n = Network {
            name: "a".into(),
            cidr: cidr("10.44.0.0/16"),
            vni: vni_of(cidr("10.44.0.0/16")),
        };
        assert_eq!(n.slice(7).to_string(), "10.44.7.0/24");
        assert_eq!(n.vips().to_string(), "10.44.0.0/24");
    }
}

//! Service VIPs, derived from service names so every node agrees without
//! talking.
//!
//! A name hashes (a stable hash, the same on every node and release) to a
//! home address in the VIP CIDR; on collision it probes the next addresses.
//! Rule: services claim addresses in order of age (oldest first, then by
//! name), each taking the first free address of its own probe sequence; a
//! service that already has a VIP keeps it for as long as it exists, so a
//! newcomer can never move it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

/// An IPv4 CIDR such as 10.43.0.0/16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 CIDR like 10.43.0.0/16");
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{s}: prefix must be /8 to /30"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(ip) & !mask != 0 {
            return Err(format!(
                "{s}: host bits are set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(ip) & mask)
            ));
        }
        Ok(Cidr { base: ip, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Cidr {
    /// The first host address: a Docker network's gateway (the bridge's
    /// own address, where the agent serves DNS).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Usable host addresses (without network and broadcast).
    fn hosts(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// The `i`-th address of `name`'s probe sequence.
    fn probe(&self, name: &str, i: u32) -> Ipv4Addr {
        let h = hash(name);
        let off = ((h % self.hosts() as u64) as u32 + i) % self.hosts();
        Ipv4Addr::from(u32::from(self.base) + 1 + off)
    }

    /// The data plane's settings for this VIP range (network order).
    pub fn config(&self) -> mesh_common::lb::Config {
        let mask = u32::MAX << (32 - self.prefix);
        mesh_common::lb::Config {
            vip_be: (u32::from(self.base) & mask).to_be(),
            vip_mask_be: mask.to_be(),
            host_netns_cookie: 0,
            bridge_mask_be: 0,
            tick_ns: 0,
            clock_base_ns: 0,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }
}

/// A stable hash of the name, the same on every node forever.
fn hash(name: &str) -> u64 {
    mesh_common::hash::name(name.as_bytes())
}

/// Assigns a VIP to every service in `services` (name -> age key, smaller
/// = older, e.g. the earliest container creation time), keeping the VIPs in
/// `current` of services that still exist. Services that cannot get one
/// (the CIDR is full) are left out.
pub fn assign<A: Ord>(
    cidr: Cidr,
    services: &BTreeMap<String, A>,
    current: &BTreeMap<String, Ipv4Addr>,
) -> BTreeMap<String, Ipv4Addr> {
    let mut out = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for (name, vip) in current {
        if services.contains_key(name) && cidr.contains(*vip) && taken.insert(*vip) {
            out.insert(name.clone(), *vip);
        }
    }
    let mut by_age: Vec<(&A, &String)> = services.iter().map(|(n, a)| (a, n)).collect();
    by_age.sort();
    for (_, name) in by_age {
        if out.contains_key(name) {
            continue;
        }
        let free = (0..cidr.hosts())
            .map(|i| cidr.probe(name, i))
            .find(|ip| !taken.contains(ip));
        if let Some(ip) = free {
            taken.insert(ip);
            out.insert(name.clone(), ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_plane_skips_the_service_lookup_outside_the_range() {
        let c: Cidr = "10.43.0.0/16".parse().expect("cidr");
        let cfg = c.config();
        let be = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip")).to_be();
        assert!(cfg.may_be_vip(be("10.43.0.10")));
        assert!(cfg.may_be_vip(be("10.43.255.254")));
        assert!(!cfg.may_be_vip(be("10.42.0.2")));
        assert!(!cfg.may_be_vip(be("10.44.0.1")));
        // Not written yet (all zero): every address may be a VIP.
        assert!(mesh_common::lb::Config::default().may_be_vip(be("192.0.2.1")));
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    fn svc(names: &[(&str, i64)]) -> BTreeMap<String, i64> {
        names.iter().map(|(n, a)| (n.to_string(), *a)).collect()
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(cidr("10.43.0.0/16").prefix, 16);
        for bad in [
            "10.43.0.1/16",
            "10.43.0.0",
            "10.43.0.0/31",
            "x/16",
            "10.43.0.0/7",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn same_name_same_vip_everywhere() {
        let c = cidr("10.43.0.0/16");
        let a = assign(c, &svc(&[("whoami", 1), ("web", 2)]), &BTreeMap::new());
        let b = assign(
            c,
            &svc(&[("web", 2), ("whoami", 1), ("db", 3)]),
            &BTreeMap::new(),
        );
        assert_eq!(a["whoami"], b["whoami"]);
        assert_eq!(a["web"], b["web"]);
        assert!(c.contains(a["whoami"]));
        // Not the network or broadcast address.
        for ip in b.values() {
            assert!(!ip.octets().ends_with(&[0, 0]) && *ip != Ipv4Addr::new(10, 43, 255, 255));
        }
    }

    #[test]
    fn collisions_resolve_by_age_and_never_move_an_existing_vip() {
        // A /30 has two hosts: every pair of names collides or not; use a
        // tiny CIDR to force collisions.
        let c = cidr("10.43.0.0/30");
        let names = svc(&[("a", 5), ("b", 1)]);
        let first = assign(c, &names, &BTreeMap::new());
        assert_eq!(first.len(), 2);
        assert_ne!(first["a"], first["b"]);
        // Deterministic: the same inputs give the same answer.
        assert_eq!(assign(c, &names, &BTreeMap::new()), first);
        // The older service ("b") gets its home address.
        assert_eq!(first["b"], c.probe("b", 0));
        // "b" goes away and comes back later (younger than "a"): "a" keeps
        // its address; "b" gets what is left.
        let only_a = assign(c, &svc(&[("a", 5)]), &first);
        assert_eq!(only_a["a"], first["a"]);
        let again = assign(c, &svc(&[("a", 5), ("b", 9)]), &only_a);
        assert_eq!(again["a"], first["a"], "an existing VIP never moves");
        // Full: a third service gets nothing rather than someone's VIP.
        let full = assign(c, &svc(&[("a", 5), ("b", 9), ("c", 10)]), &again);
        assert_eq!(full.len(), 2);
        assert!(!full.contains_key("c"));
    }
}

//! Service-name DNS: `NAME` -> VIP, `tasks.NAME` -> every backend, SRV for
//! ports; every other name forwarded to the upstream resolvers.
//!
//! Names (case-insensitive; `<domain>` defaults to `mesh`):
//!
//! | query | answer |
//! | --- | --- |
//! | `NAME`, `NAME.<domain>` A | the VIP (TTL `--dns-vip-ttl`, 60 s) |
//! | `tasks.NAME`, `tasks.NAME.<domain>` A | every live backend (TTL `--dns-tasks-ttl`, 5 s) |
//! | `_NAME._tcp`, `_NAME._udp` (+ `.<domain>`) SRV | one record per VIP port: `0 0 PORT NAME.<domain>.` (RFC 2782 `_Service._Proto.Name`) |
//! | a known name, another type (AAAA...) | NOERROR, no answer |
//! | `<domain>` SOA, NS | the zone's SOA, `ns.<domain>.` |
//! | `D.C.B.A.in-addr.arpa` PTR, A.B.C.D a VIP / a task | `NAME.<domain>.` / `tasks.NAME.<domain>.` |
//! | unknown single labels, `tasks.X`, anything under `<domain>` | NXDOMAIN |
//! | everything else | forwarded upstream (UDP; TCP when the answer is truncated) |
//!
//! A query with EDNS gets an OPT back (RFC 6891), EDNS version 1 or more
//! BADVERS; opcodes other than QUERY get NOTIMP.
//!
//! The zone is replaced by the reconciler after every pass; queries read
//! the current one. Malformed packets are dropped and counted; answers too
//! big for the client's UDP size are truncated (TC) and complete over TCP.
//!
//! Layout (hickory's server/zone split): `server.rs` runs the UDP and TCP
//! loops and counts malformed packets, `zone.rs` answers from the zone,
//! `forward.rs` asks the upstreams, `cache.rs` keeps the UDP answers given
//! from memory as bytes, for the same query again.

mod batch;
mod cache;
mod forward;
mod server;
mod zone;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Mutex, RwLock, RwLockReadGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use hickory_proto::rr::RecordType;

use crate::labels::Proto;

pub use self::{server::serve, zone::Handler};

/// One service as DNS sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneService {
    pub vip: Option<Ipv4Addr>,
    /// VIP ports.
    pub ports: Vec<(u16, Proto)>,
    /// Live backends (active ones; draining and unhealthy are left out).
    pub tasks: Vec<Ipv4Addr>,
}

/// Service name (lower case) -> what to answer.
pub type Zone = BTreeMap<String, ZoneService>;

/// The zone the reconciler publishes and the server answers from, with a
/// generation that moves whenever it changes: an answer kept from one
/// generation is never given in another.
#[derive(Default)]
pub struct SharedZone {
    zone: RwLock<Zone>,
    generation: AtomicU64,
}

impl SharedZone {
    pub fn new(zone: Zone) -> Self {
        SharedZone {
            zone: RwLock::new(zone),
            generation: AtomicU64::new(0),
        }
    }

    /// The zone now.
    pub fn read(&self) -> RwLockReadGuard<'_, Zone> {
        self.zone.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the zone; the generation moves if it changed.
    pub fn replace(&self, zone: Zone) {
        let mut z = self.zone.write().unwrap_or_else(|p| p.into_inner());
        if *z != zone {
            *z = zone;
            self.moved();
        }
    }

    /// Changes the zone in place; the generation moves.
    pub fn update(&self, change: impl FnOnce(&mut Zone)) {
        let mut z = self.zone.write().unwrap_or_else(|p| p.into_inner());
        change(&mut z);
        self.moved();
    }

    /// Called with the write lock held, after the write: a reader that
    /// sees the new generation sees the new zone.
    fn moved(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The zone's generation. Read it before answering from the zone: an
    /// answer is then kept under a generation no newer than its zone.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The mesh domain, without dots at the ends ("mesh").
    pub domain: String,
    pub vip_ttl: u32,
    pub tasks_ttl: u32,
    pub upstreams: Vec<SocketAddr>,
    /// Who may ask (besides loopback and this host's own addresses).
    pub clients: Clients,
}

/// Who the server answers. Loopback and the host's own addresses always;
/// then anyone, or the networks given (by default the cluster CIDR: the
/// containers). A query from elsewhere (the underlay) is dropped unanswered
/// and counted: the server is no open resolver and lists no services to
/// strangers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clients {
    Any,
    Only(Vec<Net>),
}

/// An IPv4 network, `A.B.C.D/N` (N 0 to 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Net {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.base) & mask
    }
}

impl std::str::FromStr for Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network like 192.168.1.0/24");
        let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
        let base: Ipv4Addr = ip.trim().parse().map_err(|_| bad())?;
        let prefix: u8 = len.trim().parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Net { base, prefix })
    }
}

/// Whether `src` may ask, `local` being this host's addresses and
/// `engine` the subnets of the engine's other networks (its default
/// bridge, user-defined bridges: their containers use this host's DNS too).
pub fn allowed(
    clients: &Clients,
    local: &[std::net::IpAddr],
    engine: &[Net],
    src: std::net::IpAddr,
) -> bool {
    if src.is_loopback() || local.contains(&src) {
        return true;
    }
    match (clients, src) {
        (Clients::Any, _) => true,
        (Clients::Only(nets), std::net::IpAddr::V4(v4)) => {
            nets.iter().chain(engine).any(|n| n.contains(v4))
        }
        (Clients::Only(_), std::net::IpAddr::V6(_)) => false,
    }
}

/// Query counters, for /metrics.
#[derive(Default)]
pub struct DnsStats {
    /// (query type, result) -> count; the type is one of a fixed set.
    pub queries: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub malformed: AtomicU64,
    /// TCP clients closed at accept because [`MAX_TCP_CLIENTS`] were served.
    pub tcp_refused: AtomicU64,
    /// Queries (and TCP connections) from addresses not allowed to ask.
    pub refused_source: AtomicU64,
    /// Queries answered with the bytes kept from the same query before
    /// (also counted in `queries`).
    pub kept_answers: AtomicU64,
}

impl DnsStats {
    pub(super) fn count(&self, qtype: RecordType, result: &'static str) {
        let mut q = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        *q.entry((qtype_label(qtype), result)).or_default() += 1;
    }
}

/// Forwarded queries in flight at most: beyond, a query gets SERVFAIL at
/// once (counted as `overload`), so a slow or dead upstream under load
/// costs a fixed amount of sockets and memory.
pub const MAX_FORWARDS: usize = 256;
/// TCP clients served at once; more are closed at accept.
pub const MAX_TCP_CLIENTS: usize = 128;

/// The upstreams that are not this server itself (`listen`; when it
/// listens on every address, any of `local` on its port): forwarding to
/// ourselves loops until every file descriptor is used (seen in the lab,
/// where the engine's DNS, the agent's listen address and the agent's
/// resolv.conf name the same address). Returns (kept, dropped).
pub fn without_self(
    upstreams: &[SocketAddr],
    listen: SocketAddr,
    local: &[std::net::IpAddr],
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    upstreams.iter().partition(|u| {
        let same_port = u.port() == listen.port();
        let is_self =
            **u == listen || (same_port && listen.ip().is_unspecified() && local.contains(&u.ip()));
        !is_self
    })
}

/// The query types /metrics names; others count as "other", so the label
/// has a bounded number of values.
pub(super) fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::TXT => "TXT",
        RecordType::MX => "MX",
        RecordType::CNAME => "CNAME",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// The nameservers in a resolv.conf, on port 53; `skip` (our own address)
/// left out.
pub fn upstreams_from_resolv_conf(text: &str, skip: std::net::IpAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != skip)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{
        zone::{Target, classify},
        *,
    };

    #[test]
    fn names_map_to_targets() {
        let d = "mesh";
        assert_eq!(classify("whoami.", d), Target::Service("whoami".into()));
        assert_eq!(
            classify("whoami.mesh.", d),
            Target::Service("whoami".into())
        );
        assert_eq!(classify("tasks.whoami.", d), Target::Tasks("whoami".into()));
        assert_eq!(
            classify("tasks.whoami.mesh", d),
            Target::Tasks("whoami".into())
        );
        assert_eq!(
            classify("_whoami._tcp.mesh.", d),
            Target::Srv("whoami".into(), Proto::Tcp)
        );
        assert_eq!(
            classify("_dns._udp.", d),
            Target::Srv("dns".into(), Proto::Udp)
        );
        assert_eq!(classify("a.b.mesh.", d), Target::Unknown);
        assert_eq!(classify("mesh.", d), Target::Apex);
        assert_eq!(
            classify("10.0.43.10.in-addr.arpa.", d),
            Target::Reverse(Ipv4Addr::new(10, 43, 0, 10))
        );
        assert_eq!(classify("0.43.10.in-addr.arpa.", d), Target::Forward);
        assert_eq!(classify("example.com.", d), Target::Forward);
        assert_eq!(classify("tasks.example.com.", d), Target::Forward);
    }

    #[test]
    fn the_server_itself_is_never_an_upstream() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let ups = [
            a("192.168.100.1:53"),
            a("10.0.0.2:53"),
            a("192.168.100.1:5353"),
        ];
        let (kept, dropped) = without_self(&ups, a("192.168.100.1:53"), &[]);
        assert_eq!(kept, [a("10.0.0.2:53"), a("192.168.100.1:5353")]);
        assert_eq!(dropped, [a("192.168.100.1:53")]);
        // Listening on every address: any local address on our port.
        let local = ["192.168.100.1".parse().expect("ip")];
        let (kept, _) = without_self(&ups, a("0.0.0.0:53"), &local);
        assert_eq!(kept, [a("10.0.0.2:53"), a("192.168.100.1:5353")]);
        assert_eq!(qtype_label(RecordType::A), "A");
        assert_eq!(qtype_label(RecordType::Unknown(65000)), "other");
    }

    #[test]
    fn only_allowed_clients_are_answered() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let nets = Clients::Only(vec!["10.42.0.0/16".parse().expect("net")]);
        let local = [ip("192.168.100.1")];
        let engine = ["172.17.0.0/16".parse().expect("net")];
        for (src, ok) in [
            ("127.0.0.1", true),
            ("192.168.100.1", true),
            ("10.42.3.9", true),
            ("172.17.0.2", true),
            ("172.18.0.2", false),
            ("192.168.100.200", false),
            ("::1", true),
            ("fd00::1", false),
        ] {
            assert_eq!(allowed(&nets, &local, &engine, ip(src)), ok, "{src}");
        }
        assert!(allowed(&Clients::Any, &local, &[], ip("192.168.100.200")));
        assert_eq!(
            "0.0.0.0/0"
                .parse::<Net>()
                .map(|n| n.contains(Ipv4Addr::new(1, 2, 3, 4))),
            Ok(true)
        );
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert_eq!("10.1.2.3".parse::<Net>().map(|n| n.prefix), Ok(32));
    }

    #[test]
    fn resolv_conf() {
        let text = "# x\nnameserver 10.0.0.2\nnameserver 10.42.0.1\nsearch lan\nnameserver ::1\nnameserver bogus\n";
        let got = upstreams_from_resolv_conf(text, "10.42.0.1".parse().expect("ip"));
        assert_eq!(
            got,
            vec![
                "10.0.0.2:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
    }
}

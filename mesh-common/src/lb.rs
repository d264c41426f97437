//! Service load balancing: services, backends, Maglev rings.
//!
//! A service is `VIP:port/proto`. Its backends are numbered by the agent
//! (ids 1.., 0 = none). Each service has a Maglev ring: an array whose slot 0
//! holds the ring size M (a prime) and slots 1..=M hold backend ids. The
//! kernel picks `ring[1 + flow_hash % M]`: one hash, one array lookup.

use crate::hash::mix64;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Backend id meaning "no backend".
pub const NO_BACKEND: u32 = 0;

/// Key of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of this service's ring in the Maglev map-of-maps and of its
    /// counters in the per-service stats array.
    pub id: u32,
    /// `SERVICE_F_*` flags.
    pub flags: u32,
}

/// Settings of the whole data plane (`MESH_CONFIG`, slot 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The VIP range (network order): an address outside it is no service,
    /// so a packet to it skips the service lookup. A mask of 0 (not written
    /// yet) makes every address a candidate.
    pub vip_be: u32,
    pub vip_mask_be: u32,
    /// The host's network namespace (its cookie): socket-level balancing
    /// acts only for sockets there. 0: off.
    pub host_netns_cookie: u64,
    /// The widest mask of Docker's other bridge networks (network order):
    /// a container there can only be calling its gateway if source and
    /// destination agree under it, so anything else skips the bridge
    /// lookup. 0 (not written yet): every packet is looked up.
    pub bridge_mask_be: u32,
    /// The conntrack clock (`clock.rs` in the agent): ns per jiffy, and
    /// what is taken from `jiffies * tick_ns` to read CLOCK_MONOTONIC (as
    /// it was when the agent measured the tick). 0: not measured yet; the
    /// programs read the monotonic clock itself (a helper call).
    pub tick_ns: u32,
    pub clock_base_ns: u64,
}

impl Config {
    /// Whether `ip_be` may be a VIP.
    #[inline(always)]
    pub const fn may_be_vip(&self, ip_be: u32) -> bool {
        ip_be & self.vip_mask_be == self.vip_be
    }
}

/// Backend states (a `u8` in [`Backend`]).
pub mod backend_state {
    /// Takes new flows (it is in the Maglev ring).
    pub const ACTIVE: u8 = 1;
    /// No new flows (not in the ring); existing flows continue.
    pub const DRAINING: u8 = 2;
}

/// Value of the backends array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub ip_be: u32,
    pub port_be: u16,
    /// `backend_state::*`; 0 = slot unused.
    pub state: u8,
    pub _pad: u8,
    /// Host-side veth of a local backend (redirect target); 0 = let the
    /// stack route it.
    pub ifindex: u32,
    /// The backend's MAC, for a local redirect.
    pub mac: [u8; 6],
    pub _pad2: [u8; 2],
    /// The service this backend belongs to (user space bookkeeping; lets a
    /// restarted agent rebuild its state from the pinned maps).
    pub service_id: u32,
}

/// Key of the published-ports map: a port this node answers on its
/// underlay address (the routing mesh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishedKey {
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the published-ports map: the service (its VIP port's id, so
/// the same Maglev ring and backends) that answers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub service_id: u32,
}

/// Where a socket balanced at connect asked to go (`MESH_SOCK_ORIG`, by
/// socket cookie): what `getpeername` reports instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// A datagram socket's peer as the kernel sees it after balancing
/// (`MESH_SOCK_REV`): the socket and the backend (or node) its datagrams
/// were sent to. Its value, a [`SockOrig`], is what `recvmsg` reports as
/// the source of the answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    pub cookie: u64,
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// The flow hash of a flow to a published port: the client's address and
/// port, the published port and the protocol, but not which node's
/// address it reached, so every node picks the same backend for it.
#[inline(always)]
pub fn published_hash(src_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    flow_hash(src_be, 0, sport_be, dport_be, proto)
}

/// Per-service counters (per-CPU, indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Largest Maglev ring (a prime). Bounds kernel memory per service.
pub const MAGLEV_MAX_RING: u32 = 65_521;
/// Slots per backend the ring aims for, at least.
pub const MAGLEV_SLOTS_PER_BACKEND: u32 = 100;

/// The flow hash the Maglev pick uses: the 5-tuple, mixed so every input bit
/// reaches every output bit. Shared by kernel and user space, so tests and
/// `meshctl` can say which backend a flow gets.
#[inline(always)]
pub fn flow_hash(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let a = mix64(((src_be as u64) << 32) | dst_be as u64);
    let b = mix64(((sport_be as u64) << 32) | ((dport_be as u64) << 8) | proto as u64);
    mix64(a ^ b.rotate_left(17)) as u32
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<Service>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24);
const _: () = assert!(core::mem::size_of::<PublishedKey>() == 4);
const _: () = assert!(core::mem::size_of::<Published>() == 4);
const _: () = assert!(core::mem::size_of::<Config>() == 32);
const _: () = assert!(core::mem::size_of::<SockOrig>() == 8);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integer fields, explicit padding: every bit
    // pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::PublishedKey {}
    unsafe impl aya::Pod for super::Published {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SockOrig {}
    unsafe impl aya::Pod for super::SockRevKey {}
}

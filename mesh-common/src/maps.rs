//! The inventory of the data plane's maps: one row per map, from which the
//! agent's loader pins, a restarted agent adopts, `meshctl maps` lists and
//! the inventory test checks the object. Adding a map is its `#[map]` in
//! mesh-ebpf/src/maps.rs plus one row in [`ALL`]; the test fails when the
//! object has a map this table does not name (or names one it lacks).
//!
//! Every map is pinned (under the agent's `--bpffs-dir`): a map that is not
//! would be recreated empty by a restarted agent while the programs it
//! adopted (pinned links) still read the old one.

/// What kind of BPF map a row is (checked against the object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    Hash,
    LruHash,
    PerCpuArray,
    ArrayOfMaps,
    RingBuf,
}

impl MapKind {
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Array => "array",
            MapKind::Hash => "hash",
            MapKind::LruHash => "lru_hash",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::ArrayOfMaps => "array_of_maps",
            MapKind::RingBuf => "ringbuf",
        }
    }
}

/// Who writes a map's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The agent writes, the kernel only reads.
    Agent,
    /// The kernel writes (conntrack, counters); user space reads.
    Kernel,
}

/// One map of the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// Its name in the object, and its pin's file name.
    pub name: &'static str,
    pub kind: MapKind,
    /// The object's default size.
    pub max_entries: u32,
    /// Pinned under the bpffs directory (adopted by a restarted agent).
    pub pinned: bool,
    pub writer: Writer,
    /// Key -> value, for `meshctl maps` and the docs.
    pub what: &'static str,
}

/// Services (and service ids: 0..MAX_SERVICES).
pub const MAX_SERVICES: u32 = 16_384;
/// Backend ids 1..MAX_BACKENDS (0 = none): room for 10,000 services with
/// 10 backends each and then some.
pub const MAX_BACKENDS: u32 = 131_072;
/// Nodes in a cluster.
pub const MAX_NODES: u32 = 1024;
/// Other nodes' slices of every network (`MESH_NODES`): nodes times
/// networks, e.g. 256 nodes on 64 networks.
pub const MAX_SLICES: u32 = 16_384;
/// Containers on one node.
pub const MAX_LOCAL_EPS: u32 = 4096;
/// Conntrack entries of confirmed flows (two per flow).
pub const CT_ENTRIES: u32 = 262_144;
/// Conntrack entries of flows not confirmed yet (two per flow): what a
/// flood of new flows can fill, apart from the confirmed ones.
pub const CT_NEW_ENTRIES: u32 = 65_536;
/// Veth interface indexes the anti-spoofing fast path covers (an array
/// slot each); a veth with a larger index is checked through
/// [`LOCAL_EPS`] alone.
pub const VETH_SLOTS: u32 = 65_536;
/// Sockets balanced at connect whose original destination is remembered.
pub const SOCK_ORIG_ENTRIES: u32 = 65_536;
/// Published ports (routing mesh) on one node.
pub const MAX_PUBLISHED: u32 = 4096;
/// Docker bridge networks (other than mesh's) on one node.
pub const MAX_BRIDGES: u32 = 256;
/// Fragmented datagrams in flight.
pub const FRAG_ENTRIES: u32 = 8192;

const fn def(
    name: &'static str,
    kind: MapKind,
    max_entries: u32,
    writer: Writer,
    what: &'static str,
) -> MapDef {
    MapDef {
        name,
        kind,
        max_entries,
        pinned: true,
        writer,
        what,
    }
}

use MapKind::{Array, ArrayOfMaps, Hash, LruHash, PerCpuArray, RingBuf};
use Writer::{Agent, Kernel};

/// Per-CPU packet counters, indexed by [`crate::stats::Stat`].
pub const STATS: MapDef = def(
    "MESH_STATS",
    PerCpuArray,
    crate::stats::STATS_SLOTS,
    Kernel,
    "Stat index -> packets",
);
/// `ServiceKey -> Service`.
pub const SERVICES: MapDef = def(
    "MESH_SERVICES",
    Hash,
    MAX_SERVICES,
    Agent,
    "ServiceKey{vip, port, proto} -> Service{id, flags}",
);
/// Array of maps, indexed by service id: each inner map is a Maglev ring.
pub const MAGLEV: MapDef = def(
    "MESH_MAGLEV",
    ArrayOfMaps,
    MAX_SERVICES,
    Agent,
    "service id -> ring [M, backend id x M]",
);
/// Array `backend id -> Backend`.
pub const BACKENDS: MapDef = def(
    "MESH_BACKENDS",
    Array,
    MAX_BACKENDS,
    Agent,
    "backend id -> Backend{ip, port, state, ifindex, mac}",
);
/// LRU hash `CtKey -> CtEntry`: confirmed flows.
pub const CONNTRACK: MapDef = def(
    "MESH_CT",
    LruHash,
    CT_ENTRIES,
    Kernel,
    "CtKey{5-tuple, dir} -> CtEntry{backend, service, nat ip/port, flags, last seen, created}: confirmed flows",
);
/// LRU hash `CtKey -> CtEntry`: flows not confirmed yet.
pub const CONNTRACK_NEW: MapDef = def(
    "MESH_CT_NEW",
    LruHash,
    CT_NEW_ENTRIES,
    Kernel,
    "as MESH_CT: new flows until the backend answered and the client went on",
);
/// LRU hash `FragKey -> FragEntry`: the translation of a fragmented
/// datagram's first fragment, for the others.
pub const FRAGS: MapDef = def(
    "MESH_FRAGS",
    LruHash,
    FRAG_ENTRIES,
    Kernel,
    "FragKey{src, dst, ip id, proto} -> FragEntry{nat ip, backend}",
);
/// Per-CPU array `service id -> ServiceStats`.
pub const SERVICE_STATS: MapDef = def(
    "MESH_SVC_STATS",
    PerCpuArray,
    MAX_SERVICES,
    Kernel,
    "service id -> packets, bytes, new flows",
);
/// Array of one `LocalNode`: this node's overlay settings.
pub const LOCAL_NODE: MapDef = def(
    "MESH_LOCAL_NODE",
    Array,
    1,
    Agent,
    "0 -> LocalNode{subnet, cluster, underlay ip/ifindex/mac, vni, enabled, mss, host ip/ifindex/mac}",
);
/// Hash `/24 (network order) -> Node`: the other nodes' slices of every
/// network.
pub const NODES: MapDef = def(
    "MESH_NODES",
    Hash,
    MAX_SLICES,
    Agent,
    "slice /24 -> Node{underlay ip, inner mac, vni}: the node it lives on",
);
/// Array `/16 (an address's top 16 bits) -> VNI | NET16_NODES`: the
/// overlay networks besides `mesh`, and where nodes' addresses lie
/// (`crate::tunnel::net16`).
pub const NETS: MapDef = def(
    "MESH_NETS",
    Array,
    crate::tunnel::NET16_SLOTS,
    Agent,
    "/16 -> the VNI of the overlay network there (besides mesh) | NET16_NODES if a node's address is there",
);
/// Hash `container IP (network order) -> LocalEndpoint`: this node's containers.
pub const LOCAL_EPS: MapDef = def(
    "MESH_LOCAL_EPS",
    Hash,
    MAX_LOCAL_EPS,
    Agent,
    "container ip -> LocalEndpoint{ifindex, mac}",
);
/// Array `veth ifindex -> its container's IP (network order, 0 = none)`:
/// the anti-spoofing check's one-step path (a hash lookup costs 25 ns a
/// packet, an array slot next to nothing). The same facts as
/// [`LOCAL_EPS`], indexed the other way.
pub const VETH_SRC: MapDef = def(
    "MESH_VETH_SRC",
    Array,
    VETH_SLOTS,
    Agent,
    "veth ifindex -> VethSrc{container ip, vni}: anti-spoofing, isolation",
);
/// Array `port / 64 -> 64 bits (port % 64)`: the ports backends have had.
/// A container's new direct flow looks in conntrack for a finished VIP
/// flow's reverse entry with its tuple only when its destination port is
/// one of them (two hash lookups saved on every other UDP datagram and
/// TCP SYN). Bits are only ever set: a stale one costs the lookup, never a
/// wrong answer.
pub const BACKEND_PORTS: MapDef = def(
    "MESH_BACKEND_PORTS",
    Array,
    BACKEND_PORT_WORDS,
    Agent,
    "port / 64 -> bit (port % 64) set if a backend has had that port",
);
/// 64-bit words of [`BACKEND_PORTS`]: one bit per port.
pub const BACKEND_PORT_WORDS: u32 = 65_536 / 64;
/// Array of one `Config`: settings of the whole data plane.
pub const CONFIG: MapDef = def("MESH_CONFIG", Array, 1, Agent, "0 -> Config{vip range}");

/// LRU hash `socket cookie -> SockOrig`: where a socket balanced at connect
/// asked to go (`getpeername` reports it).
pub const SOCK_ORIG: MapDef = def(
    "MESH_SOCK_ORIG",
    LruHash,
    SOCK_ORIG_ENTRIES,
    Kernel,
    "socket cookie -> SockOrig{ip, port}: what a balanced socket asked for",
);

/// LRU hash `SockRevKey -> SockOrig`: a datagram socket balanced at
/// connect or sendmsg: the address its answers are reported from.
pub const SOCK_REV: MapDef = def(
    "MESH_SOCK_REV",
    LruHash,
    SOCK_ORIG_ENTRIES,
    Kernel,
    "SockRevKey{socket cookie, backend ip, port} -> SockOrig{ip, port}: what a balanced datagram socket's answers come from",
);

/// Hash `network-namespace cookie -> 1`: the namespaces of this node's
/// containers whose connects and datagrams to a VIP are balanced at the
/// socket (`mesh-ebpf/src/sock.rs`), so their packets need no translation.
pub const SOCK_NETNS: MapDef = def(
    "MESH_SOCK_NETNS",
    Hash,
    MAX_LOCAL_EPS,
    Agent,
    "netns cookie -> 1: containers whose VIP connects are balanced at the socket",
);

/// Hash `underlay IP (network order) -> its /24 (network order)`: the
/// addresses VXLAN is accepted from.
pub const PEERS: MapDef = def(
    "MESH_PEERS",
    Hash,
    MAX_NODES,
    Agent,
    "node underlay ip -> its /24",
);

/// Hash `PublishedKey -> Published`: the routing mesh's ports.
pub const PUBLISHED: MapDef = def(
    "MESH_PUBLISHED",
    Hash,
    MAX_PUBLISHED,
    Agent,
    "PublishedKey{port, proto} -> Published{service id}",
);

/// Hash `bridge ifindex -> Bridge`: Docker's other bridge networks, whose
/// containers may call published ports.
pub const BRIDGES: MapDef = def(
    "MESH_BRIDGES",
    Hash,
    MAX_BRIDGES,
    Agent,
    "bridge ifindex -> Bridge{subnet, mask, gateway}: Docker's other networks",
);

/// Hash `VIP -> 0`: every service's VIP, so a ping to one is answered.
pub const VIPS: MapDef = def(
    "MESH_VIPS",
    Hash,
    MAX_SERVICES,
    Agent,
    "VIP -> 0: the addresses that answer ICMP echo",
);

/// The ring buffer's size in bytes (a power of two of whole pages): 6,500
/// events of 40 bytes (and an 8-byte header each).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Ring buffer of [`crate::monitor::Event`]s: drops and new flows while a
/// `meshctl monitor` listens.
pub const EVENTS: MapDef = def(
    "MESH_EVENTS",
    RingBuf,
    EVENTS_BYTES,
    Kernel,
    "ring buffer of Event{drop or new flow, addresses, reason or backend}: meshctl monitor",
);

/// Per-CPU array `0 -> Budget`: whether a monitor listens, the events'
/// rate limit and losses, the event being built.
pub const MONITOR: MapDef = def(
    "MESH_MONITOR",
    PerCpuArray,
    1,
    Agent,
    "0 -> Budget{on, second, events written, lost, event being built}: meshctl monitor, per CPU",
);

/// Every map of the object, in the order `meshctl maps` lists them.
pub const ALL: [MapDef; 24] = [
    STATS,
    SERVICES,
    VIPS,
    PUBLISHED,
    BACKENDS,
    BACKEND_PORTS,
    MAGLEV,
    CONNTRACK,
    CONNTRACK_NEW,
    FRAGS,
    SERVICE_STATS,
    LOCAL_NODE,
    NODES,
    NETS,
    PEERS,
    LOCAL_EPS,
    VETH_SRC,
    CONFIG,
    SOCK_ORIG,
    SOCK_REV,
    SOCK_NETNS,
    BRIDGES,
    EVENTS,
    MONITOR,
];

/// The row of map `name`, if the inventory has one.
pub fn by_name(name: &str) -> Option<&'static MapDef> {
    ALL.iter().find(|d| d.name.as_bytes() == name.as_bytes())
}

/// `BPF_F_NO_COMMON_LRU`: an LRU map with one list per CPU, whose inserts
/// take no shared lock. Given to `MESH_CT_NEW`, where every new flow
/// inserts two entries (measured: a new flow 980 -> 900 ns); each CPU's
/// list then holds its share of the entries, which suits flows that live
/// there only until they are confirmed.
pub const BPF_F_NO_COMMON_LRU: u32 = 0x2;
/// `BPF_F_INNER_MAP`: inner maps of one outer map may differ in size.
pub const BPF_F_INNER_MAP: u32 = 0x1000;
/// `BPF_F_MMAPABLE`: user space writes a whole ring with one memcpy.
pub const BPF_F_MMAPABLE: u32 = 0x400;
/// Flags of every Maglev ring (the inner maps of [`MAGLEV`]); the template
/// in the object and every real ring must have the same.
pub const RING_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

const _: () = {
    // Names are unique.
    let mut i = 0;
    while i < ALL.len() {
        let mut j = i + 1;
        while j < ALL.len() {
            let (a, b) = (ALL[i].name.as_bytes(), ALL[j].name.as_bytes());
            let mut same = a.len() == b.len();
            let mut k = 0;
            while same && k < a.len() {
                same = a[k] == b[k];
                k += 1;
            }
            assert!(!same, "two maps with one name");
            j += 1;
        }
        i += 1;
    }
};

//! Every map of the data plane. User space finds them by these names
//! (constants in `mesh_common::maps`) and pins them under its bpffs directory.
//! Map values are written by the agent; the kernel writes only conntrack and
//! counters.

use aya_ebpf::{
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use mesh_common::{
    ct::{CtEntry, CtKey, FragEntry, FragKey},
    lb::{
        Backend, Config, Published, PublishedKey, Service, ServiceKey, ServiceStats, SockOrig,
        SockRevKey,
    },
    maps::{
        BACKEND_PORT_WORDS, BPF_F_NO_COMMON_LRU, CT_ENTRIES, CT_NEW_ENTRIES, EVENTS_BYTES,
        FRAG_ENTRIES, MAX_BACKENDS, MAX_BRIDGES, MAX_LOCAL_EPS, MAX_NODES, MAX_PUBLISHED,
        MAX_SERVICES, MAX_SLICES, RING_FLAGS, SOCK_ORIG_ENTRIES, VETH_SLOTS,
    },
    monitor::Budget,
    stats::STATS_SLOTS,
    tunnel::{Bridge, LocalEndpoint, LocalNode, NET16_SLOTS, Node, VethSrc},
};

/// Packet counters, one slot per `mesh_common::stats::Stat`.
#[map(name = "MESH_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// VIP:port/proto -> service.
#[map(name = "MESH_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Published port/proto -> service (the routing mesh).
#[map(name = "MESH_PUBLISHED")]
pub static PUBLISHED: HashMap<PublishedKey, Published> =
    HashMap::with_max_entries(MAX_PUBLISHED, 0);

/// Backend id -> backend (id 0 is never used).
#[map(name = "MESH_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Conntrack: forward and reverse entry of every confirmed flow.
#[map(name = "MESH_CT")]
pub static CT: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(CT_ENTRIES, 0);

/// Conntrack: flows not confirmed yet (see `mesh_common::ct`).
#[map(name = "MESH_CT_NEW")]
pub static CT_NEW: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(CT_NEW_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Per-service counters, indexed by service id.
#[map(name = "MESH_SVC_STATS")]
pub static SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// The inner map of [`MESH_MAGLEV`]: slot 0 = ring size M, 1..=M = backend
/// ids. BPF_F_INNER_MAP lets every service's ring have its own size;
/// BPF_F_MMAPABLE lets user space fill it with one copy.
pub type Ring = BtfArray<u32, 1, { RING_FLAGS as usize }>;

/// Service id -> that service's Maglev ring. Replacing a ring is one update
/// of this outer slot, so the kernel never sees half a table.
#[btf_map]
pub static MESH_MAGLEV: ArrayOfMaps<Ring, { MAX_SERVICES as usize }> = ArrayOfMaps::new();

/// This node's overlay settings (slot 0).
#[map(name = "MESH_LOCAL_NODE")]
pub static LOCAL_NODE: Array<LocalNode> = Array::with_max_entries(1, 0);

/// The other nodes' slices of every network, by /24.
#[map(name = "MESH_NODES")]
pub static NODES: HashMap<u32, Node> = HashMap::with_max_entries(MAX_SLICES, 0);

/// The overlay networks besides `mesh` and the /16s of nodes' addresses:
/// /16 -> VNI | `NET16_NODES`.
#[map(name = "MESH_NETS")]
pub static NETS: Array<u32> = Array::with_max_entries(NET16_SLOTS, 0);

/// This node's containers, by address.
#[map(name = "MESH_LOCAL_EPS")]
pub static LOCAL_EPS: HashMap<u32, LocalEndpoint> = HashMap::with_max_entries(MAX_LOCAL_EPS, 0);

/// The ports backends have had, a bit each (`mesh_common::maps::BACKEND_PORTS`).
#[map(name = "MESH_BACKEND_PORTS")]
pub static BACKEND_PORTS: Array<u64> = Array::with_max_entries(BACKEND_PORT_WORDS, 0);

/// Veth ifindex -> its container's address: the anti-spoofing check in
/// one array slot (`MESH_LOCAL_EPS` covers what this does not).
#[map(name = "MESH_VETH_SRC")]
pub static VETH_SRC: Array<VethSrc> = Array::with_max_entries(VETH_SLOTS, 0);

/// Socket cookie -> where a socket balanced at connect asked to go.
#[map(name = "MESH_SOCK_ORIG")]
pub static SOCK_ORIG: LruHashMap<u64, SockOrig> =
    LruHashMap::with_max_entries(SOCK_ORIG_ENTRIES, 0);

/// A balanced datagram socket and its backend -> where its answers are
/// reported from.
#[map(name = "MESH_SOCK_REV")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockOrig> =
    LruHashMap::with_max_entries(SOCK_ORIG_ENTRIES, 0);

/// Container network namespaces balanced at the socket (cookie -> 1).
#[map(name = "MESH_SOCK_NETNS")]
pub static SOCK_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_LOCAL_EPS, 0);

/// Settings of the whole data plane (slot 0).
#[map(name = "MESH_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// The other nodes by underlay address: VXLAN is accepted only from these.
#[map(name = "MESH_PEERS")]
pub static PEERS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NODES, 0);

/// Fragmented datagrams: the first fragment's translation, for the others.
#[map(name = "MESH_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragEntry> = LruHashMap::with_max_entries(FRAG_ENTRIES, 0);

/// Every service's VIP (a ping to one is answered).
#[map(name = "MESH_VIPS")]
pub static VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Docker's other bridge networks by their bridge's ifindex.
#[map(name = "MESH_BRIDGES")]
pub static BRIDGES: HashMap<u32, Bridge> = HashMap::with_max_entries(MAX_BRIDGES, 0);

/// Drops and new flows for a listening `meshctl monitor`.
#[map(name = "MESH_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per CPU: whether a monitor listens, and the events' rate limit.
#[map(name = "MESH_MONITOR")]
pub static MONITOR: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

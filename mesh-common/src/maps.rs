//! Map names (as pinned under the bpffs directory) and default sizes.
//! Sizes are the object's defaults; the loader may override them.

/// Per-CPU packet counters, indexed by [`crate::stats::Stat`].
pub const STATS: &str = "MESH_STATS";
/// `ServiceKey -> Service`.
pub const SERVICES: &str = "MESH_SERVICES";
/// Array of maps, indexed by service id: each inner map is a Maglev ring.
pub const MAGLEV: &str = "MESH_MAGLEV";
/// Array `backend id -> Backend`.
pub const BACKENDS: &str = "MESH_BACKENDS";
/// LRU hash `CtKey -> CtEntry`.
pub const CONNTRACK: &str = "MESH_CT";
/// Per-CPU array `service id -> ServiceStats`.
pub const SERVICE_STATS: &str = "MESH_SVC_STATS";

/// Array of one `LocalNode`: this node's overlay settings.
pub const LOCAL_NODE: &str = "MESH_LOCAL_NODE";
/// Hash `/24 (network order) -> Node`: the other nodes.
pub const NODES: &str = "MESH_NODES";

/// Hash `container IP (network order) -> LocalEndpoint`: this node's containers.
pub const LOCAL_EPS: &str = "MESH_LOCAL_EPS";
/// Containers on one node.
pub const MAX_LOCAL_EPS: u32 = 4096;

/// Services (and service ids: 0..MAX_SERVICES).
pub const MAX_SERVICES: u32 = 16_384;
/// Backend ids 1..MAX_BACKENDS (0 = none): room for 10,000 services with
/// 10 backends each and then some.
pub const MAX_BACKENDS: u32 = 131_072;
/// Nodes in a cluster.
pub const MAX_NODES: u32 = 1024;
/// Conntrack entries (two per flow).
pub const CT_ENTRIES: u32 = 262_144;
/// `BPF_F_INNER_MAP`: inner maps of one outer map may differ in size.
pub const BPF_F_INNER_MAP: u32 = 0x1000;
/// `BPF_F_MMAPABLE`: user space writes a whole ring with one memcpy.
pub const BPF_F_MMAPABLE: u32 = 0x400;
/// Flags of every Maglev ring (the inner maps of [`MAGLEV`]); the template
/// in the object and every real ring must have the same.
pub const RING_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

//! Map names (as pinned under the bpffs directory) and sizes.

/// Per-CPU packet counters, indexed by [`crate::stats::Stat`].
pub const STATS: &str = "MESH_STATS";

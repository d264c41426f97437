//! Every map of the data plane. User space finds them by these names
//! (constants in `mesh_common::maps`) and pins them under its bpffs directory.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use mesh_common::stats::STATS_SLOTS;

/// Packet counters, one slot per `mesh_common::stats::Stat`.
#[map(name = "MESH_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

//! Counter helpers.

use mesh_common::stats::Stat;

use crate::maps::STATS;

/// Adds one to a counter on this CPU.
#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and the
        // pointer came from a successful lookup.
        unsafe { *slot += 1 };
    }
}

//! Reading the per-CPU packet counters.

use aya::maps::{MapData, PerCpuArray};
use mesh_common::stats::{COUNTERS, Counter};

/// One counter, summed over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub counter: &'static Counter,
    pub value: u64,
}

/// All counters, summed over CPUs, in table ([`COUNTERS`]) order.
pub fn read<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<Vec<Reading>, aya::maps::MapError> {
    COUNTERS
        .iter()
        .map(|counter| {
            let per_cpu = map.get(&counter.stat.index(), 0)?;
            Ok(Reading {
                counter,
                value: per_cpu.iter().sum(),
            })
        })
        .collect()
}

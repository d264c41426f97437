//! Reading the per-CPU packet counters.

use aya::maps::{MapData, PerCpuArray};
use mesh_common::stats::Stat;

/// One counter, summed over all CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

/// All counters, summed over CPUs, in [`Stat::ALL`] order.
pub fn read<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<Vec<Counter>, aya::maps::MapError> {
    Stat::ALL
        .iter()
        .map(|stat| {
            let per_cpu = map.get(&stat.index(), 0)?;
            Ok(Counter {
                name: stat.name(),
                value: per_cpu.iter().sum(),
            })
        })
        .collect()
}

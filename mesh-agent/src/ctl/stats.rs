//! `meshctl stats`: the packet counters, by name and class.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use mesh_common::maps;
use serde::Serialize;

use super::{
    CtlError, explain,
    table::{Table, render},
};
use crate::dataplane::{lb::MapsError, stats};

#[derive(Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub class: &'static str,
    pub packets: u64,
}

impl Table for StatRow {
    const HEADER: &'static [&'static str] = &["COUNTER", "CLASS", "PACKETS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.counter.to_string(),
            self.class.to_string(),
            self.packets.to_string(),
        ]
    }
}

pub(super) fn stats_view(dir: &Path, all: bool, json: bool) -> Result<String, CtlError> {
    let path = dir.join(maps::STATS.name);
    let name = maps::STATS.name;
    let data = MapData::from_pin(&path)
        .map_err(|e| explain(&path, &e).unwrap_or(MapsError::Map { name, source: e }.into()))?;
    let map =
        aya::maps::Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })?;
    let map: PerCpuArray<MapData, u64> = map
        .try_into()
        .map_err(|source| MapsError::Map { name, source })?;
    let counters = stats::read(&map).map_err(|source| MapsError::Map { name, source })?;
    let rows: Vec<StatRow> = counters
        .into_iter()
        .filter(|c| all || c.value != 0)
        .map(|c| StatRow {
            counter: c.counter.name,
            class: c.counter.class.name(),
            packets: c.value,
        })
        .collect();
    render(json, &rows)
}

//! `meshctl maps`: every map of the inventory as the kernel has it: pinned
//! or not, its id, size and memory.

use std::path::Path;

use aya::maps::MapData;
use mesh_common::maps::ALL;
use serde::Serialize;

use super::{CtlError, table::Table};

#[derive(Serialize)]
pub struct MapRow {
    pub name: &'static str,
    pub kind: &'static str,
    pub writer: &'static str,
    /// Kernel map id; None when the pin is missing.
    pub id: Option<u32>,
    pub max_entries: Option<u32>,
    /// Kernel memory charged to the map (fdinfo `memlock`), bytes.
    pub memlock: Option<u64>,
    pub what: &'static str,
}

impl Table for MapRow {
    const HEADER: &'static [&'static str] = &[
        "MAP",
        "KIND",
        "WRITER",
        "ID",
        "MAX",
        "MEMORY",
        "KEY -> VALUE",
    ];
    fn cells(&self) -> Vec<String> {
        let opt = |v: Option<u64>| v.map_or("NOT PINNED".into(), |v| v.to_string());
        vec![
            self.name.to_string(),
            self.kind.to_string(),
            self.writer.to_string(),
            opt(self.id.map(u64::from)),
            self.max_entries.map_or("-".into(), |v| v.to_string()),
            self.memlock
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            self.what.to_string(),
        ]
    }
}

pub fn maps(dir: &Path) -> Result<Vec<MapRow>, CtlError> {
    let mut rows = Vec::new();
    for def in &ALL {
        let path = dir.join(def.name);
        let opened = match MapData::from_pin(&path) {
            Ok(m) => Some(m),
            Err(e) => match super::explain(&path, &e) {
                Some(CtlError::NotPinned(_)) => None,
                Some(other) => return Err(other),
                None => None,
            },
        };
        let info = opened.as_ref().and_then(|m| m.info().ok());
        let memlock = opened
            .as_ref()
            .and_then(|m| {
                use std::os::fd::{AsFd, AsRawFd};
                let fd = m.fd().as_fd().as_raw_fd();
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()
            })
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
            });
        rows.push(MapRow {
            name: def.name,
            kind: def.kind.name(),
            writer: match def.writer {
                mesh_common::maps::Writer::Agent => "agent",
                mesh_common::maps::Writer::Kernel => "kernel",
            },
            id: info.as_ref().map(|i| i.id()),
            max_entries: info.as_ref().map(|i| i.max_entries()),
            memlock,
            what: def.what,
        });
    }
    Ok(rows)
}

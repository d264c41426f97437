//! `meshctl backends`: every backend id in use.

use std::collections::BTreeMap;

use mesh_common::{
    lb::{Backend, backend_state},
    maps,
};
use serde::Serialize;

use super::{CtlError, addr, table::Table};
use crate::dataplane::lb::{LbMaps, MapsError};

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub state: String,
    pub ifindex: u32,
    pub mac: String,
}

impl Table for BackendRow {
    const HEADER: &'static [&'static str] = &["ID", "ADDRESS", "STATE", "IFINDEX", "MAC"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.address.clone(),
            self.state.clone(),
            self.ifindex.to_string(),
            self.mac.clone(),
        ]
    }
}

fn state_name(s: u8) -> String {
    match s {
        backend_state::ACTIVE => "active".into(),
        backend_state::DRAINING => "draining".into(),
        other => format!("state{other}"),
    }
}

pub(super) fn all_backends(lb: &LbMaps) -> Result<BTreeMap<u32, Backend>, CtlError> {
    let mut m = BTreeMap::new();
    for (id, b) in lb.backends.iter().enumerate() {
        let b = b.map_err(|source| MapsError::Map {
            name: maps::BACKENDS.name,
            source,
        })?;
        if b.state != 0 {
            m.insert(id as u32, b);
        }
    }
    Ok(m)
}

pub fn backends(lb: &LbMaps) -> Result<Vec<BackendRow>, CtlError> {
    Ok(all_backends(lb)?
        .into_iter()
        .map(|(id, b)| BackendRow {
            id,
            address: addr(b.ip_be, b.port_be),
            state: state_name(b.state),
            ifindex: b.ifindex,
            mac: mesh_common::mac::Mac(b.mac).to_string(),
        })
        .collect())
}

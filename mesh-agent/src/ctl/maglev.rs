//! `meshctl maglev VIP:PORT/PROTO`: a ring's slots per backend.

use std::collections::BTreeMap;

use mesh_common::lb::ServiceKey;
use serde::Serialize;

use super::{CtlError, addr, backends::all_backends, service_name, table::Table};
use crate::dataplane::lb::LbMaps;

#[derive(Serialize)]
pub struct MaglevRow {
    pub backend_id: u32,
    pub address: String,
    pub slots: usize,
    pub share_percent: f64,
}

impl Table for MaglevRow {
    const HEADER: &'static [&'static str] = &["BACKEND", "ADDRESS", "SLOTS", "SHARE"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.backend_id.to_string(),
            self.address.clone(),
            self.slots.to_string(),
            format!("{:.2}%", self.share_percent),
        ]
    }
}

pub fn maglev(lb: &LbMaps, key: &ServiceKey) -> Result<Vec<MaglevRow>, CtlError> {
    let svc = lb
        .services
        .get(key, 0)
        .map_err(|_| CtlError::Usage(format!("no service {}", service_name(key))))?;
    let ring = lb.ring(svc.id)?;
    let backends = all_backends(lb)?;
    let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
    for id in &ring {
        *slots.entry(*id).or_default() += 1;
    }
    Ok(slots
        .into_iter()
        .map(|(id, n)| MaglevRow {
            backend_id: id,
            address: backends
                .get(&id)
                .map_or("(missing)".into(), |b| addr(b.ip_be, b.port_be)),
            slots: n,
            share_percent: n as f64 * 100.0 / ring.len() as f64,
        })
        .collect())
}

//! `meshctl services`: every service, its ring and its traffic.

use mesh_common::{
    lb::{Service, ServiceKey},
    maps,
};
use serde::Serialize;

use super::{CtlError, service_name, table::Table};
use crate::dataplane::lb::{LbMaps, MapsError};

#[derive(Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub id: u32,
    /// Ports of every node's underlay address that reach this service
    /// (routing mesh), e.g. "8080/tcp".
    pub published: Vec<String>,
    pub ring_slots: usize,
    pub backends_in_ring: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Table for ServiceRow {
    const HEADER: &'static [&'static str] = &[
        "SERVICE",
        "ID",
        "PUBLISHED",
        "RING",
        "BACKENDS",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.id.to_string(),
            if self.published.is_empty() {
                "-".into()
            } else {
                self.published.join(",")
            },
            self.ring_slots.to_string(),
            self.backends_in_ring.to_string(),
            self.packets.to_string(),
            self.bytes.to_string(),
            self.new_flows.to_string(),
        ]
    }
}

pub(super) fn all_services(lb: &LbMaps) -> Result<Vec<(ServiceKey, Service)>, CtlError> {
    let mut v = Vec::new();
    for item in lb.services.iter() {
        v.push(item.map_err(|source| MapsError::Map {
            name: maps::SERVICES.name,
            source,
        })?);
    }
    v.sort_by_key(|(k, _)| (u32::from_be(k.vip_be), u16::from_be(k.port_be), k.proto));
    Ok(v)
}

/// Every service; with `published_only`, those reached through a published
/// port.
pub fn services(lb: &LbMaps, published_only: bool) -> Result<Vec<ServiceRow>, CtlError> {
    let published = lb.read_published()?;
    let mut rows = Vec::new();
    for (key, svc) in all_services(lb)? {
        let ports: Vec<String> = published
            .iter()
            .filter(|(_, id)| **id == svc.id)
            .map(|(k, _)| format!("{}/{}", u16::from_be(k.port_be), super::proto_name(k.proto)))
            .collect();
        if published_only && ports.is_empty() {
            continue;
        }
        let ring = lb.ring(svc.id)?;
        let mut ids: Vec<u32> = ring.clone();
        ids.sort_unstable();
        ids.dedup();
        let st = lb.service_stats(svc.id)?;
        rows.push(ServiceRow {
            service: service_name(&key),
            id: svc.id,
            published: ports,
            ring_slots: ring.len(),
            backends_in_ring: ids.iter().filter(|&&i| i != 0).count(),
            packets: st.packets,
            bytes: st.bytes,
            new_flows: st.new_flows,
        });
    }
    Ok(rows)
}

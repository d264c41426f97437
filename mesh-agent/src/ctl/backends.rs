//! `meshctl backends`: every backend id in use.

use std::collections::BTreeMap;

use mesh_common::{
    lb::{Backend, backend_state},
    maps,
};
use serde::Serialize;

use super::{CtlError, addr, service_name, services::all_services, table::Table};
use crate::{
    dataplane::lb::{LbMaps, MapsError},
    shared::BackendName,
};

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    /// The service it backs (`VIP:PORT/PROTO`): a container that backs
    /// several ports or protocols has a backend id for each.
    pub service: String,
    pub address: String,
    pub state: String,
    /// The node it runs on and its container, as the agent knows them
    /// ("-" when the agent does not answer).
    pub node: String,
    pub container: String,
    /// Its host-side veth and MAC on this node (0 and zeros for a backend
    /// on another node, shown as "-").
    pub ifindex: u32,
    pub mac: String,
}

impl Table for BackendRow {
    const HEADER: &'static [&'static str] = &[
        "ID",
        "SERVICE",
        "ADDRESS",
        "STATE",
        "NODE",
        "CONTAINER",
        "IFINDEX",
        "MAC",
    ];
    fn cells(&self) -> Vec<String> {
        let local = self.ifindex != 0;
        vec![
            self.id.to_string(),
            self.service.clone(),
            self.address.clone(),
            self.state.clone(),
            self.node.clone(),
            self.container.clone(),
            if local {
                self.ifindex.to_string()
            } else {
                "-".into()
            },
            if local { self.mac.clone() } else { "-".into() },
        ]
    }
}

/// Every backend's node and container, from the agent (empty when it does
/// not answer: the kernel's view is shown anyway).
fn names(api_socket: &std::path::Path) -> BTreeMap<std::net::Ipv4Addr, BackendName> {
    crate::api::ask(api_socket, "backends")
        .ok()
        .and_then(|raw| serde_json::from_str(&raw).ok())
        .unwrap_or_default()
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

pub fn backends(lb: &LbMaps, api_socket: &std::path::Path) -> Result<Vec<BackendRow>, CtlError> {
    let names = names(api_socket);
    let services: BTreeMap<u32, String> = all_services(lb)?
        .into_iter()
        .map(|(k, s)| (s.id, service_name(&k)))
        .collect();
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    Ok(all_backends(lb)?
        .into_iter()
        .map(|(id, b)| {
            let name = names
                .get(&std::net::Ipv4Addr::from(u32::from_be(b.ip_be)))
                .cloned()
                .unwrap_or_default();
            (id, b, name)
        })
        .map(|(id, b, name)| BackendRow {
            id,
            service: services
                .get(&b.service_id)
                .cloned()
                .unwrap_or_else(|| format!("(service {})", b.service_id)),
            address: addr(b.ip_be, b.port_be),
            state: state_name(b.state),
            node: dash(&name.node),
            container: dash(&name.container),
            ifindex: b.ifindex,
            mac: mesh_common::mac::Mac(b.mac).to_string(),
        })
        .collect())
}

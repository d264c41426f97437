//! What nodes publish about themselves in gossip, and reading it back.
//!
//! Keys: `underlay` (IPv4), `mac` (the underlay NIC's MAC), `subnet`
//! (`INDEX SINCE_MS`, see `subnet.rs`), and one key per backend,
//! `ep:ADDRESS` (its [`Endpoint`] as JSON): a change to one container
//! gossips one small value, and a node's endpoints are never one value too
//! large for a datagram. (Agents before per-endpoint keys published one
//! `endpoints` list; it is still read.)

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::labels::Proto;

pub const KEY_UNDERLAY: &str = "underlay";
pub const KEY_MAC: &str = "mac";
pub const KEY_SUBNET: &str = "subnet";
/// The list of endpoints of older agents.
pub const KEY_ENDPOINTS: &str = "endpoints";
/// Prefix of the per-endpoint keys.
pub const EP_PREFIX: &str = "ep:";

/// The gossip key of one of this node's endpoints.
pub fn endpoint_key(e: &Endpoint) -> String {
    format!("{EP_PREFIX}{}", e.ip)
}

/// One backend of a service on some node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub service: String,
    /// Its container's creation time (orders services by age for VIPs).
    pub created: String,
    pub ip: Ipv4Addr,
    /// (VIP port, container port, protocol).
    pub ports: Vec<(u16, u16, Proto)>,
    /// `backend_state::ACTIVE` or `DRAINING`.
    pub state: u8,
    /// (published port, VIP port, protocol): the routing mesh's ports for
    /// this service (the same on every node; absent from older agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<(u16, u16, Proto)>,
}

/// Another node as gossip describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub underlay: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub subnet: Option<super::subnet::Claim>,
    pub endpoints: Vec<Endpoint>,
    /// Generations of this node ignored, and why (see [`from_states`]).
    pub ignored: Vec<String>,
}

/// The live peers (not `me`) from chitchat's live-node states. Several
/// generations of one node (an agent restarted within the failure-detection
/// time) are merged: the newest tells where the node is, and the
/// endpoints of all of them count until the old one times out, so a quick
/// restart never withdraws a node's backends.
///
/// A node's name is bound to its underlay address: a generation whose
/// underlay is not the address it gossips from, or differs from that of
/// an older live generation of the same name (another host taking the
/// name), is ignored and named in `ignored`.
pub fn from_states(
    me: &str,
    live: &BTreeMap<chitchat::ChitchatId, chitchat::NodeState>,
) -> BTreeMap<String, Peer> {
    let mut out: BTreeMap<String, Peer> = BTreeMap::new();
    // Ascending generations: later ones overwrite the location.
    for (id, state) in live {
        if &*id.node_id == me {
            continue;
        }
        let p = out.entry(id.node_id.to_string()).or_default();
        let underlay: Option<Ipv4Addr> = state.get(KEY_UNDERLAY).and_then(|v| v.parse().ok());
        if let Some(ip) = underlay {
            let from = id.gossip_advertise_addr.ip();
            if from != std::net::IpAddr::V4(ip) {
                p.ignored.push(format!(
                    "generation {} gossips from {from} but names {ip} as its underlay",
                    id.generation_id
                ));
                continue;
            }
            if let Some(bound) = p.underlay
                && bound != ip
            {
                p.ignored.push(format!(
                    "generation {} at {ip} while the node is at {bound}",
                    id.generation_id
                ));
                continue;
            }
            p.underlay = Some(ip);
        }
        if let Some(mac) = state
            .get(KEY_MAC)
            .and_then(|v| v.parse::<mesh_common::mac::Mac>().ok())
        {
            p.mac = Some(mac.0);
        }
        if let Some(c) = state
            .get(KEY_SUBNET)
            .and_then(|v| super::subnet::decode(&id.node_id, v))
        {
            p.subnet = Some(c);
        }
        let listed = state
            .get(KEY_ENDPOINTS)
            .and_then(|v| serde_json::from_str::<Vec<Endpoint>>(v).ok())
            .unwrap_or_default();
        let keyed = state
            .iter_prefix(EP_PREFIX)
            .filter_map(|(_, v)| serde_json::from_str::<Endpoint>(&v.value).ok());
        if p.endpoints.is_empty() {
            p.endpoints.extend(listed.into_iter().chain(keyed));
        } else {
            // A second live generation of the node: the union.
            for e in listed.into_iter().chain(keyed) {
                if !p.endpoints.contains(&e) {
                    p.endpoints.push(e);
                }
            }
        }
    }
    out
}

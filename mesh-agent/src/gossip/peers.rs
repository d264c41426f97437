//! What nodes publish about themselves in gossip, and reading it back.
//!
//! Keys: `underlay` (IPv4), `mac` (the underlay NIC's MAC), `subnet`
//! (`INDEX SINCE_MS`, see `subnet.rs`), `endpoints` (JSON list of this
//! node's service backends).

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::labels::Proto;

pub const KEY_UNDERLAY: &str = "underlay";
pub const KEY_MAC: &str = "mac";
pub const KEY_SUBNET: &str = "subnet";
pub const KEY_ENDPOINTS: &str = "endpoints";

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
}

/// The live peers (not `me`) from chitchat's live-node states. Several
/// generations of one node (an agent restarted within the failure-detection
/// time) are merged: the newest tells where the node is, and the
/// endpoints of all of them count until the old one times out, so a quick
/// restart never withdraws a node's backends.
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
        if let Some(ip) = state.get(KEY_UNDERLAY).and_then(|v| v.parse().ok()) {
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
        if let Some(eps) = state
            .get(KEY_ENDPOINTS)
            .and_then(|v| serde_json::from_str::<Vec<Endpoint>>(v).ok())
        {
            for e in eps {
                if !p.endpoints.contains(&e) {
                    p.endpoints.push(e);
                }
            }
        }
    }
    out
}

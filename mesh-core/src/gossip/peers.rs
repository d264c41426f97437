//! What nodes publish about themselves in gossip, and reading it back.
//!
//! Keys: `underlay` (IPv4), `mac` (the underlay NIC's MAC), `subnet`
//! (`INDEX SINCE_MS`, see `subnet.rs`), and one key per backend,
//! `ep:ADDRESS` (its [`Endpoint`] as JSON): a change to one container
//! gossips one small value, and a node's endpoints are never one value too
//! large for a datagram. (Agents before per-endpoint keys published one
//! `endpoints` list; it is still read.)
//!
//! A restart: the agent that stops publishes `stopping` (how long, in ms,
//! peers may keep its endpoints); a generation that said so and then falls
//! silent is held, its endpoints still counted, until a newer generation
//! of the same node has published `ready` (set with its first endpoints)
//! or the time is up. So a restart never races failure detection, while
//! a node that falls silent without saying so (a crash, a cut cable) is
//! dropped as soon as it is detected.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::labels::Proto;

pub const KEY_UNDERLAY: &str = "underlay";
pub const KEY_MAC: &str = "mac";
/// The UDP port its VXLAN listens on (absent: 4789).
pub const KEY_VXLAN_PORT: &str = "vxlan_port";
/// The version of its agent.
pub const KEY_VERSION: &str = "version";
/// Its WireGuard public key and port ([`WgKey`]), published by a node of
/// an encrypting cluster only (`--encrypt`).
pub const KEY_WG: &str = "wg";
/// What its kernel holds, for `meshctl check` (`crate::check::Report`, JSON).
pub const KEY_CHECK: &str = "check";
/// A check round it asked for (`N`): every node runs its self-check and
/// names the round in [`KEY_CHECK_ACK`].
pub const KEY_CHECK_REQ: &str = "checkreq";
/// The check rounds it answered (`crate::check::answer`).
pub const KEY_CHECK_ACK: &str = "checkack";
/// Whether a change of `key` goes by the regular gossip rounds only, not
/// pushed at once (`push.rs`): a check round's reports and answers, which
/// every node may set within the same moment; pushed, they are N²
/// exchanges at once (at 200 nodes on one 2-core machine, enough to delay
/// heartbeats until live nodes were taken for dead). The asker waits for
/// the rounds anyway.
pub fn spreads_slowly(key: &str) -> bool {
    key == KEY_CHECK || key == KEY_CHECK_ACK
}

/// The longest check report read (a few hundred bytes are usual).
const MAX_CHECK_LEN: usize = 4096;
pub const KEY_SUBNET: &str = "subnet";
/// Prefix of the per-endpoint keys.
pub const EP_PREFIX: &str = "ep:";
/// Set by an agent that stops: milliseconds its peers may keep its
/// endpoints while it restarts.
pub const KEY_STOPPING: &str = "stopping";
/// Set with a generation's first endpoints: it has said what it serves, and
/// an older generation held for its restart can go.
pub const KEY_READY: &str = "ready";
/// The longest hold a peer grants, whatever a stopping node asks.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

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
    /// Its container's name (for `meshctl backends`; absent from older
    /// agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
}

/// A node's WireGuard public key and UDP port: `KEY PORT`, the key in
/// base64 as WireGuard's tools write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WgKey {
    pub key: [u8; 32],
    pub port: u16,
}

impl WgKey {
    pub fn encode(&self) -> String {
        use base64::Engine;
        format!(
            "{} {}",
            base64::engine::general_purpose::STANDARD.encode(self.key),
            self.port
        )
    }

    /// `None` for anything but 32 bytes of base64 and a port other than 0.
    pub fn decode(v: &str) -> Option<WgKey> {
        use base64::Engine;
        let (key, port) = v.split_once(' ')?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(key)
            .ok()?
            .try_into()
            .ok()?;
        let port = port.parse().ok().filter(|p| *p != 0)?;
        Some(WgKey { key, port })
    }

    /// The key alone, in base64.
    pub fn key_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.key)
    }
}

/// Another node as gossip describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub underlay: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    /// Its VXLAN UDP port ([`KEY_VXLAN_PORT`]).
    pub vxlan_port: Option<u16>,
    /// Its agent's version ([`KEY_VERSION`]).
    pub version: Option<String>,
    /// Its WireGuard key ([`KEY_WG`]): it encrypts.
    pub wg: Option<WgKey>,
    /// Its last check report ([`KEY_CHECK`]) and check round ([`KEY_CHECK_REQ`]).
    pub check: Option<crate::check::Report>,
    pub check_req: Option<u64>,
    pub check_acks: Vec<String>,
    pub subnet: Option<super::subnet::Claim>,
    /// Shared with the decoder's copy while unchanged: a pass does not
    /// copy 2,000 endpoints at 200 nodes.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// The overlay networks it knows (`net:NAME`, see `crate::network`).
    pub networks: BTreeMap<String, crate::network::Def>,
    /// Its containers on each network (`netuse:NAME`), for `network rm`.
    pub net_users: BTreeMap<String, Vec<String>>,
    /// Generations of this node ignored, and why (see [`from_states`]).
    pub ignored: Vec<String>,
    /// No generation is live: the node said it was stopping, and its
    /// endpoints are kept until it is back or the hold ends.
    pub restarting: bool,
}

/// One generation of a node, as its keys say (before any check against
/// the address it gossips from or its other generations).
#[derive(Clone, Debug, Default)]
struct Generation {
    underlay: Option<Ipv4Addr>,
    mac: Option<[u8; 6]>,
    vxlan_port: Option<u16>,
    version: Option<String>,
    wg: Option<WgKey>,
    check: Option<crate::check::Report>,
    check_req: Option<u64>,
    check_acks: Vec<String>,
    subnet: Option<super::subnet::Claim>,
    endpoints: Arc<Vec<Endpoint>>,
    networks: BTreeMap<String, crate::network::Def>,
    net_users: BTreeMap<String, Vec<String>>,
    /// The hold it asked for when it said it was stopping.
    stopping: Option<Duration>,
    /// It has published its endpoints.
    ready: bool,
}

impl Generation {
    fn of(node: &str, state: &chitchat::NodeState) -> Self {
        let endpoints = state
            .iter_prefix(EP_PREFIX)
            .filter_map(|(_, v)| serde_json::from_str::<Endpoint>(&v.value).ok());
        Generation {
            underlay: state.get(KEY_UNDERLAY).and_then(|v| v.parse().ok()),
            mac: state
                .get(KEY_MAC)
                .and_then(|v| v.parse::<mesh_common::mac::Mac>().ok())
                .map(|m| m.0),
            vxlan_port: state.get(KEY_VXLAN_PORT).and_then(|v| v.parse().ok()),
            // Bounded: a version string, not a document.
            version: state
                .get(KEY_VERSION)
                .filter(|v| v.len() <= 64)
                .map(str::to_owned),
            wg: state.get(KEY_WG).and_then(WgKey::decode),
            check: state
                .get(KEY_CHECK)
                .filter(|v| v.len() <= MAX_CHECK_LEN)
                .and_then(|v| serde_json::from_str(v).ok()),
            check_req: state.get(KEY_CHECK_REQ).and_then(|v| v.parse().ok()),
            check_acks: state
                .get(KEY_CHECK_ACK)
                .map(crate::check::acks)
                .unwrap_or_default(),
            subnet: state
                .get(KEY_SUBNET)
                .and_then(|v| super::subnet::decode(node, v)),
            endpoints: Arc::new(endpoints.collect()),
            // Bounded: at most the cluster's number of networks, each a
            // short value.
            networks: state
                .iter_prefix(crate::network::KEY_PREFIX)
                .filter(|(_, v)| v.value.len() <= 512)
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix(crate::network::KEY_PREFIX)?;
                    Some((name.to_owned(), serde_json::from_str(&v.value).ok()?))
                })
                .take(crate::network::MAX_NETWORKS)
                .collect(),
            net_users: state
                .iter_prefix(crate::network::USE_PREFIX)
                .filter(|(_, v)| v.value.len() <= 16 * 1024)
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix(crate::network::USE_PREFIX)?;
                    Some((name.to_owned(), serde_json::from_str(&v.value).ok()?))
                })
                .take(crate::network::MAX_NETWORKS)
                .collect(),
            stopping: state
                .get(KEY_STOPPING)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| Duration::from_millis(ms).min(MAX_HOLD)),
            ready: state.get(KEY_READY).is_some(),
        }
    }
}

/// Reads the live peers from chitchat's live-node states, decoding a
/// generation's keys only when they changed: a node's max version grows
/// with every key it sets or deletes, so an unchanged version is unchanged
/// keys. At 200 nodes of 10 endpoints each, a pass parsed 2,000 JSON
/// values for the one that changed.
///
/// It also holds the generations that said they were stopping and left
/// the live set (see the module's header).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Each live generation with the max version it was decoded at.
    known: BTreeMap<chitchat::ChitchatId, Known>,
    /// Generations held for their restart, until when.
    held: BTreeMap<chitchat::ChitchatId, (Instant, Generation)>,
}

#[derive(Debug)]
struct Known {
    version: u64,
    generation: Generation,
    /// When this node first read its `stopping`.
    stopping_since: Option<Instant>,
}

impl Decoder {
    /// The live peers (not `me`): see [`from_states`].
    pub fn peers(
        &mut self,
        me: &str,
        live: &BTreeMap<chitchat::ChitchatId, chitchat::NodeState>,
    ) -> BTreeMap<String, Peer> {
        self.peers_at(me, live, Instant::now())
    }

    /// When the next held generation's time is up (a pass is due then).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held.values().map(|(until, _)| *until).min()
    }

    /// [`Decoder::peers`] at `now`.
    pub fn peers_at(
        &mut self,
        me: &str,
        live: &BTreeMap<chitchat::ChitchatId, chitchat::NodeState>,
        now: Instant,
    ) -> BTreeMap<String, Peer> {
        // Generations that left the live set after saying they were
        // stopping are held; the others are forgotten.
        for (id, k) in self.known.extract_if(.., |id, _| !live.contains_key(id)) {
            if let (Some(hold), Some(since)) = (k.generation.stopping, k.stopping_since) {
                self.held.insert(id, (since + hold, k.generation));
            }
        }
        for (id, state) in live {
            if &*id.node_id == me {
                continue;
            }
            let version = state.max_version();
            if self.known.get(id).is_some_and(|k| k.version == version) {
                continue;
            }
            let generation = Generation::of(&id.node_id, state);
            let stopping_since = generation.stopping.and(
                self.known
                    .get(id)
                    .and_then(|k| k.stopping_since)
                    .or(Some(now)),
            );
            self.known.insert(
                id.clone(),
                Known {
                    version,
                    generation,
                    stopping_since,
                },
            );
        }
        // A held generation goes when its time is up, when it is live
        // again, or once a newer generation of its node is ready.
        let known = &self.known;
        self.held.retain(|id, (until, _)| {
            now < *until
                && !known.contains_key(id)
                && !known.iter().any(|(k, g)| {
                    k.node_id == id.node_id
                        && k.generation_id > id.generation_id
                        && g.generation.ready
                })
        });
        let mut out: BTreeMap<String, Peer> = BTreeMap::new();
        // Ascending generations: later ones overwrite the location.
        let mut all: Vec<(&chitchat::ChitchatId, &Generation, bool)> = self
            .known
            .iter()
            .map(|(id, k)| (id, &k.generation, true))
            .chain(self.held.iter().map(|(id, (_, g))| (id, g, false)))
            .filter(|(id, _, _)| &*id.node_id != me)
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        for (id, g, is_live) in all {
            let p = out.entry(id.node_id.to_string()).or_insert_with(|| Peer {
                restarting: true,
                ..Peer::default()
            });
            p.restarting &= !is_live;
            merge(p, id, g);
        }
        out
    }
}

/// Adds one generation of a node to what its older generations said.
fn merge(p: &mut Peer, id: &chitchat::ChitchatId, g: &Generation) {
    if let Some(ip) = g.underlay {
        let from = id.gossip_advertise_addr.ip();
        if from != std::net::IpAddr::V4(ip) {
            p.ignored.push(format!(
                "generation {} gossips from {from} but names {ip} as its underlay",
                id.generation_id
            ));
            return;
        }
        if let Some(bound) = p.underlay
            && bound != ip
        {
            p.ignored.push(format!(
                "generation {} at {ip} while the node is at {bound}",
                id.generation_id
            ));
            return;
        }
        p.underlay = Some(ip);
    }
    if let Some(mac) = g.mac {
        p.mac = Some(mac);
    }
    if let Some(port) = g.vxlan_port {
        p.vxlan_port = Some(port);
    }
    if let Some(v) = &g.version {
        p.version = Some(v.clone());
    }
    // The newest generation's key, or none (a node restarted without
    // --encrypt): a restarted agent keeps its key file, a renewed key
    // replaces the old one.
    p.wg = g.wg;
    p.check.clone_from(&g.check);
    p.check_req = g.check_req;
    p.check_acks.clone_from(&g.check_acks);
    if let Some(c) = &g.subnet {
        p.subnet = Some(c.clone());
    }
    // The newest generation says what the node knows and runs now.
    if !g.networks.is_empty() {
        p.networks.clone_from(&g.networks);
    }
    p.net_users.clone_from(&g.net_users);
    if p.endpoints.is_empty() {
        p.endpoints = g.endpoints.clone();
    } else {
        // A second live generation of the node: the union.
        for e in g.endpoints.iter() {
            if !p.endpoints.contains(e) {
                Arc::make_mut(&mut p.endpoints).push(e.clone());
            }
        }
    }
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
///
/// Decodes every generation; a [`Decoder`] kept between calls decodes
/// only what changed.
pub fn from_states(
    me: &str,
    live: &BTreeMap<chitchat::ChitchatId, chitchat::NodeState>,
) -> BTreeMap<String, Peer> {
    Decoder::default().peers(me, live)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use chitchat::{ChitchatId, NodeState};

    use super::*;

    fn id(generation: u64) -> ChitchatId {
        ChitchatId::new("n2", generation, SocketAddr::from(([192, 168, 0, 2], 7946)))
    }

    fn ep(ip: &str) -> (String, String) {
        let e = Endpoint {
            service: "web".into(),
            created: "2026-11-30T00:00:00Z".into(),
            ip: ip.parse().expect("ip"),
            ports: vec![(80, 8080, Proto::Tcp)],
            state: 0,
            publish: vec![],
            container: String::new(),
        };
        (endpoint_key(&e), serde_json::to_string(&e).expect("json"))
    }

    fn ips(p: &Peer) -> Vec<String> {
        let mut v: Vec<String> = p.endpoints.iter().map(|e| e.ip.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_decoder_decodes_a_generation_again_only_when_its_keys_changed() {
        let mut state = NodeState::for_test();
        state.set(KEY_UNDERLAY, "192.168.0.2");
        let (k, v) = ep("10.42.2.5");
        state.set(k, v);
        let mut live = BTreeMap::from([(id(1), state)]);
        let mut d = Decoder::default();
        let first = d.peers("n1", &live);
        assert_eq!(ips(&first["n2"]), ["10.42.2.5"]);
        // Unchanged: the same decoded endpoints, not a new parse.
        let again = d.peers("n1", &live);
        assert!(Arc::ptr_eq(&first["n2"].endpoints, &again["n2"].endpoints));
        assert_eq!(again, from_states("n1", &live));

        // A key set and one deleted: decoded again.
        let state = live.get_mut(&id(1)).expect("state");
        let (k, v) = ep("10.42.2.6");
        state.set(k, v);
        state.delete(&ep("10.42.2.5").0);
        let changed = d.peers("n1", &live);
        assert_eq!(ips(&changed["n2"]), ["10.42.2.6"]);
        assert_eq!(changed, from_states("n1", &live));

        // A second generation: the union, while the first is live.
        let mut newer = NodeState::for_test();
        newer.set(KEY_UNDERLAY, "192.168.0.2");
        let (k, v) = ep("10.42.2.7");
        newer.set(k, v);
        live.insert(id(2), newer);
        assert_eq!(ips(&d.peers("n1", &live)["n2"]), ["10.42.2.6", "10.42.2.7"]);
        // The first gone: forgotten.
        live.remove(&id(1));
        assert_eq!(ips(&d.peers("n1", &live)["n2"]), ["10.42.2.7"]);
        assert_eq!(d.known.len(), 1);
        // This node itself is never a peer.
        assert!(d.peers("n2", &live).is_empty());
    }

    #[test]
    fn a_wireguard_key_is_read_from_the_newest_generation_and_junk_is_ignored() {
        let k = WgKey {
            key: [9; 32],
            port: 51820,
        };
        assert_eq!(WgKey::decode(&k.encode()), Some(k));
        for junk in ["", "AAAA 51820", "x 1", &format!("{} 0", k.key_base64())] {
            assert_eq!(WgKey::decode(junk), None, "{junk:?}");
        }
        let mut old = node(&[]);
        old.set(KEY_WG, k.encode());
        let mut live = BTreeMap::from([(id(1), old)]);
        assert_eq!(from_states("n1", &live)["n2"].wg, Some(k));
        let renewed = WgKey { key: [8; 32], ..k };
        let mut newer = node(&[]);
        newer.set(KEY_WG, renewed.encode());
        live.insert(id(2), newer);
        assert_eq!(from_states("n1", &live)["n2"].wg, Some(renewed));
        // Restarted without --encrypt: it does not encrypt any more.
        live.insert(id(4), node(&[]));
        assert_eq!(from_states("n1", &live)["n2"].wg, None);
        let mut plain = node(&[]);
        plain.set(KEY_WG, "not a key");
        let live = BTreeMap::from([(id(3), plain)]);
        assert_eq!(from_states("n1", &live)["n2"].wg, None);
    }

    fn node(eps: &[&str]) -> NodeState {
        let mut state = NodeState::for_test();
        state.set(KEY_UNDERLAY, "192.168.0.2");
        for ip in eps {
            let (k, v) = ep(ip);
            state.set(k, v);
        }
        state
    }

    #[test]
    fn a_node_that_said_it_was_stopping_keeps_its_endpoints_until_its_next_generation_is_ready() {
        let t0 = Instant::now();
        let mut d = Decoder::default();
        let mut old = node(&["10.42.2.5"]);
        let mut live = BTreeMap::from([(id(1), old.clone())]);
        assert!(!d.peers_at("n1", &live, t0)["n2"].restarting);
        // It says it stops (a 10 s hold), then falls silent.
        old.set(KEY_STOPPING, "10000");
        live.insert(id(1), old);
        d.peers_at("n1", &live, t0 + Duration::from_secs(1));
        live.clear();
        let held = d.peers_at("n1", &live, t0 + Duration::from_secs(3));
        assert_eq!(ips(&held["n2"]), ["10.42.2.5"]);
        assert!(held["n2"].restarting);
        assert_eq!(d.next_expiry(), Some(t0 + Duration::from_secs(11)));
        // Its next generation is live but has not published yet: both.
        live.insert(id(2), node(&["10.42.2.6"]));
        let both = d.peers_at("n1", &live, t0 + Duration::from_secs(4));
        assert_eq!(ips(&both["n2"]), ["10.42.2.5", "10.42.2.6"]);
        assert!(!both["n2"].restarting);
        // Ready: the old generation goes at once, long before its time.
        let mut new = node(&["10.42.2.6"]);
        new.set(KEY_READY, "1");
        live.insert(id(2), new);
        let after = d.peers_at("n1", &live, t0 + Duration::from_secs(5));
        assert_eq!(ips(&after["n2"]), ["10.42.2.6"]);
        assert_eq!(d.next_expiry(), None);
    }

    #[test]
    fn a_hold_ends_on_time_and_a_silent_node_that_said_nothing_is_not_held() {
        let t0 = Instant::now();
        let mut d = Decoder::default();
        let mut stopping = node(&["10.42.2.5"]);
        // More than any peer grants.
        stopping.set(KEY_STOPPING, "3600000");
        let mut live = BTreeMap::from([(id(1), stopping)]);
        d.peers_at("n1", &live, t0);
        live.clear();
        assert_eq!(d.next_expiry(), None);
        assert_eq!(d.peers_at("n1", &live, t0).len(), 1);
        assert_eq!(d.next_expiry(), Some(t0 + MAX_HOLD));
        assert_eq!(
            d.peers_at("n1", &live, t0 + MAX_HOLD - Duration::from_millis(1))
                .len(),
            1
        );
        assert!(d.peers_at("n1", &live, t0 + MAX_HOLD).is_empty());
        assert_eq!(d.next_expiry(), None);

        // A node that fell silent without a word (a crash, a cut cable)
        // is dropped as soon as it leaves the live set; so is a malformed
        // hold.
        for said in [None, Some("soon")] {
            let mut state = node(&["10.42.2.7"]);
            if let Some(v) = said {
                state.set(KEY_STOPPING, v);
            }
            let mut live = BTreeMap::from([(id(3), state)]);
            d.peers_at("n1", &live, t0);
            live.clear();
            assert!(d.peers_at("n1", &live, t0).is_empty(), "{said:?}");
        }
    }
}

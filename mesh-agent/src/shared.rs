//! The state the daemon shares with its readers: the control socket
//! (`api`) and /metrics (`metrics`). The daemon writes it after every
//! pass; the readers only read it.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    conntrack::sweep::SweepStats,
    dns::DnsStats,
    gossip::transport::GossipStats,
    status::{Samples, Status},
};

/// A node as gossip last showed it.
#[derive(Clone, Debug)]
pub struct KnownNode {
    pub underlay: String,
    pub subnet: String,
    pub version: String,
    /// When a pass last found it among the live peers.
    pub seen: std::time::Instant,
}

/// Where a backend lives and what it is called.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BackendName {
    pub node: String,
    pub container: String,
}

/// One backend as Prometheus's HTTP service discovery lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SdTarget {
    /// `ADDRESS:PORT`, one per TCP container port.
    pub targets: Vec<String>,
    pub service: String,
    pub network: String,
    pub node: String,
    pub container: String,
}

/// State shared with the control socket and /metrics.
#[derive(Default)]
pub struct Shared {
    pub status: Status,
    pub latency: Samples,
    pub reconcile_seconds: Samples,
    /// Service id -> (name, VIP:port/proto), for /metrics labels.
    pub service_names: BTreeMap<u32, (String, String)>,
    pub dns: Option<Arc<DnsStats>>,
    pub gossip: Option<Arc<GossipStats>>,
    /// The cluster keyring in use (its check values for `meshctl status`).
    pub keys: Option<crate::gossip::transport::Keys>,
    pub sweep: Option<Arc<SweepStats>>,
    /// Every backend's address -> (node, container), for `meshctl backends`.
    pub backend_names: BTreeMap<std::net::Ipv4Addr, BackendName>,
    /// Every active backend in the cluster, for `/sd`.
    pub sd_targets: Vec<SdTarget>,
    /// Every node this agent has seen in gossip, this one included.
    pub known_nodes: BTreeMap<String, KnownNode>,
    /// The tunnel probes, once the host link is up.
    pub probe: Option<Arc<crate::probe::Probe>>,
    /// Map writes that failed (each retried by a later pass).
    pub write_errors: u64,
    /// The overlay networks (`meshctl network ls`), `mesh` first.
    pub networks: Vec<crate::status::NetworkRow>,
    /// Where `meshctl network create|rm` go (the daemon's loop).
    pub net_requests: Option<tokio::sync::mpsc::Sender<crate::requests::Request>>,
    /// Gossip content ignored, by kind (claim, endpoint, identity).
    pub gossip_ignored: BTreeMap<&'static str, u64>,
    /// The consistency check as of the last pass (`meshctl check`).
    pub check: CheckView,
    /// The programs' events (`meshctl monitor`).
    pub monitor: Option<crate::monitor::Monitor>,
    /// Kernel table entries found changed behind the agent's back (and
    /// written again).
    pub kernel_drift: u64,
}

/// The consistency check: one row per node, this one first.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CheckView {
    pub rows: Vec<CheckRow>,
    /// Peers whose kernel differs from this node's view.
    pub diverging: usize,
    /// The round `meshctl check` waits for (empty: none asked).
    #[serde(default)]
    pub round: String,
}

/// What one node's kernel holds against what it should.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CheckRow {
    pub node: String,
    /// The check rounds its report answers.
    #[serde(default)]
    pub answered: Vec<String>,
    /// What differs (empty: it agrees).
    pub differences: Vec<String>,
    /// Since when (ms since the epoch; 0: it agrees).
    pub since_ms: u64,
    /// Entries its last self-check found changed behind its agent's back.
    #[serde(default)]
    pub drift_count: usize,
    #[serde(default)]
    pub this_node: bool,
}

/// The monitor names flows from what the daemon shares.
impl crate::monitor::Names for Arc<std::sync::Mutex<Shared>> {
    fn service(&self, id: u32) -> Option<(String, String)> {
        let sh = self.lock().unwrap_or_else(|p| p.into_inner());
        sh.service_names.get(&id).cloned()
    }
    fn backend(&self, ip: std::net::Ipv4Addr) -> Option<(String, String)> {
        let sh = self.lock().unwrap_or_else(|p| p.into_inner());
        sh.backend_names
            .get(&ip)
            .map(|n| (n.node.clone(), n.container.clone()))
    }
}

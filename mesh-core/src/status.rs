//! What the agent reports about itself (`meshctl status`, the control
//! socket): shared between the agent and meshctl.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub node: Node,
    pub docker: DockerState,
    pub services: Vec<ServiceStatus>,
    /// Containers left out because of their labels (or their veth), and why.
    pub skipped: Vec<Skipped>,
    /// Published ports not served, and why (another service has the port,
    /// or a host process or Docker's own `-p` listens on it).
    #[serde(default)]
    pub publish_conflicts: Vec<String>,
    /// What peers published and this node ignored (foreign endpoints,
    /// contested or invalid /24 claims, a name taken by another host).
    #[serde(default)]
    pub gossip_ignored: Vec<String>,
    /// Overlay networks that lost to another record or are not served,
    /// and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_conflicts: Vec<String>,
    pub reconcile: ReconcileStatus,
    pub event_to_map_ms: Latency,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Node {
    /// This node's name in the cluster and the live peers (empty alone).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub peers: Vec<String>,
    /// Peers whose agent said it was stopping and is not back yet: their
    /// endpoints are kept meanwhile (for a bounded time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarting: Vec<String>,
    /// Peers gossip lost whose data plane still answers through the
    /// tunnel: their agent is down; their backends are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_down: Vec<String>,
    /// Gossip datagrams that did not authenticate (a wrong cluster key on
    /// one side, or tampering).
    #[serde(default)]
    pub gossip_rejected: u64,
    /// Gossip datagrams sent and received (authenticated or not).
    #[serde(default)]
    pub gossip_sent: u64,
    #[serde(default)]
    pub gossip_received: u64,
    /// The cluster keys' check values in use, the primary first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_keys: Vec<String>,
    /// The tunnel's encryption between nodes (`--encrypt`): WireGuard's
    /// device, port and this node's public key, or off.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encryption: String,
    /// Whether this node runs in a cluster (gossip).
    #[serde(default)]
    pub clustered: bool,
    pub subnet: String,
    /// Its underlay address (in a cluster).
    #[serde(default)]
    pub underlay: String,
    pub vip_cidr: String,
    pub bpffs_dir: String,
    /// How the host itself reaches VIPs: its host link, or why it has none
    /// (then only backends on this node).
    #[serde(default)]
    pub host_link: String,
    /// Whether GRO merges the tunnel's packets (`mesh-vxlan`), or why not.
    #[serde(default)]
    pub tunnel_gro: String,
    /// What became of the merged packets handed to `mesh-vxlan`, while
    /// the device is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
    /// How containers' connects to VIPs are balanced: at the socket (for
    /// how many containers), or per packet and why.
    #[serde(default)]
    pub sockets: String,
    /// Whether each peer's tunnel carries traffic both ways (probes).
    #[serde(default)]
    pub tunnels: Vec<Tunnel>,
}

/// One node of the cluster, as this node knows it (`meshctl nodes`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeRow {
    pub name: String,
    /// This node itself.
    pub this: bool,
    pub underlay: String,
    pub subnet: String,
    /// `alive`, `restarting` (it said it was stopping; its endpoints are
    /// held) or `dead` (gone from gossip).
    pub state: String,
    /// Seconds since gossip last showed it alive (0 while it is).
    pub gone_s: f64,
    pub version: String,
    /// Its tunnel as the probes find it: `ok`, `NO ANSWER`, or empty.
    pub tunnel: String,
}

/// The hand-off of GRO-merged tunnel packets to `mesh-vxlan`, counted
/// since the device was made: by mesh as it hands them over and takes them
/// back, by the device itself in between. The device's GRO cell may merge
/// consecutive packets of a flow again, so fewer may come back than it
/// took with none lost; a packet lost on the way shows as one handed over
/// that the device never took (the host's firewall) or as one it dropped.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handoff {
    /// Handed over by the underlay's program (`vxlan_handoff`).
    pub handed: u64,
    /// Taken in by the device's socket (its receive counter).
    pub device_rx: u64,
    /// Dropped by the device, or in error (its counters).
    pub device_dropped: u64,
    pub device_errors: u64,
    /// Taken back by the device's program (`vxlan_device_in`).
    pub back: u64,
    /// Dropped by the device's program without mesh's mark
    /// (`vxlan_device_unmarked`): VXLAN that reached the device's socket
    /// without being handed over (one mesh refused on the underlay NIC,
    /// say from an address that is no node's), counted in `device_rx` too.
    #[serde(default)]
    pub unmarked: u64,
}

/// One peer's tunnel, as this node's probes find it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Tunnel {
    pub peer: String,
    /// It answered within the last few seconds.
    pub up: bool,
    /// It ever answered.
    pub ever_up: bool,
    /// Seconds since its last answer (or since probing began).
    pub silent_s: f64,
    /// The last answer's round trip.
    pub rtt_ms: f64,
    /// The VXLAN UDP port the tunnel uses.
    pub vxlan_port: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DockerState {
    pub socket: String,
    pub connected: bool,
    pub containers: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: String,
    /// Its overlay network (`mesh` by default).
    #[serde(default)]
    pub network: String,
    pub vip: String,
    /// "80/tcp -> 8080" per port mapping seen on its containers.
    pub ports: Vec<String>,
    pub active: usize,
    pub draining: usize,
    /// Containers of the service that are not backends yet (unhealthy,
    /// health check starting).
    pub waiting: usize,
    /// "30080/tcp -> 80" per port it publishes on every node (routing mesh).
    #[serde(default)]
    pub published: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    pub container: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReconcileStatus {
    pub passes: u64,
    pub writes: u64,
    pub last_ms: f64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The last N latency samples, for quantiles.
#[derive(Debug, Default)]
pub struct Samples {
    values: std::collections::VecDeque<f64>,
    pub count: u64,
    pub sum: f64,
}

impl Node {
    /// What to say about the hand-off to `mesh-vxlan`.
    pub fn handoff_line(&self) -> Option<String> {
        let h = self.handoff?;
        let unmarked = if h.unmarked == 0 {
            String::new()
        } else {
            format!(
                "; {} it took without being handed over (VXLAN mesh refused) dropped by its program",
                h.unmarked
            )
        };
        Some(format!(
            "{} handed to mesh-vxlan, {} taken in by it ({} dropped, {} in error), {} back after its GRO{unmarked}",
            h.handed, h.device_rx, h.device_dropped, h.device_errors, h.back
        ))
    }

    /// What to say about the tunnels: each peer's, and what to open when
    /// one does not answer while gossip reaches it.
    pub fn tunnels_line(&self) -> Option<String> {
        if self.tunnels.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .tunnels
            .iter()
            .map(|t| {
                if t.up {
                    format!("{} ok ({:.2} ms)", t.peer, t.rtt_ms)
                } else {
                    format!(
                        "{} NO ANSWER for {:.0} s{}",
                        t.peer,
                        t.silent_s,
                        if t.ever_up { "" } else { " (never answered)" }
                    )
                }
            })
            .collect();
        let mut line = each.join(", ");
        if let Some(t) = self.tunnels.iter().find(|t| !t.up) {
            line.push_str(&format!(
                "; gossip reaches these nodes but the overlay does not: the network between \
                 the hosts must pass UDP {} (VXLAN) both ways",
                t.vxlan_port
            ));
        }
        Some(line)
    }

    /// What to say about the cluster: the live peers, or why there are
    /// none (a wrong key shows as rejected datagrams and no peer at all).
    pub fn cluster_line(&self) -> String {
        if !self.clustered {
            return "alone (no cluster key)".into();
        }
        if self.peers.is_empty() {
            if self.gossip_sent == 0 {
                return "no peer yet".into();
            }
            return format!(
                "no authenticated peer; {} datagrams rejected, {} sent: is the cluster key the same on every node?",
                self.gossip_rejected, self.gossip_sent
            );
        }
        let rejected = if self.gossip_rejected > 0 {
            format!(
                "; {} datagrams rejected (a node with another key?)",
                self.gossip_rejected
            )
        } else {
            String::new()
        };
        let restarting = if self.restarting.is_empty() {
            String::new()
        } else {
            format!(
                "; restarting (endpoints kept): {}",
                self.restarting.join(", ")
            )
        };
        format!(
            "{} peers: {}{restarting}{rejected}",
            self.peers.len(),
            self.peers.join(", ")
        )
    }
}

impl Samples {
    const KEEP: usize = 4096;

    pub fn add(&mut self, v: f64) {
        if self.values.len() == Self::KEEP {
            self.values.pop_front();
        }
        self.values.push_back(v);
        self.count += 1;
        self.sum += v;
    }

    pub fn summary(&self) -> Latency {
        let mut v: Vec<f64> = self.values.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        Latency {
            samples: self.count,
            p50: q(0.5),
            p99: q(0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// A network as `meshctl network ls|inspect` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRow {
    pub name: String,
    pub subnet: String,
    pub vni: u32,
    /// This node's /24 of it (its containers' addresses).
    pub slice: String,
    /// Where its VIPs come from.
    pub vips: String,
    /// The node that created it and when (ms since the epoch; 0: `mesh`).
    pub creator: String,
    pub created_ms: u64,
    /// Its Docker network on this engine: `ok`, or what is wrong.
    pub docker: String,
    /// Containers on it, as NODE/CONTAINER, across the cluster.
    pub containers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_line_names_what_the_device_took_unhanded_only_when_there_is_some() {
        let mut n = Node::default();
        assert_eq!(n.handoff_line(), None, "no device, no line");
        n.handoff = Some(Handoff {
            handed: 10,
            device_rx: 12,
            back: 9,
            unmarked: 2,
            ..Handoff::default()
        });
        assert_eq!(
            n.handoff_line().as_deref(),
            Some(
                "10 handed to mesh-vxlan, 12 taken in by it (0 dropped, 0 in error), 9 back after \
                 its GRO; 2 it took without being handed over (VXLAN mesh refused) dropped by its \
                 program"
            )
        );
        n.handoff = Some(Handoff {
            unmarked: 0,
            ..n.handoff.unwrap_or_default()
        });
        assert!(
            n.handoff_line()
                .is_some_and(|l| l.ends_with("9 back after its GRO")),
            "{:?}",
            n.handoff_line()
        );
    }
}

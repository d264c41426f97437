//! The daemon: owns the tasks around the pure core ([`crate::desired`]).
//!
//! One task owns the data plane, the Docker connection and membership: it
//! lists the mesh containers at start, then follows Docker's events and
//! membership changes; after every batch it runs one pass (`pass.rs`):
//! desired state, minimal map writes, DNS zone, gossip, status. Periodic
//! jobs (the retry of a failed pass) run on the same loop; the conntrack
//! sweep has a thread of its own (`crate::conntrack::sweep`). DNS, the control socket and /metrics are tasks of their
//! own that read what this one shares.

mod check;
mod encryption;
mod events;
mod handoff;
mod networks;
mod pass;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::Ebpf;
use mesh_common::{
    lb::{Published, PublishedKey},
    tunnel::{LocalEndpoint, LocalNode, Node},
};
use tracing::{info, warn};

use crate::{
    cluster::Cluster,
    dataplane::{lb::LbMaps, overlay::OverlayMaps},
    dns::{DnsConfig, SharedZone},
    docker::{self, Container},
    reconcile::Actual,
    shared::Shared,
    veth::Attachments,
    vip::Cidr,
};

/// Settings the daemon runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub docker_socket: PathBuf,
    pub node_subnet: Cidr,
    pub vip_cidr: Cidr,
    pub bridge: String,
    pub mtu: u32,
    /// The default network's VNI.
    pub vni: u32,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    /// DNS: where to listen (None: the mesh gateway address, port 53) and
    /// how to answer; None disables the server.
    pub dns: Option<(Option<SocketAddr>, DnsConfig)>,
    /// Containers' connects to VIPs are balanced at the socket
    /// (`MESH_SOCK_NETNS` lists their network namespaces).
    pub container_socket_lb: bool,
}

/// What Docker told us: the inputs of the desired state that come from it.
#[derive(Default)]
struct DockerView {
    containers: BTreeMap<String, Container>,
    /// Containers being stopped: no new flows, existing ones continue.
    draining: BTreeSet<String>,
    /// Host-side veth per (container id, network), or why it was not
    /// found.
    veths: BTreeMap<(String, String), Result<u32, String>>,
    /// Network-namespace cookie per container id, with the process it was
    /// read through, or why it could not be read.
    netns: BTreeMap<String, (u32, Result<u64, String>)>,
    /// Docker's other bridge networks, by bridge interface name.
    bridges: BTreeMap<String, mesh_common::tunnel::Bridge>,
}

/// What was successfully written, per table (the reconcilers' "actual").
#[derive(Default)]
struct Written {
    lb: Actual,
    nodes: BTreeMap<u32, Node>,
    peers: BTreeMap<u32, u32>,
    local_eps: BTreeMap<u32, LocalEndpoint>,
    /// Veth ifindex -> container address and network (`MESH_VETH_SRC`).
    veth_src: BTreeMap<u32, mesh_common::tunnel::VethSrc>,
    /// The overlay networks besides `mesh` (`MESH_NETS`: /16 -> VNI).
    nets: BTreeMap<u32, u32>,
    /// The routing mesh's ports.
    published: BTreeMap<PublishedKey, Published>,
    /// Container namespaces balanced at the socket (`MESH_SOCK_NETNS`).
    sock_netns: BTreeMap<u64, u32>,
    /// Docker's other bridges, by ifindex (`MESH_BRIDGES`).
    bridges: BTreeMap<u32, mesh_common::tunnel::Bridge>,
    /// Every service's VIP (`MESH_VIPS`).
    vips: BTreeMap<u32, u32>,
    /// Their widest mask, as written into `MESH_CONFIG` (None: not yet).
    bridge_mask_be: Option<u32>,
    /// Our endpoints as last published in gossip (key -> JSON).
    endpoints: BTreeMap<String, String>,
    /// `ready` is published (with the first endpoints).
    ready: bool,
    /// The WireGuard device's peers as last made (None: not yet).
    wg: Option<BTreeMap<crate::wireguard::PublicKey, crate::wireguard::Peer>>,
}

pub struct Daemon {
    settings: Settings,
    cluster: Option<Cluster>,
    ebpf: Ebpf,
    lb: LbMaps,
    overlay: OverlayMaps,
    attachments: Attachments,
    docker: DockerView,
    written: Written,
    vips: BTreeMap<String, Ipv4Addr>,
    shared: Arc<Mutex<Shared>>,
    /// What DNS answers; replaced by every pass.
    zone: Arc<SharedZone>,
    /// The DNS server, once started.
    dns: Option<Arc<crate::dns::Handler>>,
    /// Event times (ns since the epoch) waiting for their map writes.
    pending_events: Vec<i64>,
    /// A pass left something unwritten: the retry tick runs another.
    retry: bool,
    /// Passes in a row that left something unwritten, and when the next
    /// retry runs (backoff).
    failed_passes: u32,
    retry_at: tokio::time::Instant,
    /// Why the agent must stop (this node lost its /24 to an older claim).
    fatal: Option<String>,
    /// The overlay networks.
    nets: networks::Networks,
    /// `meshctl network` requests.
    requests: tokio::sync::mpsc::Receiver<crate::requests::Request>,
    /// The peers of the last pass (to see who left gossip).
    last_peers: BTreeMap<String, crate::gossip::peers::Peer>,
    /// Peers gossip lost whose data plane still answers: their agent is
    /// down, not their host; kept as they were, since when.
    agent_down: BTreeMap<String, (crate::gossip::peers::Peer, std::time::Instant)>,
    /// The consistency check (`check.rs`).
    check: check::CheckState,
    /// The hand-off of merged VXLAN to mesh-vxlan (`handoff.rs`).
    handoff: handoff::HandoffWatch,
}

impl Daemon {
    pub fn new(
        settings: Settings,
        cluster: Option<Cluster>,
        ebpf: Ebpf,
        lb: LbMaps,
        overlay: OverlayMaps,
        shared: Arc<Mutex<Shared>>,
        requests: tokio::sync::mpsc::Receiver<crate::requests::Request>,
    ) -> anyhow::Result<Self> {
        let actual = lb.read_actual()?;
        if !actual.services.is_empty() {
            info!(
                services = actual.services.len(),
                backends = actual.backends.len(),
                "adopted the maps left by an earlier run"
            );
        }
        let written = Written {
            lb: actual,
            nodes: overlay.read_nodes()?,
            peers: overlay.read_peers()?,
            local_eps: overlay.read_local_eps()?,
            veth_src: overlay.read_veth_src()?,
            nets: overlay.read_nets()?,
            bridges: overlay.read_bridges()?,
            vips: overlay.read_vips()?,
            bridge_mask_be: None,
            published: lb
                .read_published()?
                .into_iter()
                .map(|(k, service_id)| (k, Published { service_id }))
                .collect(),
            sock_netns: lb.read_sock_netns()?,
            endpoints: BTreeMap::new(),
            ready: false,
            wg: None,
        };
        let attachments = Attachments::new(&settings.bpffs_dir)?;
        let vips = load_json(&settings.state_dir, pass::VIPS_FILE);
        let nets = networks::Networks {
            table: load_json(&settings.state_dir, networks::TABLE_FILE),
            ..Default::default()
        };
        Ok(Daemon {
            settings,
            cluster,
            ebpf,
            lb,
            overlay,
            attachments,
            docker: DockerView::default(),
            written,
            vips,
            shared,
            zone: Arc::default(),
            dns: None,
            pending_events: Vec::new(),
            retry: false,
            failed_passes: 0,
            retry_at: tokio::time::Instant::now(),
            fatal: None,
            nets,
            requests,
            last_peers: BTreeMap::new(),
            agent_down: BTreeMap::new(),
            check: check::CheckState::default(),
            handoff: handoff::HandoffWatch::default(),
        })
    }

    /// Runs until the process is told to stop. Never returns an error for
    /// Docker trouble: it waits for Docker and carries on.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        loop {
            let d = docker::connect(&self.settings.docker_socket).await;
            if let Err(e) = docker::ensure_network(
                &d,
                self.settings.node_subnet,
                &self.settings.bridge,
                self.settings.mtu,
            )
            .await
            {
                if matches!(e, docker::DockerError::Conflict { .. }) {
                    return Err(e.into());
                }
                warn!(error = %e, "could not set up the mesh network; retrying");
                self.set_docker(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Connected, with the mesh network in place.
            self.start_dns();
            if let Some(local) = self.cluster.as_ref().map(|c| (c.local, c.cluster_cidr)) {
                let mut local = self.host_link(local.0, local.1);
                local.slice_index = u8::try_from(self.slice_index()).unwrap_or(0);
                local.vxlan_device = (!self.handoff.refused
                    && self.vxlan_device(u16::from_be(local.vxlan_port_be())))
                    as u8;
                // What WireGuard decrypts is decapsulated from the start.
                self.attach_wg()?;
                self.overlay.set_local(&local)?;
                self.report_encryption();
            }
            self.set_docker(true);
            // Follow events from before the listing, so nothing falls between.
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // The overlay networks this node knew: their Docker networks
            // before their containers are listed.
            self.merge_networks(&BTreeMap::new());
            self.nets.dirty = true;
            self.sync_networks(&d).await;
            let served: Vec<String> = self.nets.served.iter().map(|n| n.name.clone()).collect();
            match docker::list_mesh(&d, &served).await {
                Ok(list) => {
                    let v = &mut self.docker;
                    v.containers = list.into_iter().map(|c| (c.id.clone(), c)).collect();
                    // After a reconnect (dockerd restarted), containers it
                    // restarted meanwhile have new veths: find them all again.
                    v.veths.clear();
                    v.draining.retain(|id| v.containers.contains_key(id));
                    info!(
                        containers = v.containers.len(),
                        "listed the mesh containers"
                    );
                    self.list_bridges(&d).await;
                    self.pass();
                    if let Some(why) = self.fatal.take() {
                        anyhow::bail!(why);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "listing containers failed; reconnecting");
                    self.set_docker(false);
                    continue;
                }
            }
            if let Some(why) = self.follow(&d, since).await {
                anyhow::bail!(why);
            }
            self.set_docker(false);
            warn!("lost the Docker event stream; reconnecting");
        }
    }

    /// The kernel's VXLAN device on `port` with its program
    /// (`crate::vxlandev`): whether it is in place. Without it (an error,
    /// logged) VXLAN is not merged by GRO and mesh decapsulates every
    /// packet itself.
    fn vxlan_device(&mut self, port: u16) -> bool {
        let made = crate::vxlandev::ensure(port)
            .map_err(anyhow::Error::from)
            .and_then(|ifindex| {
                // The program first: the device takes packets once up.
                self.attachments.ensure_vxlan(&mut self.ebpf, ifindex)?;
                crate::vxlandev::up()?;
                Ok(ifindex)
            });
        let (line, ok) = match made {
            Ok(ifindex) => {
                info!(
                    iface = crate::vxlandev::NAME,
                    ifindex, port, "VXLAN device: GRO merges tunnelled bulk traffic"
                );
                (
                    format!(
                        "on: GRO merges the tunnel's packets, {} (UDP {port}) decapsulates what it merged",
                        crate::vxlandev::NAME
                    ),
                    true,
                )
            }
            Err(e) => {
                warn!(
                    error = %format!("{e:#}"),
                    "no VXLAN device: mesh decapsulates every tunnelled packet unmerged"
                );
                (format!("OFF: no VXLAN device: {e:#}"), false)
            }
        };
        self.set_tunnel_gro(line);
        ok
    }

    /// `meshctl status`'s line about GRO for the tunnel.
    fn set_tunnel_gro(&self, line: String) {
        self.node_status(|n| n.tunnel_gro = line);
    }

    /// Changes this node's part of `meshctl status`.
    fn node_status(&self, f: impl FnOnce(&mut mesh_core::status::Node)) {
        f(&mut self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .node);
    }

    /// `local` with the host link (`crate::hostlink`): the device, its
    /// route and its program made sure of. Without it (an error, logged)
    /// the host reaches only VIPs' backends on this node.
    fn host_link(&mut self, mut local: LocalNode, cluster: Cidr) -> LocalNode {
        let gateway = self.settings.node_subnet.gateway();
        let link = crate::hostlink::ensure(cluster, gateway, self.settings.mtu)
            .map_err(anyhow::Error::from)
            .and_then(|h| {
                self.attachments.ensure_host(&mut self.ebpf, h.ifindex)?;
                Ok(h)
            });
        let line = match link {
            Ok(h) => {
                info!(
                    iface = crate::hostlink::NAME,
                    ifindex = h.ifindex,
                    %cluster,
                    src = %gateway,
                    "host link: the host reaches VIPs' backends on every node"
                );
                local.host_ip_be = u32::from(gateway).to_be();
                local.host_ifindex = h.ifindex;
                local.host_mac = h.mac;
                self.start_probe(gateway, u16::from_be(local.vxlan_port_be()));
                format!(
                    "VIPs' backends on every node, through {} ({cluster} from {gateway})",
                    crate::hostlink::NAME
                )
            }
            Err(e) => {
                warn!(
                    error = %e,
                    "no host link: the host reaches only VIPs' backends on this node"
                );
                format!("VIPs' backends on this node only: NO HOST LINK: {e:#}")
            }
        };
        self.node_status(|n| n.host_link = line);
        local
    }

    /// The loop: Docker events, membership changes, periodic jobs. Returns
    /// when the event stream ends (None) or the agent must stop (why).
    async fn follow(&mut self, d: &bollard::Docker, since: u64) -> Option<String> {
        use futures_util::StreamExt;
        let mut events = d.events(Some(events::options(since)));
        let mut diagnose_tick = tokio::time::interval(Duration::from_secs(10));
        let mut check_tick = tokio::time::interval(check::SELF_CHECK_EVERY);
        let mut handoff_tick = tokio::time::interval(handoff::EVERY);
        let mut rejected_seen = 0u64;
        loop {
            tokio::select! {
                alive = membership_changed(&mut self.cluster) => {
                    if !alive {
                        // Peers count this node dead without its
                        // heartbeats; a new agent joins again (the maps
                        // keep forwarding meanwhile).
                        return Some("cluster membership stopped: the gossip server ended".into());
                    }
                    self.pass();
                }
                ev = events.next() => {
                    let Some(Ok(ev)) = ev else { return None };
                    let mut changed = self.on_event(d, ev).await;
                    // Take whatever else is already queued before the pass.
                    while let Some(Some(Ok(ev))) = futures_util::FutureExt::now_or_never(events.next()) {
                        changed |= self.on_event(d, ev).await;
                    }
                    if changed {
                        self.pass();
                    }
                }
                _ = tokio::time::sleep_until(self.retry_at), if self.retry => self.pass(),
                Some(r) = self.requests.recv() => self.on_request(r).await,
                // While a peer's agent is down, its data plane is watched.
                _ = tokio::time::sleep(crate::probe::INTERVAL), if !self.agent_down.is_empty() => self.pass(),
                _ = diagnose_tick.tick(), if self.cluster.is_some() => {
                    rejected_seen = self.diagnose(rejected_seen);
                }
                _ = handoff_tick.tick(), if self.cluster.is_some() && !self.handoff.refused => {
                    self.watch_handoff();
                }
                _ = check_tick.tick(), if self.cluster.is_some() => {
                    if self.self_check(None) {
                        self.pass();
                    }
                }
            }
            if self.fatal.is_some() {
                return self.fatal.take();
            }
            self.sync_networks(d).await;
        }
    }

    /// Tunnel probes from the host's overlay address (once).
    fn start_probe(&self, gateway: Ipv4Addr, vxlan_port: u16) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if sh.probe.is_some() {
            return;
        }
        match crate::probe::spawn(gateway, vxlan_port) {
            Ok(p) => sh.probe = Some(p),
            Err(e) => warn!(
                error = %e,
                "no tunnel probes: meshctl status cannot tell whether peers' tunnels work"
            ),
        }
    }

    /// DNS answers the containers of the engine's other networks too.
    fn tell_dns_engine_nets(&self) {
        if let Some(dns) = &self.dns {
            let nets = self
                .docker
                .bridges
                .values()
                .map(|b| crate::dns::Net {
                    base: Ipv4Addr::from(u32::from_be(b.net_be)),
                    prefix: u32::from_be(b.mask_be).count_ones() as u8,
                })
                .collect();
            dns.set_engine_nets(nets);
        }
    }

    /// Lists Docker's other bridge networks again (at connect, and when
    /// one is created or removed). On failure the last list is kept.
    async fn list_bridges(&mut self, d: &bollard::Docker) {
        match docker::list_bridges(d).await {
            Ok(b) => {
                if b != self.docker.bridges {
                    info!(bridges = ?b.keys().collect::<Vec<_>>(), "Docker's other bridge networks");
                }
                self.docker.bridges = b;
                self.tell_dns_engine_nets();
            }
            Err(e) => warn!(error = %e, "listing Docker's networks failed; keeping what we knew"),
        }
    }

    /// Says so when this node gossips but has no authenticated peer (a
    /// wrong cluster key here or on the others), or when datagrams fail to
    /// authenticate (another node's wrong key); the rejections seen.
    fn diagnose(&self, seen: u64) -> u64 {
        let sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let rejected = sh
            .gossip
            .as_ref()
            .map_or(0, |g| g.bad_auth.load(std::sync::atomic::Ordering::Relaxed));
        let sent = sh
            .gossip
            .as_ref()
            .map_or(0, |g| g.sent.load(std::sync::atomic::Ordering::Relaxed));
        if sh.status.node.peers.is_empty() && sent > 0 {
            warn!(
                rejected,
                sent, "no authenticated peer: is the cluster key the same on every node?"
            );
        } else if rejected > seen {
            warn!(
                rejected = rejected - seen,
                "gossip datagrams failed to authenticate (a node with another cluster key?)"
            );
        }
        rejected
    }

    /// The agent is told to stop: in a cluster, its peers are told to
    /// keep its endpoints while it restarts.
    pub async fn stopping(&self) {
        if let Some(c) = &self.cluster {
            c.say_stopping().await;
            info!(hold = ?c.restart_hold, "told the peers this agent is stopping");
        }
    }

    fn set_docker(&self, connected: bool) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.status.docker.connected = connected;
    }
}

/// What an earlier run kept in `dir/name` (JSON), or the default.
fn load_json<T: serde::de::DeserializeOwned + Default>(dir: &std::path::Path, name: &str) -> T {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// Keeps `value` in `dir/name` (JSON), replaced in one step (a rename).
fn save_json<T: serde::Serialize>(
    dir: &std::path::Path,
    name: &str,
    value: &T,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(tmp, dir.join(name))
}

/// Resolves when membership changed (`false` once it stopped); never
/// without a cluster.
async fn membership_changed(cluster: &mut Option<Cluster>) -> bool {
    match cluster {
        Some(c) => c.membership.changed().await,
        None => std::future::pending().await,
    }
}

//! The agent: Docker's containers -> desired state -> reconciled kernel maps.
//!
//! One task owns the data plane and the Docker connection. It lists the
//! mesh containers at start, then follows Docker's events; after every
//! batch of events it rebuilds the desired state and reconciles. A failed
//! write is retried after a short delay; a lost Docker connection is
//! re-established and followed by a full resync.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::Ebpf;
use bollard::{Docker, system::EventsOptions};
use futures_util::StreamExt;
use mesh_common::lb::backend_state;
use tracing::{debug, error, info, warn};

use crate::{
    dataplane::lb::LbMaps,
    docker::{self, Container, Health},
    gossip::peers::Endpoint,
    labels::{self, ServiceLabels},
    reconcile::{self, Actual, Desired, DesiredBackend, SvcAddr},
    status::{Samples, ServiceStatus, Skipped, Status},
    veth::{self, Attachments},
    vip::{self, Cidr},
};

/// Settings the agent runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub docker_socket: PathBuf,
    pub node_subnet: Cidr,
    pub vip_cidr: Cidr,
    pub bridge: String,
    pub mtu: u32,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    /// DNS: where to listen (None: the mesh gateway address, port 53) and
    /// how to answer; None disables the server.
    pub dns: Option<(Option<std::net::SocketAddr>, crate::dns::DnsConfig)>,
    /// Many hosts: gossip and the overlay; None on a single host.
    pub cluster: Option<Cluster>,
}

/// This node in a cluster.
#[derive(Clone)]
pub struct Cluster {
    pub node_id: String,
    pub handle: Arc<chitchat::ChitchatHandle>,
    pub live: tokio::sync::watch::Receiver<BTreeMap<chitchat::ChitchatId, chitchat::NodeState>>,
    /// This node's overlay settings, written to the kernel at start.
    pub local: mesh_common::tunnel::LocalNode,
    pub cluster_cidr: Cidr,
    pub stats: Arc<crate::gossip::transport::GossipStats>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("cluster_cidr", &self.cluster_cidr)
            .finish()
    }
}

/// State shared with the control socket and /metrics.
#[derive(Default)]
pub struct Shared {
    pub status: Status,
    pub latency: Samples,
    pub reconcile_seconds: Samples,
    /// Service id -> (name, VIP:port/proto), for /metrics labels.
    pub service_names: BTreeMap<u32, (String, String)>,
    pub dns: Option<Arc<crate::dns::DnsStats>>,
    pub gossip: Option<Arc<crate::gossip::transport::GossipStats>>,
}

pub struct Agent {
    settings: Settings,
    ebpf: Ebpf,
    lb: LbMaps,
    attachments: Attachments,
    actual: Actual,
    containers: BTreeMap<String, Container>,
    /// Containers being stopped: no new flows, existing ones continue.
    draining: BTreeSet<String>,
    /// Host-side veth per container id.
    ifindex: HashMap<String, u32>,
    vips: BTreeMap<String, Ipv4Addr>,
    shared: Arc<Mutex<Shared>>,
    /// Event times (ns since the epoch) waiting for their map writes.
    pending_events: Vec<i64>,
    retry: bool,
    /// What DNS answers; replaced after every pass.
    zone: Arc<std::sync::RwLock<crate::dns::Zone>>,
    dns_started: bool,
    overlay: crate::dataplane::overlay::OverlayMaps,
    /// Live peers from gossip.
    peers: BTreeMap<String, crate::gossip::peers::Peer>,
    /// Node table entries written to the kernel.
    nodes_written: BTreeMap<u32, mesh_common::tunnel::Node>,
    /// Our endpoints as last published in gossip.
    published: String,
    /// This node's containers as the kernel should have them (for delivery
    /// of decapsulated traffic), and as written.
    eps_want: BTreeMap<u32, mesh_common::tunnel::LocalEndpoint>,
    eps_written: BTreeMap<u32, mesh_common::tunnel::LocalEndpoint>,
}

impl Agent {
    pub fn new(
        settings: Settings,
        ebpf: Ebpf,
        lb: LbMaps,
        overlay: crate::dataplane::overlay::OverlayMaps,
        shared: Arc<Mutex<Shared>>,
    ) -> anyhow::Result<Self> {
        let actual = lb.read_actual()?;
        if !actual.services.is_empty() {
            info!(
                services = actual.services.len(),
                backends = actual.backends.len(),
                "adopted the maps left by an earlier run"
            );
        }
        let attachments = Attachments::new(&settings.bpffs_dir)?;
        let vips = load_vips(&settings.state_dir);
        Ok(Agent {
            settings,
            ebpf,
            lb,
            attachments,
            actual,
            containers: BTreeMap::new(),
            draining: BTreeSet::new(),
            ifindex: HashMap::new(),
            vips,
            shared,
            pending_events: Vec::new(),
            retry: false,
            zone: Arc::default(),
            dns_started: false,
            overlay,
            peers: BTreeMap::new(),
            nodes_written: BTreeMap::new(),
            published: String::new(),
            eps_want: BTreeMap::new(),
            eps_written: BTreeMap::new(),
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
            if let Some(c) = &self.settings.cluster {
                self.overlay.set_local(&c.local)?;
                self.sync_peers();
            }
            self.set_docker(true);
            // Follow events from before the listing, so nothing falls between.
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            match docker::list_mesh(&d).await {
                Ok(list) => {
                    self.containers = list.into_iter().map(|c| (c.id.clone(), c)).collect();
                    self.draining.retain(|id| self.containers.contains_key(id));
                    info!(
                        containers = self.containers.len(),
                        "listed the mesh containers"
                    );
                    self.reconcile();
                }
                Err(e) => {
                    warn!(error = %e, "listing containers failed; reconnecting");
                    self.set_docker(false);
                    continue;
                }
            }
            self.follow(&d, since).await;
            self.set_docker(false);
            warn!("lost the Docker event stream; reconnecting");
        }
    }

    async fn follow(&mut self, d: &Docker, since: u64) {
        let opts = EventsOptions::<String> {
            since: Some(since.to_string()),
            until: None,
            filters: HashMap::from([(
                "type".to_string(),
                vec!["container".to_string(), "network".to_string()],
            )]),
        };
        let mut events = d.events(Some(opts));
        let mut retry_tick = tokio::time::interval(Duration::from_secs(1));
        let mut live = self.settings.cluster.as_ref().map(|c| c.live.clone());
        loop {
            tokio::select! {
                r = async { match live.as_mut() { Some(l) => l.changed().await, None => std::future::pending().await } } => {
                    if r.is_ok() {
                        self.sync_peers();
                        self.reconcile();
                    }
                }
                ev = events.next() => {
                    let Some(Ok(ev)) = ev else { return };
                    let mut changed = self.on_event(d, ev).await;
                    // Take whatever else is already queued before reconciling.
                    while let Some(Some(Ok(ev))) = futures_util::FutureExt::now_or_never(events.next()) {
                        changed |= self.on_event(d, ev).await;
                    }
                    if changed {
                        self.reconcile();
                    }
                }
                _ = retry_tick.tick(), if self.retry => self.reconcile(),
            }
        }
    }

    /// Updates what we know from one event; whether it may change anything.
    async fn on_event(&mut self, d: &Docker, ev: bollard::models::EventMessage) -> bool {
        let action = ev.action.clone().unwrap_or_default();
        let attrs = ev
            .actor
            .as_ref()
            .and_then(|a| a.attributes.clone())
            .unwrap_or_default();
        let id = match ev.typ {
            Some(bollard::models::EventMessageTypeEnum::CONTAINER) => {
                let relevant = matches!(
                    action.as_str(),
                    "start" | "restart" | "die" | "kill" | "stop" | "destroy" | "pause" | "unpause"
                ) || action.starts_with("health_status");
                if !relevant {
                    return false;
                }
                ev.actor.and_then(|a| a.id)
            }
            Some(bollard::models::EventMessageTypeEnum::NETWORK) => {
                if attrs.get("name").map(String::as_str) != Some(docker::NETWORK) {
                    return false;
                }
                attrs.get("container").cloned()
            }
            _ => None,
        };
        let Some(id) = id else { return false };
        debug!(%action, container = %id, "docker event");
        let changed = self.apply_event(d, &action, id).await;
        if changed && let Some(t) = ev.time_nano {
            self.pending_events.push(t);
        }
        changed
    }

    async fn apply_event(&mut self, d: &Docker, action: &str, id: String) -> bool {
        match action {
            // `docker stop` sends a signal first: drain at once. The event
            // says all we need; an inspect now would wait for the stop.
            "kill" | "stop" | "pause" => {
                if !self.containers.contains_key(&id) {
                    return false;
                }
                return self.draining.insert(id);
            }
            "die" | "destroy" => {
                self.draining.remove(&id);
                self.ifindex.remove(&id);
                return self.containers.remove(&id).is_some();
            }
            "start" | "restart" | "unpause" => {
                self.draining.remove(&id);
                self.ifindex.remove(&id);
            }
            _ => {}
        }
        match docker::inspect(d, &id).await {
            Ok(Some(c)) if c.running && c.mesh.is_some() => {
                self.containers.insert(id, c);
            }
            Ok(_) => {
                self.containers.remove(&id);
                self.draining.remove(&id);
                self.ifindex.remove(&id);
            }
            Err(e) => warn!(container = %id, error = %e, "inspect failed; keeping what we knew"),
        }
        true
    }

    /// Desired state from the containers, the services' VIPs, and status rows.
    #[allow(clippy::type_complexity)]
    fn desired(
        &mut self,
    ) -> (
        Desired,
        Vec<ServiceStatus>,
        Vec<Skipped>,
        BTreeSet<u32>,
        Vec<Endpoint>,
    ) {
        let mut skipped = Vec::new();
        let mut live_ifindex = BTreeSet::new();
        let mut members: Vec<(&Container, ServiceLabels, u32, u8)> = Vec::new();
        let mut waiting: BTreeMap<String, usize> = BTreeMap::new();
        let mut eps = BTreeMap::new();
        for c in self.containers.values() {
            let Some((_, mac)) = c.mesh else { continue };
            let ifindex = match self.ifindex.get(&c.id) {
                Some(i) => *i,
                None => match veth::host_ifindex(c.pid, mac) {
                    Ok(i) => {
                        self.ifindex.insert(c.id.clone(), i);
                        i
                    }
                    Err(e) => {
                        skipped.push(Skipped {
                            container: c.name.clone(),
                            error: format!("its veth: {e}"),
                        });
                        continue;
                    }
                },
            };
            live_ifindex.insert(ifindex);
            let (ip, _) = c.mesh.unwrap_or((Ipv4Addr::UNSPECIFIED, mac));
            eps.insert(
                u32::from(ip).to_be(),
                mesh_common::tunnel::LocalEndpoint {
                    ifindex,
                    mac,
                    ..Default::default()
                },
            );
            let svc = match labels::parse(&c.labels) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    skipped.push(Skipped {
                        container: c.name.clone(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let state = if self.draining.contains(&c.id) {
                backend_state::DRAINING
            } else if matches!(c.health, Health::None | Health::Healthy) {
                backend_state::ACTIVE
            } else {
                *waiting.entry(svc.service.clone()).or_default() += 1;
                continue;
            };
            members.push((c, svc, ifindex, state));
        }

        // Every backend: this node's (with its veth) and the peers' (reached
        // through the tunnel).
        let mut all: Vec<(Endpoint, Option<(u32, [u8; 6], String)>)> = Vec::new();
        let mut local_eps = Vec::new();
        for (c, s, ifindex, state) in &members {
            let Some((ip, mac)) = c.mesh else { continue };
            let ep = Endpoint {
                service: s.service.clone(),
                created: c.created.clone(),
                ip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| (p.vip_port, p.container_port, p.proto))
                    .collect(),
                state: *state,
            };
            local_eps.push(ep.clone());
            all.push((ep, Some((*ifindex, mac, c.name.clone()))));
        }
        for p in self.peers.values() {
            all.extend(p.endpoints.iter().map(|e| (e.clone(), None)));
        }

        // VIPs: by service age (its oldest container anywhere), sticky.
        let mut ages: BTreeMap<String, String> = BTreeMap::new();
        for (e, _) in &all {
            let age = ages
                .entry(e.service.clone())
                .or_insert_with(|| e.created.clone());
            if e.created < *age {
                *age = e.created.clone();
            }
        }
        for name in waiting.keys() {
            ages.entry(name.clone()).or_insert_with(|| "9999".into());
        }
        let vips = vip::assign(self.settings.vip_cidr, &ages, &self.vips);
        if vips != self.vips {
            self.vips = vips.clone();
            save_vips(&self.settings.state_dir, &self.vips);
        }

        let mut desired = Desired::new();
        let mut rows: BTreeMap<String, ServiceStatus> = BTreeMap::new();
        let mut zone = crate::dns::Zone::new();
        for (e, local) in &all {
            let Some(vip) = vips.get(&e.service) else {
                if let Some((_, _, name)) = local {
                    skipped.push(Skipped {
                        container: name.clone(),
                        error: format!("no free VIP in {}", self.settings.vip_cidr),
                    });
                }
                continue;
            };
            let row = rows
                .entry(e.service.clone())
                .or_insert_with(|| ServiceStatus {
                    name: e.service.clone(),
                    vip: vip.to_string(),
                    ..ServiceStatus::default()
                });
            let entry = zone.entry(e.service.clone()).or_default();
            entry.vip = Some(*vip);
            if e.state == backend_state::ACTIVE {
                row.active += 1;
                entry.tasks.push(e.ip);
            } else {
                row.draining += 1;
            }
            let (ifindex, mac) = local.as_ref().map_or((0, [0; 6]), |(i, m, _)| (*i, *m));
            for &(vip_port, container_port, proto) in &e.ports {
                if !entry.ports.contains(&(vip_port, proto)) {
                    entry.ports.push((vip_port, proto));
                }
                let port = format!("{vip_port}/{proto} -> {container_port}");
                if !row.ports.contains(&port) {
                    row.ports.push(port);
                }
                let addr = SvcAddr {
                    vip: *vip,
                    port: vip_port,
                    proto: proto.number(),
                };
                desired.entry(addr).or_default().insert(
                    (e.ip, container_port),
                    DesiredBackend {
                        state: e.state,
                        ifindex,
                        mac,
                    },
                );
            }
        }
        for (name, n) in waiting {
            zone.entry(name.clone()).or_default().vip = vips.get(&name).copied();
            let vip = vips.get(&name).map(|v| v.to_string()).unwrap_or_default();
            rows.entry(name.clone())
                .or_insert_with(|| ServiceStatus {
                    name,
                    vip,
                    ..ServiceStatus::default()
                })
                .waiting += n;
        }
        for z in zone.values_mut() {
            z.tasks.sort();
            z.ports.sort();
        }
        *self.zone.write().unwrap_or_else(|p| p.into_inner()) = zone;
        self.eps_want = eps;
        (
            desired,
            rows.into_values().collect(),
            skipped,
            live_ifindex,
            local_eps,
        )
    }

    /// One reconcile pass: attach to new veths, write the minimal map
    /// changes, publish status.
    pub fn reconcile(&mut self) {
        let start = Instant::now();
        let (desired, services, skipped, live, local_eps) = self.desired();
        for &ifindex in &live {
            if let Err(e) = self.attachments.ensure(&mut self.ebpf, ifindex) {
                warn!(ifindex, error = %e, "could not attach the TC programs");
            }
        }
        self.attachments.sweep(&live);
        self.publish(&local_eps);
        self.write_local_eps();
        let plan = reconcile::plan(&desired, &self.actual);
        let result = reconcile::apply(&plan, &mut self.lb, &mut self.actual);
        let elapsed = start.elapsed().as_secs_f64();
        for s in &skipped {
            debug!(container = %s.container, error = %s.error, "container skipped");
        }
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.reconcile_seconds.add(elapsed);
        sh.status.reconcile.passes += 1;
        sh.status.reconcile.last_ms = elapsed * 1e3;
        match &result {
            Ok(()) => {
                self.retry = false;
                sh.status.reconcile.writes += plan.writes() as u64;
                sh.status.reconcile.last_error = None;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i64)
                    .unwrap_or(0);
                for t in self.pending_events.drain(..) {
                    sh.latency.add((now - t).max(0) as f64 / 1e6);
                }
                if !plan.is_empty() {
                    info!(
                        writes = plan.writes(),
                        ms = format!("{:.2}", elapsed * 1e3),
                        "reconciled"
                    );
                }
            }
            Err(e) => {
                self.retry = true;
                error!(error = %e, "reconcile failed; retrying in 1 s");
                sh.status.reconcile.last_error = Some(e.to_string());
            }
        }
        for s in &skipped {
            if !sh.status.skipped.contains(s) {
                warn!(container = %s.container, error = %s.error, "container skipped");
            }
        }
        sh.status.services = services;
        sh.status.skipped = skipped;
        sh.status.docker.containers = self.containers.len();
        sh.status.event_to_map_ms = sh.latency.summary();
        sh.service_names = self
            .actual
            .services
            .iter()
            .map(|(addr, id)| {
                let name = self
                    .vips
                    .iter()
                    .find(|(_, v)| **v == addr.vip)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                let proto = if addr.proto == mesh_common::lb::PROTO_UDP {
                    "udp"
                } else {
                    "tcp"
                };
                (*id, (name, format!("{}:{}/{proto}", addr.vip, addr.port)))
            })
            .collect();
    }

    /// Starts the DNS server once the mesh network (and so the gateway
    /// address) exists.
    fn start_dns(&mut self) {
        let Some((listen, cfg)) = self.settings.dns.clone() else {
            return;
        };
        if self.dns_started {
            return;
        }
        let gateway = Ipv4Addr::from(u32::from(self.settings.node_subnet.base) + 1);
        let addr = listen.unwrap_or_else(|| std::net::SocketAddr::from((gateway, 53)));
        let stats = Arc::new(crate::dns::DnsStats::default());
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).dns = Some(stats.clone());
        let handler = Arc::new(crate::dns::Handler::new(
            self.zone.clone(),
            cfg.clone(),
            stats,
        ));
        info!(%addr, domain = %cfg.domain, upstreams = ?cfg.upstreams, "DNS serving");
        tokio::spawn(async move {
            if let Err(e) = crate::dns::serve(addr, handler).await {
                error!(%addr, error = %e, "DNS server stopped");
            }
        });
        self.dns_started = true;
    }

    /// Reads the live peers from gossip and writes the node table.
    fn sync_peers(&mut self) {
        let Some(c) = &self.settings.cluster else {
            return;
        };
        self.peers = crate::gossip::peers::from_states(&c.node_id, &c.live.borrow());
        {
            let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.status.node.name = c.node_id.clone();
            sh.status.node.peers = self.peers.keys().cloned().collect();
        }
        let mut want = BTreeMap::new();
        for p in self.peers.values() {
            if let (Some(ip), Some(mac), Some(claim)) = (p.underlay, p.mac, &p.subnet) {
                let subnet = crate::gossip::subnet::subnet(c.cluster_cidr, claim.index);
                if subnet.base == self.settings.node_subnet.base {
                    warn!(%subnet, node = %claim.node, "a peer claims our subnet; ignoring it");
                    continue;
                }
                let node = mesh_common::tunnel::Node {
                    underlay_ip_be: u32::from(ip).to_be(),
                    mac,
                    ..Default::default()
                };
                want.insert(u32::from(subnet.base).to_be(), node);
            }
        }
        for (k, n) in &want {
            if self.nodes_written.get(k) != Some(n) {
                match self.overlay.set_node(*k, n) {
                    Ok(()) => {
                        info!(subnet = %Ipv4Addr::from(u32::from_be(*k)), underlay = %Ipv4Addr::from(u32::from_be(n.underlay_ip_be)), "node joined");
                        self.nodes_written.insert(*k, *n);
                    }
                    Err(e) => warn!(error = %e, "writing the node table"),
                }
            }
        }
        let gone: Vec<u32> = self
            .nodes_written
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            match self.overlay.remove_node(k) {
                Ok(()) => {
                    info!(subnet = %Ipv4Addr::from(u32::from_be(k)), "node left");
                    self.nodes_written.remove(&k);
                }
                Err(e) => warn!(error = %e, "writing the node table"),
            }
        }
    }

    /// Writes this node's containers for the underlay's delivery program.
    fn write_local_eps(&mut self) {
        for (ip, ep) in &self.eps_want {
            if self.eps_written.get(ip) != Some(ep) {
                match self.overlay.set_local_ep(*ip, ep) {
                    Ok(()) => {
                        self.eps_written.insert(*ip, *ep);
                    }
                    Err(e) => {
                        warn!(error = %e, "writing the local endpoint table");
                        self.retry = true;
                    }
                }
            }
        }
        let gone: Vec<u32> = self
            .eps_written
            .keys()
            .filter(|k| !self.eps_want.contains_key(k))
            .copied()
            .collect();
        for ip in gone {
            match self.overlay.remove_local_ep(ip) {
                Ok(()) => {
                    self.eps_written.remove(&ip);
                }
                Err(e) => warn!(error = %e, "writing the local endpoint table"),
            }
        }
    }

    /// Publishes this node's endpoints in gossip when they changed.
    fn publish(&mut self, endpoints: &[crate::gossip::peers::Endpoint]) {
        let Some(c) = &self.settings.cluster else {
            return;
        };
        let json = serde_json::to_string(endpoints).unwrap_or_default();
        if json == self.published {
            return;
        }
        let chitchat = c.handle.chitchat();
        let Ok(mut g) = chitchat.try_lock() else {
            // Busy gossiping: the retry tick tries again.
            self.retry = true;
            return;
        };
        g.self_node_state()
            .set(crate::gossip::peers::KEY_ENDPOINTS, &json);
        self.published = json;
    }

    fn set_docker(&self, connected: bool) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.status.docker.connected = connected;
    }
}

fn vips_file(dir: &std::path::Path) -> PathBuf {
    dir.join("vips.json")
}

/// VIPs assigned by an earlier run (so a restart never moves one).
fn load_vips(dir: &std::path::Path) -> BTreeMap<String, Ipv4Addr> {
    std::fs::read_to_string(vips_file(dir))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn save_vips(dir: &std::path::Path, vips: &BTreeMap<String, Ipv4Addr>) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join("vips.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(vips)?)?;
        std::fs::rename(tmp, vips_file(dir))
    };
    if let Err(e) = write() {
        warn!(dir = %dir.display(), error = %e, "could not save the VIP assignments");
    }
}

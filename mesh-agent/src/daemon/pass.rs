//! One pass: gather the inputs, compute the desired state (pure), write
//! what differs from what was written, and publish status.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tracing::{debug, error, info, warn};

use super::Daemon;
use crate::{
    dataplane::overlay::Keyed,
    desired::{self, Inputs, State},
    gossip::{
        authority::{self, Rejection},
        peers::{self, Peer},
        subnet::Claim,
    },
    reconcile::{self, table},
    veth,
};
use mesh_common::tunnel::Node;

/// The gossip keys to set and to delete for `want` after `published`.
pub(super) fn key_changes(
    want: &BTreeMap<String, String>,
    published: &BTreeMap<String, String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let set = want
        .iter()
        .filter(|(k, v)| published.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let delete = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    (set, delete)
}

/// The longest a node whose agent is down keeps its backends everywhere.
const AGENT_DOWN_MAX: Duration = Duration::from_secs(600);

impl Daemon {
    /// One reconcile pass.
    pub(super) fn pass(&mut self) {
        let start = Instant::now();
        self.resolve_veths();
        let peers: BTreeMap<String, Peer> = match &self.cluster {
            Some(c) => {
                // The networks first: a node's endpoints may lie in its
                // slice of any of them.
                let raw = c.membership.peers();
                let cluster_cidr = c.cluster_cidr;
                self.merge_networks(&raw);
                let Some(c) = &self.cluster else { return };
                let nets: Vec<crate::vip::Cidr> = self.nets.served.iter().map(|n| n.cidr).collect();
                let mut v = authority::vet(raw, cluster_cidr, Some(&c.claim), &nets);
                authority::same_encryption(&mut v, c.wg.is_some());
                self.report_ignored(&v.rejected);
                if let Some(w) = &v.lost_to {
                    self.give_up_subnet(w);
                }
                v.peers
            }
            None => {
                self.merge_networks(&BTreeMap::new());
                BTreeMap::new()
            }
        };
        let peers = self.hold_agent_down(peers);
        let st = desired::compute(&Inputs {
            containers: &self.docker.containers,
            draining: &self.docker.draining,
            veths: &self.docker.veths,
            peers: &peers,
            vips: &self.vips,
            vip_cidr: self.settings.vip_cidr,
            networks: &self.nets.served,
        });
        let mut vips_failed = None;
        if st.vips != self.vips {
            // Kept before anything uses them: a VIP must never move, even
            // after a restart. A failed write fails the pass (retried).
            match super::save_json(&self.settings.state_dir, VIPS_FILE, &st.vips) {
                Ok(()) => self.vips = st.vips.clone(),
                Err(e) => {
                    vips_failed = Some(format!(
                        "keeping the VIPs in {}: {e}",
                        self.settings.state_dir.join(VIPS_FILE).display()
                    ))
                }
            }
        }
        self.zone.replace(st.zone.clone());
        // The tables first: a container's packets are only accepted once
        // its address and veth are in the kernel (anti-spoofing).
        let mut failed = self.write_tables(&st, &peers);
        failed.extend(vips_failed);
        for &ifindex in &st.veths {
            if let Err(e) = self.attachments.ensure(&mut self.ebpf, ifindex) {
                warn!(ifindex, error = %e, "could not attach the TC programs");
            }
        }
        self.attachments.sweep(&st.veths);
        self.write_sock_netns(&mut failed);
        self.write_bridges(&mut failed);
        self.write_vips(&st, &mut failed);
        self.publish(&st);
        self.publish_networks();
        self.report_networks();
        let plan = reconcile::plan(&st.lb, &self.written.lb);
        let result = reconcile::apply(&plan, &mut self.lb, &mut self.written.lb);
        if let Err(e) = &result {
            failed.extend(e.0.iter().map(|e| e.to_string()));
        }
        let conflicts = self.write_published(&st, &mut failed);
        self.retry = !failed.is_empty();
        {
            let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.write_errors += failed.len() as u64;
        }
        // Retried with backoff: 1 s after the first failed pass, doubling
        // up to 30 s while passes keep failing.
        self.failed_passes = if failed.is_empty() {
            0
        } else {
            self.failed_passes.saturating_add(1)
        };
        let delay = Duration::from_secs(1 << self.failed_passes.saturating_sub(1).min(5))
            .min(Duration::from_secs(30));
        self.retry_at = tokio::time::Instant::now() + delay;
        self.report(&st, &peers, plan.writes(), &failed, start);
        self.report_publish_conflicts(conflicts);
        if self.after_pass_check(&peers) {
            // A repair: the next pass writes it (at once).
            self.retry = true;
            self.retry_at = tokio::time::Instant::now();
        }
    }

    /// The routing mesh's ports, after the services they point at exist:
    /// every port the cluster agreed on, except those a host process holds
    /// here. Returns every conflict (the cluster's and this host's).
    fn write_published(&mut self, st: &State, failed: &mut Vec<String>) -> Vec<String> {
        let mut conflicts = st.publish_conflicts.clone();
        let underlay = self
            .cluster
            .as_ref()
            .map(|c| Ipv4Addr::from(u32::from_be(c.local.underlay_ip_be)));
        let held = if st.published.is_empty() {
            Default::default()
        } else {
            crate::hostports::read(underlay)
        };
        let mut want = BTreeMap::new();
        for (&(port, proto), addr) in &st.published {
            if held.contains(&(port, proto)) {
                conflicts.push(format!(
                    "{port}/{proto}: a process on this host (or Docker's -p) already uses it; not published here"
                ));
                continue;
            }
            // Its service not written yet: the retry tick comes back.
            let Some(&service_id) = self.written.lb.services.get(addr) else {
                continue;
            };
            let key = mesh_common::lb::PublishedKey {
                port_be: port.to_be(),
                proto: proto.number(),
                _pad: 0,
            };
            want.insert(key, mesh_common::lb::Published { service_id });
        }
        let ops = table::plan(&want, &self.written.published);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.lb.published),
            &mut self.written.published,
        );
        failed.extend(errors.iter().map(|e| format!("published ports: {e}")));
        conflicts
    }

    fn report_publish_conflicts(&mut self, conflicts: Vec<String>) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for c in &conflicts {
            if !sh.status.publish_conflicts.contains(c) {
                warn!(conflict = %c, "published port not served");
            }
        }
        sh.status.publish_conflicts = conflicts;
    }

    /// Finds the host-side veth of containers that have none yet.
    fn resolve_veths(&mut self) {
        let v = &mut self.docker;
        for c in v.containers.values() {
            for (net, (_, mac)) in &c.nets {
                let key = (c.id.clone(), net.clone());
                if matches!(v.veths.get(&key), Some(Ok(_))) {
                    continue;
                }
                let served = net == crate::network::DEFAULT
                    || self.nets.served.iter().any(|n| &n.name == net);
                if !served {
                    continue;
                }
                let found = veth::host_ifindex(c.pid, *mac).map_err(|e| e.to_string());
                v.veths.insert(key, found);
            }
        }
        v.veths.retain(|(id, net), _| {
            v.containers
                .get(id)
                .is_some_and(|c| c.nets.contains_key(net))
        });
        if !self.settings.container_socket_lb {
            return;
        }
        // Each served container's network namespace, read once per process
        // (a failure too: it is said once, not at every pass).
        for c in v.containers.values() {
            let served = v
                .veths
                .iter()
                .any(|((id, _), found)| id == &c.id && found.is_ok());
            if !served || v.netns.get(&c.id).is_some_and(|(pid, _)| *pid == c.pid) {
                continue;
            }
            let cookie =
                crate::dataplane::sockets::netns_cookie_of(c.pid).map_err(|e| e.to_string());
            if let Err(e) = &cookie {
                warn!(container = %c.id, error = %e, "its network namespace is unknown: its connects to VIPs are translated per packet");
            }
            v.netns.insert(c.id.clone(), (c.pid, cookie));
        }
        v.netns
            .retain(|id, (pid, _)| v.containers.get(id).is_some_and(|c| c.pid == *pid));
    }

    /// The container namespaces balanced at the socket: those of the
    /// containers whose veths carry the programs.
    fn write_sock_netns(&mut self, failed: &mut Vec<String>) {
        let want: BTreeMap<u64, u32> = self
            .docker
            .netns
            .values()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|&cookie| (cookie, 1))
            .collect();
        let ops = table::plan(&want, &self.written.sock_netns);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.lb.sock_netns),
            &mut self.written.sock_netns,
        );
        failed.extend(errors.iter().map(|e| format!("socket balancing: {e}")));
        let line = if !self.settings.container_socket_lb {
            "containers' connects to VIPs translated per packet (--no-container-socket-lb, or no --cgroup)".to_string()
        } else {
            let unread = self
                .docker
                .netns
                .values()
                .filter(|(_, r)| r.is_err())
                .count();
            format!(
                "containers' connects to VIPs balanced at connect: {} container(s){}",
                self.written.sock_netns.len(),
                if unread > 0 {
                    format!(", {unread} whose namespace could not be read translated per packet")
                } else {
                    String::new()
                }
            )
        };
        self.node_status(|n| n.sockets = line);
    }

    /// Peers that left gossip without saying they stop, but whose data
    /// plane answers the ICMP probe through the tunnel: their agent is
    /// down (a crash, an OOM kill, a crash loop), not their host, whose
    /// programs still forward to its replicas. They are kept as they were
    /// (frozen) while their data plane answers, for at most
    /// [`AGENT_DOWN_MAX`], and shown in `meshctl nodes`; a host that
    /// answers nothing is gone at detection, as before.
    fn hold_agent_down(&mut self, mut peers: BTreeMap<String, Peer>) -> BTreeMap<String, Peer> {
        let probe = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .probe
            .clone();
        if let Some(probe) = probe {
            // Fresh: an answer within one and a half probe intervals, so a
            // host cut off before gossip noticed is not taken for alive.
            let fresh = crate::probe::INTERVAL * 3 / 2;
            for (name, p) in &self.last_peers {
                if !peers.contains_key(name)
                    && !self.agent_down.contains_key(name)
                    && probe.data_plane_up(name, fresh)
                {
                    warn!(node = %name, "gossip lost the node but its data plane answers: its agent is down; its backends are kept");
                    self.agent_down
                        .insert(name.clone(), (p.clone(), Instant::now()));
                }
            }
            self.agent_down.retain(|name, (_, since)| {
                if peers.contains_key(name) {
                    info!(node = %name, "the node's agent is back");
                    return false;
                }
                if !probe.data_plane_up(name, crate::probe::SILENT_AFTER) {
                    warn!(node = %name, "the node's data plane stopped answering too: the node is gone");
                    return false;
                }
                if since.elapsed() > AGENT_DOWN_MAX {
                    warn!(node = %name, "the node's agent stayed down too long: the node is dropped");
                    return false;
                }
                true
            });
            for (name, (p, _)) in &self.agent_down {
                peers.insert(name.clone(), p.clone());
            }
        } else {
            self.agent_down.clear();
        }
        self.last_peers.clone_from(&peers);
        peers
    }

    /// Every peer with a /24 is probed at its overlay address (its /24's
    /// gateway).
    fn probe_targets(&self, peers: &BTreeMap<String, Peer>, cluster: crate::vip::Cidr) {
        let probe = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .probe
            .clone();
        if let Some(probe) = probe {
            probe.set_targets(
                peers
                    .iter()
                    .filter(|(_, p)| !p.restarting)
                    .filter_map(|(name, p)| {
                        let claim = p.subnet.as_ref()?;
                        let s = crate::gossip::subnet::subnet(cluster, claim.index);
                        Some((name.clone(), s.gateway()))
                    })
                    .collect(),
            );
        }
    }

    /// The VNI of the network `ip_be` (network order) belongs to: a served
    /// overlay network's, else `mesh`'s.
    fn vni_of(&self, ip_be: u32) -> u32 {
        let ip = Ipv4Addr::from(u32::from_be(ip_be));
        self.nets
            .served
            .iter()
            .find(|n| n.cidr.contains(ip))
            .map_or(self.settings.vni, |n| n.vni)
    }

    /// The node table (every other node's slice of every network), the
    /// networks and the local endpoints, through the keyed diff.
    fn write_tables(&mut self, st: &State, peers: &BTreeMap<String, Peer>) -> Vec<String> {
        let mut failed = Vec::new();
        let cluster = self.cluster.as_ref().map(|c| {
            let (mesh_nodes, conflicts) =
                desired::nodes(peers, c.cluster_cidr, self.settings.node_subnet);
            (c.cluster_cidr, mesh_nodes, conflicts)
        });
        // The networks before the slices that point into them.
        let want = crate::dataplane::overlay::net16_slots(
            self.nets
                .served
                .iter()
                .map(|n| (u32::from(n.cidr.base).to_be(), n.vni)),
            cluster
                .iter()
                .flat_map(|(_, nodes, _)| nodes.values().map(|n| n.underlay_ip_be)),
        );
        let ops = table::plan(&want, &self.written.nets);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.overlay.nets),
            &mut self.written.nets,
        );
        failed.extend(errors.iter().map(|e| format!("network table: {e}")));
        // WireGuard knows a node before the tables send it anything.
        failed.extend(self.sync_wg_peers(peers));
        if let Some((cluster_cidr, mesh_nodes, conflicts)) = cluster {
            self.probe_targets(peers, cluster_cidr);
            for name in conflicts {
                warn!(node = %name, "a peer claims our subnet; ignoring it");
            }
            let mut want = mesh_nodes.clone();
            for claim in peers.values().filter_map(|p| p.subnet.as_ref()) {
                if claim.index == self.slice_index() || claim.index > 255 {
                    continue;
                }
                let s = crate::gossip::subnet::subnet(cluster_cidr, claim.index);
                let Some(node) = mesh_nodes.get(&u32::from(s.base).to_be()) else {
                    continue;
                };
                for n in &self.nets.served {
                    want.insert(
                        u32::from(n.slice(claim.index).base).to_be(),
                        Node {
                            vni: n.vni,
                            ..*node
                        },
                    );
                }
            }
            let ops = table::plan(&want, &self.written.nodes);
            for op in &ops {
                match op {
                    table::Op::Set(k, n) if mesh_nodes.contains_key(k) => {
                        info!(subnet = %Ipv4Addr::from(u32::from_be(*k)), underlay = %Ipv4Addr::from(u32::from_be(n.underlay_ip_be)), "node joined")
                    }
                    table::Op::Remove(k)
                        if self.written.nodes.get(k).is_some_and(|n| n.vni == 0) =>
                    {
                        info!(subnet = %Ipv4Addr::from(u32::from_be(*k)), "node left")
                    }
                    _ => {}
                }
            }
            let errors = table::apply(
                &ops,
                &mut Keyed(&mut self.overlay.nodes),
                &mut self.written.nodes,
            );
            failed.extend(errors.iter().map(|e| format!("node table: {e}")));
            let want = desired::peers(&mesh_nodes);
            let ops = table::plan(&want, &self.written.peers);
            let errors = table::apply(
                &ops,
                &mut Keyed(&mut self.overlay.peers),
                &mut self.written.peers,
            );
            failed.extend(errors.iter().map(|e| format!("peer table: {e}")));
        }
        let ops = table::plan(&st.local_eps, &self.written.local_eps);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.overlay.local_eps),
            &mut self.written.local_eps,
        );
        failed.extend(errors.iter().map(|e| format!("local endpoints: {e}")));
        let published: std::collections::BTreeSet<u32> = st
            .published
            .values()
            .filter_map(|addr| st.lb.get(addr))
            .flat_map(|backends| backends.keys().map(|(ip, _)| u32::from(*ip).to_be()))
            .collect();
        let want = crate::dataplane::overlay::veth_src(
            &st.local_eps,
            |ip| self.vni_of(ip),
            |ip| published.contains(&ip),
            &self.written.veth_src,
        );
        let ops = table::plan(&want, &self.written.veth_src);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.overlay.veth_src),
            &mut self.written.veth_src,
        );
        failed.extend(errors.iter().map(|e| format!("veth sources: {e}")));
        failed
    }

    /// Every service's VIP in `MESH_VIPS`, so a ping to one is answered
    /// (a VIP is an address containers are told to use).
    fn write_vips(&mut self, st: &State, failed: &mut Vec<String>) {
        // The services about to be written, and those written until they
        // are gone.
        let want: BTreeMap<u32, u32> = st
            .lb
            .keys()
            .chain(self.written.lb.services.keys())
            .map(|a| (u32::from(a.vip).to_be(), 0))
            .collect();
        let ops = table::plan(&want, &self.written.vips);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.overlay.vips),
            &mut self.written.vips,
        );
        failed.extend(errors.iter().map(|e| format!("VIP table: {e}")));
    }

    /// Docker's other bridges: their subnets in `MESH_BRIDGES`, then the
    /// bridge program on each (the table first: the program balances only
    /// sources it finds there). Bridges that are gone lose theirs.
    fn write_bridges(&mut self, failed: &mut Vec<String>) {
        let mut want = BTreeMap::new();
        for (dev, b) in &self.docker.bridges {
            match crate::iface::index(dev) {
                Ok(ifindex) => {
                    want.insert(ifindex, *b);
                }
                // Docker creates the bridge with the network; one that is
                // missing has nothing on it.
                Err(e) => {
                    debug!(bridge = %dev, error = %e, "a Docker bridge without its interface")
                }
            }
        }
        let ops = table::plan(&want, &self.written.bridges);
        let errors = table::apply(
            &ops,
            &mut Keyed(&mut self.overlay.bridges),
            &mut self.written.bridges,
        );
        failed.extend(errors.iter().map(|e| format!("bridge table: {e}")));
        // The program's prefilter: the widest of their masks (all ones
        // without any bridge: nothing passes it, nothing is looked up).
        let mask = want
            .values()
            .fold(u32::MAX, |m, b| m & u32::from_be(b.mask_be));
        if self.written.bridge_mask_be != Some(mask.to_be()) {
            match self.overlay.set_bridge_mask(mask.to_be()) {
                Ok(()) => self.written.bridge_mask_be = Some(mask.to_be()),
                Err(e) => failed.push(format!("bridge mask: {e}")),
            }
        }
        for &ifindex in want.keys() {
            if let Err(e) = self.attachments.ensure_bridge(&mut self.ebpf, ifindex) {
                warn!(ifindex, error = %e, "could not attach the bridge program");
            }
        }
        self.attachments
            .sweep_bridges(&want.keys().copied().collect());
    }

    /// Publishes this node's endpoints in gossip when they changed.
    fn publish(&mut self, st: &State) {
        let Some(c) = &self.cluster else { return };
        if self.fatal.is_some() {
            return;
        }
        let want: BTreeMap<String, String> = st
            .endpoints
            .iter()
            .filter_map(|e| Some((peers::endpoint_key(e), serde_json::to_string(e).ok()?)))
            .collect();
        let (mut set, delete) = key_changes(&want, &self.written.endpoints);
        if !self.written.ready {
            // After the endpoints (a higher version: a peer that has it
            // has them): an older generation held for this restart goes.
            set.push((peers::KEY_READY.to_owned(), "1".to_owned()));
        }
        if set.is_empty() && delete.is_empty() {
            return;
        }
        if c.membership.try_update(&set, &delete) {
            self.written.endpoints = want;
            self.written.ready = true;
        } else {
            // Busy gossiping: the retry tick tries again.
            self.retry = true;
        }
    }

    /// Logs and counts what gossip said that was ignored, once per new
    /// rejection; the current list goes to `meshctl status`.
    fn report_ignored(&mut self, rejected: &[Rejection]) {
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let now: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        for (r, line) in rejected.iter().zip(&now) {
            if !sh.status.gossip_ignored.contains(line) {
                warn!(node = %r.node, kind = r.kind, reason = %r.reason, "ignored from gossip");
                *sh.gossip_ignored.entry(r.kind).or_default() += 1;
            }
        }
        sh.status.gossip_ignored = now;
    }

    /// Another node holds this node's /24 with an older claim (two nodes
    /// took the same /24 while apart): this node gives it up. The agent
    /// forgets its claim and stops; restarted (its container's restart
    /// policy), it claims a free /24 and moves the `mesh` network there
    /// (`docker::ensure_network`): its containers stay up and get addresses
    /// in the new /24, DNS follows. Until then nothing here is published.
    fn give_up_subnet(&mut self, winner: &Claim) {
        let Some(c) = &self.cluster else { return };
        if self.fatal.is_some() {
            return;
        }
        let mine = crate::gossip::subnet::subnet(c.cluster_cidr, c.claim.index);
        let why = format!(
            "this node's /24 {mine} is also claimed by node {} with an older claim (made at {} ms, \
             ours at {} ms): giving it up; the agent stops and, restarted, claims a free /24 and \
             moves the mesh network and its containers there (their addresses change)",
            winner.node, winner.since_ms, c.claim.since_ms
        );
        error!("{why}");
        if let Err(e) = std::fs::remove_file(&c.claim_file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            error!(path = %c.claim_file.display(), error = %e, "could not forget the lost claim");
        }
        // Withdraw this node's endpoints now: they are in a /24 it no
        // longer holds.
        let delete: Vec<String> = self.written.endpoints.keys().cloned().collect();
        if c.membership.try_update(&[], &delete) {
            self.written.endpoints.clear();
        }
        self.fatal = Some(why);
    }

    /// Status, metrics labels, logs.
    fn report(
        &mut self,
        st: &State,
        peers: &BTreeMap<String, Peer>,
        writes: usize,
        failed: &[String],
        start: Instant,
    ) {
        let elapsed = start.elapsed().as_secs_f64();
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.reconcile_seconds.add(elapsed);
        let r = &mut sh.status.reconcile;
        r.passes += 1;
        r.last_ms = elapsed * 1e3;
        if failed.is_empty() {
            r.writes += writes as u64;
            r.last_error = None;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0);
            for t in self.pending_events.drain(..) {
                sh.latency.add((now - t).max(0) as f64 / 1e6);
            }
            if writes > 0 {
                info!(writes, ms = format!("{:.2}", elapsed * 1e3), "reconciled");
            }
        } else {
            let e = failed.join("; ");
            let retry_in = self
                .retry_at
                .saturating_duration_since(tokio::time::Instant::now());
            error!(error = %e, ?retry_in, "reconcile failed; retrying");
            r.last_error = Some(e);
        }
        for s in &st.skipped {
            if !sh.status.skipped.contains(s) {
                warn!(container = %s.container, error = %s.error, "container skipped");
            } else {
                debug!(container = %s.container, error = %s.error, "container skipped");
            }
        }
        let own = self
            .cluster
            .as_ref()
            .map_or_else(|| "this node".to_owned(), |c| c.node_id.clone());
        sh.backend_names = st
            .endpoints
            .iter()
            .map(|e| (own.clone(), e))
            .chain(
                peers
                    .iter()
                    .flat_map(|(n, p)| p.endpoints.iter().map(move |e| (n.clone(), e))),
            )
            .map(|(node, e)| {
                let container = e.container.clone();
                (e.ip, crate::shared::BackendName { node, container })
            })
            .collect();
        sh.sd_targets = st
            .endpoints
            .iter()
            .map(|e| (own.as_str(), e))
            .chain(
                peers
                    .iter()
                    .flat_map(|(n, p)| p.endpoints.iter().map(move |e| (n.as_str(), e))),
            )
            .filter(|(_, e)| e.state == mesh_common::lb::backend_state::ACTIVE)
            .filter_map(|(node, e)| {
                let mut ports: Vec<u16> = e
                    .ports
                    .iter()
                    .filter(|(_, _, proto)| *proto == crate::labels::Proto::Tcp)
                    .map(|(_, port, _)| *port)
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                (!ports.is_empty()).then(|| crate::shared::SdTarget {
                    targets: ports.iter().map(|p| format!("{}:{p}", e.ip)).collect(),
                    service: e.service.clone(),
                    network: desired::network_of(&self.nets.served, e.ip).to_owned(),
                    node: node.to_owned(),
                    container: e.container.clone(),
                })
            })
            .collect();
        sh.status.services = st.services.clone();
        sh.status.skipped = st.skipped.clone();
        sh.status.docker.containers = self.docker.containers.len();
        sh.status.event_to_map_ms = sh.latency.summary();
        if let Some(c) = &self.cluster {
            let now = std::time::Instant::now();
            for (name, p) in peers.iter() {
                let subnet = p.subnet.as_ref().map_or_else(String::new, |claim| {
                    crate::gossip::subnet::subnet(c.cluster_cidr, claim.index).to_string()
                });
                sh.known_nodes.insert(
                    name.clone(),
                    crate::shared::KnownNode {
                        underlay: p.underlay.map_or_else(String::new, |u| u.to_string()),
                        subnet,
                        version: p.version.clone().unwrap_or_default(),
                        seen: now,
                    },
                );
            }
            // Bounded: the oldest dead beyond the node table's size go.
            while sh.known_nodes.len() > mesh_common::maps::MAX_NODES as usize {
                let Some(oldest) = sh
                    .known_nodes
                    .iter()
                    .min_by_key(|(_, k)| k.seen)
                    .map(|(n, _)| n.clone())
                else {
                    break;
                };
                sh.known_nodes.remove(&oldest);
            }
            sh.status.node.name = c.node_id.clone();
            sh.status.node.underlay =
                Ipv4Addr::from(u32::from_be(c.local.underlay_ip_be)).to_string();
            sh.status.node.peers = peers.keys().cloned().collect();
            sh.status.node.restarting = peers
                .iter()
                .filter(|(_, p)| p.restarting)
                .map(|(n, _)| n.clone())
                .collect();
            sh.status.node.agent_down = self.agent_down.keys().cloned().collect();
            sh.status.node.clustered = true;
        }
        sh.service_names = self
            .written
            .lb
            .services
            .iter()
            .map(|(addr, id)| {
                let name = self
                    .vips
                    .iter()
                    .find(|(_, v)| **v == addr.vip)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                (*id, (name, addr.to_string()))
            })
            .collect();
    }

    /// Starts the DNS server once the mesh network (and so the gateway
    /// address) exists.
    pub(super) fn start_dns(&mut self) {
        let Some((listen, cfg)) = self.settings.dns.clone() else {
            return;
        };
        if self.dns.is_some() {
            return;
        }
        let gateway = self.settings.node_subnet.gateway();
        let addr = listen.unwrap_or_else(|| std::net::SocketAddr::from((gateway, 53)));
        let stats = Arc::new(crate::dns::DnsStats::default());
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).dns = Some(stats.clone());
        let handler = Arc::new(crate::dns::Handler::new(
            self.zone.clone(),
            cfg.clone(),
            stats,
        ));
        info!(%addr, domain = %cfg.domain, upstreams = ?cfg.upstreams, "DNS serving");
        self.dns = Some(handler.clone());
        self.tell_dns_engine_nets();
        self.tell_dns_networks();
        tokio::spawn(async move {
            if let Err(e) = crate::dns::serve(addr, handler).await {
                error!(%addr, error = %e, "DNS server stopped");
            }
        });
    }
}

/// Where the VIPs are kept (a restart never moves one).
pub(super) const VIPS_FILE: &str = "vips.json";

//! Overlay networks on this node (`crate::network`): the cluster's table
//! (kept in the state directory, merged from gossip, published again),
//! their Docker networks on this engine, and `meshctl network` requests.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    docker,
    gossip::peers::Peer,
    network::{self, Def, Network, Space},
    requests::NetworkRequest,
    status::NetworkRow,
};

/// This node's view of the overlay networks.
#[derive(Default)]
pub(super) struct Networks {
    /// The cluster's table as this node knows it (kept and published).
    pub table: BTreeMap<String, Def>,
    /// The live networks this node serves.
    pub served: Vec<Network>,
    pub conflicts: Vec<String>,
    /// Each network's Docker network here: its bridge, or what is wrong.
    pub docker: BTreeMap<String, Result<String, String>>,
    /// Docker's networks are not what `served` says yet.
    pub dirty: bool,
    /// Every network's containers across the cluster, as NODE/CONTAINER.
    pub users: BTreeMap<String, Vec<String>>,
    /// The `net:` and `netuse:` keys as last published.
    pub published: BTreeMap<String, String>,
}

/// Where the network table is kept.
pub(super) const TABLE_FILE: &str = "networks.json";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Daemon {
    /// The address space networks must stay out of.
    fn space(&self) -> Space {
        Space {
            cluster: self
                .cluster
                .as_ref()
                .map_or(self.settings.node_subnet, |c| c.cluster_cidr),
            vip: self.settings.vip_cidr,
            cluster_vni: self.settings.vni,
        }
    }

    /// The index of this node's /24: its slice of every network.
    pub(super) fn slice_index(&self) -> u32 {
        match &self.cluster {
            Some(c) => c.claim.index,
            None => ((u32::from(self.settings.node_subnet.base) >> 8) & 0xff).max(1),
        }
    }

    fn node_name(&self) -> String {
        self.cluster
            .as_ref()
            .map_or_else(|| "this node".to_owned(), |c| c.node_id.clone())
    }

    /// Merges the peers' tables into this node's (kept when it changed)
    /// and works out what to serve.
    pub(super) fn merge_networks(&mut self, peers: &BTreeMap<String, Peer>) {
        let mut merged = network::merge(
            std::iter::once(&self.nets.table).chain(peers.values().map(|p| &p.networks)),
        );
        network::forget_old(&mut merged.table, now_ms());
        if merged.table != self.nets.table {
            if let Err(e) = super::save_json(&self.settings.state_dir, TABLE_FILE, &merged.table) {
                warn!(error = %e, "could not keep the network table");
            }
            self.nets.table.clone_from(&merged.table);
        }
        let (served, more) = network::serve(&merged, &self.space());
        let mut conflicts = merged.conflicts;
        conflicts.extend(more);
        for c in &conflicts {
            if !self.nets.conflicts.contains(c) {
                warn!(conflict = %c, "overlay network");
            }
        }
        self.nets.conflicts = conflicts;
        let want: Vec<&str> = served.iter().map(|n| n.name.as_str()).collect();
        let have: Vec<&str> = self.nets.docker.keys().map(String::as_str).collect();
        // Also while one is not right (a removed network's Docker network
        // kept for its containers, a name taken by another network): tried
        // again at every pass, which Docker's events bring.
        if served != self.nets.served
            || want != have
            || self.nets.docker.values().any(Result::is_err)
        {
            self.nets.dirty = true;
        }
        self.nets.served = served;
        self.tell_dns_networks();
        // Who uses each network: this node's containers, then the peers'.
        let me = self.node_name();
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (net, names) in self.local_users() {
            users
                .entry(net)
                .or_default()
                .extend(names.into_iter().map(|c| format!("{me}/{c}")));
        }
        for (node, p) in peers {
            for (net, names) in &p.net_users {
                users
                    .entry(net.clone())
                    .or_default()
                    .extend(names.iter().map(|c| format!("{node}/{c}")));
            }
        }
        self.nets.users = users;
    }

    /// DNS answers each network's containers from that network's view.
    pub(super) fn tell_dns_networks(&self) {
        if let Some(dns) = &self.dns {
            dns.set_networks(
                self.nets
                    .served
                    .iter()
                    .map(|n| {
                        let net = crate::dns::Net {
                            base: n.cidr.base,
                            prefix: n.cidr.prefix,
                        };
                        (net, n.name.clone())
                    })
                    .collect(),
            );
        }
    }

    /// This node's containers on each network (`mesh` too).
    fn local_users(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in self.docker.containers.values() {
            for net in c.nets.keys() {
                if net == network::DEFAULT || self.nets.table.contains_key(net) {
                    out.entry(net.clone()).or_default().push(c.name.clone());
                }
            }
        }
        out
    }

    /// The table and this node's users of each network, in gossip.
    pub(super) fn publish_networks(&mut self) {
        let Some(c) = &self.cluster else { return };
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for (name, d) in &self.nets.table {
            if let Ok(v) = serde_json::to_string(d) {
                want.insert(format!("{}{name}", network::KEY_PREFIX), v);
            }
        }
        for (name, users) in self.local_users() {
            if let Ok(v) = serde_json::to_string(&users) {
                want.insert(format!("{}{name}", network::USE_PREFIX), v);
            }
        }
        let (set, delete) = super::pass::key_changes(&want, &self.nets.published);
        if set.is_empty() && delete.is_empty() {
            return;
        }
        if c.membership.try_update(&set, &delete) {
            self.nets.published = want;
        } else {
            self.retry = true;
        }
    }

    /// Makes this engine's Docker networks what `served` says: each served
    /// network's made, each one no longer served removed once no container
    /// is on it.
    pub(super) async fn sync_networks(&mut self, d: &bollard::Docker) {
        if !self.nets.dirty {
            return;
        }
        self.nets.dirty = false;
        let index = self.slice_index();
        let mtu = self.settings.mtu;
        for n in self.nets.served.clone() {
            // A cluster CIDR wider than a /16 numbers /24s past 255: those
            // nodes have no slice of a /16.
            let r = if (1..=255).contains(&index) {
                docker::ensure_overlay(d, &n.name, n.cidr, n.slice(index), mtu).await
            } else {
                Err(format!(
                    "this node's /24 is number {index} of the cluster CIDR; a network's /16 \
                     has slices 1 to 255"
                ))
            };
            if let Err(e) = &r
                && self.nets.docker.get(&n.name) != Some(&r)
            {
                warn!(network = %n.name, error = %e, "overlay network not set up on this engine");
            }
            self.nets.docker.insert(n.name.clone(), r);
        }
        let gone: Vec<String> = self
            .nets
            .docker
            .keys()
            .filter(|k| !self.nets.served.iter().any(|n| &n.name == *k))
            .cloned()
            .collect();
        for name in gone {
            match docker::remove_overlay(d, &name).await {
                Ok(()) => {
                    self.nets.docker.remove(&name);
                }
                Err(e) => {
                    // Tried again at the next pass.
                    let again = Err(e.clone());
                    if self.nets.docker.get(&name) != Some(&again) {
                        warn!(network = %name, error = %e, "overlay network removed, its Docker network kept");
                    }
                    self.nets.docker.insert(name, again);
                }
            }
        }
        self.report_networks();
    }

    /// The rows `meshctl network ls|inspect` shows.
    pub(super) fn report_networks(&self) {
        let index = self.slice_index();
        let mut rows = vec![NetworkRow {
            name: network::DEFAULT.into(),
            subnet: self.space().cluster.to_string(),
            vni: self.settings.vni,
            slice: self.settings.node_subnet.to_string(),
            vips: self.settings.vip_cidr.to_string(),
            creator: String::new(),
            created_ms: 0,
            docker: "ok".into(),
            containers: self
                .nets
                .users
                .get(network::DEFAULT)
                .cloned()
                .unwrap_or_default(),
        }];
        for n in &self.nets.served {
            let d = self.nets.table.get(&n.name);
            rows.push(NetworkRow {
                name: n.name.clone(),
                subnet: n.cidr.to_string(),
                vni: n.vni,
                slice: n.slice(index).to_string(),
                vips: n.vips().to_string(),
                creator: d.map(|d| d.creator.clone()).unwrap_or_default(),
                created_ms: d.map_or(0, |d| d.created_ms),
                docker: match self.nets.docker.get(&n.name) {
                    Some(Ok(dev)) => format!("ok ({dev})"),
                    Some(Err(e)) => e.clone(),
                    None => "being made".into(),
                },
                containers: self.nets.users.get(&n.name).cloned().unwrap_or_default(),
            });
        }
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.networks = rows;
        sh.status.network_conflicts.clone_from(&self.nets.conflicts);
    }

    /// One `meshctl network` request.
    pub(super) fn on_network_request(&mut self, r: NetworkRequest) {
        match r {
            NetworkRequest::Create {
                name,
                subnet,
                reply,
            } => {
                if self.cluster.is_none() {
                    let _ = reply.send(Err(
                        "networks need a cluster (--cluster-key-file; one host is enough): \
                         isolation works on the overlay's settings"
                            .into(),
                    ));
                    return;
                }
                let merged = network::merge([&self.nets.table]);
                let made = network::create(
                    &merged,
                    &self.space(),
                    &name,
                    subnet.as_deref(),
                    &self.node_name(),
                    now_ms(),
                );
                let answer = match made {
                    Ok(def) => {
                        info!(network = %name, subnet = %def.subnet, "network created");
                        self.nets.table.insert(name.clone(), def);
                        self.pass();
                        let sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                        sh.networks
                            .iter()
                            .find(|r| r.name == name)
                            .cloned()
                            .ok_or_else(|| {
                                self.nets
                                    .conflicts
                                    .iter()
                                    .find(|c| c.contains(&format!("network {name}:")))
                                    .cloned()
                                    .unwrap_or_else(|| format!("network {name} is not served"))
                            })
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(answer);
            }
            NetworkRequest::Remove { name, reply } => {
                let answer = match self.nets.table.get(&name) {
                    _ if name == network::DEFAULT => Err(format!(
                        "{name} is the default network; it cannot be removed"
                    )),
                    Some(d) if d.live() => match self.nets.users.get(&name) {
                        Some(users) if !users.is_empty() => Err(format!(
                            "network {name} is in use by {} container(s): {}",
                            users.len(),
                            users.join(", ")
                        )),
                        _ => {
                            let mut dead = d.clone();
                            dead.removed_ms = Some(now_ms().max(d.created_ms + 1));
                            info!(network = %name, "network removed");
                            self.nets.table.insert(name.clone(), dead);
                            self.pass();
                            Ok(())
                        }
                    },
                    _ => Err(format!("no network {name}")),
                };
                let _ = reply.send(answer);
            }
        }
    }
}

//! The agent's core, with no I/O: what Docker runs here, what the peers
//! publish and the VIPs assigned so far -> everything this node should
//! have: the load-balancing maps, the local endpoints, the node table, the
//! DNS zone, the endpoints to publish and the status rows.
//!
//! The daemon gathers the inputs (Docker, gossip, /proc for veths) and
//! writes the outputs (kernel maps, gossip, DNS, status); everything in
//! between is here and unit-tested without a kernel or Docker.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use mesh_common::{
    lb::backend_state,
    tunnel::{LocalEndpoint, Node},
};

use crate::{
    dns::Zone,
    docker::{Container, Health},
    gossip::{peers::Endpoint, peers::Peer, subnet},
    labels::{self, Proto},
    network::{self, Network},
    reconcile::{Desired, DesiredBackend, SvcAddr},
    status::{ServiceStatus, Skipped},
    vip::{self, Cidr},
};

/// A service's key in the VIP table, the zone and the status rows: its
/// name on `mesh`, `NAME@NETWORK` on another network (`@` is in no DNS
/// label, so the two never meet).
pub fn service_key(service: &str, network: &str) -> String {
    if network == network::DEFAULT {
        service.to_owned()
    } else {
        format!("{service}@{network}")
    }
}

/// The network an address belongs to: a served overlay network's, else
/// `mesh`.
pub fn network_of(networks: &[Network], ip: Ipv4Addr) -> &str {
    networks
        .iter()
        .find(|n| n.cidr.contains(ip))
        .map_or(network::DEFAULT, |n| n.name.as_str())
}

/// What the desired state is computed from.
pub struct Inputs<'a> {
    /// Running containers on the mesh network, by id.
    pub containers: &'a BTreeMap<String, Container>,
    /// Containers being stopped: no new flows, existing ones go on.
    pub draining: &'a BTreeSet<String>,
    /// Each container's host-side veth per network (container id,
    /// network), or why it could not be found.
    pub veths: &'a BTreeMap<(String, String), Result<u32, String>>,
    /// The overlay networks served besides `mesh`.
    pub networks: &'a [Network],
    /// Live peers, from gossip.
    pub peers: &'a BTreeMap<String, Peer>,
    /// VIPs assigned so far: an assigned VIP never moves.
    pub vips: &'a BTreeMap<String, Ipv4Addr>,
    pub vip_cidr: Cidr,
}

/// Everything this node should have.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Services and their backends (local and remote).
    pub lb: Desired,
    /// This node's containers by address (network order): where
    /// decapsulated traffic goes.
    pub local_eps: BTreeMap<u32, LocalEndpoint>,
    /// Host-side veths that get the TC programs.
    pub veths: BTreeSet<u32>,
    pub zone: Zone,
    /// This node's backends, as published in gossip.
    pub endpoints: Vec<Endpoint>,
    pub vips: BTreeMap<String, Ipv4Addr>,
    pub services: Vec<ServiceStatus>,
    pub skipped: Vec<Skipped>,
    /// The routing mesh: (published port, protocol) -> the service address
    /// that answers it, the same on every node.
    pub published: BTreeMap<(u16, Proto), SvcAddr>,
    /// Published ports not served, and why.
    pub publish_conflicts: Vec<String>,
}

/// A backend anywhere, and where it lives if it is here. A peer's
/// endpoint is borrowed: a pass at 200 nodes reads 2,000 of them.
struct Member<'a> {
    ep: std::borrow::Cow<'a, Endpoint>,
    /// Local: (veth, MAC, container name).
    local: Option<(u32, [u8; 6], String)>,
}

/// Everything this node should have, from `i`.
pub fn compute(i: &Inputs) -> State {
    let mut st = State::default();
    let (mut members, waiting) = local_members(i, &mut st);
    for p in i.peers.values() {
        members.extend(p.endpoints.iter().map(|ep| Member {
            ep: std::borrow::Cow::Borrowed(ep),
            local: None,
        }));
    }
    let ages = service_ages(i.networks, &members, &waiting);
    st.vips = assign_vips(i, &ages);
    let mut rows = Rows::default();
    for m in &members {
        add_member(i, &mut st, &mut rows, m);
    }
    for (name, n) in waiting {
        let vip = st.vips.get(&name).copied();
        st.zone.entry(name.clone()).or_default().vip = vip;
        rows.row(&name, vip).waiting += n;
    }
    for z in st.zone.values_mut() {
        z.tasks.sort();
        z.ports.sort();
    }
    let (published, conflicts) = published(i.networks, &members, &ages, &st.vips);
    for (&(port, proto), (name, addr)) in &published {
        if let Some(row) = rows.rows.get_mut(name) {
            row.published
                .push(format!("{port}/{proto} -> {}", addr.port));
        }
    }
    st.published = published.into_iter().map(|(k, (_, a))| (k, a)).collect();
    st.publish_conflicts = conflicts;
    st.services = rows.finish();
    st
}

/// This node's containers: each gets its local endpoint (and veth), and
/// the backends among them become members. Also, per service, how many
/// containers wait for their health check.
fn local_members<'a>(i: &Inputs, st: &mut State) -> (Vec<Member<'a>>, BTreeMap<String, usize>) {
    let mut members = Vec::new();
    let mut waiting: BTreeMap<String, usize> = BTreeMap::new();
    for c in i.containers.values() {
        for (net, (ip, mac)) in &c.nets {
            if net != network::DEFAULT && !i.networks.iter().any(|n| &n.name == net) {
                continue;
            }
            local_member(i, st, c, net, (*ip, *mac), &mut members, &mut waiting);
        }
    }
    (members, waiting)
}

/// One container on one network: its local endpoint (and veth); a member
/// if it is a backend.
fn local_member<'a>(
    i: &Inputs,
    st: &mut State,
    c: &Container,
    net: &str,
    (ip, mac): (Ipv4Addr, [u8; 6]),
    members: &mut Vec<Member<'a>>,
    waiting: &mut BTreeMap<String, usize>,
) {
    {
        let ifindex = match i.veths.get(&(c.id.clone(), net.to_owned())) {
            Some(Ok(ifindex)) => *ifindex,
            Some(Err(e)) => {
                st.skipped.push(skip(c, format!("its veth on {net}: {e}")));
                return;
            }
            None => return,
        };
        st.veths.insert(ifindex);
        st.local_eps.insert(
            u32::from(ip).to_be(),
            LocalEndpoint {
                ifindex,
                mac,
                ..Default::default()
            },
        );
        let svc = match labels::parse(&c.labels) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                st.skipped.push(skip(c, e.to_string()));
                return;
            }
        };
        let state = if i.draining.contains(&c.id) {
            backend_state::DRAINING
        } else if matches!(c.health, Health::None | Health::Healthy) {
            backend_state::ACTIVE
        } else {
            *waiting.entry(service_key(&svc.service, net)).or_default() += 1;
            return;
        };
        let ep = Endpoint {
            service: svc.service.clone(),
            created: c.created.clone(),
            ip,
            ports: svc
                .ports
                .iter()
                .map(|p| (p.vip_port, p.container_port, p.proto))
                .collect(),
            state,
            publish: svc
                .publish
                .iter()
                .map(|p| (p.published, p.vip_port, p.proto))
                .collect(),
            container: c.name.trim_start_matches('/').to_owned(),
        };
        st.endpoints.push(ep.clone());
        members.push(Member {
            ep: std::borrow::Cow::Owned(ep),
            local: Some((ifindex, mac, c.name.clone())),
        });
    }
}

/// Each service's age: its oldest container anywhere (services claim VIPs
/// and published ports in this order); one whose containers all wait for
/// their health check comes last.
fn service_ages(
    networks: &[Network],
    members: &[Member],
    waiting: &BTreeMap<String, usize>,
) -> BTreeMap<String, String> {
    let mut ages: BTreeMap<String, String> = BTreeMap::new();
    for m in members {
        let key = service_key(&m.ep.service, network_of(networks, m.ep.ip));
        match ages.get_mut(&key) {
            Some(age) if m.ep.created < *age => age.clone_from(&m.ep.created),
            Some(_) => {}
            None => {
                ages.insert(key, m.ep.created.clone());
            }
        }
    }
    for name in waiting.keys() {
        ages.entry(name.clone()).or_insert_with(|| "9999".into());
    }
    ages
}

/// Every service's VIP: `mesh`'s from the VIP range, another network's
/// from its slice 0 (inside its subnet, so a container on several
/// networks sends to it through that network's interface, from its
/// address there).
fn assign_vips(i: &Inputs, ages: &BTreeMap<String, String>) -> BTreeMap<String, Ipv4Addr> {
    let of = |net: &str| -> BTreeMap<String, String> {
        ages.iter()
            .filter(|(k, _)| match k.rsplit_once('@') {
                Some((_, n)) => n == net,
                None => net == network::DEFAULT,
            })
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    };
    let mut out = vip::assign(i.vip_cidr, &of(network::DEFAULT), i.vips);
    for n in i.networks {
        out.extend(vip::assign(n.vips(), &of(&n.name), i.vips));
    }
    out
}

/// The status rows being built: each service's row, and its ports as
/// (VIP port, protocol, container port) in the order first seen.
#[derive(Default)]
struct Rows {
    rows: BTreeMap<String, ServiceStatus>,
    ports: BTreeMap<String, Vec<(u16, Proto, u16)>>,
}

impl Rows {
    fn row(&mut self, name: &str, vip: Option<Ipv4Addr>) -> &mut ServiceStatus {
        self.rows.entry(name.to_string()).or_insert_with(|| {
            let (service, network) = name.split_once('@').unwrap_or((name, network::DEFAULT));
            ServiceStatus {
                name: service.to_string(),
                network: network.to_string(),
                vip: vip.map(|v| v.to_string()).unwrap_or_default(),
                ..ServiceStatus::default()
            }
        })
    }

    fn finish(mut self) -> Vec<ServiceStatus> {
        for (name, ports) in self.ports {
            if let Some(row) = self.rows.get_mut(&name) {
                row.ports = ports
                    .into_iter()
                    .map(|(vip_port, proto, container_port)| {
                        format!("{vip_port}/{proto} -> {container_port}")
                    })
                    .collect();
            }
        }
        self.rows.into_values().collect()
    }
}

/// One backend into the load-balancing maps, the zone and its row.
fn add_member(i: &Inputs, st: &mut State, rows: &mut Rows, m: &Member) {
    let e = &m.ep;
    let key = service_key(&e.service, network_of(i.networks, e.ip));
    let Some(vip) = st.vips.get(&key).copied() else {
        if let Some((_, _, name)) = &m.local {
            st.skipped.push(Skipped {
                container: name.clone(),
                error: format!("no free VIP for {key}"),
            });
        }
        return;
    };
    let row = rows.row(&key, Some(vip));
    let zone = st.zone.entry(key.clone()).or_default();
    zone.vip = Some(vip);
    if e.state == backend_state::ACTIVE {
        row.active += 1;
        zone.tasks.push(e.ip);
    } else {
        row.draining += 1;
    }
    let ports = rows.ports.entry(key).or_default();
    let (ifindex, mac) = m.local.as_ref().map_or((0, [0; 6]), |(i, m, _)| (*i, *m));
    for &(vip_port, container_port, proto) in &e.ports {
        if !zone.ports.contains(&(vip_port, proto)) {
            zone.ports.push((vip_port, proto));
        }
        if !ports.contains(&(vip_port, proto, container_port)) {
            ports.push((vip_port, proto, container_port));
        }
        let addr = SvcAddr {
            vip,
            port: vip_port,
            proto: proto.number(),
        };
        st.lb.entry(addr).or_default().insert(
            (e.ip, container_port),
            DesiredBackend {
                state: e.state,
                ifindex,
                mac,
            },
        );
    }
}

/// A published port: (port, protocol).
type PortKey = (u16, Proto);
/// Who claims a published port: (service age, service, VIP port).
type Claim = (String, String, u16);

/// The routing mesh's ports from every backend's labels, anywhere: each
/// (port, protocol) goes to one service, the same on every node: the oldest
/// service claiming it (then the smaller name), as with VIPs. A published
/// port whose VIP port the service does not have is not served. Both are
/// reported.
fn published(
    networks: &[Network],
    members: &[Member<'_>],
    ages: &BTreeMap<String, String>,
    vips: &BTreeMap<String, Ipv4Addr>,
) -> (BTreeMap<PortKey, (String, SvcAddr)>, Vec<String>) {
    let mut claims: BTreeMap<PortKey, BTreeSet<Claim>> = BTreeMap::new();
    let mut conflicts = BTreeSet::new();
    for m in members {
        let e = &m.ep;
        let key = service_key(&e.service, network_of(networks, e.ip));
        for &(port, vip_port, proto) in &e.publish {
            if !e.ports.iter().any(|&(v, _, p)| v == vip_port && p == proto) {
                conflicts.insert(format!(
                    "{port}/{proto}: service {key} has no VIP port {vip_port}/{proto} to publish"
                ));
                continue;
            }
            let age = ages.get(&key).cloned().unwrap_or_default();
            claims
                .entry((port, proto))
                .or_default()
                .insert((age, key.clone(), vip_port));
        }
    }
    let mut out = BTreeMap::new();
    for (key, claimants) in claims {
        let mut services: Vec<&Claim> = claimants.iter().collect();
        services.dedup_by(|a, b| a.1 == b.1);
        let Some((_, name, vip_port)) = services.first() else {
            continue;
        };
        // One service asking for two VIP ports on one published port: the
        // smaller wins (the set is ordered).
        for (_, other, _) in services.iter().skip(1) {
            if other != name {
                conflicts.insert(format!(
                    "{}/{}: published by {name} (older) and {other}; {other} does not get it",
                    key.0, key.1
                ));
            }
        }
        let Some(vip) = vips.get(name) else { continue };
        out.insert(
            key,
            (
                name.clone(),
                SvcAddr {
                    vip: *vip,
                    port: *vip_port,
                    proto: key.1.number(),
                },
            ),
        );
    }
    (out, conflicts.into_iter().collect())
}

fn skip(c: &Container, error: String) -> Skipped {
    Skipped {
        container: c.name.clone(),
        error,
    }
}

/// The node table: every live peer with an address, a MAC and a claim, by
/// its /24 (network order). A peer claiming this node's own /24 is left
/// out and named in the second value.
pub fn nodes(
    peers: &BTreeMap<String, Peer>,
    cluster: Cidr,
    own: Cidr,
) -> (BTreeMap<u32, Node>, Vec<String>) {
    let mut table = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (name, p) in peers {
        let (Some(ip), Some(mac), Some(claim)) = (p.underlay, p.mac, &p.subnet) else {
            continue;
        };
        let s = subnet::subnet(cluster, claim.index);
        if s.base == own.base {
            conflicts.push(name.clone());
            continue;
        }
        table.insert(
            u32::from(s.base).to_be(),
            Node {
                underlay_ip_be: u32::from(ip).to_be(),
                // A mesh node decapsulates in XDP on that NIC.
                inner_mac: mac,
                _pad: [0; 2],
                vni: 0,
            },
        );
    }
    (table, conflicts)
}

/// The VXLAN sources to accept: every node of the node table by its
/// underlay address (network order), with its /24.
pub fn peers(nodes: &BTreeMap<u32, Node>) -> BTreeMap<u32, u32> {
    nodes
        .iter()
        .map(|(subnet, n)| (n.underlay_ip_be, *subnet))
        .collect()
}

#[cfg(test)]
mod tests;

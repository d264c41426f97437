//! The pure core against hand-made inventories and peers.

use std::collections::HashMap;

use super::*;
use crate::labels::Proto;

const CIDR: Cidr = Cidr {
    base: Ipv4Addr::new(10, 43, 0, 0),
    prefix: 16,
};

fn container(id: &str, last: u8, labels: &[(&str, &str)], health: Health) -> Container {
    Container {
        id: id.into(),
        name: format!("c-{id}"),
        created: format!("2026-01-01T00:00:0{last}Z"),
        running: true,
        pid: 100 + last as u32,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        nets: [(
            network::DEFAULT.to_owned(),
            (Ipv4Addr::new(10, 42, 1, last), [2, 0, 0, 0, 0, last]),
        )]
        .into(),
        health,
    }
}

const WEB: [(&str, &str); 2] = [("mesh.service", "web"), ("mesh.port", "80:8080/tcp")];

struct World {
    containers: BTreeMap<String, Container>,
    draining: BTreeSet<String>,
    veths: BTreeMap<(String, String), Result<u32, String>>,
    peers: BTreeMap<String, Peer>,
    vips: BTreeMap<String, Ipv4Addr>,
    networks: Vec<Network>,
}

impl World {
    fn new(cs: Vec<Container>) -> Self {
        let veths = cs
            .iter()
            .flat_map(|c| {
                c.nets.iter().enumerate().map(|(k, (net, _))| {
                    (
                        (c.id.clone(), net.clone()),
                        Ok(c.pid + 1000 + 100 * k as u32),
                    )
                })
            })
            .collect();
        World {
            containers: cs.into_iter().map(|c| (c.id.clone(), c)).collect(),
            draining: BTreeSet::new(),
            veths,
            peers: BTreeMap::new(),
            vips: BTreeMap::new(),
            networks: Vec::new(),
        }
    }
    fn compute(&self) -> State {
        compute(&Inputs {
            containers: &self.containers,
            draining: &self.draining,
            veths: &self.veths,
            peers: &self.peers,
            vips: &self.vips,
            vip_cidr: CIDR,
            networks: &self.networks,
        })
    }
}

#[test]
fn local_and_remote_backends_share_one_service() {
    let mut w = World::new(vec![
        container("a", 2, &WEB, Health::None),
        container("b", 3, &[], Health::None),
    ]);
    w.peers.insert(
        "n2".into(),
        Peer {
            endpoints: std::sync::Arc::new(vec![Endpoint {
                service: "web".into(),
                created: "2026-01-01T00:00:01Z".into(),
                ip: Ipv4Addr::new(10, 42, 2, 7),
                ports: vec![(80, 8080, Proto::Tcp)],
                state: backend_state::ACTIVE,
                publish: vec![],
                container: String::new(),
            }]),
            ..Peer::default()
        },
    );
    let st = w.compute();
    let vip = st.vips["web"];
    assert!(CIDR.contains(vip));
    let backends = &st.lb[&SvcAddr {
        vip,
        port: 80,
        proto: 6,
    }];
    assert_eq!(backends.len(), 2);
    let local = backends[&(Ipv4Addr::new(10, 42, 1, 2), 8080)];
    assert_eq!((local.ifindex, local.state), (1102, backend_state::ACTIVE));
    let remote = backends[&(Ipv4Addr::new(10, 42, 2, 7), 8080)];
    assert_eq!(
        remote.ifindex, 0,
        "a remote backend goes through the tunnel"
    );
    // Every local container is an endpoint and gets the programs; only
    // the labelled one is published.
    assert_eq!(st.local_eps.len(), 2);
    assert_eq!(st.veths, [1102, 1103].into());
    assert_eq!(st.endpoints.len(), 1);
    assert_eq!(st.zone["web"].tasks.len(), 2);
    assert_eq!(st.zone["web"].ports, vec![(80, Proto::Tcp)]);
    assert_eq!(
        (st.services[0].active, st.services[0].ports.clone()),
        (2, vec!["80/tcp -> 8080".to_string()])
    );
    // The same inputs, the same state (VIPs included).
    w.vips = st.vips.clone();
    assert_eq!(w.compute(), st);
}

#[test]
fn draining_unhealthy_bad_labels_and_missing_veths() {
    let mut w = World::new(vec![
        container("a", 2, &WEB, Health::None),
        container("b", 3, &WEB, Health::Starting),
        container("c", 4, &[("mesh.service", "Bad Name")], Health::None),
        container("d", 5, &WEB, Health::Healthy),
        container("e", 6, &WEB, Health::None),
    ]);
    w.draining.insert("d".into());
    w.veths
        .insert(("e".into(), network::DEFAULT.into()), Err("gone".into()));
    let st = w.compute();
    let row = &st.services[0];
    assert_eq!(
        (row.active, row.draining, row.waiting),
        (1, 1, 1),
        "{row:?}"
    );
    let skipped: Vec<&str> = st.skipped.iter().map(|s| s.container.as_str()).collect();
    assert_eq!(skipped, ["c-c", "c-e"]);
    assert!(st.skipped[1].error.contains("its veth on mesh: gone"));
    assert_eq!(st.zone["web"].tasks, [Ipv4Addr::new(10, 42, 1, 2)]);
    let backends = st.lb.values().next().expect("one service");
    assert_eq!(
        backends.len(),
        2,
        "active and draining; not the waiting one"
    );
}

#[test]
fn node_table_skips_incomplete_peers_and_our_own_subnet() {
    let cluster = Cidr {
        base: Ipv4Addr::new(10, 42, 0, 0),
        prefix: 16,
    };
    let own = subnet::subnet(cluster, 1);
    let peer = |index: u32| Peer {
        underlay: Some(Ipv4Addr::new(192, 168, 1, index as u8)),
        mac: Some([2, 0, 0, 0, 0, index as u8]),
        subnet: Some(subnet::Claim {
            node: "x".into(),
            index,
            since_ms: 0,
        }),
        endpoints: Default::default(),
        ..Peer::default()
    };
    let peers: BTreeMap<String, Peer> = [
        ("n2".to_string(), peer(2)),
        ("thief".to_string(), peer(1)),
        (
            "half".to_string(),
            Peer {
                mac: None,
                ..peer(3)
            },
        ),
    ]
    .into();
    let (table, conflicts) = nodes(&peers, cluster, own);
    assert_eq!(conflicts, ["thief"]);
    assert_eq!(table.len(), 1);
    let n2 = table[&u32::from(Ipv4Addr::new(10, 42, 2, 0)).to_be()];
    assert_eq!(
        n2.underlay_ip_be,
        u32::from(Ipv4Addr::new(192, 168, 1, 2)).to_be()
    );
}

/// Published ports: from any backend's labels, the same table on every
/// node (a node without a backend of its own serves them too); a port
/// two services publish goes to the older; a published port without its
/// VIP port is reported, not served.
#[test]
fn published_ports_are_agreed_and_conflicts_reported() {
    let web = [
        ("mesh.service", "web"),
        ("mesh.port", "80:8080/tcp,53/udp"),
        ("mesh.publish", "8080:80/tcp,5353:53/udp"),
    ];
    // "api" is younger than "web" (created later) and also wants 8080/tcp;
    // it also publishes a port for a VIP port it does not have.
    let api = [
        ("mesh.service", "api"),
        ("mesh.port", "80/tcp"),
        ("mesh.publish", "8080:80/tcp,9000:81/tcp"),
    ];
    let mut w = World::new(vec![
        container("a", 2, &web, Health::None),
        container("b", 3, &api, Health::None),
    ]);
    let st = w.compute();
    let web_vip = st.vips["web"];
    assert_eq!(
        st.published,
        BTreeMap::from([
            (
                (8080, Proto::Tcp),
                SvcAddr {
                    vip: web_vip,
                    port: 80,
                    proto: 6
                }
            ),
            (
                (5353, Proto::Udp),
                SvcAddr {
                    vip: web_vip,
                    port: 53,
                    proto: 17
                }
            ),
        ])
    );
    assert_eq!(st.publish_conflicts.len(), 2, "{:?}", st.publish_conflicts);
    assert!(
        st.publish_conflicts
            .iter()
            .any(|c| c.contains("8080/tcp") && c.contains("api does not get it"))
    );
    assert!(
        st.publish_conflicts
            .iter()
            .any(|c| c.contains("no VIP port 81/tcp"))
    );
    let web_row = st
        .services
        .iter()
        .find(|s| s.name == "web")
        .expect("web row");
    assert_eq!(web_row.published, ["5353/udp -> 53", "8080/tcp -> 80"]);
    // The endpoints carry the publish list, so another node learns it: a
    // node with no container of its own serves the same ports.
    let mut other = World::new(vec![]);
    for (i, ep) in st.endpoints.iter().enumerate() {
        let peer = other.peers.entry(format!("n{i}")).or_default();
        std::sync::Arc::make_mut(&mut peer.endpoints).push(ep.clone());
    }
    other.vips = st.vips.clone();
    let there = other.compute();
    assert_eq!(there.published, st.published);
    w.vips = st.vips.clone();
    assert_eq!(w.compute().published, st.published);
}

#[test]
fn a_service_per_network_with_a_vip_in_the_network() {
    let front = Network {
        name: "front".into(),
        cidr: "10.44.0.0/16".parse().expect("cidr"),
        vni: 2604,
    };
    let mut on_front = container("f", 2, &WEB, Health::None);
    on_front.nets = [(
        "front".to_owned(),
        (Ipv4Addr::new(10, 44, 1, 2), [2, 0, 0, 0, 1, 2]),
    )]
    .into();
    let mut on_both = container("b", 3, &WEB, Health::None);
    on_both.nets.insert(
        "front".into(),
        (Ipv4Addr::new(10, 44, 1, 3), [2, 0, 0, 0, 1, 3]),
    );
    // Not served here: its attachment is left alone.
    let mut elsewhere = container("x", 4, &WEB, Health::None);
    elsewhere.nets = [(
        "back".to_owned(),
        (Ipv4Addr::new(10, 45, 1, 4), [2, 0, 0, 0, 1, 4]),
    )]
    .into();
    let mut w = World::new(vec![on_front, on_both, elsewhere]);
    w.networks = vec![front];
    let st = w.compute();
    let mesh_vip = st.vips["web"];
    let front_vip = st.vips["web@front"];
    assert!(CIDR.contains(mesh_vip), "{mesh_vip}");
    assert_eq!(front_vip.octets()[..3], [10, 44, 0], "{front_vip}");
    assert_eq!(st.zone["web"].tasks, [Ipv4Addr::new(10, 42, 1, 3)]);
    assert_eq!(
        st.zone["web@front"].tasks,
        [Ipv4Addr::new(10, 44, 1, 2), Ipv4Addr::new(10, 44, 1, 3)]
    );
    // Three local endpoints (the container on both has one per network).
    assert_eq!(st.local_eps.len(), 3);
    let rows: Vec<(&str, &str)> = st
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.network.as_str()))
        .collect();
    assert_eq!(rows, [("web", "mesh"), ("web", "front")]);
}

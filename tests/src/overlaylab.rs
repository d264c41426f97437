//! Two nodes in network namespaces on an underlay bridge (a namespace of
//! its own, 192.168.77.0/24), each with a bridge (its `mesh` network,
//! 10.42.N.0/24) and one container; each node runs its own data plane (XDP
//! on the underlay NIC, TC on the container's veth) with the overlay maps
//! written the way the agent writes them. Clients outside the cluster can
//! join the underlay ([`OverlayLab::outside_client`]).

use std::net::Ipv4Addr;

use aya::programs::{TcAttachType, XdpMode};
use mesh_agent::dataplane::{self, progs};
use mesh_common::tunnel::{LocalNode, Node};

use crate::{
    harness::Harness,
    netns::{Netns, unique},
};

pub const VNI: u32 = 4242;

pub struct NodeNs {
    pub n: u8,
    pub harness: Harness,
    pub container: Netns,
    pub node: Netns,
    pub underlay_ip: Ipv4Addr,
    pub underlay_mac: [u8; 6],
    pub underlay_ifindex: u32,
}

impl NodeNs {
    /// The container's address: 10.42.N.2.
    pub fn container_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 42, self.n, 2)
    }
}

pub struct OverlayLab {
    // Drop order: the nodes (their programs), then the underlay.
    pub nodes: Vec<NodeNs>,
    /// The underlay's namespace: bridge `br0`, node N's port `pN`.
    pub underlay: Netns,
}

fn mac(v: serde_json::Value) -> [u8; 6] {
    let s = v.as_str().expect("mac string");
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

impl OverlayLab {
    /// Nodes 1 and 2, underlay 192.168.77.N, XDP attached in generic mode
    /// (`--xdp-mode generic`: these tests cover the XDP path; the agent's
    /// default, no XDP, runs in the lab and the VMs).
    pub fn new() -> Self {
        Self::with_xdp(Some(XdpMode::Skb))
    }

    /// [`OverlayLab::new`] with XDP attached in `mode`, or none (`None`,
    /// `--xdp-mode off`: the underlay TC program does XDP's part).
    pub fn with_xdp(mode: Option<XdpMode>) -> Self {
        let underlay = Netns::new(&unique("mou"));
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let node_ns: Vec<Netns> = (1..=2)
            .map(|n| {
                let node = Netns::new(&unique(&format!("mon{n}")));
                let port = format!("p{n}");
                underlay.ip(&[
                    "link", "add", &port, "type", "veth", "peer", "eth0", "netns", &node.name,
                ]);
                underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
                node
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, node) in node_ns.into_iter().enumerate() {
            let n = i as u8 + 1;
            let underlay_ip = Ipv4Addr::new(192, 168, 77, n);
            node.ip(&["addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"]);
            node.ip(&["link", "set", "eth0", "up"]);
            node.ip(&["link", "add", "br0", "type", "bridge"]);
            node.ip(&["addr", "add", &format!("10.42.{n}.1/24"), "dev", "br0"]);
            node.ip(&["link", "set", "br0", "up"]);
            // No ip_forward: decapsulated traffic must reach containers without
            // the host forwarding anything (the underlay TC program delivers it).
            // Said explicitly: a new namespace inherits the host's IPv4
            // settings, and a host running libvirt or Docker forwards.
            no_forwarding(&node);
            let container = Netns::new(&unique(&format!("moc{n}")));
            node.ip(&[
                "link",
                "add",
                "vc0",
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                &container.name,
            ]);
            node.ip(&["link", "set", "vc0", "master", "br0", "up"]);
            container.ip(&["addr", "add", &format!("10.42.{n}.2/24"), "dev", "eth0"]);
            // The mesh network's MTU leaves room for the 50-byte VXLAN header.
            container.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
            container.ip(&["route", "add", "default", "via", &format!("10.42.{n}.1")]);
            let underlay_mac = mac(node.link_field("eth0", "address"));
            let underlay_ifindex = node
                .link_field("eth0", "ifindex")
                .as_u64()
                .expect("ifindex") as u32;
            let mut harness = Harness::new();
            node.run(|| {
                let ebpf = harness.ebpf_mut();
                if let Some(mode) = mode {
                    dataplane::xdp_underlay(ebpf)
                        .expect("xdp")
                        .attach("eth0", mode)
                        .expect("attach XDP to the underlay");
                }
                dataplane::tc(ebpf, progs::TC_UNDERLAY_IN)
                    .expect("tc")
                    .attach("eth0", TcAttachType::Ingress)
                    .expect("attach TC to the underlay");
                for (name, at) in [
                    (progs::TC_FROM_CONTAINER, TcAttachType::Ingress),
                    (progs::TC_TO_CONTAINER, TcAttachType::Egress),
                ] {
                    dataplane::tc(ebpf, name)
                        .expect("tc")
                        .attach("vc0", at)
                        .expect("attach TC");
                }
            });
            let vc0 = node.link_field("vc0", "ifindex").as_u64().expect("ifindex") as u32;
            let c_mac = mac(container.link_field("eth0", "address"));
            harness.container_on(Ipv4Addr::new(10, 42, n, 2), vc0, c_mac, VNI);
            nodes.push(NodeNs {
                n,
                harness,
                container,
                node,
                underlay_ip,
                underlay_mac,
                underlay_ifindex,
            });
        }
        // Each node knows itself and the other, as gossip will tell it.
        for i in 0..nodes.len() {
            let (me, other) = (i, 1 - i);
            let local = LocalNode {
                subnet_be: u32::from(Ipv4Addr::new(10, 42, nodes[me].n, 0)).to_be(),
                cluster_be: u32::from(Ipv4Addr::new(10, 42, 0, 0)).to_be(),
                cluster_mask_be: 0xffff_0000u32.to_be(),
                underlay_ip_be: u32::from(nodes[me].underlay_ip).to_be(),
                underlay_ifindex: nodes[me].underlay_ifindex,
                vni: VNI,
                underlay_mac: nodes[me].underlay_mac,
                enabled: 1,
                // What the agent sets for a 1500-byte underlay.
                tunnel_mss: 1410,
                tc_only: mode.is_none() as u8,
                ..LocalNode::default()
            };
            let peer = Node {
                underlay_ip_be: u32::from(nodes[other].underlay_ip).to_be(),
                inner_mac: nodes[other].underlay_mac,
                ..Node::default()
            };
            let subnet = u32::from(Ipv4Addr::new(10, 42, nodes[other].n, 0)).to_be();
            nodes[me]
                .harness
                .overlay
                .set_local(&local)
                .expect("local node");
            nodes[me]
                .harness
                .overlay
                .set_node(subnet, &peer)
                .expect("peer node");
            nodes[me]
                .harness
                .overlay
                .set_peer(peer.underlay_ip_be, subnet)
                .expect("peer address");
        }
        OverlayLab { nodes, underlay }
    }

    /// A host outside the cluster on the underlay: 192.168.77.`100 + i`.
    pub fn outside_client(&self, i: u8) -> Netns {
        let ns = Netns::new(&unique(&format!("moo{i}")));
        let port = format!("o{i}");
        self.underlay.ip(&[
            "link", "add", &port, "type", "veth", "peer", "eth0", "netns", &ns.name,
        ]);
        self.underlay
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("192.168.77.{}/24", 100 + i),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns
    }
}

impl OverlayLab {
    /// Gives node `i` (0-based) its host link as the agent does
    /// (`mesh_agent::hostlink`: the veth, the cluster CIDR routed
    /// to it from the node's gateway 10.42.N.1, its TC program) and writes
    /// it into the node's `LocalNode`. Strict reverse-path filtering is on
    /// in the node, so answers must come in through the link.
    pub fn host_link(&mut self, i: usize) -> mesh_agent::hostlink::HostLink {
        let node = &mut self.nodes[i];
        let gateway = Ipv4Addr::new(10, 42, node.n, 1);
        let cluster = mesh_agent::vip::Cidr {
            base: Ipv4Addr::new(10, 42, 0, 0),
            prefix: 16,
        };
        for key in ["all", "default", "eth0"] {
            node.node
                .sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "1");
        }
        let ebpf = node.harness.ebpf_mut();
        let netns = &node.node;
        let link = node.node.run(|| {
            let link = mesh_agent::hostlink::ensure(cluster, gateway, 1450)
                .unwrap_or_else(|e| panic!("host link: {e}"));
            assert_eq!(link.mac, mesh_agent::hostlink::mac(gateway, false));
            // Someone (udev's MAC policy, on a host) changes its MAC; a
            // restarted agent finds the link in place and sets it back.
            netns.ip(&["link", "set", "mesh-host", "address", "02:00:00:00:00:99"]);
            let again = mesh_agent::hostlink::ensure(cluster, gateway, 1450)
                .unwrap_or_else(|e| panic!("host link again: {e}"));
            assert_eq!(link, again, "the same link the second time");
            dataplane::tc(ebpf, progs::TC_HOST_OUT)
                .expect("tc")
                .attach(mesh_agent::hostlink::NAME, TcAttachType::Egress)
                .expect("attach TC to the host link");
            link
        });
        let mut local = node.harness.overlay.local.get(&0, 0).expect("local node");
        local.host_ip_be = u32::from(gateway).to_be();
        local.host_ifindex = link.ifindex;
        local.host_mac = link.mac;
        node.harness
            .overlay
            .set_local(&local)
            .expect("local node with its host link");
        link
    }
}

impl OverlayLab {
    /// Gives node `i` (0-based) the kernel's VXLAN device as the agent does
    /// (`mesh_agent::vxlandev`: made, its TC program attached, up) and
    /// says so in the node's `LocalNode`. Made a second time, the device
    /// is found in place.
    pub fn vxlan_device(&mut self, i: usize) -> u32 {
        let node = &mut self.nodes[i];
        let port = mesh_common::tunnel::VXLAN_PORT;
        let ebpf = node.harness.ebpf_mut();
        let ifindex = node.node.run(|| {
            let ifindex =
                mesh_agent::vxlandev::ensure(port).unwrap_or_else(|e| panic!("VXLAN device: {e}"));
            dataplane::tc(ebpf, progs::TC_VXLAN_IN)
                .expect("tc")
                .attach(mesh_agent::vxlandev::NAME, TcAttachType::Ingress)
                .expect("attach TC to the VXLAN device");
            mesh_agent::vxlandev::up().unwrap_or_else(|e| panic!("VXLAN device up: {e}"));
            let again = mesh_agent::vxlandev::ensure(port)
                .unwrap_or_else(|e| panic!("VXLAN device again: {e}"));
            assert_eq!(ifindex, again, "the same device the second time");
            ifindex
        });
        let mut local = node.harness.overlay.local.get(&0, 0).expect("local node");
        local.vxlan_device = 1;
        node.harness
            .overlay
            .set_local(&local)
            .expect("local node with its VXLAN device");
        ifindex
    }

    /// Makes the underlay behave like a NIC without UDP tunnel offloads
    /// (virtio_net, most cloud NICs): a node sends its tunnel's large
    /// packets as MTU-sized frames, and each node's NIC runs GRO on what
    /// it receives (a veth does only with GRO on and a peer without TSO).
    pub fn unoffloaded_underlay(&self) {
        for node in &self.nodes {
            without_tunnel_offloads(&node.node, &self.underlay, &format!("p{}", node.n));
        }
    }
}

/// Host `host`'s `eth0`, on bridge port `port` of `underlay`, as a NIC
/// without UDP tunnel offloads: it sends the tunnel's large packets as
/// MTU-sized frames and runs GRO on what it receives (a veth does only
/// with GRO on and a peer without TSO).
pub fn without_tunnel_offloads(host: &Netns, underlay: &Netns, port: &str) {
    host.exec(&[
        "ethtool",
        "-K",
        "eth0",
        "tx-udp_tnl-segmentation",
        "off",
        "tx-udp_tnl-csum-segmentation",
        "off",
        "gro",
        "on",
    ]);
    underlay.exec(&["ethtool", "-K", port, "tso", "off"]);
}

impl Default for OverlayLab {
    fn default() -> Self {
        Self::new()
    }
}

/// Turns IPv4 forwarding off in `ns` (it inherits the host's setting).
pub fn no_forwarding(ns: &Netns) {
    ns.sysctl("net.ipv4.conf.all.forwarding", "0");
}

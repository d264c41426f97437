//! Bulk TCP throughput, every path in one run on this machine: iperf3, one
//! stream, 3 s each, two rounds (the paths take turns). Prints Gbit/s;
//! asserts nothing. Every namespace is this benchmark's own.
//!
//! - the underlay without mesh: a host outside the cluster to another;
//! - the underlay to a mesh node's own address: the same hosts' traffic
//!   through the node's NIC, which runs mesh's XDP and TC programs (traffic
//!   that is not mesh's);
//! - container to container across two nodes over mesh's overlay;
//! - container to container across two hosts over Linux's own VXLAN device
//!   and a bridge (Swarm's overlay), on the same kind of veth underlay.
//!
//! The mesh rows run three times: without XDP, the underlay TC program
//! doing its part and the kernel's VXLAN device `mesh-vxlan` in place (the
//! agent's default, `--xdp-mode off`), with XDP in generic mode and in
//! native mode (`--xdp-mode generic`, `native`), and without XDP or
//! `mesh-vxlan` (the underlay TC program then decapsulates GSO packets in
//! place, leaving their tunnel offload state). Then the default again,
//! and Linux's VXLAN again, on an underlay without tunnel offloads, as
//! virtio_net (most cloud VMs, the Vagrant lab) is: the tunnel's frames
//! cross it MTU-sized and the receiving NIC runs GRO; there once more
//! without `mesh-vxlan`, whose socket is what lets GRO merge VXLAN. `cargo
//! xtask bench` runs it (MESH_BULK_SECONDS sets the length).

use aya::programs::XdpMode;
use mesh_tests::{
    netns::{Netns, unique},
    overlaylab::{OverlayLab, without_tunnel_offloads},
};

/// Gbit/s from `client` to `addr` (an iperf3 server in `server`).
fn iperf(server: &Netns, client: &Netns, addr: &str, seconds: u32) -> Option<f64> {
    mesh_tests::iperf::gbits(
        &["ip", "netns", "exec", &server.name],
        &["ip", "netns", "exec", &client.name],
        addr,
        seconds as u64,
    )
}

/// Two hosts on a veth underlay, each with a Linux VXLAN device on a
/// bridge and a container behind it (MTU 1450), the containers on one
/// 10.50.0.0/24 across the hosts.
struct LinuxVxlan {
    underlay: Netns,
    hosts: Vec<Netns>,
    containers: Vec<Netns>,
}

impl LinuxVxlan {
    fn new() -> Self {
        let underlay = Netns::new(&unique("mbu"));
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        let mut containers = Vec::new();
        for n in 1..=2u8 {
            let host = Netns::new(&unique(&format!("mbh{n}")));
            let port = format!("p{n}");
            underlay.ip(&[
                "link", "add", &port, "type", "veth", "peer", "eth0", "netns", &host.name,
            ]);
            underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
            host.ip(&["addr", "add", &format!("192.168.78.{n}/24"), "dev", "eth0"]);
            host.ip(&["link", "set", "eth0", "up"]);
            let remote = format!("192.168.78.{}", 3 - n);
            host.ip(&[
                "link", "add", "vxlan0", "type", "vxlan", "id", "42", "remote", &remote, "dstport",
                "4789", "dev", "eth0",
            ]);
            host.ip(&["link", "add", "br0", "type", "bridge"]);
            host.ip(&["link", "set", "vxlan0", "master", "br0", "up"]);
            host.ip(&["link", "set", "br0", "up"]);
            let c = Netns::new(&unique(&format!("mbc{n}")));
            host.ip(&[
                "link", "add", "vc0", "type", "veth", "peer", "eth0", "netns", &c.name,
            ]);
            host.ip(&["link", "set", "vc0", "master", "br0", "mtu", "1450", "up"]);
            c.ip(&["addr", "add", &format!("10.50.0.{n}/24"), "dev", "eth0"]);
            c.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
            hosts.push(host);
            containers.push(c);
        }
        LinuxVxlan {
            underlay,
            hosts,
            containers,
        }
    }

    /// The underlay without tunnel offloads, as
    /// `OverlayLab::unoffloaded_underlay` makes the mesh lab's.
    fn unoffloaded(self) -> Self {
        for (i, host) in self.hosts.iter().enumerate() {
            without_tunnel_offloads(host, &self.underlay, &format!("p{}", i + 1));
        }
        self
    }
}

fn main() {
    let seconds: u32 = std::env::var("MESH_BULK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!(
        "bulk TCP (iperf3, one stream, {seconds} s, two rounds), Gbit/s; veth underlays in namespaces on this machine:"
    );
    let vxlan = LinuxVxlan::new();
    for (mode, xdp, device) in [
        ("no XDP, TC only, mesh-vxlan (default)", None, true),
        ("XDP generic", Some(XdpMode::Skb), true),
        ("XDP native", Some(XdpMode::default()), true),
        (
            "no XDP, without mesh-vxlan (GSO packets decapsulated in place)",
            None,
            false,
        ),
    ] {
        println!(" {mode}:");
        measure(&lab(xdp, device), &vxlan, seconds);
    }
    drop(vxlan);
    let vxlan = LinuxVxlan::new().unoffloaded();
    for (mode, device) in [
        ("default (no XDP, mesh-vxlan)", true),
        ("no XDP, without mesh-vxlan", false),
    ] {
        println!(" underlay without tunnel offloads (as virtio_net), {mode}:");
        let lab = lab(None, device);
        lab.unoffloaded_underlay();
        measure(&lab, &vxlan, seconds);
    }
}

/// The mesh lab with XDP in `xdp` (None: none) and, if `device`, the
/// kernel's VXLAN device on both nodes, as the agent makes it.
fn lab(xdp: Option<XdpMode>, device: bool) -> OverlayLab {
    let mut lab = OverlayLab::with_xdp(xdp);
    if device {
        for i in 0..lab.nodes.len() {
            lab.vxlan_device(i);
        }
    }
    lab
}

/// Every path, two rounds taking turns.
fn measure(lab: &OverlayLab, vxlan: &LinuxVxlan, seconds: u32) {
    let outside = [lab.outside_client(1), lab.outside_client(2)];
    let node1 = lab.nodes[0].underlay_ip.to_string();
    let c1 = lab.nodes[0].container_ip().to_string();
    type Path<'a> = (&'a str, &'a Netns, &'a Netns, &'a str);
    let paths: [Path; 4] = [
        (
            "underlay, outsider -> outsider (no mesh on the path)",
            &outside[1],
            &outside[0],
            "192.168.77.102",
        ),
        (
            "underlay, outsider -> a mesh node's own address (its NIC runs mesh's programs)",
            &lab.nodes[0].node,
            &outside[0],
            &node1,
        ),
        (
            "container -> container across nodes, mesh's overlay",
            &lab.nodes[0].container,
            &lab.nodes[1].container,
            &c1,
        ),
        (
            "container -> container across hosts, Linux VXLAN + bridge",
            &vxlan.containers[0],
            &vxlan.containers[1],
            "10.50.0.1",
        ),
    ];
    let mut results: Vec<Vec<Option<f64>>> = vec![Vec::new(); paths.len()];
    for _round in 0..2 {
        for (i, (_, server, client, addr)) in paths.iter().enumerate() {
            results[i].push(iperf(server, client, addr, seconds));
        }
    }
    for ((name, ..), r) in paths.iter().zip(&results) {
        let figures: Vec<String> = r
            .iter()
            .map(|v| v.map_or("failed".into(), |g| format!("{g:.1}")))
            .collect();
        println!("  {name:<84} {}", figures.join(", "));
    }
}

//! Bulk TCP throughput, every path in one run on this machine: iperf3, one
//! stream, 3 s each, two rounds (the paths take turns). Prints Gbit/s and
//! the machine's busy CPU per GB moved; asserts nothing. Every namespace is
//! this benchmark's own.
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
//! place, leaving their tunnel offload state). In the default mode the two
//! overlays also carry 64-byte UDP datagrams as fast as the client sends
//! them (received/s, busy CPU per datagram) and ICMP echoes (round trip).
//! Then the default again, and Linux's VXLAN again, on an underlay without
//! tunnel offloads, as virtio_net (most cloud VMs, the Vagrant lab) is: the
//! tunnel's frames cross it MTU-sized and the receiving NIC runs GRO; there
//! once more without `mesh-vxlan`, whose socket is what lets GRO merge
//! VXLAN. `cargo xtask bench` runs it. MESH_BULK_SECONDS sets the length,
//! MESH_BULK_ROUNDS the rounds; MESH_BULK_OVERLAY_ONLY=1 measures only the
//! two overlays in the default mode, with their medians and ratios
//! (MESH_BULK_UNOFFLOADED=1: on the underlay without tunnel offloads).

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
    let rounds: usize = std::env::var("MESH_BULK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let overlay_only = std::env::var_os("MESH_BULK_OVERLAY_ONLY").is_some();
    println!(
        "bulk TCP (iperf3, one stream, {seconds} s, {rounds} rounds), Gbit/s; veth underlays in namespaces on this machine:"
    );
    let vxlan = LinuxVxlan::new();
    if overlay_only {
        let unoffloaded = std::env::var_os("MESH_BULK_UNOFFLOADED").is_some();
        let vxlan = if unoffloaded {
            vxlan.unoffloaded()
        } else {
            vxlan
        };
        println!(
            " no XDP, TC only, mesh-vxlan (default), the overlays only{}:",
            if unoffloaded {
                ", underlay without tunnel offloads"
            } else {
                ""
            }
        );
        let lab = lab(None, true);
        if unoffloaded {
            lab.unoffloaded_underlay();
        }
        measure(&lab, &vxlan, seconds, rounds, true);
        small_datagrams(&lab, &vxlan, seconds, rounds);
        round_trips(&lab, &vxlan, rounds);
        return;
    }
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
        let lab = lab(xdp, device);
        measure(&lab, &vxlan, seconds, rounds, false);
        if xdp.is_none() && device {
            small_datagrams(&lab, &vxlan, seconds, rounds);
            round_trips(&lab, &vxlan, rounds);
        }
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
        measure(&lab, &vxlan, seconds, rounds, false);
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

/// Every path (or the two overlays only), `rounds` rounds taking turns.
fn measure(lab: &OverlayLab, vxlan: &LinuxVxlan, seconds: u32, rounds: usize, only: bool) {
    let outside = [lab.outside_client(1), lab.outside_client(2)];
    let underlay: [Path; 2] = [
        (
            "underlay, outsider -> outsider (no mesh on the path)",
            &outside[1],
            &outside[0],
            "192.168.77.102".to_string(),
        ),
        (
            "underlay, outsider -> a mesh node's own address (its NIC runs mesh's programs)",
            &lab.nodes[0].node,
            &outside[0],
            lab.nodes[0].underlay_ip.to_string(),
        ),
    ];
    let paths: Vec<Path> = underlay
        .into_iter()
        .filter(|_| !only)
        .chain(overlays(lab, vxlan))
        .collect();
    // Per path and round: Gbit/s and the machine's busy CPU seconds per
    // GB moved (both ends and the data path share it).
    let mut results: Vec<Vec<Option<(f64, f64)>>> = vec![Vec::new(); paths.len()];
    for _round in 0..rounds {
        for (i, (_, server, client, addr)) in paths.iter().enumerate() {
            let (g, busy) = mesh_tests::cpu::busy_during(|| iperf(server, client, addr, seconds));
            results[i].push(g.map(|g| (g, busy / (g * seconds as f64 / 8.0))));
        }
    }
    println!("  {:<84} Gbit/s (busy CPU s per GB)", "");
    print_rows(&paths, &results, |(g, c)| format!("{g:.1} ({c:.2})"));
    if only && let [mesh, linux] = &results[..] {
        let ((m, mc), (l, lc)) = (medians(mesh), medians(linux));
        println!(
            "  medians: mesh {m:.2} Gbit/s, {mc:.3} CPU s/GB; Linux VXLAN {l:.2} Gbit/s, \
             {lc:.3} CPU s/GB: mesh / Linux {:.2}x the throughput at {:.2}x the CPU per GB",
            m / l,
            mc / lc
        );
    }
}

/// A path measured: its name, the server's and the client's namespaces,
/// the server's address.
type Path<'a> = (&'static str, &'a Netns, &'a Netns, String);

/// One line per path: its name and each round's figures.
fn print_rows<T: Copy>(paths: &[Path], results: &[Vec<Option<T>>], f: fn(T) -> String) {
    for ((name, ..), r) in paths.iter().zip(results) {
        let figures: Vec<String> = r.iter().map(|v| v.map_or("failed".into(), f)).collect();
        println!("  {name:<84} {}", figures.join(", "));
    }
}

/// The medians of a path's two figures over its rounds.
fn medians(r: &[Option<(f64, f64)>]) -> (f64, f64) {
    let first: Vec<Option<f64>> = r.iter().map(|v| v.map(|v| v.0)).collect();
    let second: Vec<Option<f64>> = r.iter().map(|v| v.map(|v| v.1)).collect();
    (median(&first), median(&second))
}

/// The two overlays' paths: server, client, the server's address.
fn overlays<'a>(lab: &'a OverlayLab, vxlan: &'a LinuxVxlan) -> [Path<'a>; 2] {
    [
        (
            "container -> container across nodes, mesh's overlay",
            &lab.nodes[0].container,
            &lab.nodes[1].container,
            lab.nodes[0].container_ip().to_string(),
        ),
        (
            "container -> container across hosts, Linux VXLAN + bridge",
            &vxlan.containers[0],
            &vxlan.containers[1],
            "10.50.0.1".to_string(),
        ),
    ]
}

/// The two overlays' round trip: ICMP echoes, 3,000 a round 0.5 ms
/// apart, their average (ping's own figure), microseconds.
fn round_trips(lab: &OverlayLab, vxlan: &LinuxVxlan, rounds: usize) {
    let paths = overlays(lab, vxlan);
    let mut results: Vec<Vec<Option<f64>>> = vec![Vec::new(); paths.len()];
    for _round in 0..rounds {
        for (i, (_, _, client, addr)) in paths.iter().enumerate() {
            let out = std::process::Command::new("timeout")
                .args(["30", "ip", "netns", "exec", &client.name])
                .args(["ping", "-q", "-c", "3000", "-i", "0.0005", addr])
                .output()
                .ok();
            // "rtt min/avg/max/mdev = 0.010/0.010/0.088/0.002 ms"
            let avg = out.and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                let rtt = text.lines().find(|l| l.starts_with("rtt"))?.to_string();
                let figures = rtt.split(" = ").nth(1)?;
                figures.split('/').nth(1)?.parse::<f64>().ok()
            });
            results[i].push(avg.map(|ms| ms * 1e3));
        }
    }
    println!(
        "  round trip (ICMP echo, 3,000 a round), {:<46} average us",
        ""
    );
    print_rows(&paths, &results, |us| format!("{us:.0}"));
    if let [mesh, linux] = &results[..] {
        let (m, l) = (median(mesh), median(linux));
        println!(
            "  medians: mesh {m:.0} us, Linux VXLAN {l:.0} us: mesh / Linux {:.2}x",
            m / l
        );
    }
}

/// The two overlays with 64-byte UDP datagrams, the client sending as
/// fast as it can: datagrams received per second and the machine's busy
/// CPU per datagram received (the per-packet work, which bulk TCP's 64 KB
/// packets hide).
fn small_datagrams(lab: &OverlayLab, vxlan: &LinuxVxlan, seconds: u32, rounds: usize) {
    let paths = overlays(lab, vxlan);
    let mut results: Vec<Vec<Option<(f64, f64)>>> = vec![Vec::new(); paths.len()];
    for _round in 0..rounds {
        for (i, (_, server, client, addr)) in paths.iter().enumerate() {
            let (pps, busy) = mesh_tests::cpu::busy_during(|| {
                mesh_tests::iperf::udp_received_per_second(
                    &["ip", "netns", "exec", &server.name],
                    &["ip", "netns", "exec", &client.name],
                    addr,
                    seconds as u64,
                    64,
                )
            });
            results[i].push(pps.map(|p| (p, busy * 1e6 / (p * seconds as f64))));
        }
    }
    println!(
        "  64-byte UDP datagrams, {:<62} received/s (busy CPU us per datagram)",
        ""
    );
    print_rows(&paths, &results, |(p, c)| format!("{p:.0} ({c:.2})"));
    if let [mesh, linux] = &results[..] {
        let ((m, mc), (l, lc)) = (medians(mesh), medians(linux));
        println!(
            "  medians: mesh {m:.0}/s at {mc:.2} us, Linux VXLAN {l:.0}/s at {lc:.2} us: mesh / \
             Linux {:.2}x the datagrams at {:.2}x the CPU per datagram",
            m / l,
            mc / lc
        );
    }
}

/// The median of the rounds that gave a figure (0 if none did).
fn median(r: &[Option<f64>]) -> f64 {
    let mut v: Vec<f64> = r.iter().flatten().copied().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

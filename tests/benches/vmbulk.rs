//! Bulk TCP on the Vagrant VMs (virtio_net NICs, the lab's Debian kernel),
//! the two figures of `bulk.rs` on real virtual NICs, in one run on the
//! same three VMs:
//!
//! - a node's own traffic: node 3's host to node 1's own address (not
//!   mesh's traffic), with mesh's XDP and TC on both NICs, then with them
//!   detached (agents stopped, their underlay links unpinned);
//! - container to container across nodes: a container on node 3 to one on
//!   node 1 over mesh's overlay (agents running), then over Linux's own
//!   VXLAN device and a bridge between the same two VMs (Swarm's overlay;
//!   mesh detached, as the path without mesh).
//!
//! Each transfer is `whoami blast` of MESH_VMBULK_MIB MiB (default 256) to
//! a `whoami sink`, two rounds. Prints Gbit/s and the ratios; asserts
//! nothing. Skips (saying why) where the VMs cannot run. With
//! MESH_BENCH_ADOPT=1 it uses the VMs an earlier `cargo xtask vagrant up`
//! left (and leaves them); otherwise it brings up its own and destroys
//! them. `cargo xtask bench` runs it after `bulk`.

use mesh_lab::{
    demo::{self, Hosts},
    image::WHOAMI_IMAGE,
    vagrant::{self, Lab},
};

/// The two nodes of every path: the sender and the receiver.
const SENDER: usize = 3;
const RECEIVER: usize = 1;
/// Linux VXLAN's VNI and port: beside mesh's (4789), never the same.
const VX_VNI: &str = "42";
const VX_PORT: &str = "4790";
/// The whoami binary on the VMs' hosts, for the namespaces of Linux's
/// overlay (taken out of the image).
const WHOAMI_HOST: &str = "/usr/local/bin/mesh-whoami";

fn main() {
    let mib: u64 = std::env::var("MESH_VMBULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let Some(vms) = mesh_tests::vmbench::lab("vmbulk") else {
        return;
    };
    let lab = &vms.lab;
    for n in 1..=3 {
        demo::wait_ready(lab, n).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let bytes = mib << 20;
    for n in [SENDER, RECEIVER] {
        setup_linux_vxlan(lab, n);
    }

    // mesh attached: the host path and mesh's overlay.
    let mut host_mesh = Vec::new();
    let mut overlay_mesh = Vec::new();
    start_client(lab);
    for round in 1..=2 {
        host_mesh.push(host_path(
            lab,
            bytes,
            &format!("host, mesh attached, round {round}"),
        ));
        // A sink takes one connection: a new one each round.
        let sink_ip = start_overlay_sink(lab);
        overlay_mesh.push(blast(
            &lab,
            &["exec", "vmbulk-client", "/whoami", "blast"],
            &format!("{sink_ip}:5001"),
            bytes,
            &format!("mesh overlay, round {round}"),
        ));
    }

    // mesh detached: the same host path, and Linux's overlay.
    for n in [SENDER, RECEIVER] {
        detach(lab, n);
    }
    let mut host_plain = Vec::new();
    let mut overlay_linux = Vec::new();
    for round in 1..=2 {
        host_plain.push(host_path(
            lab,
            bytes,
            &format!("host, no mesh, round {round}"),
        ));
        lab.ssh(
            RECEIVER,
            &[
                "sh",
                "-c",
                &format!(
                    "setsid ip netns exec vxc {WHOAMI_HOST} sink 5003 </dev/null >/dev/null 2>&1 &"
                ),
            ],
        )
        .run()
        .unwrap_or_else(|e| panic!("Linux VXLAN sink: {e:#}"));
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = lab
            .ssh(
                SENDER,
                &[
                    "ip",
                    "netns",
                    "exec",
                    "vxc",
                    WHOAMI_HOST,
                    "blast",
                    &format!("10.99.0.{RECEIVER}:5003"),
                    &bytes.to_string(),
                ],
            )
            .output()
            .unwrap_or_else(|e| panic!("Linux VXLAN blast: {e:#}"));
        overlay_linux.push(gbits(&out, bytes, &format!("Linux VXLAN, round {round}")));
    }
    for n in [SENDER, RECEIVER] {
        reattach(lab, n);
    }

    let kernel = lab.ssh(1, &["uname", "-r"]).output().unwrap_or_default();
    let (driver, _) = vagrant::vm_driver();
    println!(
        "\nbulk TCP on the Vagrant VMs (VMs of type {driver}, virtio_net, guest kernel {}), \
         node {SENDER} -> node {RECEIVER}, `whoami blast` of {mib} MiB, two rounds:",
        kernel.trim()
    );
    println!("| path | Gbit/s | against the path without mesh (goal) |");
    println!("|---|---|---|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ratio = |a: &[f64], b: &[f64]| mean(a) / mean(b).max(f64::MIN_POSITIVE);
    println!(
        "| host to node {RECEIVER}'s address, no mesh | {} | |",
        list(&host_plain)
    );
    println!(
        "| host to node {RECEIVER}'s address, mesh's XDP and TC on the NICs | {} | {:.2}x (0.9x) |",
        list(&host_mesh),
        ratio(&host_mesh, &host_plain)
    );
    println!(
        "| container to container, Linux VXLAN + bridge | {} | |",
        list(&overlay_linux)
    );
    println!(
        "| container to container, mesh's overlay | {} | {:.2}x (1.0x) |",
        list(&overlay_mesh),
        ratio(&overlay_mesh, &overlay_linux)
    );
}

/// Gbit/s of a blast whose output is `out` ("sent N bytes in MS ms ...").
fn gbits(out: &str, bytes: u64, label: &str) -> f64 {
    println!("{label}: {}", out.trim());
    let ms: f64 = out
        .split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{label}: blast said {out:?}"));
    bytes as f64 * 8.0 / (ms / 1e3) / 1e9
}

/// A blast from node SENDER (`cmd`: docker arguments up to `blast`) to
/// `to`.
fn blast(lab: &Lab, cmd: &[&str], to: &str, bytes: u64, label: &str) -> f64 {
    let size = bytes.to_string();
    let mut args = cmd.to_vec();
    args.extend([to, size.as_str()]);
    let out = lab
        .docker(SENDER, &args)
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
    gbits(&out, bytes, label)
}

/// Node SENDER's host to node RECEIVER's own address: a sink and a blast
/// in the hosts' network namespaces.
fn host_path(lab: &Lab, bytes: u64, label: &str) -> f64 {
    let _ = lab.docker(RECEIVER, &["rm", "-f", "vmbulk-hostsink"]);
    lab.docker(
        RECEIVER,
        &[
            "run",
            "-d",
            "--name",
            "vmbulk-hostsink",
            "--network",
            "host",
            WHOAMI_IMAGE,
            "sink",
            "5002",
        ],
    )
    .unwrap_or_else(|e| panic!("host sink: {e:#}"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let to = format!("{}:5002", lab.node_ip(RECEIVER));
    let v = blast(
        lab,
        &["run", "--rm", "--network", "host", WHOAMI_IMAGE, "blast"],
        &to,
        bytes,
        label,
    );
    let _ = lab.docker(RECEIVER, &["rm", "-f", "vmbulk-hostsink"]);
    v
}

/// A sink container of network `mesh` on node RECEIVER; its address.
fn start_overlay_sink(lab: &Lab) -> String {
    let _ = lab.docker(RECEIVER, &["rm", "-f", "vmbulk-sink"]);
    lab.docker(
        RECEIVER,
        &[
            "run",
            "-d",
            "--name",
            "vmbulk-sink",
            "--network",
            "mesh",
            WHOAMI_IMAGE,
            "sink",
            "5001",
        ],
    )
    .unwrap_or_else(|e| panic!("overlay sink: {e:#}"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let ip = lab
        .docker(
            RECEIVER,
            &[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                "vmbulk-sink",
            ],
        )
        .unwrap_or_else(|e| panic!("overlay sink's address: {e:#}"));
    ip.trim().to_string()
}

/// The client container of network `mesh` on node SENDER.
fn start_client(lab: &Lab) {
    let _ = lab.docker(SENDER, &["rm", "-f", "vmbulk-client"]);
    demo::idle_client(lab, SENDER, "vmbulk-client")
        .unwrap_or_else(|e| panic!("overlay client: {e:#}"));
    // The agent attaches the container's veth before it may send.
    std::thread::sleep(std::time::Duration::from_secs(3));
}

/// Node `n` gets Linux's overlay: a bridge with a VXLAN device to the
/// other node and a namespace `vxc` (10.99.0.n/24, MTU 1450 as the VXLAN
/// device's) behind a veth on it, and the whoami binary on its host.
fn setup_linux_vxlan(lab: &Lab, n: usize) {
    let peer = if n == SENDER { RECEIVER } else { SENDER };
    let script = format!(
        "set -e
ip netns del vxc 2>/dev/null || true
ip link del vxb 2>/dev/null || true
ip link del vx{VX_VNI} 2>/dev/null || true
ip link add vxb type bridge
ip link add vx{VX_VNI} type vxlan id {VX_VNI} dstport {VX_PORT} local {local} remote {remote} dev eth1
ip link set vx{VX_VNI} master vxb up
ip netns add vxc
ip link add vxh mtu 1450 type veth peer name vxc0 mtu 1450 netns vxc
ip link set vxh master vxb up
ip link set vxb up
ip -n vxc link set lo up
ip -n vxc link set vxc0 up
ip -n vxc addr add 10.99.0.{n}/24 dev vxc0
id=$(docker create {WHOAMI_IMAGE})
docker cp $id:/whoami {WHOAMI_HOST}
docker rm $id >/dev/null",
        local = lab.node_ip(n),
        remote = lab.node_ip(peer),
    );
    lab.ssh(n, &["sh", "-c", &script])
        .run()
        .unwrap_or_else(|e| panic!("Linux VXLAN on node {n}: {e:#}"));
}

/// Node `n` without mesh on its NIC: the agent stopped (the data plane
/// stays, by design), then its underlay links unpinned, which detaches them.
fn detach(lab: &Lab, n: usize) {
    let script = "set -e
docker stop mesh-agent >/dev/null
idx=$(cat /sys/class/net/eth1/ifindex)
rm -f /sys/fs/bpf/*/links/xdp_$idx /sys/fs/bpf/*/links/tc_underlay_$idx
ip link show eth1 | grep -q xdp && { echo 'XDP still attached' >&2; exit 1; } || true";
    lab.ssh(n, &["sh", "-c", script])
        .run()
        .unwrap_or_else(|e| panic!("detaching mesh on node {n}: {e:#}"));
}

/// Node `n`'s agent started again (it attaches its programs anew).
fn reattach(lab: &Lab, n: usize) {
    lab.ssh(n, &["docker", "start", "mesh-agent"])
        .run()
        .unwrap_or_else(|e| panic!("starting node {n}'s agent: {e:#}"));
    demo::wait_ready(lab, n).unwrap_or_else(|e| panic!("{e:#}"));
}

//! Bulk TCP on the Vagrant VMs (virtio_net NICs, the lab's Debian kernel),
//! the two figures of `bulk.rs` on real virtual NICs, in one run on the
//! same three VMs:
//!
//! - a node's own traffic: node 3's host to node 1's own address (not
//!   mesh's traffic), with mesh on both NICs, then with it detached
//!   (agents stopped, their underlay links unpinned);
//! - container to container across nodes: a container on node 3 to one on
//!   node 1 over mesh's overlay, then over Linux's own VXLAN device and a
//!   bridge between the same two VMs (Swarm's overlay), mesh detached.
//!
//! mesh's rows run without XDP (the agent's default, `--xdp-mode off`: the
//! underlay TC program does XDP's part) and with XDP in generic mode. Each
//! mode's rounds also run Linux's overlay, with mesh's programs on the NICs
//! (they pass its port's traffic): the emulated VMs' speed drifts over a
//! run, so the ratio to the same rounds' Linux row compares like with like
//! in time, and the one to the detached row at the end shows mesh's
//! programs' share of Linux's path.
//! Each transfer is `whoami blast` of MESH_VMBULK_MIB MiB (default 256) to
//! a `whoami sink`, two rounds, after an unmeasured eighth-size transfer
//! per path (the emulated VMs' first run of a kernel path is slow). Prints Gbit/s and the ratios; asserts
//! nothing: a transfer that fails is printed as failed and the run goes
//! on. Skips (saying why) where the VMs cannot run. With
//! MESH_BENCH_ADOPT=1 it uses the VMs an earlier `cargo xtask vagrant up`
//! left (and leaves them); otherwise it brings up its own and destroys
//! them. `cargo xtask bench` runs it after `bulk`.

use std::time::Duration;

use anyhow::{Context, Result};
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

/// One path's transfers, Gbit/s (NaN: failed).
type Row = Vec<f64>;

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
        setup_linux_vxlan(lab, n).unwrap_or_else(|e| panic!("Linux VXLAN on node {n}: {e:#}"));
    }
    demo::idle_client(lab, SENDER, "vmbulk-client")
        .unwrap_or_else(|e| panic!("overlay client: {e:#}"));

    // mesh attached, in each mode: the host path and mesh's overlay.
    let mut mesh_rows: Vec<(&str, Row, Row, Row)> = Vec::new();
    for (mode, setting) in [
        ("no XDP, TC only (default)", None),
        ("XDP generic (--xdp-mode generic)", Some("generic")),
    ] {
        if setting.is_some() {
            for n in 1..=3 {
                lab.set_agent_env(n, "MESH_XDP_MODE", setting)
                    .unwrap_or_else(|e| panic!("node {n}'s agent in mode {mode}: {e:#}"));
            }
            for n in 1..=3 {
                demo::wait_ready(lab, n).unwrap_or_else(|e| panic!("{e:#}"));
            }
        }
        // The agent attaches the client's veth before it may send.
        std::thread::sleep(Duration::from_secs(3));
        warm_up(&[
            host_path(lab, bytes / 8),
            overlay_path(lab, bytes / 8),
            linux_vxlan_path(lab, bytes / 8),
        ]);
        let (mut host, mut overlay, mut beside) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=2 {
            host.push(measured(
                &format!("{mode}: host, round {round}"),
                host_path(lab, bytes),
            ));
            overlay.push(measured(
                &format!("{mode}: mesh overlay, round {round}"),
                overlay_path(lab, bytes),
            ));
            beside.push(measured(
                &format!("{mode}: Linux VXLAN beside mesh, round {round}"),
                linux_vxlan_path(lab, bytes),
            ));
        }
        mesh_rows.push((mode, host, overlay, beside));
        println!(
            "node {RECEIVER} after {mode}: {}",
            decap_counters(lab).unwrap_or_else(|e| format!("counters: {e:#}"))
        );
    }

    // mesh detached: the same host path, and Linux's overlay.
    for n in [SENDER, RECEIVER] {
        detach(lab, n).unwrap_or_else(|e| panic!("detaching mesh on node {n}: {e:#}"));
    }
    warm_up(&[host_path(lab, bytes / 8), linux_vxlan_path(lab, bytes / 8)]);
    let (mut host_plain, mut linux) = (Vec::new(), Vec::new());
    for round in 1..=2 {
        host_plain.push(measured(
            &format!("host, no mesh, round {round}"),
            host_path(lab, bytes),
        ));
        linux.push(measured(
            &format!("Linux VXLAN, round {round}"),
            linux_vxlan_path(lab, bytes),
        ));
    }

    let kernel = lab.ssh(1, &["uname", "-r"]).output().unwrap_or_default();
    let (driver, _) = vagrant::vm_driver();
    println!(
        "\nbulk TCP on the Vagrant VMs (VMs of type {driver}, virtio_net, guest kernel {}), \
         node {SENDER} -> node {RECEIVER}, `whoami blast` of {mib} MiB, two rounds, Gbit/s:",
        kernel.trim()
    );
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| {
                if x.is_nan() {
                    "failed".into()
                } else {
                    format!("{x:.2}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ratio = |a: &[f64], b: &[f64]| mean(a) / mean(b);
    println!("| path | Gbit/s | against the path without mesh (goal) |");
    println!("|---|---|---|");
    println!(
        "| host to node {RECEIVER}'s address, no mesh | {} | |",
        list(&host_plain)
    );
    for (mode, host, ..) in &mesh_rows {
        println!(
            "| host to node {RECEIVER}'s address, mesh ({mode}) | {} | {:.2}x (0.9x) |",
            list(host),
            ratio(host, &host_plain)
        );
    }
    println!(
        "| container to container, Linux VXLAN + bridge | {} | |",
        list(&linux)
    );
    for (mode, _, overlay, beside) in &mesh_rows {
        println!(
            "| container to container, Linux VXLAN + bridge, mesh attached ({mode}) | {} | |",
            list(beside),
        );
        println!(
            "| container to container, mesh's overlay ({mode}) | {} | {:.2}x (1.0x); {:.2}x the row above |",
            list(overlay),
            ratio(overlay, &linux),
            ratio(overlay, beside)
        );
    }
    // Each agent back as it was, for a lab that stays (MESH_BENCH_ADOPT).
    for n in 1..=3 {
        if let Err(e) = lab.set_agent_env(n, "MESH_XDP_MODE", None) {
            println!("node {n}'s agent: {e:#}");
        }
    }
}

/// Node RECEIVER's counters of how tunnelled packets were decapsulated
/// (`meshctl stats`): by mesh, or handed to mesh-vxlan once GRO merged
/// them.
fn decap_counters(lab: &Lab) -> Result<String> {
    let out = lab.docker(RECEIVER, &["exec", "mesh-agent", "/meshctl", "stats"])?;
    Ok(out
        .lines()
        .filter(|l| {
            [
                "xdp_decap",
                "vxlan_handoff",
                "vxlan_device_in",
                "vxlan_device_unmarked",
            ]
            .iter()
            .any(|c| l.contains(c))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; "))
}

/// Unmeasured transfers, one per path, before a set of measured ones: the
/// emulated VMs translate kernel code the first time it runs, so a path's
/// first transfer is slowed by that and not by the path. A failure here is
/// the measured transfers' to report.
fn warm_up(transfers: &[Result<f64>]) {
    let done = transfers.iter().filter(|t| t.is_ok()).count();
    println!("warm-up: {done} of {} transfers done", transfers.len());
}

/// A transfer's Gbit/s, or NaN (printed) when it failed.
fn measured(label: &str, r: Result<f64>) -> f64 {
    match r {
        Ok(v) => v,
        Err(e) => {
            println!("{label}: failed: {e:#}");
            f64::NAN
        }
    }
}

/// Gbit/s of a blast whose output is `out` ("sent N bytes in MS ms ...").
fn gbits(out: &str, bytes: u64) -> Result<f64> {
    println!("  {}", out.trim());
    let ms: f64 = out
        .split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("blast said {out:?}"))?;
    Ok(bytes as f64 * 8.0 / (ms / 1e3) / 1e9)
}

/// Node SENDER's host to node RECEIVER's own address: a sink and a blast
/// in the hosts' network namespaces.
fn host_path(lab: &Lab, bytes: u64) -> Result<f64> {
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
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let to = format!("{}:5002", lab.node_ip(RECEIVER));
    let size = bytes.to_string();
    let out = lab.docker(
        SENDER,
        &[
            "run",
            "--rm",
            "--network",
            "host",
            WHOAMI_IMAGE,
            "blast",
            &to,
            &size,
        ],
    );
    let _ = lab.docker(RECEIVER, &["rm", "-f", "vmbulk-hostsink"]);
    gbits(&out?, bytes)
}

/// The client container on node SENDER to a new sink container of network
/// `mesh` on node RECEIVER (a sink takes one connection), at its address.
fn overlay_path(lab: &Lab, bytes: u64) -> Result<f64> {
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
    )?;
    // Its veth attached and its address known everywhere.
    std::thread::sleep(Duration::from_secs(3));
    let ip = lab.docker(
        RECEIVER,
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            "vmbulk-sink",
        ],
    )?;
    let to = format!("{}:5001", ip.trim());
    let size = bytes.to_string();
    let out = lab.docker(
        SENDER,
        &["exec", "vmbulk-client", "/whoami", "blast", &to, &size],
    )?;
    gbits(&out, bytes)
}

/// Namespace `vxc` on node SENDER to a sink in `vxc` on node RECEIVER,
/// over Linux's VXLAN.
fn linux_vxlan_path(lab: &Lab, bytes: u64) -> Result<f64> {
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
    .run()?;
    std::thread::sleep(Duration::from_millis(500));
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
        .output()?;
    gbits(&out, bytes)
}

/// Node `n` gets Linux's overlay: a bridge with a VXLAN device to the
/// other node and a namespace `vxc` (10.99.0.n/24, MTU 1450 as the VXLAN
/// device's) behind a veth on it, the bridge's frames let through the
/// FORWARD chain (Docker's policy drops them), and the whoami binary on
/// its host.
fn setup_linux_vxlan(lab: &Lab, n: usize) -> Result<()> {
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
iptables -D FORWARD -i vxb -o vxb -j ACCEPT 2>/dev/null || true
iptables -I FORWARD 1 -i vxb -o vxb -j ACCEPT
id=$(docker create {WHOAMI_IMAGE})
docker cp $id:/whoami {WHOAMI_HOST}
docker rm $id >/dev/null",
        local = lab.node_ip(n),
        remote = lab.node_ip(peer),
    );
    lab.ssh(n, &["sh", "-c", &script]).run()
}

/// Node `n` without mesh on its NIC: the agent stopped (the data plane
/// stays, by design), then its underlay links unpinned, which detaches
/// them.
fn detach(lab: &Lab, n: usize) -> Result<()> {
    let script = "set -e
docker stop mesh-agent >/dev/null
idx=$(cat /sys/class/net/eth1/ifindex)
rm -f /sys/fs/bpf/*/links/xdp_$idx /sys/fs/bpf/*/links/tc_underlay_$idx
if ip link show eth1 | grep -q xdp; then echo 'XDP still attached' >&2; exit 1; fi";
    lab.ssh(n, &["sh", "-c", script]).run()
}

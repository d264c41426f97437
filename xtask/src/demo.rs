//! The demo, for now on one node: the data plane attached to the underlay
//! NIC of a throwaway namespace, real traffic from a peer namespace, and
//! what the kernel counted, as `meshctl` shows it.
//!
//! Everything happens inside two namespaces this demo creates and removes:
//! mesh-demo-node (the "host", agent attached to its eth0) and
//! mesh-demo-peer (another machine on the same link).

use std::{path::PathBuf, thread, time::Duration};

use anyhow::{Context, Result, bail};

use crate::cmd::{Cmd, root};

const NODE: &str = "mesh-demo-node";
const PEER: &str = "mesh-demo-peer";
const NODE_IP: &str = "192.168.254.1";
const PEER_IP: &str = "192.168.254.2";
const PIN_DIR: &str = "/sys/fs/bpf/mesh-demo";
const RUN_DIR: &str = "/run/mesh-demo";

pub fn run() -> Result<()> {
    crate::cmd::cargo(&["build", "--quiet", "-p", "mesh-agent", "--bins"])?;
    let bin = target_dir().join("debug");
    cleanup();
    let result = demo(&bin);
    cleanup();
    result
}

fn demo(bin: &std::path::Path) -> Result<()> {
    println!("== 1. two namespaces on one link: {NODE} ({NODE_IP}, eth0) <-> {PEER} ({PEER_IP})");
    for ns in [NODE, PEER] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "link", "add", "eth0", "netns", NODE, "type", "veth", "peer", "eth0", "netns", PEER,
    ])?;
    for (ns, addr) in [(NODE, NODE_IP), (PEER, PEER_IP)] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }

    println!(
        "== 2. mesh-agent in {NODE}: load the data plane, attach XDP to eth0, pin maps in {PIN_DIR}"
    );
    let mut agent = in_ns(NODE, bin.join("mesh-agent"))
        .args(["--underlay-iface", "eth0", "--bpffs-dir", PIN_DIR])
        // Its own paths, so a real agent on this host is never touched; no
        // Docker engine in this demo (the agent waits for one and says so).
        .args([
            "--state-dir",
            RUN_DIR,
            "--api-socket",
            "/run/mesh-demo/agent.sock",
        ])
        .args([
            "--docker-socket",
            "/run/mesh-demo/docker.sock",
            "--metrics-addr",
            "127.0.0.1:9465",
        ])
        .spawn()?;
    let pinned = PathBuf::from(PIN_DIR).join(mesh_common::maps::STATS);
    let mut waited = 0;
    while !pinned.exists() {
        if let Some(status) = agent.try_wait()? {
            bail!("mesh-agent exited early: {status}");
        }
        if waited >= 100 {
            let _ = agent.kill();
            bail!("mesh-agent did not pin its maps within 10 s");
        }
        thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let outcome = traffic_and_show(bin);
    // SAFETY: kill(2) with a pid we spawned.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait()?;
    println!(
        "== 5. mesh-agent stopped ({status}); the data plane stays until its pins go: removing namespaces and pins"
    );
    outcome
}

fn traffic_and_show(bin: &std::path::Path) -> Result<()> {
    println!("== 3. traffic from {PEER}: 5 pings to {NODE_IP} (ARP + ICMP through XDP)");
    in_ns(PEER, "ping")
        .args(["-c", "5", "-i", "0.2", "-W", "1", NODE_IP])
        .run()?;
    println!("== 4. what the kernel counted: meshctl stats");
    in_ns(NODE, bin.join("meshctl"))
        .args(["--bpffs-dir", PIN_DIR, "stats"])
        .run()
}

fn ip(args: &[&str]) -> Result<()> {
    Cmd::new("ip").args(args).output().map(drop).context("ip")
}

/// A command in namespace `ns`. nsenter, not `ip netns exec`: the latter
/// remounts /sys, which would hide bpffs from the agent.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
    Cmd::new("nsenter")
        .args([format!("--net=/var/run/netns/{ns}")])
        .args(["--"])
        .args([program])
}

fn cleanup() {
    for ns in [NODE, PEER] {
        let _ = Cmd::new("ip").args(["netns", "del", ns]).ok();
    }
    // Unpinning the links detaches the programs.
    let _ = std::fs::remove_dir_all(PIN_DIR);
    let _ = std::fs::remove_dir_all(RUN_DIR);
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

//! The encrypted tunnel (`--encrypt`, kernel WireGuard) against the plain
//! one, on the Vagrant VMs: the only kernel here with WireGuard is theirs.
//! One run, the same three VMs, plain first, then every agent restarted
//! with `--encrypt`; per mode, from a client container on node 3 through a
//! VIP to a replica on node 1:
//!
//! - bulk TCP: `whoami blast` of MESH_CRYPTO_MIB MiB (default 512) to a
//!   `whoami sink`, until the sink has read it all; two rounds;
//! - CPU per GB on the sending node (3) and the receiving node (1): busy
//!   time from /proc/stat over the transfer (each VM has one vCPU);
//! - short requests: 2,000 connections one after another (connect, one
//!   answer, close): p50 and p99 latency, connections per second.
//!
//! Prints the table; asserts nothing. With MESH_BENCH_ADOPT=1 it uses
//! the VMs an earlier `cargo xtask vagrant up` left (and leaves them);
//! otherwise it brings up its own and destroys them. `cargo xtask bench
//! crypto` runs it.

use std::time::Duration;

use mesh_lab::{
    demo::{self, Hosts},
    image::WHOAMI_IMAGE,
    vagrant::Lab,
};

/// One mode's figures.
#[derive(Default)]
struct Row {
    mode: &'static str,
    gbits: Vec<f64>,
    cpu_sender: Vec<f64>,
    cpu_receiver: Vec<f64>,
    p50_us: u64,
    p99_us: u64,
    conn_per_s: f64,
}

fn main() {
    let mib: u64 = std::env::var("MESH_CRYPTO_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let Some(vms) = mesh_tests::vmbench::lab("crypto") else {
        return;
    };
    let lab = &vms.lab;
    let mut rows = Vec::new();
    for (mode, encrypt) in [("plain VXLAN", false), ("WireGuard", true)] {
        lab.set_encrypt(encrypt).unwrap_or_else(|e| panic!("{e:#}"));
        for n in 1..=3 {
            demo::wait_ready(lab, n).unwrap_or_else(|e| panic!("{e:#}"));
        }
        rows.push(measure(lab, mode, mib));
    }
    let kernel = lab.ssh(1, &["uname", "-r"]).output().unwrap_or_default();
    println!(
        "\nthe tunnel plain and encrypted, one run, 3 VMs (1 vCPU each, virtio_net, guest kernel {}); \
         client container on node 3 -> VIP -> replica on node 1",
        kernel.trim()
    );
    println!(
        "| tunnel | bulk TCP, Gbit/s ({mib} MiB x2) | CPU s/GB sender (node 3) | CPU s/GB receiver (node 1) | short: p50 us | p99 us | conn/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} |",
            r.mode,
            list(&r.gbits, 2),
            list(&r.cpu_sender, 2),
            list(&r.cpu_receiver, 2),
            r.p50_us,
            r.p99_us,
            r.conn_per_s
        );
    }
    if let [plain, wg] = &rows[..] {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "encrypted / plain: bulk {:.2}x, conn/s {:.2}x",
            mean(&wg.gbits) / mean(&plain.gbits).max(f64::MIN_POSITIVE),
            wg.conn_per_s / plain.conn_per_s.max(f64::MIN_POSITIVE)
        );
    }
}

fn measure(lab: &Lab, mode: &'static str, mib: u64) -> Row {
    let mut row = Row {
        mode,
        ..Row::default()
    };
    for (n, name) in [(3, "client"), (1, "short"), (1, "sink")] {
        let _ = lab.docker(n, &["rm", "-f", name]);
    }
    demo::idle_client(lab, 3, "client").unwrap_or_else(|e| panic!("{e:#}"));
    let args =
        mesh_lab::whoami::run_args("short", &["mesh.service=short", "mesh.port=80/tcp"], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.docker(1, &args).unwrap_or_else(|e| panic!("{e:#}"));
    let short = demo::wait_service(lab, 3, "short", 1).unwrap_or_else(|e| panic!("{e:#}"));
    let bytes = mib << 20;
    for _round in 0..2 {
        let _ = lab.docker(1, &["rm", "-f", "sink"]);
        lab.docker(
            1,
            &[
                "run",
                "-d",
                "--name",
                "sink",
                "--network",
                "mesh",
                "--label",
                "mesh.service=bulk",
                "--label",
                "mesh.port=5001/tcp",
                WHOAMI_IMAGE,
                "sink",
                "5001",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let vip = demo::wait_service(lab, 3, "bulk", 1).unwrap_or_else(|e| panic!("{e:#}"));
        let (s0, r0) = (busy(lab, 3), busy(lab, 1));
        let out = lab
            .docker(
                3,
                &[
                    "exec",
                    "client",
                    "/whoami",
                    "blast",
                    &format!("{vip}:5001"),
                    &bytes.to_string(),
                ],
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
        let (s1, r1) = (busy(lab, 3), busy(lab, 1));
        // sent N bytes in MS ms checksum C
        let ms: f64 = out
            .split_whitespace()
            .nth(4)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("blast: {out}"));
        let gb = bytes as f64 / 1e9;
        row.gbits.push(bytes as f64 * 8.0 / (ms / 1e3) / 1e9);
        row.cpu_sender.push((s1 - s0) / gb);
        row.cpu_receiver.push((r1 - r0) / gb);
        println!("{mode}: {}", out.trim());
    }
    let out = lab
        .docker(
            3,
            &[
                "exec",
                "client",
                "/whoami",
                "ask",
                "tcp",
                &format!("{short}:80"),
                "--count",
                "2000",
                "--timeout-ms",
                "2000",
                "--latency",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let summary = out
        .lines()
        .find(|l| l.starts_with("latency-us"))
        .unwrap_or_else(|| panic!("no latency line: {}", out.lines().last().unwrap_or("")));
    println!(
        "{mode}: {summary}; {}",
        out.lines().rev().nth(1).unwrap_or("")
    );
    // latency-us p50 A p99 B max C elapsed-ms D
    let f: Vec<&str> = summary.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    row.p50_us = num(2);
    row.p99_us = num(4);
    row.conn_per_s = 2000.0 / (num(8) as f64 / 1e3).max(1e-3);
    std::thread::sleep(Duration::from_millis(200));
    row
}

/// Node `n`'s busy CPU time so far, in seconds (/proc/stat: everything but
/// idle and iowait; USER_HZ is 100).
fn busy(lab: &Lab, n: usize) -> f64 {
    let stat = lab
        .ssh(n, &["head", "-1", "/proc/stat"])
        .output()
        .unwrap_or_default();
    let v: Vec<f64> = stat
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

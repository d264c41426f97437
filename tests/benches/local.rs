//! Two containers on one Docker host talking to each other, the host a
//! cluster of one (its agent as the lab's container, the overlay on): a
//! server and a client on `mesh`, with this node's packets between them
//! going straight to the other's veth (the default) and, the same
//! containers, through the Docker bridge and the host's forwarding
//! (`--local-via-bridge`, set in the node's map between modes); beside
//! them, the same pair on Docker's default bridge network (no overlay:
//! what Docker alone gives). Each mode: four `whoami ask` clients at once
//! (TCP connections: connect, one request, its answer, close) and one
//! iperf3 TCP stream (the host's iperf3 in the containers' namespaces);
//! modes take turns, medians of the rounds; the path counters say which
//! way each mode's packets went. Asserts only that every request was
//! answered and every stream gave a figure. Bounded: a fixed number of
//! requests and seconds, each with timeouts.

use std::{process::Command, time::Duration};

use aya::maps::{Array, Map, MapData};
use mesh_common::tunnel::LocalNode;
use mesh_tests::dockerlab::{Agent, Engine, Underlay, WHOAMI_IMAGE};

/// Clients asking at once.
const CLIENTS: u64 = 4;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A whoami container `name` on Docker network `network`; its address.
fn run(engine: &Engine, name: &str, network: &str) -> String {
    engine.docker_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--hostname",
        name,
        "--network",
        network,
        WHOAMI_IMAGE,
        "serve",
        "--tcp",
        "80",
    ]);
    engine
        .docker_ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            name,
        ])
        .trim()
        .to_string()
}

/// One round of one mode: connections per second, p50 and p99 (µs), and
/// the stream's Gbit/s.
struct Sample {
    conns: f64,
    p50_us: f64,
    p99_us: f64,
    gbits: f64,
}

/// The process id of container `name` (its network namespace is
/// `/proc/PID/ns/net`).
fn pid(engine: &Engine, name: &str) -> String {
    engine
        .docker_ok(&["inspect", "-f", "{{.State.Pid}}", name])
        .trim()
        .to_string()
}

/// Gbit/s of one TCP stream for `secs` seconds from container `client` to
/// `server` (`server_ip`): the host's iperf3 in each container's network
/// namespace, so the stream measures the kernel's path, not a test tool.
fn iperf(engine: &Engine, client: &str, server: &str, server_ip: &str, secs: u64) -> Option<f64> {
    let (s, c) = (pid(engine, server), pid(engine, client));
    mesh_tests::iperf::gbits(
        &["nsenter", "-t", &s, "-n"],
        &["nsenter", "-t", &c, "-n"],
        server_ip,
        secs,
    )
}

/// `n` connections from `client` to `server_ip`:80 ([`CLIENTS`] at a
/// time), then one TCP stream for `secs` seconds.
fn measure(
    engine: &Engine,
    client: &str,
    server: &str,
    server_ip: &str,
    n: u64,
    secs: u64,
) -> Sample {
    // Four clients at once, so the machine's CPUs, not one client's round
    // trips, set the pace.
    let target = format!("{server_ip}:80");
    let count = (n / CLIENTS).to_string();
    let outs: Vec<std::process::Output> = std::thread::scope(|scope| {
        let spawned: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let args = [
                    "exec",
                    client,
                    "/whoami",
                    "ask",
                    "tcp",
                    &target,
                    "--count",
                    &count,
                    "--timeout-ms",
                    "2000",
                    "--latency",
                ];
                scope.spawn(move || engine.docker(&args))
            })
            .collect();
        spawned
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    // From the first answer of any client to the last: every client's
    // line carries the time it was answered (ms).
    let (mut first, mut last) = (u64::MAX, 0u64);
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for out in outs {
        let text = String::from_utf8_lossy(&out.stdout);
        let total = text
            .lines()
            .find(|l| l.starts_with("total "))
            .unwrap_or_else(|| panic!("{client} -> {server}: no total: {text}"));
        assert!(
            total.ends_with(" err 0") && total.contains(&format!(" ok {count} ")),
            "{client} -> {server}: every request answered: {total}"
        );
        let lat: Vec<f64> = text
            .lines()
            .find(|l| l.starts_with("latency-us "))
            .unwrap_or_else(|| panic!("{client} -> {server}: no latency line"))
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [a, b, _max, _elapsed_ms] = lat[..] else {
            panic!("{client} -> {server}: latency line {lat:?}");
        };
        for ms in text
            .lines()
            .filter(|l| l.contains(" ok "))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        {
            first = first.min(ms);
            last = last.max(ms);
        }
        p50.push(a);
        p99.push(b);
    }
    let gbits = iperf(engine, client, server, server_ip, secs)
        .unwrap_or_else(|| panic!("{client} -> {server}: iperf3 gave no figure"));
    Sample {
        conns: (n / CLIENTS * CLIENTS) as f64 / (last.saturating_sub(first).max(1) as f64 / 1e3),
        p50_us: median(p50),
        p99_us: median(p99),
        gbits,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sets this node's `via_bridge` in its pinned `MESH_LOCAL_NODE` (the
/// agent writes that slot only at start and when its VXLAN device changes;
/// its self-check does not cover it). What the slot held before.
fn set_via_bridge(agent: &Agent, on: bool) -> u8 {
    let path = agent.bpffs_dir.join(mesh_common::maps::LOCAL_NODE.name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut slot: Array<MapData, LocalNode> =
        Array::try_from(Map::Array(data)).unwrap_or_else(|e| panic!("MESH_LOCAL_NODE: {e}"));
    let local = slot.get(&0, 0).expect("this node's settings");
    slot.set(
        0,
        LocalNode {
            via_bridge: on as u8,
            ..local
        },
        0,
    )
    .expect("writing this node's settings");
    local.via_bridge
}

fn main() {
    let n = env_or("MESH_LOCAL_BENCH_CONNS", 12000);
    let secs = env_or("MESH_LOCAL_BENCH_SECONDS", 3);
    let rounds = env_or("MESH_LOCAL_BENCH_ROUNDS", 5) as usize;
    let underlay = Underlay::new();
    let engine = Engine::start();
    let key = engine.write_cluster_key();
    underlay.attach(&engine, 1);
    engine.import_whoami();
    // A cluster of one (the overlay on), started with --local-via-bridge:
    // the flag reaches the kernel.
    let mut flags = underlay.cluster_flags("n1", &[1]);
    flags.push("--local-via-bridge".into());
    let agent = Agent::in_container(&engine, Some(&key), &flags);
    agent.wait_for("docker connected", Duration::from_secs(60), |s| {
        s.docker.connected
    });
    assert_eq!(
        set_via_bridge(&agent, true),
        1,
        "--local-via-bridge in the kernel"
    );
    let ip = run(&engine, "srv", "mesh");
    run(&engine, "client", "mesh");
    let bip = run(&engine, "bsrv", "bridge");
    run(&engine, "bclient", "bridge");
    // Tens of thousands of connections to one address within a minute
    // would fill a client's ports with TIME_WAIT, and every connect would
    // search longer: the clients reuse them (as load generators are set
    // up), on every path alike.
    for client in ["client", "bclient"] {
        let ok = Command::new("nsenter")
            .args(["-t", &pid(&engine, client), "-n", "sysctl", "-qw"])
            .args([
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl in {client}'s namespace");
    }
    // (row, client, server, its address, via_bridge)
    let modes = [
        (
            "mesh network, straight to the veth (default)",
            "client",
            "srv",
            &ip,
            false,
        ),
        (
            "mesh network, through the bridge (--local-via-bridge)",
            "client",
            "srv",
            &ip,
            true,
        ),
        (
            "Docker's default bridge, no overlay",
            "bclient",
            "bsrv",
            &bip,
            true,
        ),
    ];
    let counters = || {
        (
            agent.counter("local_redirect"),
            agent.counter("tc_not_service"),
        )
    };
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    let mut paths = vec![(0u64, 0u64); modes.len()];
    // A warm-up round, unmeasured; then modes take turns, each round
    // starting with another, so no mode always runs first or last (a
    // machine that slows for a moment hits them all alike).
    for (_, client, server, ip, via) in &modes {
        set_via_bridge(&agent, *via);
        measure(&engine, client, server, ip, 100, 1);
    }
    for round in 0..rounds {
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let (_, client, server, ip, via) = &modes[m];
            set_via_bridge(&agent, *via);
            let before = counters();
            samples[m].push(measure(&engine, client, server, ip, n, secs));
            let after = counters();
            paths[m].0 += after.0 - before.0;
            paths[m].1 += after.1 - before.1;
        }
    }
    set_via_bridge(&agent, false);
    println!(
        "\ntwo containers on one host (cargo xtask bench): {n} TCP connections from {CLIENTS} clients \
         at once, each connection a request and its answer (whoami ask), and one TCP stream for \
         {secs} s (iperf3 in the containers' namespaces), client to server; the mesh modes are the \
         same containers, this node's via_bridge set between them; medians of {rounds} rounds, \
         modes taking turns (each round starting with the next)"
    );
    println!(
        "  {:<56} {:>9} {:>8} {:>8} {:>9}   path counters",
        "mode", "conn/s", "p50 µs", "p99 µs", "Gbit/s"
    );
    let med = |m: usize, f: &dyn Fn(&Sample) -> f64| median(samples[m].iter().map(f).collect());
    for (m, (row, ..)) in modes.iter().enumerate() {
        println!(
            "  {row:<56} {:>9.0} {:>8.0} {:>8.0} {:>9.2}   local_redirect +{}, tc_not_service +{}",
            med(m, &|x| x.conns),
            med(m, &|x| x.p50_us),
            med(m, &|x| x.p99_us),
            med(m, &|x| x.gbits),
            paths[m].0,
            paths[m].1,
        );
    }
    let ratio = |a: usize, b: usize| {
        (
            med(a, &|x| x.conns) / med(b, &|x| x.conns),
            med(a, &|x| x.gbits) / med(b, &|x| x.gbits),
        )
    };
    let (via_c, via_g) = ratio(0, 1);
    let (dock_c, dock_g) = ratio(0, 2);
    let (old_c, old_g) = ratio(1, 2);
    println!(
        "  straight to the veth against through the bridge: {via_c:.2}x conn/s, {via_g:.2}x Gbit/s; \
         against Docker's bridge: {dock_c:.2}x conn/s, {dock_g:.2}x Gbit/s (through the bridge: \
         {old_c:.2}x, {old_g:.2}x)"
    );
    drop(agent);
}

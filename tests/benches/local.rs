//! Two containers on one Docker host talking to each other, on two hosts
//! of one cluster (their agents as the lab's containers): node 1 runs the
//! default, where a container's packets for another container of its
//! network go straight to that container's veth; node 2 runs with
//! `--local-via-bridge`, where they cross the Docker bridge and the host's
//! forwarding. Beside them on each host, the same pair on Docker's default
//! bridge network (no overlay: what Docker alone gives). Each mode: four
//! `whoami ask` clients at once (TCP connections: connect, one request,
//! its answer, close) and one iperf3 TCP stream (the host's iperf3 in the containers'
//! namespaces); modes take turns, medians of the rounds. The path counters of each node prove
//! which way its mesh pair's packets went. Asserts only that every request
//! was answered and every stream gave a figure. Bounded: a fixed number of
//! requests and seconds, each with timeouts.

use std::{process::Command, time::Duration};

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

fn main() {
    let n = env_or("MESH_LOCAL_BENCH_CONNS", 12000);
    let secs = env_or("MESH_LOCAL_BENCH_SECONDS", 3);
    let rounds = env_or("MESH_LOCAL_BENCH_ROUNDS", 3) as usize;
    let underlay = Underlay::new();
    let engines = [Engine::start(), Engine::start()];
    let key = engines[0].write_cluster_key();
    for (i, e) in engines.iter().enumerate() {
        underlay.attach(e, i as u8 + 1);
        e.import_whoami();
    }
    let agents: Vec<Agent> = [(1u8, None), (2, Some("--local-via-bridge"))]
        .into_iter()
        .map(|(i, extra)| {
            let mut flags = underlay.cluster_flags(&format!("n{i}"), &[1]);
            flags.extend(extra.map(String::from));
            Agent::in_container(&engines[i as usize - 1], Some(&key), &flags)
        })
        .collect();
    for a in &agents {
        a.wait_for(
            "docker connected, the other node a peer",
            Duration::from_secs(60),
            |s| s.docker.connected && s.node.peers.len() == 1,
        );
    }
    // (engine, agent, client, server, its address, row)
    let mut modes = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let ip = run(e, "srv", "mesh");
        run(e, "client", "mesh");
        let bip = run(e, "bsrv", "bridge");
        run(e, "bclient", "bridge");
        // Tens of thousands of connections to one address within a minute
        // would fill a client's ports with TIME_WAIT, and every connect
        // would search longer: the clients reuse them (as load generators
        // are set up), on every path alike.
        for client in ["client", "bclient"] {
            let ok = Command::new("nsenter")
                .args(["-t", &pid(e, client), "-n", "sysctl", "-qw"])
                .args([
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65535",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sysctl in {client}'s namespace");
        }
        let mesh_row = if i == 0 {
            "mesh network, straight to the veth (default)"
        } else {
            "mesh network, --local-via-bridge"
        };
        modes.push((i, "client", "srv", ip, mesh_row.to_string()));
        modes.push((
            i,
            "bclient",
            "bsrv",
            bip,
            format!("Docker's default bridge, no overlay (node {})", i + 1),
        ));
    }
    let counters = |i: usize| {
        (
            agents[i].counter("local_redirect"),
            agents[i].counter("tc_not_service"),
        )
    };
    let before = [counters(0), counters(1)];
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    // A warm-up round, unmeasured; then modes take turns.
    for (e, client, server, ip, _) in &modes {
        measure(&engines[*e], client, server, ip, 100, 1);
    }
    for _ in 0..rounds {
        for (m, (e, client, server, ip, _)) in modes.iter().enumerate() {
            samples[m].push(measure(&engines[*e], client, server, ip, n, secs));
        }
    }
    let after = [counters(0), counters(1)];
    println!(
        "\ntwo containers on one host (cargo xtask bench): {n} TCP connections from {CLIENTS} clients at \
         once, each connection a request and its answer (whoami ask) and one TCP stream for {secs} s (iperf3 in the \
         containers' namespaces), client to server; medians of {rounds} rounds, modes taking turns"
    );
    println!(
        "  {:<52} {:>9} {:>8} {:>8} {:>9}",
        "mode", "conn/s", "p50 µs", "p99 µs", "Gbit/s"
    );
    for (m, (_, _, _, _, row)) in modes.iter().enumerate() {
        let s = &samples[m];
        println!(
            "  {row:<52} {:>9.0} {:>8.0} {:>8.0} {:>9.2}",
            median(s.iter().map(|x| x.conns).collect()),
            median(s.iter().map(|x| x.p50_us).collect()),
            median(s.iter().map(|x| x.p99_us).collect()),
            median(s.iter().map(|x| x.gbits).collect()),
        );
    }
    for (i, name) in ["node 1 (default)", "node 2 (--local-via-bridge)"]
        .iter()
        .enumerate()
    {
        println!(
            "  {name}: local_redirect +{}, tc_not_service +{}",
            after[i].0 - before[i].0,
            after[i].1 - before[i].1
        );
    }
    let conns = |m: usize| median(samples[m].iter().map(|x| x.conns).collect());
    let gbits = |m: usize| median(samples[m].iter().map(|x| x.gbits).collect());
    println!(
        "  straight to the veth against through the bridge: {:.2}x conn/s, {:.2}x Gbit/s; \
         against Docker's bridge on the same host: {:.2}x conn/s, {:.2}x Gbit/s",
        conns(0) / conns(2),
        gbits(0) / gbits(2),
        conns(0) / conns(1),
        gbits(0) / gbits(1),
    );
    drop(agents);
}

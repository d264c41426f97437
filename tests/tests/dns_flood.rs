//! The agent's DNS under a flood, as the agent runs (the release image in
//! its container, two hosts gossiping): 20,000 queries a second for 10 s of
//! random external names with a dead upstream, plus 200 idle TCP
//! connections. The flood does not grow the agent's memory, gossip keeps
//! its peer, and mesh names keep answering (each within 500 ms; the p99 is
//! printed). Every loop is bounded; the traffic stays in the namespaces
//! this test made (the dead upstream is a TEST-NET address on the test's
//! own underlay, where nothing answers).

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    dnsprobe::{self, Expect},
    dockerlab::{Agent, Engine, Underlay},
};

const WAIT: Duration = Duration::from_secs(60);
const RATE: u64 = 20_000;
const SECONDS: u64 = 10;
/// A mesh name must be answered within this during the flood: 50 times
/// what it takes on a quiet machine (about 1 ms), so only a server that
/// stopped answering fails; the measured p99 is printed.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn dns_flood_with_a_dead_upstream_and_idle_tcp_clients() {
    let underlay = Underlay::new();
    let engines: Vec<Engine> = (0..2).map(|_| Engine::start()).collect();
    for (i, e) in engines.iter().enumerate() {
        underlay.attach(e, i as u8 + 1);
    }
    let key = engines[0].write_cluster_key();
    let agents: Vec<Agent> = (1..=2u8)
        .map(|n| {
            let mut flags = underlay.cluster_flags(&format!("n{n}"), &[1]);
            flags.extend(["--dns-upstream".into(), "198.51.100.2:53".into()]);
            Agent::in_container(&engines[n as usize - 1], Some(&key), &flags)
        })
        .collect();
    let st = agents[0].wait_for("a peer", WAIT, |s| {
        s.docker.connected && s.node.peers.len() == 1
    });
    let gateway = {
        let base = st.node.subnet.trim_end_matches("0/24");
        format!("{base}1:53")
    };
    let server: SocketAddr = gateway.parse().expect("gateway");
    let e1 = &engines[0];
    let pid = e1.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "mesh-agent"]);
    let rss_before = rss_kb(&pid);

    // 200 idle TCP clients, held through the flood.
    let idle: Vec<TcpStream> = e1.ns.run(|| {
        (0..200)
            .filter_map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok())
            .collect()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (stop, peak, pid) = (stop.clone(), peak.clone(), pid.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(&pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // The flood: batches every 10 ms, random names, from node 1's host.
    let flood = {
        let stop = stop.clone();
        e1.ns.spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let mut sent = 0u64;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(SECONDS) && !stop.load(Ordering::Relaxed) {
                let due = start.elapsed().as_millis() as u64 * RATE / 1000;
                while sent < due {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let name = format!("r{:x}.flood.example.", seed);
                    let _ = sock.send_to(&dnsprobe::query(sent as u16, &name), server);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (sent, start.elapsed())
        })
    };
    // Mesh names during the flood: one query every 50 ms, each sent once
    // and decoded (an authoritative NXDOMAIN for a service that does not
    // exist), timed from its send.
    let probes: Vec<Result<Duration, String>> = e1.ns.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut out = Vec::new();
        let start = Instant::now();
        let mut id = 60_000u16;
        while start.elapsed() < Duration::from_secs(SECONDS - 1) {
            id = id.wrapping_add(1);
            out.push(dnsprobe::ask(
                &sock,
                server,
                id,
                "tasks.nothing.mesh.",
                Expect::NxDomain,
                PROBE_TIMEOUT,
            ));
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    });
    let mut peers_during = Vec::new();
    let (sent, took) = flood.join().expect("flood");
    peers_during.push(agents[0].status().map_or(0, |s| s.node.peers.len()));
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak_kb = peak.load(Ordering::Relaxed);
    let mut answered: Vec<Duration> = probes.iter().flatten().copied().collect();
    let failed: Vec<&String> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
    let p99 = dnsprobe::percentile(&mut answered, 99);
    let st = agents[0]
        .status()
        .expect("the agent answers after the flood");
    let rate = sent as f64 / took.as_secs_f64();
    println!(
        "DNS flood: {sent} queries in {took:.1?} ({rate:.0}/s) of random external names, dead upstream, {} idle TCP clients; \
         agent RSS {:.1} MB -> peak {:.1} MB; mesh names {}/{} answered, p99 {p99:?}; peers after: {:?}",
        idle.len(),
        rss_before as f64 / 1024.0,
        peak_kb as f64 / 1024.0,
        answered.len(),
        probes.len(),
        st.node.peers
    );
    drop(idle);
    assert!(rate >= RATE as f64 * 0.9, "the flood ran at {rate:.0}/s");
    // Bounded means the flood does not grow the agent: its RSS before the
    // flood (about 56 MB here, mostly what it holds from the start) is
    // its business; what 200,000 forwarded queries and 200 idle clients
    // add must stay small.
    assert!(
        peak_kb.saturating_sub(rss_before) < 16 * 1024,
        "the flood grew the agent's RSS by under 16 MB: {rss_before} -> {peak_kb} kB"
    );
    assert!(!probes.is_empty());
    assert!(failed.is_empty(), "every mesh name answered: {failed:?}");
    assert_eq!(
        st.node.peers,
        vec!["n2".to_string()],
        "gossip kept its peer"
    );
    assert!(peers_during.iter().all(|p| *p == 1));
}

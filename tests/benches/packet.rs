//! Per-packet cost of the data-plane programs, measured by the kernel
//! (BPF_PROG_TEST_RUN with `repeat`) on the packet-test fixtures, and the
//! VIP path with 1, 1,000 and 10,000 services installed; plus the kernel
//! memory of the maps. Prints figures; asserts nothing about speed.

use std::{net::Ipv4Addr, time::Instant};

use mesh_common::stats::Stat;
use mesh_tests::{
    fixtures::{self, ingress, lb},
    harness::{Harness, Prog},
    pkt,
};

fn main() {
    let repeat = std::env::var("MESH_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100_000);

    let mut h = Harness::new();
    h.bench("xdp underlay", &fixtures::xdp_underlay::fixtures(), repeat);
    drop(h);

    let mut h = Harness::new();
    lb::install(&mut h);
    h.bench(
        "tc load balancing, fixture table (rows run in order)",
        &lb::fixtures(),
        repeat,
    );
    drop(h);

    routing_mesh();

    println!("\nVIP path by number of services (10 backends each), ns/packet over {repeat} runs");
    println!("(new flow and its baseline: one run per packet, so both include the test run's own");
    println!(" overhead; their difference is the cost of a Maglev pick and two conntrack inserts)");
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "services", "setup", "new flow", "1-run base", "tracked", "reply", "not VIP", "map memory"
    );
    for n in [1u32, 1_000, 10_000] {
        let mut h = Harness::new();
        let t = Instant::now();
        let (vip, backends) = lb::install_scale(&mut h, n, 10);
        let setup = t.elapsed();

        // New flows: distinct source ports, one run each (Maglev pick and
        // two conntrack inserts), averaged.
        let flows = 2_000u16;
        let mut new_ns = 0u128;
        for p in 0..flows {
            let syn = pkt::tcp4((lb::CLIENT, 20_000 + p), (vip, 80), 1, |b| b.syn(), b"");
            new_ns += h.run(Prog::TcFromContainer, &syn, 1).duration.as_nanos();
        }
        let mut base_ns = 0u128;
        for p in 0..flows {
            let other = pkt::tcp4(
                (lb::CLIENT, 20_000 + p),
                (Ipv4Addr::new(10, 42, 9, 9), 80),
                1,
                |b| b.syn(),
                b"",
            );
            base_ns += h.run(Prog::TcFromContainer, &other, 1).duration.as_nanos();
        }
        // Tracked: the same segment again and again (conntrack hit + DNAT).
        let seg = pkt::tcp4((lb::CLIENT, 20_000), (vip, 80), 2, |b| b.ack(1), b"data");
        let tracked = h
            .run(Prog::TcFromContainer, &seg, repeat)
            .duration
            .as_nanos();
        // The reply of flow 20000 from whichever backend it got.
        let backend = backends
            .iter()
            .copied()
            .find(|b| {
                let reply = pkt::tcp4((*b, 8080), (lb::CLIENT, 20_000), 1, |x| x.ack(2), b"");
                h.run(Prog::TcToContainer, &reply, 1).output[26..30] == vip.octets()
            })
            .expect("a backend's reply is translated");
        let reply = pkt::tcp4(
            (backend, 8080),
            (lb::CLIENT, 20_000),
            1,
            |x| x.ack(2),
            b"ok",
        );
        let reply_ns = h
            .run(Prog::TcToContainer, &reply, repeat)
            .duration
            .as_nanos();
        let other = pkt::tcp4(
            (lb::CLIENT, 20_000),
            (Ipv4Addr::new(10, 42, 9, 9), 80),
            1,
            |b| b.ack(1),
            b"",
        );
        let other_ns = h
            .run(Prog::TcFromContainer, &other, repeat)
            .duration
            .as_nanos();
        let mem = map_memory(&h, n);
        println!(
            "{n:>8} {:>9.2}s {:>9.0} ns {:>9.0} ns {:>9} ns {:>9} ns {:>9} ns {:>9.1} MiB",
            setup.as_secs_f64(),
            new_ns as f64 / flows as f64,
            base_ns as f64 / flows as f64,
            tracked,
            reply_ns,
            other_ns,
            mem as f64 / (1024.0 * 1024.0)
        );
    }
}

/// The routing mesh in XDP: one run per packet on a fresh copy (a repeated
/// run would see the packet its previous run rewrote), averaged, with the
/// counters checked to have moved on the path each row names, every run.
fn routing_mesh() {
    const RUNS: u16 = 2_000;
    let mut h = Harness::new();
    ingress::install(&mut h);
    let node = fixtures::overlay::HERE_UNDERLAY;
    let from = |sport: u16, port: u16, flags: fn(_) -> _| {
        pkt::tcp4((ingress::CLIENT, sport), (node, port), 1, flags, b"")
    };
    println!(
        "\nrouting mesh (XDP on the underlay NIC), ns/packet, one run per packet ({RUNS} runs, \
         the 1-run baseline is the same harness on a frame XDP only classifies)"
    );
    one_run_row(
        &mut h,
        "1-run baseline (ARP: not IPv4)",
        &|_| pkt::arp_request(ingress::CLIENT, node),
        &[Stat::XdpNotIpv4],
    );
    one_run_row(
        &mut h,
        "not a published port",
        &|i| from(10_000 + i, 30_999, |b| b.syn()),
        &[Stat::XdpNotMesh],
    );
    one_run_row(
        &mut h,
        "new flow, backend here (conntrack inserts, Maglev, DNAT)",
        &|i| from(20_000 + i, ingress::PUBLISHED_LOCAL, |b| b.syn()),
        &[Stat::LbNewFlow, Stat::IngressLocal],
    );
    // The backends answer (the SYN-ACKs of flows 20000 and 30000): the
    // client's next packet confirms each flow, so the tracked rows measure
    // confirmed flows, as an established connection is.
    let syn_ack = |from: (std::net::Ipv4Addr, u16), port: u16| {
        pkt::tcp4(from, (ingress::CLIENT, port), 1, |b| b.syn().ack(2), b"")
    };
    h.run(
        Prog::TcFromContainer,
        &syn_ack((ingress::LOCAL_BACKEND, 8080), 20_000),
        1,
    );
    let tunnelled = pkt::vxlan_frame(
        (fixtures::overlay::THERE_MAC, fixtures::overlay::HERE_MAC),
        (fixtures::overlay::THERE_UNDERLAY, node),
        50_000,
        fixtures::overlay::VNI,
        &syn_ack((ingress::BACKEND, 8080), 30_000),
    );
    h.run(Prog::XdpUnderlay, &tunnelled, 1);
    one_run_row(
        &mut h,
        "tracked flow, backend here",
        &|_| from(20_000, ingress::PUBLISHED_LOCAL, |b| b.ack(1)),
        &[Stat::LbCtHit, Stat::IngressLocal],
    );
    one_run_row(
        &mut h,
        "new flow, backend on another node (+ MSS clamp)",
        &|i| from(30_000 + i, ingress::PUBLISHED_TCP, |b| b.syn()),
        &[Stat::LbNewFlow, Stat::IngressRemote],
    );
    one_run_row(
        &mut h,
        "tracked flow, backend on another node",
        &|_| from(30_000, ingress::PUBLISHED_TCP, |b| b.ack(1)),
        &[Stat::LbCtHit, Stat::IngressRemote],
    );
}

/// One row of [`routing_mesh`]: `RUNS` single runs of XDP on `packets(i)`,
/// averaged; every counter of `path` must move once per run.
fn one_run_row(h: &mut Harness, name: &str, packets: &dyn Fn(u16) -> Vec<u8>, path: &[Stat]) {
    const RUNS: u16 = 2_000;
    let before = h.counters();
    let mut total = 0u128;
    for i in 0..RUNS {
        total += h.run(Prog::XdpUnderlay, &packets(i), 1).duration.as_nanos();
    }
    let after = h.counters();
    for s in path {
        let moved = after[*s as usize] - before[*s as usize];
        assert_eq!(
            moved,
            RUNS as u64,
            "{name}: {} moved {moved} times in {RUNS} runs",
            s.name()
        );
    }
    println!("  {name:<58} {:>6.0} ns/packet", total as f64 / RUNS as f64);
}

/// Kernel memory of every map this process holds (fdinfo `memlock`), plus
/// the Maglev rings of services 1..=n (reachable only through the outer map).
fn map_memory(h: &Harness, n: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fdinfo")
        .into_iter()
        .flatten()
        .flatten()
    {
        total += memlock(&entry.path());
    }
    for id in 1..=n {
        if let Ok(ring) = h.lb.maglev.get(&id, 0) {
            use std::os::fd::{AsFd, AsRawFd};
            let fd = ring.fd().as_fd().as_raw_fd();
            total += memlock(std::path::Path::new(&format!("/proc/self/fdinfo/{fd}")));
        }
    }
    total
}

fn memlock(fdinfo: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(fdinfo).unwrap_or_default();
    if !text.contains("map_type:") {
        return 0;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

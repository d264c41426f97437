//! Per-packet cost of the data-plane programs, measured by the kernel
//! (BPF_PROG_TEST_RUN with `repeat`) on the packet-test fixtures, and the
//! VIP path with 1, 1,000 and 10,000 services installed; plus the kernel
//! memory of the maps. Prints figures; asserts nothing about speed.

use std::{net::Ipv4Addr, time::Instant};

use mesh_tests::{
    fixtures::{self, lb},
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

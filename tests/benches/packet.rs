//! Per-packet cost of the data-plane programs, measured by the kernel
//! (BPF_PROG_TEST_RUN with `repeat`) on the packet-test fixtures, and the
//! VIP path with 1, 1,000 and 10,000 services installed; plus the kernel
//! memory of the maps. Prints figures; asserts nothing about speed.

use std::{net::Ipv4Addr, time::Instant};

use mesh_common::stats::Stat;
use mesh_tests::{
    empty::EmptyProg,
    fixtures::{self, ingress, lb},
    harness::{Harness, Prog},
    pkt,
};

fn main() {
    let repeat = std::env::var("MESH_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100_000);

    if std::env::var_os("MESH_BENCH_PROFILE").is_some() {
        profile_paths();
        return;
    }
    if std::env::var_os("MESH_BENCH_OWN_COST_ONLY").is_some() {
        own_cost(repeat);
        network_cost(repeat);
        monitor_cost(repeat);
        return;
    }
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

    own_cost(repeat);
    network_cost(repeat);
    monitor_cost(repeat);
    routing_mesh();

    println!(
        "\nVIP path by number of services (10 backends each), ns/packet, single runs on fresh copies"
    );
    println!("(every figure includes the test run's own overhead, which the 1-run baseline shows:");
    println!(" a SYN to a non-VIP address; each path's counters checked on every run)");
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "services", "setup", "new flow", "1-run base", "tracked", "reply", "not VIP", "map memory"
    );
    for n in [1u32, 1_000, 10_000] {
        let mut h = Harness::new();
        let t = Instant::now();
        let (vip, backends) = lb::install_scale(&mut h, n, 10);
        let setup = t.elapsed();

        // New flows: distinct source ports (Maglev pick and two conntrack
        // inserts); the baseline: the same SYNs to an address no service has.
        let new_path: Vec<(Stat, u64)> = vec![(Stat::LbNewFlow, 1)];
        let syn = |p: u32| {
            pkt::tcp4(
                (lb::CLIENT, 20_000 + p as u16),
                (vip, 80),
                1,
                |b| b.syn(),
                b"",
            )
        };
        let new_ns = h
            .time_path(Prog::TcFromContainer, &syn, 2_000, &new_path)
            .unwrap_or_else(|e| panic!("new flow: {e}"));
        let to_other = |p: u32| {
            pkt::tcp4(
                (lb::CLIENT, 20_000 + p as u16),
                (Ipv4Addr::new(10, 42, 9, 9), 80),
                1,
                |b| b.syn(),
                b"",
            )
        };
        let base_ns = h
            .time_path(
                Prog::TcFromContainer,
                &to_other,
                2_000,
                &[(Stat::TcNotService, 1)],
            )
            .unwrap_or_else(|e| panic!("baseline: {e}"));
        // The backend of flow 20000 answers (so the flow is confirmed by its
        // next packet, as an established connection is).
        let backend = backends
            .iter()
            .copied()
            .find(|b| {
                let reply = pkt::tcp4((*b, 8080), (lb::CLIENT, 20_000), 1, |x| x.ack(2), b"");
                h.run(Prog::TcToContainer, &reply, 1).output[26..30] == vip.octets()
            })
            .expect("a backend's reply is translated");
        // Tracked: the same segment, a fresh copy each run (conntrack hit
        // + DNAT); the first one confirms the flow.
        let seg = pkt::tcp4((lb::CLIENT, 20_000), (vip, 80), 2, |b| b.ack(1), b"data");
        h.run(Prog::TcFromContainer, &seg, 1);
        let figure = |h: &mut Harness, prog, p: &dyn Fn(u32) -> Vec<u8>, path: &[Stat]| {
            let path: Vec<(Stat, u64)> = path.iter().map(|s| (*s, 1)).collect();
            match h.time_path(prog, p, repeat, &path) {
                Ok(ns) => format!("{ns:.0}"),
                Err(e) => panic!("{e}"),
            }
        };
        let tracked = figure(
            &mut h,
            Prog::TcFromContainer,
            &|_| seg.clone(),
            &[Stat::LbCtHit],
        );
        let reply = pkt::tcp4(
            (backend, 8080),
            (lb::CLIENT, 20_000),
            1,
            |x| x.ack(2),
            b"ok",
        );
        let reply_ns = figure(
            &mut h,
            Prog::TcToContainer,
            &|_| reply.clone(),
            &[Stat::NatReverse],
        );
        let other = pkt::tcp4(
            (lb::CLIENT, 20_000),
            (Ipv4Addr::new(10, 42, 9, 9), 80),
            1,
            |b| b.ack(1),
            b"",
        );
        let other_ns = figure(
            &mut h,
            Prog::TcFromContainer,
            &|_| other.clone(),
            &[Stat::TcNotService],
        );
        let mem = h.map_memory(n);
        println!(
            "{n:>8} {:>9.2}s {:>9.0} ns {:>9.0} ns {:>9} ns {:>9} ns {:>9} ns {:>9.1} MiB",
            setup.as_secs_f64(),
            new_ns,
            base_ns,
            tracked,
            reply_ns,
            other_ns,
            mem as f64 / (1024.0 * 1024.0)
        );
    }
}

/// The container veth's four main paths, each against an empty TC program
/// timed the same way: measured as a multiple of it (the goals are
/// multiples, which do not depend on the machine) and less it (the
/// programs' own cost). The node runs as on a cluster: the overlay on,
/// peers and other nodes known. The tracked and reply packets repeat on
/// one test run without changing path (a pair of services that are each
/// other's backend: the packet to one VIP leaves addressed to the other);
/// a new flow needs a fresh packet per run, so it is single runs against
/// the empty program's single runs.
fn own_cost(repeat: u32) {
    let empty = EmptyProg::tc().expect("loading an empty TC program");
    let Paths {
        mut h,
        seg,
        reply,
        world,
        vip: a,
        client,
    } = Paths::new();
    let syn = |p: u32| pkt::tcp4((client, 20_000 + p as u16), (a, 80), 1, |x| x.syn(), b"");
    let runs = 10_000;

    let base_r = empty.time(&seg, repeat).expect("empty program");
    let base_1 = empty.time_single(&syn(0), runs).expect("empty program");
    // Another Docker network's bridge: its containers' everyday traffic
    // (to the internet), which the bridge program only looks at.
    let mut hb = Harness::new();
    mesh_tests::fixtures::bridge::install(&mut hb);
    let outbound = pkt::tcp4(
        (mesh_tests::fixtures::bridge::CLIENT, 40_000),
        (Ipv4Addr::new(192, 0, 2, 80), 443),
        2,
        |x| x.ack(2),
        b"data",
    );
    // The world's answer to the container.
    let answer = pkt::tcp4(
        (Ipv4Addr::new(192, 0, 2, 80), 443),
        (client, 40_000),
        7,
        |x| x.ack(3),
        b"answer",
    );
    let rows: [(&str, f64, f64, f64, Stat); 6] = [
        (
            "tracked VIP packet (conntrack hit, DNAT, to the backend's veth) [r]",
            h.time_repeated(Prog::TcFromContainer, &seg, repeat, &[(Stat::LbCtHit, 1)])
                .unwrap_or_else(|e| panic!("tracked: {e}")),
            base_r,
            3.0,
            Stat::LbCtHit,
        ),
        (
            "reply (reverse NAT into the container) [r]",
            h.time_repeated(
                Prog::TcToContainer,
                &reply,
                repeat,
                &[(Stat::NatReverse, 1)],
            )
            .unwrap_or_else(|e| panic!("reply: {e}")),
            base_r,
            2.0,
            Stat::NatReverse,
        ),
        (
            "new flow (Maglev, two conntrack inserts, DNAT) [1]",
            h.time_path(Prog::TcFromContainer, &syn, runs, &[(Stat::LbNewFlow, 1)])
                .unwrap_or_else(|e| panic!("new flow: {e}")),
            base_1,
            8.0,
            Stat::LbNewFlow,
        ),
        (
            "to the world (an address outside every network) [r]",
            h.time_repeated(
                Prog::TcFromContainer,
                &world,
                repeat,
                &[(Stat::TcNotService, 1)],
            )
            .unwrap_or_else(|e| panic!("to the world: {e}")),
            base_r,
            1.5,
            Stat::TcNotService,
        ),
        (
            "from the world into the container (its answer, not a VIP reply) [r]",
            h.time_repeated(
                Prog::TcToContainer,
                &answer,
                repeat,
                &[(Stat::TcNoReverse, 1)],
            )
            .unwrap_or_else(|e| panic!("from the world: {e}")),
            base_r,
            1.5,
            Stat::TcNoReverse,
        ),
        (
            "another Docker network's bridge, not a published port (the internet) [r]",
            hb.time_repeated(
                Prog::TcFromBridge,
                &outbound,
                repeat,
                &[(Stat::BridgePass, 1)],
            )
            .unwrap_or_else(|e| panic!("bridge: {e}")),
            base_r,
            1.5,
            Stat::BridgePass,
        ),
    ];
    println!(
        "\nthe container veth's paths on a cluster node (overlay on, peers known; a container of \
         network front, whose VIPs lie in its /16), ns/packet, \
         against an empty TC program timed the same way ([r]: {repeat} runs repeating one \
         packet, the path counter checked to move on every run; [1]: {runs} single runs): \
         measured, as a multiple of the empty program (goal), and less it (own cost)"
    );
    println!(
        "  {:<72} {:>8} {:>7} {:>8} {:>6} {:>7}",
        "path", "measured", "empty", "multiple", "goal", "own"
    );
    for (name, ns, base, goal, stat) in rows {
        println!(
            "  {name:<72} {ns:>8.1} {base:>7.1} {:>7.2}x {goal:>5.1}x {:>7.1}   ({} on every run)",
            ns / base,
            (ns - base).max(0.0),
            stat.name()
        );
    }
}

/// A cluster node (overlay on, peers and other nodes known) with a
/// container of network `front` and a pair of `front`'s services that are
/// each other's backend (a reply comes from a backend's address, inside
/// the network, as a container's would), both flows opened, answered
/// (SYN-ACK) and confirmed (the client's next segment), as established
/// connections are; the packets of the container veth's main paths.
struct Paths {
    h: Harness,
    /// A tracked VIP packet (to service `vip`).
    seg: Vec<u8>,
    /// A reply, reverse-NATed into the client.
    reply: Vec<u8>,
    /// A packet to an address outside every network.
    world: Vec<u8>,
    vip: Ipv4Addr,
    /// The container (its veth the programs run on).
    client: Ipv4Addr,
}

impl Paths {
    fn new() -> Paths {
        let mut h = Harness::new();
        // A container of network `front` on a cluster node.
        fixtures::networks::install(&mut h);
        // None of these paths looks up a route.
        h.run_here();
        let client = fixtures::networks::FRONT_C;
        let (a, b) = (Ipv4Addr::new(10, 44, 0, 11), Ipv4Addr::new(10, 44, 0, 12));
        lb::install_pair(&mut h, a, b);
        let c = (client, 40_000);
        for (vip, other) in [(a, b), (b, a)] {
            h.run(
                Prog::TcFromContainer,
                &pkt::tcp4(c, (vip, 80), 1, |x| x.syn(), b""),
                1,
            );
            h.run(
                Prog::TcToContainer,
                &pkt::tcp4((other, 80), c, 1, |x| x.syn().ack(2), b""),
                1,
            );
            h.run(
                Prog::TcFromContainer,
                &pkt::tcp4(c, (vip, 80), 2, |x| x.ack(2), b""),
                1,
            );
        }
        let seg = pkt::tcp4(c, (a, 80), 2, |x| x.ack(2), b"data");
        let reply = pkt::tcp4((b, 80), c, 2, |x| x.ack(6), b"ok");
        let world = pkt::tcp4(
            c,
            (Ipv4Addr::new(192, 0, 2, 80), 443),
            2,
            |x| x.ack(2),
            b"data",
        );
        Paths {
            h,
            seg,
            reply,
            world,
            vip: a,
            client,
        }
    }
}

/// What overlay networks cost a container's packet: the same paths from a
/// container of `mesh` (its network known from the cluster CIDR, no
/// lookup) and of another network (its /16 looked up in `MESH_NETS`, the
/// isolation check), each less an empty TC program, and the drop.
fn network_cost(repeat: u32) {
    use fixtures::{networks, overlay};
    let empty = EmptyProg::tc().expect("loading an empty TC program");
    let mut mesh = Harness::new();
    overlay::install(&mut mesh);
    let mut net = Harness::new();
    networks::install(&mut net);
    let udp = |src: Ipv4Addr, dst: Ipv4Addr| {
        pkt::macs(
            pkt::udp4((src, 5000), (dst, 53), b"data"),
            overlay::GW_MAC,
            overlay::C_MAC,
        )
    };
    let base = empty
        .time(&udp(overlay::HERE_C, Ipv4Addr::new(10, 42, 1, 9)), repeat)
        .expect("empty program");
    let (m, f) = (overlay::HERE_C, networks::FRONT_C);
    let mut table: Vec<(&str, f64, Stat)> = Vec::new();
    for (name, p, stat) in [
        (
            "mesh: to a container of mesh on this node (straight to its veth) [r]",
            udp(m, overlay::NEIGHBOUR),
            Stat::LocalRedirect,
        ),
        (
            "mesh: to an address of this node's /24 nobody holds (the bridge) [r]",
            udp(m, Ipv4Addr::new(10, 42, 1, 9)),
            Stat::TcNotService,
        ),
        (
            "mesh: to an address outside every network [r]",
            udp(m, Ipv4Addr::new(192, 0, 2, 1)),
            Stat::TcNotService,
        ),
    ] {
        let ns = mesh
            .time_repeated(Prog::TcFromContainer, &p, repeat, &[(stat, 1)])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        table.push((name, ns, stat));
    }
    for (name, p, stat) in [
        (
            "front: to an address of front on this node nobody holds (its /16 looked up) [r]",
            udp(f, Ipv4Addr::new(10, 44, 1, 9)),
            Stat::TcNotService,
        ),
        (
            "front: to an address outside every network [r]",
            udp(f, Ipv4Addr::new(192, 0, 2, 1)),
            Stat::TcNotService,
        ),
        (
            "front: to a container of mesh (isolation drop) [r]",
            udp(f, overlay::THERE_C),
            Stat::NetIsolated,
        ),
    ] {
        let ns = net
            .time_repeated(Prog::TcFromContainer, &p, repeat, &[(stat, 1)])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        table.push((name, ns, stat));
    }
    println!(
        "\noverlay networks: a container's packet from mesh and from another network, ns/packet, \
         less an empty TC program ({base:.1} ns) timed the same way ({repeat} runs repeating one \
         packet, the path counter checked to move on every run)"
    );
    println!("  {:<72} {:>8} {:>7}", "path", "measured", "own");
    for (name, ns, stat) in table {
        println!(
            "  {name:<72} {ns:>8.1} {:>7.1}   ({} on every run)",
            (ns - base).max(0.0),
            stat.name()
        );
    }
}

/// What `meshctl monitor` costs the programs: a drop (a container's forged
/// source) and a new flow (a SYN to a VIP), with nobody listening, with a
/// listener (every event written to the ring) and over the rate limit
/// (the per-CPU budget spent: counted, not written). The same packets, one
/// harness, back to back.
fn monitor_cost(repeat: u32) {
    use fixtures::overlay;
    let mut h = Harness::new();
    overlay::install(&mut h);
    let mut m = h.monitor_maps();
    let out = |f: Vec<u8>| pkt::macs(f, overlay::GW_MAC, overlay::C_MAC);
    let forged = out(pkt::udp4(
        (Ipv4Addr::new(10, 42, 1, 66), 5000),
        (overlay::THERE_C, 53),
        b"forged",
    ));
    let syn = |i: u32| {
        out(pkt::tcp4(
            (overlay::HERE_C, 10_000 + (i % 50_000) as u16),
            (overlay::VIP, 80),
            1,
            |b| b.syn(),
            b"",
        ))
    };
    // Within one second's budget (2,000 a CPU) and the ring (about 5,000).
    let written = 1000.min(repeat);
    let flows = 1000u32;
    let drop = [(Stat::TcSpoofed, 1)];
    let new = [(Stat::LbNewFlow, 1)];
    let mut rows = Vec::new();
    for (mode, on) in [("nobody listens", false), ("a listener, written", true)] {
        m.set_on(on).expect("monitor on/off");
        let d = h
            .time_repeated(Prog::TcFromContainer, &forged, written, &drop)
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        m.set_on(on).expect("monitor on/off");
        let offset = if on { flows } else { 0 };
        let f = h
            .time_path(Prog::TcFromContainer, &|i| syn(i + offset), flows, &new)
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        rows.push((mode, d, f));
        while m.next_event().is_some() {}
    }
    m.set_on(true).expect("monitor on");
    let d = h
        .time_repeated(Prog::TcFromContainer, &forged, repeat, &drop)
        .unwrap_or_else(|e| panic!("over the rate: {e}"));
    rows.push((
        "a listener, over the rate (counted, not written)",
        d,
        f64::NAN,
    ));
    let lost = m.lost();
    m.set_on(false).expect("monitor off");
    println!(
        "\nmeshctl monitor's cost, ns/packet (kernel-measured): a drop (forged source, {written} \
         runs repeating one packet; {repeat} over the rate) and a new flow (a SYN to a VIP, \
         {flows} single runs on fresh tuples); counters checked on every run; {lost} events \
         counted lost over the rate"
    );
    println!("  {:<52} {:>10} {:>10}", "monitor", "drop", "new flow");
    for (mode, d, f) in rows {
        let f = if f.is_nan() {
            "-".to_string()
        } else {
            format!("{f:.1}")
        };
        println!("  {mode:<52} {d:>10.1} {f:>10}");
    }
}

/// The routing mesh in XDP: one run per packet on a fresh copy (a repeated
/// run would see the packet its previous run rewrote), averaged, with the
/// counters checked to have moved on the path each row names, every run.
fn routing_mesh() {
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
        "new flow, backend here (conntrack inserts, Maglev; TC translates)",
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
        "new flow, backend on another node",
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

/// Single runs per routing-mesh row.
const RUNS: u32 = 2_000;

/// One row of [`routing_mesh`]: `RUNS` single runs of XDP on `packets(i)`,
/// averaged; every counter of `path` must move once per run.
fn one_run_row(h: &mut Harness, name: &str, packets: &dyn Fn(u16) -> Vec<u8>, path: &[Stat]) {
    let path: Vec<(Stat, u64)> = path.iter().map(|s| (*s, 1)).collect();
    let ns = h
        .time_path(Prog::XdpUnderlay, &|i| packets(i as u16), RUNS, &path)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("  {name:<58} {ns:>6.0} ns/packet");
}

/// `cargo xtask bench profile` (`MESH_BENCH_PROFILE`): where each of the
/// container veth's main paths spends its time. This thread runs on the
/// last CPU and perf samples only that CPU while the path repeats for about
/// 3 s (a new flow: 50,000 single runs on fresh tuples); each symbol's
/// samples become CPU ns per packet. The test run's own work (the syscall,
/// the skb it builds, its loop) shows as the kernel functions around the
/// program.
fn profile_paths() {
    use mesh_tests::profile::{self, Recording};

    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    profile::pin_to_cpu(cpu).unwrap_or_else(|e| panic!("{e}"));
    let Paths {
        mut h,
        seg,
        reply,
        world,
        vip,
        client,
    } = Paths::new();
    let empty = EmptyProg::tc().expect("loading an empty TC program");
    let file = std::env::temp_dir().join(format!("mesh-profile-{}.data", std::process::id()));
    let batch = 100_000;
    type Run<'a> = Box<dyn FnMut(&mut Harness) -> u64 + 'a>;
    let repeated = |prog: Prog, p: Vec<u8>, stat: Stat| -> Run<'_> {
        Box::new(move |h: &mut Harness| {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed().as_secs_f64() < 3.0 {
                h.time_repeated(prog, &p, batch, &[(stat, 1)])
                    .unwrap_or_else(|e| panic!("{e}"));
                n += batch as u64;
            }
            n
        })
    };
    let new_flows: Run<'_> = Box::new(move |h: &mut Harness| {
        let runs = 50_000u32;
        // Fresh ports, around the open flow's (40,000).
        let syn = |i: u32| {
            let port = if i < 30_000 { 1024 + i } else { 11_000 + i };
            pkt::tcp4((client, port as u16), (vip, 80), 1, |x| x.syn(), b"")
        };
        h.time_path(Prog::TcFromContainer, &syn, runs, &[(Stat::LbNewFlow, 1)])
            .unwrap_or_else(|e| panic!("new flow: {e}"));
        runs as u64
    });
    let empty_run: Run<'_> = Box::new(|_: &mut Harness| {
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed().as_secs_f64() < 3.0 {
            empty.time(&world, batch).expect("empty program");
            n += batch as u64;
        }
        n
    });
    let paths: Vec<(&str, Run<'_>)> = vec![
        ("an empty TC program [r]", empty_run),
        (
            "tracked VIP packet [r]",
            repeated(Prog::TcFromContainer, seg, Stat::LbCtHit),
        ),
        (
            "reply [r]",
            repeated(Prog::TcToContainer, reply, Stat::NatReverse),
        ),
        ("new flow [1]", new_flows),
        (
            "to the world [r]",
            repeated(Prog::TcFromContainer, world.clone(), Stat::TcNotService),
        ),
    ];
    println!(
        "\nwhere the container veth's paths spend their time: perf, cpu-clock at {} Hz on CPU {cpu} \
         (this thread pinned there), CPU ns per packet by symbol (symbols under 1% left out)",
        profile::FREQ
    );
    for (name, mut run) in paths {
        let rec = Recording::start(Some(&cpu.to_string()), &file).unwrap_or_else(|e| panic!("{e}"));
        let packets = run(&mut h);
        let symbols = rec.stop().unwrap_or_else(|e| panic!("{e}"));
        let total: u64 = symbols.iter().map(|s| s.samples).sum();
        println!(
            "  {name}: {packets} packets, {total} samples, {:.0} ns per packet in all",
            profile::ns_per(total, packets)
        );
        for s in symbols.iter().filter(|s| s.samples * 100 >= total) {
            println!(
                "    {:>7.1} ns {:>5.1}%  {}",
                profile::ns_per(s.samples, packets),
                s.samples as f64 * 100.0 / total as f64,
                profile::short_name(&s.name)
            );
        }
    }
    let _ = std::fs::remove_file(&file);
}

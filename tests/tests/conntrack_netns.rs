//! Conntrack lifetime with real sockets in network namespaces (needs
//! root): the agent's sweep expires closed and idle flows by state while an
//! idle connection stays; a flood of new flows from one client cannot evict
//! another client's established connections. Every loop is bounded in count
//! and time.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_agent::conntrack::{
    FlowState, Timeouts,
    sweep::{Report, Sweeper},
};
use mesh_common::{
    ct::{CtKey, Tuple, dir},
    lb::backend_state::ACTIVE,
    maps,
    stats::Stat,
};
use mesh_tests::{
    lbclient::{Conn, udp_request},
    lblab::{self, LbLab, Options, VIP, VIP_TCP_PORT, VIP_UDP_PORT},
};

struct PinDir(PathBuf);

impl PinDir {
    fn new(what: &str) -> Self {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/mesh-{what}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn expired(r: &Report, state: FlowState) -> u64 {
    r.expired
        .iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| *n)
}

/// Entries of a table by protocol: {6: n, 17: m}.
fn by_proto(lab: &LbLab, new: bool) -> BTreeMap<u8, usize> {
    let table = if new {
        &lab.harness.lb.conntrack_new
    } else {
        &lab.harness.lb.conntrack
    };
    let mut out = BTreeMap::new();
    for (k, _) in table.iter().filter_map(Result::ok) {
        *out.entry(k.proto).or_default() += 1;
    }
    out
}

/// Closed TCP flows go after the close timeout, not before; UDP flows after
/// the UDP timeout; an idle established connection outlives both and still
/// works, on the same backend.
#[test]
fn closed_and_idle_flows_expire_and_an_idle_connection_stays() {
    let pins = PinDir::new("ct-sweep");
    let mut lab = LbLab::with(
        2,
        &Options {
            pin_dir: Some(pins.0.clone()),
            ..Options::default()
        },
    );
    lab.program(&[ACTIVE, ACTIVE]);
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(3600),
        tcp_new: Duration::from_secs(3),
        tcp_closed: Duration::from_secs(2),
        udp: Duration::from_secs(6),
    };
    let sweeper = Sweeper::open(&pins.0, timeouts).expect("open the pinned tables");

    // One connection that stays open and idle, 20 that open, talk, close,
    // and 20 UDP requests (answered, one datagram each).
    let traffic = Instant::now();
    let (mut idle, udp) = lab.client.run(|| {
        let mut idle = Conn::open().expect("the idle connection");
        idle.ping().expect("first ping");
        for i in 0..20 {
            let mut c = Conn::open().unwrap_or_else(|e| panic!("short connection {i}: {e}"));
            c.ping()
                .unwrap_or_else(|e| panic!("short connection {i}: {e}"));
            // Dropped: FIN both ways.
        }
        let udp: Vec<String> = (0..20)
            .map(|i| udp_request().unwrap_or_else(|e| panic!("UDP request {i}: {e}")))
            .collect();
        (idle, udp)
    });
    assert_eq!(udp.len(), 20);
    // The closes finish in both directions (the servers answer EOF).
    std::thread::sleep(Duration::from_millis(200));
    let before = (by_proto(&lab, false), by_proto(&lab, true));
    println!(
        "after the traffic ({:.2} s): confirmed {:?}, new {:?}",
        traffic.elapsed().as_secs_f64(),
        before.0,
        before.1
    );
    assert_eq!(before.0.get(&6), Some(&42), "21 TCP pairs confirmed");
    assert_eq!(before.1.get(&17), Some(&40), "20 UDP pairs, answered once");

    // At once: nothing is old enough.
    let r = sweeper.sweep().expect("sweep");
    assert_eq!(r.deleted, 0, "nothing expires before its timeout: {r:?}");

    // After 3 s: the closed flows (2 s) are gone, UDP (6 s) is not.
    std::thread::sleep(Duration::from_secs(3));
    let r = sweeper.sweep().expect("sweep");
    println!("after 3 s: {r:?}");
    assert_eq!(expired(&r, FlowState::TcpClosed), 20, "{r:?}");
    assert_eq!(expired(&r, FlowState::Udp), 0, "{r:?}");
    assert_eq!(
        by_proto(&lab, false).get(&6),
        Some(&2),
        "the idle pair stays"
    );
    assert_eq!(by_proto(&lab, true).get(&17), Some(&40));

    // After 7.5 s: UDP is gone too; the idle TCP connection, idle for
    // longer than the UDP timeout, stays and works on its backend.
    std::thread::sleep(Duration::from_millis(4500));
    let r = sweeper.sweep().expect("sweep");
    println!("after 7.5 s: {r:?}");
    assert_eq!(expired(&r, FlowState::Udp), 20, "{r:?}");
    assert_eq!(by_proto(&lab, true).get(&17), None);
    assert_eq!(by_proto(&lab, false).get(&6), Some(&2));
    let backend = idle.backend.clone();
    let answer = lab
        .client
        .run(|| idle.ping())
        .expect("the idle connection works");
    assert_eq!(answer, backend, "and stays on its backend");
    println!(
        "idle connection on {backend} answered after {:.1} s idle (UDP timeout {} s)",
        traffic.elapsed().as_secs_f64(),
        timeouts.udp.as_secs()
    );
}

/// The forward conntrack key of a client's connection to the TCP VIP.
fn tcp_key(client: Ipv4Addr, port: u16) -> CtKey {
    Tuple {
        src_be: u32::from(client).to_be(),
        dst_be: u32::from(VIP).to_be(),
        sport_be: port.to_be(),
        dport_be: VIP_TCP_PORT.to_be(),
        proto: 6,
        ..Tuple::default()
    }
    .key(dir::FORWARD)
}

/// Sends `n` SYNs to the TCP VIP and `m` datagrams to the UDP VIP from
/// `src`, each from its own source port (a new flow each), through a raw
/// socket: as a flooding container can. Paced so the veth's backlog keeps
/// up; bounded by `deadline`. Must run inside the flooder's namespace.
fn flood(src: Ipv4Addr, tcp: u32, udp: u32, deadline: Duration) -> u32 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created for us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(VIP).to_be(),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    let mut sent = 0u32;
    let mut buf = Vec::with_capacity(64);
    for i in 0..tcp + udp {
        if start.elapsed() > deadline {
            break;
        }
        let sport = 1024 + (i % 64_000) as u16;
        buf.clear();
        let b = etherparse::PacketBuilder::ipv4(src.octets(), VIP.octets(), 64);
        let r = if i < tcp {
            b.tcp(sport, VIP_TCP_PORT, i, 64240)
                .syn()
                .write(&mut buf, &[])
        } else {
            b.udp(sport, VIP_UDP_PORT).write(&mut buf, b"flood")
        };
        r.expect("build a packet");
        // SAFETY: buf and dst outlive the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n > 0 {
            sent += 1;
        }
        if i % 256 == 255 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    sent
}

/// 100 established connections of one client; another client floods the
/// VIPs with 100,000 new flows (60,000 SYNs, 40,000 datagrams: twice the
/// confirmed table's entries and six times the new table's); then a backend
/// joins, so a connection whose entry had been evicted would be balanced
/// again and land elsewhere. Every connection keeps its entry and its
/// backend.
/// The programs stamp entries with the clock the agent measured (jiffies
/// times the tick, less the base) and the sweeper reads the same clock
/// through the pinned `mesh_clock`: a flow's stamps are "now" to it, and
/// the clock reads CLOCK_MONOTONIC within a few ticks.
#[test]
fn entries_carry_the_clock_the_sweeper_reads() {
    use mesh_agent::dataplane::clock::{Clock, monotonic_ns};

    let pins = PinDir::new("ct-clock");
    let mut lab = LbLab::with(
        2,
        &Options {
            pin_dir: Some(pins.0.clone()),
            ..Options::default()
        },
    );
    lab.program(&[ACTIVE, ACTIVE]);
    let cal = lab.harness.overlay.clock().expect("the tick measured");
    assert!(
        [10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&cal.tick_ns),
        "a tick of HZ 100, 250, 300 or 1000: {cal:?}"
    );
    let clock = Clock::open(&pins.0);
    let before = clock.now_ns();
    lab.client
        .run(udp_request)
        .unwrap_or_else(|e| panic!("UDP request: {e}"));
    let after = clock.now_ns();
    let tick = cal.tick_ns as u64;
    let stamps: Vec<u64> = lab
        .harness
        .lb
        .conntrack_new
        .iter()
        .chain(lab.harness.lb.conntrack.iter())
        .filter_map(Result::ok)
        .flat_map(|(_, e)| [e.created_ns, e.last_seen_ns])
        .collect();
    assert!(!stamps.is_empty(), "the request's flow is tracked");
    for s in stamps {
        assert!(
            before <= s + tick && s <= after + tick,
            "stamp {s} outside the request's time {before}..{after} (tick {tick})"
        );
    }
    let drift = clock.now_ns().abs_diff(monotonic_ns());
    assert!(
        drift < 5 * tick,
        "the clock is {drift} ns from CLOCK_MONOTONIC (tick {tick})"
    );
}

#[test]
fn a_flood_of_new_flows_leaves_established_connections_working() {
    const CT: u32 = 65_536;
    const CT_NEW: u32 = 16_384;
    let mut lab = LbLab::with(
        3,
        &Options {
            sizes: vec![
                (maps::CONNTRACK.name, CT),
                (maps::CONNTRACK_NEW.name, CT_NEW),
            ],
            extra_clients: 1,
            ..Options::default()
        },
    );
    // b3 joins later.
    lab.program(&[ACTIVE, ACTIVE, 0]);
    let mut conns: Vec<Conn> = lab.client.run(|| {
        (0..100)
            .map(|i| {
                let mut c = Conn::open().unwrap_or_else(|e| panic!("connection {i}: {e}"));
                c.ping().unwrap_or_else(|e| panic!("connection {i}: {e}"));
                c
            })
            .collect()
    });
    let ports: Vec<u16> = conns
        .iter()
        .map(|c| c.writer.local_addr().expect("local address").port())
        .collect();
    let tracked = |lab: &LbLab| {
        ports
            .iter()
            .filter(|p| {
                lab.harness
                    .lb
                    .conntrack
                    .get(&tcp_key(lblab::CLIENT, **p), 0)
                    .is_ok()
            })
            .count()
    };
    assert_eq!(tracked(&lab), 100, "every connection is confirmed");

    let new_flows = |lab: &LbLab| lab.harness.counters()[Stat::LbNewFlow as usize];
    let before = new_flows(&lab);
    let flooder = lblab::extra_client_ip(0);
    let start = Instant::now();
    let sent = lab.extra_clients[0].run(|| flood(flooder, 60_000, 40_000, Duration::from_secs(90)));
    let took = start.elapsed();
    // Let the last answers (SYN-ACKs and resets, datagrams) settle.
    std::thread::sleep(Duration::from_millis(500));
    let created = new_flows(&lab) - before;
    println!(
        "flood: {sent} packets in {:.1} s, {created} new flows; tables now: confirmed {:?}, new {:?}",
        took.as_secs_f64(),
        by_proto(&lab, false),
        by_proto(&lab, true)
    );
    assert!(
        created >= 95_000,
        "the flood must really create new flows: {created} of {sent}"
    );
    let kept = tracked(&lab);
    println!("established connections still tracked: {kept}/100");
    assert_eq!(kept, 100, "a flood evicted established flows");

    // A backend joins: an untracked connection would be balanced anew and
    // some would land on b3, which never saw them.
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let moved: Vec<String> = lab.client.run(|| {
        conns
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| match c.ping() {
                Ok(name) if name == c.backend => None,
                Ok(name) => Some(format!("{i}: {} -> {name}", c.backend)),
                Err(e) => Some(format!("{i} on {}: {e}", c.backend)),
            })
            .collect()
    });
    println!(
        "after the flood and a new backend: {}/100 connections answered on their backend",
        100 - moved.len()
    );
    assert!(moved.is_empty(), "connections broken: {moved:?}");
    // New connections do reach the new backend.
    let names: Vec<String> = lab.client.run(|| {
        (0..30)
            .map(|i| {
                Conn::open()
                    .unwrap_or_else(|e| panic!("new connection {i}: {e}"))
                    .backend
            })
            .collect()
    });
    assert!(
        names.iter().any(|n| n == "b3"),
        "b3 gets new flows: {names:?}"
    );
}

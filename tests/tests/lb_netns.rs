//! Service load balancing with real sockets in network namespaces (needs
//! root): the client only ever talks to the VIP; the TC programs balance,
//! translate and deliver. Every loop is bounded in count and time.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    time::{Duration, Instant},
};

use mesh_common::lb::backend_state::{ACTIVE, DRAINING};
use mesh_tests::{
    lbclient::{Conn, udp_request, vip_udp},
    lblab::LbLab,
};

/// No test loop may run longer than this.
const DEADLINE: Duration = Duration::from_secs(120);

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n).or_default() += 1;
    }
    t
}

fn assert_even(what: &str, t: &BTreeMap<String, usize>, backends: &[String], total: usize) {
    let ideal = total as f64 / backends.len() as f64;
    println!("{what}: {total} over {} backends: {t:?}", backends.len());
    for b in backends {
        let n = *t.get(b).unwrap_or(&0) as f64;
        assert!(
            (n - ideal).abs() <= ideal * 0.10,
            "{what}: {b} got {n}, want {ideal:.0} +- 10%: {t:?}"
        );
    }
}

#[test]
fn connections_spread_evenly_and_only_see_the_vip() {
    let mut lab = LbLab::new(3);
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let names = lab.backend_names();

    let (tcp, udp) = lab.client.run(|| {
        let start = Instant::now();
        let mut tcp = Vec::new();
        for i in 0..3000 {
            assert!(
                start.elapsed() < DEADLINE,
                "TCP loop over its deadline at {i}"
            );
            let c = Conn::open().unwrap_or_else(|e| panic!("TCP connection {i}: {e}"));
            tcp.push(c.backend);
        }
        let tcp_time = start.elapsed();
        let mut udp = Vec::new();
        for i in 0..3000 {
            assert!(
                start.elapsed() < 2 * DEADLINE,
                "UDP loop over its deadline at {i}"
            );
            udp.push(udp_request().unwrap_or_else(|e| panic!("UDP request {i}: {e}")));
        }
        println!(
            "3000 TCP connections in {tcp_time:?}, 3000 UDP requests in {:?}",
            start.elapsed() - tcp_time
        );
        (tcp, udp)
    });
    assert_even("TCP", &tally(tcp), &names, 3000);
    assert_even("UDP", &tally(udp), &names, 3000);
    // Client and backends share this host: every reply was translated at
    // its backend's veth and handed straight to the client's (a TCP
    // connection's SYN-ACK and answer at least, every UDP answer).
    let c = lab.harness.counters();
    let (here, done, at_client) = (
        c[mesh_common::stats::Stat::NatReverseHere as usize],
        c[mesh_common::stats::Stat::NatReverseDone as usize],
        c[mesh_common::stats::Stat::NatReverse as usize],
    );
    println!(
        "replies translated at the backend's veth: {here}, passed by the client's as done: {done}, translated there: {at_client}"
    );
    assert!(here >= 3 * 3000, "{here} replies straight to the client");
    assert_eq!(done, here, "the client's veth knew each was done");
    assert_eq!(at_client, 0, "none left for the client's veth");
}

/// Opens `n` connections in the client namespace.
fn open_many(lab: &LbLab, n: usize) -> Vec<Conn> {
    lab.client.run(|| {
        (0..n)
            .map(|i| Conn::open().unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect()
    })
}

fn new_connection_backends(lab: &LbLab, n: usize) -> BTreeMap<String, usize> {
    tally(open_many(lab, n).into_iter().map(|c| c.backend))
}

#[test]
fn long_lived_connections_survive_backend_removal() {
    let mut lab = LbLab::new(3);
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let mut conns = open_many(&lab, 100);
    for c in conns.iter_mut() {
        assert_eq!(c.ping().expect("ping before removal"), c.backend);
    }
    let on_b3 = conns.iter().filter(|c| c.backend == "b3").count();
    assert!(on_b3 > 0, "some connections on b3");

    // Remove b3 from the service.
    lab.program(&[ACTIVE, ACTIVE, 0]);
    let mut alive = 0;
    for c in conns.iter_mut().filter(|c| c.backend != "b3") {
        let backend = c.backend.clone();
        assert_eq!(
            c.ping()
                .unwrap_or_else(|e| panic!("connection on {backend} after removal: {e}")),
            backend
        );
        alive += 1;
    }
    println!("b3 removed: {alive} connections on b1/b2 still exchanging, {on_b3} were on b3");
    let fresh = new_connection_backends(&lab, 300);
    println!("300 new connections after removal: {fresh:?}");
    assert!(
        !fresh.contains_key("b3"),
        "no new connection reaches the removed backend: {fresh:?}"
    );
}

#[test]
fn draining_backend_keeps_its_connections_and_gets_no_new_ones() {
    let mut lab = LbLab::new(3);
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let mut conns = open_many(&lab, 100);
    let on_b3 = conns.iter().filter(|c| c.backend == "b3").count();
    assert!(on_b3 > 0, "some connections on b3");

    lab.program(&[ACTIVE, ACTIVE, DRAINING]);
    for c in conns.iter_mut() {
        let backend = c.backend.clone();
        assert_eq!(
            c.ping()
                .unwrap_or_else(|e| panic!("connection on {backend} while b3 drains: {e}")),
            backend
        );
    }
    let fresh = new_connection_backends(&lab, 300);
    println!("b3 draining: all 100 connections ({on_b3} on b3) alive; 300 new: {fresh:?}");
    assert!(
        !fresh.contains_key("b3"),
        "no new connection reaches the draining backend: {fresh:?}"
    );
}

/// A backend calling its own service through the VIP: whenever Maglev picks
/// the caller itself, the flow hairpins (source NAT to the hairpin address)
/// and still works, over TCP and UDP.
#[test]
fn a_backend_reaches_its_own_service_through_the_vip() {
    let mut lab = LbLab::new(3);
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let before = lab.harness.counters()[mesh_common::stats::Stat::LbHairpin as usize];
    let start = Instant::now();
    let (tcp, udp): (Vec<_>, Vec<_>) = lab.backends[0].ns.run(|| {
        let tcp = (0..100).map(|_| Conn::open().map(|c| c.backend)).collect();
        let udp = (0..100).map(|_| udp_request()).collect();
        (tcp, udp)
    });
    assert!(start.elapsed() < DEADLINE);
    let hairpinned = lab.harness.counters()[mesh_common::stats::Stat::LbHairpin as usize] - before;
    for (proto, results) in [("tcp", tcp), ("udp", udp)] {
        let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        let names = tally(results.iter().filter_map(|r| r.as_ref().ok()).cloned());
        println!("{proto}: 100 requests from b1 to its own VIP: {names:?}, errors {errors:?}");
        assert!(errors.is_empty(), "{proto}: 100/100 succeed: {errors:?}");
        assert!(
            names.get("b1").is_some_and(|n| *n > 0),
            "{proto}: some reached b1 itself (hairpin): {names:?}"
        );
    }
    println!("hairpinned packets: {hairpinned}");
    assert!(hairpinned > 0);
}

/// 4,000-byte UDP datagrams to the VIP (three IPv4 fragments each on a
/// 1500-byte link): every one reaches a backend whole (the backend answers
/// only a datagram it could reassemble), over several backends.
#[test]
fn a_datagram_larger_than_the_mtu_reaches_a_vip_backend_whole() {
    let mut lab = LbLab::new(3);
    lab.program(&[ACTIVE, ACTIVE, ACTIVE]);
    let big = vec![0x5a_u8; 4000];
    let results: Vec<Result<String, String>> = lab.client.run(|| {
        (0..30)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                for _ in 0..3 {
                    s.send_to(&big, vip_udp()).map_err(|e| e.to_string())?;
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        assert_eq!(from, vip_udp(), "answered from the VIP");
                        return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
                Err("no answer".to_string())
            })
            .collect()
    });
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let names = tally(results.iter().filter_map(|r| r.as_ref().ok()).cloned());
    let frags = lab.harness.counters()[mesh_common::stats::Stat::NatFragment as usize];
    println!(
        "30 datagrams of 4000 bytes to the VIP: {names:?}; {frags} later fragments translated"
    );
    assert!(
        errors.is_empty(),
        "every datagram arrives whole: {errors:?}"
    );
    assert!(names.len() >= 2, "over several backends: {names:?}");
    assert!(
        frags >= 60,
        "two later fragments per datagram were translated"
    );
}

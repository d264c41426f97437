//! Packet tests of service load balancing on container veths (needs root).

use mesh_common::lb::ServiceStats;
use mesh_tests::{fixtures::lb, harness::Harness};

#[test]
fn connection_lifecycle_fixtures() {
    let mut h = Harness::new();
    lb::install(&mut h);
    let fixtures = lb::fixtures();
    h.check(&fixtures);

    // Per-service counters: every translated packet of the web flows
    // (8 rows: 2 connections), the dns flow (4 rows, 1 connection).
    let web = h.lb.service_stats(1).expect("web stats");
    let dns = h.lb.service_stats(2).expect("dns stats");
    assert_eq!((web.packets, web.new_flows), (8, 2), "web: {web:?}");
    assert_eq!((dns.packets, dns.new_flows), (4, 1), "dns: {dns:?}");
    assert!(web.bytes > 8 * 54, "bytes counted: {web:?}");
    assert_eq!(
        h.lb.service_stats(3).expect("empty stats"),
        ServiceStats::default()
    );
}

#[test]
fn replies_of_per_packet_flows_go_straight_to_a_client_here() {
    let mut h = Harness::new();
    lb::install_reply_here(&mut h);
    h.check(&lb::reply_here_fixtures());
    // The reply counted as the web service's traffic, as at the client.
    let web = h.lb.service_stats(1).expect("web stats");
    assert_eq!((web.packets, web.new_flows), (3, 1), "web: {web:?}");
}

mod lifecycle {
    use std::{collections::HashMap, net::Ipv4Addr};

    use mesh_agent::maglev::{self, Identity};
    use mesh_common::{
        lb::{PROTO_TCP, Service, ServiceKey, backend_state},
        stats::Stat,
    };
    use mesh_tests::{
        fixtures::lb::{CLIENT, backend},
        harness::{Harness, Prog},
        pkt,
    };

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 1, 1);
    const SERVICE: u32 = 7;
    const BACKENDS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(10, 42, 0, 21),
        Ipv4Addr::new(10, 42, 0, 22),
        Ipv4Addr::new(10, 42, 0, 23),
    ];

    /// Programs the service with backend ids 1..=3 in `states` (0 = removed);
    /// only ACTIVE ones are in the ring.
    fn program(h: &mut Harness, states: [u8; 3]) {
        h.local_container(CLIENT);
        let mut in_ring = Vec::new();
        for (i, ip) in BACKENDS.iter().enumerate() {
            let id = i as u32 + 1;
            let mut b = backend(*ip, 8080, 0, [0; 6]);
            b.state = states[i];
            if states[i] == 0 {
                h.lb.clear_backend(id).expect("clear backend");
                continue;
            }
            h.lb.set_backend(id, &b).expect("set backend");
            if states[i] == backend_state::ACTIVE {
                in_ring.push((
                    id,
                    Identity {
                        ip: *ip,
                        port: 8080,
                    },
                ));
            }
        }
        h.lb.set_ring(SERVICE, &maglev::build_ids(&in_ring))
            .expect("ring");
        let key = ServiceKey {
            vip_be: u32::from(VIP).to_be(),
            port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            ..ServiceKey::default()
        };
        h.lb.set_service(
            &key,
            &Service {
                id: SERVICE,
                flags: 0,
            },
        )
        .expect("service");
    }

    /// Sends one segment of the flow from `sport` and returns the backend
    /// address it was translated to.
    fn send(h: &mut Harness, sport: u16, syn: bool) -> Ipv4Addr {
        let frame = pkt::tcp4(
            (CLIENT, sport),
            (VIP, 80),
            1,
            |b| if syn { b.syn() } else { b.ack(1) },
            b"",
        );
        let run = h.run(Prog::TcFromContainer, &frame, 1);
        assert_eq!(run.code, 0, "sport {sport}: TC_ACT_OK");
        let ip = etherparse::SlicedPacket::from_ethernet(&run.output).expect("output parses");
        match ip.net {
            Some(etherparse::NetSlice::Ipv4(v4)) => v4.header().destination_addr(),
            other => panic!("sport {sport}: not IPv4 out: {other:?}"),
        }
    }

    fn share(flows: &HashMap<u16, Ipv4Addr>) -> Vec<(Ipv4Addr, usize)> {
        BACKENDS
            .iter()
            .map(|b| (*b, flows.values().filter(|x| *x == b).count()))
            .collect()
    }

    #[test]
    fn flows_keep_their_backend_drain_and_removal() {
        use backend_state::{ACTIVE, DRAINING};
        let mut h = Harness::new();
        program(&mut h, [ACTIVE, ACTIVE, ACTIVE]);
        let old: HashMap<u16, Ipv4Addr> = (10_000..10_300)
            .map(|p| (p, send(&mut h, p, true)))
            .collect();
        let spread = share(&old);
        println!("300 new flows over 3 backends: {spread:?}");
        assert!(
            spread.iter().all(|(_, n)| *n >= 70),
            "roughly even: {spread:?}"
        );

        // Drain backend 3: its flows continue, new flows avoid it.
        program(&mut h, [ACTIVE, ACTIVE, DRAINING]);
        for (&p, &b) in &old {
            assert_eq!(
                send(&mut h, p, false),
                b,
                "flow {p} stays on {b} while 3 drains"
            );
        }
        let new: HashMap<u16, Ipv4Addr> = (20_000..20_300)
            .map(|p| (p, send(&mut h, p, true)))
            .collect();
        assert_eq!(
            share(&new)[2].1,
            0,
            "no new flow reaches the draining backend: {:?}",
            share(&new)
        );

        // Remove backend 2: its flows move, everyone else's stay.
        let before = h.counters()[Stat::LbReselect as usize];
        program(&mut h, [ACTIVE, 0, DRAINING]);
        let mut moved = 0;
        for (&p, &b) in &old {
            let now = send(&mut h, p, false);
            if b == BACKENDS[1] {
                assert_eq!(
                    now, BACKENDS[0],
                    "flow {p} of the removed backend re-balanced to the only active one"
                );
                moved += 1;
            } else {
                assert_eq!(now, b, "flow {p} stays on {b}");
            }
        }
        let reselected = h.counters()[Stat::LbReselect as usize] - before;
        assert_eq!(reselected, moved, "every moved flow counted as reselected");
    }
}

#[test]
fn rings_round_trip_through_the_kernel() {
    let mut h = Harness::new();
    for ring in [
        vec![],
        vec![9],
        (1..=1021).collect::<Vec<u32>>(),
        vec![7; 65_521],
    ] {
        h.lb.set_ring(3, &ring).expect("set ring");
        assert_eq!(
            h.lb.ring(3).expect("read ring"),
            ring,
            "ring of {} slots",
            ring.len()
        );
    }
    assert_eq!(h.lb.ring(4).expect("unset ring"), Vec::<u32>::new());
}

#[test]
fn rings_set_in_one_batch() {
    let mut h = Harness::new();
    let rings: Vec<(u32, Vec<u32>)> = (1..=300).map(|id| (id, vec![id; 1021])).collect();
    let t = std::time::Instant::now();
    h.lb.set_rings(&rings).expect("batch");
    println!("300 rings in one batch: {:?}", t.elapsed());
    for (id, ring) in &rings {
        assert_eq!(&h.lb.ring(*id).expect("read"), ring);
    }
}

#[test]
fn hairpin_fixtures() {
    let mut h = Harness::new();
    lb::install_hairpin(&mut h);
    h.check(&lb::hairpin_fixtures());
}

#[test]
fn reused_port_fixtures() {
    let mut h = Harness::new();
    lb::install_two_vips_one_backend(&mut h);
    h.check(&lb::reused_port_fixtures());
}

#[test]
fn fragment_fixtures() {
    let mut h = Harness::new();
    lb::install(&mut h);
    h.check(&lb::fragment_fixtures());
}

/// The LRU evicted an idle flow's reverse entry alone: its replies would
/// reach the client from the backend's address. The flow's next packet
/// (idle for over a second) restores it, and replies are the VIP's again.
#[test]
fn an_evicted_reverse_entry_is_restored_by_the_flow() {
    use std::net::Ipv4Addr;

    use mesh_common::{
        ct::{Tuple, dir},
        lb::PROTO_TCP,
        stats::Stat,
    };
    use mesh_tests::{harness::Prog, pkt};

    let mut h = Harness::new();
    lb::install(&mut h);
    let (client, vip) = ((lb::CLIENT, 41000), (lb::WEB_VIP, lb::WEB_PORT));
    let backend = (lb::WEB_BACKEND, lb::WEB_BACKEND_PORT);
    let out = |f| pkt::macs(f, lb::GW_MAC, lb::CLIENT_MAC);
    let reply = || {
        pkt::macs(
            pkt::tcp4(backend, client, 9, |b| b.ack(2), b"r"),
            lb::CLIENT_MAC,
            lb::WEB_BACKEND_MAC,
        )
    };
    let src_of = |frame: &[u8]| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(client, vip, 1, |b| b.syn(), b"")),
        1,
    );
    assert_eq!(
        src_of(&h.run(Prog::TcToContainer, &reply(), 1).output),
        lb::WEB_VIP
    );
    // The client goes on: the flow is confirmed (its pair in MESH_CT).
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(client, vip, 2, |b| b.ack(10), b"")),
        1,
    );

    // Evict the reverse entry and age the flow by two seconds.
    let be = |ip: Ipv4Addr| u32::from(ip).to_be();
    let fwd = Tuple {
        src_be: be(client.0),
        dst_be: be(vip.0),
        sport_be: client.1.to_be(),
        dport_be: vip.1.to_be(),
        proto: PROTO_TCP,
        ..Tuple::default()
    };
    // The backend's reply: the translated flow, reversed.
    let rev = Tuple {
        dst_be: be(backend.0),
        dport_be: backend.1.to_be(),
        ..fwd
    }
    .reversed();
    h.lb.conntrack
        .remove(&rev.key(dir::REVERSE))
        .expect("evict the reverse entry");
    let mut entry =
        h.lb.conntrack
            .get(&fwd.key(dir::FORWARD), 0)
            .expect("forward entry");
    entry.last_seen_ns = entry.last_seen_ns.saturating_sub(2_000_000_000);
    h.lb.conntrack
        .insert(fwd.key(dir::FORWARD), entry, 0)
        .expect("age the flow");
    assert_eq!(
        src_of(&h.run(Prog::TcToContainer, &reply(), 1).output),
        lb::WEB_BACKEND,
        "without its reverse entry, a reply is not translated"
    );

    let before = h.counters()[Stat::LbReverseRestored as usize];
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(client, vip, 2, |b| b.ack(10), b"")),
        1,
    );
    assert_eq!(h.counters()[Stat::LbReverseRestored as usize] - before, 1);
    assert_eq!(
        src_of(&h.run(Prog::TcToContainer, &reply(), 1).output),
        lb::WEB_VIP,
        "restored: replies come from the VIP again"
    );
    // A busy flow does not look (and finds it there anyway).
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(client, vip, 3, |b| b.ack(10), b"")),
        1,
    );
    assert_eq!(h.counters()[Stat::LbReverseRestored as usize] - before, 1);
}

/// A new flow lives in MESH_CT_NEW until the backend answered and the
/// client went on; only then its pair moves to MESH_CT. A SYN flooder
/// (whose kernel resets the SYN-ACK), a spoofer's mid-flow ACK (which the
/// backend resets) and unanswered datagrams never get there, so they
/// cannot evict confirmed flows.
#[test]
fn flows_are_confirmed_only_when_answered_and_continued() {
    use mesh_common::{
        ct::{Tuple, dir},
        stats::Stat,
    };
    use mesh_tests::{harness::Prog, pkt};

    let mut h = Harness::new();
    lb::install(&mut h);
    let vip = (lb::WEB_VIP, lb::WEB_PORT);
    let backend = (lb::WEB_BACKEND, lb::WEB_BACKEND_PORT);
    let out = |f| pkt::macs(f, lb::GW_MAC, lb::CLIENT_MAC);
    let back = |f| pkt::macs(f, lb::CLIENT_MAC, lb::WEB_BACKEND_MAC);
    let key = |client: (std::net::Ipv4Addr, u16), to: (std::net::Ipv4Addr, u16), proto| {
        Tuple {
            src_be: u32::from(client.0).to_be(),
            dst_be: u32::from(to.0).to_be(),
            sport_be: client.1.to_be(),
            dport_be: to.1.to_be(),
            proto,
            ..Tuple::default()
        }
        .key(dir::FORWARD)
    };
    // Where the forward entry of a flow is: (confirmed, new).
    let place = |h: &Harness, k| {
        (
            h.lb.conntrack.get(&k, 0).is_ok(),
            h.lb.conntrack_new.get(&k, 0).is_ok(),
        )
    };
    let confirmed = |h: &Harness| h.counters()[Stat::LbCtConfirmed as usize];

    // A handshake: SYN, SYN-ACK, ACK.
    let c = (lb::CLIENT, 42001);
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(c, vip, 1, |b| b.syn(), b"")),
        1,
    );
    assert_eq!(
        place(&h, key(c, vip, 6)),
        (false, true),
        "a SYN is a new flow"
    );
    h.run(
        Prog::TcToContainer,
        &back(pkt::tcp4(backend, c, 9, |b| b.syn().ack(2), b"")),
        1,
    );
    assert_eq!(
        place(&h, key(c, vip, 6)),
        (false, true),
        "not before the client goes on"
    );
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(c, vip, 2, |b| b.ack(10), b"")),
        1,
    );
    assert_eq!(
        place(&h, key(c, vip, 6)),
        (true, false),
        "handshake done: confirmed"
    );
    assert_eq!(confirmed(&h), 1);
    // Its reverse entry moved too: the reply is translated from MESH_CT.
    let r = h.run(
        Prog::TcToContainer,
        &back(pkt::tcp4(backend, c, 10, |b| b.ack(2), b"ok")),
        1,
    );
    assert_eq!(&r.output[26..30], &lb::WEB_VIP.octets());
    assert_eq!(
        h.lb.conntrack_new.iter().count(),
        0,
        "nothing left in the new table"
    );

    // A SYN flooder: its kernel answers the SYN-ACK with a RST.
    let f = (lb::CLIENT, 42002);
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(f, vip, 1, |b| b.syn(), b"")),
        1,
    );
    h.run(
        Prog::TcToContainer,
        &back(pkt::tcp4(backend, f, 9, |b| b.syn().ack(2), b"")),
        1,
    );
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(f, vip, 2, |b| b.rst(), b"")),
        1,
    );
    assert_eq!(
        place(&h, key(f, vip, 6)),
        (false, true),
        "a reset flow is never confirmed"
    );

    // A forged mid-flow ACK: the backend answers with a RST.
    let s = (lb::CLIENT, 42003);
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(s, vip, 7, |b| b.ack(7), b"")),
        1,
    );
    h.run(
        Prog::TcToContainer,
        &back(pkt::tcp4(backend, s, 7, |b| b.rst(), b"")),
        1,
    );
    h.run(
        Prog::TcFromContainer,
        &out(pkt::tcp4(s, vip, 8, |b| b.ack(7), b"")),
        1,
    );
    assert_eq!(
        place(&h, key(s, vip, 6)),
        (false, true),
        "reset by the backend"
    );
    assert_eq!(confirmed(&h), 1);

    // UDP: unanswered datagrams stay new; after a reply, the next one
    // confirms the flow.
    let dns = (lb::DNS_VIP, lb::DNS_PORT);
    let dns_be = (lb::DNS_BACKEND, lb::DNS_BACKEND_PORT);
    let u = (lb::CLIENT, 42004);
    for _ in 0..2 {
        h.run(Prog::TcFromContainer, &pkt::udp4(u, dns, b"q"), 1);
    }
    assert_eq!(place(&h, key(u, dns, 17)), (false, true), "unanswered");
    h.run(Prog::TcToContainer, &pkt::udp4(dns_be, u, b"a"), 1);
    h.run(Prog::TcFromContainer, &pkt::udp4(u, dns, b"q"), 1);
    assert_eq!(
        place(&h, key(u, dns, 17)),
        (true, false),
        "answered, then continued"
    );
    assert_eq!(confirmed(&h), 2);
}

//! The agent's DNS server with real clients (dig over UDP and TCP) in a
//! namespace this test creates (needs root).

use std::{net::Ipv4Addr, sync::atomic::Ordering};

use mesh_agent::{dns::ZoneService, labels::Proto};
use mesh_tests::{
    dnslab::{DnsLab, SERVER, UPSTREAM_ANSWER, zone_of},
    dnsprobe::{self, Expect},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);

fn status_line(out: &[String]) -> String {
    out.iter()
        .find(|l| l.contains("status:"))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn names_tasks_srv_and_forwarding() {
    let lab = DnsLab::start(zone_of(
        "whoami",
        VIP,
        3,
        &[(80, Proto::Tcp), (53, Proto::Udp)],
    ));
    assert_eq!(lab.dig(&["+short", "whoami"]), ["10.43.0.10"]);
    assert_eq!(
        lab.dig(&["+short", "WhoAmI.MESH"]),
        ["10.43.0.10"],
        "case-insensitive"
    );
    let mut tasks = lab.dig(&["+short", "tasks.whoami"]);
    tasks.sort();
    assert_eq!(tasks, ["10.42.0.10", "10.42.0.11", "10.42.0.12"]);
    assert_eq!(
        lab.dig(&["+short", "-t", "SRV", "_whoami._tcp.mesh"]),
        ["0 0 80 whoami.mesh."]
    );
    assert_eq!(
        lab.dig(&["+short", "-t", "SRV", "_whoami._udp"]),
        ["0 0 53 whoami.mesh."]
    );

    let aaaa = lab.dig(&["-t", "AAAA", "whoami.mesh"]);
    assert!(
        status_line(&aaaa).contains("NOERROR") && aaaa.iter().any(|l| l.contains("ANSWER: 0")),
        "{aaaa:?}"
    );
    let ttl_line = lab.dig(&["+noall", "+answer", "whoami"]).join("\n");
    assert!(ttl_line.contains("\t60\t"), "VIP TTL 60: {ttl_line}");
    let tasks_ttl = lab.dig(&["+noall", "+answer", "tasks.whoami"]).join("\n");
    assert!(tasks_ttl.contains("\t5\t"), "tasks TTL 5: {tasks_ttl}");
    for unknown in ["nosuch", "nosuch.mesh", "tasks.nosuch", "a.b.mesh"] {
        assert!(
            status_line(&lab.dig(&[unknown])).contains("NXDOMAIN"),
            "{unknown}"
        );
    }

    // The protocol: an OPT answered with an OPT, EDNS version 1 with
    // BADVERS, another opcode with NOTIMP; the apex has SOA and NS; VIPs
    // and tasks have PTRs (forward-confirmed: they resolve back).
    let edns = lab.dig(&["+edns=0", "whoami"]);
    assert!(
        edns.iter().any(|l| l.contains("OPT PSEUDOSECTION")),
        "{edns:?}"
    );
    let plain = lab.dig(&["+noedns", "whoami"]);
    assert!(
        !plain.iter().any(|l| l.contains("OPT PSEUDOSECTION")),
        "{plain:?}"
    );
    let badvers = lab.dig(&["+edns=1", "+noednsnegotiation", "whoami"]);
    assert!(status_line(&badvers).contains("BADVERS"), "{badvers:?}");
    let status = lab.dig(&["+opcode=status", "whoami"]);
    assert!(status_line(&status).contains("NOTIMP"), "{status:?}");
    let soa = lab.dig(&["+short", "-t", "SOA", "mesh"]);
    assert!(
        soa.first()
            .is_some_and(|l| l.starts_with("ns.mesh. hostmaster.mesh.")),
        "{soa:?}"
    );
    assert_eq!(lab.dig(&["+short", "-t", "NS", "mesh"]), ["ns.mesh."]);
    assert_eq!(lab.dig(&["+short", "-x", "10.43.0.10"]), ["whoami.mesh."]);
    assert_eq!(
        lab.dig(&["+short", "-x", "10.42.0.11"]),
        ["tasks.whoami.mesh."]
    );

    // Other names go to the upstream resolver.
    assert_eq!(
        lab.dig(&["+short", "upstream.example"]),
        [UPSTREAM_ANSWER.to_string()]
    );
    assert!(status_line(&lab.dig(&["other.example"])).contains("NXDOMAIN"));

    // The same query again is answered with the bytes kept from before
    // (counted as any answer), with its own ID (dig checks it), until the
    // zone changes: then the next query sees the change.
    let counted = |lab: &DnsLab| {
        let q = lab.stats.queries.lock().expect("stats");
        q.get(&("A", "nxdomain")).copied().unwrap_or(0)
    };
    let kept = |lab: &DnsLab| lab.stats.kept_answers.load(Ordering::Relaxed);
    let (nx_before, kept_before) = (counted(&lab), kept(&lab));
    for _ in 0..3 {
        // No EDNS cookie (dig makes a new one per query), one source port
        // (one of the server's UDP workers, each keeping its own).
        let q = lab.dig(&["+nocookie", "-b", "127.0.0.1#5300", "web"]);
        assert!(status_line(&q).contains("NXDOMAIN"), "{q:?}");
    }
    assert_eq!(counted(&lab) - nx_before, 3);
    assert_eq!(
        kept(&lab) - kept_before,
        2,
        "the second and third from the kept bytes"
    );
    lab.zone.update(|z| {
        z.insert(
            "web".into(),
            ZoneService {
                vip: Some(Ipv4Addr::new(10, 43, 0, 20)),
                ports: vec![],
                tasks: vec![],
            },
        );
    });
    assert_eq!(
        lab.dig(&["+nocookie", "-b", "127.0.0.1#5300", "+short", "web"]),
        ["10.43.0.20"],
        "the same query as before, after the zone changed"
    );
    assert!(
        lab.dig(&["+short", "tasks.web"]).is_empty(),
        "a service with no live task: no answer"
    );
}

#[test]
fn a_hundred_tasks_truncate_over_udp_and_are_complete_over_tcp() {
    let lab = DnsLab::start(zone_of("big", VIP, 100, &[(80, Proto::Tcp)]));
    for udp in [
        &["+notcp", "+ignore", "+noedns"][..],
        &["+notcp", "+ignore", "+bufsize=1232"][..],
    ] {
        let mut args = udp.to_vec();
        args.push("tasks.big");
        let out = lab.dig(&args);
        let flags = out
            .iter()
            .find(|l| l.contains("flags:"))
            .cloned()
            .unwrap_or_default();
        println!("UDP {udp:?}: {flags}");
        assert!(flags.contains(" tc"), "truncated over UDP: {out:?}");
    }
    let tcp = lab.dig(&["+tcp", "+short", "tasks.big"]);
    assert_eq!(tcp.len(), 100, "complete over TCP");
    // A client that falls back to TCP by itself gets everything.
    assert_eq!(lab.dig(&["+short", "tasks.big"]).len(), 100);
}

/// xorshift: random-looking bytes without a dependency.
fn noise(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

#[test]
fn malformed_queries_are_dropped_counted_and_harm_nothing() {
    let lab = DnsLab::start(zone_of("whoami", VIP, 1, &[]));
    let valid = {
        use hickory_proto::{
            op::{Message, MessageType, OpCode, Query},
            rr::{Name, RecordType},
        };
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.queries.push(Query::query(
            Name::from_ascii("whoami.").expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    };
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut bad: Vec<Vec<u8>> = (0..300).map(|i| noise(&mut seed, i % 600)).collect();
    bad.push(Vec::new());
    bad.push(valid[..5].to_vec()); // a cut header
    bad.push(valid[..14].to_vec()); // a cut question
    // 300 one-byte labels: a name far over 255 bytes.
    let mut huge = valid[..12].to_vec();
    for _ in 0..300 {
        huge.extend_from_slice(&[1, b'a']);
    }
    huge.extend_from_slice(&[0, 0, 1, 0, 1]);
    bad.push(huge);
    let mut response = valid.clone();
    response[2] |= 0x80; // QR: a response, not a query
    bad.push(response);
    let sent = bad.len();
    lab.ns.run(|| {
        use std::io::Write;
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        // Paced, so the loopback socket buffer never overflows: every
        // packet must reach the server and be accounted for.
        for (i, b) in bad.iter().enumerate() {
            let _ = s.send_to(b, SERVER);
            if i % 10 == 9 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        // Garbage over TCP too: a length prefix with nothing behind it, and noise.
        for b in [&[0xff, 0xff, 1, 2][..], &noise(&mut seed, 100)] {
            if let Ok(mut t) = std::net::TcpStream::connect(SERVER) {
                let _ = t.write_all(b);
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let malformed = lab
        .stats
        .malformed
        .load(std::sync::atomic::Ordering::Relaxed);
    let answered: u64 = lab.stats.queries.lock().expect("stats").values().sum();
    println!(
        "{sent} malformed UDP packets sent, {malformed} counted as malformed, {answered} parsed as queries: {:?}",
        lab.stats.queries.lock().expect("stats")
    );
    assert_eq!(
        malformed + answered,
        sent as u64,
        "every packet is either dropped as malformed (counted) or answered"
    );
    assert!(malformed as usize >= sent - 5, "nearly all are malformed");
    assert_eq!(
        lab.dig(&["+short", "whoami"]),
        ["10.43.0.10"],
        "still serving"
    );
    assert_eq!(
        lab.dig(&["+tcp", "+short", "whoami"]),
        ["10.43.0.10"],
        "still serving over TCP"
    );
}

/// Open file descriptors of this process (the server runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The server's own address among its upstreams (the lab's loop: the
/// engine's DNS, the agent's address and its resolv.conf name the same
/// address) is never asked: an external name gets SERVFAIL at once, not a
/// loop that eats every file descriptor.
#[test]
fn the_server_never_forwards_to_itself() {
    let lab = DnsLab::start_with(mesh_agent::dns::Zone::new(), &["127.0.0.1:53"]);
    let before = open_fds();
    let start = std::time::Instant::now();
    let out = lab.dig(&["example.org", "A"]);
    let took = start.elapsed();
    println!(
        "external name with itself as the only upstream: {:?} in {took:?}",
        status_line(&out)
    );
    assert!(status_line(&out).contains("SERVFAIL"), "{out:?}");
    assert!(
        took < std::time::Duration::from_secs(1),
        "at once, no loop: {took:?}"
    );
    assert!(open_fds() <= before + 4, "no descriptors piling up");
}

/// A flood of queries for external names with a dead upstream: at most
/// MAX_FORWARDS wait on it (the rest get SERVFAIL at once, counted), so
/// descriptors stay bounded, and mesh names keep answering meanwhile
/// (each within 500 ms, sent once, decoded; the p99 is printed).
#[test]
fn a_flood_with_a_dead_upstream_costs_a_bounded_amount() {
    use std::{net::UdpSocket, time::Duration};
    let lab = DnsLab::start_with(zone_of("whoami", VIP, 3, &[]), &["198.51.100.2:53"]);
    let base = open_fds();
    let server: std::net::SocketAddr = SERVER.parse().expect("addr");
    let flood = |n: u16, sock: &UdpSocket| {
        for i in 0..n {
            let mut q = hickory_proto::op::Message::query();
            q.metadata.id = i;
            q.add_query(hickory_proto::op::Query::query(
                hickory_proto::rr::Name::from_ascii(format!("n{i}.flood.example.")).expect("name"),
                hickory_proto::rr::RecordType::A,
            ));
            let _ = sock.send_to(&q.to_vec().expect("encode"), server);
            // Paced so the server's socket buffer keeps up: the point is
            // what waiting on a dead upstream costs, not datagrams the
            // kernel drops before the server sees them.
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let (peak, latencies) = lab.ns.run(|| {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        flood(3000, &sock);
        // Mesh names during the flood, and the descriptors held.
        let mut peak = 0;
        let mut lat = Vec::new();
        let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
        for i in 0..50u16 {
            peak = peak.max(open_fds());
            lat.push(dnsprobe::ask(
                &probe,
                server,
                60_000 + i,
                "whoami.mesh.",
                Expect::A(VIP),
                Duration::from_millis(500),
            ));
            std::thread::sleep(Duration::from_millis(10));
        }
        (peak, lat)
    });
    let mut times: Vec<Duration> = latencies.iter().flatten().copied().collect();
    let answered = times.len();
    let failed: Vec<&String> = latencies.iter().filter_map(|l| l.as_ref().err()).collect();
    let p99 = dnsprobe::percentile(&mut times, 99);
    let queries = lab.stats.queries.lock().expect("stats").clone();
    let overload: u64 = queries
        .iter()
        .filter(|((_, r), _)| *r == "overload")
        .map(|(_, n)| n)
        .sum();
    println!(
        "3,000 external names with a dead upstream: {overload} refused at once (overload), \
         descriptors {base} -> peak {peak}; mesh names during the flood: {answered}/50, p99 {p99:?}"
    );
    assert!(overload > 0, "the limit was reached: {queries:?}");
    assert!(
        peak <= base + mesh_agent::dns::MAX_FORWARDS + 16,
        "descriptors bounded: {base} -> {peak}"
    );
    assert_eq!(latencies.len(), 50);
    assert!(
        failed.is_empty(),
        "mesh names answer during the flood: {failed:?}"
    );
}

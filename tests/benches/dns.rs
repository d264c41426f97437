//! DNS: queries per second for a service name over UDP, with a bounded
//! load generator (fixed query count, 30 s cap) in a namespace of its own,
//! and the latency distribution. Prints figures; asserts nothing.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};
use mesh_agent::labels::Proto;
use mesh_tests::dnslab::{DnsLab, SERVER, zone_of};

fn main() {
    let total: usize = std::env::var("MESH_DNS_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let clients = 16;
    let lab = DnsLab::start(zone_of(
        "whoami",
        Ipv4Addr::new(10, 43, 0, 10),
        3,
        &[(80, Proto::Tcp)],
    ));
    let per_client = total / clients;
    let started = Instant::now();
    let mut lat: Vec<Duration> = lab.ns.run(move || {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                std::thread::spawn(move || {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                    s.set_read_timeout(Some(Duration::from_secs(1)))
                        .expect("timeout");
                    s.connect(SERVER).expect("connect");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut lat = Vec::with_capacity(per_client);
                    let mut buf = [0u8; 512];
                    for i in 0..per_client {
                        if Instant::now() > deadline {
                            break;
                        }
                        let mut m = Message::new(
                            (c * per_client + i) as u16,
                            MessageType::Query,
                            OpCode::Query,
                        );
                        m.queries.push(Query::query(
                            Name::from_ascii("whoami.mesh.").expect("name"),
                            RecordType::A,
                        ));
                        let q = m.to_vec().expect("encode");
                        let t = Instant::now();
                        if s.send(&q).is_ok() && s.recv(&mut buf).is_ok() {
                            lat.push(t.elapsed());
                        }
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed();
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "dns ({} build, server and load on the same 2 cores): {} answered of {total} queries for whoami.mesh (A) from {clients} clients in {:.2} s: {:.0} queries/s, latency p50 {:?}, p99 {:?}, max {:?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        q(0.5),
        q(0.99),
        lat.last().copied().unwrap_or_default()
    );
}

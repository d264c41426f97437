//! DNS: queries per second for a service name over UDP, with a bounded
//! load generator (fixed query count, 30 s cap) in a namespace of its own,
//! and the latency distribution; then the same while other clients keep
//! the forwarder busy, to show that forwarding does not slow mesh answers.
//! The server and the load share the machine's cores: the load generator's
//! own CPU is measured (per thread) and printed beside the server's.
//! Prints figures; asserts nothing.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};
use mesh_agent::labels::Proto;
use mesh_tests::dnslab::{DnsLab, SERVER, zone_of};

/// CPU seconds used so far by the calling thread (`who` = RUSAGE_THREAD)
/// or the whole process (RUSAGE_SELF).
fn cpu_seconds(who: i32) -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// A query for `name` (type A), encoded once; the load patches the id.
fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new(0, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries.push(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    m.to_vec().expect("encode")
}

/// What one client thread measured.
struct Client {
    lat: Vec<Duration>,
    cpu: f64,
}

/// One client: `count` queries for `q`, one outstanding at a time, until
/// `count` or the deadline (or `stop`, if given).
fn client(q: &[u8], id: u16, count: usize, deadline: Instant, stop: Option<&AtomicBool>) -> Client {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    s.connect(SERVER).expect("connect");
    let mut q = q.to_vec();
    let mut lat = Vec::with_capacity(count.min(1 << 20));
    let mut buf = [0u8; 512];
    for i in 0..count {
        if Instant::now() > deadline || stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        q[..2].copy_from_slice(&(id.wrapping_mul(4099).wrapping_add(i as u16)).to_be_bytes());
        let t = Instant::now();
        if s.send(&q).is_ok() && s.recv(&mut buf).is_ok() {
            lat.push(t.elapsed());
        }
    }
    Client {
        lat,
        cpu: cpu_seconds(libc::RUSAGE_THREAD),
    }
}

/// `clients` threads asking for the mesh name, `forwarders` threads asking
/// for a name the server forwards (until the mesh clients are done).
/// Prints one line.
fn run(lab: &DnsLab, label: &str, total: usize, clients: usize, forwarders: usize) {
    let per_client = total / clients;
    let mesh_q = Arc::new(query("whoami.mesh."));
    let fwd_q = Arc::new(query("upstream.example."));
    let forwarded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let process0 = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let (mut lat, load_cpu) = lab.ns.run({
        let forwarded = forwarded.clone();
        move || {
            let fwd: Vec<_> = (0..forwarders)
                .map(|c| {
                    let (q, stop, forwarded) = (fwd_q.clone(), stop.clone(), forwarded.clone());
                    std::thread::spawn(move || {
                        let r = client(&q, 1000 + c as u16, usize::MAX, deadline, Some(&stop));
                        forwarded.fetch_add(r.lat.len() as u64, Ordering::Relaxed);
                        r.cpu
                    })
                })
                .collect();
            let mesh: Vec<_> = (0..clients)
                .map(|c| {
                    let q = mesh_q.clone();
                    std::thread::spawn(move || client(&q, c as u16, per_client, deadline, None))
                })
                .collect();
            let mut lat = Vec::with_capacity(total);
            let mut cpu = 0.0;
            for h in mesh {
                if let Ok(r) = h.join() {
                    lat.extend(r.lat);
                    cpu += r.cpu;
                }
            }
            stop.store(true, Ordering::Relaxed);
            for h in fwd {
                cpu += h.join().unwrap_or_default();
            }
            (lat, cpu)
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let process = cpu_seconds(libc::RUSAGE_SELF) - process0;
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let fwd = if forwarders > 0 {
        format!(
            "; forwarded meanwhile {:.0}/s",
            forwarded.load(Ordering::Relaxed) as f64 / elapsed
        )
    } else {
        String::new()
    };
    // The server (and, while forwarding, the fake upstream) is the
    // process's CPU less the load generator's threads.
    println!(
        "  {label:<34} {:>6} of {:>6} in {:>5.2} s {:>8.0} q/s   p50 {:.3} ms  p99 {:.3} ms  max {:.1} ms   CPU: load {:>3.0}%, server {:>3.0}% of 2 cores{fwd}",
        lat.len(),
        per_client * clients,
        elapsed,
        lat.len() as f64 / elapsed,
        ms(q(0.5)),
        ms(q(0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        load_cpu * 50.0 / elapsed,
        (process - load_cpu).max(0.0) * 50.0 / elapsed,
    );
}

fn main() {
    let total: usize = std::env::var("MESH_DNS_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let lab = DnsLab::start(zone_of(
        "whoami",
        Ipv4Addr::new(10, 43, 0, 10),
        3,
        &[(80, Proto::Tcp)],
    ));
    println!(
        "dns ({} build; the agent's layout: one current-thread runtime, one UDP socket, a task per query), queries for whoami.mesh (A), one outstanding per client, server and load generator on the same 2 cores:",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    // Warm-up: sockets, caches, the runtime's task slab.
    run(&lab, "warm-up", total / 10, 4, 0);
    run(&lab, "16 clients", total, 16, 0);
    run(&lab, "16 clients + 4 forwarding", total, 16, 4);
}

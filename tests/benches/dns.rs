//! DNS: queries per second for service names over UDP (a service's A, its
//! tasks' A and its SRV, in turn), with a bounded load generator (fixed
//! query count, 30 s cap) in a namespace of its own, and the latency
//! distribution; then the same while other clients keep the forwarder
//! busy, to show that forwarding does not slow mesh answers; then Knot DNS
//! (Debian's) serving the same records in the same namespace, with the same
//! load, and dnsperf (Debian's) against both. The servers and the load
//! share the machine's cores: the load generator's own CPU is measured
//! (per thread) and printed beside the server's. Only replies that decode
//! to the expected answer count (the others are printed). Prints figures;
//! asserts nothing.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::rr::RecordType;
use mesh_agent::labels::Proto;
use mesh_tests::{
    dnslab::{DnsLab, KNOT, Knot, SERVER, UPSTREAM_ANSWER, zone_of},
    dnsprobe::{self, Expect},
};

/// The queries every client sends in turn, with what each must get.
type Mix = Arc<Vec<(Vec<u8>, Expect)>>;

/// A service's A, its tasks' A, its SRV: the names containers ask for.
fn mesh_mix() -> Mix {
    Arc::new(vec![
        (dnsprobe::query(0, "whoami.mesh."), Expect::A(VIP)),
        (
            dnsprobe::query(0, "tasks.whoami.mesh."),
            Expect::A(Ipv4Addr::new(10, 42, 0, 10)),
        ),
        (
            dnsprobe::query_type(0, "_whoami._tcp.mesh.", RecordType::SRV),
            Expect::Srv(80),
        ),
    ])
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);

/// CPU seconds used so far by the calling thread (`who` = RUSAGE_THREAD)
/// or the whole process (RUSAGE_SELF).
fn cpu_seconds(who: i32) -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// What one client thread measured: the latency of each answer that
/// checked out, and the replies that did not (wrong id, code or record).
struct Client {
    lat: Vec<Duration>,
    wrong: u64,
    cpu: f64,
}

/// One client of `server`: `count` queries of `mix` in turn, one
/// outstanding at a time, until `count` or the deadline (or `stop`, if
/// given).
fn client(
    server: &str,
    mix: &[(Vec<u8>, Expect)],
    id: u16,
    count: usize,
    deadline: Instant,
    stop: Option<&AtomicBool>,
) -> Client {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    s.connect(server).expect("connect");
    let mut mix = mix.to_vec();
    let mut lat = Vec::with_capacity(count.min(1 << 20));
    let mut wrong = 0;
    let mut buf = [0u8; 512];
    for i in 0..count {
        if Instant::now() > deadline || stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let n = mix.len();
        let (q, expect) = &mut mix[(i + id as usize) % n];
        let expect = *expect;
        let qid = id.wrapping_mul(4099).wrapping_add(i as u16);
        q[..2].copy_from_slice(&qid.to_be_bytes());
        let t = Instant::now();
        if s.send(q).is_err() {
            continue;
        }
        match s.recv(&mut buf) {
            Ok(n) if dnsprobe::check(&buf[..n], qid, expect).is_ok() => lat.push(t.elapsed()),
            Ok(_) => wrong += 1,
            Err(_) => {}
        }
    }
    Client {
        lat,
        wrong,
        cpu: cpu_seconds(libc::RUSAGE_THREAD),
    }
}

/// `clients` threads asking `server` for mesh names (`mix`), `forwarders`
/// threads asking for a name the server forwards (until the mesh clients
/// are done). Prints one line.
fn run(
    lab: &DnsLab,
    server: &'static str,
    label: &str,
    total: usize,
    clients: usize,
    forwarders: usize,
) {
    let per_client = total / clients;
    let mesh_q = mesh_mix();
    let fwd_q: Mix = Arc::new(vec![(
        dnsprobe::query(0, "upstream.example."),
        Expect::A(UPSTREAM_ANSWER),
    )]);
    let wrong = Arc::new(AtomicU64::new(0));
    let forwarded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let process0 = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let (mut lat, load_cpu) = lab.ns.run({
        let forwarded = forwarded.clone();
        let wrong = wrong.clone();
        move || {
            let fwd: Vec<_> = (0..forwarders)
                .map(|c| {
                    let (q, stop, forwarded, wrong) = (
                        fwd_q.clone(),
                        stop.clone(),
                        forwarded.clone(),
                        wrong.clone(),
                    );
                    std::thread::spawn(move || {
                        let r = client(
                            server,
                            &q,
                            1000 + c as u16,
                            usize::MAX,
                            deadline,
                            Some(&stop),
                        );
                        forwarded.fetch_add(r.lat.len() as u64, Ordering::Relaxed);
                        wrong.fetch_add(r.wrong, Ordering::Relaxed);
                        r.cpu
                    })
                })
                .collect();
            let mesh: Vec<_> = (0..clients)
                .map(|c| {
                    let q = mesh_q.clone();
                    std::thread::spawn(move || {
                        client(server, &q, c as u16, per_client, deadline, None)
                    })
                })
                .collect();
            let mut lat = Vec::with_capacity(total);
            let mut cpu = 0.0;
            for h in mesh {
                if let Ok(r) = h.join() {
                    lat.extend(r.lat);
                    wrong.fetch_add(r.wrong, Ordering::Relaxed);
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
    let wrong = wrong.load(Ordering::Relaxed);
    if wrong > 0 {
        println!("  {wrong} replies did not check out (id, code or record)");
    }
}

fn main() {
    let total: usize = std::env::var("MESH_DNS_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let zone = zone_of("whoami", VIP, 3, &[(80, Proto::Tcp)]);
    let lab = DnsLab::start(zone.clone());
    println!(
        "dns ({} build; the agent's layout: a UDP worker per core, each with a socket, a current-thread runtime and the answers it keeps as bytes), queries for whoami.mesh (A), tasks.whoami.mesh (A) and _whoami._tcp.mesh (SRV) in turn, one outstanding per client, server and load generator on the same 2 cores:",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    // Warm-up: sockets, caches, the runtime's task slab.
    run(&lab, SERVER, "warm-up", total / 10, 4, 0);
    run(&lab, SERVER, "mesh: 16 clients", total, 16, 0);
    run(
        &lab,
        SERVER,
        "mesh: 16 clients + 4 forwarding",
        total,
        16,
        4,
    );
    // Knot with as many UDP workers as the machine has cores (its default).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let knot = Knot::start(&lab, &zone, cores);
    run(&lab, KNOT, "warm-up", total / 10, 4, 0);
    run(
        &lab,
        KNOT,
        &format!("Knot ({cores} UDP workers): 16 clients"),
        total,
        16,
        0,
    );
    println!(
        "dnsperf (Debian's), the same names in turn, 8 clients, 5 s, up to 100 queries outstanding (its default), three rounds taking turns:"
    );
    for round in 1..=3 {
        for (name, server) in [("mesh", SERVER), ("Knot", KNOT)] {
            dnsperf(&lab, &format!("{name}, round {round}"), server);
        }
    }
    drop(knot);
}

/// One dnsperf run against `server`; prints its figures in one line.
fn dnsperf(lab: &DnsLab, label: &str, server: &str) {
    let file = std::env::temp_dir().join(format!("mesh-dnsperf-{}.txt", std::process::id()));
    std::fs::write(
        &file,
        "whoami.mesh A\ntasks.whoami.mesh A\n_whoami._tcp.mesh SRV\n",
    )
    .expect("query file");
    let (host, port) = server.split_once(':').expect("address:port");
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns.name,
            "dnsperf",
            "-s",
            host,
            "-p",
            port,
        ])
        .arg("-d")
        .arg(&file)
        .args(["-c", "8", "-l", "5"])
        .output()
        .expect("dnsperf runs (apt-get install dnsperf)");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let qps: f64 = field("Queries per second:").parse().unwrap_or(0.0);
    let avg: f64 = field("Average Latency (s):")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!(
        "  {label:<20} {qps:>8.0} q/s   average latency {:.3} ms   lost {}   codes {}",
        avg * 1e3,
        field("Queries lost:"),
        field("Response codes:"),
    );
}

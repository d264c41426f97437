//! The agent's DNS server, run for tests inside a network namespace the
//! test creates (its loopback only), with a fake upstream resolver in the
//! same namespace.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::Arc,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{RData, Record, rdata::A},
};
use mesh_agent::{
    dns::{DnsConfig, DnsStats, Handler, SharedZone, Zone, ZoneService, serve},
    labels::Proto,
};

use crate::netns::{Netns, unique};

/// The address the fake upstream answers for `upstream.example.`
pub const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const SERVER: &str = "127.0.0.1:53";

pub struct DnsLab {
    pub ns: Netns,
    pub zone: Arc<SharedZone>,
    pub stats: Arc<DnsStats>,
    _threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsLab {
    /// The server on 127.0.0.1:53 and the upstream on 127.0.0.2:53, in a new
    /// namespace; `zone` as the agent would publish it.
    pub fn start(zone: Zone) -> Self {
        Self::start_with(zone, &["127.0.0.2:53"])
    }

    /// As [`DnsLab::start`], forwarding to `upstreams` (the fake upstream
    /// still answers on 127.0.0.2:53; 198.51.100.2 is a dead one: packets
    /// to it vanish into a veth whose other end has no address).
    pub fn start_with(zone: Zone, upstreams: &[&str]) -> Self {
        let ns = Netns::new(&unique("mdns"));
        ns.ip(&["addr", "add", "127.0.0.2/8", "dev", "lo"]);
        ns.ip(&["link", "add", "dead0", "type", "veth", "peer", "dead1"]);
        ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "dead0"]);
        ns.ip(&["link", "set", "dead0", "up"]);
        ns.ip(&["link", "set", "dead1", "up"]);
        ns.ip(&[
            "neigh",
            "add",
            "198.51.100.2",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "dead0",
            "nud",
            "permanent",
        ]);
        let zone = Arc::new(SharedZone::new(zone));
        let stats = Arc::new(DnsStats::default());
        let cfg = DnsConfig {
            domain: "mesh".into(),
            vip_ttl: 60,
            tasks_ttl: 5,
            upstreams: upstreams
                .iter()
                .map(|u| u.parse().expect("upstream address"))
                .collect(),
            clients: mesh_agent::dns::Clients::Only(vec![]),
        };
        let handler = Arc::new(Handler::new(zone.clone(), cfg, stats.clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        let server = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let addr: SocketAddr = SERVER.parse().expect("addr");
                let serving = serve(addr, handler);
                let _ = tx.send(());
                let _ = serving.await;
            });
        });
        let upstream = ns.spawn(|| fake_upstream("127.0.0.2:53"));
        rx.recv().expect("server thread started");
        std::thread::sleep(std::time::Duration::from_millis(200));
        DnsLab {
            ns,
            zone,
            stats,
            _threads: vec![server, upstream],
        }
    }

    /// `dig` in the namespace; its short output lines.
    pub fn dig(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns.name))
            .args(["dig", "@127.0.0.1", "+time=2", "+tries=1"])
            .args(args)
            .output()
            .expect("dig runs (apt-get install dnsutils)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A zone with `service` at `vip`, `tasks` backends and the given ports.
pub fn zone_of(service: &str, vip: Ipv4Addr, tasks: usize, ports: &[(u16, Proto)]) -> Zone {
    let tasks = (0..tasks)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 0, 10)) + i as u32))
        .collect();
    Zone::from([(
        service.to_string(),
        ZoneService {
            vip: Some(vip),
            ports: ports.to_vec(),
            tasks,
        },
    )])
}

/// Answers `upstream.example.` A with UPSTREAM_ANSWER (other types: no
/// data), everything else
/// NXDOMAIN, on `addr` (in the caller's namespace). Stops after 60 s
/// without a query.
pub fn fake_upstream(addr: &str) {
    let sock = std::net::UdpSocket::bind(addr).expect("bind upstream");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
        r.metadata.recursion_available = true;
        r.queries = q.queries.clone();
        match q.queries.first() {
            Some(query)
                if query
                    .name()
                    .to_ascii()
                    .eq_ignore_ascii_case("upstream.example.") =>
            {
                if query.query_type() == hickory_proto::rr::RecordType::A {
                    r.answers.push(Record::from_rdata(
                        query.name().clone(),
                        30,
                        RData::A(A(UPSTREAM_ANSWER)),
                    ));
                }
            }
            _ => r.metadata.response_code = ResponseCode::NXDomain,
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

/// The address Knot DNS answers on in the lab's namespace.
pub const KNOT: &str = "127.0.0.3:53";

/// Knot DNS (Debian's `knot`), authoritative for `mesh.` with the records
/// the agent answers for `zone` (a service's A, `tasks.` A and SRV, with
/// the agent's TTLs), in the lab's namespace on [`KNOT`]: the reference
/// the DNS benchmark compares the agent with. Stopped when dropped.
pub struct Knot {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Knot {
    /// Starts knotd with `udp_workers` UDP threads and waits (5 s at most)
    /// until it answers.
    pub fn start(lab: &DnsLab, zone: &Zone, udp_workers: usize) -> Knot {
        let dir = std::env::temp_dir().join(unique("mesh-knot"));
        std::fs::create_dir_all(&dir).expect("knot directory");
        let d = dir.display();
        let conf = format!(
            "server:\n    rundir: \"{d}\"\n    listen: {}\n    udp-workers: {udp_workers}\n    \
             tcp-workers: 1\n    background-workers: 1\ndatabase:\n    storage: \"{d}\"\n\
             log:\n  - target: stderr\n    any: warning\nzone:\n  - domain: mesh\n    \
             storage: \"{d}\"\n    file: \"mesh.zone\"\n    journal-content: none\n    \
             zonefile-sync: -1\n",
            KNOT.replace(':', "@")
        );
        std::fs::write(dir.join("knot.conf"), conf).expect("knot.conf");
        std::fs::write(dir.join("mesh.zone"), zone_file(zone, 60, 5)).expect("zone file");
        lab.ns.ip(&["addr", "add", "127.0.0.3/8", "dev", "lo"]);
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns.name, "knotd", "-c"])
            .arg(dir.join("knot.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("knotd runs (apt-get install knot)");
        let knot = Knot { child, dir };
        let q = crate::dnsprobe::query(7, "ns.mesh.");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let answered = || {
            lab.ns.run(|| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
                s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .ok()?;
                s.send_to(&q, KNOT).ok()?;
                let mut buf = [0u8; 512];
                let n = s.recv(&mut buf).ok()?;
                crate::dnsprobe::check(&buf[..n], 7, crate::dnsprobe::Expect::AnyA).ok()
            })
        };
        while answered().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "knotd never answered on {KNOT}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        knot
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `zone` as a zone file for `mesh.`: what the agent answers for each
/// service (its VIP, its tasks, an SRV record per port), with its TTLs.
pub fn zone_file(zone: &Zone, vip_ttl: u32, tasks_ttl: u32) -> String {
    let mut out = format!(
        "$ORIGIN mesh.\n@ {tasks_ttl} SOA ns.mesh. hostmaster.mesh. 1 60 60 600 {tasks_ttl}\n\
         @ {tasks_ttl} NS ns.mesh.\nns {tasks_ttl} A 127.0.0.3\n"
    );
    for (name, s) in zone {
        if let Some(vip) = s.vip {
            out += &format!("{name} {vip_ttl} A {vip}\n");
        }
        for t in &s.tasks {
            out += &format!("tasks.{name} {tasks_ttl} A {t}\n");
        }
        for (port, proto) in &s.ports {
            let p = match proto {
                Proto::Tcp => "_tcp",
                Proto::Udp => "_udp",
            };
            out += &format!("_{name}.{p} {vip_ttl} SRV 0 0 {port} {name}.mesh.\n");
        }
    }
    out
}

//! `cargo xtask bench lb`: the same client, backends and namespace topology
//! for plain routing, iptables DNAT laid out as kube-proxy does (N other
//! services ahead of ours) and mesh's VIP, side by side from one run.
//!
//! Topology: a "host" namespace routes between the client (10.42.1.2, its
//! own veth) and three backends on a bridge (10.42.0.11-13), so every mode
//! crosses the same one routing hop; mesh's TC programs sit on the client's
//! and the backends' veths only while mesh is measured. Backends run nginx
//! (one worker each) on port 80 and a UDP sink on 5353.
//!
//! Loads, each bounded in time or count: wrk (Debian's) with a new
//! connection per request (connections/s), wrk with keep-alive
//! (requests/s), both with p50/p99; a UDP sender of 64-byte datagrams
//! (packets/s received). CPU is the whole machine's (/proc/stat), divided
//! by what was done: everything (load, backends, the data path) shares the
//! same 2 cores, so differences between rows are the data paths' costs.
//! Counters prove each row's path: mesh rows must move mesh's new-flow
//! counter once per connection, iptables rows their DNAT rules'.
//!
//! mesh runs two ways: translating every packet on the veths (the path of
//! what sockets do not cover), and balanced at the socket, as the agent
//! balances its containers' connects: the client's namespace listed, the
//! bench process (and the wrk it starts) in a cgroup carrying the socket
//! programs, so each connect goes to the backend's own address and its
//! packets cross the veth programs untranslated.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{TcAttachType, tc::SchedClassifierLinkId};
use mesh_agent::{
    dataplane::{self, progs},
    maglev::{self, Identity},
};
use mesh_common::{
    lb::{Backend, PROTO_TCP, PROTO_UDP, backend_state},
    stats::Stat,
};
use mesh_tests::{
    harness::Harness,
    netns::{Netns, unique},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 2);
const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 1);
const BACKEND_GW: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
const HTTP_PORT: u16 = 80;
const VIP_UDP_PORT: u16 = 53;
const UDP_PORT: u16 = 5353;
const BACKENDS: usize = 3;

fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, 11 + i as u8)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds this process used so far (its threads and the kernel's work
/// done in their context: the UDP sender's and sinks' packets).
fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

struct Lab {
    host: Netns,
    client: Netns,
    backends: Vec<Netns>,
    nginx: Vec<Child>,
    dir: PathBuf,
    harness: Harness,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    sinks: Arc<AtomicU64>,
    stop_sinks: Arc<AtomicBool>,
    /// The socket programs' cgroup, once attached.
    sockets: Option<SocketCgroup>,
}

/// A cgroup of the bench's own with the socket programs (their links pinned
/// under `bpffs`), and the cgroup the bench process came from.
struct SocketCgroup {
    path: PathBuf,
    bpffs: PathBuf,
    home: PathBuf,
}

impl SocketCgroup {
    /// Moves this process (and what it starts from now on) into `dir`.
    fn enter(dir: &std::path::Path) {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("joining {}: {e}", dir.display()));
    }
}

impl Drop for SocketCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.path);
    }
}

impl Lab {
    fn new() -> Self {
        let host = Netns::new(&unique("mbh"));
        host.ip(&["link", "add", "br0", "type", "bridge"]);
        host.ip(&["addr", "add", &format!("{BACKEND_GW}/24"), "dev", "br0"]);
        host.ip(&["link", "set", "br0", "up"]);
        sysctl(&host, "net.ipv4.ip_forward", "1");
        // Every row runs with netfilter's conntrack on in the routing
        // namespace, as a Docker host has it (Docker's own nat rules): a
        // nat table, empty but for this chain.
        let ok = netns_cmd(&host, "iptables")
            .args(["-t", "nat", "-N", "MESH-BENCH"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "iptables -t nat -N in {}", host.name);
        let client = Netns::new(&unique("mbc"));
        host.ip(&[
            "link",
            "add",
            "vcl",
            "type",
            "veth",
            "peer",
            "eth0",
            "netns",
            &client.name,
        ]);
        host.ip(&["addr", "add", &format!("{CLIENT_GW}/24"), "dev", "vcl"]);
        host.ip(&["link", "set", "vcl", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", &CLIENT_GW.to_string()]);
        // A new connection per request: wrk cycles through ports fast.
        sysctl(&client, "net.ipv4.ip_local_port_range", "1024 65535");
        sysctl(&client, "net.ipv4.tcp_tw_reuse", "1");
        let dir = std::env::temp_dir().join(unique("mesh-lbbench"));
        std::fs::create_dir_all(&dir).expect("bench directory");
        let mut backends = Vec::new();
        let mut nginx = Vec::new();
        for i in 0..BACKENDS {
            let ns = Netns::new(&unique(&format!("mbb{i}")));
            let veth = format!("vb{i}");
            host.ip(&[
                "link", "add", &veth, "type", "veth", "peer", "eth0", "netns", &ns.name,
            ]);
            host.ip(&["link", "set", &veth, "master", "br0", "up"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_ip(i)),
                "dev",
                "eth0",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &BACKEND_GW.to_string()]);
            nginx.push(start_nginx(&ns, &dir.join(format!("b{i}")), i));
            backends.push(ns);
        }
        let sinks = Arc::new(AtomicU64::new(0));
        let stop_sinks = Arc::new(AtomicBool::new(false));
        for ns in &backends {
            let (count, stop) = (sinks.clone(), stop_sinks.clone());
            let sock = ns.run(|| UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind UDP sink"));
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if sock.recv(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let harness = Harness::new();
        let lab = Lab {
            host,
            client,
            backends,
            nginx,
            dir,
            harness,
            links: Vec::new(),
            sinks,
            stop_sinks,
            sockets: None,
        };
        lab.wait_for_nginx();
        lab
    }

    fn wait_for_nginx(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..BACKENDS {
            let to = (backend_ip(i), HTTP_PORT).into();
            while self
                .host
                .run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)))
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "nginx in backend {i} never listened"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits (at most 5 s) until the sinks counted nothing for 200 ms.
    fn sinks_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.sinks.load(Ordering::Relaxed);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.sinks.load(Ordering::Relaxed);
            if now == last {
                return;
            }
            last = now;
        }
    }

    fn ifindex(&self, veth: &str) -> u32 {
        self.host
            .link_field(veth, "ifindex")
            .as_u64()
            .expect("ifindex") as u32
    }

    /// mesh: the client's and the backends' addresses and veths, the TCP
    /// and UDP services over the first `n` backends, the TC programs on
    /// every veth (as the agent would do it).
    fn mesh_on(&mut self, n: usize) {
        let client_ifindex = self.ifindex("vcl");
        let client_mac = parse_mac(
            self.client
                .link_field("eth0", "address")
                .as_str()
                .expect("mac"),
        );
        let mut eps = vec![(CLIENT, client_ifindex, client_mac)];
        let mut members = Vec::new();
        for i in 0..BACKENDS {
            let ifindex = self.ifindex(&format!("vb{i}"));
            let mac = parse_mac(
                self.backends[i]
                    .link_field("eth0", "address")
                    .as_str()
                    .expect("mac"),
            );
            eps.push((backend_ip(i), ifindex, mac));
            for (id, port) in [(i as u32 + 1, HTTP_PORT), (i as u32 + 101, UDP_PORT)] {
                let b = Backend {
                    ip_be: u32::from(backend_ip(i)).to_be(),
                    port_be: port.to_be(),
                    state: backend_state::ACTIVE,
                    ifindex,
                    mac,
                    ..Backend::default()
                };
                self.harness.lb.set_backend(id, &b).expect("backend");
            }
            if i < n {
                members.push((
                    i as u32 + 1,
                    Identity {
                        ip: backend_ip(i),
                        port: HTTP_PORT,
                    },
                ));
            }
        }
        for (ip, ifindex, mac) in eps {
            self.harness.container(ip, ifindex, mac);
        }
        let tcp_ring = maglev::build_ids(&members);
        let udp_ring: Vec<u32> = tcp_ring.iter().map(|id| id + 100).collect();
        self.harness.lb.set_ring(1, &tcp_ring).expect("ring");
        self.harness.lb.set_ring(2, &udp_ring).expect("ring");
        for (port, proto, id) in [(HTTP_PORT, PROTO_TCP, 1), (VIP_UDP_PORT, PROTO_UDP, 2)] {
            self.harness.set_service(VIP, port, proto, id);
        }
        let ifaces: Vec<String> = std::iter::once("vcl".to_string())
            .chain((0..BACKENDS).map(|i| format!("vb{i}")))
            .collect();
        let mut links = Vec::new();
        let harness = &mut self.harness;
        self.host.run(|| {
            for iface in &ifaces {
                for (name, at) in [
                    (progs::TC_FROM_CONTAINER, TcAttachType::Ingress),
                    (progs::TC_TO_CONTAINER, TcAttachType::Egress),
                ] {
                    let id = dataplane::tc(harness.ebpf_mut(), name)
                        .expect("TC program")
                        .attach(iface, at)
                        .unwrap_or_else(|e| panic!("attach {name} to {iface}: {e:?}"));
                    links.push((name, id));
                }
            }
        });
        self.links = links;
    }

    /// Socket-level balancing for the client: its namespace listed, this
    /// process in the programs' cgroup (attached on first use).
    fn sockets_on(&mut self) {
        if self.sockets.is_none() {
            let root = dataplane::sockets::cgroup2_dir(std::path::Path::new("/sys/fs/cgroup"))
                .unwrap_or_else(|e| panic!("socket-level balancing needs cgroup v2: {e}"));
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/")
                .trim()
                .trim_start_matches('/')
                .to_string();
            let path = root.join(unique("mesh-lbbench"));
            std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let bpffs = std::path::Path::new("/sys/fs/bpf").join(unique("mesh-lbbench"));
            let cg = SocketCgroup {
                path,
                bpffs,
                home: root.join(rel),
            };
            dataplane::sockets::attach(self.harness.ebpf_mut(), &cg.path, &cg.bpffs)
                .unwrap_or_else(|e| panic!("attaching the socket programs: {e}"));
            self.sockets = Some(cg);
        }
        let cookie = self
            .client
            .run(dataplane::sockets::netns_cookie)
            .expect("the client's netns cookie");
        self.harness
            .lb
            .sock_netns
            .insert(cookie, 1, 0)
            .expect("client listed");
        if let Some(cg) = &self.sockets {
            SocketCgroup::enter(&cg.path);
        }
    }

    /// Back to the cgroup the bench came from, the client unlisted.
    fn sockets_off(&mut self) {
        if let Some(cg) = &self.sockets {
            SocketCgroup::enter(&cg.home);
        }
        let keys: Vec<u64> = self
            .harness
            .lb
            .sock_netns
            .keys()
            .filter_map(Result::ok)
            .collect();
        for k in keys {
            let _ = self.harness.lb.sock_netns.remove(&k);
        }
    }

    /// kube-proxy's iptables layout: `ahead` other services' rules, then
    /// ours, picking one of the backends at random per connection.
    /// Takes the TC programs off the veths again.
    fn mesh_off(&mut self) {
        for (name, id) in std::mem::take(&mut self.links) {
            let _ = dataplane::tc(self.harness.ebpf_mut(), name).map(|p| p.detach(id));
        }
    }

    fn iptables_on(&self, ahead: usize, n: usize) {
        let mut rules = String::from(
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-MESH - [0:0]\n:KUBE-SVC-MESHU - [0:0]\n:KUBE-OTHER - [0:0]\n",
        );
        for i in 0..BACKENDS {
            let _ = writeln!(rules, ":KUBE-SEP-{i} - [0:0]\n:KUBE-SEPU-{i} - [0:0]");
        }
        rules.push_str("-A PREROUTING -j KUBE-SERVICES\n");
        for j in 0..ahead {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + j as u32);
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {ip}/32 -p tcp --dport 80 -j KUBE-OTHER"
            );
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {VIP}/32 -p tcp --dport {HTTP_PORT} -j KUBE-SVC-MESH\n-A KUBE-SERVICES -d {VIP}/32 -p udp --dport {VIP_UDP_PORT} -j KUBE-SVC-MESHU"
        );
        for i in 0..n {
            let left = n - i;
            let pick = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.5} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A KUBE-SVC-MESH {pick}-j KUBE-SEP-{i}\n-A KUBE-SVC-MESHU {pick}-j KUBE-SEPU-{i}\n-A KUBE-SEP-{i} -p tcp -j DNAT --to-destination {}:{HTTP_PORT}\n-A KUBE-SEPU-{i} -p udp -j DNAT --to-destination {}:{UDP_PORT}",
                backend_ip(i),
                backend_ip(i)
            );
        }
        rules.push_str("COMMIT\n");
        let mut child = netns_cmd(&self.host, "iptables-restore")
            .stdin(Stdio::piped())
            .spawn()
            .expect("iptables-restore runs");
        if let Some(stdin) = child.stdin.as_mut() {
            use std::io::Write;
            stdin.write_all(rules.as_bytes()).expect("rules written");
        }
        assert!(
            child.wait().expect("iptables-restore").success(),
            "iptables-restore failed"
        );
    }

    /// Back to an empty nat table (it stays registered: conntrack stays
    /// on, as on a Docker host).
    fn iptables_off(&self) {
        for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
            let _ = netns_cmd(&self.host, "iptables").args(args).status();
        }
    }

    /// Packets that reached our DNAT rules.
    fn dnat_packets(&self) -> u64 {
        let out = netns_cmd(&self.host, "iptables")
            .args(["-t", "nat", "-L", "-v", "-x", "-n"])
            .output()
            .expect("iptables -L");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("DNAT"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    fn counter(&self, s: Stat) -> u64 {
        self.harness.counters()[s as usize]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_sinks.store(true, Ordering::Relaxed);
        // SIGTERM: nginx's master stops its worker first (SIGKILL left
        // the worker running, orphaned); SIGKILL after 2 s regardless.
        for c in &mut self.nginx {
            // SAFETY: signalling the child this lab started.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.nginx {
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn netns_cmd(ns: &Netns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, program]);
    c
}

fn sysctl(ns: &Netns, key: &str, value: &str) {
    let ok = netns_cmd(ns, "sysctl")
        .args(["-q", "-w", &format!("{key}={value}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "sysctl {key}={value} in {}", ns.name);
}

fn parse_mac(s: &str) -> [u8; 6] {
    s.parse::<mesh_common::mac::Mac>().expect("a MAC address").0
}

/// nginx with one worker, answering every request with a short body.
fn start_nginx(ns: &Netns, dir: &std::path::Path, i: usize) -> Child {
    std::fs::create_dir_all(dir).expect("nginx directory");
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
          fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
          keepalive_requests 1000000;\n\
          server {{ listen {HTTP_PORT} backlog=4096; location / {{ return 200 \"b{i}\\n\"; }} }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    netns_cmd(ns, "nginx")
        .args(["-c", &path.display().to_string(), "-p", &d.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts (apt-get install nginx)")
}

/// What wrk measured.
#[derive(Default, Clone, Copy)]
struct Wrk {
    requests: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    cpu_s: f64,
}

fn ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => f64::NAN,
    }
}

/// wrk from the client for `secs` seconds against `url`; `close`: a new
/// connection per request.
fn wrk(lab: &Lab, url: &str, close: bool, secs: u32) -> Wrk {
    let mut c = netns_cmd(&lab.client, "wrk");
    c.args([
        "-t",
        "2",
        "-c",
        "64",
        "-d",
        &format!("{secs}s"),
        "--latency",
    ]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    c.arg(url);
    let (out, cpu_s) =
        mesh_tests::cpu::busy_during(|| c.output().expect("wrk runs (apt-get install wrk)"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk {
        cpu_s,
        ..Wrk::default()
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => w.p50_ms = ms(v),
            ["99%", v] => w.p99_ms = ms(v),
            [n, "requests", "in", ..] => w.requests = n.parse().unwrap_or(0),
            ["Requests/sec:", v] => w.per_sec = v.parse().unwrap_or(0.0),
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|v| v.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", v] => w.errors += v.parse().unwrap_or(0),
            _ => {}
        }
    }
    assert!(
        w.requests > 0,
        "wrk {url} printed no result:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w
}

/// What the UDP sender measured.
#[derive(Default, Clone, Copy)]
struct Udp {
    sent: u64,
    received: u64,
    per_sec: f64,
    cpu_s: f64,
}

/// 4 sockets send `count` 64-byte datagrams each to `to`, as fast as they
/// can, or paced at `rate` datagrams/s in all; the backends' sinks count
/// what arrived. CPU: this process's (sender and sinks are its threads,
/// and the kernel forwards each datagram in the sender's context), which
/// /proc/stat's ticks undercount when the machine is mostly idle.
fn udp(lab: &Lab, to: (Ipv4Addr, u16), count: u64, rate: Option<u64>) -> Udp {
    let before = lab.sinks.load(Ordering::Relaxed);
    let started = Instant::now();
    let cpu0 = process_cpu();
    let sent = {
        lab.client.run(|| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    s.connect(to).expect("connect");
                    std::thread::spawn(move || {
                        let payload = [0x6du8; 64];
                        let start = Instant::now();
                        let deadline = start + Duration::from_secs(20);
                        // Paced: a batch per millisecond.
                        let batch = rate.map_or(u64::MAX, |r| (r / 4 / 1000).max(1));
                        let mut sent = 0u64;
                        let mut tick = 0u64;
                        while sent < count && Instant::now() < deadline {
                            let mut n = 0;
                            while n < batch && sent < count {
                                if s.send(&payload).is_ok() {
                                    sent += 1;
                                }
                                n += 1;
                            }
                            if rate.is_some() {
                                tick += 1;
                                let next = start + Duration::from_millis(tick);
                                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                            }
                        }
                        sent
                    })
                })
                .collect();
            let sent: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            // What is still queued arrives within moments.
            std::thread::sleep(Duration::from_millis(300));
            sent
        })
    };
    let cpu_s = process_cpu() - cpu0;
    let elapsed = started.elapsed().as_secs_f64() - 0.3;
    let received = lab.sinks.load(Ordering::Relaxed) - before;
    Udp {
        sent,
        received,
        per_sec: received as f64 / elapsed.max(1e-3),
        cpu_s,
    }
}

/// One run of one mode.
struct Sample {
    conn: Wrk,
    keep: Wrk,
    /// As fast as the senders go (packets/s received).
    udp: Udp,
    /// Paced below what any mode drops (CPU per packet).
    paced: Udp,
    /// What the counters said about the path.
    path: String,
}

/// A mode's runs; every figure printed is the median over them.
struct Row {
    name: String,
    samples: Vec<Sample>,
}

impl Row {
    fn med(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// What is measured.
#[derive(Clone, Copy)]
enum Mode {
    Routing,
    Iptables(usize),
    Mesh(usize),
    /// mesh balancing the client's connects at the socket.
    MeshSocket(usize),
}

impl Mode {
    fn name(self, ahead: usize) -> String {
        match self {
            Mode::Routing => "plain routing (1 backend)".into(),
            Mode::Iptables(n) => format!("iptables DNAT, {ahead} services ahead ({})", backends(n)),
            Mode::Mesh(n) => format!("mesh VIP ({})", backends(n)),
            Mode::MeshSocket(n) => format!("mesh VIP at the socket ({})", backends(n)),
        }
    }
}

fn backends(n: usize) -> String {
    format!("{n} backend{}", if n > 1 { "s" } else { "" })
}

/// CPU microseconds per unit.
fn per(cpu: f64, n: u64) -> f64 {
    cpu * 1e6 / n.max(1) as f64
}

/// The UDP runs of one row: paced (3 s), then flat out; each starts once
/// the sinks have gone quiet.
fn udp_pair(lab: &Lab, to: (Ipv4Addr, u16), count: u64, rate: u64) -> (Udp, Udp) {
    lab.sinks_quiet();
    let paced = udp(lab, to, rate * 3 / 4, Some(rate));
    lab.sinks_quiet();
    let flat = udp(lab, to, count, None);
    lab.sinks_quiet();
    (flat, paced)
}

struct Settings {
    secs: u32,
    ahead: usize,
    udp_count: u64,
    udp_rate: u64,
}

/// One run of `mode`: set up, measured, path checked, torn down.
fn measure(lab: &mut Lab, mode: Mode, set: &Settings) -> Sample {
    let vip_url = format!("http://{VIP}:{HTTP_PORT}/");
    // The routing namespace's netfilter conntrack outlives a mode. A
    // DNATed connection whose reply tuple is a direct connection's from an
    // earlier mode (routing, or mesh at the socket: the client's port to a
    // backend's address) is a clash netfilter resolves by dropping the SYN,
    // which then waits a second to be sent again. The iptables modes take
    // their client ports from a range of their own, so their tuples never
    // meet the others'.
    let ports = if matches!(mode, Mode::Iptables(_)) {
        "1024 33279"
    } else {
        "33280 65535"
    };
    sysctl(&lab.client, "net.ipv4.ip_local_port_range", ports);
    let (secs, count, rate) = (set.secs, set.udp_count, set.udp_rate);
    match mode {
        Mode::Routing => {
            let direct = format!("http://{}:{HTTP_PORT}/", backend_ip(0));
            // The same order as every mode: connections, requests, UDP.
            let conn = wrk(lab, &direct, true, secs);
            let keep = wrk(lab, &direct, false, secs);
            let (udp, paced) = udp_pair(lab, (backend_ip(0), UDP_PORT), count, rate);
            Sample {
                conn,
                keep,
                udp,
                paced,
                path: "no DNAT, no programs".into(),
            }
        }
        Mode::Iptables(n) => {
            lab.iptables_on(set.ahead, n);
            let d0 = lab.dnat_packets();
            let conn = wrk(lab, &vip_url, true, secs);
            let keep = wrk(lab, &vip_url, false, secs);
            let (udp, paced) = udp_pair(lab, (VIP, VIP_UDP_PORT), count, rate);
            let dnat = lab.dnat_packets() - d0;
            lab.iptables_off();
            // Every TCP connection and every UDP flow went through a DNAT rule.
            assert!(
                dnat >= conn.requests,
                "iptables row: {dnat} packets hit the DNAT rules for {} connections",
                conn.requests
            );
            Sample {
                conn,
                keep,
                udp,
                paced,
                path: format!("{dnat} packets through the DNAT rules"),
            }
        }
        Mode::Mesh(n) => {
            lab.mesh_on(n);
            let seen = |lab: &Lab| lab.counter(Stat::LbNewFlow) + lab.counter(Stat::LbCtHit);
            let (new0, seen0) = (lab.counter(Stat::LbNewFlow), seen(lab));
            let replies = |lab: &Lab| {
                (
                    lab.counter(Stat::NatReverseHere),
                    lab.counter(Stat::NatReverse),
                )
            };
            let replies0 = replies(lab);
            let conn = wrk(lab, &vip_url, true, secs);
            let (new_flows, tcp_packets) = (lab.counter(Stat::LbNewFlow) - new0, seen(lab) - seen0);
            let keep = wrk(lab, &vip_url, false, secs);
            let seen0 = seen(lab);
            let (udp, paced) = udp_pair(lab, (VIP, VIP_UDP_PORT), count, rate);
            let balanced = seen(lab) - seen0;
            let (here, at_client) = (replies(lab).0 - replies0.0, replies(lab).1 - replies0.1);
            lab.mesh_off();
            // Every packet of every connection went through the VIP path
            // (at least SYN, request and FIN each); a client port reused
            // within the run finds its finished flow's entry (no sweeper
            // runs here), so new flows are fewer than connections.
            assert!(
                tcp_packets >= 3 * conn.requests,
                "mesh row: {tcp_packets} packets balanced for {} connections",
                conn.requests
            );
            assert!(
                balanced >= udp.sent + paced.sent,
                "mesh row: {balanced} datagrams balanced of {} sent",
                udp.sent + paced.sent
            );
            Sample {
                conn,
                keep,
                udp,
                paced,
                path: format!(
                    "{tcp_packets} TCP packets balanced ({new_flows} new flows), {balanced} datagrams; replies translated at the backend's veth {here}, at the client's {at_client}"
                ),
            }
        }
        Mode::MeshSocket(n) => {
            lab.mesh_on(n);
            lab.sockets_on();
            let translated = |lab: &Lab| lab.counter(Stat::LbNewFlow) + lab.counter(Stat::LbCtHit);
            let (sock0, tr0) = (lab.counter(Stat::SockVipContainer), translated(lab));
            let conn = wrk(lab, &vip_url, true, secs);
            let keep = wrk(lab, &vip_url, false, secs);
            let (udp, paced) = udp_pair(lab, (VIP, VIP_UDP_PORT), count, rate);
            let (sockets, tr) = (
                lab.counter(Stat::SockVipContainer) - sock0,
                translated(lab) - tr0,
            );
            lab.sockets_off();
            lab.mesh_off();
            // Every connection balanced at its connect, no packet translated.
            assert!(
                sockets >= conn.requests && tr == 0,
                "socket row: {sockets} sockets balanced for {} connections, {tr} packets translated",
                conn.requests
            );
            Sample {
                conn,
                keep,
                udp,
                paced,
                path: format!("{sockets} sockets balanced at connect, {tr} packets translated"),
            }
        }
    }
}

fn main() {
    if std::env::var_os("MESH_LB_BENCH_PROFILE").is_some() {
        profile_connections(env_or("MESH_LB_BENCH_SECS", 5));
        return;
    }
    let set = Settings {
        secs: env_or("MESH_LB_BENCH_SECS", 4),
        ahead: env_or("MESH_LB_BENCH_SERVICES_AHEAD", 1000),
        udp_count: env_or("MESH_LB_BENCH_UDP", 200_000),
        udp_rate: env_or("MESH_LB_BENCH_UDP_RATE", 100_000),
    };
    let runs: usize = env_or("MESH_LB_BENCH_RUNS", 3);
    let modes = [
        Mode::Routing,
        Mode::Iptables(BACKENDS),
        Mode::Iptables(1),
        Mode::Mesh(BACKENDS),
        Mode::Mesh(1),
        Mode::MeshSocket(BACKENDS),
        Mode::MeshSocket(1),
    ];
    let mut lab = Lab::new();
    let mut rows: Vec<Row> = modes
        .iter()
        .map(|m| Row {
            name: m.name(set.ahead),
            samples: Vec::new(),
        })
        .collect();
    // Modes take turns, so a drift of the machine spreads over all.
    for _ in 0..runs {
        for (row, mode) in rows.iter_mut().zip(modes) {
            row.samples.push(measure(&mut lab, mode, &set));
        }
    }
    let Settings {
        secs,
        udp_count,
        udp_rate,
        ..
    } = set;
    println!(
        "\nload balancing compared (cargo xtask bench lb): client -> one routing hop -> nginx backends; medians of {runs} runs per mode, modes taking turns; \
         wrk {secs} s of 64 connections (a new one per request, then keep-alive); 4 x {udp_count} UDP datagrams of 64 bytes flat out, then {udp_rate}/s paced \
         for 3 s; conntrack on in the routing namespace (as on a Docker host); CPU per connection and request is the whole machine's \
         (load generator, backends and data path share the 2 cores), per paced packet the sender's and sinks' (with the forwarding in their context)"
    );
    println!(
        "{:<44} {:>9} {:>7} {:>7} {:>9} | {:>9} {:>7} {:>7} {:>9} | {:>9} {:>6} | {:>6} {:>8} | path (last run)",
        "mode",
        "conn/s",
        "p50 ms",
        "p99 ms",
        "CPU/conn",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU/req",
        "UDP pkt/s",
        "recvd",
        "recvd",
        "CPU/pkt"
    );
    for r in &rows {
        let errors: u64 = r
            .samples
            .iter()
            .map(|s| s.conn.errors + s.keep.errors)
            .sum();
        println!(
            "{:<44} {:>9.0} {:>7.2} {:>7.2} {:>7.1}us | {:>9.0} {:>7.2} {:>7.2} {:>7.1}us | {:>9.0} {:>5.1}% | {:>5.1}% {:>6.2}us | {}{}",
            r.name,
            r.med(|s| s.conn.per_sec),
            r.med(|s| s.conn.p50_ms),
            r.med(|s| s.conn.p99_ms),
            r.med(|s| per(s.conn.cpu_s, s.conn.requests)),
            r.med(|s| s.keep.per_sec),
            r.med(|s| s.keep.p50_ms),
            r.med(|s| s.keep.p99_ms),
            r.med(|s| per(s.keep.cpu_s, s.keep.requests)),
            r.med(|s| s.udp.per_sec),
            r.med(|s| s.udp.received as f64 * 100.0 / s.udp.sent.max(1) as f64),
            r.med(|s| s.paced.received as f64 * 100.0 / s.paced.sent.max(1) as f64),
            r.med(|s| per(s.paced.cpu_s, s.paced.received)),
            r.samples.last().map_or("", |s| s.path.as_str()),
            if errors > 0 {
                format!("; wrk errors {errors}")
            } else {
                String::new()
            }
        );
    }
    let (routing, iptables3, iptables1, mesh3, mesh1, sock3, sock1) = (
        &rows[0], &rows[1], &rows[2], &rows[3], &rows[4], &rows[5], &rows[6],
    );
    let ratio = |a: &Row, f: &dyn Fn(&Sample) -> f64| a.med(f) / routing.med(f);
    let conn = |s: &Sample| s.conn.per_sec;
    let keep = |s: &Sample| s.keep.per_sec;
    let pkts = |s: &Sample| s.udp.per_sec;
    println!(
        "like with like, the same hops and servers: mesh (1 backend) vs plain routing to that backend: conn/s {:.2}x, \
         req/s {:.2}x, UDP pkt/s {:.2}x (goal >= 1.0x each); mesh (3 backends) vs iptables (3 backends): conn/s {:.2}x \
         (goal >= 1.3x), req/s {:.2}x, UDP pkt/s {:.2}x",
        ratio(mesh1, &conn),
        ratio(mesh1, &keep),
        ratio(mesh1, &pkts),
        mesh3.med(conn) / iptables3.med(conn),
        mesh3.med(keep) / iptables3.med(keep),
        mesh3.med(pkts) / iptables3.med(pkts),
    );
    println!(
        "balanced at the socket, like with like: mesh (1 backend) vs plain routing to that backend: conn/s {:.2}x, \
         req/s {:.2}x, UDP pkt/s {:.2}x; mesh (3 backends) vs iptables (3 backends): conn/s {:.2}x, req/s {:.2}x, UDP pkt/s {:.2}x",
        ratio(sock1, &conn),
        ratio(sock1, &keep),
        ratio(sock1, &pkts),
        sock3.med(conn) / iptables3.med(conn),
        sock3.med(keep) / iptables3.med(keep),
        sock3.med(pkts) / iptables3.med(pkts),
    );
    let cpu_conn = |s: &Sample| per(s.conn.cpu_s, s.conn.requests);
    let cpu_req = |s: &Sample| per(s.keep.cpu_s, s.keep.requests);
    let cpu_pkt = |s: &Sample| per(s.paced.cpu_s, s.paced.received) * 1e3;
    let over = |r: &Row, f: &dyn Fn(&Sample) -> f64| r.med(f) - routing.med(f);
    println!(
        "over plain routing, 1 backend each: CPU per connection mesh {:+.1} us (goal <= +5 us), at the socket {:+.1} us, iptables {:+.1} us; \
         per request mesh {:+.1} us, at the socket {:+.1} us, iptables {:+.1} us; per paced UDP packet mesh {:+.0} ns, at the socket {:+.0} ns, iptables {:+.0} ns",
        over(mesh1, &cpu_conn),
        over(sock1, &cpu_conn),
        over(iptables1, &cpu_conn),
        over(mesh1, &cpu_req),
        over(sock1, &cpu_req),
        over(iptables1, &cpu_req),
        over(mesh1, &cpu_pkt),
        over(sock1, &cpu_pkt),
        over(iptables1, &cpu_pkt),
    );
}

/// `cargo xtask bench profile` (`MESH_LB_BENCH_PROFILE`): where short
/// connections spend the machine's CPU, plain routing against mesh with the
/// same backend: perf samples every CPU by its clock while wrk runs
/// (connections closed after each request), and each symbol's samples
/// become CPU ns per connection; then the symbols whose cost differs most
/// between the two.
fn profile_connections(secs: u32) {
    use std::collections::BTreeMap;

    use mesh_tests::profile::{self, Recording};

    let mut lab = Lab::new();
    let file = lab.dir.join("profile.data");
    let mut per_conn: Vec<(&str, BTreeMap<String, f64>, f64)> = Vec::new();
    for (name, mode) in [
        ("plain routing, 1 backend", Mode::Routing),
        ("mesh VIP, 1 backend", Mode::Mesh(1)),
    ] {
        let url = match mode {
            Mode::Mesh(n) => {
                lab.mesh_on(n);
                format!("http://{VIP}:{HTTP_PORT}/")
            }
            _ => format!("http://{}:{HTTP_PORT}/", backend_ip(0)),
        };
        // Warm: the first connections fill caches and tables.
        wrk(&lab, &url, true, 1);
        let rec = Recording::start(None, &file).unwrap_or_else(|e| panic!("{e}"));
        let w = wrk(&lab, &url, true, secs);
        let symbols = rec.stop().unwrap_or_else(|e| panic!("{e}"));
        if let Mode::Mesh(_) = mode {
            lab.mesh_off();
        }
        let total: u64 = symbols.iter().map(|s| s.samples).sum();
        let idle: u64 = symbols
            .iter()
            .filter(|s| profile::is_idle(&s.name))
            .map(|s| s.samples)
            .sum();
        let busy = total - idle;
        println!(
            "\n{name}: {} connections in {secs} s ({:.0}/s), {total} samples on all CPUs, \
             {:.1}% idle: {:.1} us of busy CPU per connection, by symbol (over 0.5% of all \
             samples):",
            w.requests,
            w.per_sec,
            idle as f64 * 100.0 / total.max(1) as f64,
            profile::ns_per(busy, w.requests) / 1e3
        );
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        for s in symbols.iter().filter(|s| !profile::is_idle(&s.name)) {
            *by.entry(profile::short_name(&s.name)).or_default() +=
                profile::ns_per(s.samples, w.requests);
        }
        for s in symbols.iter().filter(|s| s.samples * 200 >= total) {
            println!(
                "  {:>7.0} ns {:>5.1}%  {}",
                profile::ns_per(s.samples, w.requests),
                s.samples as f64 * 100.0 / total as f64,
                profile::short_name(&s.name)
            );
        }
        per_conn.push((name, by, profile::ns_per(busy, w.requests)));
    }
    let (routing, mesh) = (&per_conn[0], &per_conn[1]);
    let names: std::collections::BTreeSet<&String> =
        routing.1.keys().chain(mesh.1.keys()).collect();
    let mut diff: Vec<(String, f64, f64)> = names
        .into_iter()
        .map(|k| {
            let r = routing.1.get(k).copied().unwrap_or(0.0);
            let m = mesh.1.get(k).copied().unwrap_or(0.0);
            (k.clone(), r, m)
        })
        .collect();
    diff.sort_by(|a, b| (b.2 - b.1).abs().total_cmp(&(a.2 - a.1).abs()));
    println!(
        "\nmesh against plain routing, busy CPU per connection: {:.1} us against {:.1} us \
         ({:+.1} us); the symbols that differ most (ns per connection):",
        mesh.2 / 1e3,
        routing.2 / 1e3,
        (mesh.2 - routing.2) / 1e3
    );
    println!("  {:>8} {:>8} {:>8}  symbol", "routing", "mesh", "diff");
    for (k, r, m) in diff.iter().take(25) {
        println!("  {r:>8.0} {m:>8.0} {:>+8.0}  {k}", m - r);
    }
    let _ = std::fs::remove_file(&file);
}

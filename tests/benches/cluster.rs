//! Cluster benchmark: N agent control planes on this one machine, without
//! Docker or the kernel data plane. Each node is the real thing from
//! gossip to maps: the sealed chitchat transport over UDP (each node at its
//! own loopback address of a namespace this benchmark makes), the peers
//! decoded and vetted (`authority`), the desired state computed
//! (`desired::compute`) and planned and applied (`reconcile`) into the fake
//! map writer; endpoints are synthetic (E per node, published as the agent
//! publishes them). Prints, for N nodes:
//! - time for an endpoint change on one node to reach every node's maps
//!   (p50, max), idle and with 1% and 5% datagram loss (iptables in the
//!   namespace);
//! - time for a dead node's endpoints to leave every node's maps;
//! - gossip bytes and datagrams per second per node, idle and under churn;
//! - CPU and RSS per control plane (the process's, divided by N);
//! - a `meshctl check` round: every node's report of what its maps hold
//!   (the agent's digest, published in gossip; made once, then for each
//!   round, as the agent's self-check between its 30 s runs), node 1
//!   asking for a fresh one from all: the time until all have answered,
//!   the gossip it costs, and node 1's comparison of every report with its
//!   own.
//!
//! All N share this machine's 2 cores: where they saturate them, the
//! figures measure the machine, and the CPU line says so. Gossip runs on
//! two threads shared by every node, the control-plane passes on two more
//! at the lowest CPU priority (nice 19). On real hosts one node's pass never holds
//! up another node's heartbeats; here, at normal priority, 200 nodes
//! rebuilding their rings at once for a dead peer (2 s of CPU) silenced
//! everyone's gossip long enough to be taken for dead, and the passes for
//! those false deaths cascaded. The time a pass waits for CPU still counts
//! in every figure below. For each dead node it also prints when each
//! node's failure detector dropped it, before any pass.
//!
//! `MESH_CLUSTER_TRACE=1` prints, every second, the CPU, passes and
//! backends withdrawn (stderr); `MESH_CLUSTER_CHECK=0` leaves the check
//! round out.
//!
//! `cargo xtask bench cluster --nodes N --endpoints E --churn R`
//! (MESH_CLUSTER_NODES, MESH_CLUSTER_ENDPOINTS, MESH_CLUSTER_CHURN).
//! Every wait is bounded. The run fails (exit status 1) when a wait times
//! out or a live node is taken for dead; speed goals are printed only.

/// The agent's allocator (mesh-agent/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Control-plane passes run, and their time in all (ns), over every node.
static PASSES: AtomicU64 = AtomicU64::new(0);
static PASS_NS: AtomicU64 = AtomicU64::new(0);
/// Time in each step of a pass: decode, vet, desired state, plan + apply.
static STEP_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Backends that left some node's maps, for any reason: only the stopped
/// nodes' endpoints should (churn only adds), so more is a live node
/// taken for dead.
static WITHDRAWN: AtomicU64 = AtomicU64::new(0);

use chitchat::{ChitchatHandle, ChitchatId, NodeState};
use mesh_agent::{
    check,
    gossip::{
        GossipConfig, authority,
        peers::{self, Endpoint},
        start,
        subnet::{self, Claim},
        transport::{ClusterKey, GossipStats},
    },
    labels::Proto,
    reconcile::{self, Actual, fake::FakeLb},
    vip::Cidr,
};
use mesh_tests::netns::{Netns, unique};

const DEAD_AFTER: Duration = Duration::from_secs(5);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i as u8)
}

fn cluster() -> Cidr {
    "10.42.0.0/16".parse().expect("cidr")
}

/// Endpoint `j` of node `i` (in node i's /24).
fn endpoint(i: usize, j: usize) -> Endpoint {
    Endpoint {
        service: format!("svc-{}", j % 10),
        created: "2026-11-30T00:00:00.000000000Z".into(),
        ip: Ipv4Addr::new(10, 42, i as u8, 10 + j as u8),
        ports: vec![(80, 8080, Proto::Tcp)],
        state: mesh_common::lb::backend_state::ACTIVE,
        publish: vec![],
        container: String::new(),
    }
}

fn kv(e: &Endpoint) -> (String, String) {
    (
        peers::endpoint_key(e),
        serde_json::to_string(e).expect("json"),
    )
}

/// One node: its gossip, its stats, and the backend addresses in its maps.
struct Node {
    handle: Option<Arc<ChitchatHandle>>,
    stats: Arc<GossipStats>,
    maps: Arc<Mutex<HashSet<Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one agent's control plane keeps between passes, minus Docker and
/// the kernel: the VIPs, what its maps hold (the fake writer) and its
/// gossip decoder.
struct ControlPlane {
    me: String,
    claim: Claim,
    vips: BTreeMap<String, Ipv4Addr>,
    actual: Actual,
    fake: FakeLb,
    decoder: peers::Decoder,
    /// The check rounds asked by peers (by peer), and the report as last
    /// published (`meshctl check`).
    asked: BTreeMap<String, u64>,
    answered: BTreeMap<String, u64>,
    report: Option<check::Report>,
    acks: String,
}

impl ControlPlane {
    fn new(me: String, claim: Claim) -> Self {
        ControlPlane {
            me,
            claim,
            vips: BTreeMap::new(),
            actual: Actual::default(),
            fake: FakeLb::default(),
            decoder: peers::Decoder::default(),
            asked: BTreeMap::new(),
            answered: BTreeMap::new(),
            report: None,
            acks: String::new(),
        }
    }

    /// What to publish of its check, as the agent does: the report of
    /// what its maps hold (`check::digest`: backends by address, rings by
    /// the addresses of their slots), made once and then for every round
    /// a peer asks, set when it changed; and the rounds answered
    /// (`checkack`). The keys and values to set.
    fn check_keys(&mut self) -> Vec<(&'static str, String)> {
        let asked: Vec<String> = self
            .asked
            .iter()
            .filter(|(peer, n)| self.answered.get(*peer) != Some(*n))
            .map(|(peer, n)| format!("{peer}/{n}"))
            .collect();
        if self.report.is_some() && asked.is_empty() {
            return Vec::new();
        }
        let name = |b: &mesh_common::lb::Backend| {
            format!(
                "{}:{} state {}",
                Ipv4Addr::from(u32::from_be(b.ip_be)),
                u16::from_be(b.port_be),
                b.state
            )
        };
        let services: Vec<check::Service> = self
            .fake
            .services
            .iter()
            .map(|(addr, id)| {
                let mut backends: Vec<String> = self
                    .fake
                    .backends
                    .values()
                    .filter(|b| b.service_id == *id)
                    .map(name)
                    .collect();
                backends.sort();
                let ring = check::ring_hash(
                    self.fake
                        .rings
                        .get(id)
                        .map(|r| r.as_slice())
                        .unwrap_or_default()
                        .iter()
                        .map(|s| {
                            self.fake
                                .backends
                                .get(s)
                                .map_or(0, |b| check::backend_key(b.ip_be, b.port_be))
                        }),
                );
                check::Service {
                    addr: addr.to_string(),
                    backends,
                    ring,
                }
            })
            .collect();
        let report = check::Report {
            digest: check::digest(&services, &[], &[]),
            ..check::Report::default()
        };
        let mut keys = Vec::new();
        if self.report.as_ref() != Some(&report) {
            keys.extend(
                serde_json::to_string(&report)
                    .ok()
                    .map(|v| (peers::KEY_CHECK, v)),
            );
            self.report = Some(report);
        }
        if !asked.is_empty() {
            for r in &asked {
                self.acks = check::answer(&self.acks, r);
            }
            self.answered.extend(self.asked.clone());
            keys.push((peers::KEY_CHECK_ACK, self.acks.clone()));
        }
        keys
    }

    /// One pass as the agent runs it: decode and vet the peers, compute
    /// the desired state, plan and apply it. The time of each step (ns).
    fn pass(&mut self, live: &BTreeMap<ChitchatId, NodeState>) -> [u64; 4] {
        let (containers, draining, veths) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
        let vip_cidr: Cidr = "10.43.0.0/16".parse().expect("cidr");
        let mut steps = [0u64; 4];
        let mut step = Instant::now();
        let mut lap = |i: usize| {
            steps[i] = step.elapsed().as_nanos() as u64;
            step = Instant::now();
        };
        let decoded = self.decoder.peers(&self.me, live);
        lap(0);
        let vetted = authority::vet(decoded, cluster(), Some(&self.claim), &[]);
        self.asked = vetted
            .peers
            .iter()
            .filter_map(|(name, p)| Some((name.clone(), p.check_req?)))
            .collect();
        lap(1);
        let st = mesh_agent::desired::compute(&mesh_agent::desired::Inputs {
            containers: &containers,
            draining: &draining,
            veths: &veths,
            peers: &vetted.peers,
            vips: &self.vips,
            vip_cidr,
            networks: &[],
        });
        self.vips = st.vips;
        lap(2);
        let plan = reconcile::plan(&st.lb, &self.actual);
        let _ = reconcile::apply(&plan, &mut self.fake, &mut self.actual);
        lap(3);
        steps
    }

    /// The backend addresses in its maps.
    fn backends(&self) -> HashSet<Ipv4Addr> {
        self.fake
            .backends
            .values()
            .map(|b| Ipv4Addr::from(u32::from_be(b.ip_be)))
            .collect()
    }
}

/// The control plane's task: a pass on every membership change, then its
/// check report published when it changed.
async fn control_plane(
    mut cp: ControlPlane,
    mut live: tokio::sync::watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    maps: Arc<Mutex<HashSet<Ipv4Addr>>>,
    handle: Arc<ChitchatHandle>,
) {
    while live.changed().await.is_ok() {
        let t = Instant::now();
        let steps = cp.pass(&live.borrow_and_update());
        let keys = cp.check_keys();
        if !keys.is_empty() {
            let chitchat = handle.chitchat();
            let mut c = chitchat.lock().await;
            for (k, v) in keys {
                c.self_node_state().set(k, v);
            }
        }
        for (total, ns) in STEP_NS.iter().zip(steps) {
            total.fetch_add(ns, Ordering::Relaxed);
        }
        let now = cp.backends();
        let mut m = maps.lock().expect("maps");
        WITHDRAWN.fetch_add(m.difference(&now).count() as u64, Ordering::Relaxed);
        *m = now;
        drop(m);
        PASSES.fetch_add(1, Ordering::Relaxed);
        PASS_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The keys node `i` publishes, with `endpoints` endpoints.
fn keys(i: usize, claim: &Claim, endpoints: usize) -> Vec<(String, String)> {
    let mut kvs = vec![
        (peers::KEY_UNDERLAY.to_string(), addr(i).to_string()),
        (
            peers::KEY_MAC.to_string(),
            format!("02:00:00:00:00:{:02x}", i),
        ),
        (peers::KEY_SUBNET.to_string(), subnet::encode(claim)),
    ];
    kvs.extend((0..endpoints).map(|j| kv(&endpoint(i, j))));
    kvs
}

fn claim(i: usize) -> Claim {
    Claim {
        node: format!("node{i}"),
        index: i as u32,
        since_ms: i as u64,
    }
}

/// The cost of one pass on its own, without gossip or the other nodes on
/// the cores: node 1's view of `n - 1` peers of `e` endpoints each (their
/// states made directly), where each pass follows one new endpoint on one
/// peer, as under churn. Average of `passes` passes, per step (ms).
fn one_pass(n: usize, e: usize, passes: usize) -> (f64, [f64; 4]) {
    let mut live = BTreeMap::new();
    for i in 2..=n {
        let id = ChitchatId::new(format!("node{i}"), 1, SocketAddr::new(addr(i).into(), 7000));
        let mut state = NodeState::for_test();
        for (k, v) in keys(i, &claim(i), e) {
            state.set(k, v);
        }
        live.insert(id, state);
    }
    let mut cp = ControlPlane::new("node1".into(), claim(1));
    cp.pass(&live);
    let mut sum = [0u64; 4];
    let t = Instant::now();
    for k in 0..passes {
        let at = 2 + (k * 7919) % (n - 1);
        let mut ep = endpoint(at, 0);
        ep.ip = Ipv4Addr::new(10, 42, at as u8, 100 + (k % 150) as u8);
        let (key, value) = kv(&ep);
        if let Some(state) = live.values_mut().nth(at - 2) {
            state.set(key, value);
        }
        for (s, ns) in sum.iter_mut().zip(cp.pass(&live)) {
            *s += ns;
        }
    }
    let per = |ns: u64| ns as f64 / passes as f64 / 1e6;
    (
        t.elapsed().as_secs_f64() * 1e3 / passes as f64,
        sum.map(per),
    )
}

async fn start_node(
    passes: &tokio::runtime::Handle,
    i: usize,
    n_seeds: usize,
    key: [u8; 32],
    endpoints: usize,
) -> Node {
    let a = SocketAddr::new(addr(i).into(), 7000);
    let me = format!("node{i}");
    let cfg = GossipConfig {
        node_id: me.clone(),
        listen: a,
        advertise: a,
        seeds: (1..=n_seeds).map(|s| format!("{}:7000", addr(s))).collect(),
        key: ClusterKey::from_bytes(key).into(),
        cluster_id: "bench".into(),
        interval: GossipConfig::interval_for(DEAD_AFTER),
        dead_after: DEAD_AFTER,
    };
    let claim = claim(i);
    let kvs = keys(i, &claim, endpoints);
    let stats = Arc::new(GossipStats::default());
    let handle = start(cfg, kvs, stats.clone()).await.expect("gossip starts");
    let live = handle.chitchat().lock().await.live_nodes_watcher();
    let maps = Arc::new(Mutex::new(HashSet::new()));
    let task = passes.spawn(control_plane(
        ControlPlane::new(me, claim),
        live,
        maps.clone(),
        handle.clone(),
    ));
    Node {
        handle: Some(handle),
        stats,
        maps,
        task,
    }
}

/// Waits (at most `limit`) until `f` holds for every live node's maps;
/// when it first held on each (`None`: not within the limit).
async fn each_until(
    nodes: &[Node],
    limit: Duration,
    f: impl Fn(&HashSet<Ipv4Addr>) -> bool,
) -> Vec<Option<Duration>> {
    let t = Instant::now();
    let live: Vec<&Node> = nodes.iter().filter(|n| n.handle.is_some()).collect();
    let mut when = vec![None; live.len()];
    while t.elapsed() < limit && when.iter().any(Option::is_none) {
        for (w, n) in when.iter_mut().zip(&live) {
            if w.is_none() && f(&n.maps.lock().expect("maps")) {
                *w = Some(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    when
}

/// Waits (at most `limit`) until `f` holds for every live node's maps;
/// the time it took.
async fn until(
    nodes: &[Node],
    limit: Duration,
    f: impl Fn(&HashSet<Ipv4Addr>) -> bool,
) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        let done = nodes
            .iter()
            .filter(|n| n.handle.is_some())
            .all(|n| f(&n.maps.lock().expect("maps")));
        if done {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(((s.len().max(1) - 1) as f64 * q).round() as usize)
        .copied()
        .unwrap_or(Duration::MAX)
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX {
        "timeout".into()
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}

/// (bytes, datagrams) sent and received by every live node so far.
/// One gossip counter, over all running nodes.
fn total(nodes: &[Node], counter: impl Fn(&GossipStats) -> &AtomicU64) -> u64 {
    nodes
        .iter()
        .filter(|n| n.handle.is_some())
        .map(|n| counter(&n.stats).load(Ordering::Relaxed))
        .sum()
}

fn referenced(nodes: &[Node]) -> u64 {
    total(nodes, |s| &s.referenced)
}

fn refused(nodes: &[Node]) -> u64 {
    total(nodes, |s| &s.unknown_reference)
}

fn traffic(nodes: &[Node]) -> (u64, u64) {
    nodes
        .iter()
        .filter(|n| n.handle.is_some())
        .fold((0, 0), |(b, d), n| {
            let s = &n.stats;
            (
                b + s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed),
                d + s.sent.load(Ordering::Relaxed) + s.received.load(Ordering::Relaxed),
            )
        })
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// `count` endpoint changes at `rate` a second on random nodes; the time
/// each took to reach every other live node's maps.
async fn churn(nodes: &[Node], count: usize, rate: usize, next: &mut usize) -> Vec<Duration> {
    let live: Vec<usize> = (1..=nodes.len())
        .filter(|i| nodes[i - 1].handle.is_some())
        .collect();
    let mut times = Vec::new();
    let mut pending: Vec<(Ipv4Addr, usize, Instant)> = Vec::new();
    let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for k in 0..count {
        let at = live[(k * 7919) % live.len()];
        let ip = Ipv4Addr::new(10, 42, at as u8, 100 + (*next % 150) as u8);
        *next += 1;
        let mut e = endpoint(at, 0);
        e.ip = ip;
        let (key, value) = kv(&e);
        if let Some(h) = &nodes[at - 1].handle {
            h.with_chitchat(|c| c.self_node_state().set(&key, &value))
                .await;
        }
        pending.push((ip, at, Instant::now()));
        // Checked every 10 ms until the next change (checked only once per
        // gap, the times were rounded up to the gap: 1 s at 1 change/s).
        let next_at = Instant::now() + gap;
        while Instant::now() < next_at {
            tokio::time::sleep(Duration::from_millis(10)).await;
            collect(nodes, &mut pending, &mut times);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        collect(nodes, &mut pending, &mut times);
    }
    times.extend(pending.iter().map(|_| Duration::MAX));
    times
}

fn collect(
    nodes: &[Node],
    pending: &mut Vec<(Ipv4Addr, usize, Instant)>,
    times: &mut Vec<Duration>,
) {
    pending.retain(|(ip, at, t)| {
        let everywhere = nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.handle.is_some() && i + 1 != *at)
            .all(|(_, n)| n.maps.lock().expect("maps").contains(ip));
        if everywhere {
            times.push(t.elapsed());
        }
        !everywhere
    });
}

/// A task that ends when `name` leaves the live set of `h`'s gossip: the
/// time since `t` (just before the node was stopped).
async fn dropped(
    h: &ChitchatHandle,
    name: String,
    t: Instant,
) -> tokio::task::JoinHandle<Duration> {
    let mut live = h.chitchat().lock().await.live_nodes_watcher();
    tokio::spawn(async move {
        let _ = live
            .wait_for(|m| !m.keys().any(|id| *id.node_id == *name))
            .await;
        t.elapsed()
    })
}

fn loss(ns: &str, percent: f64) {
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-F", "INPUT"])
        .output();
    if percent > 0.0 {
        let p = format!("{}", percent / 100.0);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "iptables", "-A", "INPUT", "-p", "udp"])
            .args(["--dport", "7000", "-m", "statistic", "--mode", "random"])
            .args(["--probability", &p, "-j", "DROP"])
            .output()
            .expect("iptables");
        assert!(out.status.success(), "iptables: {out:?}");
    }
}

/// Runs the benchmark; returns what went wrong (a wait that timed out, a
/// live node taken for dead), which fails the run. Speed goals are
/// printed, never failed.
async fn run(
    passes: tokio::runtime::Handle,
    ns: &str,
    n: usize,
    e: usize,
    rate: usize,
) -> Vec<String> {
    let mut failures = Vec::new();
    let (ms_per_pass, steps) = one_pass(n, e, 50);
    println!(
        "one pass on its own ({} peers x {e} endpoints, after one new endpoint; no gossip, nothing else on the cores): {ms_per_pass:.2} ms: decode {:.2}, vet {:.2}, desired state {:.2}, plan + apply {:.2}",
        n - 1,
        steps[0],
        steps[1],
        steps[2],
        steps[3]
    );
    if std::env::var("MESH_CLUSTER_TRACE").is_ok() {
        tokio::spawn(async {
            let t = Instant::now();
            let (mut w, mut p, mut c, mut at) = (0, 0, cpu_seconds(), 0.0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = t.elapsed().as_secs_f64();
                let (w1, p1, c1) = (
                    WITHDRAWN.load(Ordering::Relaxed),
                    PASSES.load(Ordering::Relaxed),
                    cpu_seconds(),
                );
                // A late tick (a starved runtime) shows as a long step.
                eprintln!(
                    "trace {now:5.1}s: {:3.0}% of the machine, {:5} passes, {:6} backends withdrawn",
                    (c1 - c) * 50.0 / (now - at),
                    p1 - p,
                    w1 - w
                );
                (w, p, c, at) = (w1, p1, c1, now);
            }
        });
    }
    let key = [3u8; 32];
    let base_rss = rss_mb();
    let t = Instant::now();
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(start_node(&passes, i, n.min(3), key, e).await);
    }
    // A node's maps hold every other node's endpoints (its own are local
    // containers, of which this benchmark has none).
    let converged = until(&nodes, Duration::from_secs(120), |m| m.len() == (n - 1) * e).await;
    println!(
        "cluster: {n} nodes x {e} endpoints ({} in all, 10 services); every node's maps complete after {}",
        n * e,
        converged.map_or("timeout (120 s)".into(), ms)
    );
    if converged.is_none() {
        failures.push("the maps never converged (120 s)".to_string());
    }

    // Idle: right after convergence, then at rest (once every node has
    // exchanged messages with most peers: references need it).
    let mut idle_kbs = 0.0;
    for (when, settle) in [("just after convergence", 0.0), ("at rest", 15.0)] {
        tokio::time::sleep(Duration::from_secs_f64(settle)).await;
        let (b0, d0) = traffic(&nodes);
        let (c0, k0) = (cpu_seconds(), referenced(&nodes));
        let window = 5.0;
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (b1, d1) = traffic(&nodes);
        let idle_cpu = (cpu_seconds() - c0) / window;
        // Every datagram is counted once sent and once received: halve.
        let per = |x: u64| x as f64 / 2.0 / n as f64 / window;
        idle_kbs = per(b1 - b0) / 1e3;
        let sent = (d1 - d0) as f64 / 2.0;
        println!(
            "idle gossip per node, {when}: {:.1} KB/s, {:.1} datagrams/s ({:.0}% of messages compressed against the peer's); CPU {:.1}% of a core per node ({:.0}% of the machine's 2 cores in all)",
            idle_kbs,
            per(d1 - d0),
            (referenced(&nodes) - k0) as f64 * 100.0 / sent.max(1.0),
            idle_cpu * 100.0 / n as f64,
            idle_cpu * 50.0
        );
    }

    // Churn.
    let mut next = 0usize;
    let (b0, d0) = traffic(&nodes);
    let c0 = cpu_seconds();
    let t_churn = Instant::now();
    let times = churn(&nodes, 20, rate, &mut next).await;
    let secs = t_churn.elapsed().as_secs_f64();
    let (b1, d1) = traffic(&nodes);
    let churn_cpu = (cpu_seconds() - c0) / secs;
    let per = |x: u64| x as f64 / 2.0 / n as f64 / secs;
    let change_max = quantile(&times, 1.0);
    println!(
        "endpoint change on one node -> every node's maps ({} changes at {rate}/s): p50 {}, max {}; gossip per node {:.1} KB/s, {:.1} datagrams/s; CPU {:.0}% of the machine",
        times.len(),
        ms(quantile(&times, 0.5)),
        ms(change_max),
        per(b1 - b0) / 1e3,
        per(d1 - d0),
        churn_cpu * 50.0
    );
    let passes = PASSES.load(Ordering::Relaxed).max(1);
    let step = |i: usize| STEP_NS[i].load(Ordering::Relaxed) as f64 / passes as f64 / 1e6;
    println!(
        "control-plane passes: {passes} over all nodes so far, {:.2} ms each on average: decode {:.2}, vet {:.2}, desired state {:.2}, plan + apply {:.2}",
        PASS_NS.load(Ordering::Relaxed) as f64 / passes as f64 / 1e6,
        step(0),
        step(1),
        step(2),
        step(3),
    );
    let rss = (rss_mb() - base_rss).max(0.0) / n as f64;
    println!("RSS per control plane: {rss:.2} MB (the process's growth over {n} nodes)");

    // A check round (`meshctl check`): node 1 asks; every node answers
    // with a fresh report; node 1 compares every report with its own.
    // (MESH_CLUSTER_CHECK=0: no round, for a run to compare with.)
    let check_round = std::env::var("MESH_CLUSTER_CHECK").as_deref() != Ok("0");
    if let Some(h) = nodes[0].handle.clone().filter(|_| check_round) {
        let (b0, _) = traffic(&nodes);
        let t = Instant::now();
        h.chitchat()
            .lock()
            .await
            .self_node_state()
            .set(peers::KEY_CHECK_REQ, "1");
        let round = "node1/1";
        let mut answered = 0;
        while t.elapsed() < Duration::from_secs(60) {
            let cc = h.chitchat();
            let c = cc.lock().await;
            answered = c
                .live_nodes()
                .filter(|id| &*id.node_id != "node1")
                .filter_map(|id| c.node_state(id))
                .filter_map(|st| st.get(peers::KEY_CHECK_ACK))
                .filter(|v| check::acks(v).iter().any(|x| x == round))
                .count();
            drop(c);
            if answered >= n - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = t.elapsed();
        let (b1, _) = traffic(&nodes);
        // Node 1's comparison: its own report against every other's.
        let cc = h.chitchat();
        let mut c = cc.lock().await;
        let mine = c
            .self_node_state()
            .get(peers::KEY_CHECK)
            .and_then(|v| serde_json::from_str::<check::Report>(v).ok());
        let reports: Vec<check::Report> = c
            .live_nodes()
            .filter_map(|id| c.node_state(id))
            .filter_map(|st| st.get(peers::KEY_CHECK))
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        drop(c);
        let tc = Instant::now();
        // (Here a node's maps lack its own endpoints, which the agent's
        // hold as local backends, so the reports differ; the comparison
        // runs in full all the same.)
        let compared: usize = mine.as_ref().map_or(0, |m| {
            reports
                .iter()
                .map(|r| check::compare(&m.digest, &[], &m.digest.nodes_hash, &r.digest).len())
                .sum()
        });
        std::hint::black_box(compared);
        let compare = tc.elapsed();
        let bytes = mine.map_or(0, |m| serde_json::to_string(&m).map_or(0, |s| s.len()));
        println!(
            "meshctl check round: {answered} of {} nodes answered in {}; the round's gossip {:.1} KB per node; a report {bytes} bytes; node 1 compared {} reports in {:.2} ms",
            n - 1,
            ms(took),
            (b1 - b0) as f64 / 2.0 / n as f64 / 1e3,
            reports.len(),
            compare.as_secs_f64() * 1e3,
        );
        if answered < n - 1 {
            failures.push(format!(
                "check round: {answered} of {} answered in 60 s",
                n - 1
            ));
        }
    }

    // Loss.
    let mut lossy = Vec::new();
    for pct in [1.0, 5.0] {
        loss(ns, pct);
        let times = churn(&nodes, 10, rate, &mut next).await;
        println!(
            "with {pct}% datagram loss: endpoint change everywhere p50 {}, max {}",
            ms(quantile(&times, 0.5)),
            ms(quantile(&times, 1.0))
        );
        lossy.push(quantile(&times, 1.0));
    }
    loss(ns, 0.0);

    // Dead nodes: their endpoints leave every other node's maps.
    let mut dead = Vec::new();
    let mut each = Vec::new();
    let mut detected = Vec::new();
    let (w0, c0, t_dead) = (
        WITHDRAWN.load(Ordering::Relaxed),
        cpu_seconds(),
        Instant::now(),
    );
    let mut expected = 0;
    for k in 0..3.min(n - 2) {
        let d = n - k;
        // Its endpoints: those it started with and those churn gave it.
        let mut gone: HashSet<Ipv4Addr> = (0..e).map(|j| endpoint(d, j).ip).collect();
        for (i, n) in nodes.iter().enumerate() {
            if n.handle.is_some() && i + 1 != d {
                let m = n.maps.lock().expect("maps");
                let theirs = m.iter().filter(|ip| ip.octets()[2] == d as u8);
                expected += theirs.clone().count();
                gone.extend(theirs);
            }
        }
        // When each node's failure detector drops it (its gossip's live
        // set), apart from when its maps do (after a pass).
        let mut detectors = Vec::new();
        let t = Instant::now();
        for (i, node) in nodes.iter().enumerate() {
            if let Some(h) = &node.handle
                && i + 1 != d
            {
                detectors.push(dropped(h, format!("node{d}"), t).await);
            }
        }
        if let Some(h) = nodes[d - 1].handle.take() {
            let _ = mesh_agent::gossip::stop(h).await;
        }
        nodes[d - 1].task.abort();
        let when = each_until(&nodes, Duration::from_secs(30), |m| {
            gone.iter().all(|ip| !m.contains(ip))
        })
        .await;
        let when: Vec<Duration> = when
            .into_iter()
            .map(|w| w.unwrap_or(Duration::MAX))
            .collect();
        for w in detectors {
            w.abort();
            let t = tokio::time::timeout(Duration::from_millis(100), w).await;
            detected.push(t.ok().and_then(Result::ok).unwrap_or(Duration::MAX));
        }
        dead.push(when.iter().max().copied().unwrap_or(Duration::MAX));
        each.extend(when);
    }
    let dead_max = dead.iter().max().copied().unwrap_or(Duration::MAX);
    println!(
        "dead node -> out of every node's maps ({} nodes stopped, dead-after {:?}): p50 {}, max {}; out of one node's maps: p10 {}, p50 {}, p90 {}; CPU {:.0}% of the machine; {} backends withdrawn from maps meanwhile ({expected} were the stopped nodes')",
        dead.len(),
        DEAD_AFTER,
        ms(quantile(&dead, 0.5)),
        ms(dead_max),
        ms(quantile(&each, 0.1)),
        ms(quantile(&each, 0.5)),
        ms(quantile(&each, 0.9)),
        (cpu_seconds() - c0) / t_dead.elapsed().as_secs_f64() * 50.0,
        WITHDRAWN.load(Ordering::Relaxed) - w0,
    );
    println!(
        "dead node -> dropped by one node's failure detector (its gossip's live set; the maps follow after a pass): p10 {}, p50 {}, p90 {}, max {}",
        ms(quantile(&detected, 0.1)),
        ms(quantile(&detected, 0.5)),
        ms(quantile(&detected, 0.9)),
        ms(quantile(&detected, 1.0)),
    );
    let withdrawn_dead = WITHDRAWN.load(Ordering::Relaxed) - w0;
    let withdrawn = WITHDRAWN.load(Ordering::Relaxed);
    println!(
        "backends withdrawn from maps in the whole run: {withdrawn} (a stopped node's endpoints, or a live node taken for dead)"
    );
    println!(
        "messages sent compressed against the peer's {}, refused on receipt {} (dropped: a reference no longer held); exchanges begun to push news {}",
        referenced(&nodes),
        refused(&nodes),
        total(&nodes, |s| &s.pushed)
    );
    // A timeout is recorded as an unbounded time: say so, not a ratio.
    let ratio = |v: f64, goal: f64| {
        if v > 1e6 {
            "not reached (timeout)".to_string()
        } else {
            format!("{:.2}x the goal", v / goal)
        }
    };
    println!(
        "goals: change everywhere (max) < 2 s: {}; dead node out < 5 s: {}; idle gossip < 10 KB/s: {}; RSS < 50 MB: {}",
        ratio(change_max.as_secs_f64(), 2.0),
        ratio(dead_max.as_secs_f64(), 5.0),
        ratio(idle_kbs, 10.0),
        ratio(rss, 50.0)
    );
    println!("total {:.0} s", t.elapsed().as_secs_f64());
    for mut node in nodes {
        if let Some(h) = node.handle.take() {
            let _ = mesh_agent::gossip::stop(h).await;
        }
        node.task.abort();
    }
    // Behaviour, not speed: every wait ended, and only the stopped nodes'
    // backends ever left a map.
    if times.contains(&Duration::MAX) || lossy.contains(&Duration::MAX) {
        failures.push("an endpoint change never reached every node (30 s)".into());
    }
    if dead.contains(&Duration::MAX) {
        failures.push("a dead node's endpoints stayed in some node's maps (30 s)".into());
    }
    if withdrawn_dead != expected as u64 {
        failures.push(format!(
            "{withdrawn_dead} backends withdrawn while nodes died, {expected} expected (the stopped nodes')"
        ));
    }
    if withdrawn != withdrawn_dead {
        failures.push(format!(
            "{} backends withdrawn outside the dead-node phase: a live node taken for dead",
            withdrawn - withdrawn_dead
        ));
    }
    failures
}

fn main() {
    let n = env("MESH_CLUSTER_NODES", 50).clamp(3, 250);
    let e = env("MESH_CLUSTER_ENDPOINTS", 10).clamp(1, 90);
    let rate = env("MESH_CLUSTER_CHURN", 5).max(1);
    let ns = Netns::new(&unique("mcb"));
    let name = ns.name.clone();
    let failures = ns.run(move || {
        // Every node's passes, at the lowest CPU priority (see the top).
        let passes = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("passes")
            .on_thread_start(|| {
                // SAFETY: setpriority on this thread (a Linux thread is a
                // task of its own); no memory is passed.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, 19) };
            })
            .enable_all()
            .build()
            .expect("runtime");
        let failures = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(run(passes.handle().clone(), &name, n, e, rate));
        passes.shutdown_background();
        failures
    });
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("cluster benchmark FAILED: {f}");
        }
        std::process::exit(1);
    }
}

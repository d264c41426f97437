//! The packet-test harness: run a data-plane program on one packet through
//! BPF_PROG_TEST_RUN and compare the verdict, the whole output packet and
//! the counters against a fixture.
//!
//! Fixtures are plain tables; the same tables, run with `repeat`, are the
//! per-packet cost benchmark (`cargo xtask bench`).

use std::{fmt, time::Duration};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use mesh_agent::dataplane::{self, lb::LbMaps, overlay::OverlayMaps, progs};
use mesh_common::{maps, stats::Stat};

/// A program's return value, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    XdpAborted,
    XdpDrop,
    XdpPass,
    XdpTx,
    XdpRedirect,
    TcOk,
    TcShot,
    TcRedirect,
}

impl Verdict {
    /// The verdict counter every packet with this verdict bumps.
    pub const fn stat(self) -> Stat {
        match self {
            Verdict::XdpAborted => Stat::XdpAborted,
            Verdict::XdpDrop => Stat::XdpDrop,
            Verdict::XdpPass => Stat::XdpPass,
            Verdict::XdpTx => Stat::XdpTx,
            Verdict::XdpRedirect => Stat::XdpRedirect,
            Verdict::TcOk => Stat::TcOk,
            Verdict::TcShot => Stat::TcShot,
            Verdict::TcRedirect => Stat::TcRedirect,
        }
    }

    pub const fn code(self) -> u32 {
        match self {
            Verdict::XdpAborted => 0,
            Verdict::XdpDrop => 1,
            Verdict::XdpPass => 2,
            Verdict::XdpTx => 3,
            Verdict::XdpRedirect => 4,
            Verdict::TcOk => 0,
            Verdict::TcShot => 2,
            Verdict::TcRedirect => 7,
        }
    }
}

/// What the output packet must be.
#[derive(Clone, Debug)]
pub enum Want {
    /// Byte for byte the input.
    Unchanged,
    /// Byte for byte this packet.
    Packet(Vec<u8>),
}

/// The program a fixture runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// XDP on the underlay NIC.
    XdpUnderlay,
    /// TC ingress on a container veth: packets leaving the container.
    TcFromContainer,
    /// TC egress on a container veth: packets entering the container.
    TcToContainer,
    /// TC ingress on another Docker network's bridge (ifindex 1 in a test
    /// run: BPF_PROG_TEST_RUN runs TC programs on the loopback device).
    TcFromBridge,
    /// TC egress on the host link (`mesh-host`): the host's own packets
    /// for other nodes.
    TcHostOut,
    /// TC ingress on the underlay NIC: what XDP passed up (marked).
    TcUnderlayIn,
}

/// One row of a packet-test table. Rows run in order against the same maps,
/// so conntrack state carries from a request to its reply.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub name: &'static str,
    pub prog: Prog,
    pub input: Vec<u8>,
    pub verdict: Verdict,
    pub output: Want,
    /// Path counters this packet must add to, and by how much. The verdict's
    /// own counter must go up by one; every other counter must stay unchanged.
    pub counters: Vec<(Stat, u64)>,
}

/// What one test run produced.
#[derive(Debug)]
pub struct Run {
    pub code: u32,
    pub output: Vec<u8>,
    /// Mean time per run as measured by the kernel.
    pub duration: Duration,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

const ETH_HLEN: usize = 14;

/// The interface a TC program sees under BPF_PROG_TEST_RUN: the test
/// namespace's loopback.
pub const TEST_IFINDEX: u32 = 1;
/// The VIP range the harness writes into the data plane's settings (every
/// fixture's VIPs are in it, as the agent's `--vip-cidr` default).
pub const VIP_RANGE: &str = "10.43.0.0/16";
/// Room for the program to grow a packet (encapsulation).
const OUT_HEADROOM: usize = 256;

/// The data plane, loaded into the kernel for testing (maps private to this
/// harness: nothing is pinned or attached).
pub struct Harness {
    ebpf: Ebpf,
    /// The load-balancing maps, for fixtures to install services.
    pub lb: LbMaps,
    /// The overlay maps (off until a fixture sets the local node).
    pub overlay: OverlayMaps,
    /// Where TC test runs happen, when a fixture needs a FIB of its own
    /// (`Harness::run_in`); the process's namespace otherwise.
    netns: Option<crate::netns::Netns>,
}

impl Harness {
    /// The monitor's maps (`meshctl monitor`): its ring buffer and the
    /// word that turns the programs' events on.
    pub fn monitor_maps(&mut self) -> mesh_agent::dataplane::monitor::MonitorMaps {
        mesh_agent::dataplane::monitor::MonitorMaps::take(&mut self.ebpf)
            .unwrap_or_else(|e| panic!("monitor maps: {e}"))
    }

    /// Loads the embedded eBPF object and verifies its programs.
    ///
    /// Panics with the reason when that is impossible (not root, no BPF).
    pub fn new() -> Self {
        Self::load(None)
    }

    /// As [`Harness::new`], with every map pinned under `dir` (as the agent
    /// pins them), so meshctl can read them.
    pub fn pinned(dir: &std::path::Path) -> Self {
        Self::load(Some(dir))
    }

    fn load(pin_dir: Option<&std::path::Path>) -> Self {
        Self::load_with(pin_dir, &[])
    }

    /// As [`Harness::pinned`] (or unpinned without a `pin_dir`), with map
    /// sizes overridden by name (as the agent's `--ct-entries` does).
    pub fn load_with(pin_dir: Option<&std::path::Path>, sizes: &[(&'static str, u32)]) -> Self {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "packet tests load eBPF programs and need root (CAP_BPF, CAP_NET_ADMIN): \
                 run them with `cargo xtask test` as root"
            );
        }
        let mut ebpf =
            dataplane::load_with(sizes).unwrap_or_else(|e| panic!("loading the data plane: {e:?}"));
        dataplane::xdp_underlay(&mut ebpf)
            .unwrap_or_else(|e| panic!("verifying the XDP underlay program: {e:?}"));
        for name in [
            progs::TC_FROM_CONTAINER,
            progs::TC_TO_CONTAINER,
            progs::TC_UNDERLAY_IN,
            progs::TC_BRIDGE_IN,
            progs::TC_HOST_OUT,
            progs::TC_WG_IN,
        ] {
            dataplane::tc(&mut ebpf, name).unwrap_or_else(|e| panic!("verifying {name}: {e:?}"));
        }
        if let Some(dir) = pin_dir {
            dataplane::pin_maps(&ebpf, dir).unwrap_or_else(|e| panic!("pinning maps: {e}"));
        }
        let lb = LbMaps::take(&mut ebpf).unwrap_or_else(|e| panic!("load-balancing maps: {e}"));
        let mut overlay =
            OverlayMaps::take(&mut ebpf).unwrap_or_else(|e| panic!("overlay maps: {e}"));
        let vips: mesh_agent::vip::Cidr = VIP_RANGE.parse().expect("VIP range");
        overlay
            .set_config(&vips.config())
            .unwrap_or_else(|e| panic!("data-plane settings: {e}"));
        // Conntrack's clock, as the agent sets it.
        let clock = dataplane::clock::settle(&mut ebpf, None)
            .unwrap_or_else(|e| panic!("conntrack's clock: {e}"));
        overlay
            .set_clock(clock)
            .unwrap_or_else(|e| panic!("conntrack's clock: {e}"));
        if let Some(dir) = pin_dir {
            dataplane::clock::pin(&mut ebpf, dir)
                .unwrap_or_else(|e| panic!("pinning conntrack's clock: {e}"));
        }
        Harness {
            ebpf,
            lb,
            overlay,
            netns: None,
        }
    }

    /// Runs the TC programs inside `ns` from now on: their FIB lookups
    /// (the tunnel's next hop, a client's route) see its routes and
    /// neighbours (BPF_PROG_TEST_RUN runs in the caller's namespace).
    pub fn run_in(&mut self, ns: crate::netns::Netns) {
        self.netns = Some(ns);
    }

    /// Runs the programs in the caller's namespace again (for timings of
    /// paths that need no route: entering a namespace around every single
    /// run leaves the caches colder than an empty program's runs find
    /// them, about 350 ns on a new flow).
    pub fn run_here(&mut self) {
        self.netns = None;
    }

    /// Registers `ip` as the container behind the veth TC programs run on
    /// here (BPF_PROG_TEST_RUN runs them on the test namespace's loopback,
    /// [`TEST_IFINDEX`]), so its packets pass the anti-spoofing check.
    pub fn local_container(&mut self, ip: std::net::Ipv4Addr) {
        self.container(ip, TEST_IFINDEX, [0; 6]);
    }

    /// Registers container `ip` behind host-side veth `ifindex` (its MAC
    /// `mac`) as the agent does: its local endpoint (tunnel delivery,
    /// anti-spoofing) and its veth's slot (`MESH_VETH_SRC`, the
    /// anti-spoofing check's one-step path).
    pub fn container(&mut self, ip: std::net::Ipv4Addr, ifindex: u32, mac: [u8; 6]) {
        // On `mesh`: the cluster VNI, as this node's settings say (0
        // before they are written, with the overlay off).
        let vni = self.overlay.local.get(&0, 0).map_or(0, |l| l.vni);
        self.container_on(ip, ifindex, mac, vni);
    }

    /// [`Harness::container`] on the network with VNI `vni`.
    pub fn container_on(&mut self, ip: std::net::Ipv4Addr, ifindex: u32, mac: [u8; 6], vni: u32) {
        let ep = mesh_common::tunnel::LocalEndpoint {
            ifindex,
            mac,
            ..Default::default()
        };
        let eps = std::collections::BTreeMap::from([(u32::from(ip).to_be(), ep)]);
        self.overlay
            .set_local_ep(u32::from(ip).to_be(), &ep)
            .unwrap_or_else(|e| panic!("local endpoint {ip}: {e}"));
        let none = std::collections::BTreeMap::new();
        for (ifindex, v) in dataplane::overlay::veth_src(&eps, |_| vni, |_| false, &none) {
            self.overlay
                .set_veth_src(ifindex, &v)
                .unwrap_or_else(|e| panic!("veth source {ip}: {e}"));
        }
    }

    /// Marks the container behind veth `ifindex` as a backend of a
    /// published port, as the agent does (`VETH_PUBLISHED`).
    pub fn publishes(&mut self, ifindex: u32) {
        let mut v = self
            .overlay
            .veth_src
            .get(&ifindex, 0)
            .unwrap_or_else(|e| panic!("veth source {ifindex}: {e}"));
        v.flags |= mesh_common::tunnel::VETH_PUBLISHED;
        self.overlay
            .set_veth_src(ifindex, &v)
            .unwrap_or_else(|e| panic!("veth source {ifindex}: {e}"));
    }

    /// The loaded object, e.g. to attach its programs.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Kernel memory of every map this process holds (fdinfo `memlock`),
    /// plus the Maglev rings of services 1..=`services` (reachable only
    /// through the outer map).
    pub fn map_memory(&self, services: u32) -> u64 {
        let mut total = 0;
        for entry in std::fs::read_dir("/proc/self/fdinfo")
            .into_iter()
            .flatten()
            .flatten()
        {
            total += memlock(&entry.path());
        }
        for id in 1..=services {
            if let Ok(ring) = self.lb.maglev.get(&id, 0) {
                total += fd_memlock(&ring);
            }
        }
        total
    }

    /// Kernel memory of the two conntrack tables.
    pub fn conntrack_memory(&self) -> u64 {
        use aya::maps::IterableMap;
        fd_memlock(self.lb.conntrack.map()) + fd_memlock(self.lb.conntrack_new.map())
    }

    /// Service `vip:port/proto` is service `id` (its ring and backends are
    /// the caller's).
    pub fn set_service(&mut self, vip: std::net::Ipv4Addr, port: u16, proto: u8, id: u32) {
        let key = mesh_common::lb::ServiceKey {
            vip_be: u32::from(vip).to_be(),
            port_be: port.to_be(),
            proto,
            ..Default::default()
        };
        self.lb
            .set_service(&key, &mesh_common::lb::Service { id, flags: 0 })
            .unwrap_or_else(|e| panic!("service {vip}:{port}/{proto}: {e}"));
    }

    /// Every counter, summed over CPUs, in table order.
    pub fn counters(&self) -> Vec<u64> {
        let map = self.ebpf.map(maps::STATS.name).expect("stats map present");
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).expect("stats map is a per-CPU array");
        dataplane::stats::read(&map)
            .expect("reading stats")
            .into_iter()
            .map(|c| c.value)
            .collect()
    }

    /// Runs `prog` on `input`, `repeat` times.
    pub fn run(&mut self, prog: Prog, input: &[u8], repeat: u32) -> Run {
        match prog {
            Prog::XdpUnderlay => self.run_xdp(input, repeat),
            Prog::TcFromContainer => self.run_tc(progs::TC_FROM_CONTAINER, input, repeat),
            Prog::TcToContainer => self.run_tc(progs::TC_TO_CONTAINER, input, repeat),
            Prog::TcFromBridge => self.run_tc(progs::TC_BRIDGE_IN, input, repeat),
            Prog::TcHostOut => self.run_tc(progs::TC_HOST_OUT, input, repeat),
            Prog::TcUnderlayIn => self.run_tc(progs::TC_UNDERLAY_IN, input, repeat),
        }
    }

    /// XDP: BPF_PROG_TEST_RUN refuses input shorter than an Ethernet header,
    /// but takes an `xdp_md` whose `data_end` ends the linear part early
    /// (the rest becomes a fragment, invisible to a program without frags
    /// support). Short frames are padded to 14 bytes with `data_end` at
    /// their real length, so the program sees exactly `input`; the padding
    /// is cut from the output again.
    fn run_xdp(&mut self, input: &[u8], repeat: u32) -> Run {
        let prog = dataplane::xdp_underlay(&mut self.ebpf).expect("XDP program loaded");
        let pad = ETH_HLEN.saturating_sub(input.len());
        let mut data_in = input.to_vec();
        data_in.resize(input.len() + pad, 0);
        let md = XdpMd {
            data_end: input.len() as u32,
            ..Default::default()
        };
        let mut data_out = vec![0u8; data_in.len() + OUT_HEADROOM];
        let mut md_out = [0u8; size_of::<XdpMd>()];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(&data_in),
                data_out: Some(&mut data_out),
                ctx_in: Some(as_bytes(&if pad > 0 {
                    md
                } else {
                    XdpMd {
                        data_end: data_in.len() as u32,
                        ..Default::default()
                    }
                })),
                ctx_out: Some(&mut md_out),
                repeat,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN ({} byte packet): {e:?}", input.len()));
        data_out.truncate((res.data_size_out as usize).saturating_sub(pad));
        let output = data_out;
        Run {
            code: res.return_value,
            output,
            duration: res.duration,
        }
    }

    /// TC (skb): the kernel needs at least an Ethernet header.
    fn run_tc(&mut self, name: &'static str, input: &[u8], repeat: u32) -> Run {
        assert!(
            input.len() >= ETH_HLEN,
            "TC test runs need a full Ethernet header"
        );
        let prog = dataplane::tc(&mut self.ebpf, name).expect("TC program loaded");
        let mut data_out = vec![0u8; input.len() + OUT_HEADROOM];
        let mut test_run = || {
            prog.test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut data_out),
                repeat,
                ..Default::default()
            })
        };
        let res = match &self.netns {
            Some(ns) => ns.run(test_run),
            None => test_run(),
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {name} ({} bytes): {e:?}", input.len()));
        data_out.truncate(res.data_size_out as usize);
        Run {
            code: res.return_value,
            output: data_out,
            duration: res.duration,
        }
    }

    /// Runs every fixture, in order, and panics with a report of every
    /// mismatch.
    pub fn check(&mut self, fixtures: &[Fixture]) {
        let mut failures = Vec::new();
        for f in fixtures {
            let before = self.counters();
            let run = self.run(f.prog, &f.input, 1);
            let after = self.counters();
            failures.extend(mismatches(f, &run, &before, &after));
        }
        if !failures.is_empty() {
            let failed: std::collections::BTreeSet<_> =
                failures.iter().map(|m| m.fixture).collect();
            panic!(
                "{} of {} fixtures failed:\n{}",
                failed.len(),
                fixtures.len(),
                failures
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// Runs each fixture `repeat` times and prints the kernel-measured
    /// cost per packet. Returns (fixture, ns/packet).
    pub fn bench(
        &mut self,
        title: &str,
        fixtures: &[Fixture],
        repeat: u32,
    ) -> Vec<(&'static str, f64)> {
        println!(
            "{title}: ns/packet over {repeat} runs (BPF_PROG_TEST_RUN, JIT), the row's path \
             checked on every run. [r]: one test run repeating the packet (the program leaves \
             it unchanged); [1]: single runs on fresh copies (a rewritten packet would take \
             another path when repeated), which include the test run's own overhead"
        );
        let mut rows = Vec::new();
        for f in fixtures {
            let path: Vec<(Stat, u64)> = f
                .counters
                .iter()
                .copied()
                .chain(std::iter::once((f.verdict.stat(), 1)))
                .collect();
            let (how, r) = if matches!(f.output, Want::Unchanged) {
                ("[r]", self.time_repeated(f.prog, &f.input, repeat, &path))
            } else {
                (
                    "[1]",
                    self.time_path(f.prog, &|_| f.input.clone(), repeat, &path),
                )
            };
            match r {
                Ok(ns) => {
                    println!("  {:<66} {:>8.1} ns/packet {how}", f.name, ns);
                    rows.push((f.name, ns));
                }
                // A stateful row (a new flow is tracked the second time):
                // no figure rather than one for another path.
                Err(e) => println!("  {:<66} {:>8} ({e})", f.name, "-"),
            }
        }
        rows
    }

    /// The kernel-measured time per run of one test run repeating `input`
    /// `runs` times: only right for a packet the program leaves unchanged,
    /// so `path` is checked to have moved on every run.
    pub fn time_repeated(
        &mut self,
        prog: Prog,
        input: &[u8],
        runs: u32,
        path: &[(Stat, u64)],
    ) -> Result<f64, String> {
        let before = self.counters();
        let ns = self.run(prog, input, runs).duration.as_nanos() as f64;
        check_path(&before, &self.counters(), runs, path)?;
        Ok(ns)
    }

    /// The mean kernel-measured time of `runs` single runs of `prog`, run
    /// `i` on a fresh `packet(i)` (a repeated run would see the packet its
    /// previous run rewrote). Every counter of `path` must have moved by
    /// its amount on every run (so the figure is the path's), else why not.
    pub fn time_path(
        &mut self,
        prog: Prog,
        packet: &dyn Fn(u32) -> Vec<u8>,
        runs: u32,
        path: &[(Stat, u64)],
    ) -> Result<f64, String> {
        let before = self.counters();
        let mut total = 0u128;
        for i in 0..runs {
            total += self.run(prog, &packet(i), 1).duration.as_nanos();
        }
        check_path(&before, &self.counters(), runs, path)?;
        Ok(total as f64 / runs.max(1) as f64)
    }
}

/// Whether every counter of `path` moved by its amount `runs` times.
fn check_path(
    before: &[u64],
    after: &[u64],
    runs: u32,
    path: &[(Stat, u64)],
) -> Result<(), String> {
    for (s, n) in path {
        let moved = after[*s as usize] - before[*s as usize];
        if moved != n * runs as u64 {
            return Err(format!(
                "path changes when repeated: {} moved {moved}, not {}",
                s.name(),
                n * runs as u64
            ));
        }
    }
    Ok(())
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// One way a fixture's run differed from its expectation.
pub struct Mismatch {
    pub fixture: &'static str,
    pub what: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "  [{}] {}", self.fixture, self.what)
    }
}

fn mismatches(f: &Fixture, run: &Run, before: &[u64], after: &[u64]) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut miss = |what: String| {
        out.push(Mismatch {
            fixture: f.name,
            what,
        })
    };
    if run.code != f.verdict.code() {
        miss(format!(
            "verdict: want {:?} ({}), got {}",
            f.verdict,
            f.verdict.code(),
            run.code
        ));
    }
    let want = match &f.output {
        Want::Unchanged => &f.input,
        Want::Packet(p) => p,
    };
    if &run.output != want {
        miss(format!(
            "output packet differs:\n      want {}\n      got  {}",
            hex(want),
            hex(&run.output)
        ));
    }
    for stat in mesh_common::stats::COUNTERS.iter().map(|c| c.stat) {
        let i = stat as usize;
        let delta = after[i] - before[i];
        let listed = f
            .counters
            .iter()
            .find(|(s, _)| *s == stat)
            .map_or(0, |(_, n)| *n);
        let want = listed + u64::from(stat == f.verdict.stat());
        if delta != want {
            miss(format!(
                "counter {}: want +{want}, got +{delta}",
                stat.name()
            ));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

fn as_bytes(md: &XdpMd) -> &[u8] {
    // SAFETY: XdpMd is repr(C), plain u32s, no padding.
    unsafe { std::slice::from_raw_parts((md as *const XdpMd).cast(), size_of::<XdpMd>()) }
}

/// A map's kernel memory (its fdinfo's `memlock`; 0 for other fds).
fn memlock(fdinfo: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(fdinfo).unwrap_or_default();
    if !text.contains("map_type:") {
        return 0;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn fd_memlock(m: &MapData) -> u64 {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = m.fd().as_fd().as_raw_fd();
    memlock(std::path::Path::new(&format!("/proc/self/fdinfo/{fd}")))
}

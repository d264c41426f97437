//! Docker engines and mesh agents for the agent tests, each in a network
//! namespace of its own (Debian's dockerd, started here with private data,
//! exec and socket paths; `mesh_lab::engine`). Images are built
//! locally: the static whoami binary, imported FROM scratch.
//!
//! Everything started here is stopped and removed on drop.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use mesh_agent::status::Status;
use mesh_lab as lab;

use crate::netns::{Netns, unique};

pub use lab::image::WHOAMI_IMAGE;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .expect("workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The static whoami binary (MESH_WHOAMI, or built once here).
pub fn whoami_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = target_dir().join("static");
        let args = [
            "-p",
            "mesh-whoami",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
        ];
        let target_arg = ["--target-dir", target.to_str().expect("utf-8 target dir")];
        built(
            "MESH_WHOAMI",
            &[&args[..], &target_arg[..]].concat(),
            Some("-C target-feature=+crt-static"),
        )
        .unwrap_or_else(|| target.join("x86_64-unknown-linux-gnu/release/whoami"))
    })
    .clone()
}

/// The workspace's `mesh-agent` binary (`meshctl` beside it), as released
/// (the image profile). Test runners build test binaries, not other
/// packages' binaries, so it is built here (once per test process; a no-op
/// when it is up to date) unless MESH_AGENT_BIN names one.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        built(
            "MESH_AGENT_BIN",
            &[
                "--profile",
                lab::image::PROFILE,
                "-p",
                "mesh-agent",
                "--bins",
            ],
            None,
        )
        .unwrap_or_else(|| target_dir().join(lab::image::PROFILE).join("mesh-agent"))
    })
    .clone()
}

/// The release agent image archive (`cargo xtask image`): MESH_AGENT_IMAGE,
/// or made here once per test process.
pub fn agent_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| match std::env::var_os("MESH_AGENT_IMAGE") {
            Some(p) => PathBuf::from(p),
            None => {
                lab::image::release()
                    .unwrap_or_else(|e| panic!("{e:#}"))
                    .tarball
            }
        })
        .clone()
}

/// The path in `env` if set; otherwise runs `cargo build -q ARGS` (with
/// RUSTFLAGS when given) and returns None for the caller's default path.
fn built(env: &str, args: &[&str], rustflags: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace())
        .args(["build", "-q"])
        .args(args);
    if let Some(flags) = rustflags {
        cmd.env("RUSTFLAGS", flags);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo build {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

/// A Docker engine in a namespace of its own (the lab library's engine,
/// with panicking helpers for tests). Stopped and removed on drop.
pub struct Engine {
    pub inner: lab::engine::Engine,
    pub ns: Netns,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Engine {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// An engine on a host that forwarded IP before dockerd started (a
    /// router, libvirt, another runtime): Docker then leaves the FORWARD
    /// policy at ACCEPT.
    pub fn start_forwarding() -> Self {
        Self::start_with(true)
    }

    fn start_with(forwarding: bool) -> Self {
        let tag = unique("mdk");
        let ns = Netns::new(&tag);
        if forwarding {
            ns.sysctl("net.ipv4.ip_forward", "1");
        }
        let dir = PathBuf::from("/tmp").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        let inner = lab::engine::Engine::start(lab::engine::EngineSpec {
            ns: tag,
            dir: dir.clone(),
            data_root: dir.join("data"),
            // Containers' embedded resolver forwards what it does not know
            // to the agent's DNS on the mesh gateway (10.42.0.0/24's .1).
            dns: Some("10.42.0.1".into()),
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        let socket = inner.socket.clone();
        Engine {
            inner,
            ns,
            dir,
            socket,
        }
    }

    /// Writes a cluster key (the same on every engine of a test) into this
    /// engine's directory; its path.
    pub fn write_cluster_key(&self) -> PathBuf {
        let key = self.dir.join("cluster.key");
        fs::write(
            &key,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .expect("cluster key");
        key
    }

    /// The data plane's counters by name, from `meshctl stats --all` in
    /// the agent container.
    pub fn mesh_counters(&self) -> std::collections::BTreeMap<String, u64> {
        let out = self.docker(&["exec", lab::agent::NAME, "/meshctl", "stats", "--all"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
            })
            .collect()
    }

    /// Restarts dockerd (containers with a restart policy come back).
    pub fn restart_daemon(&mut self) {
        self.inner
            .restart()
            .unwrap_or_else(|e| panic!("restarting dockerd: {e:#}"));
    }

    /// The lab library's engine.
    pub fn lab(&self) -> &lab::engine::Engine {
        &self.inner
    }

    /// `docker -H <this engine> args...`
    pub fn docker(&self, args: &[&str]) -> Output {
        self.inner
            .docker()
            .args(args)
            .raw()
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// As [`Engine::docker`], panicking with stderr on failure; stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports the whoami image (the lab's: /whoami as entrypoint, a static
    /// busybox as /bin/sh and tools).
    pub fn import_whoami(&self) {
        let root = lab::image::whoami_tree(&whoami_bin(), &self.dir.join("img"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.import_tree(&root, WHOAMI_IMAGE, Some("/whoami"));
    }

    /// Imports Debian's nginx as `mesh-nginx:lab` (`lab::image::nginx_tree`).
    pub fn import_nginx(&self) {
        let root =
            lab::image::nginx_tree(&self.dir.join("img")).unwrap_or_else(|e| panic!("{e:#}"));
        self.import_tree(&root, "mesh-nginx:lab", Some("/usr/sbin/nginx"));
    }

    /// Loads the release agent image (the lab's and the README's).
    pub fn import_agent(&self) {
        self.inner
            .load(&agent_image())
            .unwrap_or_else(|e| panic!("loading the agent image: {e:#}"));
    }

    /// Imports the directory tree `root` as `image` (FROM scratch).
    fn import_tree(&self, root: &std::path::Path, image: &str, entrypoint: Option<&str>) {
        self.inner
            .import(root, image, entrypoint)
            .unwrap_or_else(|e| panic!("importing {image}: {e:#}"));
    }

    /// Runs `whoami ask PROTO TARGET` in the container named `client`
    /// (bounded: `count` requests, 2 s timeout each): answers by backend
    /// name, and the lines of the requests that failed.
    pub fn ask(
        &self,
        proto: &str,
        target: &str,
        count: u32,
        interval_ms: u32,
    ) -> (BTreeMap<String, usize>, Vec<String>) {
        let args = lab::whoami::ask_args("client", proto, target, count, interval_ms, 2000);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.docker(&args);
        let mut names = BTreeMap::new();
        let mut errors = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut f = line.splitn(3, ' ');
            let (_, kind, rest) = (f.next(), f.next(), f.next().unwrap_or(""));
            match kind {
                Some("ok") => *names.entry(rest.to_string()).or_default() += 1,
                Some("err") => errors.push(line.to_string()),
                _ => {}
            }
        }
        // Every request is accounted for: a client that did not run, ended
        // early or printed nothing is an error, never an empty success.
        let seen = names.values().sum::<usize>() + errors.len();
        if !out.status.success() || seen != count as usize {
            errors.push(format!(
                "client: {} with {seen} of {count} results: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        (names, errors)
    }

    /// Imports `mesh-glibc:test`: the host's getent with its shared
    /// libraries, a glibc DNS client (`getent hosts NAME`).
    pub fn import_glibc_client(&self) {
        let root = self.dir.join("glibc");
        let ldd = Command::new("ldd")
            .arg("/usr/bin/getent")
            .output()
            .expect("ldd");
        let mut files = vec![PathBuf::from("/usr/bin/getent")];
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
        for f in &files {
            let dst = root.join(f.strip_prefix("/").expect("absolute"));
            fs::create_dir_all(dst.parent().expect("parent")).expect("dir");
            fs::copy(f, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        }
        fs::create_dir_all(root.join("etc")).expect("etc");
        fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n").expect("nsswitch");
        self.import_tree(&root, "mesh-glibc:test", None);
    }

    /// Starts `whoami ask` in the container named `client` in the
    /// background (bounded: `count` requests, `timeout_ms` each); its
    /// output is piped.
    pub fn ask_in_background(
        &self,
        proto: &str,
        target: &str,
        count: u32,
        interval_ms: u32,
        timeout_ms: u32,
    ) -> Child {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(lab::whoami::ask_args(
                "client",
                proto,
                target,
                count,
                interval_ms,
                timeout_ms,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker exec")
    }

    /// `nslookup NAME [SERVER]` in a fresh container on `network`: the
    /// addresses it printed (none on any failure).
    pub fn nslookup(&self, network: &str, name: &str, server: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "run",
            "--rm",
            "--network",
            network,
            "--entrypoint",
            "nslookup",
            WHOAMI_IMAGE,
            name,
        ];
        args.extend(server);
        let out = self.docker(&args);
        String::from_utf8_lossy(&out.stdout)
            .split("\n\n")
            .skip(1)
            .flat_map(|b| b.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|l| l.strip_prefix("Address: ").map(str::to_owned))
            .collect()
    }

    /// Runs a whoami container on the mesh network; returns its id.
    pub fn run_whoami(&self, name: &str, labels: &[&str], extra: &[&str]) -> String {
        let args = lab::whoami::run_args(name, labels, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.docker_ok(&args)
    }
}

/// How an [`Agent`] runs.
enum Run {
    /// A process in the engine's namespace (single-host tests: kill -9,
    /// exit codes).
    Process {
        args: Vec<String>,
        ns: String,
        child: Option<Child>,
    },
    /// The agent container, exactly as the lab and the README run it.
    Container {
        spec: lab::agent::AgentSpec,
        docker_host: String,
    },
}

/// A mesh agent on an engine, started as a user would.
pub struct Agent {
    pub api_socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    run: Run,
}

impl Agent {
    /// The agent as a process, with the engine's socket, private pins, state
    /// and control socket, and `extra` flags.
    pub fn start(engine: &Engine, extra: &[&str]) -> Self {
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(engine.dir.file_name().expect("tag"));
        let mut args: Vec<String> = vec![
            "--docker-socket".into(),
            engine.socket.display().to_string(),
            "--bpffs-dir".into(),
            bpffs_dir.display().to_string(),
            "--state-dir".into(),
            engine.dir.join("state").display().to_string(),
            "--api-socket".into(),
            engine.dir.join("agent.sock").display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:9464".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = Agent {
            api_socket: engine.dir.join("agent.sock"),
            bpffs_dir,
            log: engine.dir.join("agent.log"),
            run: Run::Process {
                args,
                ns: engine.ns.name.clone(),
                child: None,
            },
        };
        a.spawn();
        a
    }

    /// The agent container on `engine` (its image imported first), with
    /// the cluster key mounted at [`lab::agent::KEY_PATH`] when given, and
    /// `flags`.
    pub fn in_container(engine: &Engine, key: Option<&std::path::Path>, flags: &[String]) -> Self {
        engine.import_agent();
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(engine.dir.file_name().expect("tag"));
        let mut flags = flags.to_vec();
        flags.extend(["--metrics-addr".into(), "127.0.0.1:9464".into()]);
        let spec = lab::agent::AgentSpec {
            bpffs_dir: bpffs_dir.display().to_string(),
            state_dir: engine.dir.join("state"),
            key_file: key.map(ToOwned::to_owned),
            flags,
        };
        lab::agent::start(engine.lab(), &spec).unwrap_or_else(|e| panic!("{e:#}"));
        Agent {
            api_socket: spec.api_socket(),
            bpffs_dir,
            log: engine.dir.join("agent.log"),
            run: Run::Container {
                spec,
                docker_host: format!("unix://{}", engine.socket.display()),
            },
        }
    }

    /// The agent container `spec` describes, started some other way (the
    /// compose file).
    pub fn adopt_container(engine: &Engine, spec: lab::agent::AgentSpec) -> Self {
        Agent {
            api_socket: spec.api_socket(),
            bpffs_dir: PathBuf::from(&spec.bpffs_dir),
            log: engine.dir.join("agent.log"),
            run: Run::Container {
                spec,
                docker_host: format!("unix://{}", engine.socket.display()),
            },
        }
    }

    fn spawn(&mut self) {
        let Run::Process { args, ns, child } = &mut self.run else {
            return;
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        *child = Some(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{ns}"))
                .arg(agent_bin())
                .args(args.iter())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("mesh-agent starts"),
        );
    }

    /// `docker ARGS` against the agent container's engine.
    fn docker(&self, args: &[&str]) -> Option<Output> {
        let Run::Container { docker_host, .. } = &self.run else {
            return None;
        };
        Command::new("docker")
            .arg("-H")
            .arg(docker_host)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()
    }

    /// Waits (bounded) for the agent process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Run::Process { child: Some(c), .. } = &mut self.run
                && let Ok(Some(status)) = c.try_wait()
            {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        match &mut self.run {
            Run::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            Run::Container { .. } => {
                let _ = self.docker(&["kill", "-s", "KILL", lab::agent::NAME]);
            }
        }
    }

    /// A process is killed and started again; the container is restarted
    /// the way a user would (`docker restart mesh-agent`).
    pub fn restart(&mut self) {
        match &self.run {
            Run::Process { .. } => {
                self.kill9();
                self.spawn();
            }
            Run::Container { .. } => {
                let out = self.docker(&["restart", lab::agent::NAME]);
                assert!(
                    out.is_some_and(|o| o.status.success()),
                    "docker restart mesh-agent"
                );
            }
        }
    }

    /// Stopped the way a user would (`docker stop mesh-agent`, SIGTERM
    /// for a process), left stopped for `pause`, then started again: a
    /// restart as slow as its host makes it.
    pub fn stop_and_start(&mut self, pause: Duration) {
        match &mut self.run {
            Run::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    // SAFETY: signals the child this Agent started.
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    let _ = c.wait();
                }
            }
            Run::Container { .. } => {
                let out = self.docker(&["stop", lab::agent::NAME]);
                assert!(
                    out.is_some_and(|o| o.status.success()),
                    "docker stop mesh-agent"
                );
            }
        }
        std::thread::sleep(pause);
        match &self.run {
            Run::Process { .. } => self.spawn(),
            Run::Container { .. } => {
                let out = self.docker(&["start", lab::agent::NAME]);
                assert!(
                    out.is_some_and(|o| o.status.success()),
                    "docker start mesh-agent"
                );
            }
        }
    }

    /// The agent's status, if it answers.
    /// Data-path counter `name` as the kernel has it (`meshctl stats`).
    pub fn counter(&self, name: &str) -> u64 {
        let out = mesh_agent::ctl::execute(&mesh_agent::ctl::Args {
            bpffs_dir: self.bpffs_dir.clone(),
            json: true,
            cmd: mesh_agent::ctl::Cmd::Stats { all: true },
        })
        .unwrap_or_else(|e| panic!("meshctl stats: {e}"));
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("meshctl stats --json: {e}"));
        rows.iter()
            .find(|r| r["counter"] == name)
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or(0)
    }

    pub fn status(&self) -> Option<Status> {
        let raw = mesh_agent::api::ask(&self.api_socket, "status").ok()?;
        serde_json::from_str(&raw).ok()
    }

    /// Waits (bounded) until `f` holds for the agent's status.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status()
                && f(&s)
            {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "agent: {what} not reached in {timeout:?}; status {:?}\nlog:\n{}",
                self.status(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        match &self.run {
            Run::Process { .. } => fs::read_to_string(&self.log).unwrap_or_default(),
            Run::Container { .. } => self
                .docker(&["logs", lab::agent::NAME])
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        match &self.run {
            Run::Process { .. } => self.kill9(),
            Run::Container { spec, .. } => {
                let _ = self.docker(&["rm", "-f", lab::agent::NAME]);
                let _ = fs::remove_dir_all(&spec.state_dir);
            }
        }
        // Unpinning the links detaches the programs; the maps go with them.
        let _ = fs::remove_dir_all(&self.bpffs_dir);
    }
}

/// An underlay for several engines, routed as the lab's is
/// (`mesh_lab::underlay`): engine N on subnet `(N - 1) % 3 + 1` of
/// 192.168.92-94.0/24 at host number N, subnet 3 behind a 1400-byte link;
/// hosts outside the cluster on 192.168.91.0/24.
pub struct Underlay {
    inner: lab::underlay::Underlay,
}

impl Underlay {
    pub fn new() -> Self {
        let inner = lab::underlay::Underlay::routed(&unique("mul"), "192.168.91")
            .unwrap_or_else(|e| panic!("{e:#}"));
        Underlay { inner }
    }

    /// Node `n`'s address.
    pub fn addr(&self, n: u8) -> String {
        self.inner.addr(n)
    }

    /// Connects `engine` as node `n`.
    pub fn attach(&self, engine: &Engine, n: u8) {
        self.inner
            .attach(engine.lab(), n)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// A host outside the cluster on the underlay, at 192.168.91.`n`.
    pub fn outside(&self, n: u8) -> crate::netns::Netns {
        let ns = crate::netns::Netns::new(&unique("mox"));
        self.inner
            .attach_outside(&ns.name, n)
            .unwrap_or_else(|e| panic!("{e:#}"));
        ns
    }

    /// The address of the outside host attached as `n`.
    pub fn outside_addr(&self, n: u8) -> String {
        self.inner.outside_addr(n)
    }

    /// The routers send packets for `cidr` from outside hosts to node `n`
    /// (as a hostile or careless network could).
    pub fn steer(&self, cidr: &str, n: u8) {
        self.inner
            .steer(cidr, n)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The network drops UDP to `port` on node `n` (or passes it again).
    pub fn block_udp(&self, n: u8, port: u16, block: bool) {
        self.inner
            .block_udp(n, port, block)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Cuts node `n` off the underlay (or reconnects it).
    pub fn set_link(&self, n: u8, up: bool) {
        self.inner
            .set_link(n, up)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Agent flags for node `name` of a cluster on this underlay, for the
    /// agent container (the key mounted at its usual place), joining
    /// through the nodes `seeds`; the tunnel MTU fits the narrow link.
    pub fn cluster_flags(&self, name: &str, seeds: &[u8]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--cluster-key-file",
            lab::agent::KEY_PATH,
            "--underlay-iface",
            lab::underlay::IFACE,
            "--node-name",
            name,
            "--mtu",
            &lab::underlay::ROUTED_TUNNEL_MTU.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for &s in seeds {
            v.push("--join".into());
            v.push(format!("{}:7946", self.addr(s)));
        }
        v
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// `n` Docker hosts on one routed [`Underlay`], each with the whoami image
/// and the agent container, joined into one cluster through node 1, each
/// seeing all the others. Dropped agents first, then engines, then the
/// underlay.
pub struct Hosts {
    pub agents: Vec<Agent>,
    pub engines: Vec<Engine>,
    pub underlay: Underlay,
}

impl Hosts {
    pub fn start(n: u8) -> Hosts {
        let underlay = Underlay::new();
        let engines: Vec<Engine> = (0..n).map(|_| Engine::start()).collect();
        let key = engines[0].write_cluster_key();
        for (i, e) in engines.iter().enumerate() {
            underlay.attach(e, i as u8 + 1);
            e.import_whoami();
        }
        let agents: Vec<Agent> = (1..=n)
            .map(|i| {
                let flags = underlay.cluster_flags(&format!("n{i}"), &[1]);
                Agent::in_container(&engines[i as usize - 1], Some(&key), &flags)
            })
            .collect();
        for a in &agents {
            a.wait_for("every other node a peer", Duration::from_secs(60), |s| {
                s.docker.connected && s.node.peers.len() == n as usize - 1
            });
        }
        Hosts {
            agents,
            engines,
            underlay,
        }
    }
}

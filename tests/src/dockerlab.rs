//! Docker engines and mesh agents for the agent tests, each in a network
//! namespace of its own (Debian's dockerd, started here with private data,
//! exec and socket paths; see ../shared/TOOLCHAIN.md). Images are built
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

use crate::netns::{Netns, unique};

/// The test image: /whoami (entrypoint), static.
pub const WHOAMI_IMAGE: &str = "mesh-whoami:test";

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

/// The workspace's `mesh-agent` binary. Test runners build test binaries,
/// not other packages' binaries, so it is built here (once per test
/// process; a no-op when it is up to date) unless MESH_AGENT_BIN names one.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        built(
            "MESH_AGENT_BIN",
            &["-p", "mesh-agent", "--bin", "mesh-agent"],
            None,
        )
        .unwrap_or_else(|| target_dir().join("debug/mesh-agent"))
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

/// A Docker engine in a namespace of its own.
pub struct Engine {
    pub ns: Netns,
    pub dir: PathBuf,
    pub socket: PathBuf,
    daemon: Child,
}

impl Engine {
    pub fn start() -> Self {
        let tag = unique("mdk");
        let ns = Netns::new(&tag);
        let dir = PathBuf::from("/tmp").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("engine dir");
        let socket = dir.join("docker.sock");
        let log = fs::File::create(dir.join("dockerd.log")).expect("log file");
        let daemon = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args([
                "--bip",
                "172.30.0.1/24",
                "--cgroup-parent",
                &tag,
                "--log-level",
                "warn",
            ])
            // Containers' embedded resolver forwards what it does not know
            // to the agent's DNS on the mesh gateway (10.42.0.0/24's .1).
            .args(["--dns", "10.42.0.1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd starts (apt-get install docker.io)");
        let engine = Engine {
            ns,
            dir,
            socket,
            daemon,
        };
        let start = Instant::now();
        while !engine
            .docker(&["info", "--format", "{{.ServerVersion}}"])
            .status
            .success()
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not come up: {}",
                fs::read_to_string(engine.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        engine
    }

    /// `docker -H <this engine> args...`
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker client runs")
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

    /// Imports the whoami image (FROM scratch: /whoami as entrypoint, and a
    /// static busybox as /bin/sh).
    pub fn import_whoami(&self) {
        let root = self.dir.join("img");
        fs::create_dir_all(root.join("tmp")).expect("image root");
        fs::create_dir_all(root.join("bin")).expect("image root");
        fs::copy(whoami_bin(), root.join("whoami")).expect("copy whoami");
        // A shell (Docker runs health checks with /bin/sh -c) and tools:
        // Debian's static busybox.
        fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("busybox-static is installed (cargo xtask setup)");
        for tool in ["sh", "nslookup", "cat", "sleep", "ip", "ping"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).expect("symlink");
        }
        self.import_tree(&root, WHOAMI_IMAGE, Some("/whoami"));
    }

    /// Imports the directory tree `root` as `image` (FROM scratch).
    fn import_tree(&self, root: &std::path::Path, image: &str, entrypoint: Option<&str>) {
        let tar = self
            .dir
            .join(format!("{}.tar", image.replace([':', '/'], "_")));
        let ok = Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(ok.success(), "tar");
        let change = entrypoint.map(|e| format!("ENTRYPOINT [\"{e}\"]"));
        let mut args = vec!["import"];
        if let Some(c) = &change {
            args.extend(["--change", c.as_str()]);
        }
        args.extend([tar.to_str().expect("utf-8 path"), image]);
        self.docker_ok(&args);
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
        let out = self.docker(&[
            "exec",
            "client",
            "/whoami",
            "ask",
            proto,
            target,
            "--count",
            &count.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
            "--timeout-ms",
            "2000",
        ]);
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

    /// Runs a whoami container on the mesh network; returns its id.
    pub fn run_whoami(&self, name: &str, labels: &[&str], extra: &[&str]) -> String {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            "mesh",
        ];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(extra);
        args.extend([WHOAMI_IMAGE, "serve", "--tcp", "80", "--udp", "80"]);
        self.docker_ok(&args)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.daemon.try_wait().ok().flatten().is_none()
            && start.elapsed() < Duration::from_secs(15)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A mesh-agent process in an engine's namespace, started as a user would.
pub struct Agent {
    pub api_socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    ns: String,
    child: Option<Child>,
}

impl Agent {
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
            args,
            ns: engine.ns.name.clone(),
            child: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg(agent_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("mesh-agent starts");
        self.child = Some(child);
    }

    /// Waits (bounded) for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The agent's status, if it answers.
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
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // Unpinning the links detaches the programs; the maps go with them.
        let _ = fs::remove_dir_all(&self.bpffs_dir);
    }
}

/// An underlay for several engines: a bridge in a namespace of its own;
/// each engine joins with `ul0` = 192.168.91.N/24.
pub struct Underlay {
    pub ns: Netns,
}

impl Underlay {
    pub fn new() -> Self {
        let ns = Netns::new(&unique("mul"));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Underlay { ns }
    }

    /// Connects `engine` as node `n`.
    pub fn attach(&self, engine: &Engine, n: u8) {
        let port = format!("p{n}");
        self.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "ul0",
            "netns",
            &engine.ns.name,
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"]);
        engine
            .ns
            .ip(&["addr", "add", &format!("192.168.91.{n}/24"), "dev", "ul0"]);
        engine.ns.ip(&["link", "set", "ul0", "up"]);
    }

    /// Cuts node `n` off the underlay (or reconnects it).
    pub fn set_link(&self, n: u8, up: bool) {
        self.ns.ip(&[
            "link",
            "set",
            &format!("p{n}"),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// Agent flags for node `name` of a cluster on an [`Underlay`].
pub fn cluster_flags(key_file: &std::path::Path, name: &str, seeds: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--cluster-key-file",
        key_file.to_str().expect("utf-8"),
        "--underlay-iface",
        "ul0",
        "--node-name",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in seeds {
        v.push("--join".into());
        v.push(format!("192.168.91.{s}:7946"));
    }
    v
}

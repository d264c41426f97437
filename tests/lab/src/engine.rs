//! A Docker engine in a network namespace of its own: Debian's dockerd with
//! private data, exec and socket paths (several run side by side, each
//! with its own `--bip` and `--cgroup-parent`). It is started with `nsenter --net`, not `ip
//! netns exec`, which remounts /sys and hides the cgroup mounts dockerd
//! needs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{Cmd, ip};

/// Where an engine lives.
#[derive(Clone, Debug)]
pub struct EngineSpec {
    /// Its network namespace (created if missing, deleted on stop).
    pub ns: String,
    /// Socket, pid file, exec root, logs, image trees; removed on stop.
    pub dir: PathBuf,
    /// `--data-root`; removed on stop.
    pub data_root: PathBuf,
    /// `--dns` for its containers' embedded resolver to forward to.
    pub dns: Option<String>,
}

/// A running engine. Stopped (containers, daemon, namespace, directories)
/// when dropped, unless [`Engine::keep`] was called (the lab stays up).
pub struct Engine {
    pub spec: EngineSpec,
    pub socket: PathBuf,
    daemon: Option<Child>,
    keep: bool,
}

impl Engine {
    /// Starts dockerd in `spec.ns` and waits (at most 60 s) until it answers.
    pub fn start(spec: EngineSpec) -> Result<Engine> {
        if !Path::new("/var/run/netns").join(&spec.ns).exists() {
            ip(&["netns", "add", &spec.ns])?;
            ip(&["-n", &spec.ns, "link", "set", "lo", "up"])?;
        }
        fs::create_dir_all(&spec.dir)?;
        fs::create_dir_all(&spec.data_root)?;
        let socket = spec.dir.join("docker.sock");
        let daemon = launch(&spec, &socket)?;
        let engine = Engine {
            spec,
            socket,
            daemon: Some(daemon),
            keep: false,
        };
        engine.wait_up()?;
        Ok(engine)
    }

    /// Waits (at most 60 s) until the daemon answers.
    fn wait_up(&self) -> Result<()> {
        let start = Instant::now();
        while !self.up() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "dockerd in {} did not come up: {}",
                    self.spec.ns,
                    fs::read_to_string(self.spec.dir.join("dockerd.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Restarts the daemon as an operator or a package upgrade would: it
    /// stops (its containers with it) and starts again with the same
    /// state; containers with a restart policy come back.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon();
        self.daemon = Some(launch(&self.spec, &self.socket)?);
        self.wait_up()
    }

    /// An engine an earlier run started and kept (to inspect or stop it).
    pub fn adopt(spec: EngineSpec) -> Engine {
        let socket = spec.dir.join("docker.sock");
        Engine {
            spec,
            socket,
            daemon: None,
            keep: true,
        }
    }

    /// Leaves the engine running when this handle is dropped.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Whether the daemon answers.
    pub fn up(&self) -> bool {
        self.socket.exists()
            && self
                .docker()
                .args(["info", "--format", "{{.ServerVersion}}"])
                .ok()
    }

    /// `docker` against this engine.
    pub fn docker(&self) -> Cmd {
        Cmd::new("docker").args([format!("--host=unix://{}", self.socket.display())])
    }

    /// Imports the directory tree `root` as `image` (FROM scratch).
    /// Loads a `docker save` archive (the release agent image).
    pub fn load(&self, tarball: &Path) -> Result<()> {
        self.docker()
            .args([std::ffi::OsStr::new("load"), std::ffi::OsStr::new("-q")])
            .args([std::ffi::OsStr::new("-i"), tarball.as_os_str()])
            .output()
            .map(drop)
    }

    pub fn import(&self, root: &Path, image: &str, entrypoint: Option<&str>) -> Result<()> {
        let tar = self
            .spec
            .dir
            .join(format!("{}.tar", image.replace([':', '/'], "_")));
        Cmd::new("tar")
            .args(["-C"])
            .args([root])
            .args(["-cf"])
            .args([&tar])
            .args(["."])
            .output()?;
        let mut docker = self.docker().args(["import"]);
        if let Some(e) = entrypoint {
            docker = docker.args(["--change", &format!("ENTRYPOINT [\"{e}\"]")]);
        }
        docker.args([tar.as_os_str()]).args([image]).output()?;
        let _ = fs::remove_file(tar);
        Ok(())
    }

    /// Removes every container, stops the daemon (SIGTERM, then SIGKILL
    /// after 20 s), deletes the namespace and the directories.
    pub fn stop(&mut self) {
        if self.up() {
            let ids = self
                .docker()
                .args(["ps", "-aq"])
                .output()
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = self.docker().args(["rm", "-f", id]).ok();
            }
        }
        self.stop_daemon();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.spec.ns])
            .output();
        // dockerd leaves its namespace file bind-mounted in the exec root
        // (nsfs): the directories cannot go while it is mounted (250 MB
        // were left behind per engine).
        unmount_under(&[&self.spec.dir, &self.spec.data_root]);
        let _ = fs::remove_dir_all(&self.spec.dir);
        let _ = fs::remove_dir_all(&self.spec.data_root);
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after 20 s.
    fn stop_daemon(&mut self) {
        let pid = fs::read_to_string(self.spec.dir.join("docker.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .or_else(|| self.daemon.as_ref().map(|c| c.id() as i32));
        if let Some(pid) = pid {
            // SAFETY: signalling the dockerd this engine started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while self.alive(pid) && start.elapsed() < Duration::from_secs(20) {
                thread::sleep(Duration::from_millis(100));
            }
            if self.alive(pid) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(mut c) = self.daemon.take() {
            let _ = c.wait();
        }
    }

    /// Whether dockerd `pid` still runs (reaping it if it is our child).
    fn alive(&mut self, pid: i32) -> bool {
        if let Some(c) = self.daemon.as_mut()
            && c.id() as i32 == pid
        {
            return c.try_wait().ok().flatten().is_none();
        }
        Path::new(&format!("/proc/{pid}")).exists()
    }
}

/// Starts dockerd for `spec` (its log appended to dockerd.log).
fn launch(spec: &EngineSpec, socket: &Path) -> Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.dir.join("dockerd.log"))?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", spec.ns))
        .arg("dockerd")
        .arg("--data-root")
        .arg(&spec.data_root)
        .arg("--exec-root")
        .arg(spec.dir.join("x"))
        .arg(format!("--host=unix://{}", socket.display()))
        .arg("--pidfile")
        .arg(spec.dir.join("docker.pid"))
        .args(["--bip", "172.30.0.1/24", "--cgroup-parent", &spec.ns])
        .args(["--log-level", "warn"]);
    if let Some(dns) = &spec.dns {
        cmd.args(["--dns", dns]);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd (apt-get install docker.io)")
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.keep {
            self.stop();
        }
    }
}

/// Unmounts (lazily) everything mounted under any of `dirs`, deepest first.
pub fn unmount_under(dirs: &[&Path]) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| {
            dirs.iter()
                .any(|d| Path::new(m).starts_with(d) && Path::new(m) != *d)
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", m]).output();
    }
}

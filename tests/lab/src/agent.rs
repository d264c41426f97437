//! The agent as a container, as `docker run` arguments: how the lab's nodes
//! and the multi-host tests run it, with the same settings as
//! `deploy/compose.yaml` (the README's way on real hosts; its test checks
//! the compose file itself).
//!
//! Host network and PID namespaces; exactly the capabilities it uses rather
//! than --privileged (which also asks for capabilities a host may not
//! grant): SYS_ADMIN (load and attach eBPF; Docker 20.10 knows no BPF or
//! PERFMON), NET_ADMIN, SYS_PTRACE and DAC_READ_SEARCH (containers'
//! /proc/PID/root), NET_RAW. bpffs and the Docker socket are mounted, the
//! state dir persists at /var/lib/mesh (VIPs, subnet claim), the control
//! socket is in /run/mesh, the cluster key is read-only.

use std::path::PathBuf;

use anyhow::Result;

use crate::{engine::Engine, image::AGENT_IMAGE};

/// The container's name.
pub const NAME: &str = "mesh-agent";
/// Where the cluster key is mounted inside.
pub const KEY_PATH: &str = "/etc/mesh/cluster.key";

/// One agent container.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Its bpffs directory (set as MESH_BPFFS_DIR, so `docker exec
    /// mesh-agent /meshctl ...` reads the same pins).
    pub bpffs_dir: String,
    /// Host directory mounted at /var/lib/mesh (the agent's state); its
    /// `run` subdirectory is mounted at /run/mesh (the control socket).
    pub state_dir: PathBuf,
    /// Host file mounted read-only at [`KEY_PATH`].
    pub key_file: Option<PathBuf>,
    /// The agent's own flags.
    pub flags: Vec<String>,
}

impl AgentSpec {
    /// The control socket, as seen from the host.
    pub fn api_socket(&self) -> PathBuf {
        self.run_dir().join("agent.sock")
    }

    /// Host directory mounted at /run/mesh.
    pub fn run_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }
}

/// `docker run` arguments for the agent on `engine`.
pub fn run_args(engine: &Engine, spec: &AgentSpec) -> Vec<String> {
    container_args(&engine.socket, spec)
}

/// `docker run` arguments for the agent with the engine socket `socket`
/// (the settings `deploy/compose.yaml` states for real hosts: a test
/// below checks that the two agree).
fn container_args(socket: &std::path::Path, spec: &AgentSpec) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        NAME,
        "--restart",
        "unless-stopped",
        "--network",
        "host",
        "--pid",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "SYS_PTRACE",
        "--cap-add",
        "DAC_READ_SEARCH",
        "--cap-add",
        "NET_RAW",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut volumes = vec![
        format!("{}:/var/run/docker.sock", socket.display()),
        "/sys/fs/bpf:/sys/fs/bpf".to_string(),
        // The host's cgroup tree, for socket-level balancing (the
        // container's own /sys/fs/cgroup is its own namespace's view).
        "/sys/fs/cgroup:/host/sys/fs/cgroup:ro".to_string(),
        format!("{}:/var/lib/mesh", spec.state_dir.display()),
        format!("{}:/run/mesh", spec.run_dir().display()),
    ];
    if let Some(k) = &spec.key_file {
        volumes.push(format!("{}:{KEY_PATH}:ro", k.display()));
    }
    for v in volumes {
        args.push("-v".into());
        args.push(v);
    }
    args.push("-e".into());
    args.push(format!("MESH_BPFFS_DIR={}", spec.bpffs_dir));
    args.push("-e".into());
    args.push("MESH_CGROUP=/host/sys/fs/cgroup".into());
    args.push(AGENT_IMAGE.into());
    args.extend(spec.flags.iter().cloned());
    args
}

/// Starts the agent container on `engine`.
pub fn start(engine: &Engine, spec: &AgentSpec) -> Result<()> {
    std::fs::create_dir_all(spec.run_dir())?;
    engine
        .docker()
        .args(run_args(engine, spec))
        .output()
        .map(drop)
}

/// Whether the agent container runs.
pub fn running(engine: &Engine) -> bool {
    engine
        .docker()
        .args(["inspect", "-f", "{{.State.Running}}", NAME])
        .output()
        .is_ok_and(|o| o.trim() == "true")
}

/// `meshctl ARGS` inside the agent container.
pub fn meshctl(engine: &Engine, args: &[&str]) -> Result<String> {
    engine
        .docker()
        .args(["exec", NAME, "/meshctl"])
        .args(args)
        .output()
}

/// The agent's last log lines.
pub fn logs(engine: &Engine, tail: usize) -> String {
    engine
        .docker()
        .args(["logs", "--tail", &tail.to_string(), NAME])
        .raw()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of `key`'s list in the compose file's one service
    /// (`  key:` then `    - value` lines).
    fn compose_list(compose: &str, key: &str) -> Vec<String> {
        compose
            .lines()
            .skip_while(|l| l.trim() != format!("{key}:"))
            .skip(1)
            .map_while(|l| l.trim().strip_prefix("- ").map(str::to_owned))
            .collect()
    }

    fn compose_value(compose: &str, key: &str) -> Option<String> {
        compose
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
            .map(str::to_owned)
    }

    /// The values following each `flag` in docker run arguments.
    fn flag_values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    /// A mount's container side and whether it is read-only.
    fn target(volume: &str) -> (String, bool) {
        let ro = volume.ends_with(":ro");
        let v = volume.trim_end_matches(":ro");
        (v.rsplit(':').next().unwrap_or(v).to_owned(), ro)
    }

    #[test]
    fn the_lab_runs_the_agent_as_the_compose_file_does() {
        let compose = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/compose.yaml"),
        )
        .expect("deploy/compose.yaml");
        let spec = AgentSpec {
            bpffs_dir: "/sys/fs/bpf/mesh".into(),
            state_dir: "/tmp/state".into(),
            key_file: Some("/tmp/cluster.key".into()),
            flags: vec![],
        };
        let args = container_args(std::path::Path::new("/run/docker.sock"), &spec);
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(flag_values(&args, "--cap-add")),
            sorted(compose_list(&compose, "cap_add")),
            "capabilities"
        );
        assert_eq!(
            sorted(flag_values(&args, "--security-opt")),
            sorted(compose_list(&compose, "security_opt")),
            "security options"
        );
        assert_eq!(
            flag_values(&args, "--network"),
            vec![compose_value(&compose, "network_mode").expect("network_mode")]
        );
        assert_eq!(
            flag_values(&args, "--pid"),
            vec![compose_value(&compose, "pid").expect("pid")]
        );
        // The same container paths, read-only alike; the lab mounts the key
        // file itself where the compose file mounts its directory. (The
        // restart policy differs on purpose: the lab's `down` stops it.)
        let compose_mounts: Vec<(String, bool)> = compose_list(&compose, "volumes")
            .iter()
            .map(|v| target(v))
            .collect();
        let lab_mounts: Vec<(String, bool)> =
            flag_values(&args, "-v").iter().map(|v| target(v)).collect();
        assert_eq!(
            lab_mounts.len(),
            compose_mounts.len(),
            "{lab_mounts:?} vs {compose_mounts:?}"
        );
        for (path, ro) in &lab_mounts {
            assert!(
                compose_mounts.iter().any(
                    |(c, c_ro)| c_ro == ro && (path == c || path.starts_with(&format!("{c}/")))
                ),
                "the lab mounts {path} (read-only: {ro}), the compose file does not: {compose_mounts:?}"
            );
        }
    }
}

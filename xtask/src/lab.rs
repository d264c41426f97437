//! The lab: N nodes as network namespaces on one underlay bridge, each with
//! its own Docker engine and a mesh agent started as a user would start it
//! (a container with host network and PID, bpffs and the Docker socket
//! mounted, the cluster key, --join).
//!
//! The agent container gets the capabilities it uses, not --privileged
//! (which also asks for capabilities a host may not grant).
//!
//! Everything lives in namespaces and directories this lab creates:
//! `meshlab-u` (the underlay bridge `lab0`, 192.168.100.0/24),
//! `meshlab-nN` (node N: `eth0` = 192.168.100.N), `/run/meshlab/nN`,
//! `/var/lib/meshlab/nN`, `/sys/fs/bpf/meshlab-nN`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{Cmd, root};

const UNDERLAY_NS: &str = "meshlab-u";
const RUN: &str = "/run/meshlab";
const LIB: &str = "/var/lib/meshlab";
pub const AGENT_IMAGE: &str = "mesh-agent:lab";
pub const WHOAMI_IMAGE: &str = "mesh-whoami:lab";

pub fn node_ns(n: usize) -> String {
    format!("meshlab-n{n}")
}

fn node_ip(n: usize) -> String {
    format!("192.168.100.{n}")
}

fn run_dir(n: usize) -> PathBuf {
    PathBuf::from(RUN).join(format!("n{n}"))
}

fn socket(n: usize) -> PathBuf {
    run_dir(n).join("docker.sock")
}

/// `docker` against node N's engine.
pub fn docker(n: usize) -> Cmd {
    Cmd::new("docker").args([format!("--host=unix://{}", socket(n).display())])
}

/// How many nodes the lab has (from its run directory).
pub fn nodes() -> Vec<usize> {
    let mut v: Vec<usize> = fs::read_dir(RUN)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix('n')?.parse().ok())
        .collect();
    v.sort();
    v
}

fn ns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

fn engine_up(n: usize) -> bool {
    docker(n)
        .args(["info", "--format", "{{.ServerVersion}}"])
        .ok()
}

fn agent_running(n: usize) -> bool {
    docker(n)
        .args(["inspect", "-f", "{{.State.Running}}", "mesh-agent"])
        .output()
        .is_ok_and(|o| o.trim() == "true")
}

/// Brings the lab up with `count` nodes; a lab already up with that many
/// healthy nodes is left as it is; anything else (a crashed run) is torn
/// down first.
pub fn up(count: usize, bins: &Bins) -> Result<()> {
    if !(1..=20).contains(&count) {
        bail!("--nodes must be 1 to 20");
    }
    if nodes() == (1..=count).collect::<Vec<_>>()
        && (1..=count).all(|n| engine_up(n) && agent_running(n))
    {
        println!("lab: already up with {count} nodes");
        return Ok(());
    }
    down()?;
    fs::create_dir_all(RUN)?;
    ip(&["netns", "add", UNDERLAY_NS])?;
    ip(&["-n", UNDERLAY_NS, "link", "set", "lo", "up"])?;
    ip(&["-n", UNDERLAY_NS, "link", "add", "lab0", "type", "bridge"])?;
    ip(&["-n", UNDERLAY_NS, "link", "set", "lab0", "up"])?;
    let key = random_key()?;
    fs::write(PathBuf::from(RUN).join("cluster.key"), format!("{key}\n"))?;
    for n in 1..=count {
        node(n, bins)?;
    }
    let join: Vec<String> = (1..=count.min(3))
        .map(|n| format!("{}:7946", node_ip(n)))
        .collect();
    for n in 1..=count {
        start_agent(n, &join)?;
    }
    for n in 1..=count {
        wait_agent(n)?;
    }
    println!("\nlab: {count} nodes up. Reach them with:");
    for n in 1..=count {
        println!(
            "  cargo xtask lab exec n{n} -- docker ps        # node {n}: {}",
            node_ip(n)
        );
    }
    println!("  cargo xtask lab exec n1 -- docker exec mesh-agent /meshctl status");
    println!("  cargo xtask lab status | cargo xtask lab down");
    Ok(())
}

fn node(n: usize, bins: &Bins) -> Result<()> {
    let ns = node_ns(n);
    let dir = run_dir(n);
    fs::create_dir_all(&dir)?;
    let lib = PathBuf::from(LIB).join(format!("n{n}"));
    fs::create_dir_all(&lib)?;
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    let port = format!("n{n}");
    ip(&[
        "link",
        "add",
        &port,
        "netns",
        UNDERLAY_NS,
        "type",
        "veth",
        "peer",
        "eth0",
        "netns",
        &ns,
    ])?;
    ip(&[
        "-n",
        UNDERLAY_NS,
        "link",
        "set",
        &port,
        "master",
        "lab0",
        "up",
    ])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{}/24", node_ip(n)),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    let log = fs::File::create(dir.join("dockerd.log"))?;
    // nsenter, not `ip netns exec`: that remounts /sys and hides the
    // cgroup mounts dockerd needs.
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .arg("dockerd")
        .arg("--data-root")
        .arg(&lib)
        .arg("--exec-root")
        .arg(dir.join("x"))
        .arg(format!("--host=unix://{}", socket(n).display()))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .args([
            "--bip",
            "172.30.0.1/24",
            "--cgroup-parent",
            &ns,
            "--log-level",
            "warn",
        ])
        // Containers' embedded resolver forwards to the agent's DNS on the
        // node's own address.
        .args(["--dns", &node_ip(n)])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd (apt-get install docker.io)")?;
    drop(child);
    let start = Instant::now();
    while !engine_up(n) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "node {n}: dockerd did not come up; see {}",
                dir.join("dockerd.log").display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    import(n, &bins.agent_root, AGENT_IMAGE, "[\"/mesh-agent\"]")?;
    import(n, &bins.whoami_root, WHOAMI_IMAGE, "[\"/whoami\"]")?;
    println!(
        "lab: node {n} up ({}, engine {})",
        node_ip(n),
        socket(n).display()
    );
    Ok(())
}

fn import(n: usize, rootfs: &Path, image: &str, entrypoint: &str) -> Result<()> {
    let tar = run_dir(n).join(format!("{}.tar", image.replace(':', "_")));
    Cmd::new("tar")
        .args(["-C"])
        .args([rootfs])
        .args(["-cf"])
        .args([&tar])
        .args(["."])
        .output()?;
    docker(n)
        .args(["import", "--change", &format!("ENTRYPOINT {entrypoint}")])
        .args([tar.as_os_str()])
        .args([image])
        .output()
        .map(drop)
}

fn start_agent(n: usize, join: &[String]) -> Result<()> {
    let bpffs = format!("/sys/fs/bpf/{}", node_ns(n));
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        "mesh-agent",
        "--restart",
        "unless-stopped",
        "--network",
        "host",
        "--pid",
        "host",
        // Exactly what the agent uses, rather than --privileged: load and
        // attach eBPF (SYS_ADMIN, which Docker 20.10 needs in place of BPF
        // and PERFMON, and NET_ADMIN), read containers' /proc/PID/root
        // (SYS_PTRACE, DAC_READ_SEARCH), raw sockets (NET_RAW).
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
    for v in [
        format!("{}:/var/run/docker.sock", socket(n).display()),
        "/sys/fs/bpf:/sys/fs/bpf".to_string(),
        format!("{RUN}/cluster.key:/etc/mesh/cluster.key:ro"),
        format!("{}/state:/run/mesh", run_dir(n).display()),
    ] {
        args.push("-v".into());
        args.push(v);
    }
    // In the environment, so `docker exec mesh-agent /meshctl ...` finds
    // the same pins as the agent.
    args.push("-e".into());
    args.push(format!("MESH_BPFFS_DIR={bpffs}"));
    args.push(AGENT_IMAGE.into());
    for a in [
        "--underlay-iface",
        "eth0",
        "--cluster-key-file",
        "/etc/mesh/cluster.key",
        "--node-name",
        &format!("n{n}"),
        "--dns-listen",
        &format!("{}:53", node_ip(n)),
        "--metrics-addr",
        &format!("{}:9464", node_ip(n)),
    ] {
        args.push(a.to_string());
    }
    for j in join {
        args.push("--join".into());
        args.push(j.clone());
    }
    docker(n).args(&args).output().map(drop)
}

fn wait_agent(n: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let st = docker(n)
            .args(["exec", "mesh-agent", "/meshctl", "status", "--json"])
            .output();
        if st
            .as_deref()
            .is_ok_and(|s| s.contains("\"connected\": true"))
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(90) {
            let logs = docker(n)
                .args(["logs", "--tail", "30", "mesh-agent"])
                .output()
                .unwrap_or_default();
            bail!("node {n}: the agent did not come up:\n{logs}");
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// Removes everything the lab made; fine to run when nothing is there.
pub fn down() -> Result<()> {
    for n in nodes() {
        if engine_up(n) {
            let ids = docker(n).args(["ps", "-aq"]).output().unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = docker(n).args(["rm", "-f", id]).ok();
            }
        }
        if let Ok(pid) = fs::read_to_string(run_dir(n).join("docker.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            // SAFETY: signalling the dockerd this lab started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && start.elapsed() < Duration::from_secs(20)
            {
                thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/{}", node_ns(n)));
    }
    for n in 1..=20 {
        if ns_exists(&node_ns(n)) {
            let _ = Cmd::new("ip").args(["netns", "del", &node_ns(n)]).ok();
        }
    }
    if ns_exists(UNDERLAY_NS) {
        let _ = Cmd::new("ip").args(["netns", "del", UNDERLAY_NS]).ok();
    }
    let _ = fs::remove_dir_all(RUN);
    let _ = fs::remove_dir_all(LIB);
    Ok(())
}

/// Runs a command in node N's namespace with DOCKER_HOST set to its engine.
pub fn exec(node: &str, cmd: &[String]) -> Result<()> {
    let n: usize = node
        .trim_start_matches('n')
        .parse()
        .with_context(|| format!("{node:?} is not a node (n1, n2, ...)"))?;
    if !ns_exists(&node_ns(n)) {
        bail!("node {node} does not exist: cargo xtask lab up");
    }
    let Some((program, rest)) = cmd.split_first() else {
        bail!("nothing to run: lab exec n1 -- CMD")
    };
    Cmd::new("nsenter")
        .args([format!("--net=/var/run/netns/{}", node_ns(n))])
        .args(["--", program])
        .args(rest)
        .env("DOCKER_HOST", format!("unix://{}", socket(n).display()))
        .run()
}

pub fn status() -> Result<()> {
    let ns = nodes();
    if ns.is_empty() {
        println!("lab: down");
        return Ok(());
    }
    for n in ns {
        println!("== node n{n} ({})", node_ip(n));
        if !engine_up(n) {
            println!("engine: DOWN");
            continue;
        }
        println!(
            "{}",
            docker(n)
                .args([
                    "ps",
                    "--format",
                    "table {{.Names}}\t{{.Status}}\t{{.Labels}}"
                ])
                .output()
                .unwrap_or_default()
        );
        match docker(n)
            .args(["exec", "mesh-agent", "/meshctl", "status"])
            .output()
        {
            Ok(s) => println!("{s}"),
            Err(e) => println!("agent: not answering ({e})"),
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    Cmd::new("ip").args(args).output().map(drop)
}

fn random_key() -> Result<String> {
    let mut f = fs::File::open("/dev/urandom")?;
    let mut k = [0u8; 32];
    std::io::Read::read_exact(&mut f, &mut k)?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}

/// Root filesystems of the lab images.
pub struct Bins {
    pub agent_root: PathBuf,
    pub whoami_root: PathBuf,
}

/// Builds the agent (with meshctl) and the whoami image trees: binaries
/// plus the shared libraries they load (`ldd`), and busybox for a shell.
pub fn build(whoami: &Path) -> Result<Bins> {
    crate::cmd::cargo(&["build", "-q", "-p", "mesh-agent", "--bins"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let images = target.join("lab-images");
    let _ = fs::remove_dir_all(&images);
    let agent_root = images.join("agent");
    for bin in ["mesh-agent", "meshctl"] {
        copy_with_libs(&target.join("debug").join(bin), &agent_root, bin)?;
    }
    fs::create_dir_all(agent_root.join("run/mesh"))?;
    fs::create_dir_all(agent_root.join("etc"))?;
    fs::create_dir_all(agent_root.join("tmp"))?;
    let whoami_root = images.join("whoami");
    fs::create_dir_all(whoami_root.join("bin"))?;
    fs::create_dir_all(whoami_root.join("tmp"))?;
    fs::copy(whoami, whoami_root.join("whoami"))?;
    fs::copy("/bin/busybox", whoami_root.join("bin/busybox"))
        .context("busybox-static (cargo xtask setup)")?;
    for tool in [
        "sh", "nslookup", "cat", "sleep", "ping", "wget", "md5sum", "head", "dd", "nc",
    ] {
        std::os::unix::fs::symlink("busybox", whoami_root.join("bin").join(tool))?;
    }
    Ok(Bins {
        agent_root,
        whoami_root,
    })
}

fn copy_with_libs(bin: &Path, root: &Path, name: &str) -> Result<()> {
    fs::create_dir_all(root)?;
    fs::copy(bin, root.join(name)).with_context(|| format!("copying {}", bin.display()))?;
    let out = Cmd::new("ldd").args([bin.as_os_str()]).output()?;
    for lib in out
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().context("lib path")?)?;
        fs::copy(lib, &dst).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// The demo: three nodes, whoami scaled 1 -> 2 -> 3 over nodes 1 and 2, a
/// client on node 3 (no whoami there), requests rotating over the replicas,
/// and what meshctl shows on each node. Leaves the lab up.
pub fn demo(bins: &Bins) -> Result<()> {
    up(3, bins)?;
    println!("\n== whoami replicas on nodes 1 and 2; a client on node 3");
    for (n, name) in [(1, "whoami-1"), (2, "whoami-2"), (1, "whoami-3")] {
        let _ = docker(n).args(["rm", "-f", name]).ok();
    }
    let _ = docker(3).args(["rm", "-f", "client"]).ok();
    docker(3)
        .args([
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "mesh",
            WHOAMI_IMAGE,
            "serve",
            "--tcp",
            "9",
        ])
        .output()?;
    let mut vip = String::new();
    for (i, (n, name)) in [(1, "whoami-1"), (2, "whoami-2"), (1, "whoami-3")]
        .into_iter()
        .enumerate()
    {
        docker(n)
            .args([
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                name,
                "--network",
                "mesh",
            ])
            .args([
                "--label",
                "mesh.service=whoami",
                "--label",
                "mesh.port=80/tcp,80/udp",
            ])
            .args([WHOAMI_IMAGE, "serve", "--tcp", "80", "--udp", "80"])
            .output()?;
        vip = wait_replicas(3, i + 1)?;
        println!(
            "-- scaled to {} (on node {n}): whoami is {vip} on every node",
            i + 1
        );
    }
    println!("\n== from the client on node 3: the name, then 12 requests to the VIP");
    println!(
        "{}",
        docker(3)
            .args(["exec", "client", "nslookup", "whoami"])
            .output()
            .unwrap_or_else(|e| e.to_string())
    );
    let target = format!("{vip}:80");
    let out = docker(3)
        .args([
            "exec",
            "client",
            "/whoami",
            "ask",
            "tcp",
            &target,
            "--count",
            "12",
            "--interval-ms",
            "100",
        ])
        .output()
        .unwrap_or_else(|e| e.to_string());
    println!("{out}");
    for n in 1..=3 {
        println!("== node {n}: meshctl status / services / maglev");
        for args in [
            &["status"][..],
            &["services"],
            &["maglev", &format!("{vip}:80/tcp")],
        ] {
            let mut a = vec!["exec", "mesh-agent", "/meshctl"];
            a.extend(args);
            println!(
                "{}\n",
                docker(n)
                    .args(&a)
                    .output()
                    .unwrap_or_else(|e| e.to_string())
            );
        }
    }
    println!("The lab is still up: cargo xtask lab status, cargo xtask lab exec n3 -- docker ps,");
    println!("cargo xtask lab down to remove it.");
    Ok(())
}

/// Waits until node `n`'s agent sees `count` active whoami backends; the VIP.
fn wait_replicas(n: usize, count: usize) -> Result<String> {
    let start = Instant::now();
    loop {
        let st = docker(n)
            .args(["exec", "mesh-agent", "/meshctl", "status", "--json"])
            .output()
            .unwrap_or_default();
        if let Some(vip) = whoami_vip(&st, count) {
            return Ok(vip);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("node {n} does not see {count} whoami replicas:\n{st}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The VIP of whoami in a `meshctl status --json` answer, when it has
/// `count` active backends (a small scan; no JSON library in xtask).
fn whoami_vip(status: &str, count: usize) -> Option<String> {
    let at = status.find("\"name\": \"whoami\"")?;
    let rest = &status[at..];
    let field = |name: &str| -> Option<String> {
        let i = rest.find(&format!("\"{name}\": "))? + name.len() + 4;
        let v: String = rest[i..]
            .chars()
            .take_while(|c| *c != ',' && *c != '\n')
            .collect();
        Some(v.trim().trim_matches('"').to_string())
    };
    (field("active")?.parse::<usize>().ok()? == count)
        .then(|| field("vip"))
        .flatten()
}

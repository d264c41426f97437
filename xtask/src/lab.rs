//! The lab: N nodes as network namespaces on an underlay, each with its own
//! Docker engine and a mesh agent started as a user would start it (the
//! container `mesh_lab::agent` defines: host network and PID, bpffs and the
//! Docker socket mounted, the cluster key, --join). The same library builds
//! the multi-host tests.
//!
//! The underlay is routed by default (`mesh_lab::underlay::Layout`): node N
//! on 192.168.10S.N/24 for subnet S = (N - 1) % 3 + 1, routers in
//! `meshlab-u` and `meshlab-u-r2` (subnet 3, behind a 1400-byte link, so
//! the agents run with `--mtu 1350`); `--flat` puts every node on one
//! bridge, 192.168.100.N. Everything lives in namespaces and directories
//! this lab creates: those, `meshlab-nN` (node N), `meshlab-c` (a host
//! outside the cluster, 192.168.100.200: the routing mesh's client, on a
//! subnet of its own when routed), `/run/meshlab/nN`, `/var/lib/meshlab/nN`,
//! `/sys/fs/bpf/meshlab-nN`.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_lab::{
    agent::{self, AgentSpec},
    cmd::{Cmd, target_dir},
    demo,
    engine::{Engine, EngineSpec},
    image::{self, WHOAMI_IMAGE},
    underlay::{self, Layout, Underlay},
};

const UNDERLAY_NS: &str = "meshlab-u";
/// A host on the underlay that is not a node.
const OUTSIDE_NS: &str = "meshlab-c";
const OUTSIDE_HOST: u8 = 200;
const PREFIX: &str = "192.168.100";
const RUN: &str = "/run/meshlab";
const LIB: &str = "/var/lib/meshlab";

/// Where the lab keeps which layout it was brought up with.
fn layout_file() -> PathBuf {
    PathBuf::from(RUN).join("layout")
}

/// The layout of the lab that is up (routed when none is).
fn layout() -> Layout {
    match fs::read_to_string(layout_file()).as_deref() {
        Ok("flat") => Layout::Flat,
        _ => Layout::Routed,
    }
}

fn node_ip(n: usize) -> String {
    underlay::node_addr(PREFIX, layout(), n as u8)
}

fn spec(n: usize) -> EngineSpec {
    EngineSpec {
        ns: format!("meshlab-n{n}"),
        dir: PathBuf::from(RUN).join(format!("n{n}")),
        data_root: PathBuf::from(LIB).join(format!("n{n}")),
        // Containers' embedded resolver forwards to the agent's DNS on the
        // node's own address.
        dns: Some(node_ip(n)),
    }
}

/// Node N's engine, as an earlier `lab up` left it.
fn engine(n: usize) -> Engine {
    Engine::adopt(spec(n))
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

/// Brings the lab up with `count` nodes; a lab already up with that many
/// healthy nodes is left as it is; anything else (a crashed run) is torn
/// down first.
pub fn up(count: usize, layout: Layout, images: &Images) -> Result<()> {
    if !(1..=20).contains(&count) {
        bail!("--nodes must be 1 to 20");
    }
    if nodes() == (1..=count).collect::<Vec<_>>()
        && self::layout() == layout
        && (1..=count).all(|n| {
            let e = engine(n);
            e.up() && agent::running(&e)
        })
    {
        println!("lab: already up with {count} nodes");
        return Ok(());
    }
    down()?;
    fs::create_dir_all(RUN)?;
    fs::write(
        layout_file(),
        if layout == Layout::Flat {
            "flat"
        } else {
            "routed"
        },
    )?;
    let underlay = match layout {
        Layout::Flat => Underlay::new(UNDERLAY_NS, PREFIX)?,
        Layout::Routed => Underlay::routed(UNDERLAY_NS, PREFIX)?,
    }
    .keep();
    Cmd::new("ip").args(["netns", "add", OUTSIDE_NS]).run()?;
    underlay.attach_outside(OUTSIDE_NS, OUTSIDE_HOST)?;
    let key = PathBuf::from(RUN).join("cluster.key");
    fs::write(&key, format!("{}\n", mesh_lab::random_key()?))?;
    let join: Vec<String> = (1..=count.min(3))
        .map(|n| format!("{}:7946", node_ip(n)))
        .collect();
    let mut engines = Vec::new();
    for n in 1..=count {
        let e = Engine::start(spec(n))
            .with_context(|| format!("node {n}"))?
            .keep();
        underlay.attach(&e, n as u8)?;
        e.load(&images.agent.tarball)?;
        e.import(&images.whoami, WHOAMI_IMAGE, Some("/whoami"))?;
        println!(
            "lab: node {n} up ({}, engine {})",
            node_ip(n),
            e.socket.display()
        );
        engines.push(e);
    }
    for (i, e) in engines.iter().enumerate() {
        agent::start(e, &agent_spec(i + 1, &key, &join))?;
    }
    for (i, e) in engines.iter().enumerate() {
        wait_agent(i + 1, e)?;
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

fn agent_spec(n: usize, key: &Path, join: &[String]) -> AgentSpec {
    let mut flags: Vec<String> = [
        "--underlay-iface",
        underlay::IFACE,
        "--cluster-key-file",
        agent::KEY_PATH,
        "--node-name",
        &format!("n{n}"),
        "--dns-listen",
        &format!("{}:53", node_ip(n)),
        "--metrics-addr",
        &format!("{}:9464", node_ip(n)),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if layout() == Layout::Routed {
        // The tunnel crosses the 1400-byte link between the routers.
        flags.push("--mtu".into());
        flags.push(underlay::ROUTED_TUNNEL_MTU.to_string());
    }
    for j in join {
        flags.push("--join".into());
        flags.push(j.clone());
    }
    AgentSpec {
        bpffs_dir: format!("/sys/fs/bpf/meshlab-n{n}"),
        state_dir: spec(n).dir.join("state"),
        key_file: Some(key.to_owned()),
        flags,
    }
}

fn wait_agent(n: usize, e: &Engine) -> Result<()> {
    let start = Instant::now();
    loop {
        let st = agent::meshctl(e, &["status", "--json"]);
        if st
            .as_deref()
            .is_ok_and(|s| s.contains("\"connected\": true"))
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(90) {
            bail!(
                "node {n}: the agent did not come up:\n{}",
                agent::logs(e, 30)
            );
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// Removes everything the lab made; fine to run when nothing is there.
pub fn down() -> Result<()> {
    for n in nodes() {
        engine(n).stop();
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/meshlab-n{n}"));
    }
    for n in 1..=20 {
        let ns = format!("meshlab-n{n}");
        if Path::new("/var/run/netns").join(&ns).exists() {
            let _ = Cmd::new("ip").args(["netns", "del", &ns]).ok();
        }
    }
    for ns in [UNDERLAY_NS, &format!("{UNDERLAY_NS}-r2"), OUTSIDE_NS] {
        if Path::new("/var/run/netns").join(ns).exists() {
            let _ = Cmd::new("ip").args(["netns", "del", ns]).ok();
        }
    }
    // dockerd leaves namespace files bind-mounted in its exec root (nsfs):
    // a directory holding one cannot be removed, and a leftover node
    // directory made `lab status` report engines that were gone.
    mesh_lab::engine::unmount_under(&[Path::new(RUN), Path::new(LIB)]);
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
    let e = engine(n);
    if !Path::new("/var/run/netns").join(&e.spec.ns).exists() {
        bail!("node {node} does not exist: cargo xtask lab up");
    }
    let Some((program, rest)) = cmd.split_first() else {
        bail!("nothing to run: lab exec n1 -- CMD")
    };
    Cmd::new("nsenter")
        .args([format!("--net=/var/run/netns/{}", e.spec.ns)])
        .args(["--", program])
        .args(rest)
        .env("DOCKER_HOST", format!("unix://{}", e.socket.display()))
        .run()
}

pub fn status() -> Result<()> {
    let ns = nodes();
    if ns.is_empty() {
        println!("no lab (cargo xtask lab up, or cargo xtask lab demo)");
        return Ok(());
    }
    for n in ns {
        println!("== node n{n} ({})", node_ip(n));
        let e = engine(n);
        if !e.up() {
            println!("engine: DOWN");
            continue;
        }
        println!(
            "{}",
            e.docker()
                .args([
                    "ps",
                    "--format",
                    "table {{.Names}}\t{{.Status}}\t{{.Labels}}"
                ])
                .output()
                .unwrap_or_default()
        );
        match agent::meshctl(&e, &["status"]) {
            Ok(s) => println!("{s}"),
            Err(e) => println!("agent: not answering ({e})"),
        }
    }
    Ok(())
}

/// The images the lab loads: the release agent image, the whoami tree.
pub struct Images {
    pub agent: image::Release,
    pub whoami: PathBuf,
}

/// Builds the release agent image and the whoami image tree.
pub fn build(whoami: &Path) -> Result<Images> {
    let out = target_dir().join("lab-images");
    Ok(Images {
        agent: image::release()?,
        whoami: image::whoami_tree(whoami, &out)?,
    })
}

/// `docker` against node N's engine.
fn docker(n: usize) -> Cmd {
    engine(n).docker()
}

/// The namespace lab as demo hosts.
struct LabHosts;

impl demo::Hosts for LabHosts {
    fn docker(&self, n: usize, args: &[&str]) -> Result<String> {
        docker(n).args(args).output()
    }
    fn node_ip(&self, n: usize) -> String {
        node_ip(n)
    }
    fn node_name(&self, n: usize) -> String {
        format!("n{n}")
    }
    fn curl_outside(&self, url: &str) -> Result<String> {
        Cmd::new("ip")
            .args([
                "netns",
                "exec",
                OUTSIDE_NS,
                "curl",
                "-s",
                "--max-time",
                "3",
                url,
            ])
            .output()
    }
    fn outside_ip(&self) -> String {
        format!("{PREFIX}.{OUTSIDE_HOST}")
    }
    fn curl_on(&self, n: usize, url: &str) -> Result<String> {
        Cmd::new("ip")
            .args(["netns", "exec", &engine(n).spec.ns])
            .args(["curl", "-s", "--max-time", "3", url])
            .output()
    }
}

/// The demo (`mesh_lab::demo`) on a fresh three-node lab. Leaves the lab up.
pub fn demo(layout: Layout, images: &Images) -> Result<()> {
    up(3, layout, images)?;
    demo::run(&LabHosts)?.check(&demo::Hosts::outside_ip(&LabHosts))?;
    println!("The lab is still up: cargo xtask lab status, cargo xtask lab exec n3 -- docker ps,");
    println!("cargo xtask lab down to remove it.");
    Ok(())
}

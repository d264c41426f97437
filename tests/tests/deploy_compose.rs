//! The agent deployed with `deploy/compose.yaml`, as the README says, on a
//! Docker engine in a namespace (needs root; Debian's docker-compose): it
//! comes up, comes back by itself after a dockerd restart (and so do the
//! replicas, reachable within 5 s), and an image upgrade under a request
//! loop loses no request. Every loop is bounded.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_lab as lab;
use mesh_tests::dockerlab::{Agent, Engine};

const WAIT: Duration = Duration::from_secs(60);

/// `docker-compose ARGS` in `dir` against `engine`, with the paths of this
/// engine and `image`.
fn compose(engine: &Engine, dir: &Path, state: &Path, image: &str, args: &[&str]) {
    let out = Command::new("docker-compose")
        .current_dir(dir)
        .args(args)
        .env("DOCKER_HOST", format!("unix://{}", engine.socket.display()))
        .env("DOCKER_SOCKET", &engine.socket)
        .env("MESH_IMAGE", image)
        .env("MESH_STATE", state)
        .env("MESH_RUN", state.join("run"))
        .env("MESH_CONFIG", dir.join("conf"))
        .output()
        .expect("docker-compose runs (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "docker-compose {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ok_one(engine: &Engine, target: &str) -> bool {
    let (names, errors) = engine.ask("tcp", target, 1, 0);
    errors.is_empty() && names.values().sum::<usize>() == 1
}

#[test]
fn compose_deploys_survives_a_dockerd_restart_and_upgrades_without_loss() {
    let mut engine = Engine::start();
    engine.import_whoami();
    engine.import_agent();
    // The release image: small, labelled, both binaries answer.
    let image = lab::image::AGENT_IMAGE;
    let size: f64 = engine
        .docker_ok(&["image", "inspect", "-f", "{{.Size}}", image])
        .parse()
        .expect("size");
    let version = engine.docker_ok(&["run", "--rm", image, "--version"]);
    let help = engine.docker_ok(&["run", "--rm", "--entrypoint", "/meshctl", image, "--help"]);
    let revision = engine.docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{index .Config.Labels \"org.opencontainers.image.revision\"}}",
        image,
    ]);
    println!(
        "{image}: {:.1} MB, `--version`: {version}, revision label {revision}",
        size / 1e6
    );
    assert!(size < 40e6, "under 40 MB: {size}");
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    assert!(help.contains("Usage"), "{help}");
    assert!(!revision.is_empty());
    let dir = engine.dir.join("deploy");
    std::fs::create_dir_all(dir.join("conf")).expect("dir");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(root.join("deploy/compose.yaml"), dir.join("compose.yaml")).expect("compose");
    let bpffs = PathBuf::from("/sys/fs/bpf").join(engine.dir.file_name().expect("tag"));
    std::fs::write(
        dir.join("mesh.env"),
        format!(
            "MESH_BPFFS_DIR={}\nMESH_METRICS_ADDR=127.0.0.1:9464\n",
            bpffs.display()
        ),
    )
    .expect("env");
    let state = engine.dir.join("state");
    std::fs::create_dir_all(state.join("run")).expect("state");
    compose(
        &engine,
        &dir,
        &state,
        lab::image::AGENT_IMAGE,
        &["up", "-d"],
    );
    let spec = lab::agent::AgentSpec {
        bpffs_dir: bpffs.display().to_string(),
        state_dir: state.clone(),
        key_file: None,
        flags: vec![],
    };
    let agent = Agent::adopt_container(&engine, spec);
    agent.wait_for("up by compose", WAIT, |s| s.docker.connected);
    let restart_policy = engine.docker_ok(&[
        "inspect",
        "-f",
        "{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.NetworkMode}}",
        lab::agent::NAME,
    ]);
    assert_eq!(restart_policy, "always host");

    let labels = ["mesh.service=whoami", "mesh.port=80/tcp"];
    for n in ["w1", "w2"] {
        engine.run_whoami(n, &labels, &["--restart", "always"]);
    }
    engine.run_whoami("client", &[], &["--restart", "always"]);
    let vip = agent
        .wait_for("2 replicas", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
        })
        .services
        .into_iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip)
        .expect("whoami");
    let target = format!("{vip}:80");
    let (names, errors) = engine.ask("tcp", &target, 50, 0);
    assert!(
        errors.is_empty() && names.len() == 2,
        "{names:?} {errors:?}"
    );

    // dockerd restarts: it stops every container and starts those with a
    // restart policy again, the agent among them, with new veths.
    let before = engine.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "w1"]);
    engine.restart_daemon();
    let up = Instant::now();
    let mut first = None;
    while up.elapsed() < Duration::from_secs(30) {
        if ok_one(&engine, &target) {
            first = Some(up.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = engine.docker_ok(&["inspect", "-f", "{{.State.Pid}}", "w1"]);
    println!(
        "dockerd restarted (w1 pid {before} -> {after}): the VIP answered again {:?} after the engine was back",
        first
    );
    let first = first.expect("the VIP answers again within 30 s");
    // The engine restarts the agent and the containers it serves; the VIP
    // answers once both are up. 10 s holds on a machine half as fast.
    assert!(first <= Duration::from_secs(10), "within 10 s: {first:?}");
    agent.wait_for("agent back", WAIT, |s| {
        s.docker.connected
            && s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
    });
    let (names, errors) = engine.ask("tcp", &target, 100, 0);
    println!(
        "after the dockerd restart: 100 requests {names:?}, {} failed",
        errors.len()
    );
    assert!(errors.is_empty(), "100% after the restart: {errors:?}");
    assert_eq!(names.len(), 2, "both replicas: {names:?}");

    // Upgrade: a new image, `docker-compose up -d` recreates the agent
    // while requests run; none fails (the data plane stays pinned).
    engine.docker_ok(&["tag", lab::image::AGENT_IMAGE, "mesh-agent:upgrade"]);
    let client = engine.ask_in_background("tcp", &target, 500, 10, 2000);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    compose(&engine, &dir, &state, "mesh-agent:upgrade", &["up", "-d"]);
    let recreated = t.elapsed();
    let out = client.wait_with_output().expect("ask finishes");
    let lines = String::from_utf8_lossy(&out.stdout);
    let field = |l: &str| l.split(' ').nth(1).map(str::to_owned);
    let ok = lines
        .lines()
        .filter(|l| !l.starts_with("total") && field(l).as_deref() == Some("ok"))
        .count();
    let failed: Vec<&str> = lines
        .lines()
        .filter(|l| !l.starts_with("total") && field(l).as_deref() == Some("err"))
        .collect();
    let image = engine.docker_ok(&["inspect", "-f", "{{.Config.Image}}", lab::agent::NAME]);
    println!(
        "upgrade to {image} (recreated in {recreated:?}) under load: {ok} requests answered, {} failed",
        failed.len()
    );
    assert_eq!(image, "mesh-agent:upgrade");
    assert!(failed.is_empty(), "no request lost: {failed:?}");
    assert_eq!(ok, 500, "every request of the loop answered");
    agent.wait_for("upgraded agent serves", WAIT, |s| {
        s.docker.connected
            && s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
    });
    compose(&engine, &dir, &state, "mesh-agent:upgrade", &["down"]);
}

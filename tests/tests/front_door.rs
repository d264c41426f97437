//! The HTTP front door of deploy/front-door (two Docker hosts, agents run
//! as the lab and the README run them; needs root): Debian's nginx in a
//! container on `mesh` with deploy/front-door/nginx.conf and a published
//! port, two sites by host name, called from a host outside the cluster
//! through either host's published port while a replica is added on the
//! other host and the first one removed, with no reload of nginx.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_lab::whoami::HTTP_PORT;
use mesh_tests::{
    dockerlab::{Agent, Hosts},
    netns::Netns,
};

const WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 8088;

/// `count` requests for `host` to `addr`'s published port from `outside`:
/// answers by replica name (whoami's HTTP answer: `NAME CLIENT`), and the
/// failures.
fn calls(
    outside: &Netns,
    addr: &str,
    host: &str,
    count: usize,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut by = BTreeMap::new();
    let mut failed = Vec::new();
    for _ in 0..count {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &outside.name,
                "curl",
                "-s",
                "--max-time",
                "3",
            ])
            .args(["-H", &format!("Host: {host}")])
            .arg(format!("http://{addr}:{PORT}/"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match text.split_whitespace().next() {
            Some(name) if out.status.success() && name.starts_with('w') => {
                *by.entry(name.to_string()).or_default() += 1
            }
            _ => failed.push(format!("{:?} {text:?}", out.status.code())),
        }
    }
    (by, failed)
}

fn active(agent: &Agent, service: &str, n: usize) {
    agent.wait_for(&format!("{n} replicas of {service}"), WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == service && x.active == n)
    });
}

#[test]
fn docker_nginx_front_door_routes_host_names_to_services_as_replicas_come_and_go() {
    let hosts = Hosts::start(2);
    let (underlay, engines, agents) = (&hosts.underlay, &hosts.engines, &hosts.agents);
    let (e1, e2) = (&engines[0], &engines[1]);
    let port = format!("mesh.port={HTTP_PORT}/tcp");
    e1.run_whoami("wa1", &["mesh.service=app-a", &port], &[]);
    e2.run_whoami("wb1", &["mesh.service=app-b", &port], &[]);

    // nginx on node 1, the example's configuration as it is in deploy/.
    e1.import_nginx();
    let conf = mesh_lab::cmd::root().join("deploy/front-door/nginx.conf");
    let gateway = agents[0]
        .status()
        .expect("status")
        .node
        .subnet
        .replace(".0/24", ".1");
    e1.docker_ok(&[
        "run",
        "-d",
        "--name",
        "front",
        "--network",
        "mesh",
        "--label",
        "mesh.service=front",
        "--label",
        "mesh.port=80/tcp",
        "--label",
        &format!("mesh.publish={PORT}:80/tcp"),
        "--dns",
        &gateway,
        "-v",
        &format!("{}:/etc/nginx/nginx.conf:ro", conf.display()),
        "mesh-nginx:lab",
        "-c",
        "/etc/nginx/nginx.conf",
    ]);
    for a in agents {
        active(a, "app-a", 1);
        active(a, "app-b", 1);
        active(a, "front", 1);
    }
    let outside = underlay.outside(7);
    let (n1, n2) = (underlay.addr(1), underlay.addr(2));
    // The published port answers on both hosts once both have it.
    let start = Instant::now();
    while calls(&outside, &n2, "a.example", 1).0.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the front door answers on node 2: {}",
            e1.docker_ok(&["logs", "front"])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for (addr, host, want) in [
        (&n1, "a.example", "wa1"),
        (&n1, "b.example", "wb1"),
        (&n2, "a.example", "wa1"),
        (&n2, "b.example", "wb1"),
    ] {
        let (by, failed) = calls(&outside, addr, host, 5);
        println!("outside -> {addr}:{PORT} Host: {host}: {by:?}, failed {failed:?}");
        assert_eq!(
            by.get(want),
            Some(&5),
            "{host} through {addr}: {by:?} {failed:?}"
        );
    }
    let (by, _) = calls(&outside, &n1, "c.example", 1);
    assert!(by.is_empty(), "an unknown host name is no site");

    // A replica of app-a on node 2, then the first one gone: nginx is
    // neither told nor reloaded.
    e2.run_whoami("wa2", &["mesh.service=app-a", &port], &[]);
    active(&agents[0], "app-a", 2);
    let (by, failed) = calls(&outside, &n2, "a.example", 20);
    println!("app-a scaled to 2 (node 2): {by:?}, failed {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by.len(), 2, "both replicas answer: {by:?}");
    e1.docker_ok(&["rm", "-f", "wa1"]);
    active(&agents[0], "app-a", 1);
    let (by, failed) = calls(&outside, &n1, "a.example", 10);
    println!("wa1 removed: {by:?}, failed {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by.get("wa2"), Some(&10), "{by:?}");
    let logs = e1.docker_ok(&["logs", "front"]);
    assert!(!logs.contains("reload"), "never reloaded: {logs}");
}

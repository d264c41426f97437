//! A crashed agent is not a dead host (two Docker hosts, agents run as the
//! lab and the README run them; needs root). Node 1's agent is killed and
//! kept down: gossip loses node 1, but its data plane still answers the
//! ICMP probe through the tunnel, so node 2 keeps node 1's replica in its
//! maps, flags node 1 as "agent down", and a request loop through the VIP
//! keeps reaching both replicas. When node 1's host itself is cut off, its
//! replica leaves node 2's maps. Every loop is bounded.

use std::time::{Duration, Instant};

use mesh_tests::dockerlab::{Agent, Hosts};

const WAIT: Duration = Duration::from_secs(60);

fn active(agent: &Agent) -> usize {
    agent
        .status()
        .and_then(|s| {
            s.services
                .iter()
                .find(|x| x.name == "whoami")
                .map(|x| x.active)
        })
        .unwrap_or(0)
}

#[test]
fn docker_a_crashed_agent_keeps_its_hosts_backends_and_a_dead_host_does_not() {
    let hosts = Hosts::start(2);
    let (underlay, engines, agents) = (&hosts.underlay, &hosts.engines, &hosts.agents);
    let (e1, e2) = (&engines[0], &engines[1]);
    e1.run_whoami("w1", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    e2.run_whoami("w2", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    e2.run_whoami("client", &[], &[]);
    let vip = agents[1]
        .wait_for("two replicas on n2", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
        })
        .services
        .iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip.clone())
        .expect("whoami");

    // Node 1's agent dies and stays down (no restart policy).
    e1.docker_ok(&["update", "--restart", "no", mesh_lab::agent::NAME]);
    e1.docker_ok(&["kill", "-s", "KILL", mesh_lab::agent::NAME]);
    let killed = Instant::now();
    let loop_ = e2.ask_in_background("tcp", &format!("{vip}:80"), 120, 100, 2000);
    let mut flagged = None;
    while killed.elapsed() < Duration::from_secs(14) {
        let st = agents[1].status().expect("status");
        let n = st
            .services
            .iter()
            .find(|x| x.name == "whoami")
            .map_or(0, |x| x.active);
        assert_eq!(
            n,
            2,
            "n1's replica stays in n2's maps {:?} after the kill",
            killed.elapsed()
        );
        if flagged.is_none() && st.node.agent_down.iter().any(|p| p == "n1") {
            flagged = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let flagged = flagged.expect("n1 shown as agent down");
    let nodes = e2.docker(&["exec", mesh_lab::agent::NAME, "/meshctl", "nodes"]);
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    println!("n2$ meshctl nodes ({flagged:?} after the kill):\n{nodes}");
    assert!(nodes.contains("agent down"), "{nodes}");
    let gauge = e2.docker(&[
        "exec",
        mesh_lab::agent::NAME,
        "/meshctl",
        "status",
        "--json",
    ]);
    assert!(gauge.status.success());
    let metrics = e2.ns.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("/metrics");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("ask");
        let mut out = String::new();
        s.take(4 << 20).read_to_string(&mut out).expect("read");
        out
    });
    let line = metrics
        .lines()
        .find(|l| l.starts_with("mesh_peers_agent_down "))
        .unwrap_or_default()
        .to_owned();
    println!("n2 /metrics: {line}");
    assert_eq!(line, "mesh_peers_agent_down 1");
    let out = loop_.wait_with_output().expect("loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let answered = |name: &str| {
        text.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(name))
            .count()
    };
    let failed = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("err"))
        .count();
    println!(
        "the loop on n2 while n1's agent was down: w1 {}, w2 {}, failed {failed}",
        answered("w1"),
        answered("w2")
    );
    assert_eq!(failed, 0);
    assert!(answered("w1") > 20, "n1's replica kept its share");

    // The agent comes back; then the host itself goes.
    e1.docker_ok(&["start", mesh_lab::agent::NAME]);
    agents[1].wait_for("n1 alive again", WAIT, |s| {
        s.node.peers.len() == 1 && s.node.agent_down.is_empty()
    });
    let cut = Instant::now();
    underlay.set_link(1, false);
    while active(&agents[1]) != 1 {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "n1's replica leaves when its host is cut off"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "n1 cut off: its replica left n2's maps after {:?}",
        cut.elapsed()
    );
    underlay.set_link(1, true);
}

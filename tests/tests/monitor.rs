//! `meshctl monitor` (two Docker hosts, agents run as the lab and the
//! README run them; needs root): while `meshctl monitor --drops` runs on
//! node 1, a host outside the cluster sends to a container's address there
//! (the network steered toward it) and a container forges its source; the
//! monitor shows both drops with their reasons and addresses. Then a
//! flood of forged packets: what the monitor shows stays within the
//! programs' rate limit, and what is over it is said to be lost. Without a
//! listener the programs write nothing.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{
    dockerlab::{Engine, Hosts},
    netns, pkt, raw,
};

const WAIT: Duration = Duration::from_secs(60);

/// `meshctl monitor ARGS --json` on `e` for `seconds`, started now: its
/// lines when it ends.
fn monitor(e: &Engine, args: &[&str], seconds: u32) -> std::thread::JoinHandle<Vec<String>> {
    let mut cmd = Command::new("docker");
    cmd.arg("-H")
        .arg(format!("unix://{}", e.socket.display()))
        .args([
            "exec",
            mesh_lab::agent::NAME,
            "/meshctl",
            "--json",
            "monitor",
        ])
        .args(args)
        .args(["--seconds", &seconds.to_string()])
        .stdout(Stdio::piped());
    let child = cmd.spawn().expect("meshctl monitor");
    std::thread::spawn(move || {
        let out = child.wait_with_output().expect("meshctl monitor ends");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
}

fn events(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn docker_meshctl_monitor_shows_drops_with_their_reasons_and_stays_bounded() {
    let hosts = Hosts::start(2);
    let (underlay, engines, agents) = (&hosts.underlay, &hosts.engines, &hosts.agents);
    let e1 = &engines[0];
    e1.run_whoami("w1", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    agents[0].wait_for("w1", WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active == 1)
    });
    let w1: Ipv4Addr = e1
        .docker_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.mesh.IPAddress}}",
            "w1",
        ])
        .trim()
        .parse()
        .expect("w1's address");
    let pid: u32 = e1
        .docker_ok(&["inspect", "-f", "{{.State.Pid}}", "w1"])
        .trim()
        .parse()
        .expect("w1's pid");
    let outside = underlay.outside(9);
    underlay.steer("10.42.0.0/16", 1);

    // Both kinds of drop while a monitor listens.
    let m = monitor(e1, &["--drops"], 6);
    std::thread::sleep(Duration::from_secs(2));
    outside.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
        for _ in 0..3 {
            let _ = s.send_to(b"injected", (w1, 53));
        }
    });
    let forged_src = Ipv4Addr::new(10, 42, 99, 99);
    let forged = pkt::udp4(
        (forged_src, 4000),
        (Ipv4Addr::new(10, 43, 0, 1), 53),
        b"forged",
    );
    let sent = netns::run_in_pid(pid, || {
        raw::send_ipv4(&forged[14..], Ipv4Addr::new(10, 43, 0, 1), 3)
    });
    assert_eq!(sent, 3);
    let lines = m.join().expect("monitor");
    let ev = events(&lines);
    for e in &ev {
        println!("n1$ meshctl monitor --drops: {e}");
    }
    let has = |reason: &str, src: &str, dst: &str| {
        ev.iter().any(|e| {
            e["kind"] == "drop"
                && e["reason"] == reason
                && e["src"].as_str().is_some_and(|s| s.starts_with(src))
                && e["dst"].as_str().is_some_and(|d| d.starts_with(dst))
        })
    };
    let outside_ip = underlay.outside_addr(9);
    assert!(
        has("tunnel_unmarked", &outside_ip, &w1.to_string()),
        "the outsider's datagrams to {w1}: {lines:?}"
    );
    assert!(
        has("tc_spoofed", &forged_src.to_string(), "10.43.0.1"),
        "the container's forged source: {lines:?}"
    );

    // A flood of forged packets: bounded by the programs' rate, the rest
    // said to be lost.
    let m = monitor(e1, &["--drops"], 5);
    std::thread::sleep(Duration::from_secs(2));
    let flood = netns::run_in_pid(pid, || {
        raw::send_ipv4(&forged[14..], Ipv4Addr::new(10, 43, 0, 1), 20_000)
    });
    let lines = m.join().expect("monitor");
    let ev = events(&lines);
    let drops = ev.iter().filter(|e| e["kind"] == "drop").count();
    let lost: u64 = ev
        .iter()
        .filter(|e| e["kind"] == "lost")
        .filter_map(|e| e["count"].as_u64())
        .sum();
    println!(
        "a flood of {flood} forged packets: the monitor showed {drops} drops, {lost} events said lost"
    );
    // At most 2,000 a second on each of this machine's CPUs, for the 3 s
    // the flood and the monitor overlap at most.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(drops <= 2000 * cpus * 4, "bounded: {drops}");
    assert!(
        drops + lost as usize >= flood.min(2000),
        "{drops} + {lost} of {flood}"
    );

    // Nobody listens: nothing is written (what the programs wrote would
    // wait in the ring for the next monitor).
    std::thread::sleep(Duration::from_secs(1));
    netns::run_in_pid(pid, || {
        raw::send_ipv4(&forged[14..], Ipv4Addr::new(10, 43, 0, 1), 1000)
    });
    let m = monitor(e1, &["--drops"], 2);
    let lines = m.join().expect("monitor");
    let ev = events(&lines);
    assert!(
        ev.iter()
            .all(|e| e["kind"] != "drop" || e["src"] != format!("{forged_src}:4000")),
        "nothing from the time nobody listened: {lines:?}"
    );
}

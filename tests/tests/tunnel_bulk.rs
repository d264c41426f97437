//! Bulk TCP through the routing mesh across the tunnel, on the Docker lab
//! (two hosts; node NICs merge what they receive, as real NICs do; needs
//! root). A host outside the cluster downloads from a published port of
//! node 2 whose only replica is on node 1: the replica's answers come back
//! through the tunnel, GRO merges them on node 2, mesh hands them to
//! `mesh-vxlan` and sends them on to the client. Then an upload the same
//! way to a sink. Both arrive whole and unchanged. Every wait is bounded.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_lab::image::WHOAMI_IMAGE;
use mesh_tests::dockerlab::Hosts;

const WAIT: Duration = Duration::from_secs(60);
const BYTES: u64 = 64 << 20;

/// What `whoami source` and `blast` send: byte `i` of every 64 KiB.
fn pattern(i: u64) -> u8 {
    ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8
}

#[test]
fn docker_bulk_through_another_nodes_published_port_both_ways() {
    let hosts = Hosts::start(2);
    let (underlay, engines, agents) = (&hosts.underlay, &hosts.engines, &hosts.agents);
    let (e1, e2) = (&engines[0], &engines[1]);
    let bytes = BYTES.to_string();
    for (name, service, publish, args) in [
        ("src", "src", "8082:5002/tcp", ["source", "5002", &bytes]),
        ("dst", "dst", "8083:5003/tcp", ["sink", "5003", ""]),
    ] {
        let mut run = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            name.into(),
            "--network".into(),
            "mesh".into(),
        ];
        for l in [
            format!("mesh.service={service}"),
            format!("mesh.port={}", &publish[5..]),
            format!("mesh.publish={publish}"),
        ] {
            run.push("--label".into());
            run.push(l);
        }
        run.push(WHOAMI_IMAGE.into());
        run.extend(args.iter().filter(|a| !a.is_empty()).map(|a| a.to_string()));
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        e1.docker_ok(&run);
    }
    agents[1].wait_for("both services published", WAIT, |s| {
        ["src", "dst"].iter().all(|n| {
            s.services
                .iter()
                .any(|x| x.name == *n && x.active == 1 && !x.published.is_empty())
        })
    });
    let before = e2.mesh_counters();
    let handoff = || {
        agents[1]
            .status()
            .and_then(|s| s.node.handoff)
            .unwrap_or_default()
    };
    let handoff_before = handoff();
    let outside = underlay.outside(100);
    let node2 = underlay.addr(2);
    // The download: every byte the pattern's.
    let to: SocketAddr = format!("{node2}:8082").parse().expect("address");
    let start = Instant::now();
    let (n, wrong) = outside.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (mut n, mut wrong) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            for (i, b) in buf[..k].iter().enumerate() {
                if *b != pattern((n + i as u64) % (1 << 16)) {
                    wrong += 1;
                }
            }
            n += k as u64;
        }
        (n, wrong)
    });
    let down = start.elapsed().as_secs_f64();
    let count = |m: &std::collections::BTreeMap<String, u64>, c: &str| {
        m.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0)
    };
    let after = e2.mesh_counters();
    let delta = |c: &str| count(&after, c);
    let handed = delta("vxlan_handoff");
    // The agent's status reads mesh-vxlan's own counters every 2 s: one
    // taken after the last handoff (bounded wait).
    let settle = Instant::now();
    let mut h = handoff();
    while h.handed - handoff_before.handed < handed && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        h = handoff();
    }
    let took = |f: fn(&mesh_agent::status::Handoff) -> u64| f(&h) - f(&handoff_before);
    println!(
        "download of {} MiB through node 2's published port in {down:.1} s, {wrong} bytes wrong; node 2: {handed} merged packets handed to mesh-vxlan, {} taken in by it ({} dropped, {} in error), {} back out of it, {} replies sent on",
        n >> 20,
        took(|h| h.device_rx),
        took(|h| h.device_dropped),
        took(|h| h.device_errors),
        took(|h| h.back),
        delta("ingress_reply"),
    );
    assert_eq!(n, BYTES, "every byte");
    assert_eq!(wrong, 0, "unchanged");
    // Every merged packet reached the device and none was dropped there;
    // its GRO cell may merge two consecutive ones again, so as many or
    // fewer come back out, and each went on to the client.
    assert!(handed > 0, "merged replies were handed to mesh-vxlan");
    assert_eq!(
        h.handed - handoff_before.handed,
        handed,
        "the agent's status counts the handoffs"
    );
    // The device also counts VXLAN it took without a hand-off, which its
    // program drops (`unmarked`: a peer's VXLAN mesh refused).
    assert_eq!(
        took(|h| h.device_rx) - took(|h| h.unmarked),
        handed,
        "mesh-vxlan took every one in"
    );
    assert_eq!(took(|h| h.device_dropped) + took(|h| h.device_errors), 0);
    let back = took(|h| h.back);
    assert!(back > 0 && back <= handed, "{back} back out of mesh-vxlan");
    // The upload: the sink says what it got.
    let out = outside.run(|| {
        std::process::Command::new(mesh_tests::dockerlab::whoami_bin())
            .args(["blast", &format!("{node2}:8083"), &bytes])
            .output()
            .expect("whoami blast")
    });
    let sent = String::from_utf8_lossy(&out.stdout).into_owned();
    let got = e1.docker_ok(&["logs", "dst"]);
    println!("upload: {}; the sink: {}", sent.trim(), got.trim());
    assert!(sent.contains(&format!("sent {BYTES} bytes")), "{sent}");
    let sum = |s: &str| s.split("checksum ").nth(1).map(|c| c.trim().to_string());
    assert!(got.contains(&format!("received {BYTES} bytes")), "{got}");
    assert_eq!(
        sum(&sent),
        sum(got.lines().last().unwrap_or("")),
        "unchanged"
    );
}

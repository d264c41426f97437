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
    // mesh-vxlan hands a packet on from its own NAPI poll, after mesh counted
    // the handoff: the last few may still be on their way (bounded wait).
    let settle = Instant::now();
    let mut after = e2.mesh_counters();
    while count(&after, "vxlan_device_in") < count(&after, "vxlan_handoff")
        && settle.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
        after = e2.mesh_counters();
    }
    let delta = |c: &str| count(&after, c);
    println!(
        "download of {} MiB through node 2's published port in {down:.1} s, {wrong} bytes wrong; node 2: {} merged packets handed to mesh-vxlan, {} out of it, {} replies sent on",
        n >> 20,
        delta("vxlan_handoff"),
        delta("vxlan_device_in"),
        delta("ingress_reply"),
    );
    assert_eq!(n, BYTES, "every byte");
    assert_eq!(wrong, 0, "unchanged");
    // The kernel's device may drop one now and then (its GRO cell's queue
    // is bounded; TCP sends it again): nearly all come out of it.
    let (handed, out) = (delta("vxlan_handoff"), delta("vxlan_device_in"));
    assert!(
        handed > 0 && out <= handed && out * 100 >= handed * 99,
        "merged replies went through mesh-vxlan: {handed} handed over, {out} out"
    );
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

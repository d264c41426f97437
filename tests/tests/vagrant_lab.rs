//! The Vagrant lab on real VMs (vagrant/, libvirt): the local box (built
//! from Debian packages by vagrant/build-box.sh, the bookworm-backports
//! kernel), three VMs provisioned with the release image and the compose
//! file, the demo inside (whoami over two VMs, the VIP from the third, every
//! VM's published port from the host with the host's own address kept), and
//! `vagrant destroy`. Also the compatibility test of the data plane on the
//! kernel the VMs boot (not this machine's). Where it cannot run it says so
//! and skips, except under CI=true, where that fails. Prints its times.

use std::time::{Duration, Instant};

use mesh_lab::{
    demo::{self, Hosts},
    image,
    vagrant::{self, Lab},
};
use mesh_tests::dockerlab::{agent_image, whoami_bin};

/// Destroys the VMs however the test ends.
struct Destroy;

impl Drop for Destroy {
    fn drop(&mut self) {
        let t = Instant::now();
        if let Err(e) = vagrant::destroy(3) {
            eprintln!("vagrant destroy: {e:#}");
        }
        println!("vagrant destroy: {:.0} s", t.elapsed().as_secs_f64());
    }
}

#[test]
fn vagrant_three_vms_run_the_demo() {
    if let Some(why) = vagrant::unavailable() {
        // In CI (CI=true) a lab that cannot run is a failure: a skip there
        // would hide that the VMs were never tried.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the Vagrant lab cannot run here: {why} (CI=true: failing, not skipping)"
        );
        println!("SKIPPED: the Vagrant lab cannot run here: {why}");
        return;
    }
    vagrant::libvirtd().unwrap_or_else(|e| panic!("{e:#}"));
    let t = Instant::now();
    vagrant::ensure_box().unwrap_or_else(|e| panic!("{e:#}"));
    let box_time = t.elapsed();
    let agent = agent_image();
    let tree = image::whoami_tree(&whoami_bin(), &vagrant::dir().join(".state/img"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let _ = vagrant::destroy(3);
    let _destroy = Destroy;
    let t = Instant::now();
    let lab = Lab::up(3, &agent, &tree, false).unwrap_or_else(|e| panic!("{e:#}"));
    let up_time = t.elapsed();
    let kernel = lab.ssh(1, &["uname", "-r"]).output().unwrap_or_default();
    let t = Instant::now();
    let report = demo::run(&lab).unwrap_or_else(|e| panic!("{e:#}"));
    let demo_time = t.elapsed();
    println!(
        "vagrant lab: box {:.0} s (built or found), 3 VMs up and provisioned {:.0} s, demo {:.0} s; guest kernel {}",
        box_time.as_secs_f64(),
        up_time.as_secs_f64(),
        demo_time.as_secs_f64(),
        kernel.trim()
    );
    println!("VIP answers from node 3: {:?}", report.answers);
    report
        .check(&lab.outside_ip())
        .unwrap_or_else(|e| panic!("{e:#}"));
    encrypted(&lab, &report.vip);
}

/// The tunnel encrypted (`--encrypt`, kernel WireGuard in the VMs): the
/// same loop across nodes captured on the underlay plain and encrypted,
/// the demo again, a node's key renewed and the cluster key rotated under
/// a request loop, an outsider's VXLAN frame, a node started without
/// `--encrypt`.
fn encrypted(lab: &Lab, vip: &str) {
    let bridge = lab.underlay_bridge().unwrap_or_else(|e| panic!("{e:#}"));
    let plain = capture(&bridge, || loop_from_node3(lab, vip, 20, 50));
    println!("plain: {plain}");
    assert_eq!(plain.failed, 0, "the plain loop");
    assert!(
        plain.vxlan > 0 && plain.replica_names,
        "plain, the capture shows VXLAN and the replicas' answers (the check can see them): {plain}"
    );

    let t = Instant::now();
    lab.set_encrypt(true).unwrap_or_else(|e| panic!("{e:#}"));
    let report = demo::run(lab).unwrap_or_else(|e| panic!("{e:#}"));
    report
        .check(&lab.outside_ip())
        .unwrap_or_else(|e| panic!("encrypted: {e:#}"));
    println!(
        "encrypted: the demo passed in {:.0} s (agents restarted with --encrypt)",
        t.elapsed().as_secs_f64()
    );
    for n in 1..=3 {
        let st = lab
            .ssh(n, &["docker", "exec", "mesh-agent", "/meshctl", "status"])
            .output()
            .unwrap_or_default();
        let line = st.lines().find(|l| l.starts_with("crypto:")).unwrap_or("");
        println!("node{n}$ meshctl status | grep crypto: {line}");
        assert!(line.contains("WireGuard"), "node {n} encrypts: {st}");
    }

    // Sizes: datagrams larger than the tunnel's MTU (fragments inside it)
    // and a bulk transfer, through the VIP to replicas on other nodes.
    let udp = lab
        .docker(
            3,
            &[
                "exec",
                "client",
                "/whoami",
                "ask",
                "udp",
                &format!("{vip}:80"),
                "--count",
                "6",
                "--size",
                "8000",
                "--timeout-ms",
                "3000",
            ],
        )
        .unwrap_or_else(|e| e.to_string());
    let udp = udp.lines().last().unwrap_or("").to_string();
    println!("encrypted: 8000-byte datagrams through the VIP: {udp}");
    assert_eq!(udp, "total 6 ok 6 err 0");
    let _ = lab.docker(1, &["rm", "-f", "sink"]);
    lab.docker(
        1,
        &[
            "run",
            "-d",
            "--name",
            "sink",
            "--network",
            "mesh",
            "--label",
            "mesh.service=sink",
            "--label",
            "mesh.port=5001/tcp",
            "mesh-whoami:lab",
            "sink",
            "5001",
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let sink = demo::wait_service(lab, 3, "sink", 1).unwrap_or_else(|e| panic!("{e:#}"));
    let sent = lab
        .docker(
            3,
            &[
                "exec",
                "client",
                "/whoami",
                "blast",
                &format!("{sink}:5001"),
                "100000000",
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let got = lab
        .ssh(1, &["sh", "-c", "docker logs sink 2>&1 | tail -1"])
        .output()
        .unwrap_or_default();
    println!(
        "encrypted: 100 MB through the VIP: {} / {}",
        sent.trim(),
        got.trim()
    );
    let sum = |s: &str| s.split_whitespace().last().map(str::to_owned);
    assert!(got.contains("received 100000000 bytes"), "{got}");
    assert_eq!(sum(sent.trim()), sum(got.trim()), "checksums match");

    // Under one loop: node 1's key renewed, then the cluster key rotated in
    // three steps on every node (add, make primary, remove the old).
    let old = lab
        .ssh(1, &["cat", "/etc/mesh/cluster.key"])
        .output()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let old = old.trim().to_string();
    let new = mesh_lab::random_key().unwrap_or_else(|e| panic!("{e:#}"));
    let encrypted = capture(&bridge, || {
        std::thread::scope(|s| {
            let l = s.spawn(|| loop_from_node3(lab, vip, 400, 50));
            std::thread::sleep(Duration::from_secs(2));
            let renewed = lab
                .ssh(
                    1,
                    &["docker", "exec", "mesh-agent", "/meshctl", "key", "renew"],
                )
                .output()
                .unwrap_or_else(|e| panic!("{e:#}"));
            println!("node1$ meshctl key renew: {}", renewed.trim());
            assert!(renewed.starts_with("public key "), "{renewed}");
            std::thread::sleep(Duration::from_secs(3));
            for (what, ring) in [
                ("add the new key", format!("{old}\n{new}\n")),
                ("make it primary", format!("{new}\n{old}\n")),
                ("remove the old key", format!("{new}\n")),
            ] {
                for n in 1..=3 {
                    lab.write_file(n, "/etc/mesh/cluster.key", &ring)
                        .unwrap_or_else(|e| panic!("{e:#}"));
                }
                // Read again within 2 s, then a gossip round.
                std::thread::sleep(Duration::from_secs(4));
                let st = lab
                    .ssh(3, &["docker", "exec", "mesh-agent", "/meshctl", "status"])
                    .output()
                    .unwrap_or_default();
                println!(
                    "cluster key, {what}: node3 {}",
                    st.lines().find(|l| l.starts_with("keys:")).unwrap_or("")
                );
            }
            l.join().expect("the loop")
        })
    });
    println!("encrypted, with a key renewal and a cluster key rotation: {encrypted}");
    assert_eq!(
        (encrypted.ok, encrypted.failed),
        (400, 0),
        "no request lost: {encrypted}"
    );
    assert!(
        encrypted.vxlan == 0 && !encrypted.replica_names && encrypted.wireguard > 0,
        "encrypted, only WireGuard between nodes and none of the answers: {encrypted}"
    );
    assert!(
        encrypted.other.is_empty(),
        "nothing else between nodes: {:?}",
        encrypted.other
    );
    for n in 1..=3 {
        let st = lab
            .ssh(n, &["docker", "exec", "mesh-agent", "/meshctl", "status"])
            .output()
            .unwrap_or_default();
        assert!(
            st.lines().any(|l| l.contains("2 peers")),
            "node {n} still has both peers:\n{st}"
        );
    }

    // An outsider (this host) forges VXLAN from node 2 to node 1: dropped
    // by node 1's XDP, counted.
    let before = counter(lab, 1, "xdp_vxlan_plain");
    let sent = forge_vxlan(
        lab.node_ip(2).parse().expect("ip"),
        lab.node_ip(1).parse().expect("ip"),
        20,
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = counter(lab, 1, "xdp_vxlan_plain");
    println!(
        "an outsider's forged VXLAN (node 2's address to node 1): {sent} sent, xdp_vxlan_plain on node 1 {before} -> {after}"
    );
    assert!(after >= before + sent as u64, "{before} -> {after}");

    // Node 3 restarted without --encrypt: refused, with the reason, on
    // both sides.
    lab.set_agent_encrypt(3, false)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let start = Instant::now();
    let (mine, theirs) = loop {
        // The agent logs to stderr.
        let logs = |n: usize, since: &str| {
            lab.ssh(
                n,
                &[
                    "sh",
                    "-c",
                    &format!("docker logs --since {since} mesh-agent 2>&1"),
                ],
            )
            .output()
            .unwrap_or_default()
        };
        let (mine, theirs) = (logs(3, "1m"), logs(1, "1m"));
        let mine = mine
            .lines()
            .find(|l| l.contains("every node of a cluster must use the same --encrypt"))
            .map(str::to_owned);
        let theirs = theirs
            .lines()
            .find(|l| l.contains("does not encrypt while this node does"))
            .map(str::to_owned);
        if let (Some(m), Some(t)) = (&mine, &theirs) {
            break (m.clone(), t.clone());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node 3 without --encrypt is refused on both sides: {mine:?} {theirs:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    println!("node 3 without --encrypt, its log: {mine}");
    println!("node 1's log: {theirs}");
}

/// What crossed the underlay during a loop, and the loop's outcome.
struct Capture {
    ok: usize,
    failed: usize,
    /// UDP datagrams between nodes: VXLAN (4789), WireGuard (51820).
    vxlan: usize,
    wireguard: usize,
    /// Other UDP between nodes, besides gossip (7946, sealed).
    other: Vec<String>,
    /// Whether a replica's name (in every answer) appears in the bytes.
    replica_names: bool,
}

impl std::fmt::Display for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, {} failed; between nodes {} VXLAN and {} WireGuard datagrams, {} others; replica names in the capture: {}",
            self.ok,
            self.failed,
            self.vxlan,
            self.wireguard,
            self.other.len(),
            self.replica_names
        )
    }
}

/// Runs `f` (a loop: ok and failed counts) while tcpdump captures UDP on
/// the underlay's bridge.
fn capture(bridge: &str, f: impl FnOnce() -> (usize, usize)) -> Capture {
    let file = mesh_lab::vagrant::dir().join(".state/underlay.pcap");
    let _ = std::fs::remove_file(&file);
    let mut tcpdump = std::process::Command::new("tcpdump")
        .args(["-i", bridge, "-nn", "-U", "-s", "0", "-w"])
        .arg(&file)
        .arg("udp")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed) = f();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGTERM) };
    let _ = tcpdump.wait();
    let read = |extra: &[&str]| {
        std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&file)
            .args(extra)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut c = Capture {
        ok,
        failed,
        vxlan: 0,
        wireguard: 0,
        other: Vec::new(),
        replica_names: read(&["-A"]).contains("whoami-"),
    };
    let node = |a: &str| a.starts_with("192.168.56.1") && a.split('.').count() == 5;
    for line in read(&[]).lines() {
        // 12:00:00.000 IP 192.168.56.13.49152 > 192.168.56.11.4789: UDP, length 100
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(src), Some(dst)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let dst = dst.trim_end_matches(':');
        if !(node(src) && node(dst)) {
            continue;
        }
        let port = |a: &str| a.rsplit('.').next().unwrap_or("").to_string();
        let ports = [port(src), port(dst)];
        if ports.iter().any(|p| p == "4789") {
            c.vxlan += 1;
        } else if ports.iter().all(|p| p == "51820") {
            c.wireguard += 1;
        } else if !ports.iter().all(|p| p == "7946") {
            c.other.push(line.to_string());
        }
    }
    c
}

/// `count` requests from node 3's client to `vip`, `interval_ms` apart:
/// (ok, failed).
fn loop_from_node3(lab: &Lab, vip: &str, count: u32, interval_ms: u32) -> (usize, usize) {
    let args = mesh_lab::whoami::ask_args(
        "client",
        "tcp",
        &format!("{vip}:80"),
        count,
        interval_ms,
        2000,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.docker(3, &args).unwrap_or_else(|e| e.to_string());
    let word = |w: &str| {
        out.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(w))
            .count()
    };
    (word("ok"), word("err"))
}

/// Node `n`'s packet counter `name`.
fn counter(lab: &Lab, n: usize, name: &str) -> u64 {
    let raw = lab
        .ssh(
            n,
            &[
                "docker",
                "exec",
                "mesh-agent",
                "/meshctl",
                "--json",
                "stats",
            ],
        )
        .output()
        .unwrap_or_default();
    let rows: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["counter"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

/// Sends `count` VXLAN frames from this host with `from`'s address to
/// `to` (a raw socket: the source is forged), each carrying a ping to an
/// address of `to`'s /24. Returns how many left.
fn forge_vxlan(from: std::net::Ipv4Addr, to: std::net::Ipv4Addr, count: usize) -> usize {
    let inner = mesh_tests::pkt::icmp4_echo(
        "10.42.1.9".parse().expect("ip"),
        "10.42.2.2".parse().expect("ip"),
        7,
        1,
    );
    let frame = mesh_tests::pkt::vxlan4(from, to, 50000, 4242, &inner);
    mesh_tests::raw::send_ipv4(&frame[14..], to, count)
}

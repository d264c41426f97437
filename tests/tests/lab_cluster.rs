//! Three Docker hosts on one underlay, each with its agent run as the
//! container the lab and the README run (needs root): the many-host
//! acceptance of the overlay work. Every loop is bounded.
//!
//! It ends with two nodes that took the same /24 while apart: one holder
//! everywhere, the other node moves to a free /24 with its containers.

use std::time::{Duration, Instant};

use mesh_tests::dockerlab::{Agent, Engine, Underlay, WHOAMI_IMAGE};

const WAIT: Duration = Duration::from_secs(60);

fn whoami(agent: &Agent, active: usize) -> String {
    agent
        .wait_for(&format!("{active} whoami replicas"), WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == active)
        })
        .services
        .iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip.clone())
        .expect("whoami")
}

fn ip_of(e: &Engine, c: &str) -> String {
    e.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}}",
        c,
    ])
}

/// One TCP request to whoami through `to` (run inside a client's
/// namespace): the replica's name and the client address it saw.
fn ask_peer_tcp(to: std::net::SocketAddr) -> Result<(String, String), String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("greeting: {e}"))?;
    w.write_all(b"peer\n").map_err(|e| e.to_string())?;
    line.clear();
    r.read_line(&mut line).map_err(|e| format!("answer: {e}"))?;
    split_peer(&line)
}

/// The same over UDP from a fresh socket (one retry per lost datagram, 3
/// tries), answered from `to` itself.
fn ask_peer_udp(to: std::net::SocketAddr) -> Result<(String, String), String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        s.send(b"peer").map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            return split_peer(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    Err("no answer".into())
}

fn split_peer(answer: &str) -> Result<(String, String), String> {
    answer
        .trim()
        .split_once(' ')
        .map(|(n, p)| (n.to_owned(), p.to_owned()))
        .ok_or_else(|| format!("not 'NAME PEER': {answer:?}"))
}

/// The node's packet counters (`meshctl stats`), by name.
fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn lab_three_hosts_services_overlay_failures_and_keys() {
    let underlay = Underlay::new();
    let engines: Vec<Engine> = (0..3).map(|_| Engine::start()).collect();
    for (i, e) in engines.iter().enumerate() {
        underlay.attach(e, i as u8 + 1);
        e.import_whoami();
    }
    let key = engines[0].write_cluster_key();
    let agents: Vec<Agent> = (1..=3u8)
        .map(|n| {
            let flags = underlay.cluster_flags(&format!("n{n}"), &[1, 2]);
            Agent::in_container(&engines[n as usize - 1], Some(&key), &flags)
        })
        .collect();
    for a in &agents {
        a.wait_for("two peers", WAIT, |s| {
            s.docker.connected && s.node.peers.len() == 2
        });
    }
    let subnets: Vec<String> = agents
        .iter()
        .map(|a| a.status().expect("status").node.subnet)
        .collect();
    println!("node subnets: {subnets:?}");
    for a in &agents {
        let host = a.status().expect("status").node.host_link;
        println!("meshctl status, host: {host}");
        assert!(host.starts_with("VIPs' backends on every node"), "{host}");
    }
    // The kernel's VXLAN device on the tunnel's port, up, with its program.
    for a in &agents {
        let gro = a.status().expect("status").node.tunnel_gro;
        assert!(gro.starts_with("on: GRO merges"), "{gro}");
    }
    for e in &engines {
        let link = e.ns.ip(&["-d", "link", "show", mesh_agent::vxlandev::NAME]);
        assert!(
            link.contains("UP,LOWER_UP")
                && link.contains("vxlan external")
                && link.contains("dstport 4789")
                && link.contains("nolearning"),
            "{link}"
        );
    }
    assert_eq!(
        subnets
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "conflict-free"
    );

    // whoami scaled 1 -> 2 -> 3 on nodes 1 and 2; the client is on node 3.
    let (e1, e2, e3) = (&engines[0], &engines[1], &engines[2]);
    e3.run_whoami("client", &[], &[]);
    let labels = [
        "mesh.service=whoami",
        "mesh.port=80/tcp,80/udp",
        "mesh.publish=8080:80/tcp,8080:80/udp",
    ];
    let mut vip = String::new();
    for (i, (e, name)) in [(e1, "w1"), (e2, "w2"), (e1, "w3")].into_iter().enumerate() {
        e.run_whoami(name, &labels, &[]);
        let v = whoami(&agents[2], i + 1);
        if !vip.is_empty() {
            assert_eq!(v, vip, "the VIP stays the same while scaling");
        }
        vip = v;
    }
    let target = format!("{vip}:80");
    for proto in ["tcp", "udp"] {
        let (names, errors) = e3.ask(proto, &target, 300, 0);
        println!("{proto}: 300 requests from node 3 to the VIP: {names:?}");
        assert_eq!(errors.len(), 0);
        assert_eq!(names.len(), 3, "all replicas");
        assert!(names.values().all(|n| *n >= 60), "each >= 20%: {names:?}");
    }

    // The routing mesh: every node's published port answers a host outside
    // the cluster, spread over the replicas (two on node 1, one on node 2;
    // node 3 has none), and every replica sees the client's own address.
    for a in &agents {
        a.wait_for("8080 published", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.published.len() == 2)
        });
    }
    let outside = underlay.outside(100);
    for n in 1..=3u8 {
        let to: std::net::SocketAddr = format!("{}:8080", underlay.addr(n))
            .parse()
            .expect("address");
        let start = Instant::now();
        let (tcp, udp) = outside.run(|| {
            let tcp: Vec<Result<(String, String), String>> =
                (0..300).map(|_| ask_peer_tcp(to)).collect();
            let udp: Vec<Result<(String, String), String>> =
                (0..300).map(|_| ask_peer_udp(to)).collect();
            (tcp, udp)
        });
        for (proto, answers) in [("tcp", tcp), ("udp", udp)] {
            let mut names = std::collections::BTreeMap::<String, usize>::new();
            let mut errors = Vec::new();
            for a in answers {
                match a {
                    Ok((name, peer)) => {
                        assert!(
                            peer.starts_with("192.168.91.100:"),
                            "{proto} via node {n}: {name} saw the client as {peer}"
                        );
                        *names.entry(name).or_default() += 1;
                    }
                    Err(e) => errors.push(e),
                }
            }
            println!(
                "{proto}: 300 requests from outside to node {n}'s published port (600 with the other protocol in {:.1} s): {names:?}, {} failed",
                start.elapsed().as_secs_f64(),
                errors.len()
            );
            assert!(errors.is_empty(), "{proto} via node {n}: {errors:?}");
            assert_eq!(names.len(), 3, "{proto} via node {n}: all replicas");
            assert!(
                names.values().all(|c| *c >= 60),
                "{proto} via node {n}: each >= 20%: {names:?}"
            );
        }
    }

    // Each node's own processes (socket-level balancing at connect):
    // localhost and the node's address on the published port answer, from
    // replicas here and on other nodes (node 3 has none of its own); so
    // does the VIP, through the node's host link for replicas elsewhere.
    for (i, e) in engines.iter().enumerate() {
        let n = i + 1;
        for (to, proto) in [
            ("127.0.0.1:8080".to_string(), "tcp"),
            (format!("{}:8080", underlay.addr(n as u8)), "tcp"),
            ("127.0.0.1:8080".to_string(), "udp"),
            (format!("{}:8080", underlay.addr(n as u8)), "udp"),
            (target.clone(), "tcp"),
            (target.clone(), "udp"),
        ] {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &e.ns.name])
                .arg(mesh_tests::dockerlab::whoami_bin())
                .args(["ask", proto, &to, "--count", "30", "--timeout-ms", "3000"])
                .output()
                .expect("whoami ask");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut names = std::collections::BTreeMap::<String, usize>::new();
            for l in text.lines() {
                if let [_, "ok", name] = l.split_whitespace().collect::<Vec<_>>().as_slice() {
                    *names.entry(name.to_string()).or_default() += 1;
                }
            }
            println!("node {n} itself -> {to}/{proto}: {names:?}");
            assert_eq!(
                names.values().sum::<usize>(),
                30,
                "node {n} itself -> {to}/{proto}: every request answered:\n{text}"
            );
            assert!(
                names.len() >= 2,
                "node {n} itself -> {to}/{proto}: {names:?}"
            );
        }
    }

    // A container on Docker's default bridge (another network, which
    // Docker isolates from mesh's) calls the node's address and its gateway
    // (host.docker.internal) on the published port: balanced at the bridge
    // over replicas here and elsewhere, its own address kept.
    for (i, e) in engines.iter().enumerate() {
        let n = i + 1;
        e.docker_ok(&[
            "run",
            "-d",
            "--name",
            "bclient",
            "--network",
            "bridge",
            mesh_lab::image::WHOAMI_IMAGE,
            "serve",
            "--tcp",
            "7",
        ]);
        let own = e.docker_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.bridge.IPAddress}}",
            "bclient",
        ]);
        for to in [
            format!("{}:8080", underlay.addr(n as u8)),
            "172.30.0.1:8080".to_string(),
        ] {
            for proto in ["tcp", "udp"] {
                let mut args = mesh_lab::whoami::ask_args("bclient", proto, &to, 30, 0, 3000);
                args.push("--peer".into());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = e.docker(&args);
                let text = String::from_utf8_lossy(&out.stdout);
                let mut names = std::collections::BTreeMap::<String, usize>::new();
                for l in text.lines() {
                    if let [_, "ok", name, peer] =
                        l.split_whitespace().collect::<Vec<_>>().as_slice()
                    {
                        assert!(
                            peer.starts_with(&format!("{own}:")),
                            "node {n}'s bridge container ({own}) -> {to}/{proto}: {name} saw {peer}"
                        );
                        *names.entry(name.to_string()).or_default() += 1;
                    }
                }
                println!("node {n}, a container on the default bridge -> {to}/{proto}: {names:?}");
                assert_eq!(
                    names.values().sum::<usize>(),
                    30,
                    "node {n}'s bridge container -> {to}/{proto}: every request answered:\n{text}"
                );
                assert!(names.len() >= 2, "node {n} -> {to}/{proto}: {names:?}");
            }
        }
        e.docker_ok(&["rm", "-f", "bclient"]);
    }
    // And a container on `mesh` on each node (a replica on nodes 1 and 2,
    // the client on node 3) calling its node's address on the published
    // port: balanced at its veth, as a VIP.
    for (n, (e, c)) in [(e1, "w1"), (e2, "w2"), (e3, "client")]
        .into_iter()
        .enumerate()
    {
        let to = format!("{}:8080", underlay.addr(n as u8 + 1));
        for proto in ["tcp", "udp"] {
            let args = mesh_lab::whoami::ask_args(c, proto, &to, 30, 0, 3000);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let text = String::from_utf8_lossy(&e.docker(&args).stdout).into_owned();
            let ok = text
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some("ok"))
                .count();
            println!(
                "node {}, {c} on mesh -> {to}/{proto}: {ok} of 30 answered",
                n + 1
            );
            assert_eq!(ok, 30, "{c} -> {to}/{proto}:\n{text}");
        }
    }
    for (i, e) in engines.iter().enumerate() {
        let c = e.mesh_counters();
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        println!(
            "node {}: bridge_local {}, bridge_remote {}, bridge_spoofed {}",
            i + 1,
            get("bridge_local"),
            get("bridge_remote"),
            get("bridge_spoofed")
        );
        // 4 x 30 requests; node 3 has no replica of its own.
        assert!(get("bridge_remote") > 0, "node {}: {c:?}", i + 1);
        assert_eq!(get("bridge_local") > 0, i < 2, "node {}: {c:?}", i + 1);
        // The host's 30 + 30 to the VIP; every node has replicas elsewhere.
        println!(
            "node {}: sock_vip {}, host_encap {}, host_deliver {}, host_spoofed {}",
            i + 1,
            get("sock_vip"),
            get("host_encap"),
            get("host_deliver"),
            get("host_spoofed")
        );
        assert_eq!(get("sock_vip"), 60, "node {}: {c:?}", i + 1);
        assert!(
            get("host_encap") > 0 && get("host_deliver") > 0,
            "node {}: {c:?}",
            i + 1
        );
        assert_eq!(get("host_spoofed"), 0, "node {}: {c:?}", i + 1);
    }

    // The agents' DNS serves the cluster's containers and hosts, not the
    // underlay: a host outside the cluster with a route to node 1's mesh
    // gateway gets no answer (containers do: the DNS tests), and /metrics
    // listens on localhost only.
    let gw = {
        let subnet = agents[0].status().expect("status").node.subnet;
        subnet
            .parse::<mesh_agent::vip::Cidr>()
            .expect("node 1's subnet")
            .gateway()
    };
    underlay.steer("10.42.0.0/16", 1);
    let dig = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &outside.name,
            "dig",
            &format!("@{gw}"),
            "+time=1",
            "+tries=1",
            "whoami",
        ])
        .output()
        .expect("dig");
    let dig = String::from_utf8_lossy(&dig.stdout);
    println!(
        "dig from outside the cluster at node 1's DNS ({gw}): {}",
        dig.lines().find(|l| l.contains(";;")).unwrap_or("")
    );
    assert!(
        !dig.contains("ANSWER SECTION") && !dig.contains("status:"),
        "the underlay gets no DNS answer: {dig}"
    );
    let metrics = outside.run(|| {
        std::net::TcpStream::connect_timeout(
            &format!("{}:9464", underlay.addr(1))
                .parse()
                .expect("address"),
            Duration::from_secs(1),
        )
    });
    assert!(metrics.is_err(), "/metrics is not on the underlay");

    // Conflicts are reported, not guessed: a host process on node 2 holds
    // 8081, and a younger service "rival" asks for 8080 (whoami's) and
    // 8081. Every node keeps 8080 for whoami; node 2 leaves 8081 to its
    // host process; nodes 1 and 3 publish it for rival.
    let holder = engines[1]
        .ns
        .run(|| std::net::TcpListener::bind("0.0.0.0:8081").expect("a host process on 8081"));
    e1.run_whoami(
        "r1",
        &[
            "mesh.service=rival",
            "mesh.port=80/tcp",
            "mesh.publish=8080:80/tcp,8081:80/tcp",
        ],
        &[],
    );
    let st2 = agents[1].wait_for("both conflicts reported on node 2", WAIT, |s| {
        let has = |port: &str, why: &str| {
            s.publish_conflicts
                .iter()
                .any(|c| c.starts_with(port) && c.contains(why))
        };
        has("8080/tcp", "rival does not get it") && has("8081/tcp", "already uses it")
    });
    println!("node 2 reports: {:?}", st2.publish_conflicts);
    agents[0].wait_for("node 1 publishes 8081 for rival", WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == "rival" && x.published.iter().any(|p| p.starts_with("8081/tcp")))
    });
    let (rival, whoami_8080) = outside.run(|| {
        let rival = ask_peer_tcp(
            format!("{}:8081", underlay.addr(1))
                .parse()
                .expect("address"),
        )
        .map(|(n, _)| n);
        let whoami: Vec<Result<String, String>> = (0..30)
            .map(|_| {
                ask_peer_tcp(
                    format!("{}:8080", underlay.addr(2))
                        .parse()
                        .expect("address"),
                )
                .map(|(n, _)| n)
            })
            .collect();
        (rival, whoami)
    });
    assert_eq!(rival.as_deref(), Ok("r1"), "node 1 serves 8081 for rival");
    assert!(
        whoami_8080
            .iter()
            .all(|r| r.as_deref().is_ok_and(|n| n.starts_with('w'))),
        "8080 stays whoami's, untouched: {whoami_8080:?}"
    );
    e1.docker_ok(&["rm", "-f", "r1"]);
    drop(holder);

    // Drain through the published port: a replica that keeps serving 3 s
    // after SIGTERM is stopped during a loop from outside; no request
    // fails, and none reaches it later than 1 s after the stop.
    let d1 = mesh_lab::whoami::run_args_serving("d1", &labels, &[], &["--term-delay-ms", "3000"]);
    e1.docker_ok(&d1.iter().map(String::as_str).collect::<Vec<_>>());
    whoami(&agents[2], 4);
    let drain_to: std::net::SocketAddr = format!("{}:8080", underlay.addr(3))
        .parse()
        .expect("address");
    let loop_start = Instant::now();
    let drain_loop = outside.spawn(move || {
        (0..600)
            .map(|_| {
                let r = ask_peer_tcp(drain_to).map(|(n, _)| n);
                std::thread::sleep(Duration::from_millis(10));
                (loop_start.elapsed(), r)
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(1));
    let stopped = loop_start.elapsed();
    e1.docker_ok(&["stop", "d1"]);
    let answers = drain_loop.join().expect("drain loop");
    let failed = answers.iter().filter(|(_, r)| r.is_err()).count();
    let late = answers
        .iter()
        .filter(|(t, r)| *t > stopped + Duration::from_secs(1) && r.as_deref() == Ok("d1"))
        .count();
    let by_d1 = answers
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("d1"))
        .count();
    println!(
        "drain through node 3's published port: {} requests, {failed} failed, d1 answered {by_d1} (before its stop), {late} more than 1 s after the stop",
        answers.len()
    );
    assert_eq!(failed, 0, "no request lost while d1 drains");
    assert_eq!(late, 0, "no new flow reaches a draining replica");
    e1.docker_ok(&["rm", "-f", "d1"]);
    whoami(&agents[2], 3);

    // 200 MB downloaded from outside through node 3 (no replica there:
    // through the tunnel), arriving intact.
    let start = Instant::now();
    let (got, bad) = outside.run(|| {
        use std::io::{BufRead, BufReader, Read, Write};
        let to: std::net::SocketAddr = format!("{}:8080", underlay.addr(3))
            .parse()
            .expect("address");
        let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting).expect("greeting");
        w.write_all(b"bytes 200000000\n").expect("ask");
        let (mut got, mut bad) = (0usize, 0usize);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = r.read(&mut buf).expect("download");
            if k == 0 {
                break;
            }
            bad += buf[..k]
                .iter()
                .enumerate()
                .filter(|(i, b)| **b != ((got + i) % 251) as u8)
                .count();
            got += k;
        }
        (got, bad)
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "200 MB from outside through node 3's published port (no local replica) in {secs:.1} s ({:.0} MB/s), {bad} bytes wrong",
        got as f64 / 1e6 / secs
    );
    assert_eq!((got, bad), (200_000_000, 0), "arrives whole and intact");

    // 4,000-byte datagrams through the VIP from node 3 (across the 1400-byte
    // link to the replicas): the client's stack fragments them to the
    // tunnel MTU, every fragment crosses, the replica gets them whole.
    let big = e3.docker(&[
        "exec", "client", "/whoami", "ask", "udp", &target, "--count", "20", "--size", "4000",
    ]);
    let big = String::from_utf8_lossy(&big.stdout);
    let whole = big
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ok") && l.ends_with(" 4000"))
        .count();
    println!("4,000-byte datagrams through the VIP from node 3: {whole}/20 answered whole");
    assert_eq!(whole, 20, "{big}");

    // A replica calling its own service (hairpin when Maglev picks itself).
    for proto in ["tcp", "udp"] {
        let args = mesh_lab::whoami::ask_args("w1", proto, &target, 60, 0, 2000);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = e1.docker_ok(&args);
        let ok = out
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("ok"))
            .count();
        let itself = out.lines().filter(|l| l.ends_with(" ok w1")).count();
        println!("{proto}: w1 -> its own VIP: {ok}/60 answered, {itself} by w1 itself");
        assert_eq!(
            ok, 60,
            "{proto}: every request from a replica to its own VIP: {out}"
        );
        assert!(itself > 0, "{proto}: w1 reached itself (hairpin)");
    }

    // Container to container by IP across nodes, both ways: ICMP, TCP, UDP.
    let (w1, client) = (ip_of(e1, "w1"), ip_of(e3, "client"));
    for (e, from, to) in [(e3, "client", w1.as_str()), (e1, "w1", client.as_str())] {
        let ping = e.docker(&["exec", from, "ping", "-c", "2", "-W", "2", to]);
        assert!(
            ping.status.success(),
            "ping {from} -> {to}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    let (names, errors) = e3.ask("tcp", &format!("{w1}:80"), 5, 0);
    assert!(
        errors.is_empty() && names.get("w1") == Some(&5),
        "TCP client -> w1"
    );
    let (names, errors) = e3.ask("udp", &format!("{w1}:80"), 5, 0);
    assert!(
        errors.is_empty() && names.get("w1") == Some(&5),
        "UDP client -> w1"
    );
    for proto in ["tcp", "udp"] {
        let back = e1.docker(&[
            "exec",
            "w1",
            "/whoami",
            "ask",
            proto,
            &format!("{client}:80"),
            "--count",
            "3",
        ]);
        assert!(
            back.status.success(),
            "{proto} w1 -> client: {}",
            String::from_utf8_lossy(&back.stdout)
        );
    }

    // 200 MB from node 3 to node 1 through a VIP (across the underlay's
    // 1400-byte link), compared end to end.
    e1.docker_ok(&[
        "run",
        "-d",
        "--name",
        "sink",
        "--network",
        "mesh",
        "--label",
        "mesh.service=sink",
        "--label",
        "mesh.port=9000/tcp",
        WHOAMI_IMAGE,
        "sink",
        "9000",
    ]);
    let sink_vip = agents[2]
        .wait_for("the sink service on node 3", WAIT, |s| {
            s.services.iter().any(|x| x.name == "sink" && x.active == 1)
        })
        .services
        .iter()
        .find(|x| x.name == "sink")
        .map(|x| x.vip.clone())
        .expect("sink");
    let start = Instant::now();
    let sent = e3.docker_ok(&[
        "exec",
        "client",
        "/whoami",
        "blast",
        &format!("{sink_vip}:9000"),
        "200000000",
    ]);
    let waited = Instant::now();
    while e1.docker_ok(&["inspect", "-f", "{{.State.Running}}", "sink"]) == "true"
        && waited.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let received = e1.docker_ok(&["logs", "sink"]);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "200 MB across nodes through a VIP in {secs:.1} s ({:.0} MB/s): {sent} / {}",
        200.0 / secs,
        received.lines().last().unwrap_or("")
    );
    let sum = |s: &str| s.split_whitespace().last().map(str::to_owned);
    assert!(received.contains("received 200000000 bytes"), "{received}");
    assert_eq!(
        sum(&sent),
        sum(received.lines().last().unwrap_or("")),
        "checksums match"
    );

    // Time from `docker run` on node 1 to the backend in node 3's maps.
    let mut lat = Vec::new();
    for i in 0..5 {
        let name = format!("x{i}");
        let t = Instant::now();
        e1.run_whoami(&name, &labels, &[]);
        whoami(&agents[2], 4 + i);
        lat.push(t.elapsed());
    }
    let (p50, p99) = (quantile(&mut lat, 0.5), quantile(&mut lat, 0.99));
    println!(
        "docker run on node 1 -> backend in node 3's maps: median {p50:?}, p99 {p99:?} (5 runs, docker run included)"
    );
    for i in 0..5 {
        e1.docker_ok(&["rm", "-f", &format!("x{i}")]);
    }
    whoami(&agents[2], 3);

    // Node 2 is cut off during a loop of requests: to the VIP from node 3,
    // and from outside the cluster to node 3's published port (node 3 has
    // no replica: every flow crosses the tunnel).
    let client_loop = e3.ask_in_background("tcp", &target, 1500, 5, 1000);
    let mesh_to: std::net::SocketAddr = format!("{}:8080", underlay.addr(3))
        .parse()
        .expect("address");
    let mesh_loop = outside.spawn(move || {
        let (mut ok, mut total) = (0usize, 0usize);
        for _ in 0..1500 {
            total += 1;
            ok += ask_peer_tcp(mesh_to).is_ok() as usize;
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, total)
    });
    std::thread::sleep(Duration::from_secs(2));
    let cut = Instant::now();
    underlay.set_link(2, false);
    agents[2].wait_for("w2 gone from node 3", Duration::from_secs(15), |s| {
        s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active == 2)
    });
    let gone = cut.elapsed();
    let out = client_loop.wait_with_output().expect("loop ends");
    let text = String::from_utf8_lossy(&out.stdout);
    // One line per request (`MS ok NAME` or `MS err WHY`), then a summary.
    let requests: Vec<&str> = text.lines().filter(|l| !l.starts_with("total")).collect();
    let ok = requests.iter().filter(|l| l.contains(" ok ")).count();
    let total = requests
        .iter()
        .filter(|l| l.contains(" ok ") || l.contains(" err "))
        .count();
    println!(
        "node 2 cut off: its backend left node 3's maps after {gone:?}; during the cut {ok}/{total} requests succeeded ({:.2}%)",
        ok as f64 * 100.0 / total as f64
    );
    assert!(
        gone <= Duration::from_secs(5) + Duration::from_millis(500),
        "within 5 s"
    );
    assert_eq!(total, 1500, "every request of the loop accounted for");
    assert!(ok * 100 >= total * 99, "at least 99% during the cut");
    let (names, errors) = e3.ask("tcp", &target, 100, 0);
    assert_eq!(errors.len(), 0, "100% after the cut: {names:?}");
    let (ok, total) = mesh_loop.join().expect("published-port loop");
    println!(
        "node 2 cut off: through node 3's published port {ok}/{total} requests succeeded ({:.2}%)",
        ok as f64 * 100.0 / total as f64
    );
    assert_eq!(total, 1500);
    assert!(
        ok * 100 >= total * 99,
        "published port: at least 99% during the cut"
    );
    let after: Vec<Result<(String, String), String>> =
        outside.run(|| (0..100).map(|_| ask_peer_tcp(mesh_to)).collect());
    let failed: Vec<&String> = after.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "published port: 100% after the cut: {failed:?}"
    );

    // Node 2 comes back: re-added everywhere.
    underlay.set_link(2, true);
    let back = Instant::now();
    whoami(&agents[2], 3);
    println!(
        "node 2 reconnected: its backend is back in node 3's maps after {:?}",
        back.elapsed()
    );

    // An agent restart withdraws nothing anywhere, even one slower than
    // failure detection (about 1.5 s here): stopped, left stopped for 3 s
    // and started again, the agent said it was stopping, and node 3 keeps
    // node 1's two backends until the new agent has published.
    let mut agents = agents;
    let pause = Duration::from_secs(3);
    let restart = Instant::now();
    let (first, rest) = agents.split_at_mut(1);
    let node3 = &rest[1];
    let (lowest, held, gauge) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut lowest = usize::MAX;
            let mut held: Option<(Duration, Duration)> = None;
            // Node 3's mesh_peers_restarting when n1 was first held.
            let mut gauge = None;
            while restart.elapsed() < pause + Duration::from_secs(7) {
                if let Some(st) = node3.status() {
                    let active = st
                        .services
                        .iter()
                        .find(|x| x.name == "whoami")
                        .map_or(0, |x| x.active);
                    lowest = lowest.min(active);
                    if st.node.restarting.iter().any(|n| n == "n1") {
                        let now = restart.elapsed();
                        if held.is_none() {
                            gauge = agent_metrics(e3)
                                .lines()
                                .find_map(|l| l.strip_prefix("mesh_peers_restarting "))
                                .map(str::to_owned);
                        }
                        held = Some((held.map_or(now, |h| h.0), now));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (lowest, held, gauge)
        });
        first[0].stop_and_start(pause);
        watch.join().expect("the watch")
    });
    agents[0].wait_for("restarted node 1 rejoined", WAIT, |s| {
        s.node.peers.len() == 2
    });
    let said = held.map_or("never".into(), |(a, b)| format!("from {a:.1?} to {b:.1?}"));
    println!(
        "node 1's agent stopped, started again {pause:?} later: node 3 held its endpoints as \
         restarting {said} after the stop (mesh_peers_restarting {}), and saw at least {lowest} \
         of 3 backends throughout",
        gauge.as_deref().unwrap_or("not read")
    );
    assert!(held.is_some(), "node 1 held while it restarted");
    assert_eq!(
        gauge.as_deref(),
        Some("1"),
        "node 3's mesh_peers_restarting while n1 was held"
    );
    assert_eq!(lowest, 3, "no backend withdrawn by a restart");

    // After the restart, a new replica on node 1 is reachable from the
    // other nodes by its IP and through the VIP: the restarted agent writes
    // the very maps its adopted programs read (every map is pinned).
    e1.run_whoami("w4", &labels, &[]);
    whoami(&agents[2], 4);
    let w4 = ip_of(e1, "w4");
    for (e, from) in [(e3, "client"), (e2, "w2")] {
        let ping = e.docker(&["exec", from, "ping", "-c", "3", "-W", "2", &w4]);
        assert!(
            ping.status.success(),
            "ping {from} -> w4 {w4} after node 1's agent restarted: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    for proto in ["tcp", "udp"] {
        let (names, errors) = e3.ask(proto, &format!("{w4}:80"), 20, 0);
        assert!(
            errors.is_empty() && names.get("w4") == Some(&20),
            "{proto} client -> w4 after the restart: {names:?} {errors:?}"
        );
        let (names, errors) = e3.ask(proto, &target, 200, 0);
        println!("{proto}: 200 requests to the VIP after node 1's restart and w4: {names:?}");
        assert!(errors.is_empty(), "100% through the VIP: {errors:?}");
        assert!(names.contains_key("w4"), "w4 takes its share: {names:?}");
    }

    // A node with the wrong key never joins; garbage at the gossip port is
    // counted; nothing crashes.
    let e4 = Engine::start();
    underlay.attach(&e4, 4);
    let bad_key = e4.dir.join("wrong.key");
    std::fs::write(
        &bad_key,
        "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n",
    )
    .expect("key");
    let intruder = Agent::in_container(
        &e4,
        Some(&bad_key),
        &underlay.cluster_flags("intruder", &[1]),
    );
    // Garbage from a host on the underlay (node 4's address).
    e4.ns.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..100u32 {
            let junk: Vec<u8> = (0..(i % 200)).map(|j| (j * 7 + i) as u8).collect();
            let _ = s.send_to(&junk, format!("{}:7946", underlay.addr(1)));
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let st1 = agents[0].status().expect("node 1 answers");
    assert!(
        !st1.node.peers.iter().any(|p| p == "intruder"),
        "the wrong key never joins: {:?}",
        st1.node.peers
    );
    let st4 = intruder.wait_for("the intruder runs", WAIT, |s| !s.node.subnet.is_empty());
    assert!(
        st4.node.peers.is_empty(),
        "the intruder learns nothing: {:?}",
        st4.node.peers
    );
    // And it says why, in meshctl status.
    let st4 = intruder.wait_for("the intruder has gossiped", WAIT, |s| {
        s.node.gossip_sent > 0
    });
    let line = st4.node.cluster_line();
    println!("the wrong-key node's meshctl status: cluster: {line}");
    assert!(line.starts_with("no authenticated peer;"), "{line}");
    let line1 = agents[0]
        .status()
        .expect("node 1 status")
        .node
        .cluster_line();
    println!("node 1's meshctl status: cluster: {line1}");
    assert!(line1.contains("datagrams rejected"), "{line1}");
    let metrics = agent_metrics(&engines[0]);
    let dropped: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_gossip_dropped_total"))
        .collect();
    println!("node 1 gossip drops: {dropped:?}");
    let count = |reason: &str| -> u64 {
        dropped
            .iter()
            .find(|l| l.contains(reason))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("bad_auth") > 0,
        "the intruder's datagrams are rejected"
    );
    assert!(
        count("garbage") + count("bad_auth") >= 100,
        "garbage counted"
    );
    let (_, errors) = e3.ask("tcp", &target, 30, 0);
    assert_eq!(errors.len(), 0, "still serving");

    // Two nodes that took the same /24 while apart. Simulated: node 3's
    // agent comes back with a saved claim on node 1's /24, older than node
    // 1's (as a node that held it before a partition would). Every node
    // keeps node 3 on it; node 1 gives it up, its agent restarts, claims a
    // free /24 and moves its mesh network and containers there.
    let s1 = agents[0].status().expect("node 1").node.subnet;
    let index1: u32 = s1
        .split('.')
        .nth(2)
        .and_then(|x| x.parse().ok())
        .expect("10.42.X.0/24");
    let w1_before = ip_of(e1, "w1");
    e3.docker_ok(&["stop", "mesh-agent"]);
    std::fs::write(e3.dir.join("state/subnet"), format!("{index1} 1")).expect("claim");
    e3.docker_ok(&["start", "mesh-agent"]);
    let t = Instant::now();
    agents[2].wait_for("node 3 holds node 1's /24", WAIT, |s| {
        s.node.subnet == s1 && s.docker.connected
    });
    let st1 = agents[0].wait_for("node 1 moved to a free /24", WAIT, |s| {
        !s.node.subnet.is_empty() && s.node.subnet != s1 && s.docker.connected
    });
    println!(
        "conflicting claims on {s1}: node 3 kept it, node 1 moved to {} after {:?}",
        st1.node.subnet,
        t.elapsed()
    );
    let subnets: std::collections::BTreeSet<String> = agents
        .iter()
        .filter_map(|a| a.status().map(|s| s.node.subnet))
        .collect();
    assert_eq!(subnets.len(), 3, "three distinct /24s: {subnets:?}");
    let logs = agents[0].log_text();
    assert!(
        logs.contains("also claimed by node n3"),
        "node 1 says why it moved"
    );
    let w1_after = ip_of(e1, "w1");
    let prefix = st1.node.subnet.trim_end_matches("0/24");
    println!("w1 moved from {w1_before} to {w1_after}");
    assert!(
        w1_after.starts_with(prefix),
        "{w1_after} in {}",
        st1.node.subnet
    );
    // Everything answers again: node 1's replicas at their new addresses,
    // the client on node 3 at its new one.
    whoami(&agents[2], 4);
    let (names, errors) = e3.ask("tcp", &target, 200, 0);
    println!("tcp: 200 requests to the VIP after the renumbering: {names:?}");
    assert!(errors.is_empty(), "100% through the VIP: {errors:?}");
    assert_eq!(names.len(), 4, "every replica: {names:?}");
    let ping = e3.docker(&["exec", "client", "ping", "-c", "2", "-W", "2", &w1_after]);
    assert!(ping.status.success(), "client -> w1 at its new address");
}

/// The agent's /metrics on `e` (its namespace's loopback).
fn agent_metrics(e: &Engine) -> String {
    e.ns.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("req");
        let mut b = String::new();
        s.read_to_string(&mut b).expect("resp");
        b
    })
}

//! Several isolated overlay networks on two Docker hosts (routed underlay,
//! agents run as the lab and the README run them; needs root): networks
//! made with `meshctl network create` on either node, a service of the
//! same name on each, isolation on the same node and across nodes, a
//! container on both, DNS by the asker's network, and `network rm`.
//! Every loop is bounded.

use std::time::{Duration, Instant};

use mesh_tests::dockerlab::{Agent, Engine, Underlay, WHOAMI_IMAGE};

const WAIT: Duration = Duration::from_secs(60);

/// `meshctl ARGS` in node `e`'s agent container: (success, stdout + stderr).
fn meshctl(e: &Engine, args: &[&str]) -> (bool, String) {
    let mut full = vec!["exec", mesh_lab::agent::NAME, "/meshctl"];
    full.extend_from_slice(args);
    let out = e.docker(&full);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

/// The networks node `e` serves, as `meshctl network ls --json` gives them.
fn networks(e: &Engine) -> Vec<serde_json::Value> {
    let (ok, text) = meshctl(e, &["network", "ls", "--json"]);
    if !ok {
        return Vec::new();
    }
    serde_json::from_str(&text).unwrap_or_default()
}

/// Waits until node `e` has network `name`'s Docker network in place.
fn wait_network(e: &Engine, name: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(n) = networks(e).into_iter().find(|n| {
            n["name"] == name && n["docker"].as_str().is_some_and(|d| d.starts_with("ok"))
        }) {
            return n;
        }
        assert!(
            start.elapsed() < WAIT,
            "network {name} not ready: {:?}",
            networks(e)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A whoami replica named `name` on `networks` (the first at `docker run`,
/// the others connected after), with `labels`; its address on each.
fn run_on(e: &Engine, name: &str, networks: &[&str], labels: &[&str]) -> Vec<String> {
    run_with(e, name, networks, labels, &[])
}

/// [`run_on`] with more `docker run` flags.
fn run_with(
    e: &Engine,
    name: &str,
    networks: &[&str],
    labels: &[&str],
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec!["run", "-d", "--name", name, "--hostname", name];
    args.extend(["--network", networks[0]]);
    args.extend(extra);
    for l in labels {
        args.extend(["--label", l]);
    }
    args.extend([WHOAMI_IMAGE, "serve", "--tcp", "80", "--udp", "80"]);
    e.docker_ok(&args);
    for n in &networks[1..] {
        e.docker_ok(&["network", "connect", n, name]);
    }
    networks
        .iter()
        .map(|n| {
            e.docker_ok(&[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{n}\").IPAddress}}}}"),
                name,
            ])
        })
        .collect()
}

/// The VIP of service `name` on `network` once it has `active` backends.
fn vip(agent: &Agent, name: &str, network: &str, active: usize) -> String {
    agent
        .wait_for(
            &format!("{name} on {network}: {active} active"),
            WAIT,
            |s| {
                s.services
                    .iter()
                    .any(|x| x.name == name && x.network == network && x.active == active)
            },
        )
        .services
        .iter()
        .find(|x| x.name == name && x.network == network)
        .map(|x| x.vip.clone())
        .expect("service")
}

/// `nslookup NAME SERVER` in a fresh container on `network`: the addresses.
fn nslookup_on(e: &Engine, network: &str, name: &str, server: &str) -> Vec<String> {
    e.nslookup(network, name, Some(server))
}

/// Starts Debian's Prometheus in node `e`'s namespace, discovering targets
/// from the agent's `/sd` (`http_sd_configs`), and waits (bounded) until it
/// has `want` targets: (address, service, network, node) of each. It is
/// stopped before returning.
fn prometheus_targets(e: &Engine, want: usize) -> Vec<(String, String, String, String)> {
    let dir = std::env::temp_dir().join(format!("mesh-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        "global:\n  scrape_interval: 15s\nscrape_configs:\n  - job_name: mesh\n    \
         http_sd_configs:\n      - url: http://127.0.0.1:9464/sd\n        refresh_interval: 2s\n",
    )
    .expect("config");
    let mut prom = std::process::Command::new("ip")
        .args(["netns", "exec", &e.ns.name, "prometheus"])
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs Debian's)");
    let start = Instant::now();
    let found = loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &e.ns.name, "curl", "-s", "-m", "2"])
            .arg("http://127.0.0.1:19090/api/v1/targets")
            .output()
            .expect("curl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let found: Vec<(String, String, String, String)> = v["data"]["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        let l = &t["discoveredLabels"];
                        let s = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
                        (
                            s("__address__"),
                            s("__meta_mesh_service"),
                            s("__meta_mesh_network"),
                            s("__meta_mesh_node"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if found.len() >= want || start.elapsed() > WAIT {
            break found;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = std::fs::remove_dir_all(&dir);
    found
}

/// `count` requests over `proto` from container `from` to `target`:
/// (answers by replica, failures).
fn ask(e: &Engine, from: &str, proto: &str, target: &str, count: u32) -> (usize, usize) {
    let args = mesh_lab::whoami::ask_args(from, proto, target, count, 0, 1000);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = e.docker(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let kind = |l: &str| l.split_whitespace().nth(1).map(str::to_owned);
    let ok = text
        .lines()
        .filter(|l| kind(l).as_deref() == Some("ok"))
        .count();
    let err = text
        .lines()
        .filter(|l| kind(l).as_deref() == Some("err"))
        .count();
    if err > 0 {
        println!("{from} -> {target}/{proto}:\n{text}");
    }
    (ok, err)
}

#[test]
fn lab_networks_isolate_and_a_container_on_two_reaches_both() {
    let underlay = Underlay::new();
    let engines: Vec<Engine> = (0..2).map(|_| Engine::start()).collect();
    for (i, e) in engines.iter().enumerate() {
        underlay.attach(e, i as u8 + 1);
        e.import_whoami();
    }
    let key = engines[0].write_cluster_key();
    let agents: Vec<Agent> = (1..=2u8)
        .map(|n| {
            let flags = underlay.cluster_flags(&format!("n{n}"), &[1]);
            Agent::in_container(&engines[n as usize - 1], Some(&key), &flags)
        })
        .collect();
    for a in &agents {
        a.wait_for("one peer", WAIT, |s| {
            s.docker.connected && s.node.peers.len() == 1
        });
    }
    let (e1, e2) = (&engines[0], &engines[1]);

    // Made on either node, served on both.
    let (ok, made) = meshctl(e1, &["network", "create", "front"]);
    println!("n1$ meshctl network create front\n{made}");
    assert!(ok, "{made}");
    let (ok, made) = meshctl(
        e2,
        &["network", "create", "back", "--subnet", "10.50.0.0/16"],
    );
    println!("n2$ meshctl network create back --subnet 10.50.0.0/16\n{made}");
    assert!(ok, "{made}");
    for e in &engines {
        for n in ["front", "back"] {
            let row = wait_network(e, n);
            println!("{n}: {row}");
        }
    }
    // Once a node knows a network, a colliding one is refused there.
    let (ok, refused) = meshctl(
        e1,
        &["network", "create", "clash", "--subnet", "10.50.0.0/16"],
    );
    println!("n1$ meshctl network create clash --subnet 10.50.0.0/16\n{refused}");
    assert!(!ok && refused.contains("collides"), "{refused}");
    let front = wait_network(e1, "front");
    assert_eq!(front["subnet"], "10.44.0.0/16");
    println!(
        "n1$ meshctl network ls\n{}",
        meshctl(e1, &["network", "ls"]).1
    );

    // `web` on each network; a client on front; a container on both.
    let fweb = run_on(
        e2,
        "fweb",
        &["front"],
        &[
            "mesh.service=web",
            "mesh.port=80/tcp,80/udp",
            "mesh.publish=8081:80/tcp",
        ],
    );
    let bweb1 = run_on(
        e1,
        "bweb1",
        &["back"],
        &["mesh.service=web", "mesh.port=80/tcp,80/udp"],
    );
    let bweb2 = run_on(
        e2,
        "bweb2",
        &["back"],
        &["mesh.service=web", "mesh.port=80/tcp,80/udp"],
    );
    // Their resolver asks the agent on their node (Docker's embedded DNS
    // forwards from inside the container, so the agent sees its address).
    let subnet = agents[0].status().expect("status").node.subnet;
    let gateway = subnet.replace(".0/24", ".1");
    run_with(e1, "client", &["front"], &[], &["--dns", &gateway]);
    run_with(e1, "both", &["front", "back"], &[], &["--dns", &gateway]);
    let front_vip = vip(&agents[0], "web", "front", 1);
    let back_vip = vip(&agents[0], "web", "back", 2);
    println!("web: front VIP {front_vip} ({fweb:?}), back VIP {back_vip} ({bweb1:?}, {bweb2:?})");
    assert!(front_vip.starts_with("10.44.0."), "{front_vip}");
    assert!(back_vip.starts_with("10.50.0."), "{back_vip}");
    println!("n1$ meshctl status (services)");
    for s in &agents[0].status().expect("status").services {
        println!("  {} {} {} active {}", s.name, s.network, s.vip, s.active);
    }

    // DNS by the asker's network, from the agent on its node.
    let by_front = nslookup_on(e1, "front", "web.mesh", &gateway);
    let by_back = nslookup_on(e1, "back", "web.mesh", &gateway);
    let tasks_front = nslookup_on(e1, "front", "tasks.web.mesh", &gateway);
    println!(
        "web.mesh from front: {by_front:?}; from back: {by_back:?}; tasks from front: {tasks_front:?}"
    );
    assert_eq!(by_front, std::slice::from_ref(&front_vip));
    assert_eq!(by_back, std::slice::from_ref(&back_vip));
    assert_eq!(tasks_front, fweb);
    // A name only another network has does not exist for this one.
    run_on(
        e2,
        "bonly",
        &["back"],
        &["mesh.service=backonly", "mesh.port=80/tcp"],
    );
    vip(&agents[0], "backonly", "back", 1);
    let none = nslookup_on(e1, "front", "backonly.mesh", &gateway);
    println!("backonly.mesh from front: {none:?}");
    assert!(none.is_empty(), "{none:?}");

    // Prometheus (Debian's) on node 1 finds every backend of the cluster
    // through the agent's HTTP service discovery, with their labels.
    let found = prometheus_targets(e1, 4);
    println!("Prometheus on n1 discovered: {found:?}");
    let want: Vec<(String, String, String, String)> = [
        (format!("{}:80", bweb1[0]), "web", "back", "n1"),
        (format!("{}:80", bweb2[0]), "web", "back", "n2"),
        (format!("{}:80", fweb[0]), "web", "front", "n2"),
    ]
    .into_iter()
    .map(|(a, s, n, node)| (a, s.into(), n.into(), node.into()))
    .collect();
    for w in &want {
        assert!(found.contains(w), "{w:?} in {found:?}");
    }

    // The client reaches its network's service by name and by VIP, and a
    // ping to it by name is answered.
    let before: Vec<_> = engines.iter().map(Engine::mesh_counters).collect();
    let (ok, err) = ask(e1, "client", "tcp", &format!("{front_vip}:80"), 10);
    println!("client -> front VIP tcp: {ok} ok, {err} failed");
    if err > 0 {
        for (i, e) in engines.iter().enumerate() {
            let now = e.mesh_counters();
            let moved: Vec<String> = now
                .iter()
                .filter(|(k, v)| before[i].get(*k) != Some(*v))
                .map(|(k, v)| format!("{k} +{}", v - before[i].get(k).copied().unwrap_or(0)))
                .collect();
            println!("n{}: {}", i + 1, moved.join(", "));
        }
    }
    assert_eq!((ok, err), (10, 0));
    let (ok, err) = ask(e1, "client", "tcp", "web:80", 10);
    println!("client -> web:80 tcp (by name): {ok} ok, {err} failed");
    assert_eq!((ok, err), (10, 0));
    let ping = e1.docker(&["exec", "client", "ping", "-c", "2", "-W", "2", "web"]);
    let ping = String::from_utf8_lossy(&ping.stdout);
    println!(
        "client$ ping -c 2 web: {} / {}",
        ping.lines().next().unwrap_or(""),
        ping.lines().find(|l| l.contains("packets")).unwrap_or("")
    );
    assert!(ping.contains(&format!("({front_vip})")), "{ping}");
    assert!(ping.contains("2 packets received"), "{ping}");
    // From the container on both, the name is its first network's (the
    // one its resolver's queries leave from); each VIP answers.
    let (ok, err) = ask(e1, "both", "tcp", "web:80", 5);
    println!("both -> web:80 tcp (by name): {ok} ok, {err} failed");
    assert_eq!((ok, err), (5, 0));

    // Not back's: by VIP, by task here and by task on the other node. Each
    // datagram is one drop, counted.
    let before = e1.mesh_counters();
    let n = 5;
    let mut answered = 0;
    for target in [&back_vip, &bweb1[0], &bweb2[0]] {
        let (ok, err) = ask(e1, "client", "udp", &format!("{target}:80"), n);
        println!("client -> back's {target} udp: {ok} ok, {err} failed");
        answered += ok;
    }
    let after = e1.mesh_counters();
    let dropped = after["net_isolated"] - before["net_isolated"];
    println!("net_isolated on n1: +{dropped} for {} attempts", 3 * n);
    assert_eq!(answered, 0);
    assert_eq!(dropped, 3 * n as u64);
    let ping = e1.docker(&["exec", "client", "ping", "-c", "1", "-W", "1", &back_vip]);
    assert!(
        !ping.status.success(),
        "a ping to back's VIP is not answered"
    );

    // A published port answers for a service of any network: from outside
    // through node 1 (the replica is on node 2), the client's address kept.
    let outside = underlay.outside(100);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.name])
        .arg(mesh_tests::dockerlab::whoami_bin())
        .args(["ask", "tcp", &format!("{}:8081", underlay.addr(1))])
        .args(["--count", "5", "--timeout-ms", "3000", "--peer"])
        .output()
        .expect("whoami ask");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("outside -> n1:8081 (front's web, published):\n{text}");
    let client = underlay.outside_addr(100);
    let seen = text
        .lines()
        .filter(|l| l.contains(" ok fweb ") && l.contains(&client))
        .count();
    assert_eq!(seen, 5, "{text}");

    // A container on both networks reaches both services.
    for (target, what) in [(&front_vip, "front"), (&back_vip, "back")] {
        let (ok, err) = ask(e1, "both", "tcp", &format!("{target}:80"), 10);
        println!("both -> {what} VIP tcp: {ok} ok, {err} failed");
        assert_eq!((ok, err), (10, 0), "{what}");
    }

    // `network rm` is refused while containers use it, from any node.
    let (ok, refused) = meshctl(e1, &["network", "rm", "back"]);
    println!("n1$ meshctl network rm back\n{refused}");
    assert!(!ok && refused.contains("in use"), "{refused}");
    assert!(
        refused.contains("bweb2"),
        "names the other node's container: {refused}"
    );
    for (e, c) in [(e1, "bweb1"), (e2, "bweb2"), (e2, "bonly")] {
        e.docker_ok(&["rm", "-f", c]);
    }
    e1.docker_ok(&["network", "disconnect", "back", "both"]);
    let start = Instant::now();
    let removed = loop {
        let (ok, text) = meshctl(e1, &["network", "rm", "back"]);
        if ok || start.elapsed() > WAIT {
            break (ok, text);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "n1$ meshctl network rm back (after its containers left)\n{}",
        removed.1
    );
    assert!(removed.0, "{}", removed.1);
    // Gone from both engines.
    for e in &engines {
        let start = Instant::now();
        while e.docker(&["network", "inspect", "back"]).status.success() {
            assert!(start.elapsed() < WAIT, "back's Docker network stays");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let left: Vec<String> = networks(e2)
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    println!("n2: networks after rm: {left:?}");
    assert_eq!(left, ["mesh", "front"]);
}

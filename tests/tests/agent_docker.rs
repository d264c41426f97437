//! mesh-agent with a real Docker engine (needs root): labelled containers
//! become backends of a VIP, balanced in the kernel. Each test starts its
//! own dockerd in its own network namespace.

use std::time::Duration;

use mesh_tests::dockerlab::{Agent, Engine, Underlay};

const WAIT: Duration = Duration::from_secs(30);

fn whoami_vip(agent: &Agent, active: usize) -> String {
    let st = agent.wait_for(
        &format!("whoami with {active} active backends"),
        WAIT,
        |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == active && x.draining == 0)
        },
    );
    st.services
        .iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip.clone())
        .expect("whoami listed")
}

#[test]
fn docker_labelled_containers_share_a_vip_that_survives_restart() {
    let engine = Engine::start();
    engine.import_whoami();
    // A quick sweep and a short close timeout, to see the sweep work; the
    // client's connects translated per packet, so conntrack tracks them.
    let mut agent = Agent::start(
        &engine,
        &[
            "--ct-sweep-interval",
            "0.5",
            "--ct-tcp-closed-timeout",
            "1",
            "--no-container-socket-lb",
        ],
    );
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    for n in ["w1", "w2", "w3"] {
        engine.run_whoami(n, &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"], &[]);
    }
    engine.run_whoami("client", &[], &[]);
    let vip = whoami_vip(&agent, 3);
    println!("whoami VIP {vip}");

    for proto in ["tcp", "udp"] {
        let (names, errors) = engine.ask(proto, &format!("{vip}:80"), 300, 0);
        println!("{proto}: 300 requests: {names:?}");
        assert!(errors.is_empty(), "{proto} failures: {errors:?}");
        assert_eq!(
            names.keys().cloned().collect::<Vec<_>>(),
            ["w1", "w2", "w3"],
            "{proto}: all three reached"
        );
    }

    // What users look at: meshctl status and /metrics.
    let table = mesh_agent::ctl::execute(&mesh_agent::ctl::Args {
        bpffs_dir: agent.bpffs_dir.clone(),
        json: false,
        cmd: mesh_agent::ctl::Cmd::Status {
            api_socket: agent.api_socket.clone(),
        },
    })
    .expect("meshctl status");
    println!("{table}");
    assert!(table.contains("docker:  connected"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("whoami") && l.contains(&vip) && l.contains("80/tcp -> 80")),
        "{table}"
    );
    let scrape = || {
        engine.ns.run(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .expect("request");
            let mut body = String::new();
            s.read_to_string(&mut body).expect("response");
            body
        })
    };
    let value = |metrics: &str, series: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    // The agent's sweep removes the 300 closed TCP connections' pairs.
    let start = std::time::Instant::now();
    let mut metrics = scrape();
    while value(
        &metrics,
        "mesh_conntrack_expired_total{state=\"tcp_closed\"}",
    ) < 300
        && start.elapsed() < std::time::Duration::from_secs(15)
    {
        std::thread::sleep(std::time::Duration::from_millis(250));
        metrics = scrape();
    }
    let sweep: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_conntrack"))
        .collect();
    println!(
        "sweep after {:.1} s: {sweep:#?}",
        start.elapsed().as_secs_f64()
    );
    assert!(
        value(
            &metrics,
            "mesh_conntrack_expired_total{state=\"tcp_closed\"}"
        ) >= 300,
        "the closed connections expired: {sweep:#?}"
    );
    assert!(value(&metrics, "mesh_conntrack_sweeps_total") >= 1);
    assert_eq!(value(&metrics, "mesh_conntrack_sweep_errors_total"), 0);
    for want in [
        "HTTP/1.0 200 OK",
        "mesh_service_packets_total{service=\"whoami\"",
        "mesh_service_new_flows_total{service=\"whoami\"",
        "mesh_drops_total{reason=\"lb_no_backend\"} 0",
        "mesh_datapath_packets_total{counter=\"lb_new_flow\"}",
        "mesh_reconcile_duration_seconds_count",
        "mesh_docker_event_to_map_seconds{quantile=\"0.99\"}",
    ] {
        assert!(metrics.contains(want), "/metrics has {want}:\n{metrics}");
    }
    let flows_line = metrics
        .lines()
        .find(|l| l.starts_with("mesh_service_new_flows_total") && l.contains("/tcp"))
        .expect("tcp flows");
    let flows: u64 = flows_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(
        flows >= 300,
        "300 TCP connections counted as new flows: {flows_line}"
    );

    agent.restart();
    let again = whoami_vip(&agent, 3);
    assert_eq!(again, vip, "the VIP is the same after an agent restart");
    let (names, errors) = engine.ask("tcp", &format!("{vip}:80"), 30, 0);
    assert!(
        errors.is_empty() && names.len() == 3,
        "{names:?} {errors:?}"
    );
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// (unix ms, Ok(name) | Err(line)) per request of a finished `ask`.
fn results(child: std::process::Child) -> Vec<(u128, Result<String, String>)> {
    let out = child.wait_with_output().expect("ask finishes");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let t: u128 = f.next()?.parse().ok()?;
            match (f.next()?, f.next().unwrap_or("")) {
                ("ok", name) => Some((t, Ok(name.to_string()))),
                ("err", _) => Some((t, Err(l.to_string()))),
                _ => None,
            }
        })
        .collect()
}

fn start_three() -> (Engine, Agent, String) {
    let engine = Engine::start();
    engine.import_whoami();
    let agent = Agent::start(&engine, &[]);
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    for n in ["w1", "w2", "w3"] {
        let id = engine.run_whoami(n, &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"], &[]);
        assert!(!id.is_empty());
    }
    engine.run_whoami("client", &[], &[]);
    let vip = whoami_vip(&agent, 3);
    (engine, agent, vip)
}

#[test]
fn docker_stop_drains_at_once_and_start_brings_it_back() {
    let engine = Engine::start();
    engine.import_whoami();
    let agent = Agent::start(&engine, &[]);
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    for n in ["w1", "w2", "w3"] {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            n,
            "--hostname",
            n,
            "--network",
            "mesh",
        ];
        args.extend([
            "--label",
            "mesh.service=whoami",
            "--label",
            "mesh.port=80/tcp",
        ]);
        args.extend([
            mesh_tests::dockerlab::WHOAMI_IMAGE,
            "serve",
            "--tcp",
            "80",
            "--term-delay-ms",
            "3000",
        ]);
        engine.docker_ok(&args);
    }
    engine.run_whoami("client", &[], &[]);
    let vip = whoami_vip(&agent, 3);
    let target = format!("{vip}:80");

    let loop1 = engine.ask_in_background("tcp", &target, 800, 10, 2000);
    std::thread::sleep(Duration::from_secs(1));
    let stop_at = now_ms();
    engine.docker_ok(&["stop", "w2"]);
    let stopped_at = now_ms();
    let r1 = results(loop1);
    assert_eq!(r1.len(), 800, "every request of the loop accounted for");
    let late: Vec<_> = r1
        .iter()
        .filter(|(t, r)| *t > stop_at + 1000 && r.as_deref() == Ok("w2"))
        .collect();
    let errors: Vec<_> = r1.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "docker stop w2 took {} ms (w2 kept serving 3 s after SIGTERM); {} requests, {} answered by w2 more than 1 s after the stop, {} failed",
        stopped_at - stop_at,
        r1.len(),
        late.len(),
        errors.len()
    );
    assert!(
        late.is_empty(),
        "new requests reached the stopping container: {late:?}"
    );
    assert!(
        errors.is_empty(),
        "requests failed while w2 stopped: {errors:?}"
    );

    engine.docker_ok(&["start", "w2"]);
    let started_at = now_ms();
    let r2 = results(engine.ask_in_background("tcp", &target, 300, 10, 2000));
    assert_eq!(r2.len(), 300, "every request of the loop accounted for");
    let first_w2 = r2
        .iter()
        .find(|(_, r)| r.as_deref() == Ok("w2"))
        .map(|(t, _)| *t);
    let back_after = first_w2.map(|t| t.saturating_sub(started_at));
    println!("docker start w2: first request answered by w2 after {back_after:?} ms");
    // A started container is a backend again at once (the start event):
    // 5 s holds on a machine several times slower than the measured figure.
    assert!(
        back_after.is_some_and(|ms| ms <= 5000),
        "w2 back within 5 s: {back_after:?}"
    );
    assert!(
        r2.iter().all(|(_, r)| r.is_ok()),
        "no failures after the start"
    );

    let st = agent.status().expect("status");
    println!(
        "event-to-map latency over {} events: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        st.event_to_map_ms.samples,
        st.event_to_map_ms.p50,
        st.event_to_map_ms.p99,
        st.event_to_map_ms.max
    );
}

#[test]
fn docker_agent_kill9_loses_no_request_and_adopts_what_changed() {
    let (engine, mut agent, vip) = start_three();
    let target = format!("{vip}:80");

    // A continuous loop of 2,000 requests; the agent dies in the middle and
    // comes back 2 s later.
    let client = engine.ask_in_background("tcp", &target, 2000, 4, 2000);
    std::thread::sleep(Duration::from_secs(2));
    agent.kill9();
    std::thread::sleep(Duration::from_secs(2));
    agent.restart();
    let r = results(client);
    let failed: Vec<_> = r.iter().filter(|(_, x)| x.is_err()).collect();
    println!(
        "{} requests across a kill -9 and restart of the agent: {} failed",
        r.len(),
        failed.len()
    );
    assert_eq!(r.len(), 2000);
    assert!(failed.is_empty(), "{failed:?}");

    // A container removed while the agent is down is gone after the restart.
    agent.wait_for("restarted agent has reconciled", WAIT, |s| {
        s.reconcile.passes > 0 && s.docker.connected
    });
    agent.kill9();
    let w3_ip = engine.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}}",
        "w3",
    ]);
    engine.docker_ok(&["rm", "-f", "w3"]);
    agent.restart();
    whoami_vip(&agent, 2);
    let lb = mesh_agent::dataplane::lb::LbMaps::from_pins(&agent.bpffs_dir).expect("pinned maps");
    let actual = lb.read_actual().expect("read maps");
    let ips: Vec<String> = actual
        .backends
        .values()
        .map(|b| std::net::Ipv4Addr::from(u32::from_be(b.ip_be)).to_string())
        .collect();
    println!("backends in the kernel after the restart: {ips:?} (w3 was {w3_ip})");
    assert!(!ips.contains(&w3_ip), "w3 is gone from the maps");
    assert_eq!(ips.len(), 4, "w1 and w2, TCP and UDP");
    let (names, errors) = engine.ask("tcp", &target, 50, 0);
    assert!(
        errors.is_empty() && names.len() == 2,
        "{names:?} {errors:?}"
    );
}

#[test]
fn docker_bad_labels_are_reported_and_harm_nothing_else() {
    let (engine, agent, vip) = start_three();
    engine.run_whoami("bad-port", &["mesh.service=whoami", "mesh.port=70000"], &[]);
    engine.run_whoami(
        "bad-proto",
        &["mesh.service=other", "mesh.port=80/sctp"],
        &[],
    );
    engine.run_whoami(
        "bad-name",
        &["mesh.service=not_a_name", "mesh.port=80"],
        &[],
    );
    let st = agent.wait_for("three skipped containers", WAIT, |s| s.skipped.len() == 3);
    for s in &st.skipped {
        println!("skipped {}: {}", s.container, s.error);
    }
    let why = |c: &str| {
        st.skipped
            .iter()
            .find(|s| s.container == c)
            .map(|s| s.error.clone())
            .unwrap_or_default()
    };
    assert!(why("bad-port").contains("outside 1-65535"));
    assert!(why("bad-proto").contains("unknown protocol"));
    assert!(why("bad-name").contains("not a DNS label"));
    assert!(
        agent.log_text().contains("outside 1-65535"),
        "the log says why too"
    );
    let svc = st
        .services
        .iter()
        .find(|s| s.name == "whoami")
        .expect("whoami");
    assert_eq!(
        (svc.active, svc.vip.as_str()),
        (3, vip.as_str()),
        "whoami untouched"
    );
    assert!(!st.services.iter().any(|s| s.name == "other"));
    let (names, errors) = engine.ask("tcp", &format!("{vip}:80"), 60, 0);
    assert!(
        errors.is_empty() && names.len() == 3,
        "{names:?} {errors:?}"
    );
}

#[test]
fn docker_health_checks_gate_backends() {
    let (engine, agent, vip) = start_three();
    engine.run_whoami(
        "h1",
        &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"],
        &[
            "--health-cmd",
            "/whoami health",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-timeout",
            "1s",
        ],
    );
    whoami_vip(&agent, 4);
    engine.docker_ok(&["exec", "h1", "/whoami", "sick"]);
    agent.wait_for("unhealthy h1 out", WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active == 3 && x.waiting == 1)
    });
    let (names, errors) = engine.ask("tcp", &format!("{vip}:80"), 60, 0);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(names.values().sum::<usize>(), 60, "{names:?}");
    assert!(
        !names.contains_key("h1"),
        "no request reaches an unhealthy container: {names:?}"
    );
    engine.docker_ok(&["exec", "h1", "/whoami", "well"]);
    whoami_vip(&agent, 4);
}

#[test]
fn docker_agent_refuses_a_conflicting_mesh_network() {
    let engine = Engine::start();
    engine.docker_ok(&["network", "create", "--subnet", "10.99.0.0/24", "mesh"]);
    let mut agent = Agent::start(&engine, &[]);
    let status = agent.wait_exit(WAIT).expect("the agent exits");
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains("already exists") && log.contains("10.99.0.0/24"),
        "{log}"
    );
    // The user's network is untouched.
    let subnet = engine.docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        "mesh",
    ]);
    assert_eq!(subnet, "10.99.0.0/24");
}

/// `nslookup NAME` (busybox) in the client container: the addresses answered.
fn nslookup(engine: &Engine, args: &[&str]) -> Vec<String> {
    let mut a = vec!["exec", "client", "nslookup"];
    a.extend(args);
    let out = String::from_utf8_lossy(&engine.docker(&a).stdout).to_string();
    // busybox prints the server first ("Server:", "Address: 127.0.0.11:53"),
    // then one "Address: IP" (or "... service = PRIO WEIGHT PORT TARGET")
    // per answer.
    out.split("\n\n")
        .skip(1)
        .flat_map(|block| block.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| {
            let srv = l.split_once("service = ").map(|(_, v)| v.to_owned());
            l.strip_prefix("Address: ").map(str::to_owned).or(srv)
        })
        .collect()
}

fn ip_of(engine: &Engine, name: &str) -> String {
    engine.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}}",
        name,
    ])
}

#[test]
fn docker_containers_resolve_service_names_with_no_extra_flags() {
    let engine = Engine::start();
    engine.import_whoami();
    engine.import_glibc_client();
    // The upstream resolver for other names: a fake one in the engine's namespace.
    let _upstream = engine
        .ns
        .spawn(|| mesh_tests::dnslab::fake_upstream("127.0.0.2:53"));
    let agent = Agent::start(&engine, &["--dns-upstream", "127.0.0.2:53"]);
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    for n in ["w1", "w2"] {
        engine.run_whoami(n, &["mesh.service=whoami", "mesh.port=80/tcp,53/udp"], &[]);
    }
    engine.run_whoami("client", &[], &[]);
    let vip = whoami_vip(&agent, 2);

    let first = nslookup(&engine, &["whoami"]);
    assert_eq!(
        first,
        std::slice::from_ref(&vip),
        "NAME -> VIP from a plain container"
    );
    assert_eq!(
        nslookup(&engine, &["whoami.mesh"]),
        std::slice::from_ref(&vip)
    );
    let mut tasks = nslookup(&engine, &["tasks.whoami"]);
    tasks.sort();
    let mut want = vec![ip_of(&engine, "w1"), ip_of(&engine, "w2")];
    want.sort();
    assert_eq!(tasks, want, "tasks.NAME -> every backend");
    let srv = nslookup(&engine, &["-type=SRV", "_whoami._tcp.mesh"]);
    assert_eq!(srv, ["0 0 80 whoami.mesh"], "SRV lists the port");
    assert_eq!(
        nslookup(&engine, &["upstream.example"]),
        [mesh_tests::dnslab::UPSTREAM_ANSWER.to_string()],
        "forwarded"
    );

    // A glibc client (getaddrinfo through nsswitch) in a plain container.
    let getent = engine.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "mesh",
        "mesh-glibc:test",
        "/usr/bin/getent",
        "hosts",
        "whoami",
    ]);
    assert!(getent.starts_with(&vip), "getent hosts whoami: {getent:?}");

    // From the host, with dig, on the agent's address.
    let dig = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", engine.ns.name))
        .args(["dig", "@10.42.0.1", "+short", "+time=2", "whoami.mesh"])
        .output()
        .expect("dig");
    assert_eq!(
        String::from_utf8_lossy(&dig.stdout).trim(),
        vip,
        "dig from the host"
    );

    // Scale up and down: tasks follows within a second.
    engine.run_whoami(
        "w3",
        &["mesh.service=whoami", "mesh.port=80/tcp,53/udp"],
        &[],
    );
    let w3 = ip_of(&engine, "w3");
    let start = std::time::Instant::now();
    while !nslookup(&engine, &["tasks.whoami"]).contains(&w3) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "w3 appears in tasks.whoami"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "w3 in tasks.whoami {:?} after docker run returned",
        start.elapsed()
    );
    let w1 = ip_of(&engine, "w1");
    engine.docker_ok(&["stop", "-t", "1", "w1"]);
    let mut tasks = nslookup(&engine, &["tasks.whoami"]);
    tasks.sort();
    let mut want = vec![ip_of(&engine, "w2"), w3];
    want.sort();
    assert_eq!(tasks, want, "after docker stop w1 ({w1})");
    assert_eq!(nslookup(&engine, &["whoami"]), [vip], "the VIP stays");
}

/// The agent's /metrics pass `promtool check metrics` (Debian's
/// Prometheus): names, units, help and types as Prometheus wants them.
#[test]
fn docker_metrics_pass_promtool() {
    // A node of a cluster (alone), so every family is there.
    let underlay = Underlay::new();
    let engine = Engine::start();
    underlay.attach(&engine, 1);
    engine.import_whoami();
    let key = engine.write_cluster_key();
    let key = key.display().to_string();
    let agent = Agent::start(
        &engine,
        &[
            "--cluster-key-file",
            &key,
            "--node-name",
            "n1",
            "--mtu",
            "1350",
        ],
    );
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    engine.run_whoami("w1", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    whoami_vip(&agent, 1);
    let body = engine.ns.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("/metrics");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("ask");
        let mut out = String::new();
        s.take(4 << 20).read_to_string(&mut out).expect("read");
        out
    });
    let metrics = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .expect("an HTTP answer");
    assert!(metrics.contains("mesh_service_bytes_total"), "{metrics}");
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), metrics.as_bytes())
        .expect("to promtool");
    let out = check.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check metrics on {} lines: {}",
        metrics.lines().count(),
        if said.trim().is_empty() {
            "clean"
        } else {
            said.trim()
        }
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// `nslookup NAME` in a new container on Docker network `network` (not
/// `mesh`): the addresses answered.
fn nslookup_on(engine: &Engine, network: &str, name: &str) -> Vec<String> {
    engine.nslookup(network, name, None)
}

/// The engine's own networks use the agent's DNS too (the engine's `--dns`
/// is the agent's address, as the README configures it): a container on
/// the default bridge and one on a user-defined bridge resolve mesh names
/// and forwarded names; a host on the underlay whose packets reach the
/// same address gets nothing.
#[test]
fn docker_the_engines_other_networks_resolve_names_and_the_underlay_does_not() {
    let underlay = Underlay::new();
    let engine = Engine::start();
    underlay.attach(&engine, 1);
    engine.import_whoami();
    let _upstream = engine
        .ns
        .spawn(|| mesh_tests::dnslab::fake_upstream("127.0.0.2:53"));
    let agent = Agent::start(&engine, &["--dns-upstream", "127.0.0.2:53"]);
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    engine.run_whoami("w1", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    let vip = whoami_vip(&agent, 1);
    engine.docker_ok(&["network", "create", "--subnet", "172.30.5.0/24", "userbr"]);
    let upstream = mesh_tests::dnslab::UPSTREAM_ANSWER.to_string();
    for network in ["bridge", "userbr"] {
        let start = std::time::Instant::now();
        // The agent learns of a new network from Docker's events.
        let mut got = nslookup_on(&engine, network, "whoami.mesh");
        while got.is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(500));
            got = nslookup_on(&engine, network, "whoami.mesh");
        }
        println!("{network}: whoami.mesh -> {got:?}");
        assert_eq!(got, std::slice::from_ref(&vip), "{network}: a mesh name");
        assert_eq!(
            nslookup_on(&engine, network, "upstream.example"),
            std::slice::from_ref(&upstream),
            "{network}: a forwarded name"
        );
    }

    let outside = underlay.outside(100);
    underlay.steer("10.42.0.0/16", 1);
    let dig = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.name, "dig", "@10.42.0.1"])
        .args(["+time=1", "+tries=2", "whoami.mesh"])
        .output()
        .expect("dig");
    let dig = String::from_utf8_lossy(&dig.stdout);
    println!(
        "dig from the underlay: {}",
        dig.lines().find(|l| l.contains(";;")).unwrap_or("")
    );
    assert!(
        !dig.contains("ANSWER SECTION") && !dig.contains("status:"),
        "the underlay gets no DNS answer: {dig}"
    );
}

/// A host that forwarded IP before dockerd started: Docker leaves the
/// FORWARD policy at ACCEPT, and the stack would route anything from the
/// underlay to a container. mesh drops such frames in the kernel: an
/// outsider whose network routes the cluster CIDR to this node gets no
/// answer from a container's address by ping, TCP or UDP, and every
/// attempt is counted; the container's own outbound connections still get
/// their answers.
#[test]
fn docker_containers_are_not_open_to_the_underlay_whatever_the_forward_policy() {
    let underlay = Underlay::new();
    let engine = Engine::start_forwarding();
    underlay.attach(&engine, 1);
    engine.import_whoami();
    let key = engine.write_cluster_key();
    let agent = Agent::in_container(&engine, Some(&key), &underlay.cluster_flags("n1", &[]));
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    let policy = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &engine.ns.name,
            "iptables",
            "-S",
            "FORWARD",
        ])
        .output()
        .expect("iptables");
    let policy = String::from_utf8_lossy(&policy.stdout);
    println!("FORWARD: {}", policy.lines().next().unwrap_or(""));
    assert!(
        policy.contains("-P FORWARD ACCEPT"),
        "the case under test: Docker left FORWARD at ACCEPT: {policy}"
    );
    engine.run_whoami("w1", &[], &[]);
    let w1 = ip_of(&engine, "w1");
    let outside = underlay.outside(100);
    underlay.steer("10.42.0.0/16", 1);
    let before = engine.mesh_counters();
    let tries = 3;
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &outside.name,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
        ])
        .args(["-W", "1", &w1])
        .output()
        .expect("ping");
    let ping = String::from_utf8_lossy(&ping.stdout).to_string();
    let (tcp, udp) = outside.run(|| {
        let tcp = (0..tries)
            .filter(|_| {
                std::net::TcpStream::connect_timeout(
                    &format!("{w1}:8000").parse().expect("address"),
                    Duration::from_secs(1),
                )
                .is_ok()
            })
            .count();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let udp = (0..tries)
            .filter(|_| {
                let _ = s.send_to(b"who", format!("{w1}:80"));
                s.recv_from(&mut [0u8; 512]).is_ok()
            })
            .count();
        (tcp, udp)
    });
    let after = engine.mesh_counters();
    let dropped = after.get("tunnel_unmarked").copied().unwrap_or(0)
        - before.get("tunnel_unmarked").copied().unwrap_or(0);
    println!(
        "outsider to {w1}: ping {:?}, tcp {tcp}/{tries}, udp {udp}/{tries} answered; \
         tunnel_unmarked +{dropped}",
        ping.lines().find(|l| l.contains("received"))
    );
    assert!(ping.contains(" 0 received"), "no ping answered: {ping}");
    assert_eq!((tcp, udp), (0, 0), "no TCP or UDP answered");
    // 3 echo requests, 3 SYNs (each retried at most once within its
    // second), 3 datagrams.
    assert!(
        (9..=12).contains(&dropped),
        "every attempt dropped and counted: {dropped}"
    );

    // The container's own connection out: answered (masqueraded by the
    // host, so addressed to the node).
    let server = outside.spawn(|| {
        let l = std::net::TcpListener::bind("0.0.0.0:9000").expect("listen");
        l.set_nonblocking(false).expect("blocking");
        let (mut c, _) = l.accept().expect("accept");
        std::io::Write::write_all(&mut c, b"hello from outside\n").expect("write");
    });
    let out = engine.docker_ok(&[
        "exec",
        "w1",
        "nc",
        "-w",
        "3",
        &underlay.outside_addr(100),
        "9000",
    ]);
    server.join().expect("server");
    assert_eq!(out, "hello from outside", "outbound connections work");
}

/// Sensible defaults on a real host: without --underlay-iface the agent
/// takes the default route's interface (and says so); a node whose VXLAN
/// port differs from the cluster's is refused at join, with a message that
/// names the port each side uses.
#[test]
fn docker_a_node_takes_the_default_route_and_another_vxlan_port_is_refused() {
    let underlay = Underlay::new();
    let (e1, e2) = (Engine::start(), Engine::start());
    underlay.attach(&e1, 1);
    underlay.attach(&e2, 2);
    let key = e1.write_cluster_key();
    let a1 = Agent::in_container(&e1, Some(&key), &underlay.cluster_flags("n1", &[]));
    a1.wait_for("n1 connected", WAIT, |s| s.docker.connected);
    let seed = format!("{}:7946", underlay.addr(1));
    let key_arg = key.display().to_string();
    let mut a2 = Agent::start(
        &e2,
        &[
            "--cluster-key-file",
            &key_arg,
            "--node-name",
            "n2",
            "--join",
            &seed,
            "--mtu",
            "1350",
            "--vxlan-port",
            "4790",
        ],
    );
    let status = a2.wait_exit(Duration::from_secs(60));
    let log = a2.log_text();
    println!(
        "n2: {status:?}; {}",
        log.lines()
            .filter(|l| l.contains("underlay:") || l.contains("VXLAN port"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "n2 is refused: {status:?}"
    );
    assert!(
        log.contains("underlay: the default route's interface") && log.contains("eth0"),
        "the underlay from the default route: {log}"
    );
    assert!(
        log.contains("this node's VXLAN port is 4790 but n1 uses 4789"),
        "the message names both ports: {log}"
    );
}

#[test]
fn docker_two_nodes_share_services_over_the_overlay() {
    let underlay = Underlay::new();
    let (e1, e2) = (Engine::start(), Engine::start());
    underlay.attach(&e1, 1);
    underlay.attach(&e2, 2);
    let key = e1.write_cluster_key();
    let a1 = Agent::in_container(&e1, Some(&key), &underlay.cluster_flags("n1", &[1, 2]));
    let a2 = Agent::in_container(&e2, Some(&key), &underlay.cluster_flags("n2", &[1, 2]));
    let s1 = a1.wait_for("n1 connected", WAIT, |s| s.docker.connected);
    let s2 = a2.wait_for("n2 connected", WAIT, |s| s.docker.connected);
    println!("node subnets: n1 {}, n2 {}", s1.node.subnet, s2.node.subnet);
    assert_ne!(s1.node.subnet, s2.node.subnet, "conflict-free /24s");

    e2.import_whoami();
    e1.import_whoami();
    let started = std::time::Instant::now();
    e2.run_whoami(
        "w1",
        &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"],
        &[],
    );
    let st = a1.wait_for("n1 learns w1 on n2", WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active == 1)
    });
    println!(
        "docker run on n2 -> backend in n1's maps: {:?}",
        started.elapsed()
    );
    e2.run_whoami(
        "w2",
        &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"],
        &[],
    );
    e1.run_whoami("client", &[], &[]);
    let vip = a1
        .wait_for("n1 sees both replicas", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
        })
        .services
        .iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip.clone())
        .expect("whoami");
    assert_eq!(st.services[0].vip, vip, "the VIP stays as replicas come");
    let vip2 = a2.wait_for("n2 agrees", WAIT, |s| {
        s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active == 2)
    });
    assert_eq!(
        vip2.services
            .iter()
            .find(|x| x.name == "whoami")
            .map(|x| x.vip.clone()),
        Some(vip.clone()),
        "same VIP on every node"
    );

    // From a client on the node without whoami, over the VIP: balanced at
    // the socket (the client's packets go to the replicas' own addresses,
    // nothing translated per packet).
    let before = (a1.counter("sock_vip_container"), a1.counter("lb_new_flow"));
    for proto in ["tcp", "udp"] {
        let (names, errors) = e1.ask(proto, &format!("{vip}:80"), 300, 0);
        println!("{proto} from n1 to the VIP, replicas on n2: {names:?}");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(names.len(), 2, "both replicas reached");
        assert!(names.values().all(|n| *n >= 60), "each >= 20%: {names:?}");
    }
    let after = (a1.counter("sock_vip_container"), a1.counter("lb_new_flow"));
    println!("n1: sock_vip_container {before:?} -> {after:?} (with lb_new_flow)");
    assert_eq!(after.0 - before.0, 600, "every connect and datagram");
    assert_eq!(after.1, before.1, "none translated per packet");
    let sockets = a1.status().expect("status").node.sockets;
    println!("n1$ meshctl status: sockets: {sockets}");
    assert!(
        sockets.contains("balanced at connect: 1 container(s)"),
        "{sockets}"
    );
    // Container to container by IP, across nodes.
    let w1 = e2.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}}",
        "w1",
    ]);
    let (names, errors) = e1.ask("tcp", &format!("{w1}:80"), 5, 0);
    assert!(
        errors.is_empty() && names.get("w1") == Some(&5),
        "{names:?} {errors:?}"
    );
    // And on one node: each packet handed straight to the other's veth,
    // both ways, not through the bridge.
    e1.run_whoami("neighbour", &[], &[]);
    let neighbour = e1.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}}",
        "neighbour",
    ]);
    let before = a1.counter("local_redirect");
    for proto in ["tcp", "udp"] {
        let (names, errors) = e1.ask(proto, &format!("{neighbour}:80"), 20, 0);
        assert!(
            errors.is_empty() && names.get("neighbour") == Some(&20),
            "{proto}: {names:?} {errors:?}"
        );
    }
    let redirected = a1.counter("local_redirect") - before;
    println!("client -> neighbour on n1, 20 TCP + 20 UDP requests: local_redirect +{redirected}");
    // At least a SYN, its answer and the request's data and reply per
    // connection, a datagram and its answer per UDP request.
    assert!(redirected >= 20 * 4 + 20 * 2, "{redirected}");

    // Both tunnels answer the probes; then the network drops VXLAN to node
    // 2 (gossip still passes): node 1 reports it within seconds, with the
    // port to open; passed again, the tunnel is back.
    let tunnel = |s: &mesh_agent::status::Status| {
        s.node.tunnels.iter().find(|t| t.peer == "n2").map(|t| t.up)
    };
    a1.wait_for("n2's tunnel answers", WAIT, |s| tunnel(s) == Some(true));
    let blocked = std::time::Instant::now();
    underlay.block_udp(2, 4789, true);
    let st = a1.wait_for("n2's tunnel reported down", WAIT, |s| {
        tunnel(s) == Some(false)
    });
    let line = st.node.tunnels_line().unwrap_or_default();
    println!(
        "VXLAN to n2 blocked: after {:?}: tunnels: {line}",
        blocked.elapsed()
    );
    assert!(
        st.node.peers.contains(&"n2".to_string()),
        "gossip still reaches n2"
    );
    assert!(
        line.contains("n2 NO ANSWER") && line.contains("must pass UDP 4789"),
        "{line}"
    );
    underlay.block_udp(2, 4789, false);
    a1.wait_for("n2's tunnel back", WAIT, |s| tunnel(s) == Some(true));

    // The node table (`meshctl nodes`) as node 1's agent answers it.
    let nodes = || -> Vec<mesh_agent::status::NodeRow> {
        let raw = mesh_agent::api::ask(&a1.api_socket, "nodes").expect("the agent answers");
        serde_json::from_str(&raw).expect("a node table")
    };
    let row = |rows: &[mesh_agent::status::NodeRow], name: &str| {
        rows.iter().find(|r| r.name == name).cloned()
    };
    let table = nodes();
    println!("meshctl nodes on n1: {table:?}");
    let n2 = row(&table, "n2").expect("n2 listed");
    assert!(row(&table, "n1").is_some_and(|r| r.this && r.state == "alive"));
    assert_eq!(
        (n2.state.as_str(), n2.underlay.as_str(), n2.version.as_str()),
        (
            "alive",
            underlay.addr(2).as_str(),
            env!("CARGO_PKG_VERSION")
        )
    );
    assert!(n2.tunnel.starts_with("ok"), "{n2:?}");
    assert_eq!(n2.subnet, s2.node.subnet);

    // Node 2 is cut off: its backends leave node 1's maps within 5 s.
    let cut = std::time::Instant::now();
    underlay.set_link(2, false);
    a1.wait_for("n2's backends gone from n1", Duration::from_secs(10), |s| {
        !s.services
            .iter()
            .any(|x| x.name == "whoami" && x.active > 0)
    });
    let gone = cut.elapsed();
    println!("n2 cut off: its backends left n1's maps after {gone:?}");
    let n2 = row(&nodes(), "n2").expect("n2 still listed");
    println!("n2 in n1's node table after the cut: {n2:?}");
    assert_eq!(n2.state, "dead", "{n2:?}");
    assert!(
        gone <= Duration::from_secs(5) + Duration::from_millis(500),
        "within 5 s (status polled every 50 ms)"
    );
}

/// The program a pinned link runs, by tag.
fn running_tag(pin: &std::path::Path) -> u64 {
    use aya::programs::links::{FdLink, PinnedLink};
    let link = FdLink::from(PinnedLink::from_pin(pin).expect("pinned link"));
    let id = link.info().expect("link info").program_id();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
        .expect("the link's program is loaded")
}

/// An upgrade: the pinned container links run another program (standing in
/// for an older build: here the egress program, which passes direct traffic
/// but balances nothing); the restarted agent finds the tags differ and
/// switches every link to its own program in one step, while direct
/// requests keep flowing; then the VIP balances again.
#[test]
fn docker_an_upgrade_switches_pinned_programs_under_traffic() {
    use aya::programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    };
    use mesh_agent::dataplane::{self, progs};
    let (engine, mut agent, vip) = start_three();
    let ingress_pins = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("tc_") && n.ends_with("_in") && !n.contains("underlay")
            })
            .collect()
    };
    // Every container's veth has its programs (the client's too) first.
    let start = std::time::Instant::now();
    while ingress_pins(&agent.bpffs_dir).len() < 4 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill9();
    let mut object = dataplane::load().expect("the object");
    let ours = dataplane::tc(&mut object, progs::TC_FROM_CONTAINER)
        .expect("program")
        .info()
        .expect("info")
        .tag();
    let pins = ingress_pins(&agent.bpffs_dir);
    assert_eq!(pins.len(), 4, "w1, w2, w3 and the client: {pins:?}");
    let old = dataplane::tc(&mut object, progs::TC_TO_CONTAINER).expect("program");
    for pin in &pins {
        let link = FdLink::from(PinnedLink::from_pin(pin).expect("pin"));
        let link = SchedClassifierLink::try_from(link).expect("a tcx link");
        let id = old.attach_to_link(link).expect("switch to the old program");
        drop(old.take_link(id).expect("link"));
        assert_ne!(running_tag(pin), ours, "the old build runs");
    }

    let w1 = ip_of(&engine, "w1");
    let loop_ = engine.ask_in_background("tcp", &format!("{w1}:80"), 1500, 4, 2000);
    std::thread::sleep(Duration::from_secs(1));
    agent.restart();
    agent.wait_for("the upgraded agent reconciled", WAIT, |s| {
        s.reconcile.passes > 0 && s.docker.connected
    });
    let r = results(loop_);
    let failed: Vec<_> = r.iter().filter(|(_, x)| x.is_err()).collect();
    println!(
        "{} direct requests across the upgrade: {} failed",
        r.len(),
        failed.len()
    );
    assert_eq!(r.len(), 1500);
    assert!(failed.is_empty(), "{failed:?}");
    for pin in &pins {
        assert_eq!(
            running_tag(pin),
            ours,
            "{}: this build's program",
            pin.display()
        );
    }
    let switched = agent
        .log_text()
        .matches("pinned link switched to this build's program")
        .count();
    assert_eq!(switched, 4, "one switch per link:\n{}", agent.log_text());
    let (names, errors) = engine.ask("tcp", &format!("{vip}:80"), 60, 0);
    assert!(
        errors.is_empty() && names.len() == 3,
        "{names:?} {errors:?}"
    );
}

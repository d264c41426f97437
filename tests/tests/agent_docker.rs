//! mesh-agent with a real Docker engine (needs root): labelled containers
//! become backends of a VIP, balanced in the kernel. Each test starts its
//! own dockerd in its own network namespace.

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::dockerlab::{Agent, Engine};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `whoami ask` in the client container; the answers by backend name,
/// and the failures.
fn ask(
    engine: &Engine,
    proto: &str,
    target: &str,
    count: u32,
    interval_ms: u32,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let out = engine.docker(&[
        "exec",
        "client",
        "/whoami",
        "ask",
        proto,
        target,
        "--count",
        &count.to_string(),
        "--interval-ms",
        &interval_ms.to_string(),
        "--timeout-ms",
        "2000",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut names = BTreeMap::new();
    let mut errors = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ' ');
        let (_, kind, rest) = (f.next(), f.next(), f.next().unwrap_or(""));
        match kind {
            Some("ok") => *names.entry(rest.to_string()).or_default() += 1,
            Some("err") => errors.push(line.to_string()),
            _ => {}
        }
    }
    (names, errors)
}

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
    let mut agent = Agent::start(&engine, &[]);
    agent.wait_for("docker connected", WAIT, |s| s.docker.connected);
    for n in ["w1", "w2", "w3"] {
        engine.run_whoami(n, &["mesh.service=whoami", "mesh.port=80/tcp,80/udp"], &[]);
    }
    engine.run_whoami("client", &[], &[]);
    let vip = whoami_vip(&agent, 3);
    println!("whoami VIP {vip}");

    for proto in ["tcp", "udp"] {
        let (names, errors) = ask(&engine, proto, &format!("{vip}:80"), 300, 0);
        println!("{proto}: 300 requests: {names:?}");
        assert!(errors.is_empty(), "{proto} failures: {errors:?}");
        assert_eq!(
            names.keys().cloned().collect::<Vec<_>>(),
            ["w1", "w2", "w3"],
            "{proto}: all three reached"
        );
    }

    agent.restart();
    let again = whoami_vip(&agent, 3);
    assert_eq!(again, vip, "the VIP is the same after an agent restart");
    let (names, errors) = ask(&engine, "tcp", &format!("{vip}:80"), 30, 0);
    assert!(
        errors.is_empty() && names.len() == 3,
        "{names:?} {errors:?}"
    );
}

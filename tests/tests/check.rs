//! `meshctl check` (two Docker hosts, agents run as the lab and the README
//! run them; needs root): both nodes agree; a backend removed from node
//! 1's kernel behind its agent's back (with the agent's own map writer) is
//! named, with node 1, by `meshctl check` on node 2 in one run, which then
//! fails; node 1's agent writes it again and both agree again.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use mesh_tests::dockerlab::{Engine, Hosts};

const WAIT: Duration = Duration::from_secs(60);

fn meshctl_check(e: &Engine) -> (bool, String) {
    let out: Output = e.docker(&["exec", mesh_lab::agent::NAME, "/meshctl", "check"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn docker_meshctl_check_names_a_node_whose_kernel_was_changed_behind_its_agent() {
    let hosts = Hosts::start(2);
    let (engines, agents) = (&hosts.engines, &hosts.agents);
    let (e1, e2) = (&engines[0], &engines[1]);
    e1.run_whoami("w1", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    e2.run_whoami("w2", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    for a in agents {
        a.wait_for("two replicas", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 2)
        });
    }

    // Both agree (the second node's report may take a gossip round).
    let start = Instant::now();
    let (ok, out) = loop {
        let (ok, out) = meshctl_check(e2);
        if ok || start.elapsed() > Duration::from_secs(20) {
            break (ok, out);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("n2$ meshctl check\n{out}");
    assert!(ok, "both nodes agree:\n{out}");
    assert!(out.contains("every node agrees"), "{out}");

    // Behind node 1's agent: one backend out of its kernel.
    let mut lb = mesh_agent::dataplane::lb::LbMaps::from_pins(&agents[0].bpffs_dir)
        .expect("node 1's pinned maps");
    let actual = lb.read_actual().expect("read");
    let (&id, b) = actual.backends.iter().next().expect("a backend");
    let addr = format!(
        "{}:{}",
        std::net::Ipv4Addr::from(u32::from_be(b.ip_be)),
        u16::from_be(b.port_be)
    );
    lb.clear_backend(id).expect("cleared");
    println!("cleared backend {id} ({addr}) in n1's kernel");
    let t = Instant::now();
    let (ok, out) = meshctl_check(e2);
    println!(
        "n2$ meshctl check ({:.1} s)\n{out}",
        t.elapsed().as_secs_f64()
    );
    assert!(!ok, "the check fails");
    let line = out
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_else(|| panic!("a row for n1:\n{out}"));
    assert!(line.contains("DIFFERS"), "{line}");
    assert!(
        line.contains(&format!("backend {id}: missing from the kernel")),
        "names the difference: {line}"
    );

    // The agent wrote it again: the next run agrees.
    let start = Instant::now();
    let (ok, out) = loop {
        let (ok, out) = meshctl_check(e2);
        if ok || start.elapsed() > Duration::from_secs(20) {
            break (ok, out);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "n2$ meshctl check, {:.1} s later\n{out}",
        start.elapsed().as_secs_f64()
    );
    assert!(ok, "agreement again:\n{out}");
    let again = lb.read_actual().expect("read");
    assert!(
        again
            .backends
            .values()
            .any(|x| x.ip_be == b.ip_be && x.port_be == b.port_be),
        "{addr} is back in n1's kernel"
    );
}

//! The cluster key rotates under traffic (two Docker hosts, agents run as
//! the lab and the README run them; needs root): each host's key file is
//! edited in place, one host at a time (the new key added, made primary,
//! the old one removed), the agents read it again by themselves, and a
//! request loop through a VIP to a replica on the other host loses
//! nothing while the hosts stay peers. Every loop is bounded.

use std::time::{Duration, Instant};

use mesh_tests::dockerlab::{Agent, Engine, Underlay};

const WAIT: Duration = Duration::from_secs(60);
const OLD: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const NEW: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

#[test]
fn docker_the_cluster_key_rotates_under_traffic_with_no_request_lost() {
    let underlay = Underlay::new();
    let engines: Vec<Engine> = (0..2).map(|_| Engine::start()).collect();
    let mut keys = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        underlay.attach(e, i as u8 + 1);
        e.import_whoami();
        keys.push(e.write_cluster_key());
    }
    let agents: Vec<Agent> = (1..=2u8)
        .map(|n| {
            let flags = underlay.cluster_flags(&format!("n{n}"), &[1]);
            Agent::in_container(
                &engines[n as usize - 1],
                Some(&keys[n as usize - 1]),
                &flags,
            )
        })
        .collect();
    for a in &agents {
        a.wait_for("one peer", WAIT, |s| {
            s.docker.connected && s.node.peers.len() == 1
        });
    }
    let first_ids = agents[0].status().expect("status").node.cluster_keys;
    println!("keys at start: {first_ids:?}");
    assert_eq!(first_ids.len(), 1);
    engines[1].run_whoami("w2", &["mesh.service=whoami", "mesh.port=80/tcp"], &[]);
    engines[0].run_whoami("client", &[], &[]);
    let vip = agents[0]
        .wait_for("whoami on n1", WAIT, |s| {
            s.services
                .iter()
                .any(|x| x.name == "whoami" && x.active == 1)
        })
        .services
        .iter()
        .find(|x| x.name == "whoami")
        .map(|x| x.vip.clone())
        .expect("whoami");

    // 300 requests, 100 ms apart: about 30 s, across the three steps.
    let loop_ = engines[0].ask_in_background("tcp", &format!("{vip}:80"), 300, 100, 2000);
    for (what, ring) in [
        ("add the new key", format!("{OLD}\n{NEW}\n")),
        ("make it primary", format!("{NEW}\n{OLD}\n")),
        ("remove the old key", format!("{NEW}\n")),
    ] {
        for (i, k) in keys.iter().enumerate() {
            // In place, as an editor or config management would.
            std::fs::write(k, &ring).expect("key file");
            let want = ring.lines().count();
            let start = Instant::now();
            loop {
                let st = agents[i].status().expect("status");
                if st.node.cluster_keys.len() == want {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "n{} reads its key file",
                    i + 1
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_secs(2));
            for a in &agents {
                assert_eq!(
                    a.status().expect("status").node.peers.len(),
                    1,
                    "{what}: still peers"
                );
            }
        }
        println!(
            "{what}: n1 keys {:?}",
            agents[0].status().expect("status").node.cluster_keys
        );
    }
    let out = loop_.wait_with_output().expect("the loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ok"))
        .count();
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("err"))
        .collect();
    println!(
        "the loop through {vip} during the rotation: {ok} ok, {} failed {failed:?}",
        failed.len()
    );
    assert_eq!((ok, failed.len()), (300, 0));
    let last = agents[1].status().expect("status").node.cluster_keys;
    assert_eq!(last.len(), 1);
    assert_ne!(last, first_ids, "the key in use is the new one");
    let line = std::process::Command::new("docker")
        .args(["-H", &format!("unix://{}", engines[0].socket.display())])
        .args(["exec", mesh_lab::agent::NAME, "/meshctl", "status"])
        .output()
        .expect("meshctl");
    let text = String::from_utf8_lossy(&line.stdout);
    println!(
        "n1$ meshctl status | grep keys: {}",
        text.lines().find(|l| l.starts_with("keys:")).unwrap_or("")
    );
}

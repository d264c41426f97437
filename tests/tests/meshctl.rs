//! meshctl against maps pinned in bpffs, after real packets went through
//! the data plane (needs root).

use std::path::PathBuf;

use mesh_agent::ctl::{Args, Cmd, CtlError, execute};
use mesh_tests::{fixtures::lb, harness::Harness};
use serde_json::Value;

/// A bpffs directory for this test, removed at the end.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ctl(dir: &PinDir, json: bool, cmd: Cmd) -> Result<String, CtlError> {
    execute(&Args {
        bpffs_dir: dir.0.clone(),
        json,
        cmd,
    })
}

fn json(dir: &PinDir, cmd: Cmd) -> Vec<Value> {
    let out = ctl(dir, true, cmd).unwrap_or_else(|e| panic!("meshctl: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("meshctl --json prints JSON ({e}): {out}"))
}

#[test]
fn views_show_what_the_kernel_did() {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/mesh-test-{}",
        std::process::id()
    )));
    let mut h = Harness::pinned(&dir.0);
    lb::install(&mut h);
    h.check(&lb::fixtures());

    // The web service is also published on 8080/tcp (routing mesh).
    h.lb.set_published(
        &mesh_common::lb::PublishedKey {
            port_be: 8080u16.to_be(),
            proto: mesh_common::lb::PROTO_TCP,
            _pad: 0,
        },
        &mesh_common::lb::Published { service_id: 1 },
    )
    .expect("published port");
    let services = json(&dir, Cmd::Services { published: false });
    assert_eq!(services.len(), 3, "{services:?}");
    let published = json(&dir, Cmd::Services { published: true });
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0]["service"], "10.43.0.10:80/tcp");
    assert_eq!(published[0]["published"][0], "8080/tcp");
    let web = services
        .iter()
        .find(|s| s["service"] == "10.43.0.10:80/tcp")
        .expect("web listed");
    assert_eq!(
        (web["ring_slots"].as_u64(), web["backends_in_ring"].as_u64()),
        (Some(1021), Some(1))
    );
    assert_eq!(
        (web["packets"].as_u64(), web["new_flows"].as_u64()),
        (Some(8), Some(2))
    );
    let empty = services
        .iter()
        .find(|s| s["service"] == "10.43.0.30:80/tcp")
        .expect("empty listed");
    assert_eq!(empty["backends_in_ring"].as_u64(), Some(0));

    // Every map of the inventory, pinned, with its kernel id and size.
    let maps = json(&dir, Cmd::Maps);
    let names: Vec<&str> = maps.iter().filter_map(|m| m["name"].as_str()).collect();
    let inventory: Vec<&str> = mesh_common::maps::ALL.iter().map(|d| d.name).collect();
    assert_eq!(names, inventory);
    for m in &maps {
        assert!(m["id"].as_u64().is_some(), "pinned: {m}");
        assert!(m["memlock"].as_u64().is_some_and(|b| b > 0), "memory: {m}");
    }
    let ct = maps
        .iter()
        .find(|m| m["name"] == "MESH_CT")
        .expect("conntrack listed");
    assert_eq!(ct["max_entries"].as_u64(), Some(262_144));
    let table = ctl(&dir, false, Cmd::Maps).expect("meshctl maps");
    assert!(
        table.contains("MESH_LOCAL_EPS") && !table.contains("NOT PINNED"),
        "{table}"
    );

    // No agent answers here: names are "-", the kernel's view is shown.
    let backends = json(
        &dir,
        Cmd::Backends {
            api_socket: dir.0.join("no-agent.sock"),
        },
    );
    let addrs: Vec<&str> = backends
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert_eq!(addrs, ["10.42.0.11:8080", "10.42.0.12:5353"]);
    assert!(backends.iter().all(|b| b["node"] == "-"), "{backends:?}");
    let of: Vec<&str> = backends
        .iter()
        .filter_map(|b| b["service"].as_str())
        .collect();
    assert_eq!(of, ["10.43.0.10:80/tcp", "10.43.0.20:53/udp"]);

    let ring = json(
        &dir,
        Cmd::Maglev {
            service: "10.43.0.10:80/tcp".into(),
        },
    );
    assert_eq!(ring.len(), 1);
    assert_eq!(
        (ring[0]["slots"].as_u64(), ring[0]["share_percent"].as_f64()),
        (Some(1021), Some(100.0))
    );

    // Three flows were balanced: two web connections and one DNS query.
    let flows = json(
        &dir,
        Cmd::Conntrack {
            service: None,
            all: false,
        },
    );
    assert_eq!(flows.len(), 3, "{flows:?}");
    let web_flows = json(
        &dir,
        Cmd::Conntrack {
            service: Some("10.43.0.10:80/tcp".into()),
            all: false,
        },
    );
    assert_eq!(web_flows.len(), 2);
    let first = &web_flows[0];
    assert_eq!(
        (
            first["src"].as_str(),
            first["dst"].as_str(),
            first["nat"].as_str()
        ),
        (
            Some("10.42.0.2:40000"),
            Some("10.43.0.10:80"),
            Some("10.42.0.11:8080")
        )
    );
    assert_eq!(first["tcp_flags"].as_str(), Some("SYN,ACK,FIN,RST"));
    assert_eq!(
        json(
            &dir,
            Cmd::Conntrack {
                service: None,
                all: true
            }
        )
        .len(),
        5,
        "forward + reverse, less the reverse entry a later direct flow on the same tuple superseded"
    );

    let stats = json(&dir, Cmd::Stats { all: false });
    let new_flows = stats
        .iter()
        .find(|s| s["counter"] == "lb_new_flow")
        .expect("lb_new_flow shown");
    assert_eq!(new_flows["packets"].as_u64(), Some(3));

    // Tables for people: a header and a row per item.
    let table = ctl(&dir, false, Cmd::Services { published: false }).expect("table");
    println!("{table}");
    assert!(table.starts_with("SERVICE"), "{table}");
    assert_eq!(table.lines().count(), 4);
    println!(
        "{}",
        ctl(
            &dir,
            false,
            Cmd::Conntrack {
                service: None,
                all: false
            }
        )
        .expect("table")
    );
    println!(
        "{}",
        ctl(
            &dir,
            false,
            Cmd::Maglev {
                service: "10.43.0.10:80/tcp".into()
            }
        )
        .expect("table")
    );

    // Bad input: clear errors.
    let e = ctl(
        &dir,
        false,
        Cmd::Maglev {
            service: "10.43.0.10:80".into(),
        },
    )
    .expect_err("bad syntax");
    assert!(e.to_string().contains("VIP:PORT/PROTO"), "{e}");
    let e = ctl(
        &dir,
        false,
        Cmd::Maglev {
            service: "10.43.9.9:80/tcp".into(),
        },
    )
    .expect_err("unknown");
    assert!(e.to_string().contains("no service"), "{e}");
}

#[test]
fn missing_pins_say_so() {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/mesh-test-none-{}",
        std::process::id()
    )));
    for cmd in [
        Cmd::Services { published: false },
        Cmd::Stats { all: false },
    ] {
        let e = ctl(&dir, false, cmd).expect_err("nothing pinned");
        assert!(matches!(e, CtlError::NotPinned(_)), "{e:?}");
        assert!(e.to_string().contains("is mesh-agent running"), "{e}");
    }
}

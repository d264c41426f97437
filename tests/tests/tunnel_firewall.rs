//! A host firewall that drops the tunnel's port in INPUT (two Docker hosts,
//! agents run as the lab and the README run them; needs root). Node 1's
//! INPUT drops UDP 4789, so the GSO packets its underlay program hands to
//! `mesh-vxlan` (through the stack) never arrive: the agent sees them
//! lost, takes the device down and says why, mesh decapsulates every
//! packet itself, and a bulk transfer across the tunnel completes intact.
//! Every wait is bounded.

use std::time::{Duration, Instant};

use mesh_lab::image::WHOAMI_IMAGE;
use mesh_tests::dockerlab::Hosts;

#[test]
fn docker_a_firewall_dropping_the_tunnel_port_does_not_stall_bulk_transfers() {
    const BYTES: u64 = 64 << 20;
    let hosts = Hosts::start(2);
    let (engines, agents) = (&hosts.engines, &hosts.agents);
    let (e1, e2) = (&engines[0], &engines[1]);
    let device =
        |e: &mesh_tests::dockerlab::Engine| e.ns.ip(&["link", "show", mesh_agent::vxlandev::NAME]);
    assert!(device(e1).contains(",UP"), "{}", device(e1));
    e1.ns.exec(&[
        "iptables", "-I", "INPUT", "-p", "udp", "--dport", "4789", "-j", "DROP",
    ]);
    e1.docker_ok(&[
        "run",
        "-d",
        "--name",
        "sink",
        "--network",
        "mesh",
        WHOAMI_IMAGE,
        "sink",
        "5001",
    ]);
    let ip = e1.docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        "sink",
    ]);
    // The sink's veth attached and its address known to node 2.
    std::thread::sleep(Duration::from_secs(3));
    let start = Instant::now();
    let out = e2.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "mesh",
        WHOAMI_IMAGE,
        "blast",
        &format!("{}:5001", ip.trim()),
        &BYTES.to_string(),
    ]);
    let secs = start.elapsed().as_secs_f64();
    let log = agents[0].log_text();
    let said = log
        .lines()
        .find(|l| l.contains("did not reach it"))
        .unwrap_or("");
    let c = e1.mesh_counters();
    println!(
        "{} in {secs:.1} s; node 1: {} handed to mesh-vxlan, {} out of it, {} decapsulated by mesh; its agent: {said}",
        out.trim(),
        c.get("vxlan_handoff").copied().unwrap_or(0),
        c.get("vxlan_device_in").copied().unwrap_or(0),
        c.get("xdp_decap").copied().unwrap_or(0),
    );
    assert!(out.contains(&format!("sent {BYTES} bytes")), "{out}");
    assert!(!said.is_empty(), "the agent says why");
    assert!(
        !device(e1).contains(",UP"),
        "the device is down: {}",
        device(e1)
    );
    assert_eq!(c.get("vxlan_device_in").copied().unwrap_or(0), 0);
    let status = agents[0].status().expect("status");
    let gro = status.node.tunnel_gro;
    println!("node 1's meshctl status: gro: {gro}");
    // Its status says where they went: handed over, never taken in.
    let h = status.node.handoff.expect("the hand-off's counters");
    assert!(h.handed > 0 && h.device_rx == 0 && h.back == 0, "{h:?}");
    assert!(
        gro.starts_with("OFF: merged packets handed to mesh-vxlan did not arrive"),
        "{gro}"
    );
    // Node 2's firewall lets the tunnel in: its device stays.
    assert!(device(e2).contains(",UP"), "{}", device(e2));
}

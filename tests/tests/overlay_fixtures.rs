//! Packet tests of the overlay (needs root).

use mesh_tests::{
    fixtures::{bridge, ingress, networks, overlay},
    harness::Harness,
};

#[test]
fn encapsulation_and_decapsulation_fixtures() {
    let mut h = Harness::new();
    overlay::install(&mut h);
    h.check(&overlay::fixtures());
}

#[test]
fn encrypted_tunnel_fixtures() {
    let mut h = Harness::new();
    overlay::install_encrypted(&mut h);
    h.check(&overlay::encrypted_fixtures());
}

#[test]
fn routing_mesh_fixtures() {
    let mut h = Harness::new();
    ingress::install(&mut h);
    h.check(&ingress::fixtures());
}

#[test]
fn underlay_without_xdp_fixtures() {
    let mut h = Harness::new();
    overlay::install(&mut h);
    overlay::without_xdp(&mut h);
    h.check(&overlay::tc_only_fixtures());
    let mut h = Harness::new();
    ingress::install(&mut h);
    overlay::without_xdp(&mut h);
    h.check(&ingress::tc_only_fixtures());
}

#[test]
fn local_via_bridge_fixtures() {
    let mut h = Harness::new();
    overlay::install(&mut h);
    overlay::via_bridge(&mut h);
    h.check(&overlay::via_bridge_fixtures());
}

#[test]
fn docker_bridge_fixtures() {
    let mut h = Harness::new();
    bridge::install(&mut h);
    h.check(&bridge::fixtures());
}

#[test]
fn network_isolation_fixtures() {
    let mut h = Harness::new();
    networks::install(&mut h);
    h.check(&networks::fixtures());
}

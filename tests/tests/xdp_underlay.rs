//! Packet tests of the underlay XDP program (needs root).

use mesh_tests::{fixtures::xdp_underlay::fixtures, harness::Harness};

#[test]
fn underlay_fixtures() {
    Harness::new().check(&fixtures());
}

#[test]
fn counters_accumulate_over_packets() {
    let mut h = Harness::new();
    let fixtures = fixtures();
    for _ in 0..3 {
        h.check(&fixtures);
    }
    let pass = h.counters()[mesh_common::stats::Stat::XdpPass as usize];
    assert_eq!(
        pass,
        3 * fixtures.len() as u64,
        "every packet counted once per run"
    );
}

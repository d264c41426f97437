//! Packet tests of service load balancing on container veths (needs root).

use mesh_common::lb::ServiceStats;
use mesh_tests::{fixtures::lb, harness::Harness};

#[test]
fn connection_lifecycle_fixtures() {
    let mut h = Harness::new();
    lb::install(&mut h.lb);
    let fixtures = lb::fixtures();
    h.check(&fixtures);

    // Per-service counters: every translated packet of the web flows
    // (8 rows: 2 connections), the dns flow (4 rows, 1 connection).
    let web = h.lb.service_stats(1).expect("web stats");
    let dns = h.lb.service_stats(2).expect("dns stats");
    assert_eq!((web.packets, web.new_flows), (8, 2), "web: {web:?}");
    assert_eq!((dns.packets, dns.new_flows), (4, 1), "dns: {dns:?}");
    assert!(web.bytes > 8 * 54, "bytes counted: {web:?}");
    assert_eq!(
        h.lb.service_stats(3).expect("empty stats"),
        ServiceStats::default()
    );
}

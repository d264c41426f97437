//! Per-packet cost of the data-plane programs, measured by the kernel
//! (BPF_PROG_TEST_RUN with `repeat`) on the packet-test fixtures.
//! Prints figures; asserts nothing about speed.

use mesh_tests::{fixtures, harness::Harness};

fn main() {
    let repeat = std::env::var("MESH_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100_000);
    let mut h = Harness::new();
    h.bench("xdp underlay", &fixtures::xdp_underlay::fixtures(), repeat);
}

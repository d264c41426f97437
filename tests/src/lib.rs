//! Test support for mesh: packet builders and the packet-test harness
//! (BPF_PROG_TEST_RUN through aya), shared by the packet tests, the
//! benchmarks and, later, the lab tests.
//!
//! Packet tests need root (CAP_BPF, CAP_NET_ADMIN). They fail, never skip,
//! without it: CI runs as root, so a skip there would hide a broken data plane.

pub mod cpu;
pub mod dnslab;
pub mod dnsprobe;
pub mod dockerlab;
pub mod empty;
pub mod fixtures;
pub mod harness;
pub mod iperf;
pub mod lbclient;
pub mod lblab;
pub mod netns;
pub mod overlaylab;
pub mod pkt;
pub mod profile;
pub mod raw;
pub mod servers;
pub mod vmbench;

//! mesh's control logic, apart from the kernel: what a node should program
//! (labels, VIPs, Maglev rings, the desired state and the minimal map
//! writes that reach it), the DNS zone and server, gossip (its transport,
//! its rules of authority) and the Docker and interface facts they read.
//!
//! No eBPF here, and no build script: `cargo test -p mesh-core` runs every
//! unit test of this logic with stable Rust alone. The agent (`mesh-agent`)
//! adds the data plane (the eBPF object, maps, links) and the daemon, and
//! re-exports these modules under its own name.

pub mod check;
pub mod desired;
pub mod dns;
pub mod docker;
pub mod gossip;
pub mod hostports;
pub mod iface;
pub mod labels;
pub mod maglev;
pub mod network;
pub mod reconcile;
pub mod status;
pub mod vip;

//! mesh agent library: the data plane loader and map access, shared by the
//! `mesh-agent` daemon, `meshctl` and the tests.

pub use mesh_core::{
    check, desired, dns, docker, gossip, hostports, iface, labels, maglev, network, reconcile,
    status, vip,
};

pub mod api;
pub mod cluster;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod hostlink;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod netlink;
pub mod probe;
pub mod requests;
pub mod shared;
pub mod veth;
pub mod vxlandev;
pub mod wireguard;

/// Where the agent pins its maps and links (one directory per agent).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";
/// The agent's control socket.
pub const DEFAULT_API_SOCKET: &str = "/run/mesh/agent.sock";

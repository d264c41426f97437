//! mesh agent library: the data plane loader and map access, shared by the
//! `mesh-agent` daemon, `meshctl` and the tests.

pub mod api;
pub mod cluster;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod desired;
pub mod dns;
pub mod docker;
pub mod gossip;
pub mod hostlink;
pub mod hostports;
pub mod iface;
pub mod kernel;
pub mod labels;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod reconcile;
pub mod shared;
pub mod status;
pub mod veth;
pub mod vip;

/// Where the agent pins its maps and links (one directory per agent).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";
/// The agent's control socket.
pub const DEFAULT_API_SOCKET: &str = "/run/mesh/agent.sock";

//! mesh agent library: the data plane loader and map access, shared by the
//! `mesh-agent` daemon, `meshctl` and the tests.

pub mod ctl;
pub mod dataplane;
pub mod iface;
pub mod labels;
pub mod logging;
pub mod maglev;
pub mod reconcile;
pub mod vip;

/// Where the agent pins its maps and links (one directory per agent).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";

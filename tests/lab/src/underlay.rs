//! The underlay: a bridge in a namespace of its own; node N joins it with
//! `eth0` = PREFIX.N/24 in its engine's namespace.

use anyhow::Result;

use crate::{cmd::ip, engine::Engine};

/// The nodes' NIC on the underlay.
pub const IFACE: &str = "eth0";

pub struct Underlay {
    pub ns: String,
    /// The first three octets of the /24, e.g. "192.168.100".
    pub prefix: String,
    keep: bool,
}

impl Underlay {
    pub fn new(ns: &str, prefix: &str) -> Result<Underlay> {
        let _ = ip(&["netns", "del", ns]);
        ip(&["netns", "add", ns])?;
        let u = Underlay {
            ns: ns.to_owned(),
            prefix: prefix.to_owned(),
            keep: false,
        };
        u.ip(&["link", "set", "lo", "up"])?;
        u.ip(&["link", "add", "br0", "type", "bridge"])?;
        u.ip(&["link", "set", "br0", "up"])?;
        Ok(u)
    }

    /// One that an earlier run made and kept.
    pub fn adopt(ns: &str, prefix: &str) -> Underlay {
        Underlay {
            ns: ns.to_owned(),
            prefix: prefix.to_owned(),
            keep: true,
        }
    }

    /// Leaves it in place when dropped.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Node N's address.
    pub fn addr(&self, n: u8) -> String {
        format!("{}.{n}", self.prefix)
    }

    /// Connects `engine`'s namespace as node `n`.
    pub fn attach(&self, engine: &Engine, n: u8) -> Result<()> {
        self.join(&format!("p{n}"), engine.spec.ns.as_str(), n)
    }

    /// Connects network namespace `ns` (not a node: a host outside the
    /// cluster, e.g. a client of the routing mesh) with `eth0` = the /24's
    /// address `n`.
    pub fn attach_outside(&self, ns: &str, n: u8) -> Result<()> {
        self.join(&format!("o{n}"), ns, n)?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// A veth from bridge port `port` to `eth0` in `ns`, address `n`.
    fn join(&self, port: &str, ns: &str, n: u8) -> Result<()> {
        self.ip(&[
            "link", "add", port, "type", "veth", "peer", IFACE, "netns", ns,
        ])?;
        self.ip(&["link", "set", port, "master", "br0", "up"])?;
        let addr = format!("{}/24", self.addr(n));
        ip(&["-n", ns, "addr", "add", &addr, "dev", IFACE])?;
        ip(&["-n", ns, "link", "set", IFACE, "up"])
    }

    /// Cuts node `n` off (or reconnects it).
    pub fn set_link(&self, n: u8, up: bool) -> Result<()> {
        let port = format!("p{n}");
        self.ip(&["link", "set", &port, if up { "up" } else { "down" }])
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ip(&["netns", "del", &self.ns]);
        }
    }
}

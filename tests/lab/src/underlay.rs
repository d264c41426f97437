//! The underlay the lab's nodes share, in namespaces of its own.
//!
//! - [`Layout::Flat`]: one bridge; node N joins with `eth0` = PREFIX.N/24.
//! - [`Layout::Routed`] (the lab's default), a network as hosts in
//!   different subnets see it: three node subnets joined by routers doing
//!   plain Linux forwarding. Node N is on subnet `(N - 1) % 3 + 1`, at
//!   `a.b.(c + subnet).N`/24 for PREFIX `a.b.c`; subnets 1 and 2 hang off
//!   the first router (the underlay namespace), subnet 3 off a second one
//!   (`<ns>-r2`) behind a 1400-byte link, so its nodes' tunnels cross a
//!   smaller MTU. Hosts outside the cluster are on PREFIX itself, on the
//!   first router. Every router is `.254` on its subnets.

use anyhow::Result;

use crate::{cmd::ip, engine::Engine};

/// The nodes' NIC on the underlay.
pub const IFACE: &str = "eth0";
/// The MTU of the link between the routed layout's two routers.
pub const NARROW_MTU: u32 = 1400;
/// The tunnel MTU (`--mtu`) a cluster on the routed layout needs: VXLAN's
/// 50 bytes less than the narrow link.
pub const ROUTED_TUNNEL_MTU: u32 = NARROW_MTU - 50;
/// The transit link between the routed layout's routers.
const TRANSIT: (&str, &str) = ("172.31.255.1", "172.31.255.2");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Flat,
    Routed,
}

pub struct Underlay {
    pub ns: String,
    /// The first three octets of the first /24, e.g. "192.168.100".
    pub prefix: String,
    pub layout: Layout,
    keep: bool,
}

/// Node `n`'s subnet in the routed layout (1 to 3).
const fn subnet_of(n: u8) -> u8 {
    (n - 1) % 3 + 1
}

/// The address of node `n` on an underlay of `layout` whose first /24 is
/// `prefix` ("a.b.c").
pub fn node_addr(prefix: &str, layout: Layout, n: u8) -> String {
    match layout {
        Layout::Flat => format!("{prefix}.{n}"),
        Layout::Routed => format!("{}.{n}", shifted(prefix, subnet_of(n))),
    }
}

/// "a.b.c" with `c` moved up by `by`.
fn shifted(prefix: &str, by: u8) -> String {
    let (ab, c) = prefix.rsplit_once('.').unwrap_or(("", prefix));
    let c: u8 = c.parse().unwrap_or(0);
    format!("{ab}.{}", c + by)
}

impl Underlay {
    /// A flat underlay: one bridge.
    pub fn new(ns: &str, prefix: &str) -> Result<Underlay> {
        let u = Underlay::make(ns, prefix, Layout::Flat)?;
        u.ip(&["link", "add", "br0", "type", "bridge"])?;
        u.ip(&["link", "set", "br0", "up"])?;
        Ok(u)
    }

    /// A routed underlay (see the module's doc).
    pub fn routed(ns: &str, prefix: &str) -> Result<Underlay> {
        let u = Underlay::make(ns, prefix, Layout::Routed)?;
        let r2 = u.router2();
        let _ = ip(&["netns", "del", &r2]);
        ip(&["netns", "add", &r2])?;
        ip(&["-n", &r2, "link", "set", "lo", "up"])?;
        for (router, subnet) in [(ns, 0), (ns, 1), (ns, 2), (r2.as_str(), 3)] {
            let br = format!("br{subnet}");
            let gw = format!("{}.254/24", shifted(prefix, subnet));
            ip(&["-n", router, "link", "add", &br, "type", "bridge"])?;
            ip(&["-n", router, "addr", "add", &gw, "dev", &br])?;
            ip(&["-n", router, "link", "set", &br, "up"])?;
        }
        let mtu = NARROW_MTU.to_string();
        u.ip(&[
            "link", "add", "t0", "mtu", &mtu, "type", "veth", "peer", "t0", "netns", &r2,
        ])?;
        ip(&["-n", &r2, "link", "set", "t0", "mtu", &mtu])?;
        u.ip(&["addr", "add", &format!("{}/30", TRANSIT.0), "dev", "t0"])?;
        ip(&[
            "-n",
            &r2,
            "addr",
            "add",
            &format!("{}/30", TRANSIT.1),
            "dev",
            "t0",
        ])?;
        u.ip(&["link", "set", "t0", "up"])?;
        ip(&["-n", &r2, "link", "set", "t0", "up"])?;
        let far = format!("{}.0/24", shifted(prefix, 3));
        u.ip(&["route", "add", &far, "via", TRANSIT.1])?;
        ip(&["-n", &r2, "route", "add", "default", "via", TRANSIT.0])?;
        for router in [ns, r2.as_str()] {
            crate::cmd::Cmd::new("ip")
                .args([
                    "netns",
                    "exec",
                    router,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ])
                .run()?;
        }
        Ok(u)
    }

    fn make(ns: &str, prefix: &str, layout: Layout) -> Result<Underlay> {
        let _ = ip(&["netns", "del", ns]);
        ip(&["netns", "add", ns])?;
        let u = Underlay {
            ns: ns.to_owned(),
            prefix: prefix.to_owned(),
            layout,
            keep: false,
        };
        u.ip(&["link", "set", "lo", "up"])?;
        Ok(u)
    }

    /// One that an earlier run made and kept.
    pub fn adopt(ns: &str, prefix: &str, layout: Layout) -> Underlay {
        Underlay {
            ns: ns.to_owned(),
            prefix: prefix.to_owned(),
            layout,
            keep: true,
        }
    }

    /// Leaves it in place when dropped.
    pub fn keep(mut self) -> Self {
        self.keep = true;
        self
    }

    /// The routed layout's second router.
    fn router2(&self) -> String {
        format!("{}-r2", self.ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Node N's address.
    pub fn addr(&self, n: u8) -> String {
        node_addr(&self.prefix, self.layout, n)
    }

    /// The address of the host outside the cluster attached as `n`.
    pub fn outside_addr(&self, n: u8) -> String {
        format!("{}.{n}", self.prefix)
    }

    /// Where node `n`'s port lives: its router's namespace and bridge, and
    /// its gateway (none on a flat underlay).
    fn segment(&self, n: Option<u8>) -> (String, String, Option<String>) {
        let subnet = match (self.layout, n) {
            (Layout::Flat, _) => return (self.ns.clone(), "br0".into(), None),
            (Layout::Routed, Some(n)) => subnet_of(n),
            (Layout::Routed, None) => 0,
        };
        let router = if subnet == 3 {
            self.router2()
        } else {
            self.ns.clone()
        };
        let gw = format!("{}.254", shifted(&self.prefix, subnet));
        (router, format!("br{subnet}"), Some(gw))
    }

    /// Connects `engine`'s namespace as node `n`.
    pub fn attach(&self, engine: &Engine, n: u8) -> Result<()> {
        self.join(&format!("p{n}"), engine.spec.ns.as_str(), Some(n), n)
    }

    /// Connects network namespace `ns` (not a node: a host outside the
    /// cluster, e.g. a client of the routing mesh) with `eth0` =
    /// [`Underlay::outside_addr`]`(n)`.
    pub fn attach_outside(&self, ns: &str, n: u8) -> Result<()> {
        self.join(&format!("o{n}"), ns, None, n)?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// A veth from bridge port `port` to `eth0` in `ns`: node `node`, or an
    /// outside host, at host number `n` of its subnet.
    fn join(&self, port: &str, ns: &str, node: Option<u8>, n: u8) -> Result<()> {
        let (router, br, gw) = self.segment(node);
        ip(&[
            "-n", &router, "link", "add", port, "type", "veth", "peer", IFACE, "netns", ns,
        ])?;
        ip(&["-n", &router, "link", "set", port, "master", &br, "up"])?;
        wire_checksums(&router, port)?;
        if node.is_none() {
            wire_checksums(ns, IFACE)?;
        } else {
            nic_gro(ns, IFACE)?;
        }
        let addr = match node {
            Some(n) => self.addr(n),
            None => self.outside_addr(n),
        };
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", IFACE])?;
        ip(&["-n", ns, "link", "set", IFACE, "up"])?;
        if let Some(gw) = gw {
            ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
        }
        Ok(())
    }

    /// Packets for `cidr` from hosts outside the cluster go to node `n`: a
    /// route on the outside host (flat), or on the routers (routed).
    pub fn steer(&self, cidr: &str, n: u8) -> Result<()> {
        let node = self.addr(n);
        match self.layout {
            Layout::Flat => anyhow::bail!(
                "steering is for the routed layout: on a flat one, route on the outside host"
            ),
            Layout::Routed if subnet_of(n) == 3 => {
                self.ip(&["route", "add", cidr, "via", TRANSIT.1])?;
                ip(&["-n", &self.router2(), "route", "add", cidr, "via", &node])
            }
            Layout::Routed => self.ip(&["route", "add", cidr, "via", &node]),
        }
    }

    /// The routed layout's routers drop UDP to `port` on node `n` (a
    /// security group or a router ACL that passes gossip but not VXLAN),
    /// or pass it again.
    pub fn block_udp(&self, n: u8, port: u16, block: bool) -> Result<()> {
        anyhow::ensure!(
            self.layout == Layout::Routed,
            "blocking a port needs the routed layout's routers"
        );
        let (router, _, _) = self.segment(Some(n));
        let (addr, port) = (self.addr(n), port.to_string());
        crate::cmd::Cmd::new("ip")
            .args(["netns", "exec", &router, "iptables"])
            .args([if block { "-I" } else { "-D" }, "FORWARD", "-p", "udp"])
            .args(["-d", &addr, "--dport", &port, "-j", "DROP"])
            .run()
    }

    /// Cuts node `n` off (or reconnects it).
    pub fn set_link(&self, n: u8, up: bool) -> Result<()> {
        let (router, _, _) = self.segment(Some(n));
        let port = format!("p{n}");
        ip(&[
            "-n",
            &router,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ])
    }
}

/// Frames leaving `dev` in `ns` carry complete TCP/UDP checksums, as on a
/// wire. A veth otherwise hands the sender's offloaded (partial) checksum
/// to the receiver, and the veth driver's native XDP path loses the skb's
/// note that it is partial: the node's stack would then take the
/// half-computed field for the checksum. No real NIC delivers a partial
/// checksum.
fn wire_checksums(ns: &str, dev: &str) -> Result<()> {
    crate::cmd::Cmd::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])
        .output()
        .map(drop)
}

/// `dev` in `ns` merges what it receives (GRO), as a real NIC does by
/// default; a veth does only with GRO on (and a peer that sends segments,
/// which [`wire_checksums`] makes it). Bulk traffic then reaches a node as
/// it reaches a host's NIC: MTU-sized frames, merged on arrival.
fn nic_gro(ns: &str, dev: &str) -> Result<()> {
    crate::cmd::Cmd::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])
        .run()
}

impl Drop for Underlay {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ip(&["netns", "del", &self.ns]);
            if self.layout == Layout::Routed {
                let _ = ip(&["netns", "del", &self.router2()]);
            }
        }
    }
}

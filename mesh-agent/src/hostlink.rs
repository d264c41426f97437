//! The host link: the host's own way into the overlay (its access to VIPs
//! whose backends live on other nodes).
//!
//! A veth pair, [`NAME`] and [`PEER`], without ARP, with the cluster CIDR
//! routed to [`NAME`] and the `mesh` network's gateway as the route's
//! preferred source. (A veth, not a dummy device: kernels without the dummy
//! driver exist, and every host that runs Docker has veths.) Nothing the
//! program lets through is of use to the peer, which discards it. A socket of the
//! host's that socket-level balancing sent to a backend on another node
//! sends from the gateway address through it; the device's TC egress
//! program (`mesh_tc_host_out`) tunnels the packet to the backend's node
//! and the answer, addressed to the gateway, comes back into the stack
//! through the same device. This node's /24 keeps its own, more specific
//! route on the `mesh` bridge.
//!
//! Set up over rtnetlink (the agent's image has no `ip`), idempotently: a
//! restarted agent finds the device and route in place and leaves them.

use std::{io, net::Ipv4Addr};

use crate::vip::Cidr;

/// The host link's name.
pub const NAME: &str = "mesh-host";
/// Its veth peer's.
pub const PEER: &str = "mesh-host-p";

/// The host link as the data plane needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum HostLinkError {
    #[error(
        "an interface named {NAME} exists without its peer {PEER}: it is not mesh's; rename or remove it"
    )]
    NotOurs,
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{NAME} has no MAC address")]
    NoMac,
}

/// Makes sure [`NAME`] exists, is up with MTU `mtu`, and carries the route
/// for `cluster` with preferred source `gateway` (an address of this host:
/// the `mesh` network's gateway).
pub fn ensure(cluster: Cidr, gateway: Ipv4Addr, mtu: u32) -> Result<HostLink, HostLinkError> {
    let nl = Netlink::open().map_err(|source| HostLinkError::Netlink {
        what: "opening rtnetlink",
        source,
    })?;
    let exists = crate::iface::index(NAME).is_ok();
    if exists && crate::iface::index(PEER).is_err() {
        return Err(HostLinkError::NotOurs);
    }
    let netlink = |what| move |source| HostLinkError::Netlink { what, source };
    let macs = [mac(gateway, false), mac(gateway, true)];
    if !exists {
        nl.request(&new_veth(mtu, macs))
            .map_err(netlink("creating the host link"))?;
    }
    // Up only once both ends exist (a veth cannot open without its peer).
    for (name, mac) in [NAME, PEER].into_iter().zip(macs) {
        nl.request(&set_link(name, mtu, true, mac))
            .map_err(netlink("setting up the host link"))?;
    }
    let ifindex = crate::iface::index(NAME).map_err(|e| HostLinkError::Netlink {
        what: "finding the host link",
        source: io::Error::other(e.to_string()),
    })?;
    // The gateway address on the link too: Docker masquerades what leaves
    // the mesh network's subnet through any other interface, the host's
    // own packets included, with that interface's first address; with the
    // gateway there, masquerading keeps the source the backend answers
    // to. (Without it the underlay address was taken, the host link
    // refused the packet as not the host's, and the connect timed out.)
    for stale in crate::iface::ipv4_of(NAME) {
        if stale != gateway {
            nl.request(&address(libc::RTM_DELADDR, ifindex, stale))
                .map_err(netlink("removing an old address of the host link"))?;
        }
    }
    nl.request(&address(libc::RTM_NEWADDR, ifindex, gateway))
        .map_err(netlink("giving the host link the gateway address"))?;
    nl.request(&route(cluster, ifindex, gateway))
        .map_err(netlink("routing the cluster CIDR to the host link"))?;
    let mac = crate::iface::mac(NAME).ok_or(HostLinkError::NoMac)?;
    Ok(HostLink { ifindex, mac })
}

// rtnetlink constants (linux/rtnetlink.h, linux/if_link.h); libc has the
// message types and flags but not every attribute.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const NLA_F_NESTED: u16 = 1 << 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

/// One netlink request being built: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        // Sequence 1, port 0 (the kernel).
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        buf.extend_from_slice(fixed);
        Msg { buf }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        self.pad();
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
    }

    /// Starts a nested attribute; [`Msg::end_nested`] closes it.
    fn nested(&mut self, kind: u16) -> usize {
        self.pad();
        let at = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        at
    }

    fn end_nested(&mut self, at: usize) {
        // Its length includes the padding of its last attribute, as the
        // kernel's nla_nest_end counts it.
        self.pad();
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.pad();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// struct ifinfomsg for a link without ARP (its neighbours need no
/// resolution: every packet goes to the program), up if `up`: family, pad,
/// type, index, flags, change.
fn ifinfo(up: bool) -> [u8; 16] {
    let change = (libc::IFF_UP | libc::IFF_NOARP) as u32;
    let flags = if up { change } else { libc::IFF_NOARP as u32 };
    let mut fixed = [0u8; 16];
    fixed[8..12].copy_from_slice(&flags.to_ne_bytes());
    fixed[12..16].copy_from_slice(&change.to_ne_bytes());
    fixed
}

fn name_attr(m: &mut Msg, name: &str) {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    m.attr(IFLA_IFNAME, &bytes);
}

/// The host link's MAC (`peer`: its peer's), set by the agent, not left to
/// the kernel: udev's `MACAddressPolicy=persistent` (Debian's default)
/// replaces a new veth's random MAC moments after it is made, and the
/// program addresses what it hands to the link to the MAC the agent read
/// (frames to another MAC are not the host's and were dropped: found in
/// the Vagrant VMs, where answers reached the link and never the socket).
/// Locally administered, from the gateway address, so it stays the same
/// across restarts.
pub fn mac(gateway: Ipv4Addr, peer: bool) -> [u8; 6] {
    let g = gateway.octets();
    [if peer { 0x06 } else { 0x02 }, 0x6d, g[0], g[1], g[2], g[3]]
}

/// RTM_NEWLINK creating the veth pair, both ends without ARP, with `mtu`,
/// down (see [`set_link`]).
fn new_veth(mtu: u32, [mac, peer_mac]: [[u8; 6]; 2]) -> Vec<u8> {
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let mut m = Msg::new(libc::RTM_NEWLINK, flags, &ifinfo(false));
    name_attr(&mut m, NAME);
    m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    m.attr(IFLA_ADDRESS, &mac);
    let info = m.nested(IFLA_LINKINFO);
    m.attr(IFLA_INFO_KIND, b"veth");
    let data = m.nested(IFLA_INFO_DATA);
    // VETH_INFO_PEER: an ifinfomsg, then the peer's own attributes.
    let peer = m.nested(VETH_INFO_PEER);
    m.buf.extend_from_slice(&ifinfo(false));
    name_attr(&mut m, PEER);
    m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    m.attr(IFLA_ADDRESS, &peer_mac);
    m.end_nested(peer);
    m.end_nested(data);
    m.end_nested(info);
    m.finish()
}

/// RTM_NEWLINK for the existing link `name`: without ARP, `mtu`, `mac`,
/// up if `up`.
fn set_link(name: &str, mtu: u32, up: bool, mac: [u8; 6]) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut m = Msg::new(libc::RTM_NEWLINK, flags, &ifinfo(up));
    name_attr(&mut m, name);
    m.attr(IFLA_MTU, &mtu.to_ne_bytes());
    m.attr(IFLA_ADDRESS, &mac);
    m.finish()
}

/// RTM_NEWADDR (create or replace) or RTM_DELADDR of `ip`/32 on `ifindex`.
fn address(kind: u16, ifindex: u32, ip: Ipv4Addr) -> Vec<u8> {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index (u32).
    let mut fixed = [libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0];
    fixed[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let mut flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    if kind == libc::RTM_NEWADDR {
        flags |= libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    }
    let mut m = Msg::new(kind, flags as u16, &fixed);
    m.attr(IFA_LOCAL, &ip.octets());
    m.attr(IFA_ADDRESS, &ip.octets());
    m.finish()
}

/// RTM_NEWROUTE (create or replace) for `cluster` on `ifindex`, preferred
/// source `src`, in the main table.
fn route(cluster: Cidr, ifindex: u32, src: Ipv4Addr) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags (u32).
    let fixed = [
        libc::AF_INET as u8,
        cluster.prefix,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        RT_SCOPE_LINK,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    let mut m = Msg::new(libc::RTM_NEWROUTE, flags, &fixed);
    m.attr(RTA_DST, &cluster.base.octets());
    m.attr(RTA_OIF, &ifindex.to_ne_bytes());
    m.attr(RTA_PREFSRC, &src.octets());
    m.finish()
}

/// A NETLINK_ROUTE socket, closed on drop.
struct Netlink {
    fd: std::os::fd::OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Netlink { fd })
    }

    /// Sends `msg` and waits for its acknowledgement: Ok, or the kernel's
    /// error.
    fn request(&self, msg: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.as_raw_fd();
        // SAFETY: zeroed sockaddr_nl is valid; port 0 is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and kernel are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is a valid buffer of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(r) = ack(&buf[..n as usize]) {
                return r;
            }
        }
    }
}

/// The acknowledgement in a reply, if it holds one: Ok for error 0, the
/// error otherwise.
fn ack(mut reply: &[u8]) -> Option<io::Result<()>> {
    while reply.len() >= 16 {
        let len = u32::from_ne_bytes(reply[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(reply[4..6].try_into().ok()?);
        if len < 16 || len > reply.len() {
            return Some(Err(io::Error::other("malformed netlink reply")));
        }
        if kind == libc::NLMSG_ERROR as u16 {
            let code = i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?);
            return Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            });
        }
        reply = &reply[len.next_multiple_of(4).min(reply.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(m: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([m[at], m[at + 1]])
    }

    fn u32_at(m: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]])
    }

    #[test]
    fn the_veth_request_is_laid_out_as_rtnetlink_wants() {
        let gw = Ipv4Addr::new(10, 42, 7, 1);
        let m = new_veth(1450, [mac(gw, false), mac(gw, true)]);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(m.len() % 4, 0);
        // Header 16, ifinfomsg 16 (no ARP, down), then IFLA_IFNAME
        // "mesh-host\0" (4 + 10, padded to 16).
        assert_eq!(u32_at(&m, 24), libc::IFF_NOARP as u32);
        assert_eq!(u32_at(&m, 28), (libc::IFF_UP | libc::IFF_NOARP) as u32);
        assert_eq!(u16_at(&m, 32), 14);
        assert_eq!(u16_at(&m, 34), IFLA_IFNAME);
        assert_eq!(&m[36..46], b"mesh-host\0");
        // IFLA_MTU, IFLA_ADDRESS (4 + 6, padded to 12).
        assert_eq!(u16_at(&m, 50), IFLA_MTU);
        assert_eq!(u32_at(&m, 52), 1450);
        assert_eq!((u16_at(&m, 56), u16_at(&m, 58)), (10, IFLA_ADDRESS));
        assert_eq!(&m[60..66], &[0x02, 0x6d, 10, 42, 7, 1]);
        // IFLA_LINKINFO (nested) to the end: IFLA_INFO_KIND "veth" (4 + 4),
        // IFLA_INFO_DATA holding VETH_INFO_PEER: an ifinfomsg, the peer's
        // name "mesh-host-p\0" (4 + 12), MTU (8) and MAC (12).
        assert_eq!(u16_at(&m, 70), IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(u16_at(&m, 68) as usize, m.len() - 68);
        assert_eq!(&m[76..80], b"veth");
        assert_eq!(u16_at(&m, 82), IFLA_INFO_DATA | NLA_F_NESTED);
        assert_eq!(u16_at(&m, 80) as usize, m.len() - 80);
        assert_eq!(u16_at(&m, 86), VETH_INFO_PEER | NLA_F_NESTED);
        assert_eq!(u16_at(&m, 84), 4 + 16 + 16 + 8 + 12);
        assert_eq!(u16_at(&m, 106), IFLA_IFNAME);
        assert_eq!(&m[108..120], b"mesh-host-p\0");
        assert_eq!(u32_at(&m, 124), 1450);
        assert_eq!(&m[132..138], &[0x06, 0x6d, 10, 42, 7, 1]);
        assert_eq!(m.len(), 140);
    }

    #[test]
    fn acknowledgements_and_errors_are_read_and_junk_is_refused() {
        let mut ok = vec![0u8; 36];
        ok[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ok[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(matches!(ack(&ok), Some(Ok(()))));
        let mut err = ok.clone();
        err[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        let e = ack(&err).expect("an answer").expect_err("an error");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let mut junk = ok.clone();
        junk[0..4].copy_from_slice(&9u32.to_ne_bytes());
        assert!(matches!(ack(&junk), Some(Err(_))));
        assert!(ack(&[1, 2, 3]).is_none());
    }
}

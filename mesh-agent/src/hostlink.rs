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
//! Set up over rtnetlink (the agent's image has no `ip`) with rust-netlink's
//! message and socket crates, idempotently: a restarted agent finds the
//! device and route in place and leaves them.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NetlinkMessage};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{
    netlink::{Netlink, noarp_link, request},
    vip::Cidr,
};

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
    let nl = Netlink::open(NETLINK_ROUTE).map_err(|source| HostLinkError::Netlink {
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
        nl.request(&set_link(name, mtu, mac))
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
            nl.request(&address(false, ifindex, stale))
                .map_err(netlink("removing an old address of the host link"))?;
        }
    }
    nl.request(&address(true, ifindex, gateway))
        .map_err(netlink("giving the host link the gateway address"))?;
    nl.request(&route(cluster, ifindex, gateway))
        .map_err(netlink("routing the cluster CIDR to the host link"))?;
    let mac = crate::iface::mac(NAME).ok_or(HostLinkError::NoMac)?;
    Ok(HostLink { ifindex, mac })
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

/// A link message for `name` ([`noarp_link`]) with `mtu` and `mac`.
fn link(name: &str, mtu: u32, mac: [u8; 6], up: bool) -> LinkMessage {
    let mut m = noarp_link(name, up);
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m.attributes.push(LinkAttribute::Address(mac.to_vec()));
    m
}

/// RTM_NEWLINK creating the veth pair, both ends down (see [`ensure`]).
fn new_veth(mtu: u32, [mac, peer_mac]: [[u8; 6]; 2]) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = link(NAME, mtu, mac, false);
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(link(
            PEER, mtu, peer_mac, false,
        )))),
    ]));
    request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
}

/// RTM_NEWLINK for the existing link `name`: without ARP, `mtu`, `mac`, up.
fn set_link(name: &str, mtu: u32, mac: [u8; 6]) -> NetlinkMessage<RouteNetlinkMessage> {
    request(RouteNetlinkMessage::NewLink(link(name, mtu, mac, true)), 0)
}

/// RTM_NEWADDR (create or replace; `add`) or RTM_DELADDR of `ip`/32 on
/// `ifindex`.
fn address(add: bool, ifindex: u32, ip: Ipv4Addr) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = 32;
    m.header.index = ifindex;
    m.attributes = vec![
        AddressAttribute::Local(ip.into()),
        AddressAttribute::Address(ip.into()),
    ];
    if add {
        request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    } else {
        request(RouteNetlinkMessage::DelAddress(m), 0)
    }
}

/// RTM_NEWROUTE (create or replace) for `cluster` on `ifindex`, preferred
/// source `src`, in the main table.
fn route(cluster: Cidr, ifindex: u32, src: Ipv4Addr) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = cluster.prefix;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(cluster.base)),
        RouteAttribute::Oif(ifindex),
        RouteAttribute::PrefSource(RouteAddress::Inet(src)),
    ];
    request(
        RouteNetlinkMessage::NewRoute(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkPayload};
    use netlink_packet_route::link::LinkFlags;

    use super::*;

    #[test]
    fn the_veth_request_carries_both_ends() {
        let gw = Ipv4Addr::new(10, 42, 7, 1);
        let m = new_veth(1450, [mac(gw, false), mac(gw, true)]);
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).expect("parses");
        assert_eq!(
            back.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = back.payload else {
            panic!("a new link: {:?}", back.payload);
        };
        assert_eq!(l.header.flags, LinkFlags::Noarp, "down, without ARP");
        assert!(l.attributes.contains(&LinkAttribute::IfName(NAME.into())));
        assert!(l.attributes.contains(&LinkAttribute::Mtu(1450)));
        assert!(
            l.attributes
                .contains(&LinkAttribute::Address(vec![0x02, 0x6d, 10, 42, 7, 1]))
        );
        let peer = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p.clone()),
                _ => None,
            }),
            _ => None,
        });
        let peer = peer.expect("the peer");
        assert!(
            peer.attributes
                .contains(&LinkAttribute::IfName(PEER.into()))
        );
        assert!(
            peer.attributes
                .contains(&LinkAttribute::Address(vec![0x06, 0x6d, 10, 42, 7, 1]))
        );
    }
}

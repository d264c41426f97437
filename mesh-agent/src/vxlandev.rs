//! `mesh-vxlan`: the kernel's VXLAN device on the VXLAN port, in
//! collect-metadata mode, for what only the kernel's own tunnel code can do.
//!
//! 1. Its UDP socket lets GRO merge VXLAN packets as they arrive (UDP
//!    tunnel GRO needs a tunnel socket on the port). On a NIC that hands
//!    over MTU-sized frames (virtio_net, most cloud NICs) a bulk transfer
//!    then reaches the underlay TC program as few large packets, as Linux's
//!    own VXLAN overlay gets them.
//! 2. A merged packet carries tunnel offload state (its GSO type, the
//!    inner headers' offsets) that `bpf_skb_adjust_room` does not reset on
//!    this kernel; left stale, it breaks the packet's segmentation wherever
//!    it is forwarded. The underlay TC program checks such a packet as any
//!    other, marks it ([`mesh_common::tunnel::HANDOFF_MARK`]) and lets it
//!    go to this device, which decapsulates it and resets that state; the
//!    device's TC program (`mesh_tc_vxlan_in`) hands it on as the underlay's
//!    own and drops anything unmarked (VXLAN that never passed mesh's
//!    checks). Every other VXLAN packet is still decapsulated by mesh.
//!
//! The device is kept across restarts, as mesh's links are. Set up over
//! rtnetlink, idempotently.

use std::io;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NetlinkMessage};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink::{Netlink, request};

/// The device's name.
pub const NAME: &str = "mesh-vxlan";

#[derive(Debug, thiserror::Error)]
pub enum VxlanDevError {
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{NAME} exists but is not a collect-metadata VXLAN device on port {port}: remove it")]
    NotOurs { port: u16 },
}

/// Makes sure [`NAME`] exists on UDP `port` (made down, so its program can
/// be attached before [`up`] opens its socket); its ifindex.
pub fn ensure(port: u16) -> Result<u32, VxlanDevError> {
    let nl = Netlink::open(NETLINK_ROUTE).map_err(|source| VxlanDevError::Netlink {
        what: "opening rtnetlink",
        source,
    })?;
    let netlink = |what| move |source| VxlanDevError::Netlink { what, source };
    match crate::iface::index(NAME) {
        Ok(_) if !is_ours(&nl, port).map_err(netlink("reading the VXLAN device"))? => {
            return Err(VxlanDevError::NotOurs { port });
        }
        Ok(_) => {}
        Err(_) => nl
            .request(&new_link(port))
            .map_err(netlink("creating the VXLAN device"))?,
    }
    crate::iface::index(NAME).map_err(|e| VxlanDevError::Netlink {
        what: "finding the VXLAN device",
        source: io::Error::other(e.to_string()),
    })
}

/// Brings [`NAME`] up, which opens its socket: that fails when another
/// tunnel holds the port.
pub fn up() -> Result<(), VxlanDevError> {
    set_up(
        true,
        "bringing the VXLAN device up (is the VXLAN port another tunnel's?)",
    )
}

/// Takes [`NAME`] down, which closes its socket: GRO no longer merges the
/// tunnel's packets.
pub fn down() -> Result<(), VxlanDevError> {
    set_up(false, "taking the VXLAN device down")
}

fn set_up(up: bool, what: &'static str) -> Result<(), VxlanDevError> {
    let nl = Netlink::open(NETLINK_ROUTE).map_err(|source| VxlanDevError::Netlink {
        what: "opening rtnetlink",
        source,
    })?;
    nl.request(&request(RouteNetlinkMessage::NewLink(link(up)), 0))
        .map_err(|source| VxlanDevError::Netlink { what, source })
}

/// Turns GRO off on `iface`. For `mesh-wg`: with [`NAME`]'s socket on the
/// VXLAN port, WireGuard's GRO would merge the VXLAN it decrypts, and its
/// program decapsulates on the skb (an L3 device's packets cannot be
/// handed to [`NAME`] after that program has looked at them).
pub fn gro_off(iface: &str) -> io::Result<()> {
    /// `ETHTOOL_SGRO` from linux/ethtool.h, with its `struct ethtool_value`.
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 0,
    };
    // SAFETY: zeroed plain C data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: a datagram socket of our own, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with an ifreq naming the interface and pointing at
    // an ethtool_value that outlives the call.
    let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    if r < 0 { Err(err) } else { Ok(()) }
}

/// Whether the existing [`NAME`] is a collect-metadata VXLAN device on
/// `port`.
fn is_ours(nl: &Netlink, port: u16) -> io::Result<bool> {
    Ok(get_link(nl)?.iter().any(|l| {
        l.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(info) => info.iter().any(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => {
                    v.contains(&InfoVxlan::CollectMetadata(true))
                        && v.contains(&InfoVxlan::Port(port))
                }
                _ => false,
            }),
            _ => false,
        })
    }))
}

/// [`NAME`]'s link as the kernel describes it (RTM_GETLINK by name); the
/// kernel's error (no such device) if there is none.
fn get_link(nl: &Netlink) -> io::Result<Vec<LinkMessage>> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(NAME.to_string()));
    let replies = nl.query(&request(RouteNetlinkMessage::GetLink(m), 0))?;
    Ok(replies
        .into_iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })
        .collect())
}

/// What [`NAME`] itself counted on receive (its link's 64-bit
/// statistics): packets its socket took in, and those it dropped or found
/// in error. Packets it took in count before its GRO cell, which may merge
/// consecutive ones of a flow again: fewer may come out of it than went in
/// with nothing lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
}

/// [`NAME`]'s receive counters, over rtnetlink.
pub fn counters() -> io::Result<DeviceCounters> {
    let nl = Netlink::open(NETLINK_ROUTE)?;
    get_link(&nl)?
        .iter()
        .find_map(device_counters)
        .ok_or_else(|| io::Error::other(format!("{NAME} has no statistics")))
}

/// The receive counters of a link message, if it has 64-bit statistics.
fn device_counters(l: &LinkMessage) -> Option<DeviceCounters> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Stats64(s) => Some(DeviceCounters {
            rx_packets: s.rx_packets,
            rx_dropped: s.rx_dropped,
            rx_errors: s.rx_errors,
        }),
        _ => None,
    })
}

/// A link message for [`NAME`], without ARP, up if `up`.
fn link(up: bool) -> LinkMessage {
    crate::netlink::noarp_link(NAME, up)
}

/// RTM_NEWLINK creating the device, down: collect-metadata (any VNI, no
/// remote of its own), on `port`, without learning.
fn new_link(port: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = link(false);
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(port),
            InfoVxlan::Learning(false),
        ])),
    ]));
    request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NetlinkPayload;

    use super::*;

    #[test]
    fn receive_counters_come_from_the_links_64_bit_statistics() {
        let mut l = LinkMessage::default();
        assert_eq!(device_counters(&l), None, "no statistics, no counters");
        let mut s = netlink_packet_route::link::Stats64::default();
        s.rx_packets = 1473;
        s.rx_dropped = 2;
        s.rx_errors = 1;
        s.tx_packets = 9;
        l.attributes.push(LinkAttribute::Stats64(s));
        assert_eq!(
            device_counters(&l),
            Some(DeviceCounters {
                rx_packets: 1473,
                rx_dropped: 2,
                rx_errors: 1
            })
        );
    }

    #[test]
    fn the_device_is_collect_metadata_on_the_port() {
        let m = new_link(4790);
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).expect("parses");
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = back.payload else {
            panic!("a new link: {:?}", back.payload);
        };
        assert!(l.attributes.contains(&LinkAttribute::IfName(NAME.into())));
        let data = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
                _ => None,
            }),
            _ => None,
        });
        let data = data.expect("VXLAN data");
        assert!(data.contains(&InfoVxlan::CollectMetadata(true)));
        assert!(data.contains(&InfoVxlan::Port(4790)));
        assert!(data.contains(&InfoVxlan::Learning(false)));
    }
}

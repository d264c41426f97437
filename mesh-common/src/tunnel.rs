//! The VXLAN overlay (RFC 7348): constants, the node table and this node's
//! own settings.
//!
//! Every node owns one /24 of the cluster CIDR; a container address names
//! its node. Traffic from a local container to another node's /24 (or to a
//! backend there) is encapsulated: outer Ethernet / IPv4 / UDP 4789 /
//! VXLAN (the cluster VNI) / the original frame.

/// IANA-assigned VXLAN UDP destination port, the default.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN header length.
pub const VXLAN_HLEN: usize = 8;
/// Bytes added in front of a frame: outer Ethernet, IPv4 (no options), UDP, VXLAN.
pub const ENCAP_LEN: usize = 14 + 20 + 8 + VXLAN_HLEN;
/// VXLAN flags byte: I (the VNI is valid).
pub const VXLAN_FLAG_I: u8 = 0x08;
/// Outer UDP source ports come from the inner flow hash, in this range, so
/// ECMP in the underlay spreads flows (RFC 7348 section 5).
pub const SPORT_BASE: u16 = 49152;
pub const SPORT_MASK: u16 = 0x3fff;

/// What XDP on the underlay NIC did to a frame travels to the underlay TC
/// program in the frame's destination MAC: `[MARK_MAC_TAG, mark, this
/// node's underlay address (4 bytes)]`; TC puts the NIC's own MAC back.
/// (XDP metadata would be the natural place, but some kernels refuse
/// `bpf_xdp_adjust_meta` to XDP programs.) XDP drops a frame that arrives
/// with such a destination: only XDP writes one.
pub const MARK_MAC_TAG: u8 = 0x06;
/// A frame this node decapsulated (or a routing-mesh request it balanced
/// here), so the underlay TC program delivers to containers only what came
/// through the tunnel (never a plain frame from the wire).
pub const DECAP_MARK: u8 = 1;
/// A reply of a routing-mesh flow that XDP took out of the tunnel: the
/// underlay TC program translates it back to the published port and sends
/// it on to the client (FIB lookup).
pub const REPLY_MARK: u8 = 2;
/// skb mark of a packet the underlay TC program hands to a container (it
/// came through the tunnel or the routing mesh): the container's veth
/// tells such packets from ones the host stack delivers (Docker's own
/// `-p`, routing).
pub const DELIVERED_MARK: u32 = 0x4d53_0001;
/// skb mark of a VIP flow's reply that its backend's veth translated and
/// hands straight to the client's veth: nothing is left to look up there.
pub const TRANSLATED_MARK: u32 = 0x4d53_0002;

/// skb mark of VXLAN the underlay TC program checked and hands to the
/// kernel's VXLAN device (`mesh-vxlan`) to decapsulate, the low byte the
/// mark the frame would carry decapsulated ([`DECAP_MARK`],
/// [`REPLY_MARK`]); the device's TC program takes it up from there.
pub const HANDOFF_MARK: u32 = 0x4d53_0100;

/// The mark a packet with the skb mark `skb_mark` was handed to `mesh-vxlan`
/// with, if [`HANDOFF_MARK`] says it was.
pub const fn handoff_mark(skb_mark: u32) -> Option<u8> {
    if skb_mark & !0xff == HANDOFF_MARK {
        Some(skb_mark as u8)
    } else {
        None
    }
}

/// A routing-mesh packet too large for the tunnel with DF set: the
/// underlay TC program answers it with ICMP fragmentation needed.
pub const TOO_BIG_MARK: u8 = 3;
/// A routing-mesh request XDP balanced (its flow is in conntrack): the
/// underlay TC program translates it to the backend and sends it there.
/// XDP leaves the packet as it came: its TCP/UDP checksum may still be
/// partial (a virtual NIC hands over the sender's offloaded checksum), which
/// only TC's helpers can update right.
pub const BALANCED_MARK: u8 = 4;

/// The destination MAC that carries `mark` on the node at `underlay_ip_be`.
pub const fn mark_mac(mark: u8, underlay_ip_be: u32) -> [u8; 6] {
    let ip = underlay_ip_be.to_ne_bytes();
    [MARK_MAC_TAG, mark, ip[0], ip[1], ip[2], ip[3]]
}

/// Prefix length of a node's subnet.
pub const NODE_PREFIX: u8 = 24;
pub const NODE_MASK: u32 = 0xffff_ff00;

/// The MAC the data plane answers a container's ARP with, for addresses
/// of its network on other nodes and its network's VIPs (`02` local, then
/// "mesh" and `fe`): frames to it come to the container's veth program,
/// which always tunnels, balances or drops them.
pub const ARP_MAC: [u8; 6] = [0x02, 0x6d, 0x65, 0x73, 0x68, 0xfe];

/// A remote node, keyed by its /24 (network order, host bits zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Its underlay address. The next hop toward it (its NIC on a shared
    /// segment, a router otherwise) comes from the kernel's FIB.
    pub underlay_ip_be: u32,
    /// Destination MAC of the frames it gets inside the tunnel: the MAC of
    /// the device that decapsulates them. A mesh node rewrites it on
    /// decapsulation (its NIC's MAC is used); a standard Linux vxlan device
    /// (RFC 7348 peer) takes only frames for its own MAC.
    pub inner_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The VNI of the network the slice belongs to.
    pub vni: u32,
}

/// `MESH_NETS` has one slot per /16 of the address space, indexed by an
/// address's top 16 bits ([`net16`]): a data-plane program reads it on
/// every container packet to an address outside `mesh`, and an array slot
/// costs next to nothing where a hash lookup costs about 20 ns.
pub const NET16_SLOTS: u32 = 1 << 16;
/// A `MESH_NETS` slot's VNI: the overlay network of that /16 (0: none).
pub const NET16_VNI: u32 = (1 << 24) - 1;
/// A `MESH_NETS` slot's flag: some node's underlay address lies in that
/// /16 (an address elsewhere is no node's and has no published port).
pub const NET16_NODES: u32 = 1 << 31;

/// The `MESH_NETS` slot of an address (network order).
#[inline(always)]
pub const fn net16(ip_be: u32) -> u32 {
    u32::from_be(ip_be) >> 16
}

/// A veth's container (`MESH_VETH_SRC`, by the veth's ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct VethSrc {
    /// Its address (network order; 0: none).
    pub ip_be: u32,
    /// The VNI of the network the veth is on.
    pub vni: u32,
    /// `VETH_PUBLISHED`, `VETH_PER_PACKET`, or 0.
    pub flags: u32,
}

/// A `VethSrc` flag: the container is (or was, while it lives) a backend
/// of a published port, so its packets to the world may be replies to the
/// routing mesh's clients (looked up in conntrack). Other containers'
/// packets to the world skip that lookup.
pub const VETH_PUBLISHED: u32 = 1;
/// [`VethSrc::flags`]: the container has been the backend of a VIP flow
/// translated per packet (set by the data plane, never by the agent): its
/// replies to a client on this node are translated at its own veth and
/// handed straight to the client's. Containers whose flows are all
/// balanced at the socket never pay that lookup.
pub const VETH_PER_PACKET: u32 = 2;

/// This node, slot 0 of the config array (written by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalNode {
    /// This node's /24 (network order).
    pub subnet_be: u32,
    /// The cluster CIDR and its mask (network order): only addresses in it
    /// are tunnelled.
    pub cluster_be: u32,
    pub cluster_mask_be: u32,
    pub underlay_ip_be: u32,
    pub underlay_ifindex: u32,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    pub underlay_mac: [u8; 6],
    /// 1 once the agent has written this slot; the overlay is off until then.
    pub enabled: u8,
    /// The index of this node's /24 in the cluster CIDR: its slice of
    /// every other network (the /24 with this third octet).
    pub slice_index: u8,
    /// The largest TCP MSS whose segments fit the tunnel (the underlay's
    /// MTU less the VXLAN, IPv4 and TCP headers); SYNs of routing-mesh
    /// flows through the tunnel are clamped to it. 0: no clamping.
    pub tunnel_mss: u16,
    /// The VXLAN UDP port, the same on every node (network order; 0:
    /// [`VXLAN_PORT`]).
    pub vxlan_port_be: u16,
    /// The host's address on the overlay: the `mesh` network's gateway
    /// (network order). The host's own packets to other nodes' /24s leave
    /// from it through [`LocalNode::host_ifindex`]; tunnelled packets for
    /// it are handed to the stack there. 0: no host link.
    pub host_ip_be: u32,
    /// The host link (`mesh-host`, the veth the cluster CIDR is routed
    /// to) and its MAC.
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// 1: no XDP on the underlay NIC (`--xdp-mode off`); its TC program
    /// does XDP's part (VXLAN in, the routing mesh's requests) on the skb.
    pub tc_only: u8,
    /// 1: the kernel's VXLAN device `mesh-vxlan`, its program attached,
    /// holds the VXLAN port. Its socket lets GRO merge VXLAN packets;
    /// the underlay TC program hands such merged packets to it to
    /// decapsulate ([`HANDOFF_MARK`]), and decapsulates the others itself.
    pub vxlan_device: u8,
    /// The WireGuard device (`mesh-wg`) every tunnelled packet leaves by,
    /// encrypted, when the cluster encrypts (`--encrypt`); plain VXLAN from
    /// the wire is then dropped. 0: the tunnel is plain.
    pub wg_ifindex: u32,
    /// 1 (`--local-via-bridge`): a container's packets for another
    /// container of its network on this node go through the bridge (the
    /// host's forwarding and its netfilter rules see them); 0: straight to
    /// that container's veth, as the tunnel delivers.
    pub via_bridge: u8,
    pub _pad: [u8; 3],
}

/// What the underlay's MTU must hold besides a tunnelled TCP segment's
/// payload: outer IPv4, UDP and VXLAN headers, the inner Ethernet header
/// (as many bytes as the outer one [`ENCAP_LEN`] counts but the MTU does
/// not), inner IPv4 and TCP headers: 90 bytes.
pub const TUNNEL_TCP_OVERHEAD: u32 = ENCAP_LEN as u32 + 20 + 20;

/// What WireGuard adds to a packet over IPv4: outer IPv4 (20) and UDP (8)
/// headers, its data header (16) and authentication tag (16).
pub const WG_OVERHEAD: u32 = 60;
/// WireGuard's UDP port on every node of an encrypting cluster, the
/// default (`--wg-port`).
pub const WG_PORT: u16 = 51820;

/// A container on this node (by its address): where decapsulated traffic
/// for it goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Its host-side veth.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// One of Docker's other bridge networks on this node (the default
/// bridge, user-defined ones), by its bridge's ifindex (`MESH_BRIDGES`).
/// Its containers may call published ports on a node's address or on the
/// bridge's gateway; only sources inside its subnet are balanced (a
/// container may forge any source).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bridge {
    /// The subnet's network address and mask (network order).
    pub net_be: u32,
    pub mask_be: u32,
    /// The bridge's own address on it (0: none known).
    pub gateway_be: u32,
}

impl LocalNode {
    /// The VXLAN UDP port (network order).
    #[inline(always)]
    pub const fn vxlan_port_be(&self) -> u16 {
        if self.vxlan_port_be == 0 {
            VXLAN_PORT.to_be()
        } else {
            self.vxlan_port_be
        }
    }
}

impl Bridge {
    /// Whether `ip_be` is inside the subnet.
    #[inline(always)]
    pub const fn contains(&self, ip_be: u32) -> bool {
        self.mask_be != 0 && ip_be & self.mask_be == self.net_be
    }
}

const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 12);
const _: () = assert!(core::mem::size_of::<Bridge>() == 12);
const _: () = assert!(core::mem::size_of::<Node>() == 16);
const _: () = assert!(core::mem::size_of::<VethSrc>() == 12);
const _: () = assert!(core::mem::size_of::<LocalNode>() == 60);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields, explicit padding.
    unsafe impl aya::Pod for super::Node {}
    unsafe impl aya::Pod for super::LocalNode {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::Bridge {}
    unsafe impl aya::Pod for super::VethSrc {}
}

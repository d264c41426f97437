//! The overlay: which node an address lives on and VXLAN encapsulation,
//! for either hook. The hooks that decapsulate and deliver are in
//! `underlay`.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use mesh_common::{
    stats::Stat,
    tunnel::{
        DELIVERED_MARK, ENCAP_LEN, LocalNode, NET16_VNI, NODE_MASK, Node, SPORT_BASE, SPORT_MASK,
        VXLAN_FLAG_I, WG_OVERHEAD, net16,
    },
};

use crate::{
    ctx::{Packet, Verdict},
    fib::{self, Hop},
    hdr::{ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, UdpHdr, VxlanHdr},
    maps::{LOCAL_EPS, LOCAL_NODE, NETS, NODES},
    stats::bump,
};

/// This node's settings, when the agent has enabled the overlay.
#[inline(always)]
pub fn local() -> Option<LocalNode> {
    local_ref().copied()
}

/// [`local`] in the map, not copied: a pointer the verifier follows
/// through branches, where a copied `Option<LocalNode>` may leave stack
/// slots it cannot prove written.
#[inline(always)]
pub fn local_ref() -> Option<&'static LocalNode> {
    LOCAL_NODE.get(0).filter(|l| l.enabled == 1)
}

/// Where an address lives.
pub enum Route {
    /// On this node, or outside the cluster: the stack delivers it.
    Here,
    /// On another node.
    /// On another node (its entry in the map, not a copy: less stack).
    Remote(&'static Node),
}

#[inline(always)]
pub fn route(l: &LocalNode, dst_be: u32) -> Result<Route, Stat> {
    locate(l, dst_be).map(|(_, r)| r)
}

/// The `MESH_NETS` slot of `ip_be`'s /16: its network's VNI and whether
/// nodes' addresses lie there.
#[inline(always)]
pub fn net16_slot(ip_be: u32) -> u32 {
    NETS.get(net16(ip_be)).map_or(0, |v| *v)
}

/// The VNI of the overlay network `ip_be` belongs to: `mesh` (the cluster
/// CIDR) or another network (`MESH_NETS`); 0 for any other address.
#[inline(always)]
pub fn vni_of(l: &LocalNode, ip_be: u32) -> u32 {
    if ip_be & l.cluster_mask_be == l.cluster_be {
        return l.vni;
    }
    net16_slot(ip_be) & NET16_VNI
}

/// The index of the /24 `ip_be` lies in within its /16 (its third octet).
#[inline(always)]
fn slice_of(ip_be: u32) -> u8 {
    (u32::from_be(ip_be) >> 8) as u8
}

/// Whether `ip_be` is in one of this node's own slices: its /24 of the
/// cluster CIDR or of another network.
#[inline(always)]
pub fn is_local_slice(l: &LocalNode, ip_be: u32) -> bool {
    if ip_be & NODE_MASK.to_be() == l.subnet_be {
        return true;
    }
    ip_be & l.cluster_mask_be != l.cluster_be
        && slice_of(ip_be) == l.slice_index
        && l.slice_index != 0
        && net16_slot(ip_be) & NET16_VNI != 0
}

/// Where an address lives and the VNI of its network (0: no overlay
/// network's). A slice no node holds is a counted drop; so is another
/// network's VIP slice (slice 0) beyond its services.
#[inline(always)]
pub fn locate(l: &LocalNode, dst_be: u32) -> Result<(u32, Route), Stat> {
    let subnet = dst_be & NODE_MASK.to_be();
    let vni = if dst_be & l.cluster_mask_be == l.cluster_be {
        if subnet == l.subnet_be {
            return Ok((l.vni, Route::Here));
        }
        l.vni
    } else {
        let vni = net16_slot(dst_be) & NET16_VNI;
        if vni == 0 {
            return Ok((0, Route::Here));
        }
        let slice = slice_of(dst_be);
        if slice == l.slice_index {
            return Ok((vni, Route::Here));
        }
        if slice == 0 {
            return Err(Stat::TunnelNoNode);
        }
        vni
    };
    // SAFETY: plain data written by the agent.
    match unsafe { NODES.get(&subnet) } {
        Some(n) => Ok((vni, Route::Remote(n))),
        None => Err(Stat::TunnelNoNode),
    }
}

/// Everything VXLAN puts in front of a frame, plus the inner Ethernet
/// header it rewrites: outer Ethernet / IPv4 / UDP / VXLAN / inner Ethernet.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Encap {
    eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner: EthHdr,
}
const _: () = assert!(core::mem::size_of::<Encap>() == ENCAP_LEN + ETH_HLEN);

/// Wraps the whole frame in outer Ethernet / IPv4 / UDP / VXLAN for `node`
/// and sends it toward that node's address the way the kernel's FIB says
/// (a peer on this segment directly, one behind a router through it). The
/// UDP source port comes from the inner flow hash (ECMP spreads flows,
/// RFC 7348 section 5).
#[inline(always)]
pub fn encap(ctx: &TcContext, l: &LocalNode, node: &Node, flow_hash: u32) -> Result<Verdict, Stat> {
    let inner_len = Packet::len(ctx);
    let inner_eth: EthHdr = Packet::load(ctx, 0).ok_or(Stat::TunnelEncapFail)?;
    let ip_len = (inner_len + ENCAP_LEN - ETH_HLEN) as u16;
    // SAFETY: the context's own skb; gso_size is readable by TC programs.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let gso = gso_size != 0;
    // Asked before anything changes, so a drop leaves the packet as it was.
    // Encrypted, the underlay carries WireGuard's header too.
    let wire_len = if l.wg_ifindex != 0 {
        ip_len + WG_OVERHEAD as u16
    } else {
        ip_len
    };
    let hop = fib::lookup(
        ctx,
        l.underlay_ifindex,
        (l.underlay_ip_be, node.underlay_ip_be),
        IPPROTO_UDP,
        if gso { 0 } else { wire_len },
    );
    let (dst, src) = match hop {
        Hop::Resolved { dmac, smac, .. } => (dmac, smac),
        Hop::NoNeigh { .. } => {
            bump(Stat::TunnelNeighResolve);
            ([0; 6], l.underlay_mac)
        }
        Hop::Declined => ([0; 6], l.underlay_mac),
        Hop::NoRoute => return Err(Stat::TunnelNoRoute),
        Hop::TooBig => return Err(Stat::TunnelTooBig),
    };
    // The flags tell the kernel it is a UDP tunnel with an inner Ethernet
    // header, so GSO segments large TCP sends correctly. A GSO packet's
    // segments keep their size when each still fits the tunnel; otherwise
    // the kernel makes them 50 bytes smaller (and copies a packet GRO
    // merged whole to do it).
    let fixed = if gso && segments_fit(ctx, l, gso_size) {
        BPF_F_ADJ_ROOM_FIXED_GSO as u64
    } else {
        0
    };
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        | encap_l2(ETH_HLEN as u64)
        | fixed;
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Stat::TunnelEncapFail)?;
    let ip = Ipv4Hdr::ours(IPPROTO_UDP, l.underlay_ip_be, node.underlay_ip_be, ip_len);
    let h = Encap {
        eth: EthHdr {
            dst,
            src,
            proto_be: ETH_P_IP.to_be(),
        },
        ip,
        udp: UdpHdr {
            sport_be: (SPORT_BASE | (flow_hash as u16 & SPORT_MASK)).to_be(),
            dport_be: l.vxlan_port_be(),
            len_be: (ip_len - 20).to_be(),
            // 0: no checksum, allowed for VXLAN over IPv4 (RFC 7348 section 5).
            csum_be: 0,
        },
        vxlan: VxlanHdr {
            flags: VXLAN_FLAG_I,
            _reserved: [0; 3],
            // The network of the inner destination's slice (the cluster
            // VNI for the host link's and the routing mesh's legs).
            vni_be: ((if node.vni == 0 { l.vni } else { node.vni }) << 8).to_be(),
        },
        // The inner frame keeps the container's source MAC; its destination
        // is the device that decapsulates it (a mesh node's NIC, or a Linux
        // vxlan device), so the receiver's stack takes it as its own.
        inner: EthHdr {
            dst: node.inner_mac,
            src: inner_eth.src,
            proto_be: inner_eth.proto_be,
        },
    };
    Packet::store(ctx, 0, &h).ok_or(Stat::TunnelEncapFail)?;
    if l.wg_ifindex != 0 {
        // Into WireGuard, which seals it for the node whose allowed IP is
        // the outer destination and sends it on its own UDP socket (the
        // kernel strips the outer Ethernet header: the device is L3).
        bump(Stat::TunnelEncrypt);
        return Ok(Verdict::redirect(l.wg_ifindex));
    }
    hop.verdict(l.underlay_ifindex).ok_or(Stat::TunnelNoRoute)
}

/// Whether every segment of GSO packet `ctx` (segments of `gso_size`
/// bytes of TCP or UDP payload) fits the tunnel: its IPv4 packet no longer
/// than the overlay's MTU, the largest the underlay carries with the VXLAN
/// headers around it (`tunnel_mss` and the 40 bytes of IPv4 and TCP
/// headers it leaves out; 0: not known, so no). A container's and the host
/// link's packets always fit, the MTU of their device being that one; a
/// routing-mesh flow's fit through the MSS its SYN was clamped to.
#[inline(always)]
fn segments_fit(ctx: &TcContext, l: &LocalNode, gso_size: u32) -> bool {
    let Some(ip) = Packet::load::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    let ihl = ((ip.vihl & 0x0f) as u32) * 4;
    let l4 = match ip.proto {
        IPPROTO_TCP => {
            let Some(off) = Packet::load::<u8>(ctx, ETH_HLEN + ihl as usize + 12) else {
                return false;
            };
            ((off >> 4) as u32) * 4
        }
        IPPROTO_UDP => 8,
        _ => return false,
    };
    l.tunnel_mss != 0 && ihl + l4 + gso_size <= l.tunnel_mss as u32 + 40
}

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header's length.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Hands a packet this node took from the tunnel or the routing mesh to
/// the local container at `dst_be` (as the bridge would deliver it, so
/// forwarding never depends on the host's FORWARD chain), marked for the
/// container's veth; one that is not here is left to the stack.
#[inline(always)]
pub fn deliver_local(ctx: &TcContext, l: &LocalNode, dst_be: u32) -> Result<Verdict, Stat> {
    // SAFETY: plain data written by the agent.
    let Some(ep) = (unsafe { LOCAL_EPS.get(&dst_be) }).copied() else {
        bump(Stat::TunnelPass);
        return Ok(Verdict::PASS);
    };
    set_macs(ctx, &ep.mac, &l.underlay_mac).ok_or(Stat::NatRewriteFail)?;
    // SAFETY: the context's own skb; TC may write its mark.
    unsafe { (*ctx.skb.skb).mark = DELIVERED_MARK };
    bump(Stat::TunnelDeliver);
    Ok(Verdict::redirect(ep.ifindex))
}

/// Sets the frame's destination and source MACs.
#[inline(always)]
pub fn set_macs<P: Packet>(p: &P, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    p.store(0, &macs)
}

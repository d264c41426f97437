//! The overlay: which node an address lives on, VXLAN encapsulation (for
//! either hook), and handing decapsulated packets to local containers.

use aya_ebpf::programs::TcContext;
use mesh_common::{
    stats::Stat,
    tunnel::{
        DECAP_MARK, DELIVERED_MARK, ENCAP_LEN, LocalNode, NODE_MASK, Node, REPLY_MARK, SPORT_BASE,
        SPORT_MASK, TOO_BIG_MARK, VXLAN_FLAG_I, VXLAN_PORT,
    },
};

use crate::{
    ctx::{Packet, Verdict, pass},
    maps::{LOCAL_EPS, LOCAL_NODE, NODES},
    parse::{ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_UDP, Ipv4Hdr, UdpHdr, VxlanHdr},
};

/// This node's settings, when the agent has enabled the overlay.
#[inline(always)]
pub fn local() -> Option<LocalNode> {
    LOCAL_NODE.get(0).copied().filter(|l| l.enabled == 1)
}

/// Where an address lives.
pub enum Route {
    /// On this node, or outside the cluster: the stack delivers it.
    Here,
    /// On another node.
    Remote(Node),
}

#[inline(always)]
pub fn route(l: &LocalNode, dst_be: u32) -> Result<Route, Stat> {
    if dst_be & l.cluster_mask_be != l.cluster_be {
        return Ok(Route::Here);
    }
    let subnet = dst_be & NODE_MASK.to_be();
    if subnet == l.subnet_be {
        return Ok(Route::Here);
    }
    // SAFETY: plain data written by the agent.
    match unsafe { NODES.get(&subnet) } {
        Some(n) => Ok(Route::Remote(*n)),
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
/// and sends it out of the underlay NIC. The UDP source port comes from
/// the inner flow hash (ECMP spreads flows, RFC 7348 section 5).
#[inline(always)]
pub fn encap<P: Packet>(
    p: &P,
    l: &LocalNode,
    node: &Node,
    flow_hash: u32,
) -> Result<Verdict, Stat> {
    let inner_len = p.len();
    let inner_eth: EthHdr = p.load(0).ok_or(Stat::TunnelEncapFail)?;
    p.grow_for_vxlan(ENCAP_LEN).ok_or(Stat::TunnelEncapFail)?;
    let ip_len = (inner_len + ENCAP_LEN - ETH_HLEN) as u16;
    let ip = Ipv4Hdr::ours(IPPROTO_UDP, l.underlay_ip_be, node.underlay_ip_be, ip_len);
    let h = Encap {
        eth: EthHdr {
            dst: node.mac,
            src: l.underlay_mac,
            proto_be: ETH_P_IP.to_be(),
        },
        ip,
        udp: UdpHdr {
            sport_be: (SPORT_BASE | (flow_hash as u16 & SPORT_MASK)).to_be(),
            dport_be: VXLAN_PORT.to_be(),
            len_be: (ip_len - 20).to_be(),
            // 0: no checksum, allowed for VXLAN over IPv4 (RFC 7348 section 5).
            csum_be: 0,
        },
        vxlan: VxlanHdr {
            flags: VXLAN_FLAG_I,
            _reserved: [0; 3],
            vni_be: (l.vni << 8).to_be(),
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
    p.store(0, &h).ok_or(Stat::TunnelEncapFail)?;
    Ok(Verdict::redirect(l.underlay_ifindex))
}

/// TC ingress on the underlay NIC, after XDP decapsulated what is ours: a
/// packet for a container on this node goes straight to its veth (as the
/// bridge would deliver it), so forwarding never depends on the host's
/// FORWARD chain, but only when XDP marked it as decapsulated here: a plain
/// frame from the wire for a container is left to the stack and the
/// host's firewall (`tunnel_unmarked`). Everything else is left to the stack.
#[inline(always)]
pub fn underlay_ingress(ctx: &TcContext) -> Result<Verdict, Stat> {
    let Some(local) = local() else {
        return pass(Stat::TunnelPass);
    };
    let mark = xdp_mark(ctx, local.underlay_ip_be);
    if mark == REPLY_MARK {
        return crate::ingress::forward_reply(ctx, &local);
    }
    if mark == TOO_BIG_MARK {
        return crate::ingress::frag_needed(ctx, &local);
    }
    let Some(eth) = Packet::load::<EthHdr>(ctx, 0) else {
        return pass(Stat::TunnelPass);
    };
    let Some(ip) = Packet::load::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return pass(Stat::TunnelPass);
    };
    if u16::from_be(eth.proto_be) != ETH_P_IP {
        return pass(Stat::TunnelPass);
    }
    if ip.dst_be & NODE_MASK.to_be() != local.subnet_be {
        // XDP sent a routing-mesh request to a backend on another node.
        if mark == DECAP_MARK
            && let Route::Remote(node) = route(&local, ip.dst_be)?
        {
            let hash = crate::parse::ipv4(ctx).map_or(0, |pk| pk.route_hash());
            let v = encap(ctx, &local, &node, hash)?;
            crate::stats::bump(Stat::TunnelEncap);
            return Ok(v);
        }
        return pass(Stat::TunnelPass);
    }
    if ip.dst_be == local.host_ip_be && local.host_ifindex != 0 && mark == DECAP_MARK {
        // For the host itself (a backend's answer to a VIP connect of the
        // host's): into the stack through the host link, where the route
        // back to the sender lies, so reverse-path filtering agrees.
        set_macs(ctx, &local.host_mac, &local.underlay_mac).ok_or(Stat::NatRewriteFail)?;
        crate::stats::bump(Stat::HostDeliver);
        return Ok(Verdict::redirect_ingress(local.host_ifindex));
    }
    // SAFETY: plain data written by the agent.
    let Some(ep) = unsafe { LOCAL_EPS.get(&ip.dst_be) }.copied() else {
        return pass(Stat::TunnelPass);
    };
    if mark != DECAP_MARK {
        return pass(Stat::TunnelUnmarked);
    }
    set_macs(ctx, &ep.mac, &local.underlay_mac).ok_or(Stat::NatRewriteFail)?;
    // SAFETY: the context's own skb; TC may write its mark.
    unsafe { (*ctx.skb.skb).mark = DELIVERED_MARK };
    crate::stats::bump(Stat::TunnelDeliver);
    Ok(Verdict::redirect(ep.ifindex))
}

/// The mark XDP left in front of this frame ([`DECAP_MARK`]: decapsulated
/// or routed here; [`REPLY_MARK`]: a routing-mesh reply), or 0: also when
/// the metadata is not this node's (its tag is another address: see
/// `underlay::mark`). A plain u32, not an Option: the verifier refuses
/// reading an Option's undefined payload.
#[inline(always)]
fn xdp_mark(ctx: &TcContext, tag: u32) -> u32 {
    // SAFETY: the context's own fields.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + 8 > data {
        return 0;
    }
    // SAFETY: [meta, meta + 8) lies before data, checked just above.
    let (mark, by) = unsafe {
        (
            (meta as *const u32).read_unaligned(),
            (meta as *const u32).add(1).read_unaligned(),
        )
    };
    if by == tag { mark } else { 0 }
}

/// Sets the frame's destination and source MACs.
#[inline(always)]
pub fn set_macs<P: Packet>(p: &P, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    p.store(0, &macs)
}

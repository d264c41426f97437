//! XDP on the underlay NIC.
//!
//! It classifies every frame (Ethernet / IPv4 / TCP or UDP / VXLAN) and
//! counts the path it took and its verdict. VXLAN with the cluster VNI for
//! this node's /24 is decapsulated and passed up; everything else passes
//! untouched. The routing mesh will hook in at the `XdpNotMesh` point.

use aya_ebpf::helpers::bpf_xdp_adjust_head;
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use mesh_common::{
    stats::Stat,
    tunnel::{NODE_MASK, VXLAN_FLAG_I, VXLAN_HLEN, VXLAN_PORT},
};

use crate::{
    parse::{
        ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, Ipv4Hdr, TcpHdr,
        UdpHdr, ptr_at,
    },
    stats::bump,
    tunnel,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (verdict, path) = classify(ctx);
    bump(path);
    bump(match verdict {
        xdp_action::XDP_DROP => Stat::XdpDrop,
        xdp_action::XDP_PASS => Stat::XdpPass,
        xdp_action::XDP_TX => Stat::XdpTx,
        xdp_action::XDP_REDIRECT => Stat::XdpRedirect,
        _ => Stat::XdpAborted,
    });
    verdict
}

/// The verdict for one frame and the counter saying why.
#[inline(always)]
fn classify(ctx: &XdpContext) -> (u32, Stat) {
    let (start, end) = (ctx.data(), ctx.data_end());
    let pass = xdp_action::XDP_PASS;

    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return (pass, Stat::XdpTruncated);
    };
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if u16::from_be(unsafe { (*eth).proto_be }) != ETH_P_IP {
        return (pass, Stat::XdpNotIpv4);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return (pass, Stat::XdpTruncated);
    };
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    let ihl = ip.header_len();
    let tot_len = u16::from_be(ip.tot_len_be) as usize;
    if ip.version() != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl {
        return (pass, Stat::XdpBadIpv4);
    }
    // Ethernet may pad short frames, so the frame can be longer than the
    // datagram, never shorter.
    if start + ETH_HLEN + tot_len > end {
        return (pass, Stat::XdpTruncated);
    }
    if ip.frag_offset() != 0 {
        return (pass, Stat::XdpFragment);
    }
    let l4 = ETH_HLEN + ihl;
    match ip.proto {
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(start, end, l4) else {
                return (pass, Stat::XdpTruncated);
            };
            // SAFETY: as above.
            if u16::from_be(unsafe { (*udp).dport_be }) == VXLAN_PORT {
                return vxlan(ctx, l4 + 8);
            }
            (pass, Stat::XdpNotMesh)
        }
        IPPROTO_TCP => {
            if ptr_at::<TcpHdr>(start, end, l4).is_none() {
                return (pass, Stat::XdpTruncated);
            }
            (pass, Stat::XdpNotMesh)
        }
        _ => (pass, Stat::XdpOtherL4),
    }
}

/// VXLAN whose header starts at `vx`: decapsulated and passed up when it
/// carries the cluster VNI and a packet for this node's /24, so the stack
/// delivers the inner packet to the container (and its veth's TC egress
/// program does the reverse NAT). Anything else passes untouched.
#[inline(always)]
fn vxlan(ctx: &XdpContext, vx: usize) -> (u32, Stat) {
    let pass = xdp_action::XDP_PASS;
    let Some(local) = tunnel::local() else {
        return (pass, Stat::XdpVxlan);
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(h) = ptr_at::<[u8; VXLAN_HLEN]>(start, end, vx) else {
        return (pass, Stat::XdpTruncated);
    };
    // SAFETY: ptr_at checked the bounds.
    let h = unsafe { *h };
    let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
    if h[0] & VXLAN_FLAG_I == 0 || vni != local.vni {
        return (pass, Stat::XdpVxlanForeign);
    }
    let inner = vx + VXLAN_HLEN;
    let Some(eth) = ptr_at::<EthHdr>(start, end, inner) else {
        return (pass, Stat::XdpTruncated);
    };
    // SAFETY: as above.
    if u16::from_be(unsafe { (*eth).proto_be }) != ETH_P_IP {
        return (pass, Stat::XdpVxlanForeign);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, inner + ETH_HLEN) else {
        return (pass, Stat::XdpTruncated);
    };
    // SAFETY: as above.
    if unsafe { (*ip).dst_be } & NODE_MASK.to_be() != local.subnet_be {
        return (pass, Stat::XdpVxlanForeign);
    }
    // SAFETY: ctx is the program's context; `inner` is within the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner as i32) } != 0 {
        return (pass, Stat::XdpVxlanForeign);
    }
    // Packet pointers are stale after adjust_head: read them again.
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return (xdp_action::XDP_DROP, Stat::XdpTruncated);
    };
    // SAFETY: checked just above; the frame is ours to rewrite.
    unsafe { (*eth.cast_mut()).dst = local.underlay_mac };
    (pass, Stat::XdpDecap)
}

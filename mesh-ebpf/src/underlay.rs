//! XDP on the underlay NIC.
//!
//! It classifies every frame with the shared parser (Ethernet / IPv4 / TCP
//! or UDP), then looks for VXLAN, and counts the path it took and its
//! verdict. VXLAN with the cluster VNI for this node's /24 is decapsulated
//! and passed up; everything else passes untouched. The routing mesh will
//! hook in at the `XdpNotMesh` point.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use mesh_common::{
    stats::Stat,
    tunnel::{NODE_MASK, VXLAN_FLAG_I, VXLAN_HLEN, VXLAN_PORT},
};

use crate::{
    ctx::{Packet, Verdict, pass},
    parse::{
        self, ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, ParseError, VxlanHdr,
    },
    tunnel,
};

/// The verdict for one frame; its path is counted here.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Verdict, Stat> {
    let pk = match parse::ipv4(ctx) {
        Ok(pk) => pk,
        Err(e) => {
            return pass(match e {
                ParseError::Truncated => Stat::XdpTruncated,
                ParseError::NotIpv4 => Stat::XdpNotIpv4,
                ParseError::BadIpv4 => Stat::XdpBadIpv4,
                ParseError::Fragment => Stat::XdpFragment,
            });
        }
    };
    match pk.t.proto {
        IPPROTO_UDP if u16::from_be(pk.t.dport_be) == VXLAN_PORT => vxlan(ctx, pk.l4_off + 8),
        IPPROTO_UDP | IPPROTO_TCP => pass(Stat::XdpNotMesh),
        _ => pass(Stat::XdpOtherL4),
    }
}

/// VXLAN whose header starts at `vx`: decapsulated and passed up when it
/// carries the cluster VNI and a packet for this node's /24, so the stack
/// (and the underlay TC program) delivers the inner packet to the
/// container, whose veth's TC egress program does any reverse NAT.
#[inline(always)]
fn vxlan(ctx: &XdpContext, vx: usize) -> Result<Verdict, Stat> {
    let Some(local) = tunnel::local() else {
        return pass(Stat::XdpVxlan);
    };
    let Some(h) = ctx.load::<VxlanHdr>(vx) else {
        return pass(Stat::XdpTruncated);
    };
    if h.flags & VXLAN_FLAG_I == 0 || h.vni() != local.vni {
        return pass(Stat::XdpVxlanForeign);
    }
    let inner = vx + VXLAN_HLEN;
    let Some(eth) = ctx.load::<EthHdr>(inner) else {
        return pass(Stat::XdpTruncated);
    };
    if u16::from_be(eth.proto_be) != ETH_P_IP {
        return pass(Stat::XdpVxlanForeign);
    }
    let Some(ip) = ctx.load::<Ipv4Hdr>(inner + ETH_HLEN) else {
        return pass(Stat::XdpTruncated);
    };
    if ip.dst_be & NODE_MASK.to_be() != local.subnet_be {
        return pass(Stat::XdpVxlanForeign);
    }
    // SAFETY: ctx is the program's context; `inner` is within the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner as i32) } != 0 {
        return pass(Stat::XdpVxlanForeign);
    }
    // Packet pointers are stale after adjust_head: `store` reads them again.
    if ctx.store(0, &local.underlay_mac).is_none() {
        crate::stats::bump(Stat::XdpTruncated);
        return Ok(Verdict::Drop);
    }
    pass(Stat::XdpDecap)
}

//! XDP on the underlay NIC.
//!
//! It classifies every frame with the shared parser (Ethernet / IPv4 / TCP
//! or UDP), then looks for VXLAN, and counts the path it took and its
//! verdict. VXLAN with the cluster VNI for this node's /24 is decapsulated
//! and passed up; everything else passes untouched. The routing mesh will
//! hook in at the `XdpNotMesh` point.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use mesh_common::{
    stats::Stat,
    tunnel::{DECAP_MARK, NODE_MASK, VXLAN_FLAG_I, VXLAN_HLEN, VXLAN_PORT},
};

use crate::{
    ctx::{Packet, Verdict, pass},
    ingress,
    maps::PEERS,
    parse::{
        self, ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, ParseError, Parsed,
        UdpHdr, VxlanHdr,
    },
    stats::bump,
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
            });
        }
    };
    if pk.fragment {
        return pass(Stat::XdpFragment);
    }
    match pk.t.proto {
        IPPROTO_UDP if u16::from_be(pk.t.dport_be) == VXLAN_PORT => vxlan(ctx, &pk),
        IPPROTO_UDP | IPPROTO_TCP => {
            // The routing mesh: a published port of this node.
            if let Some(local) = tunnel::local()
                && pk.t.dst_be == local.underlay_ip_be
                && let Some(r) = ingress::request(ctx, &pk, &local)
            {
                return r;
            }
            pass(Stat::XdpNotMesh)
        }
        _ => pass(Stat::XdpOtherL4),
    }
}

/// VXLAN: decapsulated and passed up only when it comes from a current
/// cluster node to this node's address, is well formed, carries the
/// cluster VNI and a packet for this node's /24. The decapsulated frame is
/// marked (XDP metadata) so the underlay TC program hands it to the
/// container; the container's veth egress program then does any reverse
/// NAT. Anything else passes untouched, to the stack and the host's firewall.
#[inline(always)]
fn vxlan(ctx: &XdpContext, pk: &Parsed) -> Result<Verdict, Stat> {
    let Some(local) = tunnel::local() else {
        return pass(Stat::XdpVxlan);
    };
    if pk.t.dst_be != local.underlay_ip_be {
        return pass(Stat::XdpVxlanNotOurs);
    }
    // SAFETY: plain data written by the agent.
    if unsafe { PEERS.get(&pk.t.src_be) }.is_none() {
        return pass(Stat::XdpVxlanUntrusted);
    }
    let Some(udp) = ctx.load::<UdpHdr>(pk.l4_off) else {
        return pass(Stat::XdpTruncated);
    };
    let udp_len = u16::from_be(udp.len_be) as usize;
    if pk.ttl == 0 || udp_len + pk.l4_off - ETH_HLEN != pk.ip_len as usize {
        return pass(Stat::XdpVxlanBad);
    }
    let vx = pk.l4_off + 8;
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
        // Not for a container here: a routing-mesh reply to translate, or
        // nothing of ours.
        return ingress::tunnelled_reply(ctx, &local, inner);
    }
    // A client outside the cluster came in through that node's published
    // port: the replies go back through it.
    ingress::note_return(ctx, &local, inner + ETH_HLEN, pk.t.src_be);
    // SAFETY: ctx is the program's context; `inner` is within the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner as i32) } != 0 {
        return pass(Stat::XdpVxlanForeign);
    }
    // Packet pointers are stale after adjust_head: `store` reads them again.
    if ctx.store(0, &local.underlay_mac).is_none() {
        bump(Stat::XdpTruncated);
        return Ok(Verdict::DROP);
    }
    if !mark(ctx, DECAP_MARK, local.underlay_ip_be) {
        bump(Stat::XdpMetaFail);
    }
    pass(Stat::XdpDecap)
}

/// Puts `value` ([`DECAP_MARK`], `REPLY_MARK`, `TOO_BIG_MARK`) in the
/// frame's XDP metadata for the underlay TC program, with this node's
/// underlay address (`tag`) beside it. TC acts only on a mark with its own
/// node's tag: an skb can arrive carrying metadata another node's XDP wrote
/// (a veth underlay hands the skb over whole), which it must never act on.
/// Found by a node's own connect balanced back to it through another node:
/// the replies came with that node's REPLY_MARK and were sent away instead
/// of delivered. (Writing a zero mark on every frame instead cost 12 ns a
/// frame.)
#[inline(always)]
pub fn mark(ctx: &XdpContext, value: u32, tag: u32) -> bool {
    // SAFETY: ctx is the program's context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -8) } != 0 {
        return false;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 8 > data {
        return false;
    }
    // SAFETY: [meta, meta + 8) lies before data, checked just above.
    unsafe {
        (meta as *mut u32).write_unaligned(value);
        (meta as *mut u32).add(1).write_unaligned(tag);
    }
    true
}

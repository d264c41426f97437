//! The mark XDP leaves for TC: XDP on the underlay NIC says what it did to
//! a frame ([`DECAP_MARK`], [`REPLY_MARK`], [`TOO_BIG_MARK`]) in the frame's
//! destination MAC, beside this node's underlay address
//! ([`mesh_common::tunnel::mark_mac`]), and the NIC's TC program reads it
//! and puts the NIC's own MAC back. Written, checked and read here only.
//!
//! Unforgeable from the wire: XDP sees every frame before TC does and
//! drops one that arrives with a mark ([`forged`]). The address beside the
//! mark keeps TC from acting on one another node's XDP wrote (a veth
//! underlay hands an skb over whole).

use aya_ebpf::{
    helpers::bpf_skb_change_type,
    programs::{TcContext, XdpContext},
};
#[cfg(doc)]
use mesh_common::tunnel::{DECAP_MARK, REPLY_MARK, TOO_BIG_MARK};
use mesh_common::{
    stats::Stat,
    tunnel::{LocalNode, MARK_MAC_TAG, mark_mac},
};

use crate::{ctx::Packet, tunnel};

/// `PACKET_HOST`: the frame is for this host (its destination MAC was
/// another while it carried the mark).
const PACKET_HOST: u32 = 0;

/// Marks the frame with `value` for this node's underlay TC program.
#[inline(always)]
pub fn write(ctx: &XdpContext, value: u8, underlay_ip_be: u32) -> Result<(), Stat> {
    ctx.store(0, &mark_mac(value, underlay_ip_be))
        .ok_or(Stat::XdpTruncated)
}

/// Whether a frame from the wire carries this node's mark: only XDP may
/// write one. Costs one byte's compare for every other frame.
#[inline(always)]
pub fn forged(ctx: &XdpContext) -> bool {
    let Some(dst) = ctx.load::<[u8; 6]>(0) else {
        return false;
    };
    dst[0] == MARK_MAC_TAG
        && tunnel::local().is_some_and(|l| dst == mark_mac(dst[1], l.underlay_ip_be))
}

/// The mark XDP left on this frame, or 0 (none, or another node's); a
/// marked frame gets the NIC's own MAC back and is the host's again.
#[inline(always)]
pub fn take(ctx: &TcContext, l: &LocalNode) -> u8 {
    let Some(dst) = Packet::load::<[u8; 6]>(ctx, 0) else {
        return 0;
    };
    if dst[0] != MARK_MAC_TAG || dst != mark_mac(dst[1], l.underlay_ip_be) {
        return 0;
    }
    if Packet::store(ctx, 0, &l.underlay_mac).is_none() {
        return 0;
    }
    // SAFETY: the context's own skb; HOST is a type TC may set.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    dst[1]
}

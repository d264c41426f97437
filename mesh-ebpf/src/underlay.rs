//! The underlay NIC's two hooks.
//!
//! XDP ([`run`]) classifies every frame with the shared parser (Ethernet /
//! IPv4 / TCP or UDP) and counts the path it took and its verdict: VXLAN
//! with the cluster VNI for this node's /24 is decapsulated and passed up,
//! a request to a published port of this node goes to the routing mesh
//! (`ingress`), everything else passes untouched.
//!
//! TC ingress ([`tc_ingress`]) then hands what XDP marked (`mark`) to
//! local containers, the routing mesh's replies and legs, or the stack.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_skb_change_head, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use mesh_common::{
    stats::Stat,
    tunnel::{
        BALANCED_MARK, DECAP_MARK, ENCAP_LEN, HANDOFF_MARK, LocalNode, REPLY_MARK, TOO_BIG_MARK,
        VXLAN_FLAG_I, VXLAN_HLEN, VXLAN_PORT, handoff_mark,
    },
};

use crate::{
    ctx::{Packet, Tc, Verdict, finish, pass},
    hdr::{ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, UdpHdr, VxlanHdr},
    ingress,
    maps::PEERS,
    mark,
    parse::{self, ParseError, Parsed},
    stats::bump,
    tunnel,
};

/// `bpf_skb_adjust_room`'s flags for taking the tunnel's headers off: a
/// GSO packet's segments keep their size, the size they had inside the
/// tunnel (the sender kept it, `tunnel::encap`), not 50 bytes more.
const DECAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64;

/// The verdict for one frame; its path is counted here.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Result<Verdict, Stat> {
    if mark::forged(ctx) {
        return Err(Stat::XdpForgedMark);
    }
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
    let local = tunnel::local_ref();
    let vxlan_port_be = local.map_or(VXLAN_PORT.to_be(), |l| l.vxlan_port_be());
    match pk.t.proto {
        IPPROTO_UDP if pk.t.dport_be == vxlan_port_be => vxlan(ctx, &pk, local),
        IPPROTO_UDP | IPPROTO_TCP => {
            // The routing mesh: a published port of this node.
            if let Some(local) = local
                && pk.t.dst_be == local.underlay_ip_be
                && let Some(r) = ingress::request(ctx, &pk, local)
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
/// network's VNI and a packet for this node's slices. The decapsulated
/// frame is marked (`mark`, in its destination MAC) so the underlay TC
/// program hands it to the container; the container's veth egress program
/// then does any reverse NAT. Anything else passes untouched, to the stack
/// and the host's firewall. While the cluster encrypts, nothing plain to
/// this node's address is taken: its VXLAN comes out of WireGuard
/// ([`wg_ingress`]).
#[inline(always)]
fn vxlan(ctx: &XdpContext, pk: &Parsed, local: Option<&LocalNode>) -> Result<Verdict, Stat> {
    let Some(local) = local.copied() else {
        return pass(Stat::XdpVxlan);
    };
    let (inner, dst_be) = match taken(ctx, pk, &local) {
        Ok(v) => v,
        Err(decided) => return decided,
    };
    if !tunnel::is_local_slice(&local, dst_be) {
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
    mark::write(ctx, DECAP_MARK, local.underlay_ip_be)?;
    pass(Stat::XdpDecap)
}

/// Whether VXLAN frame `pk` from the wire is taken in (its inner frame's
/// offset and destination), or what becomes of it: to this node's address,
/// not while the cluster encrypts (its VXLAN comes out of WireGuard), and
/// [`checked`]. A wrong VNI is dropped; whatever else is refused passes to
/// the host untouched. XDP's part, in XDP or in TC.
#[inline(always)]
fn taken<P: Packet>(p: &P, pk: &Parsed, local: &LocalNode) -> Result<(usize, u32), Decided> {
    if pk.t.dst_be != local.underlay_ip_be {
        return Err(pass(Stat::XdpVxlanNotOurs));
    }
    if local.wg_ifindex != 0 {
        return Err(Err(Stat::XdpVxlanPlain));
    }
    match checked(p, pk, local) {
        Ok(v) => Ok(v),
        Err(Stat::XdpVxlanBadVni) => Err(Err(Stat::XdpVxlanBadVni)),
        Err(s) => Err(pass(s)),
    }
}

/// What both ways in check of a VXLAN frame `pk` (UDP to the VXLAN port,
/// to this node's address): from a current cluster node, well formed
/// (lengths, TTL, the I flag, an IPv4 inner frame) and with the VNI of its
/// inner destination's network (the cluster VNI for an address of no
/// network: a routing-mesh reply), so a node never takes one network's
/// frame into another. Gives the inner frame's offset and its destination.
#[inline(always)]
fn checked<P: Packet>(p: &P, pk: &Parsed, local: &LocalNode) -> Result<(usize, u32), Stat> {
    // SAFETY: plain data written by the agent.
    if unsafe { PEERS.get(&pk.t.src_be) }.is_none() {
        return Err(Stat::XdpVxlanUntrusted);
    }
    let udp: UdpHdr = p.load(pk.l4_off).ok_or(Stat::XdpTruncated)?;
    let udp_len = u16::from_be(udp.len_be) as usize;
    if pk.ttl == 0 || udp_len + pk.l4_off - ETH_HLEN != pk.ip_len as usize {
        return Err(Stat::XdpVxlanBad);
    }
    let vx = pk.l4_off + 8;
    let h: VxlanHdr = p.load(vx).ok_or(Stat::XdpTruncated)?;
    if h.flags & VXLAN_FLAG_I == 0 {
        return Err(Stat::XdpVxlanForeign);
    }
    let inner = vx + VXLAN_HLEN;
    let eth: EthHdr = p.load(inner).ok_or(Stat::XdpTruncated)?;
    if u16::from_be(eth.proto_be) != ETH_P_IP {
        return Err(Stat::XdpVxlanForeign);
    }
    let ip: Ipv4Hdr = p.load(inner + ETH_HLEN).ok_or(Stat::XdpTruncated)?;
    let vni = tunnel::vni_of(local, ip.dst_be);
    if h.vni() != if vni == 0 { local.vni } else { vni } {
        return Err(Stat::XdpVxlanBadVni);
    }
    Ok((inner, ip.dst_be))
}

/// TC ingress on the WireGuard device (`mesh-wg`), where the kernel hands
/// what it decrypted from a node whose key it knows, and whose source
/// address is that node's (its allowed IP): the same VXLAN as travels plain
/// between nodes that do not encrypt, decapsulated here and handed on as
/// the underlay's hooks would (a container here, the host, a routing-mesh
/// reply to its client). The device is L3: an Ethernet header is put in
/// front first, so the frame is laid out as on the underlay. Nothing else
/// travels inside mesh's WireGuard: anything else is dropped.
#[inline(always)]
pub fn wg_ingress(ctx: &TcContext) -> Result<Verdict, Stat> {
    let Some(local) = tunnel::local_ref() else {
        return Err(Stat::WgNotVxlan);
    };
    // Its allowed IPs are IPv4 only: the parser below refuses anything
    // else. SAFETY: the program's own skb; 14 bytes of headroom, zeroed.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
        return Err(Stat::WgNotVxlan);
    }
    let eth = EthHdr {
        dst: local.underlay_mac,
        src: [0; 6],
        proto_be: ETH_P_IP.to_be(),
    };
    Packet::store(ctx, 0, &eth).ok_or(Stat::WgNotVxlan)?;
    let Ok(pk) = parse::ipv4(ctx) else {
        return Err(Stat::WgNotVxlan);
    };
    if pk.fragment
        || pk.t.proto != IPPROTO_UDP
        || pk.t.dport_be != local.vxlan_port_be()
        || pk.t.dst_be != local.underlay_ip_be
    {
        return Err(Stat::WgNotVxlan);
    }
    let (inner, dst_be) = match checked(ctx, &pk, local) {
        Ok(v) => v,
        Err(Stat::XdpVxlanBadVni) => return Err(Stat::XdpVxlanBadVni),
        Err(_) => return Err(Stat::WgNotVxlan),
    };
    let here = tunnel::is_local_slice(local, dst_be);
    if here {
        ingress::note_return(ctx, local, inner + ETH_HLEN, pk.t.src_be);
    } else if !ingress::is_tunnelled_reply(ctx, local, inner) {
        return Err(Stat::WgNotVxlan);
    }
    // Outer IPv4, UDP, VXLAN and the inner Ethernet header go; the one put
    // in front stays (its MACs are set by whoever sends the frame on).
    ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .map_err(|_| Stat::WgNotVxlan)?;
    bump(Stat::WgDecap);
    if !here {
        return ingress::forward_reply(ctx, local);
    }
    deliver_decapsulated(ctx, local, dst_be)
}

/// What stands for a verdict the TC program reached doing XDP's part.
type Decided = Result<Verdict, Stat>;

/// [`xdp_part_outlined`]'s answers besides a mark (0-255): the frame
/// passes (its path counted), or is dropped (its reason counted, a
/// listening monitor told).
const PART_PASSED: u32 = 0x100;
const PART_DROPPED: u32 = 0x200;

/// [`xdp_part`] as a BPF subprogram of its own, its answer a number: the
/// underlay TC program inlined whole would need more than the 512 bytes of
/// stack a BPF function may have.
#[inline(never)]
fn xdp_part_outlined(ctx: &TcContext, local: &LocalNode) -> u32 {
    match xdp_part(ctx, local) {
        Ok(mark) => mark as u32,
        Err(Ok(_)) => PART_PASSED,
        Err(Err(reason)) => {
            bump(reason);
            if let Some(s) = crate::monitor::on() {
                ctx.monitor_drop(reason, s);
            }
            PART_DROPPED
        }
    }
}

/// TC ingress on the underlay NIC without XDP (`--xdp-mode off`,
/// `LocalNode::tc_only`): XDP's part, done here on the skb, ending as XDP
/// ends, with the mark it would have left (0: none, the frame goes on as
/// any other), or with a verdict. VXLAN for this node is checked and
/// decapsulated (the outer Ethernet header stays, in place of the inner);
/// a request to a published port of this node is balanced.
#[inline(always)]
fn xdp_part(ctx: &TcContext, local: &LocalNode) -> Result<u8, Decided> {
    let Ok(pk) = parse::ipv4(ctx) else {
        return Ok(0);
    };
    if pk.fragment {
        return Ok(0);
    }
    match pk.t.proto {
        IPPROTO_UDP if pk.t.dport_be == local.vxlan_port_be() => vxlan_tc(ctx, &pk, local),
        IPPROTO_UDP | IPPROTO_TCP if pk.t.dst_be == local.underlay_ip_be => {
            ingress::request_tc(ctx, &pk, local).unwrap_or(Ok(0))
        }
        _ => Ok(0),
    }
}

/// [`vxlan`] on the skb: the mark XDP would leave, or a verdict.
#[inline(always)]
fn vxlan_tc(ctx: &TcContext, pk: &Parsed, local: &LocalNode) -> Result<u8, Decided> {
    let (inner, dst_be) = taken(ctx, pk, local)?;
    let (mark, count) = if tunnel::is_local_slice(local, dst_be) {
        ingress::note_return(ctx, local, inner + ETH_HLEN, pk.t.src_be);
        (DECAP_MARK, Stat::XdpDecap)
    } else if ingress::is_tunnelled_reply(ctx, local, inner) {
        (REPLY_MARK, Stat::IngressReplyDecap)
    } else {
        return Err(pass(Stat::XdpVxlanForeign));
    };
    // SAFETY: the context's own skb; TC may read its GSO size and write
    // its mark.
    if local.vxlan_device != 0 && unsafe { (*ctx.skb.skb).gso_size } != 0 {
        // GRO merged it (the device's socket lets it): decapsulated here,
        // the packet would keep its tunnel offload state, which breaks its
        // segmentation wherever it is forwarded. The kernel's device
        // decapsulates it and resets that; its program takes it from there
        // (`device_ingress`).
        unsafe { (*ctx.skb.skb).mark = HANDOFF_MARK | mark as u32 };
        bump(Stat::VxlanHandoff);
        return Err(Ok(Verdict::PASS));
    }
    if ctx
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .is_err()
    {
        return Err(pass(Stat::XdpVxlanForeign));
    }
    bump(count);
    Ok(mark)
}

/// TC ingress on the underlay NIC, after XDP decapsulated what is ours: a
/// packet for a container on this node goes straight to its veth (as the
/// bridge would deliver it), so forwarding never depends on the host's
/// FORWARD chain, but only when XDP marked it as decapsulated here: a plain
/// frame from the wire for this node's /24 is dropped (`tunnel_unmarked`):
/// containers are reachable from outside the cluster only through what
/// mesh publishes. Everything else is left to the stack.
///
/// Returns the hook's code. Without XDP on the NIC, XDP's part ([`xdp_part`])
/// and the rest ([`after_mark`]) are BPF subprograms of their own, called one
/// after the other: one function holding both would need more stack than
/// the verifier allows a call chain (512 bytes).
#[inline(always)]
pub fn tc_ingress(ctx: &TcContext) -> i32 {
    let Some(local) = tunnel::local() else {
        return finish::<Tc, _>(ctx, pass(Stat::TunnelPass));
    };
    // XDP's mark, or, without XDP, the same done here. A frame that
    // arrives with a mark then is nobody's: its destination MAC is not ours.
    let mark = if local.tc_only != 0 {
        match xdp_part_outlined(ctx, &local) {
            m if m <= u8::MAX as u32 => m as u8,
            PART_PASSED => return finish::<Tc, _>(ctx, Ok(Verdict::PASS)),
            _ => return finish::<Tc, _>(ctx, Ok(Verdict::DROP)),
        }
    } else {
        mark::take(ctx, &local)
    };
    after_mark(ctx, &local, mark)
}

/// TC ingress on `mesh-vxlan`, the kernel's VXLAN device on the VXLAN port:
/// what [`vxlan_tc`] handed it (a packet GRO merged), decapsulated by the
/// kernel, goes on as the underlay's own would with its mark. Anything
/// else reached the device's socket without mesh's checks and is dropped.
#[inline(always)]
pub fn device_ingress(ctx: &TcContext) -> i32 {
    // SAFETY: the context's own skb; TC may read and write its mark.
    let handed = handoff_mark(unsafe { (*ctx.skb.skb).mark });
    let (Some(local), Some(mark)) = (tunnel::local(), handed) else {
        return finish::<Tc, _>(ctx, Err(Stat::VxlanDeviceUnmarked));
    };
    unsafe { (*ctx.skb.skb).mark = 0 };
    bump(Stat::VxlanDeviceIn);
    after_mark(ctx, &local, mark)
}

/// [`tc_ingress`] once the frame's mark is known, as a BPF subprogram; the
/// hook's code.
#[inline(never)]
fn after_mark(ctx: &TcContext, local: &LocalNode, mark: u8) -> i32 {
    finish::<Tc, _>(ctx, dispatch(ctx, local, mark))
}

/// What the mark says, or the frame says without one.
#[inline(always)]
fn dispatch(ctx: &TcContext, local: &LocalNode, mark: u8) -> Result<Verdict, Stat> {
    let local = *local;
    if mark == REPLY_MARK {
        return ingress::forward_reply(ctx, &local);
    }
    if mark == TOO_BIG_MARK {
        return ingress::frag_needed(ctx, &local);
    }
    if mark == BALANCED_MARK {
        return ingress::forward_request(ctx, &local);
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
    if !tunnel::is_local_slice(&local, ip.dst_be) {
        return pass(Stat::TunnelPass);
    }
    if mark != DECAP_MARK {
        // Plain from the wire, for this node's /24: not through the tunnel
        // from a cluster node, so not for a container, whatever the host's
        // FORWARD policy would say. (Answers to the containers' own
        // connections are addressed to the node, which masquerades them.)
        return Err(Stat::TunnelUnmarked);
    }
    deliver_decapsulated(ctx, &local, ip.dst_be)
}

/// A frame out of the tunnel for an address in this node's slices: the
/// host's own (a backend's answer to a VIP connect of the host's) goes
/// into the stack through the host link, where the route back to the
/// sender lies, so reverse-path filtering agrees; a container's to its
/// veth.
#[inline(always)]
fn deliver_decapsulated(ctx: &TcContext, local: &LocalNode, dst_be: u32) -> Result<Verdict, Stat> {
    if dst_be == local.host_ip_be && local.host_ifindex != 0 {
        tunnel::set_macs(ctx, &local.host_mac, &local.underlay_mac).ok_or(Stat::NatRewriteFail)?;
        bump(Stat::HostDeliver);
        return Ok(Verdict::redirect_ingress(local.host_ifindex));
    }
    tunnel::deliver_local(ctx, local, dst_be)
}

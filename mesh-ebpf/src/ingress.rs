//! The routing mesh: a port published by a service answers on this node's
//! underlay address, balanced over the service's backends on every node,
//! with the client's address kept.
//!
//! - Request, in XDP on the underlay NIC: `MESH_PUBLISHED[(port, proto)]`
//!   gives the service; conntrack and Maglev (the same ring as its VIP, a
//!   hash without this node's address, so every node picks the same backend
//!   for a client's flow) give the backend; the frame is marked for the
//!   underlay TC program (`BALANCED_MARK`), which DNATs it to the backend
//!   its flow names and hands it to the backend's veth, or encapsulates it
//!   to the backend's node and sends it back out of the NIC. The
//!   translation is TC's: a frame's TCP/UDP checksum may still be partial
//!   (a virtual NIC hands over the sender's offloaded checksum), which XDP
//!   cannot see and only the skb helpers update right. (Not `XDP_TX`: a
//!   veth, as in the lab, drops what its peer's XDP sends back unless the
//!   peer runs an XDP program too; the TC path works on every driver.)
//! - The backend's node records which node a tunnelled flow came in
//!   through (`ct::track_return`); its veth sends the replies back there
//!   through the tunnel.
//! - Replies are translated back where the flow came in (the reverse entry,
//!   `CT_F_INGRESS`): at the backend's veth when it is local, in XDP when
//!   they come back through the tunnel. Then they leave toward the client
//!   by the kernel's FIB lookup (next hop and MACs from the routing and
//!   neighbour tables, never hard-coded).

use aya_ebpf::{
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use mesh_common::{
    ct::{CT_F_INGRESS, CT_F_RETURN, Tuple, tcp_flag},
    lb::{PublishedKey, published_hash},
    stats::Stat,
    tunnel::{
        BALANCED_MARK, LocalNode, NET16_NODES, REPLY_MARK, TOO_BIG_MARK, TUNNEL_TCP_OVERHEAD,
        WG_OVERHEAD,
    },
};

use crate::{
    csum, ct,
    ctx::{Packet, Verdict, pass},
    fib::{self, Hop},
    hdr::{
        ETH_HLEN, EthHdr, ICMP_DEST_UNREACH, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN,
        IcmpHdr, Ipv4Hdr, TcpHdr,
    },
    lb,
    maps::{NODES, PEERS, PUBLISHED},
    mark,
    nat::{self, End},
    parse::Parsed,
    stats::bump,
    tunnel,
};

/// ICMP destination unreachable, code: fragmentation needed and DF set.
const ICMP_FRAG_NEEDED: u8 = 4;

/// Whether `ip_be` is outside every overlay network (a routing-mesh
/// client, or a node: containers are inside one).
#[inline(always)]
fn outside(l: &LocalNode, ip_be: u32) -> bool {
    tunnel::vni_of(l, ip_be) == 0
}

/// A container's packet to a node's underlay address (this one or a peer's)
/// on a published port: the service that answers it. Balanced at the
/// container's veth like a VIP, replies restored to the node's address.
/// The caller checked that `t`'s destination is outside every network
/// (node addresses are: containers' own traffic pays nothing).
#[inline(always)]
pub fn published_at_node(l: &LocalNode, t: &Tuple) -> Option<u32> {
    // Most such packets go to the world: no node's /16, one array slot.
    if t.dst_be != l.underlay_ip_be
        && (tunnel::net16_slot(t.dst_be) & NET16_NODES == 0
            // SAFETY: plain data written by the agent.
            || unsafe { PEERS.get(&t.dst_be) }.is_none())
    {
        return None;
    }
    let key = PublishedKey {
        port_be: t.dport_be,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe { PUBLISHED.get(&key) }.map(|p| p.service_id)
}

/// The service published on the port `pk` is addressed to (this node's
/// underlay address), if any.
#[inline(always)]
fn published(pk: &Parsed) -> Option<u32> {
    let key = PublishedKey {
        port_be: pk.t.dport_be,
        proto: pk.t.proto,
        _pad: 0,
    };
    // SAFETY: plain data written by the agent.
    unsafe { PUBLISHED.get(&key) }.map(|p| p.service_id)
}

/// XDP: a TCP/UDP packet to this node's underlay address. `None`: not a
/// published port (the caller goes on).
#[inline(always)]
pub fn request(ctx: &XdpContext, pk: &Parsed, l: &LocalNode) -> Option<Result<Verdict, Stat>> {
    let service_id = published(pk)?;
    Some(match balance(ctx, pk, l, service_id) {
        // The underlay TC program turns it into ICMP (`frag_needed`).
        Ok(Balanced::TooBig) => mark::write(ctx, TOO_BIG_MARK, l.underlay_ip_be)
            .and_then(|()| pass(Stat::IngressTooBig)),
        // The underlay TC program translates it (`forward_request`) and
        // hands it to the backend's veth, or to the tunnel toward the
        // backend's node.
        Ok(Balanced::Forward(path)) => {
            mark::write(ctx, BALANCED_MARK, l.underlay_ip_be).and_then(|()| pass(path))
        }
        Err(e) => Err(e),
    })
}

/// TC, no XDP on the NIC (`LocalNode::tc_only`): [`request`] on the skb,
/// ending with the mark XDP would leave, or with a verdict. `None`: not a
/// published port.
#[inline(always)]
pub fn request_tc(
    ctx: &TcContext,
    pk: &Parsed,
    l: &LocalNode,
) -> Option<Result<u8, Result<Verdict, Stat>>> {
    let service_id = published(pk)?;
    Some(match balance(ctx, pk, l, service_id) {
        Ok(Balanced::TooBig) => {
            bump(Stat::IngressTooBig);
            Ok(TOO_BIG_MARK)
        }
        Ok(Balanced::Forward(path)) => {
            bump(path);
            Ok(BALANCED_MARK)
        }
        Err(e) => Err(Err(e)),
    })
}

/// What the routing mesh does with a request it balanced.
enum Balanced {
    /// Too large for the tunnel to the backend's node, with DF: ICMP
    /// fragmentation needed goes back.
    TooBig,
    /// On to the backend (counted as this path: here or another node).
    Forward(Stat),
}

/// A request to published service `service_id`: its flow balanced (and
/// tracked), and what is to become of it.
#[inline(always)]
fn balance<P: Packet>(
    p: &P,
    pk: &Parsed,
    l: &LocalNode,
    service_id: u32,
) -> Result<Balanced, Stat> {
    let t = pk.t;
    let hash = published_hash(t.src_be, t.sport_be, t.dport_be, t.proto);
    let c = lb::balance(&t, service_id, hash, pk.tcp_flags, CT_F_INGRESS)?;
    let b = c.backend;
    let remote = matches!(tunnel::route(l, b.ip_be)?, tunnel::Route::Remote(_));
    // A frame longer than the underlay's MTU (the tunnel's MSS plus the
    // tunnel's overhead, WireGuard's included when the cluster encrypts)
    // never came off the wire as it is: generic XDP and TC see the
    // kernel's GRO aggregates, whose segments the stack sends on one by
    // one (their MSS clamped at the handshake).
    let tunnel_mtu = l.tunnel_mss as u32 + TCP_IP_HLEN;
    let wg = if l.wg_ifindex != 0 { WG_OVERHEAD } else { 0 };
    let wire_mtu = l.tunnel_mss as u32 + TUNNEL_TCP_OVERHEAD + wg;
    if remote && l.tunnel_mss != 0 && (tunnel_mtu + 1..=wire_mtu).contains(&(pk.ip_len as u32)) {
        // It would not fit the tunnel. With DF the client learns the
        // tunnel's MTU (ICMP, built from the packet as it came); without
        // DF it cannot be fragmented here.
        let ip: Ipv4Hdr = p.load(ETH_HLEN).ok_or(Stat::XdpTruncated)?;
        if u16::from_be(ip.frag_be) & IP_DF == 0 {
            return Err(Stat::IngressTooBigNoDf);
        }
        return Ok(Balanced::TooBig);
    }
    lb::count_service(service_id, p.len() as u32, c.new_flow);
    Ok(Balanced::Forward(if remote {
        Stat::IngressRemote
    } else {
        Stat::IngressLocal
    }))
}

/// TC on the underlay NIC: a request XDP balanced (`BALANCED_MARK`) is
/// DNATed to the backend its flow names (client address kept), its MSS
/// clamped when it crosses the tunnel, and handed to the backend's veth or
/// the tunnel.
#[inline(always)]
pub fn forward_request(ctx: &TcContext, l: &LocalNode) -> Result<Verdict, Stat> {
    let (t, l4, flags) = inner_tuple(ctx, ETH_HLEN).ok_or(Stat::IngressRequestLost)?;
    // XDP balanced it an instant ago; gone now (flushed), it is dropped.
    let f = ct::lookup(&t.key(mesh_common::ct::dir::FORWARD)).ok_or(Stat::IngressRequestLost)?;
    // SAFETY: pointer from a successful lookup.
    let e = unsafe { *f.entry };
    nat::translate(ctx, l4, &t, End::Dst, (e.nat_ip_be, e.nat_port_be))?;
    match tunnel::route(l, e.nat_ip_be)? {
        tunnel::Route::Remote(node) => {
            clamp(ctx, l4, t.proto, flags, l)?;
            let to = Tuple {
                dst_be: e.nat_ip_be,
                dport_be: e.nat_port_be,
                ..t
            };
            let v = tunnel::encap(ctx, l, &node, to.hash())?;
            bump(Stat::TunnelEncap);
            Ok(v)
        }
        tunnel::Route::Here => tunnel::deliver_local(ctx, l, e.nat_ip_be),
    }
}

/// IPv4 and TCP headers without options: the MSS plus these is the
/// largest IPv4 packet the tunnel carries.
pub(crate) const TCP_IP_HLEN: u32 = 40;
/// The IPv4 don't-fragment flag.
pub(crate) const IP_DF: u16 = 0x4000;

/// ICMP fragmentation needed as it leaves: Ethernet, IPv4, ICMP, and the
/// offending packet's IPv4 header and first 8 bytes (RFC 792, RFC 1191).
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct FragNeeded {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: Quoted,
}

/// The part the ICMP checksum covers.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Quoted {
    icmp: IcmpHdr,
    ip: Ipv4Hdr,
    l4: [u8; 8],
}
const _: () = assert!(size_of::<Quoted>() == 36);

/// TC on the underlay NIC: a packet XDP found too large for the tunnel
/// (`TOO_BIG_MARK`, DF set) is turned into ICMP fragmentation needed with
/// the tunnel's MTU, from this node's address to the client, back to the
/// link-layer sender it came from.
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, l: &LocalNode) -> Result<Verdict, Stat> {
    frag_needed_via(ctx, l, l.underlay_mac, l.underlay_ifindex)
}

/// [`frag_needed`] from link-layer address `mac`, out of `ifindex` (the
/// device the packet came in by).
#[inline(always)]
pub fn frag_needed_via(
    ctx: &TcContext,
    l: &LocalNode,
    mac: [u8; 6],
    ifindex: u32,
) -> Result<Verdict, Stat> {
    let eth: EthHdr = Packet::load(ctx, 0).ok_or(Stat::TcMalformed)?;
    let ip: Ipv4Hdr = Packet::load(ctx, ETH_HLEN).ok_or(Stat::TcMalformed)?;
    // Options would be quoted too; a client's packet rarely has them.
    if ip.header_len() != IPV4_MIN_HLEN {
        return Err(Stat::IngressTooBigNoDf);
    }
    let l4: [u8; 8] = Packet::load(ctx, ETH_HLEN + IPV4_MIN_HLEN).ok_or(Stat::TcMalformed)?;
    let mtu = l.tunnel_mss as u32 + TCP_IP_HLEN;
    let mut quoted = Quoted {
        icmp: IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            csum_be: 0,
            // Unused (16 bits), then the next-hop MTU.
            rest_be: (mtu & 0xffff).to_be(),
        },
        ip,
        l4,
    };
    // SAFETY: Quoted is packed, 36 bytes of plain integers.
    let words: [u16; 18] = unsafe { core::mem::transmute(quoted) };
    quoted.icmp.csum_be = csum::words(&words);
    let hdr = Ipv4Hdr::ours(
        IPPROTO_ICMP,
        l.underlay_ip_be,
        ip.src_be,
        (IPV4_MIN_HLEN + size_of::<Quoted>()) as u16,
    );
    let reply = FragNeeded {
        eth: EthHdr {
            dst: eth.src,
            src: mac,
            proto_be: eth.proto_be,
        },
        ip: hdr,
        icmp: quoted,
    };
    // SAFETY: the context's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, size_of::<FragNeeded>() as u32, 0) } != 0 {
        return Err(Stat::NatRewriteFail);
    }
    Packet::store(ctx, 0, &reply).ok_or(Stat::NatRewriteFail)?;
    bump(Stat::IcmpFragNeeded);
    Ok(Verdict::redirect(ifindex))
}

/// A TCP SYN (or SYN-ACK) of a routing-mesh flow about to cross the
/// tunnel: its MSS is lowered to what the tunnel carries, so the other end
/// never sends a segment that would not fit (the client's and the
/// backend's own MTUs do not know about the 50 bytes of VXLAN).
#[inline(always)]
pub(crate) fn clamp<P: Packet>(
    p: &P,
    l4_off: usize,
    proto: u8,
    tcp_flags: u8,
    l: &LocalNode,
) -> Result<(), Stat> {
    if proto != IPPROTO_TCP || tcp_flags & tcp_flag::SYN == 0 || l.tunnel_mss == 0 {
        return Ok(());
    }
    if nat::clamp_mss(p, l4_off, l.tunnel_mss).ok_or(Stat::NatRewriteFail)? {
        bump(Stat::MssClamped);
    }
    Ok(())
}

/// The TCP/UDP tuple of the IPv4 packet at `ip_off`, its L4 offset and
/// TCP flags; `None` for anything else (other protocols, fragments,
/// truncated headers).
#[inline(always)]
pub fn inner_tuple<P: Packet>(p: &P, ip_off: usize) -> Option<(Tuple, usize, u8)> {
    let ip: Ipv4Hdr = p.load(ip_off)?;
    let ihl = ip.header_len();
    if ip.version() != 4
        || ihl < IPV4_MIN_HLEN
        || (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP)
        || ip.more_fragments()
        || ip.frag_offset() != 0
    {
        return None;
    }
    let l4 = ip_off + ihl;
    let ports: [u16; 2] = p.load(l4)?;
    let flags = if ip.proto == IPPROTO_TCP {
        p.load::<TcpHdr>(l4)?.flags
    } else {
        0
    };
    let t = Tuple {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        sport_be: ports[0],
        dport_be: ports[1],
        proto: ip.proto,
        ..Tuple::default()
    };
    Some((t, l4, flags))
}

/// XDP, the backend's node: a tunnelled packet for a container here whose
/// source is outside the cluster came in through `ingress_be`'s published
/// port: remember it for the replies.
#[inline(always)]
pub fn note_return<P: Packet>(ctx: &P, l: &LocalNode, inner_ip_off: usize, ingress_be: u32) {
    if let Some((t, _, flags)) = inner_tuple(ctx, inner_ip_off)
        && outside(l, t.src_be)
    {
        ct::track_return(&t, ingress_be, flags);
    }
}

/// XDP, the ingress node: tunnelled traffic whose inner destination is not
/// in this node's /24 is a reply of a routing-mesh flow only if a reverse
/// entry says so; then it is decapsulated, translated back to the published
/// port and marked for the underlay TC program, which sends it on.
#[inline(always)]
pub fn tunnelled_reply(ctx: &XdpContext, l: &LocalNode, inner_off: usize) -> Result<Verdict, Stat> {
    let Some((t, _, flags)) = inner_tuple(ctx, inner_off + ETH_HLEN) else {
        return pass(Stat::XdpVxlanForeign);
    };
    if !outside(l, t.dst_be) {
        return pass(Stat::XdpVxlanForeign);
    }
    if !came_in_here(&t, flags) {
        return pass(Stat::IngressReplyUntracked);
    }
    // SAFETY: ctx is the program's context; `inner_off` is within the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_off as i32) } != 0 {
        return pass(Stat::IngressReplyUntracked);
    }
    // Translated by the TC program, not here: XDP cannot tell a frame
    // whose L4 checksum is still partial (a virtual underlay such as a
    // veth hands over the sender's offloaded checksum), and arithmetic on
    // such a field breaks it wherever the checksum is completed later (a
    // Docker bridge on the way to the client does). TC's helpers know.
    mark::write(ctx, REPLY_MARK, l.underlay_ip_be)?;
    pass(Stat::IngressReplyDecap)
}

/// Whether the tunnelled frame at `inner_off` is a reply of a routing-mesh
/// flow that came in through this node ([`tunnelled_reply`]'s test).
#[inline(always)]
pub fn is_tunnelled_reply<P: Packet>(p: &P, l: &LocalNode, inner_off: usize) -> bool {
    inner_tuple(p, inner_off + ETH_HLEN)
        .is_some_and(|(t, _, flags)| outside(l, t.dst_be) && came_in_here(&t, flags))
}

/// Whether the reverse entry of `t` says its flow came in through this
/// node's published port.
#[inline(always)]
fn came_in_here(t: &Tuple, flags: u8) -> bool {
    ct::reply_entry(t, flags).is_some_and(|e| e.flags & CT_F_INGRESS != 0)
}

/// TC, a backend's veth: a packet leaving it for an address outside every
/// network (the caller checked) is a routing-mesh reply if a reverse entry
/// says so: translated and sent to the client (`CT_F_INGRESS`), or
/// tunnelled back to the node the flow came in through (`CT_F_RETURN`).
/// `None`: not one.
#[inline(always)]
pub fn reply_out(ctx: &TcContext, l: &LocalNode, pk: &Parsed) -> Option<Result<Verdict, Stat>> {
    let t = &pk.t;
    let e = ct::reply_entry(t, pk.tcp_flags)?;
    if e.flags & CT_F_INGRESS != 0 {
        let r = nat::translate(ctx, pk.l4_off, t, End::Src, (e.nat_ip_be, e.nat_port_be))
            .and_then(|()| to_client(ctx, l, e.nat_ip_be, t));
        if r.is_ok() {
            lb::count_service(e.service_id, ctx.len() as u32, false);
            bump(Stat::IngressReply);
        }
        return Some(r);
    }
    if e.flags & CT_F_RETURN != 0 {
        return Some(
            clamp(ctx, pk.l4_off, t.proto, pk.tcp_flags, l)
                .and_then(|()| return_to(ctx, l, e.nat_ip_be, pk.route_hash())),
        );
    }
    None
}

/// Tunnels a reply back to the node it came in through (its underlay
/// address `ingress_be`).
#[inline(always)]
fn return_to(ctx: &TcContext, l: &LocalNode, ingress_be: u32, hash: u32) -> Result<Verdict, Stat> {
    // SAFETY: plain data written by the agent.
    let subnet = unsafe { PEERS.get(&ingress_be) }
        .copied()
        .ok_or(Stat::TunnelNoNode)?;
    // SAFETY: as above.
    let node = unsafe { NODES.get(&subnet) }
        .copied()
        .ok_or(Stat::TunnelNoNode)?;
    let v = tunnel::encap(ctx, l, &node, hash)?;
    bump(Stat::IngressReturn);
    Ok(v)
}

/// TC on the underlay NIC: a routing-mesh reply XDP decapsulated
/// (`REPLY_MARK`) is translated back to the address the client called and
/// goes on to the client.
#[inline(always)]
pub fn forward_reply(ctx: &TcContext, l: &LocalNode) -> Result<Verdict, Stat> {
    let Some((t, l4, _)) = inner_tuple(ctx, ETH_HLEN) else {
        return pass(Stat::TunnelPass);
    };
    // XDP found it an instant ago; gone now (flushed), it is dropped.
    let Some(f) = ct::lookup(&t.key(mesh_common::ct::dir::REVERSE)) else {
        return Err(Stat::IngressReplyLost);
    };
    // SAFETY: pointer from a successful lookup.
    let e = unsafe { *f.entry };
    if e.flags & CT_F_INGRESS == 0 {
        return Err(Stat::IngressReplyLost);
    }
    nat::translate(ctx, l4, &t, End::Src, (e.nat_ip_be, e.nat_port_be))?;
    lb::count_service(e.service_id, ctx.len(), false);
    let v = to_client(ctx, l, e.nat_ip_be, &t)?;
    bump(Stat::IngressReply);
    Ok(v)
}

/// Sends a translated reply (source `src_be`, now the address the client
/// called) to its client: the kernel's FIB gives the interface (the
/// underlay NIC for a client outside, a Docker bridge for a container on
/// another network of this host), the next hop and its MAC (`fib`).
#[inline(always)]
fn to_client(ctx: &TcContext, l: &LocalNode, src_be: u32, t: &Tuple) -> Result<Verdict, Stat> {
    let hop = fib::lookup(ctx, l.underlay_ifindex, (src_be, t.dst_be), t.proto, 0);
    if let Hop::Resolved { dmac, smac, .. } = hop {
        tunnel::set_macs(ctx, &dmac, &smac).ok_or(Stat::NatRewriteFail)?;
    }
    hop.verdict(l.underlay_ifindex).ok_or(Stat::IngressNoRoute)
}

//! TC on the host side of a container's veth.
//!
//! - ingress = packets leaving the container: service VIP:port -> conntrack
//!   -> Maglev -> DNAT -> a local backend's veth, or the tunnel;
//! - egress = packets entering the container: reverse NAT of replies and of
//!   ICMP errors about balanced flows.
//!
//! Every packet bumps one path counter and one verdict counter.

use aya_ebpf::programs::TcContext;
use mesh_common::{
    ct::{CT_F_HAIRPIN, CT_F_INGRESS, CT_F_RETURN, FragEntry, HAIRPIN_IP_BE, Tuple, dir, tcp_flag},
    lb::{Backend, ServiceKey},
    stats::Stat,
    tunnel::{
        ARP_MAC, DELIVERED_MARK, LocalNode, TRANSLATED_MARK, VETH_PER_PACKET, VETH_PUBLISHED,
    },
};

use crate::{
    ct,
    ctx::{Packet, Verdict, pass},
    hdr::{
        ARP_REPLY, ARP_REQUEST, ArpEth, ETH_HLEN, ETH_P_ARP, ETH_P_IP, EthHdr, ICMP_CSUM_OFF,
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED, IP_DST_OFF,
        IP_SRC_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, IcmpHdr, Ipv4Hdr,
    },
    lb,
    maps::{BACKEND_PORTS, CONFIG, FRAGS, LOCAL_EPS, SERVICES, VETH_SRC, VIPS},
    nat::{self, End},
    parse::{self, ParseError, Parsed},
    stats::bump,
    tunnel,
};

/// The path counter of a packet the parser gave up on (passed untouched).
#[inline(always)]
fn unparsed(e: ParseError) -> Result<Verdict, Stat> {
    pass(match e {
        ParseError::NotIpv4 => Stat::TcNotIpv4,
        ParseError::Truncated | ParseError::BadIpv4 => Stat::TcMalformed,
    })
}

/// Sends a packet leaving a container on its way: to another node through
/// the tunnel, or (this node, outside the cluster, overlay off) to the
/// stack. `path`, if any, is counted when it stays here. An address of
/// another overlay network than the sender's (`src_vni`) is dropped, but
/// for this node's own gateways (the host: its DNS).
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    src_vni: u32,
    dst_be: u32,
    hash: u32,
    path: Option<Stat>,
) -> Result<Verdict, Stat> {
    let Some(local) = tunnel::local_ref() else {
        if let Some(s) = path {
            bump(s);
        }
        return Ok(Verdict::PASS);
    };
    let located = tunnel::locate(local, dst_be)?;
    forward(ctx, local, src_vni, dst_be, located, hash, path)
}

/// [`deliver`] once the destination is located (its network's VNI, where
/// it lives).
#[inline(always)]
fn forward(
    ctx: &TcContext,
    local: &LocalNode,
    src_vni: u32,
    dst_be: u32,
    (vni, route): (u32, tunnel::Route),
    hash: u32,
    path: Option<Stat>,
) -> Result<Verdict, Stat> {
    if vni != 0 && vni != src_vni {
        let gateway = matches!(route, tunnel::Route::Here)
            && u32::from_be(dst_be) & 0xff == 1
            && tunnel::is_local_slice(local, dst_be);
        if !gateway {
            return Err(Stat::NetIsolated);
        }
    }
    match route {
        tunnel::Route::Here => {
            if vni != 0
                && local.via_bridge == 0
                && let Some(v) = to_local_container(ctx, dst_be)
            {
                if path.is_some() {
                    bump(Stat::LocalRedirect);
                }
                return v;
            }
            if let Some(s) = path {
                bump(s);
            }
            Ok(Verdict::PASS)
        }
        tunnel::Route::Remote(node) => {
            let v = tunnel::encap(ctx, local, node, hash)?;
            bump(Stat::TunnelEncap);
            Ok(v)
        }
    }
}

/// A packet for `dst_be`, a container of the sender's network on this
/// node: straight to its veth (whose program still sees it entering), as
/// decapsulated packets are delivered, so a container's traffic to another
/// container of its network takes the same path wherever the two run: the
/// bridge, its netfilter hooks and the host's forwarding are not on it
/// (`--local-via-bridge` keeps them). The frame leaves addressed to the
/// container's MAC (on their shared segment it already is; a sender that
/// routed it named another). `None`: not a served container (the
/// gateway, an address nobody holds): the bridge delivers it.
#[inline(always)]
fn to_local_container(ctx: &TcContext, dst_be: u32) -> Option<Result<Verdict, Stat>> {
    // SAFETY: plain data written by the agent.
    let ep = unsafe { LOCAL_EPS.get(&dst_be) }?;
    if ep.mac == [0; 6] {
        return None;
    }
    let (ifindex, mac) = (ep.ifindex, ep.mac);
    if Packet::store(ctx, 0, &mac).is_none() {
        return Some(Err(Stat::NatRewriteFail));
    }
    Some(Ok(Verdict::redirect(ifindex)))
}

/// Whether `dst_be` may be another network's VIP: in its slice 0.
#[inline(always)]
fn may_be_net_vip(dst_be: u32) -> bool {
    (u32::from_be(dst_be) >> 8) & 0xff == 0
        && tunnel::local_ref().is_some_and(|l| {
            dst_be & l.cluster_mask_be != l.cluster_be && tunnel::vni_of(l, dst_be) != 0
        })
}

/// Whether VIP `vip_be` is of the sender's network, which its address
/// tells: the VIP range is `mesh`'s, another network's VIPs are its slice
/// 0. Without the overlay (no cluster) there is only `mesh`.
#[inline(always)]
fn same_network(vip_be: u32, src_vni: u32) -> bool {
    let Some(l) = tunnel::local_ref() else {
        return true;
    };
    let vni = if may_be_vip(vip_be) {
        l.vni
    } else {
        tunnel::vni_of(l, vip_be)
    };
    vni == src_vni
}

/// A ping to a VIP, answered here as the VIP's own address would answer
/// it (`ping NAME` works, as with Swarm's VIPs): the echo request goes
/// back into the container as the reply, addresses and MACs swapped.
/// Anything else to a VIP that is not a service's port is left alone.
#[inline(always)]
fn vip_echo(ctx: &TcContext, pk: &Parsed, src_vni: u32) -> Result<Verdict, Stat> {
    let icmp: IcmpHdr = Packet::load(ctx, pk.l4_off).ok_or(Stat::TcMalformed)?;
    if icmp.kind != ICMP_ECHO_REQUEST || icmp.code != 0 {
        return deliver(
            ctx,
            src_vni,
            pk.t.dst_be,
            pk.route_hash(),
            Some(Stat::TcNotService),
        );
    }
    if !same_network(pk.t.dst_be, src_vni) {
        return Err(Stat::NetIsolated);
    }
    let macs: [[u8; 6]; 2] = Packet::load(ctx, 0).ok_or(Stat::NatRewriteFail)?;
    tunnel::set_macs(ctx, &macs[1], &macs[0]).ok_or(Stat::NatRewriteFail)?;
    // Swapped addresses leave the IPv4 checksum as it is.
    let addrs = [pk.t.dst_be, pk.t.src_be];
    Packet::store(ctx, ETH_HLEN + IP_SRC_OFF, &addrs).ok_or(Stat::NatRewriteFail)?;
    // Type 8 -> 0 in the first 16-bit word of the ICMP header (as it lies
    // in the packet: the helper takes network-order values).
    let csum_off = pk.l4_off + ICMP_CSUM_OFF;
    let from = u16::from_ne_bytes([ICMP_ECHO_REQUEST, 0]);
    Packet::l4_csum_replace(ctx, csum_off, from as u32, 0, 2).ok_or(Stat::NatRewriteFail)?;
    Packet::store(ctx, pk.l4_off, &ICMP_ECHO_REPLY).ok_or(Stat::NatRewriteFail)?;
    bump(Stat::VipEcho);
    // SAFETY: the context's own field: the veth this program runs on.
    Ok(Verdict::redirect(unsafe { (*ctx.skb.skb).ifindex }))
}

/// The VNI of the network of the container behind this veth, if `src_be`
/// is its address (the agent writes every local container's address and
/// veth), and its `VethSrc` flags. A container may hold NET_RAW (Docker
/// grants it by default) and forge any source; these programs run before
/// netfilter, so this check is the firewall's. One array slot by ifindex
/// says yes for the common case; anything else (a veth beyond the array, a
/// slot not written, another address) is judged by `MESH_LOCAL_EPS`, the
/// network then by address, the flags taken as all set.
#[inline(always)]
fn own_source(ctx: &TcContext, src_be: u32) -> Option<(u32, u32)> {
    // SAFETY: the context's own field: the veth this program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(v) = VETH_SRC.get(ifindex)
        && v.ip_be == src_be
        && src_be != 0
    {
        return Some((v.vni, v.flags));
    }
    // SAFETY: plain data written by the agent.
    if !unsafe { LOCAL_EPS.get(&src_be) }.is_some_and(|ep| ep.ifindex == ifindex) {
        return None;
    }
    let vni = tunnel::local_ref().map_or(0, |l| tunnel::vni_of(l, src_be));
    Some((vni, u32::MAX))
}

/// Whether `dst_be` may be a VIP: outside the VIP range (most of a
/// container's traffic) no service or VIP flow is looked up.
#[inline(always)]
fn may_be_vip(dst_be: u32) -> bool {
    CONFIG.get(0).is_none_or(|c| c.may_be_vip(dst_be))
}

/// Packets leaving the container. Inlined into its entry point like every
/// program body: an outlined body returning its result through the stack
/// is refused by the verifier ("cannot return stack pointer").
#[inline(always)]
pub fn from_container(ctx: &TcContext) -> Result<Verdict, Stat> {
    let pk = match parse::ipv4(ctx) {
        Ok(pk) => pk,
        Err(ParseError::NotIpv4) => return arp_reply(ctx).unwrap_or_else(|| pass(Stat::TcNotIpv4)),
        Err(e) => return unparsed(e),
    };
    let Some((src_vni, src_flags)) = own_source(ctx, pk.t.src_be) else {
        return Err(Stat::TcSpoofed);
    };
    if pk.fragment {
        return fragment_out(ctx, &pk, src_vni);
    }
    let t = pk.t;
    let vip_range = may_be_vip(t.dst_be) || may_be_net_vip(t.dst_be);
    if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP {
        if t.proto == IPPROTO_ICMP && vip_range {
            // SAFETY: plain data written by the agent.
            if unsafe { VIPS.get(&t.dst_be) }.is_some() {
                return vip_echo(ctx, &pk, src_vni);
            }
        }
        return deliver(
            ctx,
            src_vni,
            t.dst_be,
            pk.route_hash(),
            Some(Stat::TcNotService),
        );
    }
    if t.dst_be == HAIRPIN_IP_BE {
        return hairpin_reply(ctx, &pk);
    }
    if src_flags & VETH_PER_PACKET != 0
        && !pk.fragmented
        && backend_port(t.sport_be)
        && let Some(v) = reply_here(ctx, &pk)
    {
        return v;
    }
    // To the VIP range: a tracked flow first (its forward entry names its
    // backend and service: one lookup), then the service for a new one.
    let fwd = if vip_range {
        ct::lookup(&t.key(dir::FORWARD))
    } else {
        None
    };
    if let Some(f) = fwd
        // SAFETY: pointer from a successful lookup.
        && let Some(c) = lb::follow(&t, f, unsafe { (*f.entry).service_id }, pk.tcp_flags, 0)
    {
        return to_backend(ctx, &pk, &c, src_vni);
    }
    if vip_range {
        let key = ServiceKey {
            vip_be: t.dst_be,
            port_be: t.dport_be,
            proto: t.proto,
            ..ServiceKey::default()
        };
        // SAFETY: map values are plain data; the agent replaces them atomically.
        if let Some(s) = unsafe { SERVICES.get(&key) } {
            // A new flow only from the service's own network.
            if !same_network(t.dst_be, src_vni) {
                return Err(Stat::NetIsolated);
            }
            let c = lb::pick_new(&t, fwd, s.id, t.hash(), pk.tcp_flags, 0)?;
            return to_backend(ctx, &pk, &c, src_vni);
        }
    }
    let local = tunnel::local_ref();
    // Located once: its network, where it lives (the overlay on).
    let located = match local {
        Some(l) => Some(tunnel::locate(l, t.dst_be)?),
        None => None,
    };
    if let (Some(local), Some((0, _))) = (local, &located) {
        // Outside every network. A node's address and a published port:
        // balanced here, as a VIP (the routing mesh from inside the
        // cluster), whatever the service's network: published ports
        // answer anyone who reaches a node.
        if let Some(service_id) = crate::ingress::published_at_node(local, &t) {
            let c = lb::balance(&t, service_id, t.hash(), pk.tcp_flags, 0)?;
            return to_backend(ctx, &pk, &c, 0);
        }
        // A backend's reply to a client of the routing mesh.
        if src_flags & VETH_PUBLISHED != 0
            && let Some(r) = crate::ingress::reply_out(ctx, local, &pk)
        {
            return r;
        }
    }
    // A new direct flow: only a TCP SYN (without ACK) or any UDP packet can
    // start one; both are cheap to check against stale reverse entries.
    // An address outside every network never had one: a VIP's backends
    // are containers, inside their network (so a container's datagrams to
    // the world skip the lookup).
    let opens =
        t.proto == IPPROTO_UDP || pk.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    let outside = matches!(located, Some((0, _)));
    if opens && !outside && backend_port(t.dport_be) && ct::supersede_reverse(&t) {
        bump(Stat::LbStaleReverse);
    }
    match (local, located) {
        (Some(local), Some(located)) => forward(
            ctx,
            local,
            src_vni,
            t.dst_be,
            located,
            pk.route_hash(),
            Some(Stat::TcNotService),
        ),
        _ => pass(Stat::TcNotService),
    }
}

/// Whether some backend has had port `port_be` (`MESH_BACKEND_PORTS`):
/// only then may a finished VIP flow have left a reverse entry for a
/// direct flow to that port.
#[inline(always)]
fn backend_port(port_be: u16) -> bool {
    let port = u16::from_be(port_be) as u32;
    BACKEND_PORTS
        .get(port / 64)
        .is_some_and(|w| (w >> (port % 64)) & 1 != 0)
}

/// A container's ARP request for an address of its network that lives
/// on another node, or for one of its network's VIPs: its network's
/// Docker network spans the whole /16, so the container asks ARP for
/// them. Answered here with [`ARP_MAC`], turned into the reply and sent
/// back into the container; frames to that MAC come back to this program.
/// None: not such a request (the bridge and the containers answer the
/// rest).
#[inline(always)]
fn arp_reply(ctx: &TcContext) -> Option<Result<Verdict, Stat>> {
    let eth: EthHdr = Packet::load(ctx, 0)?;
    if u16::from_be(eth.proto_be) != ETH_P_ARP {
        return None;
    }
    let a: ArpEth = Packet::load(ctx, ETH_HLEN)?;
    if u16::from_be(a.op_be) != ARP_REQUEST
        || u16::from_be(a.htype_be) != 1
        || u16::from_be(a.ptype_be) != ETH_P_IP
        || a.hlen != 6
        || a.plen != 4
    {
        return None;
    }
    let l = tunnel::local_ref()?;
    let (sender, target) = (a.spa_be, a.tpa_be);
    // Only a container of this node asking in its own network (its
    // address is its veth's), about an address of that network elsewhere.
    let (src_vni, _) = own_source(ctx, sender)?;
    if src_vni == 0 || tunnel::vni_of(l, target) != src_vni || tunnel::is_local_slice(l, target) {
        return None;
    }
    let reply = ArpEth {
        op_be: ARP_REPLY.to_be(),
        sha: ARP_MAC,
        spa_be: target,
        tha: a.sha,
        tpa_be: sender,
        ..a
    };
    let out = (|| {
        tunnel::set_macs(ctx, &eth.src, &ARP_MAC)?;
        Packet::store(ctx, ETH_HLEN, &reply)
    })();
    Some(match out {
        Some(()) => {
            bump(Stat::ArpReply);
            // SAFETY: the context's own field: the veth this program runs on.
            Ok(Verdict::redirect(unsafe { (*ctx.skb.skb).ifindex }))
        }
        None => Err(Stat::NatRewriteFail),
    })
}

/// A balanced packet on its way to its backend: DNAT (and the hairpin's
/// SNAT), counted, then to the backend's veth, the tunnel or the stack.
///
/// `src_vni`: the sender's network, which the backend's is (checked when
/// the flow began); 0 for a published port's, whose backend may be on any.
#[inline(always)]
fn to_backend(ctx: &TcContext, pk: &Parsed, c: &lb::Choice, src_vni: u32) -> Result<Verdict, Stat> {
    let t = &pk.t;
    let b = &c.backend;
    nat::translate(ctx, pk.l4_off, t, End::Dst, (b.ip_be, b.port_be))?;
    if c.hairpin {
        // Hairpin: the caller is the backend. Source == destination would
        // be dropped by its kernel, so the source becomes the hairpin
        // address (port kept); the reply comes back through this veth.
        nat::translate(ctx, pk.l4_off, t, End::Src, (HAIRPIN_IP_BE, t.sport_be))?;
        bump(Stat::LbHairpin);
    }
    lb::count_service(c.service_id, ctx.len() as u32, c.new_flow);
    remember_fragments(pk, b.ip_be, c.backend_id);
    if b.ifindex == 0 {
        // Not a local veth: another node's (tunnelled) or the stack's.
        let vni = if src_vni == 0 {
            tunnel::local_ref().map_or(0, |l| tunnel::vni_of(l, b.ip_be))
        } else {
            src_vni
        };
        return deliver(ctx, vni, b.ip_be, pk.route_hash(), None);
    }
    // Local backend: straight to its veth, which looks for the replies of
    // a flow's first packet on (noted once per flow: a slot the agent
    // rewrote meanwhile loses the mark until the next flow, and its
    // replies are translated at their client's veth as before).
    if c.new_flow && !c.hairpin {
        note_per_packet(b);
    }
    to_local(ctx, b)
}

/// Marks local backend `b`'s veth slot `VETH_PER_PACKET` (once: a slot
/// already marked is only read), if the slot is still `b`'s.
#[inline(always)]
fn note_per_packet(b: &Backend) {
    if let Some(v) = VETH_SRC.get_ptr_mut(b.ifindex) {
        // SAFETY: a pointer into the array's value; a racing write of the
        // agent's (the slot rewritten) at worst loses the flag until the
        // next flow's first packet.
        unsafe {
            if (*v).ip_be == b.ip_be && (*v).flags & VETH_PER_PACKET == 0 {
                (*v).flags |= VETH_PER_PACKET;
            }
        }
    }
}

/// A per-packet VIP flow's reply, leaving its backend for a client on this
/// node: from the VIP again here, and straight to the client's veth, as
/// the flow's requests came straight to the backend's (the bridge and the
/// host's forwarding are on neither way), marked so that the client's veth
/// program does not look it up again. `None`: not such a reply (no client
/// here, no reverse entry, a routing-mesh or hairpin flow's): it goes on
/// as any packet, translated where it enters its client.
#[inline(always)]
fn reply_here(ctx: &TcContext, pk: &Parsed) -> Option<Result<Verdict, Stat>> {
    let t = &pk.t;
    // SAFETY: plain data written by the agent.
    let client = unsafe { LOCAL_EPS.get(&t.dst_be) }?;
    if client.mac == [0; 6] {
        return None;
    }
    let (ifindex, mac) = (client.ifindex, client.mac);
    let e = ct::reply_entry(t, pk.tcp_flags)?;
    if e.flags & (CT_F_HAIRPIN | CT_F_INGRESS | CT_F_RETURN) != 0 {
        return None;
    }
    let out = (|| {
        nat::translate(ctx, pk.l4_off, t, End::Src, (e.nat_ip_be, e.nat_port_be))?;
        // To the client, from the gateway the backend addressed.
        let gw_mac: [u8; 6] = Packet::load(ctx, 0).ok_or(Stat::NatRewriteFail)?;
        tunnel::set_macs(ctx, &mac, &gw_mac).ok_or(Stat::NatRewriteFail)
    })();
    Some(out.map(|()| {
        lb::count_service(e.service_id, ctx.len() as u32, false);
        bump(Stat::NatReverseHere);
        // SAFETY: the context's own skb; TC may write its mark (the
        // client's veth scrubs it when the packet enters the container).
        unsafe { (*ctx.skb.skb).mark = TRANSLATED_MARK };
        Verdict::redirect(ifindex)
    }))
}

/// A fragment other than the first, leaving a container: translated as its
/// datagram's first fragment was (the destination address; the first
/// fragment's L4 checksum already covers the change), then routed by
/// address like any packet (to a local backend, through the tunnel, or to
/// the stack).
#[inline(always)]
fn fragment_out(ctx: &TcContext, pk: &Parsed, src_vni: u32) -> Result<Verdict, Stat> {
    // SAFETY: plain data written by this program.
    let Some(f) = unsafe { FRAGS.get(&pk.frag_key()) }.copied() else {
        return deliver(
            ctx,
            src_vni,
            pk.t.dst_be,
            pk.route_hash(),
            Some(Stat::TcFragment),
        );
    };
    nat::rewrite_address(ctx, IP_DST_OFF, pk.t.dst_be, f.nat_ip_be).ok_or(Stat::NatRewriteFail)?;
    bump(Stat::NatFragment);
    if let Some(b) = lb::current_any(f.backend_id, f.nat_ip_be)
        && b.ifindex != 0
    {
        return to_local(ctx, &b);
    }
    // Its first fragment's flow was allowed (a published port's backend
    // may be on any network).
    let vni = tunnel::local_ref().map_or(0, |l| tunnel::vni_of(l, f.nat_ip_be));
    deliver(ctx, vni, f.nat_ip_be, pk.route_hash(), None)
}

/// A fragment other than the first, entering a container: from the VIP
/// again if its datagram's first fragment was a translated reply.
#[inline(always)]
fn fragment_in(ctx: &TcContext, pk: &Parsed) -> Result<Verdict, Stat> {
    // SAFETY: plain data written by this program.
    let Some(f) = unsafe { FRAGS.get(&pk.frag_key()) }.copied() else {
        return pass(Stat::TcFragment);
    };
    nat::rewrite_address(ctx, IP_SRC_OFF, pk.t.src_be, f.nat_ip_be).ok_or(Stat::NatRewriteFail)?;
    pass(Stat::NatFragment)
}

/// Hands a translated packet to a local backend's veth, as the gateway
/// would (source = the gateway MAC the container addressed).
#[inline(always)]
pub(crate) fn to_local(ctx: &TcContext, b: &Backend) -> Result<Verdict, Stat> {
    let gw_mac: [u8; 6] = Packet::load(ctx, 0).ok_or(Stat::NatRewriteFail)?;
    tunnel::set_macs(ctx, &b.mac, &gw_mac).ok_or(Stat::NatRewriteFail)?;
    Ok(Verdict::redirect(b.ifindex))
}

/// The first fragment of a datagram was translated to `nat_ip_be` (backend
/// `backend_id`): its later fragments follow.
#[inline(always)]
fn remember_fragments(pk: &Parsed, nat_ip_be: u32, backend_id: u32) {
    if pk.fragmented {
        let f = FragEntry {
            nat_ip_be,
            backend_id,
        };
        let _ = FRAGS.insert(&pk.frag_key(), &f, 0);
    }
}

/// A backend's reply in a hairpin flow (to the hairpin address): from the
/// VIP again, to the client (the backend itself), straight back into the
/// container through this veth.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pk: &Parsed) -> Result<Verdict, Stat> {
    let t = &pk.t;
    let Some(e) = ct::reply_entry(t, pk.tcp_flags).filter(|e| e.flags & CT_F_HAIRPIN != 0) else {
        return pass(Stat::TcNoReverse);
    };
    let (vip, vport, svc) = (e.nat_ip_be, e.nat_port_be, e.service_id);
    nat::translate(ctx, pk.l4_off, t, End::Src, (vip, vport))?;
    nat::translate(ctx, pk.l4_off, t, End::Dst, (t.src_be, t.dport_be))?;
    // Back where it came from: the gateway's MAC becomes the source.
    let macs: [[u8; 6]; 2] = Packet::load(ctx, 0).ok_or(Stat::NatRewriteFail)?;
    tunnel::set_macs(ctx, &macs[1], &macs[0]).ok_or(Stat::NatRewriteFail)?;
    lb::count_service(svc, ctx.len() as u32, false);
    bump(Stat::NatReverse);
    // SAFETY: the context's own field: this veth.
    Ok(Verdict::redirect(unsafe { (*ctx.skb.skb).ifindex }))
}

/// Packets entering the container (inlined, as above).
#[inline(always)]
pub fn to_container(ctx: &TcContext) -> Result<Verdict, Stat> {
    // SAFETY: the context's own skb.
    if unsafe { (*ctx.skb.skb).mark } == TRANSLATED_MARK {
        return pass(Stat::NatReverseDone);
    }
    let pk = match parse::ipv4(ctx) {
        Ok(pk) => pk,
        Err(e) => return unparsed(e),
    };
    if pk.fragment {
        return fragment_in(ctx, &pk);
    }
    match pk.t.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            // A VIP flow's reply comes from its backend, a container of an
            // overlay network: a packet from anywhere else (the world's
            // answers, Docker's `-p`) has no reverse entry, and only a
            // backend of a published port may have a stale routing-mesh one.
            if let Some(l) = tunnel::local_ref()
                && tunnel::vni_of(l, pk.t.src_be) == 0
            {
                if publishes(ctx, pk.t.dst_be) {
                    direct_from_outside(ctx, &pk);
                }
                return pass(Stat::TcNoReverse);
            }
            // A reply comes from its backend's port, whose bit was set
            // before the backend took a flow: other container traffic
            // skips the two lookups.
            if !backend_port(pk.t.sport_be) {
                return pass(Stat::TcNoReverse);
            }
            reverse_nat(ctx, &pk)
        }
        IPPROTO_ICMP => reverse_icmp_error(ctx, &pk),
        _ => pass(Stat::TcNoReverse),
    }
}

/// Whether the container behind this veth (`dst_be`) backs a published
/// port (`VETH_PUBLISHED`); a veth the array does not describe may.
#[inline(always)]
fn publishes(ctx: &TcContext, dst_be: u32) -> bool {
    // SAFETY: the context's own field: the veth this program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    VETH_SRC
        .get(ifindex)
        .is_none_or(|v| v.ip_be != dst_be || v.flags & VETH_PUBLISHED != 0)
}

/// A new flow from outside the cluster that the host stack delivers (not
/// the routing mesh: Docker's own `-p`, routing) may reuse the tuple of a
/// finished routing-mesh flow, whose reverse entry would then send this
/// flow's replies the mesh's way (translated, or back through another
/// node). The new flow wins: the stale entry goes, as for direct flows
/// leaving a container (`ct::supersede_reverse`).
#[inline(always)]
fn direct_from_outside(ctx: &TcContext, pk: &Parsed) {
    let t = &pk.t;
    let opens =
        t.proto == IPPROTO_UDP || pk.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    // SAFETY: the context's own skb.
    if !opens || unsafe { (*ctx.skb.skb).mark } == DELIVERED_MARK {
        return;
    }
    if ct::supersede_mesh_reverse(t) {
        bump(Stat::LbStaleReverse);
    }
}

/// A reply from a backend: its source becomes the VIP again.
#[inline(always)]
fn reverse_nat<P: Packet>(p: &P, pk: &Parsed) -> Result<Verdict, Stat> {
    let t = &pk.t;
    let Some(e) = ct::reply_entry(t, pk.tcp_flags) else {
        return pass(Stat::TcNoReverse);
    };
    let (vip, vport, svc, backend_id) = (e.nat_ip_be, e.nat_port_be, e.service_id, e.backend_id);
    remember_fragments(pk, vip, backend_id);
    nat::translate(p, pk.l4_off, t, End::Src, (vip, vport))?;
    lb::count_service(svc, p.len() as u32, false);
    pass(Stat::NatReverse)
}

/// An ICMP error (destination unreachable, time exceeded) quoting a packet
/// the client sent to a backend: translated back to the VIP.
#[inline(always)]
fn reverse_icmp_error<P: Packet>(p: &P, pk: &Parsed) -> Result<Verdict, Stat> {
    let Some(icmp) = p.load::<IcmpHdr>(pk.l4_off) else {
        return pass(Stat::TcMalformed);
    };
    if icmp.kind != ICMP_DEST_UNREACH && icmp.kind != ICMP_TIME_EXCEEDED {
        return pass(Stat::TcNoReverse);
    }
    let inner_ip_off = pk.l4_off + 8;
    let Some(inner) = p.load::<Ipv4Hdr>(inner_ip_off) else {
        return pass(Stat::TcMalformed);
    };
    let ihl = inner.header_len();
    if inner.version() != 4
        || ihl < IPV4_MIN_HLEN
        || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP)
    {
        return pass(Stat::TcNoReverse);
    }
    let inner_l4_off = inner_ip_off + ihl;
    // An error quotes at least 8 bytes of the L4 header: the ports.
    let Some(ports) = p.load::<[u16; 2]>(inner_l4_off) else {
        return pass(Stat::TcMalformed);
    };
    // The quoted packet went client -> backend; its reverse entry is keyed
    // by the backend's reply direction.
    let quoted = Tuple {
        src_be: inner.src_be,
        dst_be: inner.dst_be,
        sport_be: ports[0],
        dport_be: ports[1],
        proto: inner.proto,
        ..Tuple::default()
    };
    let Some(f) = ct::lookup(&quoted.reversed().key(dir::REVERSE)) else {
        return pass(Stat::TcNoReverse);
    };
    // SAFETY: pointer from a successful lookup.
    let (vip, vport) = unsafe { ((*f.entry).nat_ip_be, (*f.entry).nat_port_be) };
    nat::icmp_error(
        p,
        pk.l4_off,
        inner_ip_off,
        inner_l4_off,
        &quoted,
        (vip, vport),
        pk.t.src_be,
    )
    .ok_or(Stat::NatRewriteFail)?;
    pass(Stat::NatIcmpError)
}

//! TC ingress on the bridges of Docker's other networks (the default
//! bridge, user-defined ones): what their containers send to the host.
//!
//! A container there that calls a published port on this node's address
//! (or on its bridge's gateway, `host.docker.internal`) never crosses the NIC,
//! so XDP never sees it, and Docker's isolation rules would drop its way
//! from that bridge into the mesh network in FORWARD. Here it is balanced
//! as a client of the routing mesh, before netfilter's forward chain: the
//! destination DNATed (the container's address kept), to a backend here
//! straight to its veth, to one elsewhere through the tunnel. Its reverse
//! entry is a routing-mesh one (`CT_F_INGRESS`): replies are restored to
//! the address called where the flow entered the backend's node, and sent
//! to the container by the kernel's FIB lookup (through this bridge).
//!
//! Only sources inside the network's own subnet are balanced
//! (`MESH_BRIDGES`); everything else passes untouched, as if mesh were not
//! there.

use aya_ebpf::programs::TcContext;
use mesh_common::{
    ct::CT_F_INGRESS,
    lb::{PublishedKey, published_hash},
    stats::Stat,
    tunnel::{DELIVERED_MARK, LocalNode},
};

use crate::{
    ctx::{Packet, Verdict, pass},
    hdr::{ETH_HLEN, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr},
    ingress::{self, IP_DF, TCP_IP_HLEN},
    lb,
    maps::{BRIDGES, CONFIG, PUBLISHED},
    nat::{self, End},
    parse::{self, Parsed},
    stats::bump,
    tunnel, veth,
};

/// A packet a container on another Docker network sent to the host.
#[inline(always)]
pub fn from_bridge(ctx: &TcContext) -> Result<Verdict, Stat> {
    let Ok(pk) = parse::ipv4(ctx) else {
        return pass(Stat::BridgePass);
    };
    let t = pk.t;
    // Fragments are left to the stack (a fragmented datagram to a
    // published port does not reach it from here: docs/architecture.md).
    if pk.fragmented || (t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP) {
        return pass(Stat::BridgePass);
    }
    let Some(l) = tunnel::local() else {
        return pass(Stat::BridgePass);
    };
    // SAFETY: the context's own field: the bridge this program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // This node's address, or the bridge's own (host.docker.internal): one
    // lookup for everything else (the bulk: the internet). Another node's
    // address takes the usual way out (masqueraded), and that node's XDP
    // balances it.
    let net = if t.dst_be == l.underlay_ip_be {
        None
    } else {
        // A gateway shares its subnet with the container: under the widest
        // mask of the bridges, source and destination agree.
        let mask = CONFIG.get(0).map_or(0, |c| c.bridge_mask_be);
        if (t.src_be ^ t.dst_be) & mask != 0 {
            return pass(Stat::BridgePass);
        }
        // SAFETY: plain data written by the agent.
        match unsafe { BRIDGES.get(&ifindex) } {
            Some(n) if n.gateway_be == t.dst_be && n.gateway_be != 0 => Some(*n),
            _ => return pass(Stat::BridgePass),
        }
    };
    let key = PublishedKey {
        port_be: t.dport_be,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: plain data written by the agent.
    let Some(service_id) = (unsafe { PUBLISHED.get(&key) }).map(|p| p.service_id) else {
        return pass(Stat::BridgePass);
    };
    // Only the network's own subnet: a container may forge any source.
    // SAFETY: as above.
    let net = match net.or_else(|| unsafe { BRIDGES.get(&ifindex) }.copied()) {
        Some(n) => n,
        None => return pass(Stat::BridgePass),
    };
    if !net.contains(t.src_be) {
        return Err(Stat::BridgeSpoofed);
    }
    balance(ctx, &pk, &l, service_id, ifindex)
}

#[inline(always)]
fn balance(
    ctx: &TcContext,
    pk: &Parsed,
    l: &LocalNode,
    service_id: u32,
    ifindex: u32,
) -> Result<Verdict, Stat> {
    let t = pk.t;
    let hash = published_hash(t.src_be, t.sport_be, t.dport_be, t.proto);
    let c = lb::balance(&t, service_id, hash, pk.tcp_flags, CT_F_INGRESS)?;
    let b = c.backend;
    let node = match tunnel::route(l, b.ip_be)? {
        tunnel::Route::Remote(node) if b.ifindex == 0 => Some(node),
        _ => None,
    };
    if node.is_some() && l.tunnel_mss != 0 && pk.ip_len as u32 > l.tunnel_mss as u32 + TCP_IP_HLEN {
        // It would not fit the tunnel: with DF the container learns the
        // tunnel's MTU, from its gateway; without DF it cannot be
        // fragmented here.
        let ip: Ipv4Hdr = Packet::load(ctx, ETH_HLEN).ok_or(Stat::TcMalformed)?;
        if u16::from_be(ip.frag_be) & IP_DF == 0 {
            return Err(Stat::IngressTooBigNoDf);
        }
        let eth: EthHdr = Packet::load(ctx, 0).ok_or(Stat::TcMalformed)?;
        return ingress::frag_needed_via(ctx, l, eth.dst, ifindex);
    }
    nat::translate(ctx, pk.l4_off, &t, End::Dst, (b.ip_be, b.port_be))?;
    lb::count_service(service_id, ctx.len(), c.new_flow);
    match node {
        Some(node) => {
            ingress::clamp(ctx, pk.l4_off, t.proto, pk.tcp_flags, l)?;
            let v = tunnel::encap(ctx, l, &node, pk.route_hash())?;
            bump(Stat::BridgeRemote);
            Ok(v)
        }
        None if b.ifindex != 0 => {
            bump(Stat::BridgeLocal);
            // Delivered by mesh: the backend's veth must not take it for a
            // new flow from outside that supersedes this one's entries.
            // SAFETY: the context's own skb; TC may write its mark.
            unsafe { (*ctx.skb.skb).mark = DELIVERED_MARK };
            veth::to_local(ctx, &b)
        }
        // Neither a local veth nor another node's: nothing here reaches it.
        None => Err(Stat::LbNoBackend),
    }
}

//! TC on the host side of a container's veth.
//!
//! - ingress = packets leaving the container: service VIP:port -> conntrack
//!   -> Maglev -> DNAT -> redirect to a local backend's veth;
//! - egress = packets entering the container: reverse NAT of replies and of
//!   ICMP errors about balanced flows.
//!
//! Every packet bumps one path counter and one verdict counter.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use mesh_common::{
    ct::{dir, tcp_flag},
    lb::{ServiceKey, ServiceStats, flow_hash},
    stats::Stat,
};

use crate::{
    ct::{self, Tuple},
    lb,
    maps::{SERVICES, SVC_STATS},
    nat::{self, End},
    parse::{
        ETH_HLEN, ETH_P_IP, EthHdr, ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, IcmpHdr, Ipv4Hdr,
    },
    stats::bump,
    tunnel,
};

/// Packets leaving the container.
#[inline(always)]
pub fn from_container(ctx: &TcContext) -> i32 {
    finish(try_from_container(ctx))
}

/// Sends a packet leaving a container on its way: to another node through
/// the tunnel, or (this node, outside the cluster, overlay off) to the
/// stack. `path`, if any, is counted when it stays here.
#[inline(always)]
fn deliver(ctx: &TcContext, dst_be: u32, hash: u32, path: Option<Stat>) -> Result<i32, Stat> {
    let here = || {
        if let Some(p) = path {
            bump(p);
        }
        Ok(TC_ACT_OK)
    };
    let Some(local) = tunnel::local() else {
        return here();
    };
    match tunnel::route(&local, dst_be)? {
        tunnel::Route::Here => here(),
        tunnel::Route::Remote(node) => {
            let v = tunnel::encap(ctx, &local, &node, hash)?;
            bump(Stat::TunnelEncap);
            Ok(v)
        }
    }
}

/// Packets entering the container.
#[inline(always)]
pub fn to_container(ctx: &TcContext) -> i32 {
    finish(try_to_container(ctx))
}

/// Counts the verdict; a drop reason is counted too.
#[inline(always)]
fn finish(r: Result<i32, Stat>) -> i32 {
    let verdict = match r {
        Ok(v) => v,
        Err(reason) => {
            bump(reason);
            TC_ACT_SHOT
        }
    };
    bump(match verdict {
        TC_ACT_OK => Stat::TcOk,
        TC_ACT_REDIRECT => Stat::TcRedirect,
        _ => Stat::TcShot,
    });
    verdict
}

/// Passes the packet untouched, counting why.
#[inline(always)]
fn pass(path: Stat) -> Result<i32, Stat> {
    bump(path);
    Ok(TC_ACT_OK)
}

/// The IPv4 header fields the programs need.
struct Ip {
    src_be: u32,
    dst_be: u32,
    proto: u8,
    /// Offset of the L4 header.
    l4_off: usize,
}

/// Parses Ethernet + IPv4; `Err` is the path counter of a packet that is
/// not balanced IPv4 and passes untouched.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Ip, Stat> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Stat::TcMalformed)?;
    if u16::from_be(eth.proto_be) != ETH_P_IP {
        return Err(Stat::TcNotIpv4);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| Stat::TcMalformed)?;
    let ihl = ip.header_len();
    if ip.version() != 4 || ihl < IPV4_MIN_HLEN || (u16::from_be(ip.tot_len_be) as usize) < ihl {
        return Err(Stat::TcMalformed);
    }
    if ip.frag_offset() != 0 {
        return Err(Stat::TcFragment);
    }
    Ok(Ip {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        proto: ip.proto,
        l4_off: ETH_HLEN + ihl,
    })
}

/// Ports (raw) and TCP flags of the L4 header at `off`.
#[inline(always)]
fn ports(ctx: &TcContext, off: usize, proto: u8) -> Result<(u16, u16, u8), i64> {
    let p: [u16; 2] = ctx.load(off)?;
    let flags = if proto == IPPROTO_TCP {
        ctx.load::<u8>(off + 13)?
    } else {
        0
    };
    Ok((p[0], p[1], flags))
}

fn try_from_container(ctx: &TcContext) -> Result<i32, Stat> {
    let ip = match parse_ipv4(ctx) {
        Ok(ip) => ip,
        Err(path) => return pass(path),
    };
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        let hash = flow_hash(ip.src_be, ip.dst_be, 0, 0, ip.proto);
        return deliver(ctx, ip.dst_be, hash, Some(Stat::TcNotService));
    }
    let Ok((sport_be, dport_be, tcp_flags)) = ports(ctx, ip.l4_off, ip.proto) else {
        return pass(Stat::TcMalformed);
    };
    let key = ServiceKey {
        vip_be: ip.dst_be,
        port_be: dport_be,
        proto: ip.proto,
        ..ServiceKey::default()
    };
    // SAFETY: map values are plain data; the agent replaces them atomically.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        // A new direct flow: only a TCP SYN (without ACK) or any UDP
        // packet can start one; both are cheap to check against stale
        // reverse entries.
        let opens =
            ip.proto == IPPROTO_UDP || tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
        let direct = Tuple {
            src_be: ip.src_be,
            dst_be: ip.dst_be,
            sport_be,
            dport_be,
            proto: ip.proto,
        };
        if opens && ct::supersede_reverse(&direct) {
            bump(Stat::LbStaleReverse);
        }
        let hash = flow_hash(ip.src_be, ip.dst_be, sport_be, dport_be, ip.proto);
        return deliver(ctx, ip.dst_be, hash, Some(Stat::TcNotService));
    };
    let t = Tuple {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        sport_be,
        dport_be,
        proto: ip.proto,
    };

    let mut new_flow = false;
    let tracked = ct::lookup(&t.key(dir::FORWARD)).and_then(|e| {
        // SAFETY: pointer from a successful lookup.
        let (id, nat_ip, nat_port) = unsafe { ((*e).backend_id, (*e).nat_ip_be, (*e).nat_port_be) };
        lb::current(id, nat_ip, nat_port).map(|b| (e, b))
    });
    let backend = match tracked {
        Some((entry, b)) => {
            ct::touch(entry, tcp_flags);
            bump(Stat::LbCtHit);
            b
        }
        None => {
            let existed = ct::lookup(&t.key(dir::FORWARD)).is_some();
            let (id, b) = lb::pick(svc.id, &t).ok_or(Stat::LbNoBackend)?;
            ct::create(&t, id, svc.id, b.ip_be, b.port_be, tcp_flags)
                .map_err(|_| Stat::LbCtWriteFail)?;
            if existed {
                bump(Stat::LbReselect);
            } else {
                if ip.proto == IPPROTO_TCP && tcp_flags & tcp_flag::SYN == 0 {
                    bump(Stat::LbCtMissMidFlow);
                }
                bump(Stat::LbNewFlow);
                new_flow = true;
            }
            b
        }
    };

    nat::rewrite(
        ctx,
        ip.l4_off,
        ip.proto,
        End::Dst,
        (ip.dst_be, backend.ip_be),
        (dport_be, backend.port_be),
    )
    .map_err(|_| Stat::NatRewriteFail)?;
    count_service(svc.id, ctx.len(), new_flow);

    if backend.ifindex == 0 {
        // Not a local veth: another node's (tunnelled) or the stack's.
        let hash = flow_hash(t.src_be, t.dst_be, t.sport_be, t.dport_be, t.proto);
        return deliver(ctx, backend.ip_be, hash, None);
    }
    // Local backend: deliver straight to its veth, as the gateway would.
    let gw_mac: [u8; 6] = ctx.load(0).map_err(|_| Stat::NatRewriteFail)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&backend.mac);
    macs[6..].copy_from_slice(&gw_mac);
    ctx.store(0, &macs, 0).map_err(|_| Stat::NatRewriteFail)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(backend.ifindex, 0) } as i32)
}

fn try_to_container(ctx: &TcContext) -> Result<i32, Stat> {
    let ip = match parse_ipv4(ctx) {
        Ok(ip) => ip,
        Err(path) => return pass(path),
    };
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => reverse_nat(ctx, &ip),
        IPPROTO_ICMP => reverse_icmp_error(ctx, &ip),
        _ => pass(Stat::TcNoReverse),
    }
}

/// A reply from a backend: its source becomes the VIP again.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, ip: &Ip) -> Result<i32, Stat> {
    let Ok((sport_be, dport_be, tcp_flags)) = ports(ctx, ip.l4_off, ip.proto) else {
        return pass(Stat::TcMalformed);
    };
    let reply = Tuple {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        sport_be,
        dport_be,
        proto: ip.proto,
    };
    let Some(e) = ct::lookup(&reply.key(dir::REVERSE)) else {
        return pass(Stat::TcNoReverse);
    };
    // SAFETY: pointer from a successful lookup.
    let (vip, vport, svc) = unsafe { ((*e).nat_ip_be, (*e).nat_port_be, (*e).service_id) };
    ct::touch(e, tcp_flags);
    nat::rewrite(
        ctx,
        ip.l4_off,
        ip.proto,
        End::Src,
        (ip.src_be, vip),
        (sport_be, vport),
    )
    .map_err(|_| Stat::NatRewriteFail)?;
    count_service(svc, ctx.len(), false);
    pass(Stat::NatReverse)
}

/// An ICMP error (destination unreachable, time exceeded) quoting a packet
/// the client sent to a backend: translated back to the VIP.
#[inline(always)]
fn reverse_icmp_error(ctx: &TcContext, ip: &Ip) -> Result<i32, Stat> {
    let Ok(icmp) = ctx.load::<IcmpHdr>(ip.l4_off) else {
        return pass(Stat::TcMalformed);
    };
    if icmp.kind != ICMP_DEST_UNREACH && icmp.kind != ICMP_TIME_EXCEEDED {
        return pass(Stat::TcNoReverse);
    }
    let inner_ip_off = ip.l4_off + 8;
    let Ok(inner) = ctx.load::<Ipv4Hdr>(inner_ip_off) else {
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
    let Ok((sport_be, dport_be, _)) = ports(ctx, inner_l4_off, IPPROTO_UDP) else {
        return pass(Stat::TcMalformed);
    };
    // The quoted packet went client -> backend; its reverse entry is keyed
    // by the backend's reply direction.
    let quoted = Tuple {
        src_be: inner.src_be,
        dst_be: inner.dst_be,
        sport_be,
        dport_be,
        proto: inner.proto,
    };
    let reply = Tuple {
        src_be: quoted.dst_be,
        dst_be: quoted.src_be,
        sport_be: quoted.dport_be,
        dport_be: quoted.sport_be,
        proto: quoted.proto,
    };
    let Some(e) = ct::lookup(&reply.key(dir::REVERSE)) else {
        return pass(Stat::TcNoReverse);
    };
    // SAFETY: pointer from a successful lookup.
    let (vip, vport) = unsafe { ((*e).nat_ip_be, (*e).nat_port_be) };
    nat::icmp_error(
        ctx,
        ip.l4_off,
        inner_ip_off,
        inner_l4_off,
        &quoted,
        (vip, vport),
        ip.src_be,
    )
    .map_err(|_| Stat::NatRewriteFail)?;
    pass(Stat::NatIcmpError)
}

#[inline(always)]
fn count_service(id: u32, len: u32, new_flow: bool) {
    if let Some(s) = SVC_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot from a successful lookup.
        let s: &mut ServiceStats = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += len as u64;
        s.new_flows += new_flow as u64;
    }
}

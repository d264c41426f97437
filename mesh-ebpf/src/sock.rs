//! Socket-level balancing (cgroup `connect4`, `sendmsg4`): a connect or
//! datagram of this host's to a published port on localhost or on its own
//! underlay address never crosses the NIC, so XDP never sees it; one to a
//! VIP never crosses a container's veth, so TC never sees it. Its
//! destination is rewritten before the first packet exists: a published
//! port's to a backend here, or to the published port of the node of a
//! backend elsewhere (that node's XDP balances it, as for any client); a
//! VIP's to its backend, here or (through the host link) elsewhere.
//! A container's connects and datagrams to a VIP are balanced the same
//! way when the agent listed its network namespace (`MESH_SOCK_NETNS`):
//! its packets then go to the backend's own address and take the plain
//! path of a container's packet to another, with no translation and no
//! conntrack entry (the veth programs still check them: a backend of
//! another network is dropped there as any of its containers is).
//! `getpeername4` and `recvmsg4` report the address asked for. Sockets of
//! other namespaces pass as they were.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{
    lb::{PublishedKey, ServiceKey, SockOrig, SockRevKey},
    stats::Stat,
};

use crate::{
    hdr::{IPPROTO_TCP, IPPROTO_UDP},
    lb,
    maps::{CONFIG, PUBLISHED, SERVICES, SOCK_NETNS, SOCK_ORIG, SOCK_REV},
    stats::bump,
    tunnel,
};

/// Where a socket of the host's asking for `ip_be:port_be` goes, and how
/// it was chosen; `None`: not such a socket or address, or no usable
/// backend (left as it was).
#[inline(always)]
fn pick(ctx: &SockAddrContext, ip_be: u32, port_be: u16, proto: u8, hash: u32) -> Option<Pick> {
    let config = CONFIG.get(0)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // SAFETY: plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if config.host_netns_cookie == 0 || netns != config.host_netns_cookie {
        // A container's: VIPs only, and only where the agent asked.
        // SAFETY: plain data written by the agent.
        if !config.may_be_vip(ip_be) || unsafe { SOCK_NETNS.get(&netns) }.is_none() {
            return None;
        }
        return vip(ip_be, port_be, proto, hash, Kind::ContainerVip);
    }
    // A VIP's port that no service has falls through to the published
    // ports, which never match a VIP.
    if config.may_be_vip(ip_be)
        && let Some(to) = vip(ip_be, port_be, proto, hash, Kind::Vip)
    {
        return Some(to);
    }
    let l = tunnel::local()?;
    let loopback = u32::from_be(ip_be) >> 24 == 127;
    if !loopback && ip_be != l.underlay_ip_be {
        return None;
    }
    let key = PublishedKey {
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: plain data written by the agent.
    let service_id = unsafe { PUBLISHED.get(&key) }.map(|p| p.service_id)?;
    let Some((_, b)) = lb::pick(service_id, hash) else {
        bump(Stat::SockNoBackend);
        return None;
    };
    if b.ifindex != 0 {
        return Some(Pick {
            to: (b.ip_be, b.port_be),
            kind: Kind::Local,
            service_id,
        });
    }
    match tunnel::route(&l, b.ip_be) {
        Ok(tunnel::Route::Remote(node)) => Some(Pick {
            to: (node.underlay_ip_be, port_be),
            kind: Kind::Remote,
            service_id,
        }),
        _ => {
            bump(Stat::SockNoBackend);
            None
        }
    }
}

/// Where [`pick`] sends a socket, how it chose, and for which service.
struct Pick {
    to: (u32, u16),
    kind: Kind,
    service_id: u32,
}

/// How [`pick`] chose.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A published port's backend here.
    Local,
    /// The published port of the node of a backend elsewhere.
    Remote,
    /// A VIP's backend, for the host, wherever it is.
    Vip,
    /// A VIP's backend, for a container, wherever it is.
    ContainerVip,
}

/// A VIP's backend by Maglev: the socket goes to it directly. A
/// container's packets reach a backend anywhere as they reach any
/// container. The host's reach a backend here over the `mesh` bridge and
/// one elsewhere through the host link (`host.rs`), which tunnels them to
/// its node, so that one is only chosen when this node has the link; its
/// answers come back to the host's overlay address the same way.
#[inline(always)]
fn vip(ip_be: u32, port_be: u16, proto: u8, hash: u32, kind: Kind) -> Option<Pick> {
    let key = ServiceKey {
        vip_be: ip_be,
        port_be,
        proto,
        ..ServiceKey::default()
    };
    // SAFETY: plain data written by the agent.
    let service_id = unsafe { SERVICES.get(&key) }.map(|s| s.id)?;
    let Some((_, b)) = lb::pick(service_id, hash) else {
        bump(Stat::SockNoBackend);
        return None;
    };
    let reachable = b.ifindex != 0
        || tunnel::local().is_some_and(|l| {
            (kind == Kind::ContainerVip || l.host_ifindex != 0)
                && matches!(tunnel::route(&l, b.ip_be), Ok(tunnel::Route::Remote(_)))
        });
    if !reachable {
        bump(Stat::SockNoBackend);
        return None;
    }
    Some(Pick {
        to: (b.ip_be, b.port_be),
        kind,
        service_id,
    })
}

/// The context's destination: address, port (network order), protocol.
#[inline(always)]
fn destination(ctx: &SockAddrContext) -> (u32, u16, u8) {
    // SAFETY: the context's own fields.
    unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16, sa.protocol as u8)
    }
}

/// Rewrites the context's address (the destination, or for recvmsg the
/// source reported).
#[inline(always)]
fn rewrite(ctx: &SockAddrContext, ip_be: u32, port_be: u16) {
    // SAFETY: these programs may rewrite the address they are given.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = ip_be;
        sa.user_port = port_be as u32;
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Remembers that datagrams of socket `cookie` to `to` are answers to its
/// datagrams to `orig`.
#[inline(always)]
fn remember_datagrams(cookie: u64, (ip_be, port_be): (u32, u16), orig: &SockOrig) {
    let key = SockRevKey {
        cookie,
        ip_be,
        port_be,
        _pad: 0,
    };
    let _ = SOCK_REV.insert(&key, orig, 0);
}

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    let (ip_be, port_be, proto) = destination(ctx);
    // Any backend: the kernel keeps the connection on the one chosen.
    // SAFETY: plain helper call.
    let hash = unsafe { bpf_get_prandom_u32() };
    let Some(Pick {
        to,
        kind,
        service_id,
    }) = pick(ctx, ip_be, port_be, proto, hash)
    else {
        return;
    };
    // One sent to another node's published port is counted there.
    if kind != Kind::Remote {
        lb::count_socket_flow(service_id);
    }
    bump(match kind {
        Kind::Local => Stat::SockLocal,
        Kind::Remote => Stat::SockRemote,
        Kind::Vip => Stat::SockVip,
        Kind::ContainerVip => Stat::SockVipContainer,
    });
    // getpeername reports what the socket asked for; so does recvmsg of a
    // connected datagram socket.
    let orig = SockOrig {
        ip_be,
        port_be,
        _pad: 0,
    };
    let cookie = socket_cookie(ctx);
    let _ = SOCK_ORIG.insert(&cookie, &orig, 0);
    if proto == IPPROTO_UDP {
        remember_datagrams(cookie, to, &orig);
    }
    rewrite(ctx, to.0, to.1);
}

/// sendmsg4: a datagram of an unconnected UDP socket of this host's to a
/// published port on localhost or its own address. Every datagram of one
/// socket to one address goes to the same backend while the ring stands
/// (the socket cookie is the hash), so a conversation stays on it.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) {
    let (ip_be, port_be, proto) = destination(ctx);
    let cookie = socket_cookie(ctx);
    let hash = (cookie ^ (cookie >> 32)) as u32;
    let Some(Pick { to, kind, .. }) = pick(ctx, ip_be, port_be, proto, hash) else {
        return;
    };
    bump(match kind {
        Kind::Vip => Stat::SockVip,
        Kind::ContainerVip => Stat::SockVipContainer,
        Kind::Local | Kind::Remote => Stat::SockDatagram,
    });
    let orig = SockOrig {
        ip_be,
        port_be,
        _pad: 0,
    };
    remember_datagrams(cookie, to, &orig);
    rewrite(ctx, to.0, to.1);
}

/// recvmsg4: an answer to a balanced datagram socket is reported as from
/// the address its datagrams asked for.
#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) {
    let (ip_be, port_be, _) = destination(ctx);
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        ip_be,
        port_be,
        _pad: 0,
    };
    // SAFETY: plain data written by connect4 and sendmsg4.
    if let Some(o) = unsafe { SOCK_REV.get(&key) }.copied() {
        bump(Stat::SockReplyRestored);
        rewrite(ctx, o.ip_be, o.port_be);
    }
}

/// getpeername of a socket balanced at connect: the address it asked for,
/// not the backend's.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: plain data written by connect4.
    if let Some(o) = unsafe { SOCK_ORIG.get(&socket_cookie(ctx)) }.copied() {
        rewrite(ctx, o.ip_be, o.port_be);
    }
}

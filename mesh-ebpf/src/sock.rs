//! Socket-level balancing (cgroup `connect4`): a connect of this host's to
//! a published port on localhost or on its own underlay address never
//! crosses the NIC, so XDP never sees it. Its destination is rewritten
//! before the first packet exists: to a backend here, or to the published
//! port of the node of a backend elsewhere (that node's XDP balances it, as
//! for any client). Only sockets in the host's network namespace are
//! touched (the agent writes its cookie); everything else passes as it was.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{
    lb::{PublishedKey, SockOrig},
    stats::Stat,
};

use crate::{
    lb,
    maps::{CONFIG, PUBLISHED, SOCK_ORIG},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    stats::bump,
    tunnel,
};

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    let Some(cookie) = CONFIG.get(0).map(|c| c.host_netns_cookie) else {
        return;
    };
    // SAFETY: plain helper call on the program's own context.
    if cookie == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != cookie {
        return;
    }
    // SAFETY: the context's own fields.
    let (ip_be, port_be, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16, sa.protocol as u8)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let Some(l) = tunnel::local() else { return };
    let loopback = u32::from_be(ip_be) >> 24 == 127;
    if !loopback && ip_be != l.underlay_ip_be {
        return;
    }
    let key = PublishedKey {
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: plain data written by the agent.
    let Some(service_id) = (unsafe { PUBLISHED.get(&key) }).map(|p| p.service_id) else {
        return;
    };
    // Any backend: the kernel keeps the connection on the one chosen.
    // SAFETY: plain helper call.
    let hash = unsafe { bpf_get_prandom_u32() };
    let Some((_, b)) = lb::pick(service_id, hash) else {
        bump(Stat::SockNoBackend);
        return;
    };
    let (to_ip, to_port) = if b.ifindex != 0 {
        bump(Stat::SockLocal);
        (b.ip_be, b.port_be)
    } else {
        match tunnel::route(&l, b.ip_be) {
            Ok(tunnel::Route::Remote(node)) => {
                bump(Stat::SockRemote);
                (node.underlay_ip_be, port_be)
            }
            _ => {
                bump(Stat::SockNoBackend);
                return;
            }
        }
    };
    // getpeername reports what the socket asked for.
    let orig = SockOrig {
        ip_be,
        port_be,
        _pad: 0,
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let _ = SOCK_ORIG.insert(&cookie, &orig, 0);
    // SAFETY: connect4 may rewrite the destination it is given.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = to_ip;
        sa.user_port = to_port as u32;
    }
}

/// getpeername of a socket balanced at connect: the address it asked for,
/// not the backend's.
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain data written by connect4.
    let Some(o) = (unsafe { SOCK_ORIG.get(&cookie) }).copied() else {
        return;
    };
    // SAFETY: getpeername4 may rewrite the address it reports.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = o.ip_be;
        sa.user_port = o.port_be as u32;
    }
}

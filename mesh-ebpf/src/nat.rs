//! Address and port translation with checksum fix-ups.

use aya_ebpf::programs::TcContext;

use crate::{
    csum::{self, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    ct::Tuple,
    parse::{
        ETH_HLEN, ICMP_CSUM_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IPPROTO_TCP, IPPROTO_UDP,
        L4_DPORT_OFF, L4_SPORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// Rewrites one end's address and port of a TCP/UDP packet and fixes the
/// IPv4 and L4 checksums. A UDP checksum of 0 (none) stays 0.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4_off: usize,
    proto: u8,
    end: End,
    (old_ip, new_ip): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Result<(), i64> {
    let (ip_off, port_off) = match end {
        End::Src => (IP_SRC_OFF, L4_SPORT_OFF),
        End::Dst => (IP_DST_OFF, L4_DPORT_OFF),
    };
    let (csum_off, mangled) = if proto == IPPROTO_UDP {
        (l4_off + UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0)
    } else {
        (l4_off + TCP_CSUM_OFF, 0)
    };
    if old_ip != new_ip {
        ctx.l4_csum_replace(
            csum_off,
            old_ip as u64,
            new_ip as u64,
            BPF_F_PSEUDO_HDR | mangled | 4,
        )?;
        ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old_ip as u64, new_ip as u64, 4)?;
        ctx.store(ETH_HLEN + ip_off, &new_ip, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
        ctx.store(l4_off + port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Translates an ICMP error about a balanced flow back to the VIP.
///
/// The error quotes the packet the client sent, as the backend received it
/// after DNAT (client -> backend). Its inner
/// destination becomes the VIP again, and the outer source too when the
/// backend itself sent the error. `inner` is the quoted tuple; `vip` what to
/// restore. Checksums: inner IPv4, inner L4 (when quoted and set), ICMP, and
/// outer IPv4, all by RFC 1624 arithmetic.
#[inline(always)]
pub fn icmp_error(
    ctx: &TcContext,
    icmp_off: usize,
    inner_ip_off: usize,
    inner_l4_off: usize,
    inner: &Tuple,
    (vip, vport): (u32, u16),
    outer_src: u32,
) -> Result<(), i64> {
    let (backend_ip, backend_port) = (inner.dst_be, inner.dport_be);
    let mut icmp_csum: u16 = ctx.load(icmp_off + ICMP_CSUM_OFF)?;

    // Inner IPv4 destination and header checksum.
    let inner_ip_csum: u16 = ctx.load(inner_ip_off + IP_CSUM_OFF)?;
    let new_inner_ip_csum = csum::update32(inner_ip_csum, backend_ip, vip);
    icmp_csum = csum::update32(icmp_csum, backend_ip, vip);
    icmp_csum = csum::update16(icmp_csum, inner_ip_csum, new_inner_ip_csum);
    ctx.store(inner_ip_off + IP_DST_OFF, &vip, 0)?;
    ctx.store(inner_ip_off + IP_CSUM_OFF, &new_inner_ip_csum, 0)?;

    // Inner destination port, and the inner L4 checksum if it was quoted.
    icmp_csum = csum::update16(icmp_csum, backend_port, vport);
    ctx.store(inner_l4_off + L4_DPORT_OFF, &vport, 0)?;
    let l4_csum_off = match inner.proto {
        IPPROTO_TCP => inner_l4_off + TCP_CSUM_OFF,
        _ => inner_l4_off + UDP_CSUM_OFF,
    };
    if let Ok(old) = ctx.load::<u16>(l4_csum_off) {
        if !(inner.proto == IPPROTO_UDP && old == 0) {
            let mut new = csum::update32(old, backend_ip, vip);
            new = csum::update16(new, backend_port, vport);
            if inner.proto == IPPROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_csum = csum::update16(icmp_csum, old, new);
            ctx.store(l4_csum_off, &new, 0)?;
        }
    }
    ctx.store(icmp_off + ICMP_CSUM_OFF, &icmp_csum, 0)?;

    // Outer source, when the backend itself reports the error.
    if outer_src == backend_ip {
        ctx.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, backend_ip as u64, vip as u64, 4)?;
        ctx.store(ETH_HLEN + IP_SRC_OFF, &vip, 0)?;
    }
    Ok(())
}

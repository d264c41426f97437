//! Address and port translation with checksum fix-ups, for either hook.

use mesh_common::{ct::Tuple, stats::Stat};

use crate::{
    csum::{self, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    ctx::Packet,
    hdr::{
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

/// Rewrites the IPv4 address at `field` (`IP_SRC_OFF` or `IP_DST_OFF`) and
/// the header checksum; the L4 checksum is the caller's (a later fragment
/// has none, its first fragment's covers the whole datagram).
#[inline(always)]
pub fn rewrite_address<P: Packet>(p: &P, field: usize, old: u32, new: u32) -> Option<()> {
    p.l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old, new, 4)?;
    p.store(ETH_HLEN + field, &new)
}

/// Rewrites `end` of flow `t` (its L4 header at `l4_off`) to `ip:port`
/// (network order), checksums included; a failure is the drop reason.
#[inline(always)]
pub fn translate<P: Packet>(
    p: &P,
    l4_off: usize,
    t: &Tuple,
    end: End,
    (ip, port): (u32, u16),
) -> Result<(), Stat> {
    let (old_ip, old_port) = match end {
        End::Src => (t.src_be, t.sport_be),
        End::Dst => (t.dst_be, t.dport_be),
    };
    rewrite(p, l4_off, t.proto, end, (old_ip, ip), (old_port, port)).ok_or(Stat::NatRewriteFail)
}

/// Rewrites one end's address and port of a TCP/UDP packet and fixes the
/// IPv4 and L4 checksums. A UDP checksum of 0 (none) stays 0.
#[inline(always)]
pub fn rewrite<P: Packet>(
    p: &P,
    l4_off: usize,
    proto: u8,
    end: End,
    (old_ip, new_ip): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Option<()> {
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
        p.l4_csum_replace(csum_off, old_ip, new_ip, BPF_F_PSEUDO_HDR | mangled | 4)?;
        rewrite_address(p, ip_off, old_ip, new_ip)?;
    }
    if old_port != new_port {
        p.l4_csum_replace(csum_off, old_port as u32, new_port as u32, mangled | 2)?;
        p.store(l4_off + port_off, &new_port)?;
    }
    Some(())
}

/// Translates an ICMP error about a balanced flow back to the VIP.
///
/// The error quotes the packet the client sent, as the backend received it
/// after DNAT (client -> backend). Its inner destination becomes the VIP
/// again, and the outer source too when the backend itself sent the error.
/// `inner` is the quoted tuple; `vip` what to restore. Checksums: inner
/// IPv4, inner L4 (when quoted and set), ICMP, and outer IPv4, all by RFC
/// 1624 arithmetic.
#[inline(always)]
pub fn icmp_error<P: Packet>(
    p: &P,
    icmp_off: usize,
    inner_ip_off: usize,
    inner_l4_off: usize,
    inner: &Tuple,
    (vip, vport): (u32, u16),
    outer_src: u32,
) -> Option<()> {
    let (backend_ip, backend_port) = (inner.dst_be, inner.dport_be);
    let mut icmp_csum: u16 = p.load(icmp_off + ICMP_CSUM_OFF)?;

    // Inner IPv4 destination and header checksum.
    let inner_ip_csum: u16 = p.load(inner_ip_off + IP_CSUM_OFF)?;
    let new_inner_ip_csum = csum::update32(inner_ip_csum, backend_ip, vip);
    icmp_csum = csum::update32(icmp_csum, backend_ip, vip);
    icmp_csum = csum::update16(icmp_csum, inner_ip_csum, new_inner_ip_csum);
    p.store(inner_ip_off + IP_DST_OFF, &vip)?;
    p.store(inner_ip_off + IP_CSUM_OFF, &new_inner_ip_csum)?;

    // Inner destination port, and the inner L4 checksum if it was quoted.
    icmp_csum = csum::update16(icmp_csum, backend_port, vport);
    p.store(inner_l4_off + L4_DPORT_OFF, &vport)?;
    let l4_csum_off = match inner.proto {
        IPPROTO_TCP => inner_l4_off + TCP_CSUM_OFF,
        _ => inner_l4_off + UDP_CSUM_OFF,
    };
    if let Some(old) = p.load::<u16>(l4_csum_off)
        && !(inner.proto == IPPROTO_UDP && old == 0)
    {
        let mut new = csum::update32(old, backend_ip, vip);
        new = csum::update16(new, backend_port, vport);
        if inner.proto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        icmp_csum = csum::update16(icmp_csum, old, new);
        p.store(l4_csum_off, &new)?;
    }
    p.store(icmp_off + ICMP_CSUM_OFF, &icmp_csum)?;

    // Outer source, when the backend itself reports the error.
    if outer_src == backend_ip {
        rewrite_address(p, IP_SRC_OFF, backend_ip, vip)?;
    }
    Some(())
}

/// The MSS option's kind and length.
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
/// Options looked at before giving up (Linux and the common stacks put the
/// MSS first).
const MSS_SEARCH: usize = 8;

/// Lowers the MSS option of a TCP SYN at `l4_off` to `max` (the largest
/// segment the tunnel carries) and fixes the checksum; whether it did.
/// `None`: the header could not be read or written.
#[inline(always)]
pub fn clamp_mss<P: Packet>(p: &P, l4_off: usize, max: u16) -> Option<bool> {
    let doff: u8 = p.load(l4_off + 12)?;
    let end = l4_off + ((doff >> 4) as usize) * 4;
    let mut off = l4_off + 20;
    for _ in 0..MSS_SEARCH {
        if off + 4 > end {
            return Some(false);
        }
        let [kind, len]: [u8; 2] = p.load(off)?;
        match kind {
            TCPOPT_EOL => return Some(false),
            TCPOPT_NOP => off += 1,
            TCPOPT_MSS => {
                if len != TCPOLEN_MSS {
                    return Some(false);
                }
                let old_be: u16 = p.load(off + 2)?;
                if u16::from_be(old_be) <= max {
                    return Some(false);
                }
                let new_be = max.to_be();
                // The checksum sums 16-bit words from the header's start:
                // a value at an odd offset sits across two of them.
                let (from, to) = if (off + 2 - l4_off) % 2 == 0 {
                    (old_be, new_be)
                } else {
                    (old_be.swap_bytes(), new_be.swap_bytes())
                };
                p.l4_csum_replace(l4_off + TCP_CSUM_OFF, from as u32, to as u32, 2)?;
                p.store(off + 2, &new_be)?;
                return Some(true);
            }
            _ => {
                if len < 2 {
                    return Some(false);
                }
                off += len as usize;
            }
        }
    }
    Some(false)
}

//! Checksums: the kernel helpers for TCP/UDP (they handle offloaded,
//! CHECKSUM_PARTIAL packets), and RFC 1624 incremental arithmetic for
//! headers the helpers cannot reach (the inner headers of ICMP errors).
//!
//! The arithmetic takes values raw, as stored in the packet: one's
//! complement sums do not depend on byte order as long as every operand is
//! in the same order.

/// `csum` after a 16-bit word of the covered data changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum as u32) + (!old as u32 & 0xffff) + new as u32;
    !fold(sum)
}

/// As [`update16`] for a 32-bit field (two words).
#[inline(always)]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let c = update16(csum, (old >> 16) as u16, (new >> 16) as u16);
    update16(c, old as u16, new as u16)
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Flags of bpf_l4_csum_replace.
pub const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
pub const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// The Internet checksum of `N` 16-bit words in memory order (the result is
/// in network order, ready to store).
#[inline(always)]
pub fn words<const N: usize>(w: &[u16; N]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += w[i] as u32;
        i += 1;
    }
    !fold(sum)
}

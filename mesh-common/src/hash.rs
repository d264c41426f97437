//! The stable hashes every node and both sides of the data plane agree on
//! (std's hashers may change between Rust releases).

/// SplitMix64's 64-bit finalizer: every input bit reaches every output bit.
#[inline(always)]
pub const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a (64-bit) over `bytes`.
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// [`fnv1a`] finished with [`mix64`]: names (services) to well-spread
/// stable numbers.
pub const fn name(bytes: &[u8]) -> u64 {
    mix64(fnv1a(bytes))
}

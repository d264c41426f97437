//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! The ring is computed here, in user space; the kernel does one array
//! lookup per new flow. Input order does not matter: backends are sorted by
//! identity and each backend's permutation comes from a hash of its
//! identity (never of a node-local id), so every node builds the same ring
//! for the same backend set.

use mesh_common::lb::{MAGLEV_MAX_RING, MAGLEV_SLOTS_PER_BACKEND};

/// Ring sizes: primes, each about four times the previous. Coarse on
/// purpose: a ring that changes size remaps most slots, so the size changes
/// only when the backend count crosses 10, 40 or 163 (conntrack still keeps
/// established flows on their backends then).
const PRIMES: [u32; 4] = [1021, 4093, 16_381, 65_521];

/// The ring size for `n` backends: the smallest listed prime with at least
/// [`MAGLEV_SLOTS_PER_BACKEND`] slots per backend, at most [`MAGLEV_MAX_RING`].
/// A function of the count alone, so every node agrees.
pub fn ring_size(n: usize) -> u32 {
    let want = (n as u64).saturating_mul(MAGLEV_SLOTS_PER_BACKEND as u64);
    PRIMES
        .iter()
        .copied()
        .filter(|&p| p <= MAGLEV_MAX_RING)
        .find(|&p| p as u64 >= want)
        .unwrap_or(MAGLEV_MAX_RING)
}

/// A backend's identity for hashing: the same on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
}

impl Identity {
    fn seed(&self) -> u64 {
        (u32::from(self.ip) as u64) << 16 | self.port as u64
    }
}

/// Builds the ring: `ring[slot]` is an index into `backends`, for
/// `ring_size(backends.len())` slots. Empty input gives an empty ring.
/// Duplicate identities are ignored after the first.
pub fn build(backends: &[Identity]) -> Vec<usize> {
    let (order, ring) = fill(backends);
    ring.into_iter().map(|k| order[k as usize]).collect()
}

/// The ring as positions in `order` (the backends' indices, sorted by
/// identity, duplicates dropped): `(order, ring)`.
fn fill(backends: &[Identity]) -> (Vec<usize>, Vec<u32>) {
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    order.dedup_by_key(|i| backends[*i]);
    if order.is_empty() {
        return (order, Vec::new());
    }
    let m = ring_size(order.len()) as u64;
    // Each backend's permutation: offset + j * skip (mod m), skip in 1..m.
    let perms: Vec<(u32, u32)> = order
        .iter()
        .map(|&i| {
            let seed = backends[i].seed();
            let offset = mix64(seed ^ 0x6d61_676c_6576_3031) % m;
            let skip = mix64(seed ^ 0x736b_6970_7365_6564) % (m - 1) + 1;
            (offset as u32, skip as u32)
        })
        .collect();
    // Each backend's next candidate slot, `(offset + j * skip) % m` for its
    // j-th turn, kept as a running position: a step is an add and a
    // compare, not a division (a ring of 65,521 slots takes some 700,000
    // steps; the divisions made a 200-backend ring cost 10 ms, now 1 ms).
    // The ring holds u32 positions, which become ids in place.
    let m = m as u32;
    let mut pos: Vec<u32> = perms.iter().map(|&(offset, _)| offset).collect();
    let step = |c: u32, skip: u32| {
        let c = c + skip;
        if c >= m { c - m } else { c }
    };
    let mut ring = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (k, &(_, skip)) in perms.iter().enumerate() {
            let mut c = pos[k];
            while ring[c as usize] != u32::MAX {
                c = step(c, skip);
            }
            ring[c as usize] = k as u32;
            pos[k] = step(c, skip);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    (order, ring)
}

/// The ring as the kernel stores it: a backend id per slot, for backends
/// given as `(id, identity)`.
pub fn build_ids(backends: &[(u32, Identity)]) -> Vec<u32> {
    let identities: Vec<Identity> = backends.iter().map(|(_, i)| *i).collect();
    let (order, mut ring) = fill(&identities);
    let ids: Vec<u32> = order.iter().map(|&i| backends[i].0).collect();
    for slot in &mut ring {
        *slot = ids[*slot as usize];
    }
    ring
}

use mesh_common::hash::mix64;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: usize) -> Vec<Identity> {
        (0..n)
            .map(|i| Identity {
                ip: Ipv4Addr::new(10, 42, (i / 250) as u8, (i % 250 + 2) as u8),
                port: 8080,
            })
            .collect()
    }

    fn identities(ring: &[usize], b: &[Identity]) -> Vec<Identity> {
        ring.iter().map(|&i| b[i]).collect()
    }

    #[test]
    fn sizes_are_prime_bounded_and_roomy() {
        for n in [1usize, 2, 3, 10, 100, 500, 655, 1000, 100_000] {
            let m = ring_size(n);
            assert!(
                (2..m)
                    .take_while(|d| d * d <= m)
                    .all(|d| !m.is_multiple_of(d)),
                "{m} is prime"
            );
            assert!(m <= MAGLEV_MAX_RING);
            if n * 100 <= MAGLEV_MAX_RING as usize {
                assert!(m as usize >= n * 100, "n={n}: {m} slots");
            }
        }
    }

    /// Maglev as the paper writes it: backend k's j-th preference is
    /// `(offset + j * skip) % m`.
    fn by_the_paper(b: &[Identity]) -> Vec<usize> {
        let m = ring_size(b.len()) as u64;
        let perms: Vec<(u64, u64)> = b
            .iter()
            .map(|i| {
                let seed = i.seed();
                (
                    mix64(seed ^ 0x6d61_676c_6576_3031) % m,
                    mix64(seed ^ 0x736b_6970_7365_6564) % (m - 1) + 1,
                )
            })
            .collect();
        let mut next = vec![0u64; b.len()];
        let mut ring = vec![usize::MAX; m as usize];
        let mut filled = 0;
        while filled < m {
            for (k, &(offset, skip)) in perms.iter().enumerate() {
                if filled == m {
                    break;
                }
                let mut c = (offset + next[k] * skip) % m;
                while ring[c as usize] != usize::MAX {
                    next[k] += 1;
                    c = (offset + next[k] * skip) % m;
                }
                ring[c as usize] = k;
                next[k] += 1;
                filled += 1;
            }
        }
        ring
    }

    #[test]
    fn running_positions_give_the_papers_table() {
        for n in [1, 3, 10, 200] {
            // backends() is sorted already, so indexes agree.
            let b = backends(n);
            assert_eq!(build(&b), by_the_paper(&b), "{n} backends");
        }
    }

    #[test]
    fn empty_and_single() {
        assert!(build(&[]).is_empty());
        let one = backends(1);
        assert!(build(&one).iter().all(|&i| i == 0));
    }

    #[test]
    fn every_slot_filled_and_even() {
        for n in [2usize, 3, 7, 10, 64] {
            let b = backends(n);
            let ring = build(&b);
            assert_eq!(ring.len(), ring_size(n) as usize);
            let mut counts = vec![0usize; n];
            for &i in &ring {
                counts[i] += 1;
            }
            let ideal = ring.len() as f64 / n as f64;
            let worst = counts
                .iter()
                .map(|&c| (c as f64 - ideal).abs() / ideal)
                .fold(0.0, f64::max);
            println!(
                "n={n:>3} M={:>6}: slots per backend {:?}, worst deviation {:.2}%",
                ring.len(),
                counts,
                worst * 100.0
            );
            // Maglev fills round-robin: no backend is more than one slot off.
            assert!(
                counts.iter().all(|&c| (c as f64 - ideal).abs() <= 1.0),
                "{counts:?}"
            );
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let b = backends(10);
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(identities(&build(&b), &b), identities(&build(&rev), &rev));
    }

    #[test]
    fn removing_one_backend_moves_few_slots() {
        for n in [2usize, 3, 5, 10, 20, 40, 100] {
            let b = backends(n);
            let before = identities(&build(&b), &b);
            for removed in [0, n / 2, n - 1] {
                let mut rest = b.clone();
                let gone = rest.remove(removed);
                let after = identities(&build(&rest), &rest);
                assert_eq!(
                    before.len(),
                    after.len(),
                    "n={n}: ring size must not change"
                );
                // Every slot whose backend changed: the removed backend's own
                // (unavoidable, ~1/N) plus any surviving backend's that moved.
                let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
                let collateral = before
                    .iter()
                    .zip(&after)
                    .filter(|(x, y)| **x != gone && x != y)
                    .count();
                let share = moved as f64 / before.len() as f64;
                let allowed = 1.0 / n as f64 + 0.05;
                println!(
                    "n={n:>3} remove #{removed:<2}: {:>5.2}% of slots moved ({:.2}% not the removed backend's); allowed 1/N+5% = {:.2}%",
                    share * 100.0,
                    collateral as f64 / before.len() as f64 * 100.0,
                    allowed * 100.0
                );
                assert!(share <= allowed, "n={n}: {share} > {allowed}");
            }
        }
    }
}

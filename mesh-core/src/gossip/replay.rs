//! Replay protection for sealed gossip, with no I/O.
//!
//! Every sealed datagram carries its sender's session (random, one per
//! agent start), a counter (one per datagram, never reused in a session)
//! and its send time. A receiver accepts a datagram only if its time is
//! within [`FRESH_MS`] of the receiver's clock and its counter was not seen
//! before in that session (a sliding window of [`WINDOW`] counters behind
//! the highest one, as IPsec does). A session silent for longer than the
//! freshness window is forgotten: anything replayed from it is stale by
//! its time anyway.

use std::collections::HashMap;

/// How far a sender's clock may be from the receiver's, in ms.
pub const FRESH_MS: u64 = 120_000;
/// Counters remembered behind the highest one seen in a session.
pub const WINDOW: u64 = 128;
/// Sessions remembered at once (several per node: one per agent start).
pub const MAX_SESSIONS: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fresh,
    /// Seen before in its session (or too far behind to tell).
    Replayed,
    /// Its time is outside the freshness window.
    Stale,
    /// Too many live sessions to remember another one.
    Full,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    top: u64,
    /// Bit i: counter `top - i` was seen.
    seen: u128,
    last_ms: u64,
}

/// Sessions seen recently, each with its counter window.
#[derive(Debug, Default)]
pub struct Replay {
    sessions: HashMap<u64, Window>,
}

impl Replay {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Checks one datagram and remembers it when fresh.
    pub fn check(&mut self, session: u64, counter: u64, sent_ms: u64, now_ms: u64) -> Verdict {
        if sent_ms.abs_diff(now_ms) > FRESH_MS {
            return Verdict::Stale;
        }
        if !self.sessions.contains_key(&session) && self.sessions.len() >= MAX_SESSIONS {
            self.sessions
                .retain(|_, w| now_ms.saturating_sub(w.last_ms) <= FRESH_MS);
            if self.sessions.len() >= MAX_SESSIONS {
                return Verdict::Full;
            }
        }
        let w = self.sessions.entry(session).or_insert(Window {
            top: counter,
            seen: 0,
            last_ms: now_ms,
        });
        if counter > w.top {
            let shift = counter - w.top;
            w.seen = if shift >= WINDOW { 0 } else { w.seen << shift };
            w.top = counter;
        }
        let behind = w.top - counter;
        if behind >= WINDOW {
            return Verdict::Replayed;
        }
        let bit = 1u128 << behind;
        if w.seen & bit != 0 {
            return Verdict::Replayed;
        }
        w.seen |= bit;
        w.last_ms = now_ms;
        Verdict::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_accepted_once() {
        let mut r = Replay::default();
        let now = 1_000_000;
        assert_eq!(r.check(1, 5, now, now), Verdict::Fresh);
        assert_eq!(r.check(1, 5, now, now), Verdict::Replayed);
        // Out of order within the window: fine once.
        assert_eq!(r.check(1, 3, now, now), Verdict::Fresh);
        assert_eq!(r.check(1, 3, now, now), Verdict::Replayed);
        assert_eq!(r.check(1, 200, now, now), Verdict::Fresh);
        // Too far behind the newest to tell: refused.
        assert_eq!(r.check(1, 4, now, now), Verdict::Replayed);
        assert_eq!(r.check(1, 73, now, now), Verdict::Fresh);
        // Another session has its own counters.
        assert_eq!(r.check(2, 5, now, now), Verdict::Fresh);
        // A jump past the window forgets the old bits but not the top.
        assert_eq!(r.check(1, 10_000, now, now), Verdict::Fresh);
        assert_eq!(r.check(1, 10_000, now, now), Verdict::Replayed);
    }

    #[test]
    fn old_or_future_datagrams_are_stale() {
        let mut r = Replay::default();
        let now = 10_000_000;
        assert_eq!(r.check(1, 1, now - FRESH_MS - 1, now), Verdict::Stale);
        assert_eq!(r.check(1, 1, now + FRESH_MS + 1, now), Verdict::Stale);
        assert_eq!(r.check(1, 1, now - FRESH_MS, now), Verdict::Fresh);
        assert!(r.len() == 1);
    }

    #[test]
    fn sessions_are_bounded_and_forgotten_when_silent() {
        let mut r = Replay::default();
        let now = 10_000_000;
        for s in 0..MAX_SESSIONS as u64 {
            assert_eq!(r.check(s, 1, now, now), Verdict::Fresh);
        }
        assert_eq!(r.check(u64::MAX, 1, now, now), Verdict::Full);
        // Known sessions still pass.
        assert_eq!(r.check(7, 2, now, now), Verdict::Fresh);
        // Once the others have been silent past the freshness window,
        // a new session gets room.
        let later = now + FRESH_MS + 1;
        assert_eq!(r.check(u64::MAX, 1, later, later), Verdict::Fresh);
        assert_eq!(r.len(), 1);
    }
}

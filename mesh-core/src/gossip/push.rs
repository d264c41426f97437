//! News pushed, not only waited for: a node that learns a new key value
//! (its own or a peer's) starts a gossip exchange at once with a few live
//! peers picked at random, instead of waiting for its next round.
//!
//! chitchat spreads a change in rounds: every gossip interval each node
//! exchanges digests and deltas with 3 others. A change reaches N nodes in
//! about log(N) rounds plus a tail; at 200 nodes and a 437 ms interval
//! that was 2.1 s (measured, `cargo xtask bench cluster`). A push is an
//! ordinary exchange (SYN, SYN-ACK, ACK: the peer gets what it lacks in
//! the ACK), begun when there is news: each peer that learns something
//! from it pushes in turn, so a change travels in exchanges (milliseconds)
//! rather than rounds. It stops by itself: a node that learns nothing new
//! pushes nothing. Each node pushes at most once per [`GAP`] fraction of
//! the interval, news arriving meanwhile going with the next push.
//!
//! What is pushed is what chitchat's listeners see: key values set (by this
//! node, or applied from a peer's delta). Deletions travel in rounds, and
//! heartbeats are in every digest already.

use std::{
    net::SocketAddr,
    sync::{Arc, Weak},
    time::Duration,
};

use chitchat::ChitchatHandle;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::Notify;

use super::transport::GossipStats;

/// Peers told at once.
pub const FANOUT: usize = 2;
/// At most one push per this fraction of the gossip interval.
const GAP: u32 = 8;

/// Starts pushing news for `handle` (every gossip interval `interval`),
/// counting each exchange begun in `stats.pushed`. Ends once the handle is
/// dropped.
pub async fn start(handle: &Arc<ChitchatHandle>, interval: Duration, stats: Arc<GossipStats>) {
    let news = Arc::new(Notify::new());
    let listener = {
        let news = news.clone();
        handle
            .chitchat()
            .lock()
            .await
            .subscribe_event("", move |ev| {
                if !super::peers::spreads_slowly(ev.key) {
                    news.notify_one();
                }
            })
    };
    let weak = Arc::downgrade(handle);
    tokio::spawn(async move {
        // Kept for as long as the task runs: dropping it unsubscribes.
        let _listener = listener;
        // Seeded from the OS; Send, unlike the thread's generator.
        let mut rng = StdRng::from_rng(&mut rand::rng());
        loop {
            tokio::select! {
                () = news.notified() => {}
                // Nothing new for a while: stop if the node is gone.
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    if weak.strong_count() == 0 {
                        break;
                    }
                    continue;
                }
            }
            if !push(&weak, &mut rng, &stats).await {
                break;
            }
            tokio::time::sleep(interval / GAP).await;
        }
    });
}

/// One push: a gossip exchange with [`FANOUT`] random live peers. `false`
/// once the node is gone.
async fn push(weak: &Weak<ChitchatHandle>, rng: &mut impl rand::Rng, stats: &GossipStats) -> bool {
    let Some(handle) = weak.upgrade() else {
        return false;
    };
    let peers: Vec<SocketAddr> = {
        let chitchat = handle.chitchat();
        let guard = chitchat.lock().await;
        let me = guard.self_chitchat_id();
        guard
            .live_nodes()
            .filter(|id| *id != me)
            .map(|id| id.gossip_advertise_addr)
            .collect()
    };
    for addr in pick(peers, FANOUT, rng) {
        // Fails only when gossip has stopped.
        if handle.gossip(addr).is_err() {
            return false;
        }
        stats
            .pushed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    true
}

/// `k` of `peers`, picked at random, each once (all of them if fewer).
fn pick(mut peers: Vec<SocketAddr>, k: usize, rng: &mut impl rand::Rng) -> Vec<SocketAddr> {
    let (chosen, _) = peers.partial_shuffle(rng, k);
    chosen.to_vec()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn peers(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], i)))
            .collect()
    }

    #[test]
    fn picks_distinct_peers_and_all_of_them_over_time() {
        let mut rng = rand::rng();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = pick(peers(10), 2, &mut rng);
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            seen.extend(p);
        }
        assert_eq!(seen.len(), 10, "every peer gets picked");
        assert_eq!(pick(peers(1), 2, &mut rng), peers(1));
        assert!(pick(Vec::new(), 2, &mut rng).is_empty());
    }
}

//! Cluster membership by gossip (chitchat: versioned per-node key-values,
//! phi-accrual failure detection), sealed with the cluster key.

pub mod authority;
pub mod membership;
pub mod peers;
pub mod push;
pub mod replay;
pub mod subnet;
pub mod transport;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use transport::{GossipStats, Keys, KnownPeers, Sealed};

/// How this node gossips.
#[derive(Clone)]
pub struct GossipConfig {
    /// Unique across the cluster (default: the host name).
    pub node_id: String,
    pub listen: SocketAddr,
    /// The address peers use to reach this node.
    pub advertise: SocketAddr,
    /// `HOST:PORT` of nodes to join through.
    pub seeds: Vec<String>,
    /// The keyring, shared: replacing it takes effect at the next datagram.
    pub key: Keys,
    pub cluster_id: String,
    pub interval: Duration,
    /// At most how long a silent node stays in the live set. chitchat's
    /// failure detector declares a node dead when the time since its last
    /// heartbeat exceeds the phi threshold (8) times the mean interval
    /// between its heartbeats (measured: about 8 gossip intervals), so the
    /// gossip interval is derived from this.
    pub dead_after: Duration,
}

impl GossipConfig {
    /// Gossip interval for a wanted detection time (see `dead_after`):
    /// detection lands at about 70% of it, leaving room for jitter (in
    /// small clusters sooner: about 1.5 s of 5 at 3 nodes). A restart does
    /// not race it: the stopping agent says so (`peers.rs`).
    pub fn interval_for(dead_after: Duration) -> Duration {
        dead_after
            .mul_f64(0.7 / 8.0)
            .clamp(Duration::from_millis(50), Duration::from_secs(2))
    }
}

/// Starts gossiping with `kvs` as this node's first key-values, pushing
/// news as it comes (`push.rs`). The generation id is the start time, so
/// a restarted agent is a new generation of the same node: peers keep the
/// old one's endpoints while it is live, and after it if it said it was
/// stopping, until the new one is `ready` (`peers.rs`).
pub async fn start(
    cfg: GossipConfig,
    kvs: Vec<(String, String)>,
    stats: Arc<GossipStats>,
) -> anyhow::Result<Arc<ChitchatHandle>> {
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(cfg.node_id.clone(), generation, cfg.advertise),
        cluster_id: cfg.cluster_id.clone(),
        gossip_interval: cfg.interval,
        listen_addr: cfg.listen,
        seed_nodes: cfg.seeds.clone(),
        failure_detector_config: FailureDetectorConfig::new(
            8.0,
            1_000,
            cfg.dead_after.max(Duration::from_secs(1)) * 2,
            cfg.interval,
            Duration::from_secs(60),
        ),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let known = Arc::new(KnownPeers::default());
    let mut seeds = seed_ips(&cfg.seeds).await;
    known.replace(seeds.clone());
    let transport = Sealed {
        keys: cfg.key,
        stats: stats.clone(),
        known: known.clone(),
    };
    let handle = Arc::new(spawn_chitchat(config, kvs, &transport).await?);
    push::start(&handle, cfg.interval, stats).await;
    // Replies carry state only to the cluster's nodes (every node of the
    // cluster state, dead ones included) and the seeds.
    let state = Arc::downgrade(&handle.chitchat());
    let interval = cfg.interval;
    let seed_names = cfg.seeds;
    tokio::spawn(async move {
        let mut resolved = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            if resolved.elapsed() >= Duration::from_secs(30) {
                seeds = seed_ips(&seed_names).await;
                resolved = Instant::now();
            }
            let Some(chitchat) = state.upgrade() else {
                break;
            };
            let mut ips: HashSet<IpAddr> = {
                let guard = chitchat.lock().await;
                guard
                    .node_states()
                    .keys()
                    .map(|id| id.gossip_advertise_addr.ip())
                    .collect()
            };
            drop(chitchat);
            ips.extend(seeds.iter().copied());
            known.replace(ips);
        }
    });
    Ok(handle)
}

/// Stops gossiping: cleanly when this is the last owner of the handle
/// (the push task holds none for long), else by aborting the gossip task.
pub async fn stop(handle: Arc<ChitchatHandle>) -> anyhow::Result<()> {
    match Arc::try_unwrap(handle) {
        Ok(h) => h.shutdown().await,
        Err(h) => {
            h.abort();
            Ok(())
        }
    }
}

/// The addresses of the seeds (`HOST:PORT`), resolving names (bounded in
/// time: a seed that does not resolve is left out until the next try).
async fn seed_ips(seeds: &[String]) -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    for s in seeds {
        if let Ok(a) = s.parse::<SocketAddr>() {
            out.insert(a.ip());
            continue;
        }
        if let Ok(Ok(addrs)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(s.as_str())).await
        {
            out.extend(addrs.map(|a| a.ip()));
        }
    }
    out
}

//! Gossip between agents with a real chitchat cluster on the loopback of a
//! namespace this test creates (needs root): sealed with the cluster key,
//! a wrong key never joins, garbage is dropped and counted, a silent node
//! leaves the live set within the configured time.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chitchat::ChitchatHandle;
use mesh_agent::gossip::{
    GossipConfig, start,
    transport::{ClusterKey, GossipStats},
};
use mesh_tests::netns::{Netns, unique};

const DEAD_AFTER: Duration = Duration::from_secs(3);

fn config(n: u16, key: [u8; 32]) -> GossipConfig {
    let addr: SocketAddr = format!("127.0.0.1:{}", 7000 + n).parse().expect("addr");
    GossipConfig {
        node_id: format!("node{n}"),
        listen: addr,
        advertise: addr,
        seeds: vec!["127.0.0.1:7001".into()],
        key: ClusterKey::from_bytes(key),
        cluster_id: "test".into(),
        interval: GossipConfig::interval_for(DEAD_AFTER),
        dead_after: DEAD_AFTER,
    }
}

async fn live(h: &ChitchatHandle) -> Vec<String> {
    h.with_chitchat(|c| {
        let mut v: Vec<String> = c.live_nodes().map(|id| id.node_id.to_string()).collect();
        v.sort();
        v
    })
    .await
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[test]
fn sealed_gossip_membership_and_failure_detection() {
    let ns = Netns::new(&unique("mgs"));
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let key = [7u8; 32];
            let stats: Vec<Arc<GossipStats>> = (0..4).map(|_| Arc::default()).collect();
            let mut nodes = Vec::new();
            for n in 1..=3u16 {
                let kvs = vec![("underlay".to_string(), format!("192.168.50.{n}"))];
                nodes.push(
                    start(config(n, key), kvs, stats[n as usize - 1].clone())
                        .await
                        .expect("gossip starts"),
                );
            }
            let intruder = start(config(4, [9u8; 32]), vec![], stats[3].clone())
                .await
                .expect("starts");
            let all = ["node1", "node2", "node3"];
            let t = wait_for(
                "three nodes see each other",
                Duration::from_secs(10),
                async || {
                    for h in &nodes {
                        if live(h).await != all {
                            return false;
                        }
                    }
                    true
                },
            )
            .await;
            println!("3 nodes converged in {t:?}");
            // Every node sees every other node's key-values.
            let seen = nodes[2]
                .with_chitchat(|c| {
                    c.node_states()
                        .values()
                        .filter_map(|s| s.get("underlay").map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .await;
            assert_eq!(seen.len(), 3, "{seen:?}");

            // The wrong key never joins; its datagrams are counted.
            assert_eq!(
                live(&intruder).await,
                ["node4"],
                "the intruder learns nothing"
            );
            assert!(!live(&nodes[0]).await.contains(&"node4".to_string()));
            let rejected = stats[0].bad_auth.load(Ordering::Relaxed);
            println!("node1 rejected {rejected} datagrams sealed with the wrong key");
            assert!(rejected > 0);

            // Garbage at the gossip port: counted, harmless.
            let junk = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind");
            for i in 0..50u8 {
                let payload: Vec<u8> = (0..(i as usize * 13))
                    .map(|j| (j as u8).wrapping_mul(i))
                    .collect();
                let _ = junk.send_to(&payload, "127.0.0.1:7001").await;
            }
            let mut magic = b"MSH1".to_vec();
            magic.extend_from_slice(&[0u8; 40]);
            let _ = junk.send_to(&magic, "127.0.0.1:7001").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let garbage = stats[0].garbage.load(Ordering::Relaxed)
                + stats[0].bad_auth.load(Ordering::Relaxed)
                - rejected;
            println!("node1 counted {garbage} garbage datagrams");
            assert!(garbage >= 50);
            assert_eq!(live(&nodes[0]).await, all, "still a cluster");

            // node3 stops: the others drop it within the configured time.
            let gone = nodes.pop().expect("node3");
            gone.shutdown().await.expect("shutdown");
            let t = wait_for("node3 leaves the live set", DEAD_AFTER * 3, async || {
                live(&nodes[0]).await == ["node1", "node2"]
                    && live(&nodes[1]).await == ["node1", "node2"]
            })
            .await;
            println!(
                "a silent node left the live set after {t:?} (configured about {DEAD_AFTER:?})"
            );
            assert!(t <= Duration::from_secs(5), "within 5 s");
        });
    });
}

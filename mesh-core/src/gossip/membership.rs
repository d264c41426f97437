//! Cluster membership as the daemon sees it: the live peers (decoded),
//! this node's own keys, and a signal when something changed. Behind a
//! trait, so the daemon and the subnet claim do not drive chitchat
//! directly (and a test can stand in for it).

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

use chitchat::{ChitchatHandle, ChitchatId, NodeState};
use tokio::sync::watch;

use super::peers::{self, Peer};

/// What a node knows of its cluster.
pub trait Membership: Send {
    /// The live peers (this node left out), decoded.
    fn peers(&self) -> BTreeMap<String, Peer>;
    /// Sets one of this node's keys now if the gossip state is free;
    /// `false` when it is busy (try again on the next tick).
    fn try_set(&self, key: &str, value: &str) -> bool {
        self.try_update(&[(key.to_owned(), value.to_owned())], &[])
    }
    /// Sets and deletes some of this node's keys at once if the gossip
    /// state is free; `false` when it is busy.
    fn try_update(&self, set: &[(String, String)], delete: &[String]) -> bool;
    /// Sets one of this node's keys, waiting for the gossip state.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
    /// Resolves when the live set or a peer's keys changed, or a peer's
    /// hold for its restart ended; `false` once membership has stopped
    /// (the gossip server ended).
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// chitchat, sealed with the cluster key ([`super::start`]).
pub struct Chitchat {
    pub node_id: String,
    pub handle: Arc<ChitchatHandle>,
    live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    /// Decodes only the generations whose keys changed since the last
    /// pass.
    decoder: std::sync::Mutex<peers::Decoder>,
}

impl Chitchat {
    pub async fn new(node_id: String, handle: Arc<ChitchatHandle>) -> Self {
        let live = handle.chitchat().lock().await.live_nodes_watcher();
        Chitchat {
            node_id,
            handle,
            live,
            decoder: Default::default(),
        }
    }
}

impl Membership for Chitchat {
    fn peers(&self) -> BTreeMap<String, Peer> {
        self.decoder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peers(&self.node_id, &self.live.borrow())
    }

    fn try_update(&self, set: &[(String, String)], delete: &[String]) -> bool {
        let chitchat = self.handle.chitchat();
        let Ok(mut g) = chitchat.try_lock() else {
            return false;
        };
        let me = g.self_node_state();
        for (k, v) in set {
            me.set(k, v);
        }
        for k in delete {
            me.delete(k);
        }
        true
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.handle
                .with_chitchat(|c| c.self_node_state().set(key, value))
                .await;
        })
    }

    fn changed(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        // The live set's sender lives as long as chitchat's state, which
        // outlives a server that stopped (a broken socket, a panic): watch
        // the server too, or a node whose gossip died would go on with
        // the last view while its peers count it dead.
        let ended = self.handle.termination_watcher();
        // A generation held for its restart lets go at a set time.
        let expiry = self
            .decoder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_expiry();
        Box::pin(async move {
            tokio::select! {
                r = self.live.changed() => r.is_ok(),
                _ = ended => false,
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(std::time::Instant::now).into()), if expiry.is_some() => true,
            }
        })
    }
}

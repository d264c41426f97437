//! The encrypted tunnel's share of the daemon (`--encrypt`,
//! `crate::wireguard`): the device's program, its peers kept equal to the
//! cluster's nodes, and key renewal.

use std::{collections::BTreeMap, net::SocketAddrV4};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    gossip::peers::{self, Peer},
    requests::Request,
    wireguard::{self, PrivateKey},
};

impl Daemon {
    /// A request from the control socket.
    pub(super) async fn on_request(&mut self, r: Request) {
        match r {
            Request::Network(r) => self.on_network_request(r),
            Request::RenewKey { reply } => {
                let _ = reply.send(self.renew_wg_key().await);
            }
            Request::Check { reply } => {
                let r = self.start_check_round().ok_or_else(|| {
                    "no check round: this node is not in a cluster, or gossip is busy (try again)"
                        .to_string()
                });
                if let Ok(round) = &r {
                    self.shared
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .check
                        .round
                        .clone_from(round);
                }
                let _ = reply.send(r);
            }
        }
    }

    /// Attaches the decapsulating program to the WireGuard device, if the
    /// cluster encrypts. Without it nothing decrypted reaches a container:
    /// an error stops the agent.
    pub(super) fn attach_wg(&mut self) -> anyhow::Result<()> {
        let Some(ifindex) = self
            .cluster
            .as_ref()
            .and_then(|c| c.wg.as_ref())
            .map(|w| w.device.ifindex)
        else {
            return Ok(());
        };
        self.attachments.ensure_wg(&mut self.ebpf, ifindex)?;
        Ok(())
    }

    /// Makes the device's peers the nodes of `peers` (each with its key,
    /// underlay address and port); only what changed is written. A failure
    /// is returned for the pass's retry.
    pub(super) fn sync_wg_peers(&mut self, peers: &BTreeMap<String, Peer>) -> Option<String> {
        let w = self.cluster.as_ref()?.wg.as_ref()?;
        let want: BTreeMap<wireguard::PublicKey, wireguard::Peer> = peers
            .values()
            .filter_map(|p| {
                let (ip, wg) = (p.underlay?, p.wg?);
                let endpoint = SocketAddrV4::new(ip, wg.port);
                Some((wg.key, wireguard::Peer { endpoint }))
            })
            .collect();
        if self.written.wg.as_ref() == Some(&want) {
            return None;
        }
        match w.device.sync(&want) {
            Ok(c) => {
                if c != wireguard::Changes::default() {
                    info!(
                        added = c.added,
                        updated = c.updated,
                        removed = c.removed,
                        peers = want.len(),
                        "WireGuard peers"
                    );
                }
                self.written.wg = Some(want);
                None
            }
            Err(e) => Some(format!("WireGuard peers: {e}")),
        }
    }

    /// `meshctl key renew`: a new key pair, kept, given to the device and
    /// published. Sessions with the old key end; each peer makes a new one
    /// as soon as gossip brings it the new public key (within a gossip
    /// round), and TCP resends what fell in between. The new public key.
    pub(super) async fn renew_wg_key(&mut self) -> Result<String, String> {
        let Some(c) = &mut self.cluster else {
            return Err("no cluster".into());
        };
        let Some(w) = &mut c.wg else {
            return Err(
                "this cluster does not encrypt (--encrypt): there is no key to renew".into(),
            );
        };
        let key = PrivateKey::generate().map_err(|e| format!("a new key: {e}"))?;
        // Kept before it is used: a crash must not leave the device with a
        // key no file holds.
        key.save(&w.key_file)
            .map_err(|e| format!("keeping the new key in {}: {e}", w.key_file.display()))?;
        let public = w.device.set_key(&key).map_err(|e| e.to_string())?;
        w.public = peers::WgKey {
            key: public,
            port: w.public.port,
        };
        let encoded = w.public.encode();
        let shown = w.public.key_base64();
        c.membership.set(peers::KEY_WG, &encoded).await;
        info!(public_key = %shown, "WireGuard key renewed");
        self.report_encryption();
        Ok(shown)
    }

    /// The encryption line of `meshctl status`.
    pub(super) fn report_encryption(&self) {
        let line = match self.cluster.as_ref().and_then(|c| c.wg.as_ref()) {
            Some(w) => format!(
                "WireGuard on {} (port {}), public key {}",
                wireguard::NAME,
                w.public.port,
                w.public.key_base64()
            ),
            None => "off (the tunnel between nodes is plain VXLAN)".into(),
        };
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if sh.status.node.encryption != line {
            if !sh.status.node.encryption.is_empty() {
                warn!(encryption = %line, "encryption changed");
            }
            sh.status.node.encryption = line;
        }
    }
}

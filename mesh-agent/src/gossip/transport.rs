//! Gossip over UDP, every datagram authenticated and encrypted with the
//! cluster key (ChaCha20-Poly1305): `MAGIC | nonce (12) | ciphertext+tag`.
//!
//! A datagram that is too short, has no magic, does not authenticate (the
//! wrong key, or garbage) or does not decode is dropped and counted; the
//! receive loop never stops for it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use chitchat::{
    ChitchatMessage, Deserializable, Serializable,
    transport::{Socket, Transport},
};
use tracing::debug;

const MAGIC: &[u8; 4] = b"MSH1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bound to the key: a message for another purpose never authenticates.
const AAD: &[u8] = b"mesh gossip v1";
/// Largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65_507;

/// A 32-byte cluster key.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// From a key file: 32 raw bytes, or 64 hex digits (whitespace around
    /// them ignored).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() == 32 {
            let mut k = [0u8; 32];
            k.copy_from_slice(bytes);
            return Ok(ClusterKey(k));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the key is neither 32 bytes nor 64 hex digits".to_string())?;
        let hex = text.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "the key is neither 32 bytes nor 64 hex digits ({} bytes)",
                bytes.len()
            ));
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ClusterKey(k))
    }

    pub fn from_bytes(k: [u8; 32]) -> Self {
        ClusterKey(k)
    }
}

/// Gossip datagrams dropped, by reason (for /metrics and tests).
#[derive(Debug, Default)]
pub struct GossipStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Shorter than a header, or no magic.
    pub garbage: AtomicU64,
    /// Did not authenticate: the wrong cluster key, or tampered.
    pub bad_auth: AtomicU64,
    /// Authenticated but not a gossip message.
    pub undecodable: AtomicU64,
    /// Too large to send once sealed.
    pub oversize: AtomicU64,
}

/// A chitchat transport that seals every datagram with the cluster key.
pub struct Sealed {
    pub key: ClusterKey,
    pub stats: Arc<GossipStats>,
}

#[async_trait::async_trait]
impl Transport for Sealed {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}/udp for gossip"))?;
        let cipher = ChaCha20Poly1305::new_from_slice(&self.key.0)
            .map_err(|e| anyhow::anyhow!("cluster key: {e}"))?;
        Ok(Box::new(SealedSocket {
            socket,
            cipher,
            stats: self.stats.clone(),
            buf: vec![0u8; MAX_DATAGRAM],
        }))
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    cipher: ChaCha20Poly1305,
    stats: Arc<GossipStats>,
    buf: Vec<u8>,
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    // SAFETY: getrandom writes at most `len` bytes into our buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), NONCE_LEN, 0) };
    if got != NONCE_LEN as isize {
        // Never reuse a nonce silently: mix the clock in as a last resort.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        n.copy_from_slice(&t.to_le_bytes()[..NONCE_LEN]);
    }
    n
}

#[async_trait::async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let mut plain = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut plain);
        let nonce = random_nonce();
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing a gossip message"))?;
        if MAGIC.len() + NONCE_LEN + sealed.len() > MAX_DATAGRAM {
            self.stats.oversize.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut datagram = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        datagram.extend_from_slice(MAGIC);
        datagram.extend_from_slice(&nonce);
        datagram.extend_from_slice(&sealed);
        // A send failure is transient (a peer gone, no route yet).
        if self.socket.send_to(&datagram, to).await.is_ok() {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "gossip recv");
                    continue;
                }
            };
            match open(&self.cipher, &self.buf[..len]) {
                Ok(msg) => {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    return Ok((from, msg));
                }
                Err(reason) => {
                    let counter = match reason {
                        Reject::Garbage => &self.stats.garbage,
                        Reject::Auth => &self.stats.bad_auth,
                        Reject::Decode => &self.stats.undecodable,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    debug!(%from, len, ?reason, "gossip datagram dropped");
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Garbage,
    Auth,
    Decode,
}

fn open(cipher: &ChaCha20Poly1305, datagram: &[u8]) -> Result<ChitchatMessage, Reject> {
    if datagram.len() < MAGIC.len() + NONCE_LEN + TAG_LEN || &datagram[..MAGIC.len()] != MAGIC {
        return Err(Reject::Garbage);
    }
    let (nonce, sealed) = datagram[MAGIC.len()..].split_at(NONCE_LEN);
    let plain = cipher
        .decrypt(
            <&Nonce>::try_from(nonce).map_err(|_| Reject::Garbage)?,
            Payload {
                msg: sealed,
                aad: AAD,
            },
        )
        .map_err(|_| Reject::Auth)?;
    let mut slice = plain.as_slice();
    ChitchatMessage::deserialize(&mut slice).map_err(|_| Reject::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_files() {
        assert!(ClusterKey::from_file_bytes(&[7u8; 32]).is_ok());
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert_eq!(
            ClusterKey::from_file_bytes(hex.as_bytes()).expect("hex").0[1],
            0x11
        );
        for bad in [
            &b"short"[..],
            &[0u8; 31],
            b"zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ] {
            assert!(ClusterKey::from_file_bytes(bad).is_err());
        }
    }

    #[test]
    fn datagrams_that_do_not_open_are_classified() {
        let c = ChaCha20Poly1305::new_from_slice(&[1u8; 32]).expect("key");
        let other = ChaCha20Poly1305::new_from_slice(&[2u8; 32]).expect("key");
        let msg = ChitchatMessage::BadCluster;
        let mut plain = Vec::new();
        msg.serialize(&mut plain);
        let nonce = random_nonce();
        let sealed = c
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: AAD,
                },
            )
            .expect("seal");
        let datagram = [&MAGIC[..], &nonce, &sealed].concat();
        assert!(matches!(
            open(&c, &datagram),
            Ok(ChitchatMessage::BadCluster)
        ));
        assert_eq!(
            open(&other, &datagram).err(),
            Some(Reject::Auth),
            "wrong key"
        );
        let mut flipped = datagram.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(open(&c, &flipped).err(), Some(Reject::Auth), "tampered");
        assert_eq!(open(&c, b"MSH1short").err(), Some(Reject::Garbage));
        assert_eq!(open(&c, &[0u8; 100]).err(), Some(Reject::Garbage));
        let junk = c
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: b"\xffjunk",
                    aad: AAD,
                },
            )
            .expect("seal");
        assert_eq!(
            open(&c, &[&MAGIC[..], &nonce, &junk].concat()).err(),
            Some(Reject::Decode)
        );
    }
}

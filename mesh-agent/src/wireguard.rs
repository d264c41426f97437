//! The encrypted tunnel (`--encrypt`): kernel WireGuard between the nodes.
//!
//! Every node has one WireGuard device, [`NAME`], with its own X25519 key
//! pair and one peer per other node: its public key (from gossip, where
//! each node speaks for its own key only), its underlay address and
//! WireGuard port as the endpoint, and that underlay address as its only
//! allowed IP. The data plane encapsulates as ever (VXLAN, the network's
//! VNI) and hands the frame to this device instead of the NIC; the kernel
//! seals it for the peer whose allowed IP is the outer destination. What
//! the device decrypts carries the sending node's underlay address as its
//! source (WireGuard drops anything else from that peer) and goes to the
//! device's TC program, which decapsulates it.
//!
//! The private key is made here from the OS's random source and never
//! leaves the host: a file under the state directory, mode 0600. The
//! public key is the kernel's (it derives it when the private key is set),
//! so the agent holds no Curve25519 code.
//!
//! Set up over rtnetlink and generic netlink with rust-netlink's message
//! crates (`netlink-packet-wireguard`), idempotently: a restarted agent
//! finds the device with its peers and keeps them, so the tunnel's
//! sessions survive a restart.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};

use crate::netlink::{self, Netlink};

/// The device's name.
pub const NAME: &str = "mesh-wg";
/// The private key's file in the state directory.
pub const KEY_FILE: &str = "wg.key";
/// Peers per SET_DEVICE message (each about 100 bytes).
const PEERS_PER_MESSAGE: usize = 64;

/// A Curve25519 public key.
pub type PublicKey = [u8; 32];

/// A private key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(
        "this kernel has no WireGuard: --encrypt needs Linux 5.6 or later built with WireGuard \
         (CONFIG_WIREGUARD; Debian's kernels have the wireguard module)"
    )]
    NoKernelSupport,
    #[error("an interface named {NAME} exists and is not a WireGuard device: rename or remove it")]
    NotOurs,
    #[error("{what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the WireGuard key file {path}: {why}")]
    KeyFile { path: String, why: String },
    #[error("the kernel did not report {NAME}'s {0}")]
    Missing(&'static str),
}

fn netlink_err(what: &'static str) -> impl FnOnce(io::Error) -> WgError {
    move |source| WgError::Netlink { what, source }
}

/// A public key as WireGuard's tools write it (base64).
pub fn encode_key(k: &PublicKey) -> String {
    BASE64.encode(k)
}

/// A base64 key (`None`: not 32 bytes of base64).
pub fn decode_key(s: &str) -> Option<PublicKey> {
    BASE64.decode(s.trim()).ok()?.try_into().ok()
}

impl PrivateKey {
    /// A new key from the OS's random source (the kernel clamps it).
    pub fn generate() -> io::Result<PrivateKey> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PrivateKey(k))
    }

    /// The key kept in `path`, or a new one written there (mode 0600) when
    /// there is none. A file readable by others is refused: the key would
    /// have leaked.
    pub fn load_or_make(path: &Path) -> Result<PrivateKey, WgError> {
        let bad = |why: String| WgError::KeyFile {
            path: path.display().to_string(),
            why,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| bad(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(bad(format!(
                        "mode {:o} lets others read it; it must be 0600",
                        mode & 0o777
                    )));
                }
                let k = BASE64
                    .decode(text.trim())
                    .ok()
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
                    .ok_or_else(|| bad("not a base64 key of 32 bytes".into()))?;
                Ok(PrivateKey(k))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let k = PrivateKey::generate().map_err(|e| bad(e.to_string()))?;
                k.save(path).map_err(|e| bad(e.to_string()))?;
                Ok(k)
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// Writes the key to `path` (mode 0600), replacing what was there in
    /// one step: a crash leaves the old key or the new one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{}", BASE64.encode(self.0))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// A peer as the device should have it: the node's underlay address and
/// WireGuard port (the endpoint; the address is its one allowed IP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub endpoint: SocketAddrV4,
}

/// What [`Device::sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

/// The WireGuard device of this node.
pub struct Device {
    genl: Netlink,
    family: u16,
    pub ifindex: u32,
    pub port: u16,
}

impl Device {
    /// Makes sure [`NAME`] exists, is up with MTU `mtu`, listens on `port`
    /// and holds `key`; gives it with its public key.
    pub fn ensure(mtu: u32, port: u16, key: &PrivateKey) -> Result<(Device, PublicKey), WgError> {
        let rt = Netlink::open(NETLINK_ROUTE).map_err(netlink_err("opening rtnetlink"))?;
        if crate::iface::index(NAME).is_err() {
            match rt.request(&new_link(mtu)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(WgError::NoKernelSupport);
                }
                Err(e) => return Err(netlink_err("creating the WireGuard device")(e)),
            }
        }
        rt.request(&set_link(mtu))
            .map_err(netlink_err("setting the WireGuard device up"))?;
        if let Err(e) = crate::vxlandev::gro_off(NAME) {
            // Merged packets are then decapsulated in place by its program.
            tracing::warn!(iface = NAME, error = %e, "could not turn GRO off on the WireGuard device");
        }
        let ifindex = crate::iface::index(NAME).map_err(|e| WgError::Netlink {
            what: "finding the WireGuard device",
            source: io::Error::other(e.to_string()),
        })?;
        let genl =
            Netlink::open(NETLINK_GENERIC).map_err(netlink_err("opening generic netlink"))?;
        let family = family_id(&genl)?;
        let dev = Device {
            genl,
            family,
            ifindex,
            port,
        };
        let public = dev.set_key(key)?;
        Ok((dev, public))
    }

    /// Gives the device `key` (and the port); returns its public key.
    /// Sessions made with the old key end: peers make new ones with the
    /// new public key once gossip brings it.
    pub fn set_key(&self, key: &PrivateKey) -> Result<PublicKey, WgError> {
        let attrs = vec![
            WireguardAttribute::IfIndex(self.ifindex),
            WireguardAttribute::PrivateKey(key.0),
            WireguardAttribute::ListenPort(self.port),
        ];
        self.set(attrs).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => WgError::NotOurs,
            _ => netlink_err("setting the WireGuard key")(e),
        })?;
        self.get()?.0.ok_or(WgError::Missing("public key"))
    }

    /// The device's public key and its peers, as the kernel has them.
    fn get(&self) -> Result<(Option<PublicKey>, BTreeMap<PublicKey, Peer>), WgError> {
        let mut m = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfIndex(self.ifindex)],
        });
        m.set_resolved_family_id(self.family);
        let parts = self
            .genl
            .query(&netlink::dump(m))
            .map_err(netlink_err("reading the WireGuard device"))?;
        let mut public = None;
        let mut peers = BTreeMap::new();
        // A device with many peers comes in several messages.
        for part in parts {
            for a in part.payload.attributes {
                match a {
                    WireguardAttribute::PublicKey(k) => public = Some(k),
                    WireguardAttribute::Peers(ps) => {
                        peers.extend(ps.into_iter().filter_map(|p| peer_of(&p.0)));
                    }
                    _ => {}
                }
            }
        }
        Ok((public, peers))
    }

    /// Makes the device's peers `want` (by public key): new ones added,
    /// changed ones updated, others removed. Only what differs is sent,
    /// so the sessions of unchanged peers go on.
    pub fn sync(&self, want: &BTreeMap<PublicKey, Peer>) -> Result<Changes, WgError> {
        let (_, have) = self.get()?;
        let mut changes = Changes::default();
        let mut peers = Vec::new();
        // Removals first: a node's new key takes its allowed IP over from
        // its old one.
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            changes.removed += 1;
            peers.push(WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*k),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]));
        }
        for (k, p) in want {
            match have.get(k) {
                Some(h) if h == p => continue,
                Some(_) => changes.updated += 1,
                None => changes.added += 1,
            }
            peers.push(peer_attrs(k, p));
        }
        for chunk in peers.chunks(PEERS_PER_MESSAGE) {
            self.set(vec![
                WireguardAttribute::IfIndex(self.ifindex),
                WireguardAttribute::Peers(chunk.to_vec()),
            ])
            .map_err(netlink_err("setting the WireGuard peers"))?;
        }
        Ok(changes)
    }

    fn set(&self, attributes: Vec<WireguardAttribute>) -> io::Result<()> {
        let mut m = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
        m.set_resolved_family_id(self.family);
        self.genl.request(&netlink::request(m, 0))
    }
}

/// The set request for peer `k`: its endpoint, its one allowed IP (the
/// endpoint's address) in place of any other.
fn peer_attrs(k: &PublicKey, p: &Peer) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(*k),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(SocketAddr::V4(p.endpoint)),
        WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
            WireguardAllowedIpAttr::IpAddr(IpAddr::V4(*p.endpoint.ip())),
            WireguardAllowedIpAttr::Cidr(32),
        ])]),
    ])
}

/// A peer the kernel reported, as [`Peer`]; one whose allowed IPs are not
/// exactly its endpoint's address counts as a different peer (and is set
/// again).
fn peer_of(attrs: &[WireguardPeerAttribute]) -> Option<(PublicKey, Peer)> {
    let mut key = None;
    let mut endpoint = None;
    let mut allowed = Vec::new();
    for a in attrs {
        match a {
            WireguardPeerAttribute::PublicKey(k) => key = Some(*k),
            WireguardPeerAttribute::Endpoint(SocketAddr::V4(e)) => endpoint = Some(*e),
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for x in &ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(IpAddr::V4(a)) => addr = Some(*a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                            _ => {}
                        }
                    }
                    allowed.push((addr, cidr));
                }
            }
            _ => {}
        }
    }
    let key = key?;
    let endpoint = endpoint.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let exact = allowed == [(Some(*endpoint.ip()), Some(32))];
    let endpoint = if exact {
        endpoint
    } else {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
    };
    Some((key, Peer { endpoint }))
}

/// The generic netlink family id of WireGuard.
fn family_id(genl: &Netlink) -> Result<u16, WgError> {
    let m = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
    });
    let answers = match genl.query(&netlink::request(m, 0)) {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(WgError::NoKernelSupport),
        Err(e) => return Err(netlink_err("finding WireGuard's netlink family")(e)),
    };
    answers
        .into_iter()
        .flat_map(|m| m.payload.nlas)
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(id),
            _ => None,
        })
        .ok_or(WgError::NoKernelSupport)
}

/// RTM_NEWLINK for a new, down WireGuard device of MTU `mtu`.
fn new_link(mtu: u32) -> netlink_packet_core::NetlinkMessage<RouteNetlinkMessage> {
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::IfName(NAME.into()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Wireguard)]),
    ];
    netlink::request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
}

/// RTM_NEWLINK setting the device's MTU and bringing it up.
fn set_link(mtu: u32) -> netlink_packet_core::NetlinkMessage<RouteNetlinkMessage> {
    let mut m = LinkMessage::default();
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes = vec![LinkAttribute::IfName(NAME.into()), LinkAttribute::Mtu(mtu)];
    netlink::request(RouteNetlinkMessage::NewLink(m), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_base64_and_junk_is_refused() {
        let k = [7u8; 32];
        assert_eq!(decode_key(&encode_key(&k)), Some(k));
        assert_eq!(decode_key("not base64!"), None);
        assert_eq!(decode_key(&BASE64.encode([1u8; 31])), None);
    }

    #[test]
    fn the_private_key_is_made_once_kept_0600_and_refused_when_others_can_read_it() {
        let dir = std::env::temp_dir().join(format!("mesh-wg-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(KEY_FILE);
        let _ = std::fs::remove_file(&path);
        let a = PrivateKey::load_or_make(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(PrivateKey::load_or_make(&path).expect("kept"), a);
        assert_eq!(format!("{a:?}"), "PrivateKey(..)", "never printed");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = PrivateKey::load_or_make(&path).expect_err("readable by others");
        assert!(e.to_string().contains("0600"), "{e}");
        std::fs::write(&path, "junk\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(PrivateKey::load_or_make(&path).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_peer_is_its_endpoint_with_that_address_as_its_one_allowed_ip() {
        let p = Peer {
            endpoint: "192.168.56.12:51820".parse().expect("addr"),
        };
        let k = [3u8; 32];
        let attrs = peer_attrs(&k, &p);
        assert_eq!(peer_of(&attrs.0), Some((k, p)));
        // Another allowed IP besides: not the peer as wanted.
        let mut more = attrs.0.clone();
        more.push(WireguardPeerAttribute::AllowedIps(vec![
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::IpAddr(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0))),
                WireguardAllowedIpAttr::Cidr(8),
            ]),
        ]));
        assert_ne!(peer_of(&more).map(|(_, p)| p), Some(p));
    }
}

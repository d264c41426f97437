//! Joining a cluster: start the sealed gossip, settle this node's /24
//! claim, and describe this node for the overlay. What follows (peers,
//! endpoints) goes through [`Membership`].

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use mesh_common::{
    mac::Mac,
    tunnel::{ENCAP_LEN, LocalNode, TUNNEL_TCP_OVERHEAD, WG_OVERHEAD},
};
use tracing::info;

use crate::{
    gossip::{
        self, GossipConfig,
        membership::{self, Membership},
        peers, subnet,
        transport::{GossipStats, Keyring, Keys},
    },
    iface,
    vip::Cidr,
    wireguard,
};

/// How this node joins (from the agent's flags).
pub struct JoinConfig {
    pub key_file: PathBuf,
    pub underlay_iface: String,
    pub advertise_addr: Option<Ipv4Addr>,
    pub node_name: Option<String>,
    pub gossip_listen: SocketAddr,
    pub join: Vec<String>,
    pub dead_after: Duration,
    /// The mesh network's MTU (checked against the underlay's).
    pub mtu: u32,
    /// A /24 given on the command line instead of a claimed one.
    pub node_subnet: Option<Cidr>,
    pub cluster_cidr: Cidr,
    pub vni: u32,
    /// The VXLAN UDP port, the same on every node.
    pub vxlan_port: u16,
    pub state_dir: PathBuf,
    /// `--encrypt`: the tunnel runs inside WireGuard on this UDP port.
    pub encrypt: Option<u16>,
    /// `--xdp-mode off`: the underlay TC program does XDP's part.
    pub tc_only: bool,
    /// `--local-via-bridge`: containers' packets to containers of their
    /// network on this node go through the bridge.
    pub via_bridge: bool,
}

/// This node's WireGuard (`--encrypt`).
pub struct Wg {
    pub device: wireguard::Device,
    /// Its private key's file (mode 0600).
    pub key_file: PathBuf,
    /// What it publishes: its public key and port.
    pub public: peers::WgKey,
}

/// This node in a cluster.
pub struct Cluster {
    pub node_id: String,
    pub membership: Box<dyn Membership>,
    /// This node's overlay settings, written to the kernel at start.
    pub local: LocalNode,
    pub cluster_cidr: Cidr,
    pub stats: Arc<GossipStats>,
    /// This node's /24 claim as published.
    pub claim: subnet::Claim,
    /// Where the claim is kept (removed when the claim is lost).
    pub claim_file: PathBuf,
    /// How long peers may keep this node's endpoints while its agent
    /// restarts (it says so when it stops: `gossip::peers`).
    pub restart_hold: Duration,
    /// The cluster keyring in use (the key file, read again when it
    /// changes).
    pub keys: Keys,
    /// The encrypted tunnel's device, when the cluster encrypts.
    pub wg: Option<Wg>,
}

impl Cluster {
    /// Tells the peers this agent is stopping, so they keep its endpoints
    /// until its next generation has published its own (for at most
    /// `restart_hold`), and gives the news a moment to leave: it is pushed
    /// at once, one exchange with each of a few peers, milliseconds on a
    /// LAN.
    pub async fn say_stopping(&self) {
        let hold = self.restart_hold.as_millis().to_string();
        let said = tokio::time::timeout(
            Duration::from_secs(1),
            self.membership.set(peers::KEY_STOPPING, &hold),
        )
        .await;
        if said.is_ok() {
            tokio::time::sleep(STOPPING_SPREAD).await;
        }
    }
}

/// How long a stopping agent keeps gossiping after saying so.
const STOPPING_SPREAD: Duration = Duration::from_millis(300);

/// Starts gossip and settles a /24; returns it with the cluster.
pub async fn join(cfg: &JoinConfig) -> Result<(Cidr, Cluster)> {
    let bytes = std::fs::read(&cfg.key_file)
        .with_context(|| format!("reading {}", cfg.key_file.display()))?;
    let ring = Keyring::from_file_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.key_file.display()))?;
    let key = Keys::new(&ring);
    info!(keys = ?ring.ids(), file = %cfg.key_file.display(), "cluster keyring (the primary first)");
    watch_keys(cfg.key_file.clone(), bytes, key.clone());
    let underlay = Underlay::of(cfg)?;
    let wg = cfg
        .encrypt
        .map(|port| encrypted_tunnel(cfg, port))
        .transpose()?;
    let node_id = cfg.node_name.clone().unwrap_or_else(hostname);
    let interval = GossipConfig::interval_for(cfg.dead_after);
    let gossip_cfg = GossipConfig {
        node_id: node_id.clone(),
        listen: cfg.gossip_listen,
        advertise: SocketAddr::new(underlay.ip.into(), cfg.gossip_listen.port()),
        seeds: cfg.join.clone(),
        key: key.clone(),
        cluster_id: "mesh".into(),
        interval,
        dead_after: cfg.dead_after,
    };
    let mut kvs = vec![
        (peers::KEY_UNDERLAY.to_string(), underlay.ip.to_string()),
        (peers::KEY_MAC.to_string(), Mac(underlay.mac).to_string()),
        (
            peers::KEY_VXLAN_PORT.to_string(),
            cfg.vxlan_port.to_string(),
        ),
        (
            peers::KEY_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    kvs.extend(
        wg.as_ref()
            .map(|w| (peers::KEY_WG.to_string(), w.public.encode())),
    );
    let stats = Arc::new(GossipStats::default());
    let handle = gossip::start(gossip_cfg, kvs, stats.clone()).await?;
    info!(node = %node_id, ip = %underlay.ip, seeds = ?cfg.join, "gossiping");
    let membership = membership::Chitchat::new(node_id.clone(), handle).await;
    let claim_file = cfg.state_dir.join("subnet");
    let mine = wanted_claim(cfg, &node_id, &claim_file)?;
    let claim = settle_claim(&membership, &node_id, cfg.cluster_cidr, mine, interval).await?;
    same_vxlan_port(&membership, cfg.vxlan_port)?;
    same_encryption(&membership, cfg.encrypt.is_some())?;
    // The claim must survive a restart (or the /24 could change under the
    // `mesh` network): failing to keep it is an error, not a warning.
    std::fs::create_dir_all(&cfg.state_dir)
        .and_then(|()| std::fs::write(&claim_file, subnet::encode(&claim)))
        .with_context(|| {
            format!(
                "keeping this node's /24 claim in {} (--state-dir must be writable and persistent)",
                claim_file.display()
            )
        })?;
    let node_subnet = subnet::subnet(cfg.cluster_cidr, claim.index);
    let local = LocalNode {
        subnet_be: u32::from(node_subnet.base).to_be(),
        cluster_be: u32::from(cfg.cluster_cidr.base).to_be(),
        cluster_mask_be: (u32::MAX << (32 - cfg.cluster_cidr.prefix)).to_be(),
        underlay_ip_be: u32::from(underlay.ip).to_be(),
        underlay_ifindex: underlay.ifindex,
        vni: cfg.vni,
        vxlan_port_be: cfg.vxlan_port.to_be(),
        underlay_mac: underlay.mac,
        enabled: 1,
        // The tunnel carries inner IPv4 packets of up to --mtu bytes (the
        // containers' MTU): that less IPv4 and TCP headers.
        tunnel_mss: u16::try_from((cfg.mtu + ENCAP_LEN as u32).saturating_sub(TUNNEL_TCP_OVERHEAD))
            .unwrap_or(0),
        wg_ifindex: wg.as_ref().map_or(0, |w| w.device.ifindex),
        tc_only: cfg.tc_only as u8,
        via_bridge: cfg.via_bridge as u8,
        ..Default::default()
    };
    let cluster = Cluster {
        node_id,
        membership: Box::new(membership),
        local,
        cluster_cidr: cfg.cluster_cidr,
        stats,
        claim,
        claim_file,
        restart_hold: cfg.dead_after * 2,
        keys: key,
        wg,
    };
    Ok((node_subnet, cluster))
}

/// This node's WireGuard device with its key (kept in the state dir, made
/// on the first start), for tunnel packets of up to `--mtu` bytes inside
/// VXLAN.
fn encrypted_tunnel(cfg: &JoinConfig, port: u16) -> Result<Wg> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let key_file = cfg.state_dir.join(wireguard::KEY_FILE);
    let key = wireguard::PrivateKey::load_or_make(&key_file)?;
    let (device, public) = wireguard::Device::ensure(cfg.mtu + ENCAP_LEN as u32, port, &key)?;
    let public = peers::WgKey { key: public, port };
    info!(
        iface = wireguard::NAME,
        ifindex = device.ifindex,
        port,
        public_key = %public.key_base64(),
        "the tunnel between nodes is encrypted (WireGuard)"
    );
    Ok(Wg {
        device,
        key_file,
        public,
    })
}

/// How often the key file is read again.
const KEY_FILE_POLL: Duration = Duration::from_secs(2);

/// Reads the key file again every [`KEY_FILE_POLL`]: a changed keyring is
/// used from the next datagram on (the cluster key rotates with no
/// restart); one that does not parse is refused, said once, and the one in
/// use kept.
fn watch_keys(path: PathBuf, mut seen: Vec<u8>, keys: Keys) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(KEY_FILE_POLL).await;
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if bytes == seen {
                continue;
            }
            seen.clone_from(&bytes);
            match Keyring::from_file_bytes(&bytes) {
                Ok(ring) => {
                    keys.set(&ring);
                    info!(keys = ?ring.ids(), file = %path.display(), "cluster keyring changed (the primary first)");
                }
                Err(e) => tracing::error!(
                    file = %path.display(),
                    error = %e,
                    kept = ?keys.ids(),
                    "the cluster key file does not parse; the keyring in use is kept"
                ),
            }
        }
    });
}

/// The underlay NIC as the overlay uses it.
struct Underlay {
    ip: std::net::Ipv4Addr,
    mac: [u8; 6],
    ifindex: u32,
}

impl Underlay {
    /// `--underlay-iface`'s address (or `--advertise-addr`), MAC, MTU and
    /// index; refused when `--mtu` plus VXLAN's 50 bytes (and WireGuard's
    /// 60 with `--encrypt`) exceeds its MTU.
    fn of(cfg: &JoinConfig) -> Result<Self> {
        let name = cfg.underlay_iface.as_str();
        let ip = cfg
            .advertise_addr
            .or_else(|| iface::ipv4(name))
            .with_context(|| format!("{name} has no IPv4 address: pass --advertise-addr"))?;
        let mac = iface::mac(name).with_context(|| format!("reading the MAC of {name}"))?;
        let mtu = iface::mtu(name).with_context(|| format!("reading the MTU of {name}"))?;
        let (overhead, what) = if cfg.encrypt.is_some() {
            (
                ENCAP_LEN as u32 + WG_OVERHEAD,
                "VXLAN and WireGuard headers",
            )
        } else {
            (ENCAP_LEN as u32, "VXLAN header")
        };
        if cfg.mtu + overhead > mtu {
            anyhow::bail!(
                "--mtu {} plus the {overhead}-byte {what} exceeds {name}'s MTU {mtu}: use --mtu {} or less",
                cfg.mtu,
                mtu.saturating_sub(overhead)
            );
        }
        Ok(Underlay {
            ip,
            mac,
            ifindex: iface::index(name)?,
        })
    }
}

/// The /24 this node asks for: `--node-subnet`, else the claim it kept in
/// `claim_file` (None: a new one).
fn wanted_claim(
    cfg: &JoinConfig,
    node_id: &str,
    claim_file: &std::path::Path,
) -> Result<Option<subnet::Claim>> {
    let Some(s) = cfg.node_subnet else {
        return Ok(std::fs::read_to_string(claim_file)
            .ok()
            .and_then(|v| subnet::decode(node_id, v.trim())));
    };
    let index = subnet::index_of(cfg.cluster_cidr, s).with_context(|| {
        format!(
            "--node-subnet {s} is not a /24 of --cluster-cidr {}",
            cfg.cluster_cidr
        )
    })?;
    Ok(Some(subnet::Claim {
        node: node_id.to_string(),
        index,
        since_ms: 0,
    }))
}

/// Claims a /24, then lets the claim stand unchallenged for a while: nodes
/// that start at the same instant see each other's claims and settle
/// apart. A claim this node already held (a restart, or --node-subnet)
/// only needs checking against the peers; a new one must stand longer.
async fn settle_claim(
    m: &dyn Membership,
    node_id: &str,
    cluster: Cidr,
    mut mine: Option<subnet::Claim>,
    interval: Duration,
) -> Result<subnet::Claim> {
    let settle = if mine.is_some() {
        interval * 2
    } else {
        (interval * 8).max(Duration::from_secs(2))
    };
    let mut published: Option<subnet::Claim> = None;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let claims: Vec<subnet::Claim> = m.peers().into_values().filter_map(|p| p.subnet).collect();
        let pick = subnet::choose(cluster, node_id, mine.as_ref(), &claims)
            .with_context(|| format!("no free /24 left in {cluster}"))?;
        if mine.as_ref().map(|c| c.index) != Some(pick) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            mine = Some(subnet::Claim {
                node: node_id.to_owned(),
                index: pick,
                since_ms: now,
            });
        }
        if published != mine {
            let value = mine.as_ref().map(subnet::encode).unwrap_or_default();
            m.set(peers::KEY_SUBNET, &value).await;
            published = mine.clone();
            stable_since = Instant::now();
        }
        if stable_since.elapsed() >= settle {
            return mine.context("no claim");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "could not settle a subnet claim in 2 minutes"
        );
        tokio::time::sleep(interval).await;
    }
}

/// Refuses to join a cluster whose nodes tunnel on another UDP port: they
/// would drop this node's VXLAN and it theirs.
fn same_vxlan_port(m: &dyn Membership, mine: u16) -> Result<()> {
    let others: Vec<String> = m
        .peers()
        .into_iter()
        .filter_map(|(name, p)| {
            let theirs = p.vxlan_port.unwrap_or(mesh_common::tunnel::VXLAN_PORT);
            (theirs != mine).then(|| format!("{name} uses {theirs}"))
        })
        .collect();
    anyhow::ensure!(
        others.is_empty(),
        "this node's VXLAN port is {mine} but {}: every node of a cluster must use the same \
         --vxlan-port",
        others.join(", ")
    );
    Ok(())
}

/// Refuses to join a cluster whose nodes encrypt when this one does not,
/// or the other way round: neither side would reach the other's
/// containers. (They say so on their side too.)
fn same_encryption(m: &dyn Membership, encrypt: bool) -> Result<()> {
    let others: Vec<String> = m
        .peers()
        .into_iter()
        .filter(|(_, p)| p.wg.is_some() != encrypt)
        .map(|(name, _)| name)
        .collect();
    anyhow::ensure!(
        others.is_empty(),
        "{}: every node of a cluster must use the same --encrypt",
        if encrypt {
            format!(
                "this node encrypts (--encrypt) but {} do(es) not",
                others.join(", ")
            )
        } else {
            format!(
                "this node does not encrypt but {} do(es) (--encrypt)",
                others.join(", ")
            )
        }
    );
    Ok(())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if r == 0 && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "mesh-node".into()
    }
}

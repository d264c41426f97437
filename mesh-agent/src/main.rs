//! mesh-agent: turns the containers Docker runs into what the kernel
//! forwards. Runs as one privileged agent per host.

/// mimalloc, not glibc's malloc: chitchat clones every live node's keys
/// for its watchers on each change, and with glibc, malloc and free were
/// a fifth of the CPU of 200 control planes under churn. Measured with the
/// cluster benchmark (200 nodes, 1 change/s): the machine's CPU 88% -> 69%,
/// an endpoint change everywhere p99 1.96 -> 1.0 s.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use clap::Parser;
use mesh_agent::{
    DEFAULT_BPFFS_DIR,
    cluster::{self, Cluster, JoinConfig},
    daemon::{Daemon, Settings},
    dataplane::{self, lb::LbMaps, overlay::OverlayMaps, progs},
    iface,
    logging::{self, LogFormat},
    shared::Shared,
    vip::Cidr,
};
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "mesh node agent: eBPF service load balancer and overlay for Docker"
)]
struct Args {
    /// Docker engine socket.
    #[arg(
        long,
        env = "MESH_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    docker_socket: PathBuf,
    /// This node's /24 of the cluster CIDR (the `mesh` network's subnet).
    /// Default: claimed through gossip in a cluster, 10.42.0.0/24 alone.
    #[arg(long, env = "MESH_NODE_SUBNET")]
    node_subnet: Option<Cidr>,
    /// The cluster CIDR: every node gets a /24 of it.
    #[arg(long, env = "MESH_CLUSTER_CIDR", default_value = "10.42.0.0/16")]
    cluster_cidr: Cidr,
    /// The cluster key (32 bytes, or 64 hex digits): turns on gossip and the
    /// overlay; every gossip message is sealed with it.
    #[arg(long, env = "MESH_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<PathBuf>,
    /// Nodes to join through (HOST:PORT), repeatable.
    #[arg(long, env = "MESH_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long, env = "MESH_NODE_NAME")]
    node_name: Option<String>,
    /// Gossip listen address.
    #[arg(long, env = "MESH_GOSSIP_LISTEN", default_value = "0.0.0.0:7946")]
    gossip_listen: SocketAddr,
    /// The underlay address peers reach this node at (default: the
    /// underlay NIC's IPv4).
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise_addr: Option<std::net::Ipv4Addr>,
    /// The UDP port of the overlay's VXLAN, the same on every node (a node
    /// whose port differs from the cluster's is refused at join).
    #[arg(long, env = "MESH_VXLAN_PORT", default_value_t = mesh_common::tunnel::VXLAN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    vxlan_port: u16,
    /// VXLAN network identifier of the cluster (24 bits).
    #[arg(long, env = "MESH_VNI", default_value_t = 4242, value_parser = clap::value_parser!(u32).range(1..16_777_216))]
    vni: u32,
    /// Seconds after which a silent node's endpoints are removed everywhere.
    #[arg(long, env = "MESH_DEAD_AFTER", default_value_t = 5.0)]
    dead_after: f64,
    /// Where service VIPs come from.
    #[arg(long, env = "MESH_VIP_CIDR", default_value = "10.43.0.0/16")]
    vip_cidr: Cidr,
    /// Linux bridge name of the `mesh` network.
    #[arg(long, env = "MESH_BRIDGE", default_value = "mesh0", value_parser = parse_iface)]
    bridge: String,
    /// MTU of the `mesh` network: the largest packet the tunnel carries. With
    /// VXLAN's 50 bytes (and WireGuard's 60 with --encrypt) it must fit the
    /// smallest MTU on the path between hosts (1450 for 1500-byte paths,
    /// 1350 across a 1400-byte hop; 1390 and 1290 encrypted). Default:
    /// 1450, or 1390 with --encrypt.
    #[arg(long, env = "MESH_MTU")]
    mtu: Option<u32>,
    /// Encrypt the tunnel between nodes: kernel WireGuard (Linux 5.6+),
    /// one key pair per node (made here, kept in --state-dir), public keys
    /// in gossip. Cluster-wide: a node whose setting differs is refused.
    #[arg(long, env = "MESH_ENCRYPT")]
    encrypt: bool,
    /// WireGuard's UDP port with --encrypt (each node publishes its own).
    #[arg(long, env = "MESH_WG_PORT", default_value_t = mesh_common::tunnel::WG_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    wg_port: u16,
    /// The underlay NIC: XDP attaches here. In a cluster, default: the
    /// interface holding --advertise-addr, else the default route's.
    #[arg(long, env = "MESH_UNDERLAY_IFACE", value_parser = parse_iface)]
    underlay_iface: Option<String>,
    /// XDP on the underlay NIC: `off` (the default), none: the underlay TC
    /// program does the tunnel's way in and the routing mesh's requests on
    /// the skb, and the NIC keeps GRO and its offloads; `native`, in the
    /// driver where it has XDP (the earliest drop of a flood; veth and
    /// virtio_net then give up GRO and their offloads); `generic`, once the
    /// kernel built the skb (no earlier than TC, and it copies GRO
    /// aggregates first: virtio_net's host traffic halves). See
    /// docs/benchmarks.md. A link pinned by an earlier agent keeps its
    /// mode; `off` removes it.
    #[arg(long, env = "MESH_XDP_MODE", value_enum, default_value_t = XdpAttach::Off)]
    xdp_mode: XdpAttach,
    /// bpffs directory for pinned maps and links.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// The host's cgroup v2 root (or the directory holding it as `unified`),
    /// for socket-level balancing: the host's own connects to a published
    /// port on localhost or its own address. `none`: off.
    #[arg(long, env = "MESH_CGROUP", default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    /// Directory for the agent's state that must survive a reboot (VIP
    /// assignments, this node's /24 claim): persistent storage, mounted
    /// from the host in the agent's container.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
    /// Control socket (meshctl status).
    #[arg(long, env = "MESH_API_SOCKET", default_value = mesh_agent::DEFAULT_API_SOCKET)]
    api_socket: PathBuf,
    /// Prometheus /metrics address.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// DNS: listen address (default: this node's mesh gateway, port 53).
    #[arg(long, env = "MESH_DNS_LISTEN")]
    dns_listen: Option<SocketAddr>,
    /// DNS: the mesh domain (NAME.<domain>, tasks.NAME.<domain>).
    #[arg(long, env = "MESH_DNS_DOMAIN", default_value = "mesh")]
    dns_domain: String,
    /// DNS: TTL of NAME -> VIP answers (the VIP is stable).
    #[arg(long, env = "MESH_DNS_VIP_TTL", default_value_t = 60)]
    dns_vip_ttl: u32,
    /// DNS: TTL of tasks.NAME answers (backends come and go).
    #[arg(long, env = "MESH_DNS_TASKS_TTL", default_value_t = 5)]
    dns_tasks_ttl: u32,
    /// DNS: upstream resolvers for other names (default: the nameservers in
    /// /etc/resolv.conf).
    #[arg(long, env = "MESH_DNS_UPSTREAM", value_delimiter = ',')]
    dns_upstream: Vec<SocketAddr>,
    /// Do not serve DNS.
    #[arg(long, env = "MESH_NO_DNS")]
    no_dns: bool,
    /// Translate containers' connects to VIPs packet by packet (conntrack
    /// tracks them; `meshctl conntrack` lists them) instead of balancing
    /// them at the socket, where their packets then go to the backend's own
    /// address with nothing to translate.
    #[arg(long, env = "MESH_NO_CONTAINER_SOCKET_LB")]
    no_container_socket_lb: bool,
    /// Send a container's packets to another container of its network on
    /// this host through the Docker bridge, where the host's forwarding and
    /// netfilter rules (DOCKER-USER) see them. By default a cluster's host
    /// sends them straight to that container's veth, as packets from other
    /// hosts always arrive, so the overlay's traffic takes the same path
    /// wherever containers run (without a cluster, the bridge carries them).
    #[arg(long, env = "MESH_LOCAL_VIA_BRIDGE")]
    local_via_bridge: bool,
    /// DNS: networks allowed to ask besides the cluster CIDR (containers),
    /// loopback and this host's addresses (A.B.C.D/N, comma separated).
    /// Queries from elsewhere (the underlay) are dropped and counted.
    #[arg(long, env = "MESH_DNS_ALLOW", value_delimiter = ',')]
    dns_allow: Vec<mesh_agent::dns::Net>,
    /// DNS: answer anyone who can reach the listen address.
    #[arg(long, env = "MESH_DNS_ALLOW_ANY")]
    dns_allow_any: bool,
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(flatten)]
    conntrack: ConntrackArgs,
    #[command(flatten)]
    maps: MapSizeArgs,
}

/// The data plane's other table sizes (docs/architecture.md, "Limits").
/// A pinned map of another size is created anew at start (its entries are
/// written again by the first pass).
#[derive(Debug, clap::Args)]
struct MapSizeArgs {
    /// Services (VIP:port/proto) on the node: the service map, its
    /// counters and the Maglev rings' outer map.
    #[arg(long, env = "MESH_MAX_SERVICES", default_value_t = mesh_common::maps::MAX_SERVICES, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    max_services: u32,
    /// Backends of all services together (ids).
    #[arg(long, env = "MESH_MAX_BACKENDS", default_value_t = mesh_common::maps::MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    max_backends: u32,
    /// Nodes of the cluster.
    #[arg(long, env = "MESH_MAX_NODES", default_value_t = mesh_common::maps::MAX_NODES, value_parser = clap::value_parser!(u32).range(4..=65_536))]
    max_nodes: u32,
    /// Other nodes' slices of every network together (nodes times
    /// networks, `mesh` included).
    #[arg(long, env = "MESH_MAX_SLICES", default_value_t = mesh_common::maps::MAX_SLICES, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    max_slices: u32,
    /// Containers on this node.
    #[arg(long, env = "MESH_MAX_LOCAL_ENDPOINTS", default_value_t = mesh_common::maps::MAX_LOCAL_EPS, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    max_local_endpoints: u32,
    /// Published ports (routing mesh).
    #[arg(long, env = "MESH_MAX_PUBLISHED", default_value_t = mesh_common::maps::MAX_PUBLISHED, value_parser = clap::value_parser!(u32).range(16..=131_072))]
    max_published: u32,
    /// Fragmented datagrams in flight.
    #[arg(long, env = "MESH_FRAG_ENTRIES", default_value_t = mesh_common::maps::FRAG_ENTRIES, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    frag_entries: u32,
}

impl MapSizeArgs {
    fn sizes(&self) -> impl Iterator<Item = (&'static str, u32)> {
        use mesh_common::maps::*;
        [
            (SERVICES.name, self.max_services),
            (SERVICE_STATS.name, self.max_services),
            (MAGLEV.name, self.max_services),
            (BACKENDS.name, self.max_backends),
            (NODES.name, self.max_slices),
            (PEERS.name, self.max_nodes),
            (LOCAL_EPS.name, self.max_local_endpoints),
            (PUBLISHED.name, self.max_published),
            (FRAGS.name, self.frag_entries),
        ]
        .into_iter()
    }
}

/// Conntrack sizes and timeouts (docs/architecture.md, "Conntrack lifetime").
#[derive(Debug, clap::Args)]
struct ConntrackArgs {
    /// Entries of the confirmed-flow table (two per flow).
    #[arg(long, env = "MESH_CT_ENTRIES", default_value_t = mesh_common::maps::CT_ENTRIES, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    ct_entries: u32,
    /// Entries of the new-flow table (two per flow): what a flood of flows
    /// that never complete can fill.
    #[arg(long, env = "MESH_CT_NEW_ENTRIES", default_value_t = mesh_common::maps::CT_NEW_ENTRIES, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    ct_new_entries: u32,
    /// Seconds an established TCP connection may stay idle.
    #[arg(long, env = "MESH_CT_TCP_TIMEOUT", default_value_t = 6 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    ct_tcp_timeout: u64,
    /// Seconds a TCP flow may wait for its handshake to complete.
    #[arg(long, env = "MESH_CT_TCP_NEW_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    ct_tcp_new_timeout: u64,
    /// Seconds a closed TCP flow (FIN both ways, RST) is kept.
    #[arg(long, env = "MESH_CT_TCP_CLOSED_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    ct_tcp_closed_timeout: u64,
    /// Seconds a UDP flow may stay idle.
    #[arg(long, env = "MESH_CT_UDP_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    ct_udp_timeout: u64,
    /// Seconds between two conntrack sweeps.
    #[arg(long, env = "MESH_CT_SWEEP_INTERVAL", default_value_t = 5.0)]
    ct_sweep_interval: f64,
}

impl ConntrackArgs {
    fn timeouts(&self) -> mesh_agent::conntrack::Timeouts {
        use std::time::Duration;
        mesh_agent::conntrack::Timeouts {
            tcp_established: Duration::from_secs(self.ct_tcp_timeout),
            tcp_new: Duration::from_secs(self.ct_tcp_new_timeout),
            tcp_closed: Duration::from_secs(self.ct_tcp_closed_timeout),
            udp: Duration::from_secs(self.ct_udp_timeout),
        }
    }

    fn sizes(&self) -> [(&'static str, u32); 2] {
        [
            (mesh_common::maps::CONNTRACK.name, self.ct_entries),
            (mesh_common::maps::CONNTRACK_NEW.name, self.ct_new_entries),
        ]
    }

    fn sweep_interval(&self) -> Result<std::time::Duration> {
        std::time::Duration::try_from_secs_f64(self.ct_sweep_interval)
            .ok()
            .filter(|d| *d >= std::time::Duration::from_millis(100))
            .with_context(|| {
                format!(
                    "--ct-sweep-interval {}: give seconds, at least 0.1",
                    self.ct_sweep_interval
                )
            })
    }
}

impl Args {
    /// `--mtu`, or its default: what fits a 1500-byte path with the
    /// tunnel's headers.
    fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(if self.encrypt {
            1500 - mesh_common::tunnel::ENCAP_LEN as u32 - mesh_common::tunnel::WG_OVERHEAD
        } else {
            1500 - mesh_common::tunnel::ENCAP_LEN as u32
        })
    }
}

fn parse_iface(s: &str) -> Result<String, String> {
    iface::validate(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    logging::init(args.log_format);
    match underlay_iface(&args) {
        Ok(iface) => args.underlay_iface = iface,
        Err(e) => {
            error!("{e:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The underlay NIC: `--underlay-iface`; in a cluster without it, the
/// interface holding `--advertise-addr` (hosts with several), else the one
/// of the default route; on a single host, none.
fn underlay_iface(args: &Args) -> Result<Option<String>> {
    if let Some(i) = &args.underlay_iface {
        return Ok(Some(i.clone()));
    }
    if args.cluster_key_file.is_none() {
        return Ok(None);
    }
    let (iface, why) = match args.advertise_addr.and_then(mesh_agent::iface::holding) {
        Some(i) => (i, "the interface holding --advertise-addr"),
        None => (
            mesh_agent::iface::default_route_iface().context(
                "no default route to take the underlay interface from: pass --underlay-iface",
            )?,
            "the default route's interface",
        ),
    };
    info!(%iface, "underlay: {why} (--underlay-iface to choose another)");
    Ok(Some(iface))
}

async fn run(args: Args) -> Result<()> {
    mesh_agent::kernel::check().map_err(anyhow::Error::msg)?;
    if args.vip_cidr.contains(args.cluster_cidr.base)
        || args.cluster_cidr.contains(args.vip_cidr.base)
    {
        anyhow::bail!(
            "--vip-cidr {} overlaps --cluster-cidr {}",
            args.vip_cidr,
            args.cluster_cidr
        );
    }
    let (mut ebpf, lb, overlay) = load_data_plane(&args)?;
    let monitor_maps = dataplane::monitor::MonitorMaps::take(&mut ebpf).context("monitor maps")?;
    let sweeper =
        mesh_agent::conntrack::sweep::Sweeper::open(&args.bpffs_dir, args.conntrack.timeouts())
            .context("conntrack sweep")?;
    let sweep_stats =
        mesh_agent::conntrack::sweep::spawn(sweeper, args.conntrack.sweep_interval()?)
            .context("starting the conntrack sweep")?;

    // The control socket and /metrics answer from the start, while the
    // node still settles its subnet and waits for Docker.
    let shared = Arc::new(Mutex::new(Shared::default()));
    {
        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.status.version = env!("CARGO_PKG_VERSION").to_string();
        sh.status.node.vip_cidr = args.vip_cidr.to_string();
        sh.status.node.bpffs_dir = args.bpffs_dir.display().to_string();
        sh.status.docker.socket = args.docker_socket.display().to_string();
        sh.sweep = Some(sweep_stats);
    }
    let monitor = mesh_agent::monitor::spawn(monitor_maps, &args.bpffs_dir, shared.clone());
    shared.lock().unwrap_or_else(|p| p.into_inner()).monitor = Some(monitor);
    serve_interfaces(
        args.api_socket.clone(),
        args.metrics_addr,
        args.bpffs_dir.clone(),
        shared.clone(),
    );

    let (node_subnet, cluster) = cluster_setup(&args).await?;
    info!(subnet = %node_subnet, clustered = cluster.is_some(), "this node's subnet");
    {
        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.status.node.subnet = node_subnet.to_string();
        sh.gossip = cluster.as_ref().map(|c| c.stats.clone());
        sh.keys = cluster.as_ref().map(|c| c.keys.clone());
        if let Some(c) = &cluster {
            sh.status.node.name = c.node_id.clone();
        }
    }
    let dns = dns_settings(&args, node_subnet)?;
    let mtu = args.mtu();
    let settings = Settings {
        docker_socket: args.docker_socket,
        node_subnet,
        vip_cidr: args.vip_cidr,
        bridge: args.bridge,
        mtu,
        vni: args.vni,
        bpffs_dir: args.bpffs_dir,
        state_dir: args.state_dir,
        dns,
        container_socket_lb: !args.no_container_socket_lb && args.cgroup.as_os_str() != "none",
    };
    let (net_tx, net_rx) = mesh_agent::requests::channel();
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .net_requests = Some(net_tx);
    let mut daemon = Daemon::new(settings, cluster, ebpf, lb, overlay, shared, net_rx)?;
    let stop = tokio::select! {
        r = daemon.run() => return r,
        r = shutdown() => r,
    };
    // Maps and links stay pinned: traffic keeps flowing until the next
    // agent adopts them, and the peers keep this node's endpoints.
    daemon.stopping().await;
    info!("stopping; the data plane stays in place");
    stop
}

/// Loads the data plane with every map pinned (adopting an earlier run's),
/// verifies the programs, attaches the underlay NIC's and the socket
/// programs, and writes the data plane's settings.
fn load_data_plane(args: &Args) -> Result<(aya::Ebpf, LbMaps, OverlayMaps)> {
    let sizes: Vec<(&'static str, u32)> = args
        .conntrack
        .sizes()
        .into_iter()
        .chain(args.maps.sizes())
        .collect();
    let (mut ebpf, retired) =
        dataplane::load_pinned(&args.bpffs_dir, &sizes).context("loading the data plane")?;
    for r in &retired {
        warn!(
            map = r.name,
            pinned = %r.pinned,
            ours = %r.ours,
            "a pinned map had another layout than this build's: created anew"
        );
    }
    for name in [
        progs::TC_FROM_CONTAINER,
        progs::TC_TO_CONTAINER,
        progs::TC_BRIDGE_IN,
        progs::TC_HOST_OUT,
        progs::TC_WG_IN,
        progs::TC_VXLAN_IN,
    ] {
        dataplane::tc(&mut ebpf, name).with_context(|| format!("verifying {name}"))?;
    }
    if let Some(iface) = &args.underlay_iface {
        attach_underlay(&mut ebpf, iface, &args.bpffs_dir, args.xdp_mode)?;
    }
    let lb = LbMaps::take(&mut ebpf).context("load-balancing maps")?;
    let mut overlay = OverlayMaps::take(&mut ebpf).context("overlay maps")?;
    let mut config = args.vip_cidr.config();
    if args.cgroup.as_os_str() != "none" {
        match dataplane::sockets::attach(&mut ebpf, &args.cgroup, &args.bpffs_dir).and_then(|dir| {
            let cookie = dataplane::sockets::netns_cookie().map_err(|e| e.to_string())?;
            Ok((dir, cookie))
        }) {
            Ok((dir, cookie)) => {
                config.host_netns_cookie = cookie;
                info!(cgroup = %dir.display(), "socket-level balancing for this host's connects");
            }
            Err(e) => warn!(
                error = %e,
                "no socket-level balancing: this host's own connects to published ports are not balanced (--cgroup)"
            ),
        }
    }
    overlay
        .set_config(&config)
        .context("writing the data plane's settings")?;
    // Conntrack's clock: the tick measured once, kept across restarts.
    let clock = dataplane::clock::settle(&mut ebpf, overlay.clock())
        .context("measuring the kernel's tick for conntrack's clock")?;
    overlay
        .set_clock(clock)
        .context("writing conntrack's clock")?;
    dataplane::clock::pin(&mut ebpf, &args.bpffs_dir).context("pinning conntrack's clock")?;
    info!(dir = %args.bpffs_dir.display(), "data plane loaded; maps pinned");
    Ok((ebpf, lb, overlay))
}

/// Where DNS listens and how it answers (None: `--no-dns`).
fn dns_settings(
    args: &Args,
    node_subnet: Cidr,
) -> Result<Option<(Option<SocketAddr>, mesh_agent::dns::DnsConfig)>> {
    let domain = args.dns_domain.trim_matches('.').to_ascii_lowercase();
    if domain.is_empty()
        || domain
            .split('.')
            .any(|l| mesh_agent::labels::service_name(l).is_err())
    {
        anyhow::bail!("--dns-domain {:?} is not a domain name", args.dns_domain);
    }
    if args.no_dns {
        return Ok(None);
    }
    let upstreams = if args.dns_upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        mesh_agent::dns::upstreams_from_resolv_conf(&text, node_subnet.gateway().into())
    } else {
        args.dns_upstream.clone()
    };
    let clients = if args.dns_allow_any {
        mesh_agent::dns::Clients::Any
    } else {
        let cluster = mesh_agent::dns::Net {
            base: args.cluster_cidr.base,
            prefix: args.cluster_cidr.prefix,
        };
        mesh_agent::dns::Clients::Only(
            std::iter::once(cluster)
                .chain(args.dns_allow.iter().copied())
                .collect(),
        )
    };
    let cfg = mesh_agent::dns::DnsConfig {
        domain,
        vip_ttl: args.dns_vip_ttl,
        tasks_ttl: args.dns_tasks_ttl,
        upstreams,
        clients,
    };
    Ok(Some((args.dns_listen, cfg)))
}

/// Alone: the given subnet or 10.42.0.0/24. In a cluster: start gossip and
/// claim a /24 (kept across restarts in the state dir).
async fn cluster_setup(args: &Args) -> Result<(Cidr, Option<Cluster>)> {
    let Some(key_file) = &args.cluster_key_file else {
        anyhow::ensure!(
            !args.encrypt,
            "--encrypt encrypts the tunnel between nodes: it needs a cluster (--cluster-key-file)"
        );
        let s = args.node_subnet.unwrap_or(Cidr {
            base: std::net::Ipv4Addr::new(10, 42, 0, 0),
            prefix: 24,
        });
        return Ok((s, None));
    };
    let underlay_iface = args
        .underlay_iface
        .clone()
        .context("a cluster (--cluster-key-file) needs an underlay interface (--underlay-iface)")?;
    let cfg = JoinConfig {
        key_file: key_file.clone(),
        underlay_iface,
        advertise_addr: args.advertise_addr,
        node_name: args.node_name.clone(),
        gossip_listen: args.gossip_listen,
        join: args.join.clone(),
        dead_after: std::time::Duration::from_secs_f64(args.dead_after.clamp(1.0, 600.0)),
        mtu: args.mtu(),
        node_subnet: args.node_subnet,
        cluster_cidr: args.cluster_cidr,
        vni: args.vni,
        vxlan_port: args.vxlan_port,
        state_dir: args.state_dir.clone(),
        encrypt: args.encrypt.then_some(args.wg_port),
        tc_only: matches!(args.xdp_mode, XdpAttach::Off),
        via_bridge: args.local_via_bridge,
    };
    let (subnet, cluster) = cluster::join(&cfg).await?;
    Ok((subnet, Some(cluster)))
}

/// Where XDP runs on the underlay NIC (`--xdp-mode`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum XdpAttach {
    Generic,
    Native,
    Off,
}

/// XDP and the underlay TC program on the underlay NIC, pinned; links an
/// earlier run pinned are adopted and switched to this build's programs if
/// they run others.
fn attach_underlay(
    ebpf: &mut aya::Ebpf,
    iface_name: &str,
    dir: &std::path::Path,
    mode: XdpAttach,
) -> Result<()> {
    let ifindex = iface::index(iface_name)?;
    std::fs::create_dir_all(dir.join("links"))?;
    let xdp_pin = dir.join("links").join(format!("xdp_{ifindex}"));
    let prog = dataplane::xdp_underlay(ebpf).context("verifying the XDP program")?;
    if matches!(mode, XdpAttach::Off) {
        // The pin holds an earlier agent's link alone: gone, it detaches.
        if xdp_pin.exists() {
            std::fs::remove_file(&xdp_pin)
                .with_context(|| format!("removing {}", xdp_pin.display()))?;
        }
    } else if xdp_pin.exists() {
        dataplane::links::upgrade_xdp(&xdp_pin, prog)?;
    } else {
        let id = prog
            .attach_to_if_index(
                ifindex,
                match mode {
                    XdpAttach::Generic => aya::programs::XdpMode::Skb,
                    // The kernel's choice: the driver's, where it has one.
                    XdpAttach::Native | XdpAttach::Off => aya::programs::XdpMode::Default,
                },
            )
            .with_context(|| format!("attaching XDP to {iface_name}"))?;
        let fd: aya::programs::links::FdLink =
            prog.take_link(id)?.try_into().context("XDP link")?;
        fd.pin(&xdp_pin).context("pinning the XDP link")?;
    }
    let tc_pin = dir.join("links").join(format!("tc_underlay_{ifindex}"));
    let tc =
        dataplane::tc(ebpf, progs::TC_UNDERLAY_IN).context("verifying the underlay TC program")?;
    if tc_pin.exists() {
        dataplane::links::upgrade_tc(&tc_pin, tc)?;
    } else {
        let id = tc
            .attach(iface_name, aya::programs::TcAttachType::Ingress)
            .with_context(|| format!("attaching TC to {iface_name}"))?;
        let fd: aya::programs::links::FdLink = tc.take_link(id)?.try_into().context("TC link")?;
        fd.pin(&tc_pin).context("pinning the underlay TC link")?;
    }
    info!(
        iface = iface_name,
        ifindex,
        xdp = ?mode,
        "XDP and TC on the underlay NIC"
    );
    Ok(())
}

async fn shutdown() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Starts the control socket and /metrics: they answer from the start,
/// while the node still settles its subnet and waits for Docker.
fn serve_interfaces(
    api_socket: PathBuf,
    metrics_addr: SocketAddr,
    bpffs_dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
) {
    info!(api = %api_socket.display(), metrics = %metrics_addr, "serving");
    let api_shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = mesh_agent::api::serve(&api_socket, api_shared).await {
            tracing::error!(path = %api_socket.display(), error = %e, "control socket failed");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = mesh_agent::metrics::serve(metrics_addr, bpffs_dir, shared).await {
            tracing::error!(addr = %metrics_addr, error = %e, "metrics endpoint failed");
        }
    });
}

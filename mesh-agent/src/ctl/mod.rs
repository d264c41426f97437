//! meshctl: what the kernel is doing, read straight from the maps the agent
//! pinned. Every view renders as a table for people or JSON for scripts.

mod backends;
mod check;
mod conntrack;
mod maglev;
mod maps;
mod monitor;
mod networks;
mod nodes;
mod services;
mod stats;
mod status;
mod table;

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::MapError;
use clap::{Parser, Subcommand};
use mesh_common::lb::{PROTO_TCP, PROTO_UDP, ServiceKey};

use self::table::render;
pub use self::{
    backends::{BackendRow, backends},
    conntrack::{CtRow, conntrack},
    maglev::{MaglevRow, maglev},
    maps::{MapRow, maps},
    services::{ServiceRow, services},
    stats::StatRow,
};
use crate::{
    DEFAULT_BPFFS_DIR,
    dataplane::lb::{LbMaps, MapsError},
};

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect the mesh data plane (reads the maps pinned by mesh-agent)"
)]
pub struct Args {
    /// bpffs directory where the agent pinned its maps.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR, global = true)]
    pub bpffs_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The agent's own view: node, Docker connection, services with VIPs and
    /// endpoint counts, containers skipped and why (asks the control socket).
    Status {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Nodes of the cluster: underlay address, /24, state (alive, suspect:
    /// gossip hears it but its tunnel does not answer, restarting, agent
    /// down, dead), agent version, whether its tunnel answers.
    Nodes {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// Overlay networks of the cluster: create, list, inspect, remove (as
    /// `docker network create -d overlay` does for Swarm).
    Network {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET, global = true)]
        api_socket: PathBuf,
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// Whether every node's kernel holds what it should: asks every node
    /// for a digest of its services, backends, Maglev rings, published
    /// ports and node table (through gossip, sealed with the cluster key)
    /// and compares them; what differs, per node, and since when. Exit
    /// status 0 only when every node agrees.
    Check {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// The data plane's events as they happen, one line each: drops with
    /// their reason and addresses, new flows with the backend chosen. The
    /// programs write them only while a monitor listens, at most 2,000 per
    /// second and CPU (what is over is counted and said).
    Monitor {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
        /// Drops only.
        #[arg(long)]
        drops: bool,
        /// Only a service's events (its name, or its VIP).
        #[arg(long)]
        service: Option<String>,
        /// Only new flows to backends on this node.
        #[arg(long)]
        node: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// This node's WireGuard key (`--encrypt`).
    Key {
        /// The agent's control socket.
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET, global = true)]
        api_socket: PathBuf,
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Services: VIP:port/proto, published ports, ring size, backends in
    /// the ring, traffic. New flows count every connect balanced here, at
    /// the socket or per packet; packets and bytes only those translated
    /// per packet (a connect balanced at the socket sends the backend's
    /// own address: its packets are any container's).
    Services {
        /// Only services reached through a published port (routing mesh).
        #[arg(long)]
        published: bool,
    },
    /// Backends: id, service, address, state, local veth, and (from the
    /// agent) the node and container each one is.
    Backends {
        /// The agent's control socket (names; without it, "-").
        #[arg(long, env = "MESH_API_SOCKET", default_value = crate::DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
    },
    /// A service's Maglev ring: slots and share per backend.
    Maglev {
        /// The service, as VIP:PORT/PROTO (e.g. 10.43.0.10:80/tcp).
        service: String,
    },
    /// Tracked flows: client, service, backend, TCP flags, idle time.
    Conntrack {
        /// Only flows of this service (VIP:PORT/PROTO).
        #[arg(long)]
        service: Option<String>,
        /// Show reverse (reply-direction) entries too.
        #[arg(long)]
        all: bool,
    },
    /// Every map of the data plane: pinned or not, id, size, memory.
    Maps,
    /// Packet counters: verdicts and the path each packet took.
    Stats {
        /// Show counters that are zero too.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// A new network, on every node of the cluster (each gets a /24 of it
    /// and a Docker network of that name): `docker run --network NAME`.
    Create {
        name: String,
        /// Its /16 (default: the first free one from 10.44.0.0/16).
        #[arg(long)]
        subnet: Option<String>,
    },
    /// Every network, `mesh` (the default) first.
    #[command(alias = "list")]
    Ls,
    /// One network: subnet, VNI, this node's slice, VIPs, its containers
    /// across the cluster.
    Inspect { name: String },
    /// Removes a network from the cluster; refused while containers use it.
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// A new key pair for this node: kept in its state dir, given to its
    /// WireGuard device and published; peers follow within a gossip round.
    /// Prints the new public key.
    Renew,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0} does not exist: is mesh-agent running on this host, with the same --bpffs-dir?")]
    NotPinned(PathBuf),
    #[error("permission denied opening {0}: meshctl reads kernel maps and needs root (or CAP_BPF)")]
    Permission(PathBuf),
    #[error("{0}")]
    Maps(#[from] MapsError),
    #[error("{0}")]
    Usage(String),
    /// `meshctl check` found nodes that differ: the report (printed as
    /// output, with a failing exit status).
    #[error("{0}")]
    Disagree(String),
    #[error("cannot reach the agent at {path}: {source} (is mesh-agent running? --api-socket)")]
    Agent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs one command and returns what to print.
pub fn execute(args: &Args) -> Result<String, CtlError> {
    let dir = &args.bpffs_dir;
    match &args.cmd {
        Cmd::Status { api_socket } => status::status_view(api_socket, args.json),
        Cmd::Stats { all } => stats::stats_view(dir, *all, args.json),
        Cmd::Nodes { api_socket } => render(args.json, &nodes::nodes(api_socket)?),
        Cmd::Maps => render(args.json, &maps(dir)?),
        Cmd::Network { api_socket, cmd } => match cmd {
            NetworkCmd::Ls => render(args.json, &networks::list(api_socket)?),
            NetworkCmd::Create { name, subnet } => {
                let row = networks::create(api_socket, name, subnet.as_deref())?;
                render(args.json, &[row])
            }
            NetworkCmd::Inspect { name } => {
                let row = networks::inspect(api_socket, name)?;
                Ok(serde_json::to_string_pretty(&row).unwrap_or_default() + "\n")
            }
            NetworkCmd::Rm { name } => {
                networks::remove(api_socket, name)?;
                Ok(format!("{name}\n"))
            }
        },
        Cmd::Monitor {
            api_socket,
            drops,
            service,
            node,
            count,
            seconds,
        } => monitor::monitor(
            api_socket,
            &monitor::Filter {
                drops: *drops,
                service: service.as_deref(),
                node: node.as_deref(),
                count: *count,
                seconds: *seconds,
                json: args.json,
            },
        ),
        Cmd::Check { api_socket } => {
            let (out, agree) = check::check(api_socket, args.json)?;
            if agree {
                Ok(out)
            } else {
                Err(CtlError::Disagree(out))
            }
        }
        Cmd::Key {
            api_socket,
            cmd: KeyCmd::Renew,
        } => {
            let raw = networks::ask(api_socket, "key renew")?;
            let v: serde_json::Value = serde_json::from_str(&raw)
                .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))?;
            if args.json {
                return Ok(raw);
            }
            let key = v.get("public_key").and_then(|k| k.as_str()).unwrap_or("?");
            Ok(format!("public key {key}\n"))
        }
        Cmd::Services { published } => {
            let lb = open_lb(dir)?;
            render(args.json, &services(&lb, *published)?)
        }
        Cmd::Backends { api_socket } => {
            let lb = open_lb(dir)?;
            render(args.json, &backends(&lb, api_socket)?)
        }
        Cmd::Maglev { service } => {
            let key = parse_service(service)?;
            let lb = open_lb(dir)?;
            render(args.json, &maglev(&lb, &key)?)
        }
        Cmd::Conntrack { service, all } => {
            let key = service.as_deref().map(parse_service).transpose()?;
            let lb = open_lb(dir)?;
            let now = crate::dataplane::clock::Clock::open(dir).now_ns();
            render(args.json, &conntrack(&lb, key.as_ref(), *all, now)?)
        }
    }
}

/// Opens the pinned load-balancing maps, explaining the usual failures.
fn open_lb(dir: &Path) -> Result<LbMaps, CtlError> {
    LbMaps::from_pins(dir).map_err(|e| match &e {
        MapsError::Map { name, source } => {
            explain(&dir.join(name), source).unwrap_or(CtlError::Maps(e))
        }
        _ => CtlError::Maps(e),
    })
}

pub(super) fn explain(path: &Path, e: &MapError) -> Option<CtlError> {
    let MapError::SyscallError(s) = e else {
        return None;
    };
    match s.io_error.kind() {
        io::ErrorKind::NotFound => Some(CtlError::NotPinned(path.to_owned())),
        io::ErrorKind::PermissionDenied => Some(CtlError::Permission(path.to_owned())),
        _ => None,
    }
}

/// Parses `VIP:PORT/PROTO` (proto tcp or udp).
pub fn parse_service(s: &str) -> Result<ServiceKey, CtlError> {
    let bad = || {
        CtlError::Usage(format!(
            "{s:?} is not VIP:PORT/PROTO (e.g. 10.43.0.10:80/tcp)"
        ))
    };
    let (addr, proto) = s.split_once('/').ok_or_else(bad)?;
    let addr: SocketAddrV4 = addr.parse().map_err(|_| bad())?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        _ => return Err(bad()),
    };
    Ok(ServiceKey {
        vip_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        proto,
        ..ServiceKey::default()
    })
}

pub(super) fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        other => format!("proto{other}"),
    }
}

pub(super) fn addr(ip_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(ip_be)),
        u16::from_be(port_be)
    )
}

pub(super) fn service_name(k: &ServiceKey) -> String {
    format!("{}/{}", addr(k.vip_be, k.port_be), proto_name(k.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_syntax() {
        let k = parse_service("10.43.0.10:80/tcp").expect("valid");
        assert_eq!(
            (u32::from_be(k.vip_be), u16::from_be(k.port_be), k.proto),
            (0x0a2b000a, 80, PROTO_TCP)
        );
        assert_eq!(
            parse_service("10.43.0.10:53/UDP").expect("valid").proto,
            PROTO_UDP
        );
        for bad in [
            "",
            "10.43.0.10",
            "10.43.0.10:80",
            "10.43.0.10:80/sctp",
            "x:80/tcp",
            "10.43.0.10:99999/tcp",
            "/tcp",
        ] {
            assert!(parse_service(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}

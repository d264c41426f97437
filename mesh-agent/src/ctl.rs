//! meshctl: what the kernel is doing, read straight from the maps the agent
//! pinned. Every view renders as a table for people or JSON for scripts.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapError, PerCpuArray};
use clap::{Parser, Subcommand};
use mesh_common::{
    ct::{CtEntry, CtKey, dir, tcp_flag},
    lb::{Backend, PROTO_TCP, PROTO_UDP, Service, ServiceKey, backend_state},
    maps,
};
use serde::Serialize;

use crate::{
    DEFAULT_BPFFS_DIR,
    dataplane::{
        lb::{LbMaps, MapsError},
        stats,
    },
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
    /// Services: VIP:port/proto, ring size, backends in the ring, traffic.
    Services,
    /// Backends: id, address, state, local veth.
    Backends,
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
    /// Packet counters: verdicts and the path each packet took.
    Stats {
        /// Show counters that are zero too.
        #[arg(long)]
        all: bool,
    },
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
        Cmd::Status { api_socket } => status_view(api_socket, args.json),
        Cmd::Stats { all } => stats_view(dir, *all, args.json),
        Cmd::Services => {
            let lb = open_lb(dir)?;
            render(args.json, &services(&lb)?)
        }
        Cmd::Backends => {
            let lb = open_lb(dir)?;
            render(args.json, &backends(&lb)?)
        }
        Cmd::Maglev { service } => {
            let key = parse_service(service)?;
            let lb = open_lb(dir)?;
            render(args.json, &maglev(&lb, &key)?)
        }
        Cmd::Conntrack { service, all } => {
            let key = service.as_deref().map(parse_service).transpose()?;
            let lb = open_lb(dir)?;
            render(args.json, &conntrack(&lb, key.as_ref(), *all)?)
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

fn explain(path: &Path, e: &MapError) -> Option<CtlError> {
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

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        other => format!("proto{other}"),
    }
}

fn addr(ip_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(ip_be)),
        u16::from_be(port_be)
    )
}

fn service_name(k: &ServiceKey) -> String {
    format!("{}/{}", addr(k.vip_be, k.port_be), proto_name(k.proto))
}

/// Rows that render as a table.
trait Table: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn render<T: Table>(json: bool, rows: &[T]) -> Result<String, CtlError> {
    if json {
        return serde_json::to_string_pretty(rows).map_err(|e| CtlError::Usage(e.to_string()));
    }
    let cells: Vec<Vec<String>> = rows.iter().map(Table::cells).collect();
    let mut widths: Vec<usize> = T::HEADER.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String]| {
        let cols: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cols.join("  ").trim_end());
    };
    line(
        &mut out,
        &T::HEADER.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for row in &cells {
        line(&mut out, row);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    Ok(out.trim_end().to_owned())
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub id: u32,
    pub ring_slots: usize,
    pub backends_in_ring: usize,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Table for ServiceRow {
    const HEADER: &'static [&'static str] = &[
        "SERVICE",
        "ID",
        "RING",
        "BACKENDS",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.id.to_string(),
            self.ring_slots.to_string(),
            self.backends_in_ring.to_string(),
            self.packets.to_string(),
            self.bytes.to_string(),
            self.new_flows.to_string(),
        ]
    }
}

fn all_services(lb: &LbMaps) -> Result<Vec<(ServiceKey, Service)>, CtlError> {
    let mut v = Vec::new();
    for item in lb.services.iter() {
        v.push(item.map_err(|source| MapsError::Map {
            name: maps::SERVICES,
            source,
        })?);
    }
    v.sort_by_key(|(k, _)| (u32::from_be(k.vip_be), u16::from_be(k.port_be), k.proto));
    Ok(v)
}

pub fn services(lb: &LbMaps) -> Result<Vec<ServiceRow>, CtlError> {
    let mut rows = Vec::new();
    for (key, svc) in all_services(lb)? {
        let ring = lb.ring(svc.id)?;
        let mut ids: Vec<u32> = ring.clone();
        ids.sort_unstable();
        ids.dedup();
        let st = lb.service_stats(svc.id)?;
        rows.push(ServiceRow {
            service: service_name(&key),
            id: svc.id,
            ring_slots: ring.len(),
            backends_in_ring: ids.iter().filter(|&&i| i != 0).count(),
            packets: st.packets,
            bytes: st.bytes,
            new_flows: st.new_flows,
        });
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub state: String,
    pub ifindex: u32,
    pub mac: String,
}

impl Table for BackendRow {
    const HEADER: &'static [&'static str] = &["ID", "ADDRESS", "STATE", "IFINDEX", "MAC"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.address.clone(),
            self.state.clone(),
            self.ifindex.to_string(),
            self.mac.clone(),
        ]
    }
}

fn state_name(s: u8) -> String {
    match s {
        backend_state::ACTIVE => "active".into(),
        backend_state::DRAINING => "draining".into(),
        other => format!("state{other}"),
    }
}

fn all_backends(lb: &LbMaps) -> Result<BTreeMap<u32, Backend>, CtlError> {
    let mut m = BTreeMap::new();
    for (id, b) in lb.backends.iter().enumerate() {
        let b = b.map_err(|source| MapsError::Map {
            name: maps::BACKENDS,
            source,
        })?;
        if b.state != 0 {
            m.insert(id as u32, b);
        }
    }
    Ok(m)
}

pub fn backends(lb: &LbMaps) -> Result<Vec<BackendRow>, CtlError> {
    Ok(all_backends(lb)?
        .into_iter()
        .map(|(id, b)| BackendRow {
            id,
            address: addr(b.ip_be, b.port_be),
            state: state_name(b.state),
            ifindex: b.ifindex,
            mac: b
                .mac
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        })
        .collect())
}

#[derive(Serialize)]
pub struct MaglevRow {
    pub backend_id: u32,
    pub address: String,
    pub slots: usize,
    pub share_percent: f64,
}

impl Table for MaglevRow {
    const HEADER: &'static [&'static str] = &["BACKEND", "ADDRESS", "SLOTS", "SHARE"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.backend_id.to_string(),
            self.address.clone(),
            self.slots.to_string(),
            format!("{:.2}%", self.share_percent),
        ]
    }
}

pub fn maglev(lb: &LbMaps, key: &ServiceKey) -> Result<Vec<MaglevRow>, CtlError> {
    let svc = lb
        .services
        .get(key, 0)
        .map_err(|_| CtlError::Usage(format!("no service {}", service_name(key))))?;
    let ring = lb.ring(svc.id)?;
    let backends = all_backends(lb)?;
    let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
    for id in &ring {
        *slots.entry(*id).or_default() += 1;
    }
    Ok(slots
        .into_iter()
        .map(|(id, n)| MaglevRow {
            backend_id: id,
            address: backends
                .get(&id)
                .map_or("(missing)".into(), |b| addr(b.ip_be, b.port_be)),
            slots: n,
            share_percent: n as f64 * 100.0 / ring.len() as f64,
        })
        .collect())
}

#[derive(Serialize)]
pub struct CtRow {
    pub direction: String,
    pub proto: String,
    pub src: String,
    pub dst: String,
    /// Forward: the backend. Reverse: the VIP restored.
    pub nat: String,
    pub backend_id: u32,
    pub service_id: u32,
    pub tcp_flags: String,
    pub idle_seconds: f64,
}

impl Table for CtRow {
    const HEADER: &'static [&'static str] = &[
        "DIR", "PROTO", "SRC", "DST", "NAT", "BACKEND", "FLAGS", "IDLE",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.direction.clone(),
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
            self.nat.clone(),
            self.backend_id.to_string(),
            self.tcp_flags.clone(),
            format!("{:.1}s", self.idle_seconds),
        ]
    }
}

fn flags(f: u8) -> String {
    let names = [
        (tcp_flag::SYN, "SYN"),
        (tcp_flag::ACK, "ACK"),
        (tcp_flag::FIN, "FIN"),
        (tcp_flag::RST, "RST"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "-".into()
    } else {
        set.join(",")
    }
}

/// CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn conntrack(
    lb: &LbMaps,
    service: Option<&ServiceKey>,
    all: bool,
) -> Result<Vec<CtRow>, CtlError> {
    let want_id = match service {
        Some(k) => Some(
            lb.services
                .get(k, 0)
                .map_err(|_| CtlError::Usage(format!("no service {}", service_name(k))))?
                .id,
        ),
        None => None,
    };
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for item in lb.conntrack.iter() {
        // Entries can vanish (LRU) while we iterate: skip those.
        let Ok((k, e)): Result<(CtKey, CtEntry), _> = item else {
            continue;
        };
        if (!all && k.dir != dir::FORWARD) || want_id.is_some_and(|id| id != e.service_id) {
            continue;
        }
        rows.push(CtRow {
            direction: if k.dir == dir::FORWARD {
                "fwd".into()
            } else {
                "rev".into()
            },
            proto: proto_name(k.proto),
            src: addr(k.src_be, k.sport_be),
            dst: addr(k.dst_be, k.dport_be),
            nat: addr(e.nat_ip_be, e.nat_port_be),
            backend_id: e.backend_id,
            service_id: e.service_id,
            tcp_flags: flags(e.tcp_flags),
            idle_seconds: now.saturating_sub(e.last_seen_ns) as f64 / 1e9,
        });
    }
    rows.sort_by(|a, b| (&a.direction, &a.src, &a.dst).cmp(&(&b.direction, &b.src, &b.dst)));
    Ok(rows)
}

#[derive(Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub packets: u64,
}

impl Table for StatRow {
    const HEADER: &'static [&'static str] = &["COUNTER", "PACKETS"];
    fn cells(&self) -> Vec<String> {
        vec![self.counter.to_string(), self.packets.to_string()]
    }
}

fn stats_view(dir: &Path, all: bool, json: bool) -> Result<String, CtlError> {
    let path = dir.join(maps::STATS);
    let name = maps::STATS;
    let data = MapData::from_pin(&path)
        .map_err(|e| explain(&path, &e).unwrap_or(MapsError::Map { name, source: e }.into()))?;
    let map =
        aya::maps::Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })?;
    let map: PerCpuArray<MapData, u64> = map
        .try_into()
        .map_err(|source| MapsError::Map { name, source })?;
    let counters = stats::read(&map).map_err(|source| MapsError::Map { name, source })?;
    let rows: Vec<StatRow> = counters
        .into_iter()
        .filter(|c| all || c.value != 0)
        .map(|c| StatRow {
            counter: c.name,
            packets: c.value,
        })
        .collect();
    render(json, &rows)
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

fn status_view(path: &Path, json: bool) -> Result<String, CtlError> {
    let raw = crate::api::ask(path, "status").map_err(|source| CtlError::Agent {
        path: path.to_owned(),
        source,
    })?;
    if json {
        return Ok(raw);
    }
    let st: crate::status::Status = serde_json::from_str(&raw)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))?;
    let mut out = String::new();
    let _ = writeln!(out, "mesh-agent {}", st.version);
    let _ = writeln!(
        out,
        "node:    subnet {}, VIPs from {}, maps in {}",
        st.node.subnet, st.node.vip_cidr, st.node.bpffs_dir
    );
    let _ = writeln!(
        out,
        "docker:  {} ({}), {} mesh containers",
        if st.docker.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        st.docker.socket,
        st.docker.containers
    );
    let r = &st.reconcile;
    let _ = writeln!(
        out,
        "reconcile: {} passes, {} writes, last {:.2} ms{}",
        r.passes,
        r.writes,
        r.last_ms,
        r.last_error
            .as_deref()
            .map(|e| format!(", LAST ERROR: {e}"))
            .unwrap_or_default()
    );
    let l = &st.event_to_map_ms;
    let _ = writeln!(
        out,
        "event-to-map: p50 {:.2} ms, p99 {:.2} ms over {} events\n",
        l.p50, l.p99, l.samples
    );
    let rows: Vec<StatusRow> = st.services.iter().map(StatusRow::from).collect();
    out.push_str(&render(false, &rows)?);
    if !st.skipped.is_empty() {
        out.push_str("\n\nskipped containers:\n");
        for s in &st.skipped {
            let _ = writeln!(out, "  {}: {}", s.container, s.error);
        }
    }
    Ok(out.trim_end().to_owned())
}

#[derive(Serialize)]
struct StatusRow {
    name: String,
    vip: String,
    ports: String,
    active: usize,
    draining: usize,
    waiting: usize,
}

impl From<&crate::status::ServiceStatus> for StatusRow {
    fn from(s: &crate::status::ServiceStatus) -> Self {
        StatusRow {
            name: s.name.clone(),
            vip: s.vip.clone(),
            ports: if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports.join(", ")
            },
            active: s.active,
            draining: s.draining,
            waiting: s.waiting,
        }
    }
}

impl Table for StatusRow {
    const HEADER: &'static [&'static str] =
        &["SERVICE", "VIP", "PORTS", "ACTIVE", "DRAINING", "WAITING"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.vip.clone(),
            self.ports.clone(),
            self.active.to_string(),
            self.draining.to_string(),
            self.waiting.to_string(),
        ]
    }
}

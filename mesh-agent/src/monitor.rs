//! `meshctl monitor`: the programs' events (drops with their reason, new
//! flows with the backend chosen) as JSON lines on the control socket.
//!
//! One task owns the ring buffer. While nobody listens it sleeps and the
//! programs write nothing (their `on` word is 0). The first listener turns
//! it on; the task then reads the ring as the kernel fills it, names what
//! it can (the drop reason, the service, the backend's address, node and
//! container) and hands each line to every listener through a bounded
//! channel: a listener that falls behind loses lines, and is told how
//! many, rather than holding the agent up. When the last one leaves the
//! programs are told to stop.
//!
//! Why a ring buffer and not aya-log: these are structured events for
//! tools (filtered and rendered by meshctl, `--json` for scripts), written
//! only while asked, with a per-CPU rate limit in the kernel; aya-log is a
//! text logger for the programs' own debugging, always compiled in, whose
//! records carry format strings rather than fields. mesh's programs keep
//! no debug logging.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, MapData};
use mesh_common::{
    lb::Backend,
    monitor::{DROP, Event, NEW_FLOW},
    stats::COUNTERS,
};
use tokio::{
    io::unix::AsyncFd,
    sync::{Notify, broadcast},
};
use tracing::{info, warn};

use crate::dataplane::monitor::MonitorMaps;

/// What names a new flow: its service (name, VIP:port/proto) by id, and a
/// backend's node and container by address (from the agent's state).
pub trait Names: Send + Sync + 'static {
    fn service(&self, id: u32) -> Option<(String, String)>;
    fn backend(&self, ip: Ipv4Addr) -> Option<(String, String)>;
}

/// Lines a listener may fall behind by before it loses some.
const BACKLOG: usize = 4096;

/// The monitor, as the control socket uses it.
#[derive(Clone)]
pub struct Monitor {
    lines: broadcast::Sender<Arc<str>>,
    listeners: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

/// A listener; the programs stop writing once every one is dropped.
pub struct Listener {
    pub lines: broadcast::Receiver<Arc<str>>,
    listeners: Arc<AtomicUsize>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Monitor {
    /// A new listener (the programs start writing if it is the first).
    pub fn listen(&self) -> Listener {
        let lines = self.lines.subscribe();
        self.listeners.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
        Listener {
            lines,
            listeners: self.listeners.clone(),
        }
    }
}

/// Starts the task that reads the ring buffer; `bpffs_dir` holds the
/// backends' map (events name backends by id).
pub fn spawn(maps: MonitorMaps, bpffs_dir: &Path, names: impl Names) -> Monitor {
    let (lines, _) = broadcast::channel(BACKLOG);
    let m = Monitor {
        lines,
        listeners: Arc::new(AtomicUsize::new(0)),
        wake: Arc::new(Notify::new()),
    };
    let backends = MapData::from_pin(bpffs_dir.join(mesh_common::maps::BACKENDS.name))
        .ok()
        .and_then(|d| Array::<MapData, Backend>::try_from(aya::maps::Map::Array(d)).ok());
    let task = m.clone();
    tokio::spawn(async move {
        if let Err(e) = run(task, maps, backends, names).await {
            warn!(error = %e, "the monitor stopped: meshctl monitor shows nothing until the agent restarts");
        }
    });
    m
}

async fn run(
    m: Monitor,
    mut maps: MonitorMaps,
    backends: Option<Array<MapData, Backend>>,
    names: impl Names,
) -> anyhow::Result<()> {
    let mut on = false;
    let _ = maps.set_on(false);
    // SAFETY: the descriptor belongs to `maps`, which outlives `fd`
    // (declared after it, dropped before it).
    let fd = unsafe {
        AsyncFd::register_with_interest(
            RawFd(maps.events.as_raw_fd()),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    // ktime (CLOCK_MONOTONIC) to wall time.
    let offset_ns = wall_ns().saturating_sub(crate::dataplane::clock::monotonic_ns());
    let mut lost_seen = maps.lost();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let listening = m.listeners.load(Ordering::SeqCst) > 0;
        if listening != on {
            maps.set_on(listening)?;
            on = listening;
            info!(on, "monitor");
        }
        if !on {
            m.wake.notified().await;
            continue;
        }
        tokio::select! {
            r = fd.readable() => {
                let mut guard = r?;
                while let Some(e) = maps.next_event() {
                    let line = render(&e, offset_ns, backends.as_ref(), &names);
                    let _ = m.lines.send(line.into());
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let lost = maps.lost();
                if lost > lost_seen {
                    let line = serde_json::json!({
                        "kind": "lost",
                        "count": lost - lost_seen,
                        "why": "over the per-CPU rate or the ring buffer full",
                    });
                    let _ = m.lines.send(line.to_string().into());
                    lost_seen = lost;
                }
            }
            _ = m.wake.notified() => {}
        }
    }
}

/// The ring buffer's descriptor, for readiness only (the map owns it).
struct RawFd(std::os::fd::RawFd);

impl AsRawFd for RawFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn addr(ip_be: u32, port_be: u16, proto: u8) -> String {
    let ip = Ipv4Addr::from(u32::from_be(ip_be));
    if proto == 6 || proto == 17 {
        format!("{ip}:{}", u16::from_be(port_be))
    } else {
        ip.to_string()
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        0 => "-".into(),
        n => n.to_string(),
    }
}

/// One event as a JSON line.
fn render(
    e: &Event,
    offset_ns: u64,
    backends: Option<&Array<MapData, Backend>>,
    names: &impl Names,
) -> String {
    let ts_ms = (e.ts_ns + offset_ns) / 1_000_000;
    let mut v = serde_json::json!({
        "ts_ms": ts_ms,
        "proto": proto_name(e.proto),
        "src": addr(e.src_be, e.sport_be, e.proto),
        "dst": addr(e.dst_be, e.dport_be, e.proto),
    });
    match e.kind {
        DROP => {
            v["kind"] = "drop".into();
            v["reason"] = COUNTERS.get(e.stat as usize).map_or("?", |c| c.name).into();
            v["ifindex"] = e.ifindex.into();
        }
        NEW_FLOW => {
            v["kind"] = "flow".into();
            if let Some((name, svc)) = names.service(e.service_id) {
                v["service"] = name.into();
                v["vip"] = svc.into();
            }
            if let Some(b) = backends.and_then(|a| a.get(&e.backend_id, 0).ok()) {
                v["backend"] = addr(b.ip_be, b.port_be, 6).into();
                if let Some((node, container)) =
                    names.backend(Ipv4Addr::from(u32::from_be(b.ip_be)))
                {
                    v["node"] = node.into();
                    v["container"] = container.into();
                }
            }
        }
        _ => v["kind"] = "unknown".into(),
    }
    v.to_string()
}

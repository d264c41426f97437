//! Prometheus metrics over plain HTTP/1.0 (`GET /metrics`), read from the
//! pinned maps at scrape time plus the agent's own figures; and
//! Prometheus's HTTP service discovery (`GET /sd`, for `http_sd_configs`):
//! every active backend of every service in the cluster, as gossip tells
//! this node, one target per TCP container port.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::{lb::ServiceStats, maps, stats::Class};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::warn;

use crate::{dataplane::stats, dns::DnsStats, gossip::transport::GossipStats, shared::Shared};

pub async fn serve(
    addr: SocketAddr,
    bpffs_dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (dir, shared) = (bpffs_dir.clone(), shared.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, kind, body) =
                if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics?") {
                    ("200 OK", "text/plain; version=0.0.4", render(&dir, &shared))
                } else if req.starts_with("GET /sd ") || req.starts_with("GET /sd?") {
                    ("200 OK", "application/json", discovery(&shared))
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics or /sd\n".to_string(),
                    )
                };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if let Err(e) = async {
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(body.as_bytes()).await?;
                conn.shutdown().await
            }
            .await
            {
                warn!(error = %e, "metrics client");
            }
        });
    }
}

/// Prometheus's HTTP service discovery: a JSON list of target groups, one
/// per backend, with `__meta_mesh_*` labels (service, network, node,
/// container) for relabelling.
fn discovery(shared: &Mutex<Shared>) -> String {
    let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
    let groups: Vec<serde_json::Value> = sh
        .sd_targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "targets": t.targets,
                "labels": {
                    "__meta_mesh_service": t.service,
                    "__meta_mesh_network": t.network,
                    "__meta_mesh_node": t.node,
                    "__meta_mesh_container": t.container,
                },
            })
        })
        .collect();
    serde_json::Value::Array(groups).to_string()
}

fn open<V: aya::Pod>(dir: &std::path::Path, name: &str) -> Option<PerCpuArray<MapData, V>> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).ok()
}

/// The Prometheus text format (0.0.4), the part of it the agent writes:
/// each family's HELP and TYPE lines, then its samples.
///
/// Written here, not with prometheus-client: every series is read at
/// scrape time from the kernel's maps or the agent's own counters, so the
/// crate's registry would hold nothing but custom collectors; its encoder
/// writes OpenMetrics, which renames counters (`_total` on samples only)
/// and ends with `# EOF`, changing what every scraper and test reads; and
/// it has no summary for the latency quantiles.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped as the format asks.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{}{k}=\"{v}\"", if i > 0 { "," } else { "" });
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn summary(&mut self, name: &str, help: &str, s: &crate::status::Samples, scale: f64) {
        let q = s.summary();
        self.family(name, "summary", help);
        self.sample(name, &[("quantile", "0.5")], q.p50 * scale);
        self.sample(name, &[("quantile", "0.99")], q.p99 * scale);
        self.sample(&format!("{name}_sum"), &[], s.sum * scale);
        self.sample(&format!("{name}_count"), &[], s.count);
    }
}

/// The exposition text.
pub fn render(dir: &std::path::Path, shared: &Mutex<Shared>) -> String {
    let mut out = Text::default();
    if let Some(map) = open::<u64>(dir, maps::STATS.name)
        && let Ok(readings) = stats::read(&map)
    {
        datapath(&mut out, &readings);
    }
    let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = open::<ServiceStats>(dir, maps::SERVICE_STATS.name) {
        services(&mut out, &map, &sh);
    }
    if let Some(g) = &sh.gossip {
        gossip(&mut out, g, &sh);
    }
    if let Some(sw) = &sh.sweep {
        conntrack_sweep(&mut out, sw);
    }
    if let Some(d) = &sh.dns {
        dns(&mut out, d);
    }
    if let Some(h) = sh.status.node.handoff {
        handoff(&mut out, &h);
    }
    out.single(
        "mesh_reconcile_write_errors_total",
        "counter",
        "Map writes that failed (each retried by a later pass, with backoff).",
        sh.write_errors,
    );
    out.summary(
        "mesh_reconcile_duration_seconds",
        "Time of one reconcile pass.",
        &sh.reconcile_seconds,
        1.0,
    );
    out.summary(
        "mesh_docker_event_to_map_seconds",
        "From a Docker event to its map writes.",
        &sh.latency,
        1e-3,
    );
    out.0
}

/// The data-path counters: every counter of the table by name, and the
/// drop-class ones again as drop reasons.
fn datapath(out: &mut Text, readings: &[stats::Reading]) {
    let name = "mesh_datapath_packets_total";
    out.family(
        name,
        "counter",
        "Packets by the path they took in the data plane.",
    );
    for r in readings {
        out.sample(name, &[("counter", r.counter.name)], r.value);
    }
    let name = "mesh_drops_total";
    out.family(name, "counter", "Packets dropped, by reason.");
    for r in readings.iter().filter(|r| r.counter.class == Class::Drop) {
        out.sample(name, &[("reason", r.counter.name)], r.value);
    }
}

/// Each service's packets, bytes and new flows, summed over the CPUs.
fn services(out: &mut Text, map: &PerCpuArray<MapData, ServiceStats>, sh: &Shared) {
    let totals: Vec<(&str, &str, ServiceStats)> = sh
        .service_names
        .iter()
        .filter_map(|(id, (name, addr))| {
            let per_cpu = map.get(id, 0).ok()?;
            let s = per_cpu
                .iter()
                .fold(ServiceStats::default(), |a, s| ServiceStats {
                    packets: a.packets + s.packets,
                    bytes: a.bytes + s.bytes,
                    new_flows: a.new_flows + s.new_flows,
                });
            Some((name.as_str(), addr.as_str(), s))
        })
        .collect();
    type Field = fn(&ServiceStats) -> u64;
    let families: [(&str, &str, Field); 3] = [
        (
            "mesh_service_packets_total",
            "Packets to and from a service's VIP (or published port).",
            |s| s.packets,
        ),
        (
            "mesh_service_bytes_total",
            "Bytes to and from a service's VIP (or published port).",
            |s| s.bytes,
        ),
        (
            "mesh_service_new_flows_total",
            "Flows balanced to a backend of the service.",
            |s| s.new_flows,
        ),
    ];
    for (name, help, value) in families {
        out.family(name, "counter", help);
        for (service, address, s) in &totals {
            out.sample(
                name,
                &[("service", service), ("address", address)],
                value(s),
            );
        }
    }
}

/// Gossip's datagrams, drops and peers.
fn gossip(out: &mut Text, g: &GossipStats, sh: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, help, received, sent) in [
        (
            "mesh_gossip_datagrams_total",
            "Gossip datagrams received and sent.",
            &g.received,
            &g.sent,
        ),
        (
            "mesh_gossip_bytes_total",
            "Gossip bytes received and sent (sealed datagrams).",
            &g.bytes_received,
            &g.bytes_sent,
        ),
    ] {
        out.family(name, "counter", help);
        for (direction, v) in [("received", received), ("sent", sent)] {
            out.sample(name, &[("direction", direction)], v.load(Relaxed));
        }
    }
    for (name, help, v) in [
        (
            "mesh_gossip_split_total",
            "Gossip messages sent as two datagrams.",
            &g.split,
        ),
        (
            "mesh_gossip_withheld_total",
            "Gossip replies to unknown addresses sent without state.",
            &g.withheld,
        ),
        (
            "mesh_gossip_referenced_total",
            "Gossip messages sent compressed against a message of the peer's.",
            &g.referenced,
        ),
        (
            "mesh_gossip_pushed_total",
            "Gossip exchanges begun at once because this node learned something new.",
            &g.pushed,
        ),
    ] {
        out.single(name, "counter", help, v.load(Relaxed));
    }
    peers(out, sh);
    let name = "mesh_gossip_ignored_total";
    out.family(
        name,
        "counter",
        "What peers published and this node ignored, by kind.",
    );
    for kind in ["claim", "endpoint", "identity", "encryption"] {
        let n = sh.gossip_ignored.get(kind).copied().unwrap_or(0);
        out.sample(name, &[("kind", kind)], n);
    }
    let name = "mesh_gossip_dropped_total";
    out.family(name, "counter", "Gossip datagrams dropped, by reason.");
    for (reason, v) in [
        ("garbage", &g.garbage),
        ("bad_auth", &g.bad_auth),
        ("undecodable", &g.undecodable),
        ("oversize", &g.oversize),
        ("replayed", &g.replayed),
        ("stale", &g.stale),
        ("misaddressed", &g.misaddressed),
        ("unknown_reference", &g.unknown_reference),
        ("no_nonce", &g.no_nonce),
    ] {
        out.sample(name, &[("reason", reason)], v.load(Relaxed));
    }
}

/// The peers, and those held while they restart.
fn peers(out: &mut Text, sh: &Shared) {
    if let Some(p) = &sh.probe {
        let name = "mesh_peer_tunnel_up";
        out.family(
            name,
            "gauge",
            "1 if the peer's tunnel answered this node's probes within the last 3 s.",
        );
        for t in p.report() {
            out.sample(name, &[("peer", &t.peer)], u8::from(t.up));
        }
    }
    out.single(
        "mesh_peers",
        "gauge",
        "Nodes this node counts as peers (live, or held while they restart).",
        sh.status.node.peers.len(),
    );
    out.single(
        "mesh_peers_restarting",
        "gauge",
        "Peers whose agent said it was stopping and is not back: their endpoints are kept meanwhile.",
        sh.status.node.restarting.len(),
    );
    out.single(
        "mesh_peers_agent_down",
        "gauge",
        "Peers gossip lost whose data plane still answers through the tunnel: their agent is down, their backends are kept.",
        sh.status.node.agent_down.len(),
    );
    out.single(
        "mesh_check_diverging_peers",
        "gauge",
        "Peers whose kernel, by their last check report, holds other services, published ports or node table than this node's view says it should (meshctl check).",
        sh.check.diverging,
    );
    out.single(
        "mesh_kernel_drift_total",
        "counter",
        "Kernel table entries this agent found changed behind its back (and wrote again).",
        sh.kernel_drift,
    );
}

/// `mesh-vxlan`'s own receive counters (as of the agent's last look, every
/// 2 s): with `mesh_datapath_packets_total`'s `vxlan_handoff` and
/// `vxlan_device_in`, where a merged packet handed to it went.
fn handoff(out: &mut Text, h: &crate::status::Handoff) {
    out.single(
        "mesh_vxlan_device_rx_packets_total",
        "counter",
        "Packets mesh-vxlan's socket took in (its GRO cell may merge them again before its program sees them).",
        h.device_rx,
    );
    out.single(
        "mesh_vxlan_device_rx_dropped_total",
        "counter",
        "Packets mesh-vxlan dropped on receive.",
        h.device_dropped,
    );
    out.single(
        "mesh_vxlan_device_rx_errors_total",
        "counter",
        "Packets mesh-vxlan found in error on receive.",
        h.device_errors,
    );
}

/// The conntrack sweep's work and the tables' fill.
fn conntrack_sweep(out: &mut Text, sw: &crate::conntrack::sweep::SweepStats) {
    use std::sync::atomic::Ordering::Relaxed;

    use crate::conntrack::FlowState;
    let name = "mesh_conntrack_entries";
    out.family(
        name,
        "gauge",
        "Conntrack entries at the last sweep (two per flow), by table.",
    );
    out.sample(name, &[("table", "confirmed")], sw.entries[0].load(Relaxed));
    out.sample(name, &[("table", "new")], sw.entries[1].load(Relaxed));
    let name = "mesh_conntrack_expired_total";
    out.family(
        name,
        "counter",
        "Flows removed by the sweep after their state's timeout, by state.",
    );
    for (state, v) in FlowState::ALL.iter().zip(&sw.expired) {
        out.sample(name, &[("state", state.name())], v.load(Relaxed));
    }
    for (name, help, v) in [
        (
            "mesh_conntrack_sweep_deleted_total",
            "Conntrack entries the sweep deleted.",
            &sw.deleted,
        ),
        (
            "mesh_conntrack_sweeps_total",
            "Conntrack sweeps run.",
            &sw.runs,
        ),
        (
            "mesh_conntrack_sweep_errors_total",
            "Conntrack sweeps that failed.",
            &sw.errors,
        ),
    ] {
        out.single(name, "counter", help, v.load(Relaxed));
    }
    out.single(
        "mesh_conntrack_sweep_seconds",
        "gauge",
        "Time of the last sweep.",
        sw.last_micros.load(Relaxed) as f64 / 1e6,
    );
    out.single(
        "mesh_conntrack_sweep_seconds_total",
        "counter",
        "Time spent sweeping.",
        sw.total_micros.load(Relaxed) as f64 / 1e6,
    );
}

/// The DNS server's queries and refusals.
fn dns(out: &mut Text, d: &DnsStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "mesh_dns_queries_total";
    out.family(name, "counter", "DNS queries by type and result.");
    for ((qtype, result), n) in d.queries.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        out.sample(name, &[("type", qtype), ("result", result)], n);
    }
    for (name, help, v) in [
        (
            "mesh_dns_tcp_refused_total",
            "DNS TCP clients closed at accept: the connection limit was reached.",
            &d.tcp_refused,
        ),
        (
            "mesh_dns_refused_source_total",
            "DNS queries and TCP connections dropped: their source may not ask.",
            &d.refused_source,
        ),
        (
            "mesh_dns_malformed_total",
            "DNS packets dropped as malformed.",
            &d.malformed,
        ),
        (
            "mesh_dns_kept_answers_total",
            "DNS queries over UDP answered with the bytes kept from the same query before.",
            &d.kept_answers,
        ),
    ] {
        out.single(name, "counter", help, v.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::stats::{COUNTERS, Class};

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut t = Text::default();
        t.sample("m", &[("a", "x\"y\\z\nw"), ("b", "c")], 1);
        assert_eq!(t.0, "m{a=\"x\\\"y\\\\z\\nw\",b=\"c\"} 1\n");
    }

    #[test]
    fn the_vxlan_devices_counters_are_exported() {
        let mut t = Text::default();
        handoff(
            &mut t,
            &crate::status::Handoff {
                handed: 10,
                device_rx: 9,
                device_dropped: 2,
                device_errors: 1,
                back: 7,
                unmarked: 0,
            },
        );
        for line in [
            "mesh_vxlan_device_rx_packets_total 9",
            "mesh_vxlan_device_rx_dropped_total 2",
            "mesh_vxlan_device_rx_errors_total 1",
            "# TYPE mesh_vxlan_device_rx_dropped_total counter",
        ] {
            assert!(t.0.lines().any(|l| l == line), "{line} in:\n{}", t.0);
        }
    }

    /// Every drop reason of the counter table is a `mesh_drops_total`
    /// series, and every counter a `mesh_datapath_packets_total` one.
    #[test]
    fn every_drop_reason_is_exported() {
        let readings: Vec<stats::Reading> = COUNTERS
            .iter()
            .enumerate()
            .map(|(i, counter)| stats::Reading {
                counter,
                value: 1000 + i as u64,
            })
            .collect();
        let mut text = Text::default();
        datapath(&mut text, &readings);
        let out = text.0;
        let drops: Vec<_> = COUNTERS.iter().filter(|c| c.class == Class::Drop).collect();
        assert!(drops.len() >= 5, "the table has drop reasons");
        for (i, c) in COUNTERS.iter().enumerate() {
            let series = format!(
                "mesh_datapath_packets_total{{counter=\"{}\"}} {}\n",
                c.name,
                1000 + i
            );
            assert!(out.contains(&series), "{series} missing from:\n{out}");
            let drop = format!("mesh_drops_total{{reason=\"{}\"}} {}\n", c.name, 1000 + i);
            assert_eq!(
                out.contains(&drop),
                c.class == Class::Drop,
                "{}: drop series present iff it is a drop reason:\n{out}",
                c.name
            );
        }
    }

    /// deploy/grafana/mesh-agent.json asks only for metrics this module
    /// exports (a renamed metric breaks the dashboard, not silently).
    #[test]
    fn the_dashboard_asks_only_for_metrics_the_agent_exports() {
        let dashboard = include_str!("../../deploy/grafana/mesh-agent.json");
        let source = include_str!("metrics.rs");
        let mut names = std::collections::BTreeSet::new();
        let mut rest = dashboard;
        while let Some(at) = rest.find("mesh_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
        assert!(names.len() > 10, "{names:?}");
        for name in names {
            assert!(
                source.contains(&format!("\"{name}\"")),
                "the dashboard asks for {name}, which /metrics does not export"
            );
        }
    }
}

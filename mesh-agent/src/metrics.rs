//! Prometheus metrics over plain HTTP/1.0 (`GET /metrics`), read from the
//! pinned maps at scrape time plus the agent's own figures.

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

use crate::{dataplane::stats, shared::Shared};

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
            let (status, body) =
                if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics?") {
                    ("200 OK", render(&dir, &shared))
                } else {
                    ("404 Not Found", "try /metrics\n".to_string())
                };
            let head = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
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

fn open<V: aya::Pod>(dir: &std::path::Path, name: &str) -> Option<PerCpuArray<MapData, V>> {
    let data = MapData::from_pin(dir.join(name)).ok()?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).ok()
}

/// The exposition text.
pub fn render(dir: &std::path::Path, shared: &Mutex<Shared>) -> String {
    let mut out = String::new();
    if let Some(map) = open::<u64>(dir, maps::STATS.name)
        && let Ok(readings) = stats::read(&map)
    {
        datapath(&mut out, &readings);
    }
    let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(map) = open::<ServiceStats>(dir, maps::SERVICE_STATS.name) {
        out.push_str("# HELP mesh_service_packets_total Packets to and from a service VIP.\n# TYPE mesh_service_packets_total counter\n");
        let mut bytes = String::new();
        let mut flows = String::new();
        for (id, (name, addr)) in &sh.service_names {
            let Ok(per_cpu) = map.get(id, 0) else {
                continue;
            };
            let s = per_cpu
                .iter()
                .fold(ServiceStats::default(), |a, s| ServiceStats {
                    packets: a.packets + s.packets,
                    bytes: a.bytes + s.bytes,
                    new_flows: a.new_flows + s.new_flows,
                });
            let labels = format!("service=\"{name}\",address=\"{addr}\"");
            let _ = writeln!(out, "mesh_service_packets_total{{{labels}}} {}", s.packets);
            let _ = writeln!(bytes, "mesh_service_bytes_total{{{labels}}} {}", s.bytes);
            let _ = writeln!(
                flows,
                "mesh_service_new_flows_total{{{labels}}} {}",
                s.new_flows
            );
        }
        out.push_str("# TYPE mesh_service_bytes_total counter\n");
        out.push_str(&bytes);
        out.push_str("# TYPE mesh_service_new_flows_total counter\n");
        out.push_str(&flows);
    }
    if let Some(g) = &sh.gossip {
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
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (direction, v) in [("received", received), ("sent", sent)] {
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{direction}\"}} {}",
                    v.load(Relaxed)
                );
            }
        }
        out.push_str("# HELP mesh_gossip_split_total Gossip messages sent as two datagrams.\n# TYPE mesh_gossip_split_total counter\n");
        let _ = writeln!(out, "mesh_gossip_split_total {}", g.split.load(Relaxed));
        out.push_str("# HELP mesh_gossip_withheld_total Gossip replies to unknown addresses sent without state.\n# TYPE mesh_gossip_withheld_total counter\n");
        let _ = writeln!(
            out,
            "mesh_gossip_withheld_total {}",
            g.withheld.load(Relaxed)
        );
        out.push_str("# HELP mesh_gossip_referenced_total Gossip messages sent compressed against a message of the peer's.\n# TYPE mesh_gossip_referenced_total counter\n");
        let _ = writeln!(
            out,
            "mesh_gossip_referenced_total {}",
            g.referenced.load(Relaxed)
        );
        out.push_str("# HELP mesh_gossip_pushed_total Gossip exchanges begun at once because this node learned something new.\n# TYPE mesh_gossip_pushed_total counter\n");
        let _ = writeln!(out, "mesh_gossip_pushed_total {}", g.pushed.load(Relaxed));
        out.push_str("# HELP mesh_peers Nodes this node counts as peers (live, or held while they restart).\n# TYPE mesh_peers gauge\n");
        let _ = writeln!(out, "mesh_peers {}", sh.status.node.peers.len());
        out.push_str("# HELP mesh_peers_restarting Peers whose agent said it was stopping and is not back: their endpoints are kept meanwhile.\n# TYPE mesh_peers_restarting gauge\n");
        let _ = writeln!(
            out,
            "mesh_peers_restarting {}",
            sh.status.node.restarting.len()
        );
        out.push_str("# HELP mesh_gossip_ignored_total What peers published and this node ignored, by kind.\n# TYPE mesh_gossip_ignored_total counter\n");
        for kind in ["claim", "endpoint", "identity"] {
            let _ = writeln!(
                out,
                "mesh_gossip_ignored_total{{kind=\"{kind}\"}} {}",
                sh.gossip_ignored.get(kind).copied().unwrap_or(0)
            );
        }
        out.push_str("# HELP mesh_gossip_dropped_total Gossip datagrams dropped, by reason.\n# TYPE mesh_gossip_dropped_total counter\n");
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
            let _ = writeln!(
                out,
                "mesh_gossip_dropped_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
    if let Some(sw) = &sh.sweep {
        conntrack_sweep(&mut out, sw);
    }
    if let Some(dns) = &sh.dns {
        out.push_str("# HELP mesh_dns_queries_total DNS queries by type and result.\n# TYPE mesh_dns_queries_total counter\n");
        for ((qtype, result), n) in dns.queries.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "mesh_dns_queries_total{{type=\"{qtype}\",result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP mesh_dns_tcp_refused_total DNS TCP clients closed at accept: the connection limit was reached.\n# TYPE mesh_dns_tcp_refused_total counter\n");
        let _ = writeln!(
            out,
            "mesh_dns_tcp_refused_total {}",
            dns.tcp_refused.load(std::sync::atomic::Ordering::Relaxed)
        );
        out.push_str("# HELP mesh_dns_refused_source_total DNS queries and TCP connections dropped: their source may not ask.\n# TYPE mesh_dns_refused_source_total counter\n");
        let _ = writeln!(
            out,
            "mesh_dns_refused_source_total {}",
            dns.refused_source
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        out.push_str("# HELP mesh_dns_malformed_total DNS packets dropped as malformed.\n# TYPE mesh_dns_malformed_total counter\n");
        let _ = writeln!(
            out,
            "mesh_dns_malformed_total {}",
            dns.malformed.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    out.push_str("# HELP mesh_reconcile_write_errors_total Map writes that failed (each retried by a later pass, with backoff).\n# TYPE mesh_reconcile_write_errors_total counter\n");
    let _ = writeln!(out, "mesh_reconcile_write_errors_total {}", sh.write_errors);
    summary(
        &mut out,
        "mesh_reconcile_duration_seconds",
        "Time of one reconcile pass.",
        &sh.reconcile_seconds,
        1.0,
    );
    summary(
        &mut out,
        "mesh_docker_event_to_map_seconds",
        "From a Docker event to its map writes.",
        &sh.latency,
        1e-3,
    );
    out
}

/// The data-path counters: every counter of the table by name, and the
/// drop-class ones again as drop reasons.
pub fn datapath(out: &mut String, readings: &[stats::Reading]) {
    out.push_str(
        "# HELP mesh_datapath_packets_total Packets by the path they took in the data plane.\n",
    );
    out.push_str("# TYPE mesh_datapath_packets_total counter\n");
    for r in readings {
        let _ = writeln!(
            out,
            "mesh_datapath_packets_total{{counter=\"{}\"}} {}",
            r.counter.name, r.value
        );
    }
    out.push_str(
        "# HELP mesh_drops_total Packets dropped, by reason.\n# TYPE mesh_drops_total counter\n",
    );
    for r in readings.iter().filter(|r| r.counter.class == Class::Drop) {
        let _ = writeln!(
            out,
            "mesh_drops_total{{reason=\"{}\"}} {}",
            r.counter.name, r.value
        );
    }
}

/// The conntrack sweep's work and the tables' fill.
pub fn conntrack_sweep(out: &mut String, sw: &crate::conntrack::sweep::SweepStats) {
    use std::sync::atomic::Ordering::Relaxed;

    use crate::conntrack::FlowState;
    let mut series = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    series(
        "mesh_conntrack_entries",
        "gauge",
        "Conntrack entries at the last sweep (two per flow), by table.",
        &[
            ("{table=\"confirmed\"}".into(), sw.entries[0].load(Relaxed)),
            ("{table=\"new\"}".into(), sw.entries[1].load(Relaxed)),
        ],
    );
    let expired: Vec<(String, u64)> = FlowState::ALL
        .iter()
        .zip(&sw.expired)
        .map(|(s, v)| (format!("{{state=\"{}\"}}", s.name()), v.load(Relaxed)))
        .collect();
    series(
        "mesh_conntrack_expired_total",
        "counter",
        "Flows removed by the sweep after their state's timeout, by state.",
        &expired,
    );
    series(
        "mesh_conntrack_sweep_deleted_total",
        "counter",
        "Conntrack entries the sweep deleted.",
        &[(String::new(), sw.deleted.load(Relaxed))],
    );
    series(
        "mesh_conntrack_sweeps_total",
        "counter",
        "Conntrack sweeps run.",
        &[(String::new(), sw.runs.load(Relaxed))],
    );
    series(
        "mesh_conntrack_sweep_errors_total",
        "counter",
        "Conntrack sweeps that failed.",
        &[(String::new(), sw.errors.load(Relaxed))],
    );
    let _ = writeln!(
        out,
        "# HELP mesh_conntrack_sweep_seconds Time of the last sweep.\n# TYPE mesh_conntrack_sweep_seconds gauge\nmesh_conntrack_sweep_seconds {}",
        sw.last_micros.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP mesh_conntrack_sweep_seconds_total Time spent sweeping.\n# TYPE mesh_conntrack_sweep_seconds_total counter\nmesh_conntrack_sweep_seconds_total {}",
        sw.total_micros.load(Relaxed) as f64 / 1e6
    );
}

fn summary(out: &mut String, name: &str, help: &str, s: &crate::status::Samples, scale: f64) {
    let q = s.summary();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    let _ = writeln!(out, "{name}{{quantile=\"0.5\"}} {}", q.p50 * scale);
    let _ = writeln!(out, "{name}{{quantile=\"0.99\"}} {}", q.p99 * scale);
    let _ = writeln!(out, "{name}_sum {}", s.sum * scale);
    let _ = writeln!(out, "{name}_count {}", s.count);
}

#[cfg(test)]
mod tests {
    use mesh_common::stats::{COUNTERS, Class};

    use super::*;

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
        let mut out = String::new();
        datapath(&mut out, &readings);
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
}

//! `meshctl status`: the agent's own view, from its control socket.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::{
    CtlError,
    table::{Table, render},
};

pub(super) fn status_view(path: &Path, json: bool) -> Result<String, CtlError> {
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
    let _ = writeln!(out, "cluster: {}", st.node.cluster_line());
    if let Some((primary, older)) = st.node.cluster_keys.split_first() {
        let _ = writeln!(
            out,
            "keys:    {primary} (primary){}",
            older
                .iter()
                .map(|k| format!(", {k} (accepted)"))
                .collect::<String>()
        );
    }
    if !st.node.encryption.is_empty() {
        let _ = writeln!(out, "crypto:  {}", st.node.encryption);
    }
    if let Some(line) = st.node.tunnels_line() {
        let _ = writeln!(out, "tunnels: {line}");
    }
    if !st.node.host_link.is_empty() {
        let _ = writeln!(out, "host:    {}", st.node.host_link);
    }
    if !st.node.tunnel_gro.is_empty() {
        let _ = writeln!(out, "gro:     {}", st.node.tunnel_gro);
    }
    if let Some(line) = st.node.handoff_line() {
        let _ = writeln!(out, "         {line}");
    }
    if !st.node.sockets.is_empty() {
        let _ = writeln!(out, "sockets: {}", st.node.sockets);
    }
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
    if !st.publish_conflicts.is_empty() {
        out.push_str("\n\npublished ports not served:\n");
        for c in &st.publish_conflicts {
            let _ = writeln!(out, "  {c}");
        }
    }
    if !st.network_conflicts.is_empty() {
        out.push_str("\n\nnetworks:\n");
        for c in &st.network_conflicts {
            let _ = writeln!(out, "  {c}");
        }
    }
    if !st.gossip_ignored.is_empty() {
        out.push_str("\n\nignored from gossip:\n");
        for c in &st.gossip_ignored {
            out.push_str(&format!("  {c}\n"));
        }
    }
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
    network: String,
    vip: String,
    ports: String,
    published: String,
    active: usize,
    draining: usize,
    waiting: usize,
}

impl From<&crate::status::ServiceStatus> for StatusRow {
    fn from(s: &crate::status::ServiceStatus) -> Self {
        StatusRow {
            name: s.name.clone(),
            network: if s.network.is_empty() {
                crate::network::DEFAULT.into()
            } else {
                s.network.clone()
            },
            vip: s.vip.clone(),
            ports: if s.ports.is_empty() {
                "-".into()
            } else {
                s.ports.join(", ")
            },
            published: if s.published.is_empty() {
                "-".into()
            } else {
                s.published.join(", ")
            },
            active: s.active,
            draining: s.draining,
            waiting: s.waiting,
        }
    }
}

impl Table for StatusRow {
    const HEADER: &'static [&'static str] = &[
        "SERVICE",
        "NETWORK",
        "VIP",
        "PORTS",
        "PUBLISHED",
        "ACTIVE",
        "DRAINING",
        "WAITING",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.network.clone(),
            self.vip.clone(),
            self.ports.clone(),
            self.published.clone(),
            self.active.to_string(),
            self.draining.to_string(),
            self.waiting.to_string(),
        ]
    }
}

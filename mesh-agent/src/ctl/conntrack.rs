//! `meshctl conntrack`: tracked flows.

use mesh_common::{
    ct::{CT_F_INGRESS, CT_F_RETURN, CtEntry, CtKey, dir, tcp_flag},
    lb::ServiceKey,
};
use serde::Serialize;
use std::collections::BTreeMap;

use super::{CtlError, addr, proto_name, service_name, table::Table};
use crate::{conntrack::FlowState, dataplane::lb::LbMaps};

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
    /// The flow's state (both directions): `FlowState::name`.
    pub state: String,
    /// `confirmed` or `new` (the table the flow is in).
    pub table: String,
    /// Routing mesh: `ingress` (the flow came in through this node's
    /// published port) or `via A.B.C.D` (through that node's: replies go
    /// back there); empty otherwise.
    pub mesh: String,
    pub tcp_flags: String,
    pub age_seconds: f64,
    pub idle_seconds: f64,
}

impl Table for CtRow {
    const HEADER: &'static [&'static str] = &[
        "DIR", "PROTO", "SRC", "DST", "NAT", "BACKEND", "STATE", "MESH", "FLAGS", "AGE", "IDLE",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.direction.clone(),
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
            self.nat.clone(),
            self.backend_id.to_string(),
            self.state.clone(),
            if self.mesh.is_empty() {
                "-".into()
            } else {
                self.mesh.clone()
            },
            self.tcp_flags.clone(),
            format!("{:.1}s", self.age_seconds),
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

/// The tracked flows; `now`: conntrack's clock (`dataplane::clock`).
pub fn conntrack(
    lb: &LbMaps,
    service: Option<&ServiceKey>,
    all: bool,
    now: u64,
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
    let secs = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    let mut rows = Vec::new();
    for (table, new) in [(&lb.conntrack, false), (&lb.conntrack_new, true)] {
        // Entries can vanish (LRU) while we iterate: skip those.
        let entries: BTreeMap<CtKey, CtEntry> = table.iter().filter_map(Result::ok).collect();
        for (k, e) in &entries {
            if (!all && k.dir != dir::FORWARD) || want_id.is_some_and(|id| id != e.service_id) {
                continue;
            }
            // The state needs both directions of the flow.
            let (fwd, rev) = if k.dir == dir::FORWARD {
                (Some(e), entries.get(&k.reverse_of(e)))
            } else {
                (None, Some(e))
            };
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
                state: FlowState::of(k.proto, fwd, rev, new).name().into(),
                table: if new { "new" } else { "confirmed" }.into(),
                mesh: rev.map_or(String::new(), |r| {
                    if r.flags & CT_F_INGRESS != 0 {
                        "ingress".into()
                    } else if r.flags & CT_F_RETURN != 0 {
                        format!(
                            "via {}",
                            std::net::Ipv4Addr::from(u32::from_be(r.nat_ip_be))
                        )
                    } else {
                        String::new()
                    }
                }),
                tcp_flags: flags(e.tcp_flags),
                age_seconds: secs(e.created_ns),
                idle_seconds: secs(e.last_seen_ns),
            });
        }
    }
    rows.sort_by(|a, b| (&a.direction, &a.src, &a.dst).cmp(&(&b.direction, &b.src, &b.dst)));
    Ok(rows)
}

//! `meshctl conntrack`: tracked flows.

use mesh_common::{
    ct::{CtEntry, CtKey, dir, tcp_flag},
    lb::ServiceKey,
};
use serde::Serialize;

use super::{CtlError, addr, proto_name, service_name, table::Table};
use crate::dataplane::lb::LbMaps;

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

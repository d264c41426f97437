//! The consistency check's share of the daemon (`crate::check`,
//! `meshctl check`).
//!
//! - **Self-check**: the kernel's tables read back and compared with what
//!   the agent wrote (services, backends, rings, published ports, node and
//!   peer tables): what differs was changed behind the agent's back. It
//!   is logged, counted, published in this node's report, and repaired:
//!   the agent takes the kernel's tables as what it wrote and the pass
//!   that follows writes the difference back. Every [`SELF_CHECK_EVERY`],
//!   and at once when a peer asks for a check round.
//! - **Report**: the digest of this node's kernel (`check::digest`) and
//!   its last drift, in gossip under `check`, set when it changes.
//! - **Rounds**: `meshctl check` publishes `checkreq` = N; every node
//!   answers with a fresh report naming `ASKER/N`, so one run compares
//!   what every kernel holds now.
//! - **Comparison**, every pass: each peer's digest against this node's
//!   own kernel (the same services and published ports everywhere; a node
//!   table of every other node's slices), the differences with the time
//!   they were first seen, for `meshctl check` and `/metrics`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_common::tunnel::Node;
use tracing::{info, warn};

use super::Daemon;
use crate::{
    check::{self, Report, Service},
    gossip::peers::{self, Peer},
    shared::{CheckRow, CheckView},
};

/// How often the kernel is checked against what was written, unasked.
pub(super) const SELF_CHECK_EVERY: Duration = Duration::from_secs(30);

/// What the last self-check found, for the comparison and the report.
#[derive(Default)]
pub(super) struct CheckState {
    /// This node's services as its kernel holds them (to name the ones
    /// that differ elsewhere).
    services: Vec<Service>,
    /// Its node table as entries (`check::digest`'s form).
    nodes: Vec<String>,
    /// The report as last published, and the rounds answered.
    report: Report,
    published: bool,
    acks: String,
    /// Peers' check rounds answered (by peer), and this node's own round.
    answered: BTreeMap<String, u64>,
    own_round: u64,
    /// When each peer was first seen to differ.
    differs_since: BTreeMap<String, u64>,
    /// The last comparison per peer, by the two digests it compared: a
    /// pass compares again only what changed (at 200 nodes a pass would
    /// otherwise rebuild 200 expected node tables).
    compared: BTreeMap<String, (check::Digest, check::Digest, Vec<String>)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node table entry as every node writes it for a slice.
fn node_entry(slice_be: u32, n: &Node) -> String {
    format!(
        "{} {} {} {}",
        Ipv4Addr::from(u32::from_be(slice_be)),
        Ipv4Addr::from(u32::from_be(n.underlay_ip_be)),
        mesh_common::mac::Mac(n.inner_mac),
        n.vni
    )
}

impl Daemon {
    /// Reads the kernel's tables, compares them with what was written,
    /// repairs what drifted, and publishes this node's report (answering
    /// `round` when given). Returns whether a pass is needed (a repair).
    pub(super) fn self_check(&mut self, round: Option<String>) -> bool {
        let Some(c) = &self.cluster else { return false };
        let actual = match self.lb.read_actual() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "check: reading the load-balancing maps failed");
                return false;
            }
        };
        let (nodes, peers_tbl, published) = match (
            self.overlay.read_nodes(),
            self.overlay.read_peers(),
            self.lb.read_published(),
        ) {
            (Ok(n), Ok(p), Ok(x)) => (n, p, x),
            _ => {
                warn!("check: reading the overlay maps failed");
                return false;
            }
        };
        // Drift: the kernel against what this agent wrote.
        let w = &self.written;
        let svc_k: BTreeMap<String, u32> = actual
            .services
            .iter()
            .map(|(a, id)| (a.to_string(), *id))
            .collect();
        let svc_w: BTreeMap<String, u32> =
            w.lb.services
                .iter()
                .map(|(a, id)| (a.to_string(), *id))
                .collect();
        let mut drift = check::drift("service", &svc_k, &svc_w);
        let backend = |b: &mesh_common::lb::Backend| {
            format!(
                "{}:{} state {}",
                Ipv4Addr::from(u32::from_be(b.ip_be)),
                u16::from_be(b.port_be),
                b.state
            )
        };
        let be_k: BTreeMap<u32, String> = actual
            .backends
            .iter()
            .map(|(i, b)| (*i, backend(b)))
            .collect();
        let be_w: BTreeMap<u32, String> =
            w.lb.backends
                .iter()
                .map(|(i, b)| (*i, backend(b)))
                .collect();
        drift.extend(check::drift("backend", &be_k, &be_w));
        let ring_k: BTreeMap<u32, u64> = actual
            .rings
            .iter()
            .map(|(i, r)| (*i, r.fingerprint))
            .collect();
        let ring_w: BTreeMap<u32, u64> =
            w.lb.rings
                .iter()
                .map(|(i, r)| (*i, r.fingerprint))
                .collect();
        drift.extend(check::drift("ring of service", &ring_k, &ring_w));
        let pub_k: BTreeMap<String, u32> = published
            .iter()
            .map(|(k, v)| (publish_key(k), *v))
            .collect();
        let pub_w: BTreeMap<String, u32> = w
            .published
            .iter()
            .map(|(k, v)| (publish_key(k), v.service_id))
            .collect();
        drift.extend(check::drift("published port", &pub_k, &pub_w));
        let node_k: BTreeMap<String, String> = nodes
            .iter()
            .map(|(k, n)| (slice(*k), node_entry(*k, n)))
            .collect();
        let node_w: BTreeMap<String, String> = w
            .nodes
            .iter()
            .map(|(k, n)| (slice(*k), node_entry(*k, n)))
            .collect();
        drift.extend(check::drift("node slice", &node_k, &node_w));
        let peer_k: BTreeMap<String, String> = peers_tbl
            .iter()
            .map(|(k, v)| (slice(*k), slice(*v)))
            .collect();
        let peer_w: BTreeMap<String, String> = w
            .peers
            .iter()
            .map(|(k, v)| (slice(*k), slice(*v)))
            .collect();
        drift.extend(check::drift("peer", &peer_k, &peer_w));

        // The portable digest: backends by address, rings by the
        // addresses of their slots.
        let mut services = Vec::new();
        for (addr, id) in &actual.services {
            let mut backends: Vec<String> = actual
                .backends
                .values()
                .filter(|b| b.service_id == *id)
                .map(backend)
                .collect();
            backends.sort();
            let ring = self
                .lb
                .ring(*id)
                .map(|slots| {
                    check::ring_hash(slots.iter().map(|s| {
                        actual
                            .backends
                            .get(s)
                            .map_or(0, |b| check::backend_key(b.ip_be, b.port_be))
                    }))
                })
                .unwrap_or(0);
            services.push(Service {
                addr: addr.to_string(),
                backends,
                ring,
            });
        }
        let published_lines: Vec<String> = published
            .iter()
            .map(|(k, id)| {
                let svc = actual
                    .services
                    .iter()
                    .find(|(_, s)| **s == *id)
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_default();
                format!("{} -> {svc}", publish_key(k))
            })
            .collect();
        let node_lines: Vec<String> = node_k.into_values().collect();
        let digest = check::digest(&services, &published_lines, &node_lines);

        let repaired = !drift.is_empty();
        let report = Report {
            digest,
            drift_count: drift.len(),
            drift: drift.iter().take(check::MAX_DRIFT_LINES).cloned().collect(),
            drift_at_ms: if repaired {
                now_ms()
            } else {
                self.check.report.drift_at_ms
            },
        };
        if repaired {
            warn!(
                differences = drift.len(),
                first = %drift[0],
                "the kernel's tables differ from what this agent wrote (changed behind its back): writing them again"
            );
            let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.kernel_drift += drift.len() as u64;
            drop(sh);
            // What the kernel holds becomes what was written; the pass
            // writes the difference to the desired state.
            self.written.lb = actual;
            self.written.nodes = nodes;
            self.written.peers = peers_tbl;
            self.written.published = published
                .into_iter()
                .map(|(k, service_id)| (k, mesh_common::lb::Published { service_id }))
                .collect();
        }
        self.check.services = services;
        self.check.nodes = node_lines;
        if !self.check.published || report != self.check.report {
            match serde_json::to_string(&report) {
                Ok(v) if c.membership.try_set(peers::KEY_CHECK, &v) => {
                    self.check.published = true;
                }
                Ok(_) => self.retry = true,
                Err(e) => warn!(error = %e, "check: encoding the report"),
            }
            self.check.report = report;
        }
        // The round answered, after the report it vouches for.
        if let Some(r) = round {
            let acks = check::answer(&self.check.acks, &r);
            if c.membership.try_set(peers::KEY_CHECK_ACK, &acks) {
                self.check.acks = acks;
            } else {
                self.retry = true;
            }
        }
        repaired
    }

    /// A check round of this node's (`meshctl check`): asks every peer
    /// for a fresh report; its name (`NODE/N`).
    pub(super) fn start_check_round(&mut self) -> Option<String> {
        let c = self.cluster.as_ref()?;
        self.check.own_round += 1;
        let n = self.check.own_round;
        let me = c.node_id.clone();
        if !c.membership.try_set(peers::KEY_CHECK_REQ, &n.to_string()) {
            return None;
        }
        let round = format!("{me}/{n}");
        if self.self_check(Some(round.clone())) {
            self.pass();
        }
        Some(round)
    }

    /// The rounds peers asked for that this node has not answered yet.
    pub(super) fn rounds_asked(&mut self, peers: &BTreeMap<String, Peer>) -> Vec<String> {
        let mut asked = Vec::new();
        for (name, p) in peers {
            let Some(n) = p.check_req else { continue };
            if self.check.answered.get(name) != Some(&n) {
                self.check.answered.insert(name.clone(), n);
                asked.push(format!("{name}/{n}"));
            }
        }
        asked
    }

    /// Compares every peer's report with this node's kernel; the rows of
    /// `meshctl check` and the count of peers that differ.
    pub(super) fn compare_reports(&mut self, peers: &BTreeMap<String, Peer>) {
        let Some(c) = &self.cluster else { return };
        let now = now_ms();
        let mine = &self.check.report;
        // This node's own entries, as the others should hold them.
        let own: Vec<String> = self
            .own_slices()
            .into_iter()
            .map(|(k, n)| node_entry(k, &n))
            .collect();
        let mut rows = vec![CheckRow {
            node: c.node_id.clone(),
            answered: check::acks(&self.check.acks),
            differences: mine.drift.iter().map(|d| format!("kernel: {d}")).collect(),
            since_ms: mine.drift_at_ms,
            drift_count: mine.drift_count,
            this_node: true,
        }];
        let mut diverging = 0;
        for (name, p) in peers {
            let Some(theirs) = &p.check else {
                rows.push(CheckRow {
                    node: name.clone(),
                    differences: vec!["no report (an agent without meshctl check?)".into()],
                    since_ms: 0,
                    ..CheckRow::default()
                });
                continue;
            };
            let cached = self
                .check
                .compared
                .get(name)
                .filter(|(a, b, _)| a == &mine.digest && b == &theirs.digest)
                .map(|(_, _, d)| d.clone());
            let diffs = match cached {
                Some(d) => d,
                None => {
                    let d = self.compare_peer(p, theirs, &own);
                    self.check.compared.insert(
                        name.clone(),
                        (
                            self.check.report.digest.clone(),
                            theirs.digest.clone(),
                            d.clone(),
                        ),
                    );
                    d
                }
            };
            let mut differences: Vec<String> = theirs
                .drift
                .iter()
                .map(|d| format!("kernel: {d}"))
                .collect();
            differences.extend(diffs);
            let since = if differences.is_empty() {
                self.check.differs_since.remove(name);
                0
            } else {
                diverging += 1;
                *self.check.differs_since.entry(name.clone()).or_insert(now)
            };
            rows.push(CheckRow {
                node: name.clone(),
                answered: p.check_acks.clone(),
                differences,
                since_ms: since,
                drift_count: theirs.drift_count,
                this_node: false,
            });
        }
        self.check
            .differs_since
            .retain(|n, _| peers.contains_key(n));
        self.check.compared.retain(|n, _| peers.contains_key(n));
        let mut sh = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        sh.check = CheckView {
            rows,
            diverging,
            round: sh.check.round.clone(),
        };
    }

    /// How peer `p`'s digest differs from this node's kernel (`own`: this
    /// node's node table entries as the others should hold them).
    fn compare_peer(&self, p: &Peer, theirs: &Report, own: &[String]) -> Vec<String> {
        let their_own: Vec<String> = p
            .underlay
            .map(|ip| {
                let ip = ip.to_string();
                self.check
                    .nodes
                    .iter()
                    .filter(|e| e.split(' ').nth(1) == Some(ip.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let want = check::expected_nodes(&self.check.nodes, &their_own, own);
        let want_hash = check::digest(&[], &[], &want).nodes_hash;
        check::compare(
            &self.check.report.digest,
            &self.check.services,
            &want_hash,
            &theirs.digest,
        )
    }

    /// This node's slices of every network as its peers' node tables hold
    /// them.
    fn own_slices(&self) -> Vec<(u32, Node)> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let index = self.slice_index();
        let me = Node {
            underlay_ip_be: c.local.underlay_ip_be,
            inner_mac: c.local.underlay_mac,
            ..Node::default()
        };
        let mut out = vec![(u32::from(self.settings.node_subnet.base).to_be(), me)];
        for n in &self.nets.served {
            out.push((
                u32::from(n.slice(index).base).to_be(),
                Node { vni: n.vni, ..me },
            ));
        }
        out
    }

    /// After a pass: answers the rounds peers asked for and compares the
    /// reports; a self-check that repaired something runs another pass.
    pub(super) fn after_pass_check(&mut self, peers: &BTreeMap<String, Peer>) -> bool {
        let asked = self.rounds_asked(peers);
        let mut repaired = false;
        for r in asked {
            info!(round = %r, "check round asked");
            repaired |= self.self_check(Some(r));
        }
        self.compare_reports(peers);
        repaired
    }
}

fn slice(be: u32) -> String {
    Ipv4Addr::from(u32::from_be(be)).to_string()
}

fn publish_key(k: &mesh_common::lb::PublishedKey) -> String {
    let proto = if k.proto == mesh_common::lb::PROTO_UDP {
        "udp"
    } else {
        "tcp"
    };
    format!("{}/{proto}", u16::from_be(k.port_be))
}

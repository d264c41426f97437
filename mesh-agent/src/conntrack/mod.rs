//! Conntrack lifetime: what state a tracked flow is in, when it expires,
//! and which entries a sweep removes. Pure (no maps, no clock): the
//! sweeper (`sweep.rs`) reads the two tables and deletes what [`plan`]
//! says; `meshctl conntrack` shows the same [`FlowState`].
//!
//! The kernel never expires an entry (`mesh_common::ct`): it keeps last
//! seen, creation time, the TCP flags of each direction and whether the
//! backend answered. Forward and reverse entries are judged as a pair (the
//! flow's state needs both directions, its idleness is the later of the
//! two) and removed as a pair.

pub mod sweep;

use std::{collections::HashSet, time::Duration};

use mesh_common::ct::{CT_F_REPLIED, CtEntry, CtKey, dir, tcp_flag};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// How long a flow may stay idle, by state. Configurable (agent flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// An established TCP connection (also one closed in one direction
    /// only). Hours, not IPVS's 900 s (moby#31208).
    pub tcp_established: Duration,
    /// A TCP flow not confirmed yet (handshake not completed).
    pub tcp_new: Duration,
    /// A TCP flow closed (FIN both ways, or a RST).
    pub tcp_closed: Duration,
    /// A UDP flow (answered or not) and any other protocol.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_new: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// The state of a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowState {
    /// TCP, handshake not completed (in the new table).
    TcpNew,
    /// TCP, confirmed and open (or half-closed).
    TcpEstablished,
    /// TCP, FIN both ways or a RST.
    TcpClosed,
    /// UDP without an answer yet.
    UdpNew,
    /// UDP, answered.
    Udp,
}

impl FlowState {
    pub const ALL: [FlowState; 5] = [
        FlowState::TcpNew,
        FlowState::TcpEstablished,
        FlowState::TcpClosed,
        FlowState::UdpNew,
        FlowState::Udp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowState::TcpNew => "tcp_new",
            FlowState::TcpEstablished => "tcp_established",
            FlowState::TcpClosed => "tcp_closed",
            FlowState::UdpNew => "udp_new",
            FlowState::Udp => "udp",
        }
    }

    /// The state of a flow from its forward entry (the client's direction),
    /// its reverse entry if it still has one, and its table.
    pub fn of(proto: u8, fwd: Option<&CtEntry>, rev: Option<&CtEntry>, new: bool) -> FlowState {
        let flags = |e: Option<&CtEntry>| e.map_or(0, |e| e.tcp_flags);
        if proto == IPPROTO_TCP {
            let (f, r) = (flags(fwd), flags(rev));
            if (f | r) & tcp_flag::RST != 0 || (f & r & tcp_flag::FIN != 0) {
                FlowState::TcpClosed
            } else if new {
                FlowState::TcpNew
            } else {
                FlowState::TcpEstablished
            }
        } else if rev.is_some_and(|r| r.flags & CT_F_REPLIED != 0) || (!new && proto == IPPROTO_UDP)
        {
            FlowState::Udp
        } else {
            FlowState::UdpNew
        }
    }

    pub fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            FlowState::TcpNew => t.tcp_new,
            FlowState::TcpEstablished => t.tcp_established,
            FlowState::TcpClosed => t.tcp_closed,
            FlowState::UdpNew | FlowState::Udp => t.udp,
        }
    }
}

/// What a sweep of one table decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to delete: both entries of every expired pair, and expired
    /// entries whose partner is gone.
    pub delete: Vec<CtKey>,
    /// Flows expired, by state (an orphan counts as one flow).
    pub expired: Vec<(FlowState, u64)>,
    /// Flows (pairs and orphans) seen.
    pub flows: u64,
}

/// The sweep's decision for one table (`new`: the new-flow table) at
/// monotonic time `now_ns`: every flow idle for longer than its state's
/// timeout goes, both entries at once.
pub fn plan(entries: &[(CtKey, CtEntry)], new: bool, now_ns: u64, t: &Timeouts) -> Plan {
    let by_key: std::collections::HashMap<CtKey, &CtEntry> =
        entries.iter().map(|(k, e)| (*k, e)).collect();
    let mut claimed: HashSet<CtKey> = HashSet::new();
    let mut plan = Plan::default();
    let mut expired = std::collections::BTreeMap::<FlowState, u64>::new();
    let mut judge = |keys: &[CtKey], proto, fwd, rev: Option<&CtEntry>, plan: &mut Plan| {
        plan.flows += 1;
        let state = FlowState::of(proto, fwd, rev, new);
        let last = [fwd, rev]
            .into_iter()
            .flatten()
            .map(|e| e.last_seen_ns)
            .max()
            .unwrap_or(0);
        let idle = Duration::from_nanos(now_ns.saturating_sub(last));
        if idle > state.timeout(t) {
            plan.delete.extend_from_slice(keys);
            *expired.entry(state).or_default() += 1;
        }
    };
    for (k, e) in entries.iter().filter(|(k, _)| k.dir == dir::FORWARD) {
        let rkey = k.reverse_of(e);
        let rev = by_key.get(&rkey).copied();
        if rev.is_some() {
            claimed.insert(rkey);
            judge(&[*k, rkey], k.proto, Some(e), rev, &mut plan);
        } else {
            judge(&[*k], k.proto, Some(e), None, &mut plan);
        }
    }
    for (k, e) in entries
        .iter()
        .filter(|(k, _)| k.dir == dir::REVERSE && !claimed.contains(k))
    {
        judge(&[*k], k.proto, None, Some(e), &mut plan);
    }
    plan.expired = expired.into_iter().collect();
    plan
}

#[cfg(test)]
mod tests;

//! The reconciler: desired state (what Docker and the cluster say should
//! be balanced) against actual state (what was successfully written to the
//! kernel) gives the minimal map writes, applied in an order the data plane
//! can never observe half-done.
//!
//! `actual` only ever records writes that succeeded, so a failed write
//! leaves no phantom state: the next pass computes what is still missing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use mesh_common::lb::{Backend, Service, ServiceKey, backend_state};

use crate::maglev::{self, Identity};

pub mod fake;
pub mod table;
#[cfg(test)]
mod tests;

pub use fake::{FakeLb, FaultyLb, Injected};

/// A service address: VIP, port, protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcAddr {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl std::fmt::Display for SvcAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == mesh_common::lb::PROTO_UDP {
            "udp"
        } else {
            "tcp"
        };
        write!(f, "{}:{}/{proto}", self.vip, self.port)
    }
}

impl SvcAddr {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip_be: u32::from(self.vip).to_be(),
            port_be: self.port.to_be(),
            proto: self.proto,
            ..ServiceKey::default()
        }
    }

    pub fn from_key(k: &ServiceKey) -> Self {
        SvcAddr {
            vip: Ipv4Addr::from(u32::from_be(k.vip_be)),
            port: u16::from_be(k.port_be),
            proto: k.proto,
        }
    }
}

/// One backend as it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    /// `backend_state::ACTIVE` or `DRAINING`.
    pub state: u8,
    /// Host-side veth of a local backend; 0 for the stack to route.
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Every service with its backends, keyed by backend (IP, port).
pub type Desired = BTreeMap<SvcAddr, BTreeMap<(Ipv4Addr, u16), DesiredBackend>>;

/// What the kernel has, as far as this agent knows: only successful writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actual {
    pub services: BTreeMap<SvcAddr, u32>,
    pub backends: BTreeMap<u32, Backend>,
    /// Non-empty rings in place.
    pub rings: BTreeMap<u32, RingState>,
    /// The active backend ids each ring in `rings` was built from by this
    /// process: a service whose members did not change keeps its ring
    /// without building it again (a ring is a function of its members, and
    /// an id's identity never changes while it exists). Rings adopted from
    /// the kernel have none, so they are built once and compared.
    pub ring_members: BTreeMap<u32, Vec<u32>>,
}

/// What the agent keeps of a ring in place: enough to tell whether a newly
/// built ring differs and which backends it names, not its slots (a ring
/// of 10 backends has over 1,000: 4 KB a service, 40 MB at 10,000
/// services, measured by the scale benchmark).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingState {
    pub slots: usize,
    /// A 64-bit hash of the slots.
    pub fingerprint: u64,
    /// The backend ids it names, sorted, each once.
    pub names: Vec<u32>,
}

impl RingState {
    /// A ring read from the kernel (sorted for its names: once, when a
    /// restarted agent adopts it).
    pub fn of(ring: &[u32]) -> Self {
        let mut names = ring.to_vec();
        names.sort_unstable();
        names.dedup();
        RingState {
            slots: ring.len(),
            fingerprint: fingerprint(ring),
            names,
        }
    }

    /// A ring this process built (see [`Built`]): its members are its
    /// names (Maglev gives every member slots).
    fn built(b: &Built) -> Self {
        let mut names = b.members.clone();
        names.sort_unstable();
        RingState {
            slots: b.slots,
            fingerprint: b.fingerprint,
            names,
        }
    }
}

/// A 64-bit fingerprint of a ring's slots: SplitMix64 over the ids, two
/// to a word, in four independent lanes (not one serial chain of 65,521
/// steps), then the lanes and the length.
fn fingerprint(ring: &[u32]) -> u64 {
    use mesh_common::hash::mix64;
    let mut lanes = [0x9e37_79b9_7f4a_7c15u64, 1, 2, 3];
    let chunks = ring.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (k, lane) in lanes.iter_mut().enumerate() {
            let word = (c[2 * k] as u64) << 32 | c[2 * k + 1] as u64;
            *lane = mix64(*lane ^ word);
        }
    }
    for (i, id) in rest.iter().enumerate() {
        lanes[i % 4] = mix64(lanes[i % 4] ^ (*id as u64) << 3 ^ i as u64);
    }
    lanes
        .iter()
        .fold(ring.len() as u64, |h, lane| mix64(h ^ lane))
}

/// A ring built in a plan: what it was built from and enough of it to
/// remember once it is in place (its fingerprint is computed once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    pub sid: u32,
    /// The active backend ids it was built from, in plan order.
    pub members: Vec<u32>,
    pub slots: usize,
    pub fingerprint: u64,
}

/// A service's ring as written: (service id, backend id per slot).
pub type Ring = (u32, Vec<u32>);

/// The writes of one pass, in the order they are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// 1. Services that went away (no new flows reach their ids).
    pub remove_services: Vec<SvcAddr>,
    /// 2. New and changed backends (before any ring names them).
    pub set_backends: Vec<(u32, Backend)>,
    /// 3. Changed rings, in one batch (after their backends exist).
    pub set_rings: Vec<(u32, Vec<u32>)>,
    /// 4. New services (after their ring exists).
    pub add_services: Vec<(SvcAddr, u32)>,
    /// 5. Backends no ring names any more.
    pub clear_backends: Vec<u32>,
    /// The rings built in this plan, written or found in place already
    /// (their members are remembered in `Actual::ring_members` once the
    /// ring is in place).
    pub built_from: Vec<Built>,
}

impl Plan {
    /// No writes (what rings were built from may still be remembered).
    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }

    /// Number of map writes (a ring batch counts its rings).
    pub fn writes(&self) -> usize {
        self.remove_services.len()
            + self.set_backends.len()
            + self.set_rings.len()
            + self.add_services.len()
            + self.clear_backends.len()
    }
}

/// Where a plan is written: the kernel maps, or a fake in tests.
pub trait LbWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Self::Error>;
    fn clear_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), Self::Error>;
    fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), Self::Error>;
}

/// Computes the writes that turn `actual` into `desired`.
///
/// Ids: a service or backend keeps its id for as long as it exists; new
/// ones take the lowest id that `actual` does not hold, so an id freed in
/// this pass is never handed out in the same pass (an old ring may still
/// name it until the pass completes).
pub fn plan(desired: &Desired, actual: &Actual) -> Plan {
    let mut p = Plan::default();
    let mut ids = Ids::of(actual);
    let mut owned = owned_backends(actual);
    for (addr, sid) in &actual.services {
        if !desired.contains_key(addr) {
            p.remove_services.push(*addr);
            if actual.rings.get(sid).is_some_and(|r| r.slots > 0) {
                p.set_rings.push((*sid, Vec::new()));
            }
            p.clear_backends
                .extend(owned.get(sid).into_iter().flat_map(|m| m.values().copied()));
        }
    }
    for (addr, backends) in desired {
        let sid = match actual.services.get(addr) {
            Some(id) => *id,
            None => ids.service(),
        };
        let existing = owned.remove(&sid).unwrap_or_default();
        plan_service(&mut p, &mut ids, actual, sid, backends, existing);
        if !actual.services.contains_key(addr) {
            p.add_services.push((*addr, sid));
        }
    }
    plan_orphans(&mut p, actual, owned);
    p.clear_backends.sort_unstable();
    p.clear_backends.dedup();
    p
}

/// Ids in use and the allocators that hand out free ones.
struct Ids {
    used_svc: BTreeSet<u32>,
    used_be: BTreeSet<u32>,
    next_svc: Allocator,
    next_be: Allocator,
}

impl Ids {
    /// What `actual` uses: its services, rings and backends.
    fn of(actual: &Actual) -> Self {
        let mut used_svc: BTreeSet<u32> = actual.services.values().copied().collect();
        used_svc.extend(
            actual
                .rings
                .iter()
                .filter(|(_, r)| r.slots > 0)
                .map(|(id, _)| *id),
        );
        Ids {
            used_svc,
            used_be: actual.backends.keys().copied().collect(),
            next_svc: Allocator::default(),
            next_be: Allocator::default(),
        }
    }

    fn service(&mut self) -> u32 {
        self.next_svc.take(&mut self.used_svc)
    }

    fn backend(&mut self) -> u32 {
        self.next_be.take(&mut self.used_be)
    }
}

/// Backends as written, by owning service: (address, port) -> id.
fn owned_backends(actual: &Actual) -> BTreeMap<u32, BTreeMap<(Ipv4Addr, u16), u32>> {
    let mut owned: BTreeMap<u32, BTreeMap<(Ipv4Addr, u16), u32>> = BTreeMap::new();
    for (id, b) in &actual.backends {
        let ident = (
            Ipv4Addr::from(u32::from_be(b.ip_be)),
            u16::from_be(b.port_be),
        );
        owned.entry(b.service_id).or_default().insert(ident, *id);
    }
    owned
}

/// One desired service `sid`: its backends (keeping the ids of `existing`
/// ones; what is left of `existing` is cleared) and its ring, rebuilt only
/// when its active members changed.
fn plan_service(
    p: &mut Plan,
    ids: &mut Ids,
    actual: &Actual,
    sid: u32,
    backends: &BTreeMap<(Ipv4Addr, u16), DesiredBackend>,
    mut existing: BTreeMap<(Ipv4Addr, u16), u32>,
) {
    let mut members = Vec::new();
    for (&(ip, port), want) in backends {
        let id = existing
            .remove(&(ip, port))
            .unwrap_or_else(|| ids.backend());
        let b = Backend {
            ip_be: u32::from(ip).to_be(),
            port_be: port.to_be(),
            state: want.state,
            ifindex: want.ifindex,
            mac: want.mac,
            service_id: sid,
            ..Backend::default()
        };
        if actual.backends.get(&id) != Some(&b) {
            p.set_backends.push((id, b));
        }
        if want.state == backend_state::ACTIVE {
            members.push((id, Identity { ip, port }));
        }
    }
    let member_ids: Vec<u32> = members.iter().map(|(id, _)| *id).collect();
    let unchanged = actual.ring_members.get(&sid) == Some(&member_ids)
        && actual.rings.contains_key(&sid) != member_ids.is_empty();
    if !unchanged {
        let ring = maglev::build_ids(&members);
        let built = Built {
            sid,
            members: member_ids,
            slots: ring.len(),
            fingerprint: fingerprint(&ring),
        };
        let in_place = actual.rings.get(&sid).map_or(ring.is_empty(), |r| {
            r.slots == built.slots && r.fingerprint == built.fingerprint
        });
        if !in_place {
            p.set_rings.push((sid, ring));
        }
        p.built_from.push(built);
    }
    p.clear_backends.extend(existing.into_values());
}

/// Rings and backends of ids no service owns (found when adopting pinned
/// maps after a crash between writes).
fn plan_orphans(
    p: &mut Plan,
    actual: &Actual,
    owned: BTreeMap<u32, BTreeMap<(Ipv4Addr, u16), u32>>,
) {
    let owners: BTreeSet<u32> = actual
        .services
        .values()
        .chain(p.add_services.iter().map(|(_, id)| id))
        .copied()
        .collect();
    for (sid, ring) in &actual.rings {
        if ring.slots > 0 && !owners.contains(sid) && !p.set_rings.iter().any(|(s, _)| s == sid) {
            p.set_rings.push((*sid, Vec::new()));
        }
    }
    for (sid, rest) in owned {
        if !owners.contains(&sid) {
            p.clear_backends.extend(rest.into_values());
        }
    }
}

#[derive(Default)]
struct Allocator {
    next: u32,
}

impl Allocator {
    /// The lowest id >= 1 not in `used`, marked used.
    fn take(&mut self, used: &mut BTreeSet<u32>) -> u32 {
        let mut id = self.next.max(1);
        while used.contains(&id) {
            id += 1;
        }
        used.insert(id);
        self.next = id + 1;
        id
    }
}

/// One write that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ApplyError {
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The writes of a pass that failed (the others were made).
#[derive(Debug, Default)]
pub struct Failed(pub Vec<ApplyError>);

impl Failed {
    fn push<E: std::error::Error + Send + Sync + 'static>(&mut self, what: String, e: E) {
        self.0.push(ApplyError {
            what,
            source: Box::new(e),
        });
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        write!(f, "{}", all.join("; "))
    }
}

impl std::error::Error for Failed {}

/// Writes `plan` in order, recording every successful write in `actual`.
/// A failed write holds back only what depends on it, so one service
/// cannot stall the others: a ring naming a backend that could not be
/// written waits, a service waits for its ring, and when the batch of rings
/// fails each ring is tried on its own. What was not written is recomputed
/// by the next pass (retried).
pub fn apply<W: LbWriter>(plan: &Plan, w: &mut W, actual: &mut Actual) -> Result<(), Failed> {
    let mut failed = Failed::default();
    for addr in &plan.remove_services {
        match w.remove_service(&addr.key()) {
            Ok(()) => {
                actual.services.remove(addr);
            }
            Err(e) => failed.push(format!("removing service {addr:?}"), e),
        }
    }
    let mut missing_backends = BTreeSet::new();
    for (id, b) in &plan.set_backends {
        match w.set_backend(*id, b) {
            Ok(()) => {
                actual.backends.insert(*id, *b);
            }
            Err(e) => {
                missing_backends.insert(*id);
                failed.push(format!("writing backend {id}"), e);
            }
        }
    }
    let missing_rings = apply_rings(plan, w, actual, &missing_backends, &mut failed);
    for (addr, sid) in &plan.add_services {
        if missing_rings.contains(sid) {
            continue;
        }
        match w.set_service(&addr.key(), &Service { id: *sid, flags: 0 }) {
            Ok(()) => {
                actual.services.insert(*addr, *sid);
            }
            Err(e) => failed.push(format!("adding service {addr:?}"), e),
        }
    }
    // A backend is cleared only once no ring names it: rings that failed
    // may still name it.
    let still_named: BTreeSet<u32> = actual
        .rings
        .values()
        .flat_map(|r| r.names.iter().copied())
        .collect();
    for id in &plan.clear_backends {
        if still_named.contains(id) {
            continue;
        }
        match w.clear_backend(*id) {
            Ok(()) => {
                actual.backends.remove(id);
            }
            Err(e) => failed.push(format!("clearing backend {id}"), e),
        }
    }
    if failed.0.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

/// Writes the plan's rings whose backends are all there (the others wait
/// for them): in one batch, or one by one to find the bad ones when the
/// batch fails. Records what each ring in place holds and was built from;
/// returns the services whose ring is not in place.
fn apply_rings<W: LbWriter>(
    plan: &Plan,
    w: &mut W,
    actual: &mut Actual,
    missing_backends: &BTreeSet<u32>,
    failed: &mut Failed,
) -> BTreeSet<u32> {
    // A ring is 65,521 slots at most: copied only when some must wait.
    let (ready, waiting): (std::borrow::Cow<'_, [Ring]>, Vec<_>) = if missing_backends.is_empty() {
        (std::borrow::Cow::Borrowed(&plan.set_rings), Vec::new())
    } else {
        let (ready, waiting): (Vec<_>, Vec<_>) = plan
            .set_rings
            .iter()
            .cloned()
            .partition(|(_, ring)| ring.iter().all(|b| !missing_backends.contains(b)));
        (std::borrow::Cow::Owned(ready), waiting)
    };
    let mut missing_rings: BTreeSet<u32> = waiting.iter().map(|(sid, _)| *sid).collect();
    let mut written: Vec<&Ring> = Vec::new();
    let ring_failed = |failed: &mut Failed, sid: u32, e: W::Error| {
        failed.push(format!("writing the Maglev ring of service {sid}"), e);
    };
    if !ready.is_empty() {
        match w.set_rings(&ready) {
            Ok(()) => written = ready.iter().collect(),
            Err(e) if ready.len() == 1 => {
                missing_rings.insert(ready[0].0);
                ring_failed(failed, ready[0].0, e);
            }
            Err(_) => {
                for r in ready.iter() {
                    match w.set_rings(std::slice::from_ref(r)) {
                        Ok(()) => written.push(r),
                        Err(e) => {
                            missing_rings.insert(r.0);
                            ring_failed(failed, r.0, e);
                        }
                    }
                }
            }
        }
    }
    let built: BTreeMap<u32, &Built> = plan.built_from.iter().map(|b| (b.sid, b)).collect();
    for &(sid, ref ring) in written {
        if ring.is_empty() {
            actual.rings.remove(&sid);
        } else {
            let state = match built.get(&sid) {
                Some(b) => RingState::built(b),
                None => RingState::of(ring),
            };
            actual.rings.insert(sid, state);
        }
    }
    // What each ring in place was built from (rings that failed keep
    // theirs unknown, so the next pass builds them again).
    for b in &plan.built_from {
        if !missing_rings.contains(&b.sid) {
            actual.ring_members.insert(b.sid, b.members.clone());
        }
    }
    actual
        .ring_members
        .retain(|sid, _| actual.rings.contains_key(sid) || built.contains_key(sid));
    missing_rings
}

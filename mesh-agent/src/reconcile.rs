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

/// A service address: VIP, port, protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcAddr {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
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
    pub rings: BTreeMap<u32, Vec<u32>>,
}

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
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self == &Plan::default()
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
    let mut used_svc: BTreeSet<u32> = actual.services.values().copied().collect();
    used_svc.extend(
        actual
            .rings
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(id, _)| *id),
    );
    let mut used_be: BTreeSet<u32> = actual.backends.keys().copied().collect();
    let mut next_svc = Allocator::default();
    let mut next_be = Allocator::default();

    // Backends by owner, as written.
    let mut owned: BTreeMap<u32, BTreeMap<(Ipv4Addr, u16), u32>> = BTreeMap::new();
    for (id, b) in &actual.backends {
        let ident = (
            Ipv4Addr::from(u32::from_be(b.ip_be)),
            u16::from_be(b.port_be),
        );
        owned.entry(b.service_id).or_default().insert(ident, *id);
    }

    for (addr, sid) in &actual.services {
        if !desired.contains_key(addr) {
            p.remove_services.push(*addr);
            if actual.rings.get(sid).is_some_and(|r| !r.is_empty()) {
                p.set_rings.push((*sid, Vec::new()));
            }
            p.clear_backends
                .extend(owned.get(sid).into_iter().flat_map(|m| m.values().copied()));
        }
    }

    for (addr, backends) in desired {
        let sid = match actual.services.get(addr) {
            Some(id) => *id,
            None => next_svc.take(&mut used_svc),
        };
        let mut existing = owned.remove(&sid).unwrap_or_default();
        let mut members = Vec::new();
        for (&(ip, port), want) in backends {
            let id = existing
                .remove(&(ip, port))
                .unwrap_or_else(|| next_be.take(&mut used_be));
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
        let ring = maglev::build_ids(&members);
        if ring_of(actual, sid) != ring.as_slice() {
            p.set_rings.push((sid, ring));
        }
        if !actual.services.contains_key(addr) {
            p.add_services.push((*addr, sid));
        }
        // What is left of this service's backends is gone.
        p.clear_backends.extend(existing.into_values());
    }
    // Left over with no service at all (found when adopting pinned maps
    // after a crash between writes): rings and backends of unowned ids.
    let owners: BTreeSet<u32> = actual
        .services
        .values()
        .chain(p.add_services.iter().map(|(_, id)| id))
        .copied()
        .collect();
    for (sid, ring) in &actual.rings {
        if !ring.is_empty() && !owners.contains(sid) && !p.set_rings.iter().any(|(s, _)| s == sid) {
            p.set_rings.push((*sid, Vec::new()));
        }
    }
    for (sid, rest) in owned {
        if !owners.contains(&sid) {
            p.clear_backends.extend(rest.into_values());
        }
    }
    p.clear_backends.sort_unstable();
    p.clear_backends.dedup();
    p
}

/// A service's ring as written; none is the same as empty.
fn ring_of(actual: &Actual, sid: u32) -> &[u32] {
    actual.rings.get(&sid).map_or(&[], Vec::as_slice)
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

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ApplyError {
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Writes `plan` in order, recording every successful write in `actual`.
/// Stops at the first failure; what was not written is recomputed by the
/// next pass.
pub fn apply<W: LbWriter>(plan: &Plan, w: &mut W, actual: &mut Actual) -> Result<(), ApplyError> {
    let fail = |what: String| {
        move |e: W::Error| ApplyError {
            what,
            source: Box::new(e),
        }
    };
    for addr in &plan.remove_services {
        w.remove_service(&addr.key())
            .map_err(fail(format!("removing service {addr:?}")))?;
        actual.services.remove(addr);
    }
    for (id, b) in &plan.set_backends {
        w.set_backend(*id, b)
            .map_err(fail(format!("writing backend {id}")))?;
        actual.backends.insert(*id, *b);
    }
    if !plan.set_rings.is_empty() {
        w.set_rings(&plan.set_rings).map_err(fail(format!(
            "writing {} Maglev rings",
            plan.set_rings.len()
        )))?;
        for (sid, ring) in &plan.set_rings {
            if ring.is_empty() {
                actual.rings.remove(sid);
            } else {
                actual.rings.insert(*sid, ring.clone());
            }
        }
    }
    for (addr, sid) in &plan.add_services {
        w.set_service(&addr.key(), &Service { id: *sid, flags: 0 })
            .map_err(fail(format!("adding service {addr:?}")))?;
        actual.services.insert(*addr, *sid);
    }
    for id in &plan.clear_backends {
        w.clear_backend(*id)
            .map_err(fail(format!("clearing backend {id}")))?;
        actual.backends.remove(id);
    }
    Ok(())
}

/// An in-memory [`LbWriter`]: the maps as plain collections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeLb {
    pub services: BTreeMap<SvcAddr, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub rings: BTreeMap<u32, Vec<u32>>,
    /// Writes performed, for tests that count them.
    pub writes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure: {0}")]
pub struct Injected(pub String);

impl LbWriter for FakeLb {
    type Error = Injected;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Injected> {
        self.writes += 1;
        self.services.remove(&SvcAddr::from_key(key));
        Ok(())
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Injected> {
        self.writes += 1;
        self.backends.insert(id, *b);
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), Injected> {
        self.writes += 1;
        self.backends.remove(&id);
        Ok(())
    }
    fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), Injected> {
        for (id, r) in rings {
            self.writes += 1;
            if r.is_empty() {
                self.rings.remove(id);
            } else {
                self.rings.insert(*id, r.clone());
            }
        }
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), Injected> {
        self.writes += 1;
        self.services.insert(SvcAddr::from_key(key), svc.id);
        Ok(())
    }
}

/// A [`FakeLb`] whose writes of one kind fail while `fail` says so.
#[derive(Debug, Default)]
pub struct FaultyLb {
    pub inner: FakeLb,
    /// "remove_service", "set_backend", "clear_backend", "set_rings" or
    /// "set_service": calls of that kind fail.
    pub fail: Option<&'static str>,
}

impl FaultyLb {
    fn check(&self, op: &'static str) -> Result<(), Injected> {
        match self.fail {
            Some(f) if f == op => Err(Injected(op.into())),
            _ => Ok(()),
        }
    }
}

impl LbWriter for FaultyLb {
    type Error = Injected;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Injected> {
        self.check("remove_service")?;
        self.inner.remove_service(key)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Injected> {
        self.check("set_backend")?;
        self.inner.set_backend(id, b)
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), Injected> {
        self.check("clear_backend")?;
        self.inner.clear_backend(id)
    }
    fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), Injected> {
        self.check("set_rings")?;
        self.inner.set_rings(rings)
    }
    fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), Injected> {
        self.check("set_service")?;
        self.inner.set_service(key, svc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend_state::{ACTIVE, DRAINING};

    const WEB: SvcAddr = SvcAddr {
        vip: Ipv4Addr::new(10, 43, 0, 10),
        port: 80,
        proto: 6,
    };
    const DNS: SvcAddr = SvcAddr {
        vip: Ipv4Addr::new(10, 43, 0, 20),
        port: 53,
        proto: 17,
    };

    type Row = ((Ipv4Addr, u16), DesiredBackend);

    fn be(last: u8, state: u8) -> Row {
        (
            (Ipv4Addr::new(10, 42, 0, last), 8080),
            DesiredBackend {
                state,
                ifindex: last as u32,
                mac: [2, 0, 0, 0, 0, last],
            },
        )
    }

    fn desired(services: &[(SvcAddr, &[Row])]) -> Desired {
        services
            .iter()
            .map(|(a, bs)| (*a, bs.iter().copied().collect()))
            .collect()
    }

    /// Plans and applies against a fake; returns the plan.
    fn pass(d: &Desired, actual: &mut Actual, fake: &mut FakeLb) -> Plan {
        let p = plan(d, actual);
        apply(&p, fake, actual).expect("fake writes succeed");
        p
    }

    /// The fake's maps and `actual` agree (no phantom state).
    fn same(actual: &Actual, fake: &FakeLb) {
        assert_eq!(actual.services, fake.services, "services");
        assert_eq!(actual.backends, fake.backends, "backends");
        assert_eq!(actual.rings, fake.rings, "rings");
    }

    fn ring_members(fake: &FakeLb, addr: SvcAddr) -> BTreeSet<Ipv4Addr> {
        let sid = fake.services[&addr];
        fake.rings
            .get(&sid)
            .into_iter()
            .flatten()
            .map(|id| Ipv4Addr::from(u32::from_be(fake.backends[id].ip_be)))
            .collect()
    }

    #[test]
    fn from_nothing_then_nothing_to_do() {
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        let d = desired(&[
            (WEB, &[be(11, ACTIVE), be(12, ACTIVE), be(13, ACTIVE)]),
            (DNS, &[be(21, ACTIVE)]),
        ]);
        let p = pass(&d, &mut actual, &mut fake);
        assert_eq!(
            (
                p.set_backends.len(),
                p.set_rings.len(),
                p.add_services.len()
            ),
            (4, 2, 2)
        );
        same(&actual, &fake);
        assert_eq!(ring_members(&fake, WEB).len(), 3);
        let writes = fake.writes;
        assert!(plan(&d, &actual).is_empty(), "a second pass writes nothing");
        assert_eq!(fake.writes, writes);
    }

    #[test]
    fn one_backend_leaves_minimal_writes() {
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE), be(13, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        let ids_before = actual.backends.clone();
        let p = pass(
            &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        assert_eq!(p.writes(), 2, "one ring and one clear: {p:?}");
        assert!(
            p.set_backends.is_empty() && p.add_services.is_empty() && p.remove_services.is_empty()
        );
        same(&actual, &fake);
        // Survivors keep their ids.
        for (id, b) in &actual.backends {
            assert_eq!(ids_before.get(id), Some(b));
        }
    }

    #[test]
    fn draining_leaves_the_ring_but_keeps_the_backend() {
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        let p = pass(
            &desired(&[(WEB, &[be(11, ACTIVE), be(12, DRAINING)])]),
            &mut actual,
            &mut fake,
        );
        assert_eq!(
            (
                p.set_backends.len(),
                p.set_rings.len(),
                p.clear_backends.len()
            ),
            (1, 1, 0)
        );
        assert_eq!(
            ring_members(&fake, WEB),
            [Ipv4Addr::new(10, 42, 0, 11)].into()
        );
        assert_eq!(
            fake.backends.len(),
            2,
            "the draining backend stays for its flows"
        );
        same(&actual, &fake);
    }

    #[test]
    fn removed_service_is_cleaned_up_and_its_id_reused_later() {
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE)]), (DNS, &[be(21, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        let dns_id = actual.services[&DNS];
        let p = pass(
            &desired(&[(WEB, &[be(11, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        assert_eq!(p.remove_services, vec![DNS]);
        assert_eq!(p.clear_backends.len(), 1);
        same(&actual, &fake);
        assert_eq!(fake.services.len(), 1);
        let other = SvcAddr { port: 443, ..WEB };
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE)]), (other, &[be(31, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        assert_eq!(
            actual.services[&other], dns_id,
            "a freed service id is reused in a later pass"
        );
        same(&actual, &fake);
    }

    #[test]
    fn failed_writes_leave_no_phantom_state_and_are_retried() {
        let d = desired(&[(WEB, &[be(11, ACTIVE), be(12, ACTIVE)])]);
        for failing in ["set_backend", "set_rings", "set_service"] {
            let mut actual = Actual::default();
            let mut faulty = FaultyLb {
                fail: Some(failing),
                ..FaultyLb::default()
            };
            let p = plan(&d, &actual);
            let e = apply(&p, &mut faulty, &mut actual).expect_err("injected failure");
            assert!(e.to_string().contains("injected"), "{e}");
            same(&actual, &faulty.inner);
            assert!(
                faulty.inner.services.is_empty(),
                "{failing}: no service without its ring and backends"
            );
            faulty.fail = None;
            let p = plan(&d, &actual);
            apply(&p, &mut faulty, &mut actual).expect("retry succeeds");
            same(&actual, &faulty.inner);
            assert_eq!(
                ring_members(&faulty.inner, WEB).len(),
                2,
                "{failing}: complete after retry"
            );
            assert!(plan(&d, &actual).is_empty());
        }
    }

    #[test]
    fn a_freed_backend_id_is_not_reused_in_the_same_pass() {
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        let old_id = *actual.backends.keys().next().expect("one backend");
        let p = plan(&desired(&[(WEB, &[be(12, ACTIVE)])]), &actual);
        assert_eq!(p.clear_backends, vec![old_id]);
        assert!(p.set_backends.iter().all(|(id, _)| *id != old_id), "{p:?}");
    }

    #[test]
    fn adoption_removes_what_went_stale() {
        // A restarted agent reads the maps: a service whose containers died
        // while it was down, plus a ring and a backend nobody owns.
        let (mut actual, mut fake) = (Actual::default(), FakeLb::default());
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE)]), (DNS, &[be(21, ACTIVE)])]),
            &mut actual,
            &mut fake,
        );
        fake.rings.insert(40, vec![7; 3]);
        fake.backends.insert(
            7,
            Backend {
                state: ACTIVE,
                service_id: 40,
                ..Backend::default()
            },
        );
        let mut adopted = Actual {
            services: fake.services.clone(),
            backends: fake.backends.clone(),
            rings: fake.rings.clone(),
        };
        let web_id = adopted.services[&WEB];
        pass(
            &desired(&[(WEB, &[be(11, ACTIVE)])]),
            &mut adopted,
            &mut fake,
        );
        same(&adopted, &fake);
        assert_eq!(fake.services.keys().copied().collect::<Vec<_>>(), vec![WEB]);
        assert_eq!(fake.services[&WEB], web_id, "adopted ids are kept");
        assert_eq!(fake.rings.keys().copied().collect::<Vec<_>>(), vec![web_id]);
        assert_eq!(fake.backends.len(), 1);
    }
}

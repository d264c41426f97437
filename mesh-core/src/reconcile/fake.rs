//! In-memory writers for tests: [`FakeLb`] keeps the maps as plain
//! collections, [`FaultyLb`] fails one kind of write on demand.

use std::collections::BTreeMap;

use mesh_common::lb::{Backend, Service, ServiceKey};

use super::{LbWriter, SvcAddr};

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
    /// A batch of rings that holds this service's ring fails.
    pub fail_ring_of: Option<u32>,
    /// Writing this backend fails.
    pub fail_backend: Option<u32>,
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
        if self.fail_backend == Some(id) {
            return Err(Injected(format!("backend {id}")));
        }
        self.inner.set_backend(id, b)
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), Injected> {
        self.check("clear_backend")?;
        self.inner.clear_backend(id)
    }
    fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), Injected> {
        self.check("set_rings")?;
        if let Some(bad) = self.fail_ring_of
            && rings.iter().any(|(sid, _)| *sid == bad)
        {
            return Err(Injected(format!("ring of service {bad}")));
        }
        self.inner.set_rings(rings)
    }
    fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), Injected> {
        self.check("set_service")?;
        self.inner.set_service(key, svc)
    }
}

//! The load-balancing maps as user space sees them: services, backends,
//! Maglev rings, conntrack and per-service counters.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, of_maps::ArrayOfMaps},
};
use mesh_common::{
    ct::{CtEntry, CtKey},
    lb::{Backend, Published, PublishedKey, Service, ServiceKey, ServiceStats},
    maps,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the Maglev ring of service {service_id}: {source}")]
    Ring {
        service_id: u32,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Handles to every load-balancing map.
pub struct LbMaps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    /// The routing mesh's published ports.
    pub published: HashMap<MapData, PublishedKey, Published>,
    /// Container network namespaces balanced at the socket.
    pub sock_netns: HashMap<MapData, u64, u32>,
    pub backends: Array<MapData, Backend>,
    /// The ports backends have had, a bit each (never cleared).
    pub backend_ports: Array<MapData, u64>,
    /// What this process knows `backend_ports` holds, read once at the
    /// first bit it sets: a bit already set costs no syscall.
    backend_port_bits: Option<Vec<u64>>,
    pub maglev: ArrayOfMaps<MapData, MapData>,
    /// A second handle to the outer Maglev map, for batch updates (aya's
    /// ArrayOfMaps does not lend out its own).
    maglev_map: MapData,
    /// Confirmed flows.
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Flows not confirmed yet.
    pub conntrack_new: HashMap<MapData, CtKey, CtEntry>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
}

impl LbMaps {
    /// Takes the maps out of a freshly loaded object. The backends a
    /// pinned `MESH_BACKENDS` already has get their ports' bits (a new
    /// `MESH_BACKEND_PORTS` beside old backends: an upgrade).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut lb = Self::build(|name| ebpf.take_map(name).ok_or(MapsError::Missing(name)))?;
        let ports: Vec<u16> = lb
            .backends
            .iter()
            .filter_map(Result::ok)
            .filter(|b| b.state != 0)
            .map(|b| b.port_be)
            .collect();
        for port_be in ports {
            lb.add_backend_port(port_be)?;
        }
        Ok(lb)
    }

    /// Opens the maps an agent pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        Self::build(|name| {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    fn build(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        let maglev = get(maps::MAGLEV.name)?;
        let maglev_map = match &maglev {
            Map::ArrayOfMaps(data) => data
                .info()
                .and_then(|info| MapData::from_id(info.id()))
                .map_err(map_err(maps::MAGLEV.name))?,
            _ => return Err(MapsError::Missing(maps::MAGLEV.name)),
        };
        Ok(LbMaps {
            services: get(maps::SERVICES.name)?
                .try_into()
                .map_err(map_err(maps::SERVICES.name))?,
            published: get(maps::PUBLISHED.name)?
                .try_into()
                .map_err(map_err(maps::PUBLISHED.name))?,
            sock_netns: get(maps::SOCK_NETNS.name)?
                .try_into()
                .map_err(map_err(maps::SOCK_NETNS.name))?,
            backends: get(maps::BACKENDS.name)?
                .try_into()
                .map_err(map_err(maps::BACKENDS.name))?,
            backend_ports: get(maps::BACKEND_PORTS.name)?
                .try_into()
                .map_err(map_err(maps::BACKEND_PORTS.name))?,
            backend_port_bits: None,
            maglev: maglev.try_into().map_err(map_err(maps::MAGLEV.name))?,
            maglev_map,
            conntrack: get(maps::CONNTRACK.name)?
                .try_into()
                .map_err(map_err(maps::CONNTRACK.name))?,
            conntrack_new: get(maps::CONNTRACK_NEW.name)?
                .try_into()
                .map_err(map_err(maps::CONNTRACK_NEW.name))?,
            service_stats: get(maps::SERVICE_STATS.name)?
                .try_into()
                .map_err(map_err(maps::SERVICE_STATS.name))?,
        })
    }

    pub fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), MapsError> {
        self.services
            .insert(key, svc, 0)
            .map_err(map_err(maps::SERVICES.name))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        self.services
            .remove(key)
            .map_err(map_err(maps::SERVICES.name))
    }

    pub fn set_published(&mut self, key: &PublishedKey, p: &Published) -> Result<(), MapsError> {
        self.published
            .insert(key, p, 0)
            .map_err(map_err(maps::PUBLISHED.name))
    }

    /// Every container namespace the kernel balances at the socket.
    pub fn read_sock_netns(&self) -> Result<std::collections::BTreeMap<u64, u32>, MapsError> {
        self.sock_netns
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SOCK_NETNS.name))
    }

    /// Every published port the kernel has.
    pub fn read_published(
        &self,
    ) -> Result<std::collections::BTreeMap<PublishedKey, u32>, MapsError> {
        self.published
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.service_id)))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::PUBLISHED.name))
    }

    /// Backend `id`; its port joins the ports backends have had first, so
    /// no flow to it exists before the programs know the port.
    pub fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapsError> {
        if b.state != 0 {
            self.add_backend_port(b.port_be)?;
        }
        self.backends
            .set(id, b, 0)
            .map_err(map_err(maps::BACKENDS.name))
    }

    /// Sets port `port_be`'s bit in `MESH_BACKEND_PORTS`.
    fn add_backend_port(&mut self, port_be: u16) -> Result<(), MapsError> {
        let name = maps::BACKEND_PORTS.name;
        let bits = match &mut self.backend_port_bits {
            Some(bits) => bits,
            None => {
                let read = (0..maps::BACKEND_PORT_WORDS)
                    .map(|w| self.backend_ports.get(&w, 0))
                    .collect::<Result<Vec<u64>, _>>()
                    .map_err(map_err(name))?;
                self.backend_port_bits.insert(read)
            }
        };
        let port = u16::from_be(port_be) as usize;
        let (word, bit) = (port / 64, 1u64 << (port % 64));
        if bits[word] & bit == 0 {
            self.backend_ports
                .set(word as u32, bits[word] | bit, 0)
                .map_err(map_err(name))?;
            bits[word] |= bit;
        }
        Ok(())
    }

    /// Frees a backend id: flows still tracked to it get a new backend.
    pub fn clear_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.set_backend(id, &Backend::default())
    }

    /// Replaces a service's Maglev ring (backend ids, one per slot) in one
    /// step: a new ring map is filled, then swapped into the outer slot.
    /// The kernel frees the old ring once no program uses it.
    pub fn set_ring(&mut self, service_id: u32, ring: &[u32]) -> Result<(), MapsError> {
        let name = maps::MAGLEV.name;
        let inner = super::ring::create(ring).map_err(|e| MapsError::Ring {
            service_id,
            source: e,
        })?;
        self.maglev
            .set(service_id, &inner, 0)
            .map_err(map_err(name))
    }

    /// Replaces many services' rings at once (start-up, bulk changes): one
    /// batch update of the outer map instead of one update per ring.
    pub fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), MapsError> {
        let mut made = Vec::with_capacity(rings.len());
        for (service_id, ring) in rings {
            let service_id = *service_id;
            let inner = super::ring::create(ring)
                .map_err(|source| MapsError::Ring { service_id, source })?;
            made.push((service_id, inner));
        }
        // A batch of one slot still waits once; chunks keep the key/value
        // arrays modest.
        for chunk in made.chunks(4096) {
            super::ring::set_batch(&self.maglev_map, chunk).map_err(|source| MapsError::Ring {
                service_id: chunk[0].0,
                source,
            })?;
        }
        Ok(())
    }

    /// A service's ring as the kernel has it (backend id per slot).
    pub fn ring(&self, service_id: u32) -> Result<Vec<u32>, MapsError> {
        let name = maps::MAGLEV.name;
        let inner = match self.maglev.get(&service_id, 0) {
            Ok(inner) => inner,
            Err(MapError::KeyNotFound) => return Ok(Vec::new()),
            Err(e) => return Err(map_err(name)(e)),
        };
        super::ring::read(&inner).map_err(|source| MapsError::Ring { service_id, source })
    }

    /// Per-service counters summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapsError> {
        let per_cpu = self
            .service_stats
            .get(&service_id, 0)
            .map_err(map_err(maps::SERVICE_STATS.name))?;
        Ok(per_cpu
            .iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
            }))
    }
}

impl crate::reconcile::LbWriter for LbMaps {
    type Error = MapsError;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        match LbMaps::remove_service(self, key) {
            // Already gone is what we wanted.
            Err(MapsError::Map {
                source: MapError::KeyNotFound,
                ..
            }) => Ok(()),
            other => other,
        }
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapsError> {
        LbMaps::set_backend(self, id, b)
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), MapsError> {
        LbMaps::clear_backend(self, id)
    }
    fn set_rings(&mut self, rings: &[(u32, Vec<u32>)]) -> Result<(), MapsError> {
        LbMaps::set_rings(self, rings)
    }
    fn set_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<(), MapsError> {
        LbMaps::set_service(self, key, svc)
    }
}

impl LbMaps {
    /// What the kernel has: services, backends in use, and non-empty rings.
    /// A restarted agent starts from this, so nothing is flushed.
    pub fn read_actual(&self) -> Result<crate::reconcile::Actual, MapsError> {
        use crate::reconcile::{Actual, SvcAddr};
        let mut actual = Actual::default();
        for item in self.services.iter() {
            let (k, s) = item.map_err(map_err(maps::SERVICES.name))?;
            actual.services.insert(SvcAddr::from_key(&k), s.id);
        }
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(map_err(maps::BACKENDS.name))?;
            if b.state != 0 {
                actual.backends.insert(id as u32, b);
            }
        }
        for id in 0..self.maglev.len() {
            let ring = self.ring(id)?;
            if !ring.is_empty() {
                actual
                    .rings
                    .insert(id, crate::reconcile::RingState::of(&ring));
            }
        }
        Ok(actual)
    }
}

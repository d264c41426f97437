//! Backend selection: the service's Maglev ring, checked against the
//! backends map.

use mesh_common::{
    ct::Tuple,
    lb::{Backend, NO_BACKEND, backend_state},
};

use crate::maps::{BACKENDS, MESH_MAGLEV};

/// The backend Maglev gives this flow: `ring[1 + hash % ring[0]]`.
/// `None` when the ring is empty or names no usable backend.
#[inline(always)]
pub fn pick(service_id: u32, t: &Tuple) -> Option<(u32, Backend)> {
    let ring = MESH_MAGLEV.get(service_id)?;
    let size = *ring.get(0)?;
    if size == 0 {
        return None;
    }
    let id = *ring.get(1 + t.hash() % size)?;
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.state != backend_state::ACTIVE {
        return None;
    }
    Some((id, backend))
}

/// The backend of a tracked flow, if it still exists as the flow knew it
/// (draining backends keep their flows; a removed or reused id does not).
#[inline(always)]
pub fn current(id: u32, ip_be: u32, port_be: u16) -> Option<Backend> {
    let b = *BACKENDS.get(id)?;
    let alive = b.state == backend_state::ACTIVE || b.state == backend_state::DRAINING;
    (alive && b.ip_be == ip_be && b.port_be == port_be).then_some(b)
}

/// Backend `id` if it still exists at address `ip_be` (any port, active or
/// draining): where a fragment's first fragment went.
#[inline(always)]
pub fn current_any(id: u32, ip_be: u32) -> Option<Backend> {
    let b = *BACKENDS.get(id)?;
    let alive = b.state == backend_state::ACTIVE || b.state == backend_state::DRAINING;
    (alive && b.ip_be == ip_be).then_some(b)
}

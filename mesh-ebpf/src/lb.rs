//! Backend selection: the service's Maglev ring, checked against the
//! backends map.

use mesh_common::{
    ct::{Tuple, dir, tcp_flag},
    lb::{Backend, NO_BACKEND, ServiceStats, backend_state},
    stats::Stat,
};

use crate::{
    ct,
    hdr::IPPROTO_TCP,
    maps::{BACKENDS, MESH_MAGLEV, SVC_STATS},
    stats::bump,
};

/// The backend Maglev gives a flow with hash `hash`: `ring[1 + hash %
/// ring[0]]`. `None` when the ring is empty or names no usable backend.
#[inline(always)]
pub fn pick(service_id: u32, hash: u32) -> Option<(u32, Backend)> {
    let ring = MESH_MAGLEV.get(service_id)?;
    let size = *ring.get(0)?;
    if size == 0 {
        return None;
    }
    let id = *ring.get(1 + hash % size)?;
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

/// Where [`balance`] sent a flow.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
    pub service_id: u32,
    pub hairpin: bool,
    pub new_flow: bool,
}

/// A packet of flow `t` to service `service_id`: its tracked backend if it
/// still exists as the flow knew it (the pair refreshed, confirmed or
/// repaired as the packet allows), else a Maglev pick by `hash`, tracked
/// as a new flow (or, for a tracked flow whose backend is gone, in its
/// table). `rev_flags` marks the reverse entry (`CT_F_INGRESS`: the
/// routing mesh). Counts what it did.
#[inline(always)]
pub fn balance(
    t: &Tuple,
    service_id: u32,
    hash: u32,
    tcp_flags: u8,
    rev_flags: u8,
) -> Result<Choice, Stat> {
    let fwd = ct::lookup(&t.key(dir::FORWARD));
    if let Some(f) = fwd
        && let Some(c) = follow(t, f, service_id, tcp_flags, rev_flags)
    {
        return Ok(c);
    }
    pick_new(t, fwd, service_id, hash, tcp_flags, rev_flags)
}

/// The tracked flow `t` (its forward entry `f`) of service `service_id`,
/// if its backend still exists as the flow knew it: the pair refreshed,
/// confirmed or repaired as the packet allows. `None`: the backend is gone
/// (the caller picks another).
#[inline(always)]
pub fn follow(
    t: &Tuple,
    f: ct::Found,
    service_id: u32,
    tcp_flags: u8,
    rev_flags: u8,
) -> Option<Choice> {
    // SAFETY: pointer from a successful lookup.
    let (id, nat_ip, nat_port) = unsafe {
        (
            (*f.entry).backend_id,
            (*f.entry).nat_ip_be,
            (*f.entry).nat_port_be,
        )
    };
    let b = current(id, nat_ip, nat_port)?;
    let idle = ct::touch(f.entry, tcp_flags);
    bump(Stat::LbCtHit);
    let to = ct::Balanced::new(t, id, service_id, &b, rev_flags);
    if f.new && ct::confirm(t, f.entry, &to, tcp_flags) {
        bump(Stat::LbCtConfirmed);
    } else if idle > ct::RESTORE_AFTER_NS && ct::restore_reverse(t, &to, f.new) {
        bump(Stat::LbReverseRestored);
    }
    Some(Choice {
        backend_id: id,
        backend: b,
        service_id,
        hairpin: to.hairpin,
        new_flow: false,
    })
}

/// A Maglev pick by `hash` for flow `t` of service `service_id`, tracked
/// as a new flow; `fwd`, its forward entry if it had one whose backend is
/// gone (the flow keeps its table).
#[inline(always)]
pub fn pick_new(
    t: &Tuple,
    fwd: Option<ct::Found>,
    service_id: u32,
    hash: u32,
    tcp_flags: u8,
    rev_flags: u8,
) -> Result<Choice, Stat> {
    let (id, b) = pick(service_id, hash).ok_or(Stat::LbNoBackend)?;
    let to = ct::Balanced::new(t, id, service_id, &b, rev_flags);
    // A tracked flow whose backend is gone keeps its table.
    let new = fwd.is_none_or(|f| f.new);
    ct::create(t, &to, tcp_flags, new).map_err(|_| Stat::LbCtWriteFail)?;
    if fwd.is_some() {
        bump(Stat::LbReselect);
    } else {
        if t.proto == IPPROTO_TCP && tcp_flags & tcp_flag::SYN == 0 {
            bump(Stat::LbCtMissMidFlow);
        }
        bump(Stat::LbNewFlow);
    }
    if let Some(s) = crate::monitor::on() {
        crate::monitor::new_flow(s, t, id, service_id);
    }
    Ok(Choice {
        backend_id: id,
        backend: b,
        service_id,
        hairpin: to.hairpin,
        new_flow: fwd.is_none(),
    })
}

/// Counts a connect of service `id` balanced at the socket (its packets
/// are not the data plane's to count).
#[inline(always)]
pub fn count_socket_flow(id: u32) {
    if let Some(s) = SVC_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot from a successful lookup.
        unsafe { (*s).new_flows += 1 };
    }
}

/// Counts a packet (and a new flow) of service `id`.
#[inline(always)]
pub fn count_service(id: u32, len: u32, new_flow: bool) {
    if let Some(s) = SVC_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot from a successful lookup.
        let s: &mut ServiceStats = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += len as u64;
        s.new_flows += new_flow as u64;
    }
}

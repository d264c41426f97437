//! Events for `meshctl monitor` (`mesh_common::monitor`): a drop with its
//! reason and addresses, a new flow with its backend. Written only while
//! the agent says someone listens (one per-CPU array read on the drop and
//! new-flow paths otherwise), at most `RATE` per second and CPU.
//!
//! The event is built in this CPU's slot of `MESH_MONITOR` and sent from
//! there by out-of-line functions that take only registers and use no
//! stack: the largest programs' stack is at its limit, and the verifier
//! counts a called function's frame on top of the caller's.

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::bpf_ktime_get_ns,
};
use mesh_common::{
    ct::Tuple,
    monitor::{Budget, DROP, Event, NEW_FLOW, RATE},
};

use crate::{
    hdr::{ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, ptr_at},
    maps::{EVENTS, MONITOR},
};

/// This CPU's slot, when a monitor listens.
#[inline(always)]
pub fn on() -> Option<*mut Budget> {
    let s = MONITOR.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, from a successful lookup.
    (unsafe { (*s).on } != 0).then_some(s)
}

/// Sends the event built in slot `s`: stamped, within this CPU's budget
/// for the current second, or counted as lost.
#[inline(always)]
fn send(s: *mut Budget) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let second = now / 1_000_000_000;
    // SAFETY: this CPU's slot, from a successful lookup by the caller.
    let within = unsafe {
        if (*s).second != second {
            (*s).second = second;
            (*s).count = 0;
        }
        (*s).event.ts_ns = now;
        (*s).count += 1;
        (*s).count <= RATE
    };
    // SAFETY: as above; the ring buffer copies the event out of the slot.
    if !within || EVENTS.output::<Event>(unsafe { &(*s).event }, 0).is_err() {
        // SAFETY: as above.
        unsafe { (*s).lost += 1 };
    }
}

/// A packet dropped for `reason` at TC, into slot `s` (from [`on`]).
#[inline(never)]
pub fn drop_tc(skb: *mut __sk_buff, reason: u32, s: *mut Budget) {
    // SAFETY: the program's own context.
    let (data, end, ifindex) = unsafe {
        (
            (*skb).data as usize,
            (*skb).data_end as usize,
            (*skb).ifindex,
        )
    };
    drop(data, end, ifindex, reason, s);
}

/// [`drop_tc`] for XDP.
#[inline(never)]
pub fn drop_xdp(md: *mut xdp_md, reason: u32, s: *mut Budget) {
    // SAFETY: the program's own context.
    let (data, end, ifindex) = unsafe {
        (
            (*md).data as usize,
            (*md).data_end as usize,
            (*md).ingress_ifindex,
        )
    };
    drop(data, end, ifindex, reason, s);
}

/// The event of a drop, from the packet's linear data (`data..end`): its
/// addresses and ports when they are there.
#[inline(always)]
fn drop(data: usize, end: usize, ifindex: u32, reason: u32, s: *mut Budget) {
    // SAFETY: this CPU's slot; packet reads are bounds-checked (ptr_at).
    unsafe {
        let e = &mut (*s).event;
        e.kind = DROP;
        e.stat = reason as u16;
        e.ifindex = ifindex;
        e.proto = 0;
        e.src_be = 0;
        e.dst_be = 0;
        e.sport_be = 0;
        e.dport_be = 0;
        e.backend_id = 0;
        e.service_id = 0;
        if let Some(proto) = ptr_at::<u16>(data, end, 12)
            && *proto == ETH_P_IP.to_be()
            && let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN)
        {
            e.proto = (*ip).proto;
            e.src_be = (*ip).src_be;
            e.dst_be = (*ip).dst_be;
            if ((*ip).proto == IPPROTO_TCP || (*ip).proto == IPPROTO_UDP)
                && (*ip).frag_offset() == 0
                && let Some(ports) = ptr_at::<[u16; 2]>(data, end, ETH_HLEN + (*ip).header_len())
            {
                e.sport_be = (*ports)[0];
                e.dport_be = (*ports)[1];
            }
        }
    }
    send(s);
}

/// A new flow of `t` to backend `backend_id` of service `service_id`, into
/// slot `s` (from [`on`]).
#[inline(always)]
pub fn new_flow(s: *mut Budget, t: &Tuple, backend_id: u32, service_id: u32) {
    // SAFETY: this CPU's slot, from a successful lookup.
    unsafe {
        let e = &mut (*s).event;
        e.kind = NEW_FLOW;
        e.proto = t.proto;
        e.src_be = t.src_be;
        e.dst_be = t.dst_be;
        e.sport_be = t.sport_be;
        e.dport_be = t.dport_be;
        e.backend_id = backend_id;
        e.service_id = service_id;
        e.stat = 0;
        e.ifindex = 0;
    }
    flow_out(s);
}

#[inline(never)]
fn flow_out(s: *mut Budget) {
    send(s);
}

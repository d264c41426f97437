//! Conntrack entries: lookup, creation, refresh.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::ct::{CtEntry, CtKey, dir};

use crate::maps::CT;

/// The 5-tuple of a packet as it appears on the wire (raw, network order).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn key(&self, direction: u8) -> CtKey {
        CtKey {
            src_be: self.src_be,
            dst_be: self.dst_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            dir: direction,
            ..CtKey::default()
        }
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CT.get_ptr_mut(key)
}

/// Updates last-seen and the TCP flags of an existing entry.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, tcp_flags: u8) {
    // SAFETY: `entry` came from a lookup in this program run; concurrent
    // writers only ever store the same kind of values (racy but benign).
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        (*entry).tcp_flags |= tcp_flags;
    }
}

/// Creates (or replaces) both entries of a balanced flow.
///
/// `client` is the packet as the client sent it (to the VIP); the reverse
/// entry is keyed by the backend's reply and restores the VIP.
#[inline(always)]
pub fn create(
    client: &Tuple,
    backend_id: u32,
    service_id: u32,
    backend_ip_be: u32,
    backend_port_be: u16,
    tcp_flags: u8,
) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = CtEntry {
        backend_id,
        service_id,
        nat_ip_be: backend_ip_be,
        nat_port_be: backend_port_be,
        tcp_flags,
        last_seen_ns: now,
        ..CtEntry::default()
    };
    CT.insert(&client.key(dir::FORWARD), &fwd, 0)?;
    let reply = Tuple {
        src_be: backend_ip_be,
        dst_be: client.src_be,
        sport_be: backend_port_be,
        dport_be: client.sport_be,
        proto: client.proto,
    };
    let rev = CtEntry {
        backend_id,
        service_id,
        nat_ip_be: client.dst_be,
        nat_port_be: client.dport_be,
        tcp_flags: 0,
        last_seen_ns: now,
        ..CtEntry::default()
    };
    CT.insert(&reply.key(dir::REVERSE), &rev, 0)
}

/// A new direct flow (not to a VIP) from `t`: if a finished VIP flow left a
/// reverse entry for the same tuple, drop it, or the replies of this flow
/// would be rewritten to come from the VIP. A client cannot have both at
/// once (the backend would see one connection), so the new flow wins.
#[inline(always)]
pub fn supersede_reverse(t: &Tuple) -> bool {
    let reply = Tuple {
        src_be: t.dst_be,
        dst_be: t.src_be,
        sport_be: t.dport_be,
        dport_be: t.sport_be,
        proto: t.proto,
    };
    let key = reply.key(dir::REVERSE);
    if lookup(&key).is_some() {
        return CT.remove(&key).is_ok();
    }
    false
}

//! Conntrack entries: lookup, creation, refresh.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{
    ct::{CT_F_HAIRPIN, CtEntry, CtKey, HAIRPIN_IP_BE, Tuple, dir},
    lb::Backend,
};

use crate::maps::CT;

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CT.get_ptr_mut(key)
}

/// The reverse entry keyed by `t` (a reply as it arrives), refreshed with
/// its TCP flags: a copy of it.
#[inline(always)]
pub fn reply_entry(t: &Tuple, tcp_flags: u8) -> Option<CtEntry> {
    let e = lookup(&t.key(dir::REVERSE))?;
    touch(e, tcp_flags);
    // SAFETY: pointer from a successful lookup.
    Some(unsafe { *e })
}

/// A tracked flow idle for longer than this checks that its reverse entry
/// is still there (the LRU may have evicted it alone).
pub const RESTORE_AFTER_NS: u64 = 1_000_000_000;

/// Updates last-seen and the TCP flags of an existing entry; how long it
/// had been idle (ns).
#[inline(always)]
pub fn touch(entry: *mut CtEntry, tcp_flags: u8) -> u64 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `entry` came from a lookup in this program run; concurrent
    // writers only ever store the same kind of values (racy but benign).
    unsafe {
        let idle = now.saturating_sub((*entry).last_seen_ns);
        (*entry).last_seen_ns = now;
        (*entry).tcp_flags |= tcp_flags;
        idle
    }
}

/// Where a balanced flow went: its backend and service.
pub struct Balanced {
    pub backend_id: u32,
    pub service_id: u32,
    pub ip_be: u32,
    pub port_be: u16,
    /// The client is the backend itself (its source is NATed to
    /// [`HAIRPIN_IP_BE`]).
    pub hairpin: bool,
}

impl Balanced {
    /// `client`'s flow to backend `backend_id` of service `service_id`.
    #[inline(always)]
    pub fn new(client: &Tuple, backend_id: u32, service_id: u32, b: &Backend) -> Self {
        Balanced {
            backend_id,
            service_id,
            ip_be: b.ip_be,
            port_be: b.port_be,
            hairpin: b.ip_be == client.src_be,
        }
    }
}

/// The reverse entry of `client`'s flow: keyed by the backend's reply,
/// restoring the VIP.
#[inline(always)]
fn reverse(client: &Tuple, to: &Balanced, now: u64) -> (CtKey, CtEntry) {
    let dnat = Tuple {
        src_be: if to.hairpin {
            HAIRPIN_IP_BE
        } else {
            client.src_be
        },
        dst_be: to.ip_be,
        dport_be: to.port_be,
        ..*client
    };
    let rev = CtEntry {
        backend_id: to.backend_id,
        service_id: to.service_id,
        nat_ip_be: client.dst_be,
        nat_port_be: client.dport_be,
        tcp_flags: 0,
        flags: if to.hairpin { CT_F_HAIRPIN } else { 0 },
        last_seen_ns: now,
        ..CtEntry::default()
    };
    (dnat.reversed().key(dir::REVERSE), rev)
}

/// Creates (or replaces) both entries of a balanced flow. `client` is the
/// packet as the client sent it (to the VIP).
#[inline(always)]
pub fn create(client: &Tuple, to: &Balanced, tcp_flags: u8) -> Result<(), i32> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = CtEntry {
        backend_id: to.backend_id,
        service_id: to.service_id,
        nat_ip_be: to.ip_be,
        nat_port_be: to.port_be,
        tcp_flags,
        last_seen_ns: now,
        ..CtEntry::default()
    };
    CT.insert(&client.key(dir::FORWARD), &fwd, 0)?;
    let (key, rev) = reverse(client, to, now);
    CT.insert(&key, &rev, 0)
}

/// Recreates a tracked flow's reverse entry if the LRU evicted it (its
/// replies would otherwise reach the client from the backend's address,
/// and the client would reset the connection); whether it did.
#[inline(always)]
pub fn restore_reverse(client: &Tuple, to: &Balanced) -> bool {
    // SAFETY: plain helper call.
    let (key, rev) = reverse(client, to, unsafe { bpf_ktime_get_ns() });
    lookup(&key).is_none() && CT.insert(&key, &rev, 0).is_ok()
}

/// A new direct flow (not to a VIP) from `t`: if a finished VIP flow left a
/// reverse entry for the same tuple, drop it, or the replies of this flow
/// would be rewritten to come from the VIP. A client cannot have both at
/// once (the backend would see one connection), so the new flow wins.
#[inline(always)]
pub fn supersede_reverse(t: &Tuple) -> bool {
    let key = t.reversed().key(dir::REVERSE);
    if lookup(&key).is_some() {
        return CT.remove(&key).is_ok();
    }
    false
}

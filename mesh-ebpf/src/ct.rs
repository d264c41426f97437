//! Conntrack entries: lookup, creation, refresh.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::ct::{CT_F_HAIRPIN, CtEntry, CtKey, HAIRPIN_IP_BE, Tuple, dir};

use crate::maps::CT;

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
/// entry is keyed by the backend's reply and restores the VIP. A hairpin
/// flow (the client is the backend) is also source-NATed to
/// [`HAIRPIN_IP_BE`], so its replies are keyed to that address.
#[inline(always)]
pub fn create(
    client: &Tuple,
    backend_id: u32,
    service_id: u32,
    backend_ip_be: u32,
    backend_port_be: u16,
    tcp_flags: u8,
    hairpin: bool,
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
    let dnat = Tuple {
        src_be: if hairpin {
            HAIRPIN_IP_BE
        } else {
            client.src_be
        },
        dst_be: backend_ip_be,
        dport_be: backend_port_be,
        ..*client
    };
    let rev = CtEntry {
        backend_id,
        service_id,
        nat_ip_be: client.dst_be,
        nat_port_be: client.dport_be,
        tcp_flags: 0,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        last_seen_ns: now,
        ..CtEntry::default()
    };
    CT.insert(&dnat.reversed().key(dir::REVERSE), &rev, 0)
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

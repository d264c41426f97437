//! Conntrack entries: lookup in both tables, creation, confirmation,
//! refresh (the tables and their rules: `mesh_common::ct`).

use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    maps::LruHashMap,
};
use mesh_common::{
    ct::{
        CT_F_HAIRPIN, CT_F_INGRESS, CT_F_REPLIED, CT_F_RETURN, CtEntry, CtKey, Tuple, dir, tcp_flag,
    },
    lb::Backend,
};

use mesh_common::stats::Stat;

use crate::{
    hdr::IPPROTO_TCP,
    maps::{CONFIG, CT, CT_NEW},
    stats::bump,
};

/// An entry found in one of the two tables.
#[derive(Clone, Copy)]
pub struct Found {
    pub entry: *mut CtEntry,
    /// In `MESH_CT_NEW` (the flow is not confirmed yet).
    pub new: bool,
}

#[inline(always)]
fn table(new: bool) -> &'static LruHashMap<CtKey, CtEntry> {
    if new { &CT_NEW } else { &CT }
}

/// The entry under `key`: confirmed flows first (the common case costs
/// one lookup), then new ones.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<Found> {
    if let Some(entry) = CT.get_ptr_mut(key) {
        return Some(Found { entry, new: false });
    }
    CT_NEW
        .get_ptr_mut(key)
        .map(|entry| Found { entry, new: true })
}

/// The reverse entry keyed by `t` (a reply as it arrives), refreshed with
/// its TCP flags and marked as answered: a copy of it.
#[inline(always)]
pub fn reply_entry(t: &Tuple, tcp_flags: u8) -> Option<CtEntry> {
    let f = lookup(&t.key(dir::REVERSE))?;
    touch(f.entry, tcp_flags);
    // SAFETY: pointer from a successful lookup; see `touch`.
    unsafe {
        if (*f.entry).flags & CT_F_REPLIED == 0 {
            (*f.entry).flags |= CT_F_REPLIED;
        }
        Some(*f.entry)
    }
}

/// A tracked flow idle for longer than this checks that its reverse entry
/// is still there (the LRU may have evicted it alone).
pub const RESTORE_AFTER_NS: u64 = 1_000_000_000;

/// Conntrack's clock, in ns: the time of the last tick, which conntrack's
/// second-scale lifetimes do not tell from the precise time. It is
/// `jiffies * tick_ns - clock_base_ns` once the agent measured the tick
/// (CONFIG): the verifier inlines `bpf_jiffies64` as a load, where any
/// clock helper is a call (15-20 ns a packet on the tracked paths, most of
/// it the call's return on CPUs with return-stack mitigations). Before,
/// CLOCK_MONOTONIC's coarse reading, the same clock within the drift of
/// the tick against it since the agent measured it.
#[inline(always)]
fn now() -> u64 {
    if let Some(c) = CONFIG.get(0)
        && c.tick_ns != 0
    {
        // SAFETY: plain helper call (inlined by the verifier).
        let jiffies = unsafe { bpf_jiffies64() };
        return jiffies
            .wrapping_mul(c.tick_ns as u64)
            .wrapping_sub(c.clock_base_ns);
    }
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Updates last-seen and the TCP flags of an existing entry; how long it
/// had been idle (ns). A SYN starts the flags over: a new connection on
/// the same tuple (after a close), whose state must not look closed.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, tcp_flags: u8) -> u64 {
    let now = now();
    // SAFETY: `entry` came from a lookup in this program run; concurrent
    // writers only ever store the same kind of values (racy but benign).
    unsafe {
        let idle = now.saturating_sub((*entry).last_seen_ns);
        (*entry).last_seen_ns = now;
        if tcp_flags & tcp_flag::SYN != 0 {
            (*entry).tcp_flags = tcp_flags;
        } else {
            (*entry).tcp_flags |= tcp_flags;
        }
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
    /// `HAIRPIN_IP_BE`).
    pub hairpin: bool,
    /// What the reverse entry restores as the replies' source (the VIP or
    /// published address and port), or where it sends them
    /// (`CT_F_RETURN`: the ingress node).
    pub restore: (u32, u16),
    /// `CT_F_INGRESS` or `CT_F_RETURN` for the reverse entry, else 0.
    pub flags: u8,
}

impl Balanced {
    /// `client`'s flow to backend `backend_id` of service `service_id`;
    /// replies get the address the client used back.
    #[inline(always)]
    pub fn new(client: &Tuple, backend_id: u32, service_id: u32, b: &Backend, flags: u8) -> Self {
        Balanced {
            backend_id,
            service_id,
            ip_be: b.ip_be,
            port_be: b.port_be,
            hairpin: b.ip_be == client.src_be,
            restore: (client.dst_be, client.dport_be),
            flags,
        }
    }
}

/// The reverse entry of `client`'s flow: keyed by the backend's reply,
/// restoring the VIP.
#[inline(always)]
fn reverse(client: &Tuple, to: &Balanced, now: u64) -> (CtKey, CtEntry) {
    let rev = CtEntry {
        backend_id: to.backend_id,
        service_id: to.service_id,
        nat_ip_be: to.restore.0,
        nat_port_be: to.restore.1,
        tcp_flags: 0,
        flags: if to.hairpin { CT_F_HAIRPIN } else { 0 } | to.flags,
        last_seen_ns: now,
        created_ns: now,
    };
    let key = client.reply_from(to.ip_be, to.port_be).key(dir::REVERSE);
    (key, rev)
}

/// Creates (or replaces) both entries of a balanced flow. `client` is the
/// packet as the client sent it (to the VIP). A new flow goes to the new
/// table; a tracked flow that needs another backend stays in its table.
#[inline(always)]
pub fn create(client: &Tuple, to: &Balanced, tcp_flags: u8, new: bool) -> Result<(), i32> {
    let now = now();
    let fwd = CtEntry {
        backend_id: to.backend_id,
        service_id: to.service_id,
        nat_ip_be: to.ip_be,
        nat_port_be: to.port_be,
        tcp_flags,
        flags: 0,
        last_seen_ns: now,
        created_ns: now,
    };
    let t = table(new);
    t.insert(&client.key(dir::FORWARD), &fwd, 0)?;
    let (key, rev) = reverse(client, to, now);
    if new && let Some(old) = lookup(&key) {
        supersede_flow(client, &key, to, old);
    }
    t.insert(&key, &rev, 0)
}

/// A finished flow with the same reply tuple as `client`'s new one (the
/// client reused its port toward another address of the same backend:
/// another VIP, a node's published port) still has its pair: `old`, its
/// reverse entry. Left alone, a confirmed reverse entry (looked up first)
/// would capture the new flow's replies, and the old forward entry, if the
/// client used that address again with the same port, would follow a flow
/// whose reverse entry now restores the other address. A client cannot
/// have both flows at once (the backend would see one connection), so the
/// new flow ends the old one. Rare: a lookup, which takes no lock, comes
/// before any removal.
#[inline(always)]
fn supersede_flow(client: &Tuple, key: &CtKey, to: &Balanced, old: Found) {
    // SAFETY: pointer from a successful lookup in this run.
    let (ip_be, port_be, flags) = unsafe {
        (
            (*old.entry).nat_ip_be,
            (*old.entry).nat_port_be,
            (*old.entry).flags,
        )
    };
    // A routing-mesh return entry names the ingress node, not an address
    // the client called: its forward entry is keyed by the backend.
    if (ip_be, port_be) != to.restore && flags & CT_F_RETURN == 0 {
        let called = Tuple {
            dst_be: ip_be,
            dport_be: port_be,
            ..*client
        };
        if table(old.new).remove(&called.key(dir::FORWARD)).is_ok() {
            bump(Stat::LbStaleReverse);
        }
    }
    if !old.new {
        let _ = CT.remove(key);
    }
}

/// Moves a new flow's pair to the confirmed table when this packet of the
/// client (`tcp_flags`) comes after the backend answered: TCP, an ACK
/// without SYN or RST once the backend sent ACK without RST (a completed
/// handshake, or a live connection picked up mid-flow); UDP, once a reply
/// came. Whether it moved.
#[inline(always)]
pub fn confirm(client: &Tuple, fwd: *mut CtEntry, to: &Balanced, tcp_flags: u8) -> bool {
    let rkey = client.reply_from(to.ip_be, to.port_be).key(dir::REVERSE);
    let Some(rev) = CT_NEW.get_ptr_mut(&rkey) else {
        return false;
    };
    // SAFETY: pointers from successful lookups in this run.
    let (f, r) = unsafe { (*fwd, *rev) };
    let answered = if client.proto == IPPROTO_TCP {
        tcp_flags & (tcp_flag::SYN | tcp_flag::RST) == 0
            && tcp_flags & tcp_flag::ACK != 0
            && r.tcp_flags & (tcp_flag::ACK | tcp_flag::RST) == tcp_flag::ACK
    } else {
        r.flags & CT_F_REPLIED != 0
    };
    if !answered {
        return false;
    }
    let fkey = client.key(dir::FORWARD);
    if CT.insert(&fkey, &f, 0).is_err() || CT.insert(&rkey, &r, 0).is_err() {
        return false;
    }
    let _ = CT_NEW.remove(&fkey);
    let _ = CT_NEW.remove(&rkey);
    true
}

/// Recreates a tracked flow's reverse entry (in its table) if the LRU
/// evicted it (its replies would otherwise reach the client from the
/// backend's address, and the client would reset the connection) or
/// another flow's took its place; whether it did.
#[inline(always)]
pub fn restore_reverse(client: &Tuple, to: &Balanced, new: bool) -> bool {
    let (key, rev) = reverse(client, to, now());
    let t = table(new);
    // SAFETY: pointer from a successful lookup in this run.
    let right = t
        .get_ptr(&key)
        .is_some_and(|r| unsafe { ((*r).nat_ip_be, (*r).nat_port_be) == to.restore });
    !right && t.insert(&key, &rev, 0).is_ok()
}

/// A new direct flow (not to a VIP) from `t`: if a finished VIP flow left a
/// reverse entry for the same tuple, drop it, or the replies of this flow
/// would be rewritten to come from the VIP. A client cannot have both at
/// once (the backend would see one connection), so the new flow wins.
#[inline(always)]
pub fn supersede_reverse(t: &Tuple) -> bool {
    let key = t.reversed().key(dir::REVERSE);
    match lookup(&key) {
        Some(f) => table(f.new).remove(&key).is_ok(),
        None => false,
    }
}

/// A flow tunnelled here by the node that received it on a published port
/// (`ingress_be`): `t` is the client's packet to the backend as it arrived.
/// The pair (forward: the client's tuple, untranslated; reverse: the
/// backend's replies, `CT_F_RETURN` to `ingress_be`) tells the backend's
/// veth to send replies back through that node. It is confirmed like any
/// flow, so a flood through another node churns only the new table.
#[inline(always)]
pub fn track_return(t: &Tuple, ingress_be: u32, tcp_flags: u8) {
    let to = Balanced {
        backend_id: 0,
        service_id: 0,
        ip_be: t.dst_be,
        port_be: t.dport_be,
        hairpin: false,
        restore: (ingress_be, 0),
        flags: CT_F_RETURN,
    };
    match lookup(&t.key(dir::FORWARD)) {
        Some(f) => {
            touch(f.entry, tcp_flags);
            // The same client port may come in through another node now
            // (a new connection on a reused tuple): replies go there.
            let (rkey, rev) = reverse(t, &to, now());
            let tbl = table(f.new);
            // SAFETY: pointer from a successful lookup in this run.
            let stale = tbl
                .get_ptr(&rkey)
                .is_none_or(|r| unsafe { (*r).nat_ip_be } != ingress_be);
            if stale {
                let _ = tbl.insert(&rkey, &rev, 0);
            } else if f.new {
                confirm(t, f.entry, &to, tcp_flags);
            }
        }
        None => {
            let _ = create(t, &to, tcp_flags, true);
        }
    }
}

/// A flow from outside the cluster reaching a backend directly, not through
/// the routing mesh (`t` as it arrives): a routing-mesh reverse entry for
/// its replies (`CT_F_INGRESS`, `CT_F_RETURN`) is a finished flow's; it goes.
/// Whether there was one.
#[inline(always)]
pub fn supersede_mesh_reverse(t: &Tuple) -> bool {
    let key = t.reversed().key(dir::REVERSE);
    match lookup(&key) {
        // SAFETY: pointer from a successful lookup.
        Some(f) if unsafe { (*f.entry).flags } & (CT_F_INGRESS | CT_F_RETURN) != 0 => {
            table(f.new).remove(&key).is_ok()
        }
        _ => false,
    }
}

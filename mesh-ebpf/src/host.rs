//! The host link (`mesh-host`, TC egress): the host's own way into the
//! overlay. The agent routes the cluster CIDR to this veth with the
//! `mesh` network's gateway as the preferred source, so a socket of the
//! host's that a VIP sent to a backend on another node (cgroup `connect4`,
//! `sendmsg4`) sends from the host's overlay address through here; the
//! packet is tunnelled to that node like a container's. The backend's
//! answer is addressed to the gateway, which lies in this node's /24: XDP
//! decapsulates it and the underlay TC program hands it to the stack
//! through this link (`tunnel::underlay_ingress`).
//!
//! Only the host's own packets are tunnelled: the source must be the
//! host's overlay address (`host_spoofed` otherwise) and the packet must
//! come from one of its sockets (`host_forwarded` otherwise). Anything the
//! host forwards here (a packet from the underlay, or from a container on
//! another Docker network, masqueraded or not) is dropped, so the route is
//! no way into the overlay for others: Docker's isolation of its networks
//! from `mesh` holds across nodes too.

use aya_ebpf::programs::TcContext;
use mesh_common::stats::Stat;

use crate::{
    ctx::{Verdict, pass},
    parse, tunnel,
};

#[inline(always)]
pub fn host_out(ctx: &TcContext) -> Result<Verdict, Stat> {
    let Some(l) = tunnel::local() else {
        return pass(Stat::HostOther);
    };
    let Ok(pk) = parse::ipv4(ctx) else {
        return pass(Stat::HostOther);
    };
    if l.host_ip_be == 0 || pk.t.src_be != l.host_ip_be {
        return Err(Stat::HostSpoofed);
    }
    // Sent by a socket of the host's (its connections, its TCP resets and
    // ICMP errors, which the kernel sends from its own control sockets). A
    // packet the host forwards has none, even when a masquerade rule gave
    // it the host's address (a container on the default bridge calling a
    // mesh address: Docker masquerades it with this link's address).
    // SAFETY: the context's own skb; reading its socket pointer is allowed
    // to TC programs (compared with null only).
    if unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null() {
        return Err(Stat::HostForwarded);
    }
    match tunnel::route(&l, pk.t.dst_be)? {
        tunnel::Route::Remote(node) => {
            let v = tunnel::encap(ctx, &l, &node, pk.route_hash())?;
            crate::stats::bump(Stat::HostEncap);
            Ok(v)
        }
        // This node's /24 and the world have routes of their own; the
        // link discards whatever else the host sends it.
        tunnel::Route::Here => pass(Stat::HostOther),
    }
}

//! Next hops from the kernel's FIB (`bpf_fib_lookup`): the routing and
//! neighbour tables decide where a packet mesh sends leaves and to which
//! MAC, so a peer or a client behind a router is reached as the stack
//! would reach it. Nothing here is configured by mesh.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup, programs::TcContext,
};

use crate::ctx::{AF_INET, Verdict};

/// `BPF_FIB_LKUP_RET_*`.
const SUCCESS: i64 = 0;
const BLACKHOLE: i64 = 1;
const PROHIBIT: i64 = 3;
const NO_NEIGH: i64 = 7;
const FRAG_NEEDED: i64 = 8;

/// Where a packet goes next.
pub enum Hop {
    /// Out of `ifindex` with these MACs.
    Resolved {
        ifindex: u32,
        dmac: [u8; 6],
        smac: [u8; 6],
    },
    /// Out of `ifindex` toward `nexthop_be`, whose MAC the neighbour table
    /// does not hold yet: the stack resolves it (`bpf_redirect_neigh`).
    NoNeigh { ifindex: u32, nexthop_be: u32 },
    /// The route says blackhole, unreachable or prohibit.
    NoRoute,
    /// The frame is longer than the egress device's MTU (and not GSO).
    TooBig,
    /// The helper declined (forwarding off on `ifindex`, a lightweight
    /// tunnel route, ...): the stack's own lookup decides.
    Declined,
}

impl Hop {
    /// The verdict that sends a packet whose Ethernet header holds this
    /// hop's MACs (`Resolved`) on its way; `fallback` for the stack's own
    /// route lookup.
    #[inline(always)]
    pub fn verdict(&self, fallback_ifindex: u32) -> Option<Verdict> {
        match *self {
            Hop::Resolved { ifindex, .. } => Some(Verdict::redirect(ifindex)),
            Hop::NoNeigh {
                ifindex,
                nexthop_be,
            } => Some(Verdict::redirect_neigh(ifindex, nexthop_be)),
            Hop::Declined => Some(Verdict::redirect_neigh(fallback_ifindex, 0)),
            Hop::NoRoute | Hop::TooBig => None,
        }
    }
}

/// The next hop for a packet from `src_be` to `dst_be`, as if it were
/// forwarded in by `ifindex` (a forwarding lookup: an output lookup would
/// bind the route to one device). `tot_len`, the IPv4 length the packet
/// will have, is checked against the route's MTU (a path MTU the kernel
/// learned included); 0 checks the skb as it is against the egress
/// device's MTU (a GSO skb always passes).
#[inline(always)]
pub fn lookup(
    ctx: &TcContext,
    ifindex: u32,
    (src_be, dst_be): (u32, u32),
    proto: u8,
    tot_len: u16,
) -> Hop {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET as u8;
    fib.l4_protocol = proto;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_3.ipv4_src = src_be;
    fib.__bindgen_anon_4.ipv4_dst = dst_be;
    // SAFETY: the context's own skb and a valid parameter block.
    let r = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match r {
        SUCCESS => Hop::Resolved {
            ifindex: fib.ifindex,
            dmac: fib.dmac,
            smac: fib.smac,
        },
        NO_NEIGH => Hop::NoNeigh {
            ifindex: fib.ifindex,
            // SAFETY: the lookup filled in the next hop.
            nexthop_be: unsafe { fib.__bindgen_anon_4.ipv4_dst },
        },
        BLACKHOLE..=PROHIBIT => Hop::NoRoute,
        FRAG_NEEDED => Hop::TooBig,
        _ => Hop::Declined,
    }
}

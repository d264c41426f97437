//! Packet counters: one per-CPU `u64` slot per [`Stat`].
//!
//! Every packet a program sees bumps exactly one *verdict* counter (what the
//! program returned) and exactly one *path* counter (why). `meshctl stats`
//! prints both, so an operator can tell why a packet took the path it did.

/// Index of a counter in the [`crate::maps::STATS`] per-CPU array.
///
/// The discriminants are the array indices and are part of the user/kernel
/// ABI: append new counters, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    // XDP verdicts on the underlay NIC.
    XdpAborted = 0,
    XdpDrop = 1,
    XdpPass = 2,
    XdpTx = 3,
    XdpRedirect = 4,
    // XDP paths: why a frame got its verdict.
    /// Frame too short for the headers its EtherType announces.
    XdpTruncated = 5,
    /// Not IPv4 (ARP, IPv6, VLAN, ...): not ours.
    XdpNotIpv4 = 6,
    /// IPv4 with an invalid header (version != 4, IHL < 5, total length too small).
    XdpBadIpv4 = 7,
    /// IPv4 fragment other than the first: no L4 header to look at.
    XdpFragment = 8,
    /// IPv4, neither TCP nor UDP.
    XdpOtherL4 = 9,
    /// TCP/UDP not addressed to anything mesh handles.
    XdpNotMesh = 10,
    /// UDP to the VXLAN port.
    XdpVxlan = 11,

    // TC verdicts on container veths (both directions).
    TcOk = 12,
    TcShot = 13,
    TcRedirect = 14,
    // TC paths.
    /// Not IPv4, or IPv4 that cannot be parsed (truncated, bad header).
    TcNotIpv4 = 15,
    TcMalformed = 16,
    /// IPv4 fragment other than the first: cannot be balanced (no ports).
    TcFragment = 17,
    /// Leaving a container, not to a service VIP:port: untouched.
    TcNotService = 18,
    /// Entering a container, no reverse NAT entry: untouched.
    TcNoReverse = 19,
    // Load balancing.
    /// A new flow picked a backend from the Maglev ring.
    LbNewFlow = 20,
    /// A packet of a tracked flow.
    LbCtHit = 21,
    /// A tracked flow whose backend is gone got a new one.
    LbReselect = 22,
    /// Drop: the service has no active backend.
    LbNoBackend = 23,
    /// A TCP packet without SYN and without a conntrack entry: the entry was
    /// evicted from the LRU (or never existed). Balanced as a new flow.
    LbCtMissMidFlow = 24,
    /// Drop: the conntrack entry could not be written.
    LbCtWriteFail = 25,
    /// Drop: a packet rewrite (NAT, checksum, MAC) failed.
    NatRewriteFail = 26,
    /// A reply translated back to the VIP.
    NatReverse = 27,
    /// An ICMP error about a balanced flow translated back (inner header too).
    NatIcmpError = 28,
    // Overlay.
    /// Leaving a container for another node: VXLAN-encapsulated.
    TunnelEncap = 29,
    /// Drop: for another node's /24, but no such node is known.
    TunnelNoNode = 30,
    /// Drop: encapsulation failed (no room, MTU).
    TunnelEncapFail = 31,
    /// XDP: VXLAN for a local container, decapsulated and passed up.
    XdpDecap = 32,
    /// XDP: VXLAN with another VNI, or not for this node: passed untouched.
    XdpVxlanForeign = 33,
    /// TC on the underlay: a decapsulated packet handed to its container's veth.
    TunnelDeliver = 34,
    /// TC on the underlay: not for a local container, left to the stack.
    TunnelPass = 35,
    /// A new direct flow reused the tuple of a finished VIP flow: the stale
    /// reverse-NAT entry was dropped so the replies are not translated.
    LbStaleReverse = 36,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; 37] = [
        Stat::XdpAborted,
        Stat::XdpDrop,
        Stat::XdpPass,
        Stat::XdpTx,
        Stat::XdpRedirect,
        Stat::XdpTruncated,
        Stat::XdpNotIpv4,
        Stat::XdpBadIpv4,
        Stat::XdpFragment,
        Stat::XdpOtherL4,
        Stat::XdpNotMesh,
        Stat::XdpVxlan,
        Stat::TcOk,
        Stat::TcShot,
        Stat::TcRedirect,
        Stat::TcNotIpv4,
        Stat::TcMalformed,
        Stat::TcFragment,
        Stat::TcNotService,
        Stat::TcNoReverse,
        Stat::LbNewFlow,
        Stat::LbCtHit,
        Stat::LbReselect,
        Stat::LbNoBackend,
        Stat::LbCtMissMidFlow,
        Stat::LbCtWriteFail,
        Stat::NatRewriteFail,
        Stat::NatReverse,
        Stat::NatIcmpError,
        Stat::TunnelEncap,
        Stat::TunnelNoNode,
        Stat::TunnelEncapFail,
        Stat::XdpDecap,
        Stat::XdpVxlanForeign,
        Stat::TunnelDeliver,
        Stat::TunnelPass,
        Stat::LbStaleReverse,
    ];

    /// Stable, greppable name, used by `meshctl stats` and `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::XdpAborted => "xdp_aborted",
            Stat::XdpDrop => "xdp_drop",
            Stat::XdpPass => "xdp_pass",
            Stat::XdpTx => "xdp_tx",
            Stat::XdpRedirect => "xdp_redirect",
            Stat::XdpTruncated => "xdp_truncated",
            Stat::XdpNotIpv4 => "xdp_not_ipv4",
            Stat::XdpBadIpv4 => "xdp_bad_ipv4",
            Stat::XdpFragment => "xdp_fragment",
            Stat::XdpOtherL4 => "xdp_other_l4",
            Stat::XdpNotMesh => "xdp_not_mesh",
            Stat::XdpVxlan => "xdp_vxlan",
            Stat::TcOk => "tc_ok",
            Stat::TcShot => "tc_shot",
            Stat::TcRedirect => "tc_redirect",
            Stat::TcNotIpv4 => "tc_not_ipv4",
            Stat::TcMalformed => "tc_malformed",
            Stat::TcFragment => "tc_fragment",
            Stat::TcNotService => "tc_not_service",
            Stat::TcNoReverse => "tc_no_reverse",
            Stat::LbNewFlow => "lb_new_flow",
            Stat::LbCtHit => "lb_ct_hit",
            Stat::LbReselect => "lb_reselect",
            Stat::LbNoBackend => "lb_no_backend",
            Stat::LbCtMissMidFlow => "lb_ct_miss_mid_flow",
            Stat::LbCtWriteFail => "lb_ct_write_fail",
            Stat::NatRewriteFail => "nat_rewrite_fail",
            Stat::NatReverse => "nat_reverse",
            Stat::NatIcmpError => "nat_icmp_error",
            Stat::TunnelEncap => "tunnel_encap",
            Stat::TunnelNoNode => "tunnel_no_node",
            Stat::TunnelEncapFail => "tunnel_encap_fail",
            Stat::XdpDecap => "xdp_decap",
            Stat::XdpVxlanForeign => "xdp_vxlan_foreign",
            Stat::TunnelDeliver => "tunnel_deliver",
            Stat::TunnelPass => "tunnel_pass",
            Stat::LbStaleReverse => "lb_stale_reverse",
        }
    }

    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of slots in the stats array (room to grow without an ABI break).
pub const STATS_SLOTS: u32 = 64;

const _: () = assert!((Stat::ALL.len() as u32) <= STATS_SLOTS);
const _: () = {
    // ALL is in index order with no gaps.
    let mut i = 0;
    while i < Stat::ALL.len() {
        assert!(Stat::ALL[i] as usize == i);
        i += 1;
    }
};

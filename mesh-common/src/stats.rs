//! Packet counters: one per-CPU `u64` slot per [`Stat`].
//!
//! Every packet a program sees bumps exactly one *verdict* counter (what the
//! program returned) and exactly one *path* counter (why). A *drop* counter
//! says why a packet was dropped; it is bumped beside the drop verdict.
//! `meshctl stats` prints them all and `/metrics` exports them, the drop
//! class also as `mesh_drops_total{reason}`.
//!
//! [`COUNTERS`] is the one table: the enum, the names, the classes and the
//! help texts all come from it. Adding a counter is one row, appended:
//! the discriminants are the array indices and part of the user/kernel ABI.

/// What a counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A program's return value (one per packet per program).
    Verdict,
    /// The path a packet took (one per packet per program).
    Path,
    /// Why a packet was dropped (with a drop verdict).
    Drop,
}

impl Class {
    pub const fn name(self) -> &'static str {
        match self {
            Class::Verdict => "verdict",
            Class::Path => "path",
            Class::Drop => "drop",
        }
    }
}

/// One row of the counter table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub stat: Stat,
    /// Stable, greppable name (`meshctl stats`, `/metrics`).
    pub name: &'static str,
    pub class: Class,
    pub help: &'static str,
}

macro_rules! counters {
    ($($variant:ident = $index:literal, $name:literal, $class:ident, $help:literal;)*) => {
        /// Index of a counter in the [`crate::maps::STATS`] per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $(#[doc = $help] $variant = $index,)*
        }

        /// Every counter, in index order.
        pub const COUNTERS: &[Counter] = &[
            $(Counter { stat: Stat::$variant, name: $name, class: Class::$class, help: $help },)*
        ];
    };
}

counters! {
    XdpAborted = 0, "xdp_aborted", Verdict, "XDP returned XDP_ABORTED.";
    XdpDrop = 1, "xdp_drop", Verdict, "XDP returned XDP_DROP.";
    XdpPass = 2, "xdp_pass", Verdict, "XDP returned XDP_PASS.";
    XdpTx = 3, "xdp_tx", Verdict, "XDP returned XDP_TX.";
    XdpRedirect = 4, "xdp_redirect", Verdict, "XDP returned XDP_REDIRECT.";
    XdpTruncated = 5, "xdp_truncated", Path, "Frame too short for the headers it announces.";
    XdpNotIpv4 = 6, "xdp_not_ipv4", Path, "Not IPv4 (ARP, IPv6, VLAN, ...): not ours.";
    XdpBadIpv4 = 7, "xdp_bad_ipv4", Path, "IPv4 with an invalid header (version, IHL, total length).";
    XdpFragment = 8, "xdp_fragment", Path, "IPv4 fragment other than the first: no L4 header.";
    XdpOtherL4 = 9, "xdp_other_l4", Path, "IPv4, neither TCP nor UDP.";
    XdpNotMesh = 10, "xdp_not_mesh", Path, "TCP/UDP not addressed to anything mesh handles.";
    XdpVxlan = 11, "xdp_vxlan", Path, "UDP to the VXLAN port while the overlay is off.";
    TcOk = 12, "tc_ok", Verdict, "TC returned TC_ACT_OK.";
    TcShot = 13, "tc_shot", Verdict, "TC returned TC_ACT_SHOT.";
    TcRedirect = 14, "tc_redirect", Verdict, "TC returned TC_ACT_REDIRECT.";
    TcNotIpv4 = 15, "tc_not_ipv4", Path, "Not IPv4: passed untouched.";
    TcMalformed = 16, "tc_malformed", Path, "IPv4 that cannot be parsed (truncated, bad header): passed untouched.";
    TcFragment = 17, "tc_fragment", Path, "IPv4 fragment other than the first of an untranslated datagram: routed by address alone.";
    TcNotService = 18, "tc_not_service", Path, "Leaving a container, not to a service VIP:port.";
    TcNoReverse = 19, "tc_no_reverse", Path, "Entering a container, no reverse NAT entry: untouched.";
    LbNewFlow = 20, "lb_new_flow", Path, "A new flow picked a backend from the Maglev ring.";
    LbCtHit = 21, "lb_ct_hit", Path, "A packet of a tracked flow.";
    LbReselect = 22, "lb_reselect", Path, "A tracked flow whose backend is gone got a new one.";
    LbNoBackend = 23, "lb_no_backend", Drop, "The service has no active backend.";
    LbCtMissMidFlow = 24, "lb_ct_miss_mid_flow", Path, "A TCP packet without SYN and without a conntrack entry (evicted): balanced as a new flow.";
    LbCtWriteFail = 25, "lb_ct_write_fail", Drop, "The conntrack entry could not be written.";
    NatRewriteFail = 26, "nat_rewrite_fail", Drop, "A packet rewrite (NAT, checksum, MAC) failed.";
    NatReverse = 27, "nat_reverse", Path, "A reply translated back to the VIP.";
    NatIcmpError = 28, "nat_icmp_error", Path, "An ICMP error about a balanced flow translated back (inner header too).";
    TunnelEncap = 29, "tunnel_encap", Path, "Leaving a container for another node: VXLAN-encapsulated.";
    TunnelNoNode = 30, "tunnel_no_node", Drop, "For another node's /24, but no such node is known.";
    TunnelEncapFail = 31, "tunnel_encap_fail", Drop, "Encapsulation failed (no room, MTU).";
    XdpDecap = 32, "xdp_decap", Path, "VXLAN for a local container, decapsulated and passed up.";
    XdpVxlanForeign = 33, "xdp_vxlan_foreign", Path, "VXLAN with another VNI, or not for this node: passed untouched.";
    TunnelDeliver = 34, "tunnel_deliver", Path, "Underlay TC: a decapsulated packet handed to its container's veth.";
    TunnelPass = 35, "tunnel_pass", Path, "Underlay TC: not for a local container, left to the stack.";
    LbStaleReverse = 36, "lb_stale_reverse", Path, "A new direct flow reused a finished VIP or routing-mesh flow's tuple: its stale reverse entry was dropped.";
    TcSpoofed = 37, "tc_spoofed", Drop, "Leaving a container with a source address that is not its own.";
    XdpVxlanUntrusted = 38, "xdp_vxlan_untrusted", Path, "VXLAN from an address that is not a cluster node's: passed untouched, to the host's firewall.";
    XdpVxlanNotOurs = 39, "xdp_vxlan_not_ours", Path, "VXLAN whose outer destination is not this node's address: passed untouched.";
    XdpVxlanBad = 40, "xdp_vxlan_bad", Path, "VXLAN with outer TTL 0 or a UDP length that disagrees with the IPv4 length: passed untouched.";
    TunnelUnmarked = 41, "tunnel_unmarked", Drop, "Underlay TC: a frame from the wire for this node's /24 that did not come through the tunnel from a cluster node: dropped (containers are reachable from outside only through published ports).";
    XdpForgedMark = 42, "xdp_forged_mark", Drop, "XDP: a frame from the wire whose destination MAC is this node's mark for its underlay TC program (only XDP writes one).";
    LbHairpin = 43, "lb_hairpin", Path, "A backend reached its own service and Maglev picked it: its source NATed to the hairpin address.";
    NatFragment = 44, "nat_fragment", Path, "A non-first fragment of a translated datagram: translated as its first fragment was.";
    LbReverseRestored = 45, "lb_reverse_restored", Path, "A tracked flow idle for over a second had lost its reverse entry (LRU): restored.";
    LbCtConfirmed = 46, "lb_ct_confirmed", Path, "A new flow's client went on after its backend answered: its pair moved to the confirmed table.";
    IngressLocal = 47, "ingress_local", Path, "XDP: to a published port of this node, balanced to a backend here: DNATed (client address kept) and handed to it.";
    IngressRemote = 48, "ingress_remote", Path, "XDP: to a published port of this node, balanced to a backend on another node: DNATed and tunnelled there.";
    IngressReply = 49, "ingress_reply", Path, "A reply of a routing-mesh flow translated back to this node's published port and sent to the client.";
    IngressReturn = 50, "ingress_return", Path, "A backend's reply to a client that came in through another node: tunnelled back to that node.";
    IngressReplyUntracked = 51, "ingress_reply_untracked", Path, "XDP: tunnelled traffic for an outside address without a routing-mesh flow: passed untouched.";
    IngressNoRoute = 52, "ingress_no_route", Drop, "A routing-mesh reply whose client has no route (FIB lookup failed).";
    MssClamped = 53, "mss_clamped", Path, "A routing-mesh TCP SYN through the tunnel: its MSS lowered so full-size segments fit.";
    IngressTooBig = 54, "ingress_too_big", Path, "XDP: a routing-mesh packet for a remote backend too large for the tunnel, DF set: to be answered with ICMP fragmentation needed.";
    IngressTooBigNoDf = 55, "ingress_too_big_no_df", Drop, "XDP: a routing-mesh packet for a remote backend too large for the tunnel without DF: it cannot be fragmented here.";
    IcmpFragNeeded = 56, "icmp_frag_needed", Path, "Underlay TC: ICMP fragmentation needed sent to a routing-mesh client (with the tunnel's MTU).";
    SockLocal = 57, "sock_local", Path, "Socket level: a connect of this host's to a published port on localhost or its own address, sent straight to a backend here.";
    SockRemote = 58, "sock_remote", Path, "Socket level: such a connect sent to the published port of the node of the backend chosen (its XDP balances it).";
    SockNoBackend = 59, "sock_no_backend", Path, "Socket level: such a connect for a service without a usable backend: left as it was.";
    BridgeLocal = 60, "bridge_local", Path, "A container on another Docker network to a published port (node or gateway address): balanced to a backend here, handed to its veth.";
    BridgeRemote = 61, "bridge_remote", Path, "A container on another Docker network to a published port: balanced to a backend on another node, tunnelled there.";
    BridgeSpoofed = 62, "bridge_spoofed", Drop, "A packet to a published port on another Docker network's bridge whose source is not in that network's subnet.";
    BridgePass = 63, "bridge_pass", Path, "Another Docker network's bridge: anything but a published port (passed to the stack untouched).";
    IngressReplyDecap = 64, "ingress_reply_decap", Path, "XDP: a tunnelled routing-mesh reply for a client of this node: decapsulated and marked for the underlay TC program, which translates it.";
    IngressReplyLost = 65, "ingress_reply_lost", Drop, "Underlay TC: a routing-mesh reply whose flow left conntrack after XDP decapsulated it.";
    SockDatagram = 66, "sock_datagram", Path, "Socket level: a datagram of this host's unconnected UDP socket to a published port on localhost or its own address, sent to a backend (here, or the published port of its node).";
    SockReplyRestored = 67, "sock_reply_restored", Path, "Socket level: an answer to a balanced datagram socket, reported as from the address it asked for.";
    SockVip = 68, "sock_vip", Path, "Socket level: a connect or datagram of this host's to a VIP, sent straight to the backend Maglev picks (here, or on another node through the host link).";
    HostEncap = 69, "host_encap", Path, "Host link: a packet of this host's for another node's /24 (a VIP's backend there, a container): tunnelled to that node.";
    HostSpoofed = 70, "host_spoofed", Drop, "Host link: a packet whose source is not the host's overlay address (forwarded by the host, not its own): dropped, never tunnelled.";
    HostOther = 71, "host_other", Path, "Host link: not IPv4, or an address no other node owns: left to the link, which discards it.";
    HostDeliver = 72, "host_deliver", Path, "Underlay TC: a packet tunnelled to this host's overlay address (a backend's answer to the host): handed to the stack through the host link.";
    HostForwarded = 73, "host_forwarded", Drop, "Host link: a packet the host forwards (no socket of its own sent it), even with the host's address after masquerading: dropped, never tunnelled.";
    TunnelNeighResolve = 74, "tunnel_neigh_resolve", Path, "Encapsulated for a node whose next hop's MAC the neighbour table does not hold yet: handed to the stack, which resolves it.";
    TunnelNoRoute = 75, "tunnel_no_route", Drop, "Encapsulated for a node the routing table has no route to (blackhole, unreachable, prohibit).";
    TunnelTooBig = 76, "tunnel_too_big", Drop, "Encapsulated, longer than the MTU of the device the route to its node leaves by (not GSO): the tunnel MTU (--mtu) is too large for the path.";
    IngressRequestLost = 77, "ingress_request_lost", Drop, "Underlay TC: a routing-mesh request whose flow left conntrack after XDP balanced it.";
    VipEcho = 78, "vip_echo", Path, "A ping to a service's VIP: answered by the data plane, as the VIP's own address would answer it.";
    NetIsolated = 79, "net_isolated", Drop, "A container's packet to an address, a VIP or a task of another overlay network than the one its veth is on (the host's own gateway addresses excepted).";
    XdpVxlanBadVni = 80, "xdp_vxlan_bad_vni", Drop, "VXLAN from a cluster node whose VNI is not the network of its inner destination, or a VNI this node does not serve.";
    ArpReply = 81, "arp_reply", Path, "A container asked ARP for an address of its network on another node or a VIP: answered by the data plane (the frames then come to its veth program, which tunnels or balances them).";
    XdpVxlanPlain = 82, "xdp_vxlan_plain", Drop, "Plain VXLAN from the wire while the cluster encrypts (--encrypt): between nodes the tunnel runs inside WireGuard only, so such a frame is forged or from a node that does not encrypt.";
    WgDecap = 83, "wg_decap", Path, "VXLAN out of WireGuard (mesh-wg), from a node whose key the kernel checked: decapsulated and handed on as the underlay's.";
    WgNotVxlan = 84, "wg_not_vxlan", Drop, "Out of WireGuard, not a VXLAN frame of a cluster node for this node: nothing else travels inside mesh's WireGuard.";
    TunnelEncrypt = 85, "tunnel_encrypt", Path, "Encapsulated and handed to WireGuard (mesh-wg) for its node.";
    VxlanHandoff = 86, "vxlan_handoff", Path, "VXLAN for this node that GRO merged into one large packet (underlay TC without XDP): checked, then left to the kernel's VXLAN device (mesh-vxlan) to decapsulate, which resets the packet's tunnel offload state as only the kernel can.";
    VxlanDeviceIn = 87, "vxlan_device_in", Path, "A packet mesh handed to mesh-vxlan, decapsulated by the kernel: handed on as the underlay's.";
    VxlanDeviceUnmarked = 88, "vxlan_device_unmarked", Drop, "Out of mesh-vxlan without mesh's hand-off mark: VXLAN that did not come through mesh's checks on the underlay NIC (another interface, or one mesh left to the stack).";
    SockVipContainer = 89, "sock_vip_container", Path, "Socket level: a connect or datagram of a container's to a VIP, sent straight to the backend Maglev picks (here or on another node): its packets then take the plain path, with nothing to translate.";
    LocalRedirect = 90, "local_redirect", Path, "Leaving a container for a container of its network on this node: handed straight to that container's veth, as the tunnel delivers (not through the bridge and the host's forwarding).";
    NatReverseHere = 91, "nat_reverse_here", Path, "A backend's reply to a client on this node, of a VIP flow translated per packet: from the VIP again at the backend's veth, handed straight to the client's.";
    NatReverseDone = 92, "nat_reverse_done", Path, "Entering a container: a reply its backend's veth already translated (nat_reverse_here), passed without a lookup.";
}

impl Stat {
    /// Stable, greppable name, used by `meshctl stats` and `/metrics`.
    pub const fn name(self) -> &'static str {
        COUNTERS[self as usize].name
    }

    pub const fn class(self) -> Class {
        COUNTERS[self as usize].class
    }

    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of slots in the stats array (room to grow without an ABI break).
pub const STATS_SLOTS: u32 = 128;

const _: () = assert!((COUNTERS.len() as u32) <= STATS_SLOTS);
const _: () = {
    // The table is in index order with no gaps.
    let mut i = 0;
    while i < COUNTERS.len() {
        assert!(COUNTERS[i].stat as usize == i);
        i += 1;
    }
};

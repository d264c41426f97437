//! Connection tracking.
//!
//! Every balanced flow has two entries:
//! - forward, keyed by the client's tuple (client -> VIP), giving the backend;
//! - reverse, keyed by the backend's reply tuple (backend -> client), giving
//!   the VIP:port to restore (reverse NAT, also of ICMP errors).
//!
//! The pair lives in one of two LRU hashes (netfilter's "assured" idea, as
//! separate tables): a new flow starts in `MESH_CT_NEW`; it moves to
//! `MESH_CT` at the client's first packet after the backend answered (TCP:
//! an ACK without SYN or RST once the backend sent ACK without RST, so a
//! completed handshake or a live connection; UDP: once a reply came). A
//! flood of flows that never complete (SYNs, unanswered datagrams, a
//! spoofer's ACKs) churns only `MESH_CT_NEW` and cannot evict confirmed
//! flows. The kernel never expires an entry; the agent's sweep removes
//! pairs whose flow is over or idle past its state's timeout (user space,
//! `mesh_agent::conntrack`), and a tracked flow idle for over a second
//! recreates its reverse entry if the LRU evicted it alone.

/// A flow's 5-tuple as it appears on the wire (addresses and ports in
/// network order; ports 0 for protocols without them). Shared by the
/// programs, the agent, meshctl and the tests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl Tuple {
    /// The other direction of the same flow.
    #[inline(always)]
    pub const fn reversed(&self) -> Tuple {
        Tuple {
            src_be: self.dst_be,
            dst_be: self.src_be,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The conntrack key of this tuple in `direction` (`dir::*`).
    #[inline(always)]
    pub const fn key(&self, direction: u8) -> CtKey {
        CtKey {
            src_be: self.src_be,
            dst_be: self.dst_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            dir: direction,
            _pad: [0; 2],
        }
    }

    /// The reply tuple of this client tuple once it is DNATed to
    /// `ip_be:port_be` (a backend): from the backend to the client, or to
    /// [`HAIRPIN_IP_BE`] when the backend is the client itself (hairpin).
    #[inline(always)]
    pub const fn reply_from(&self, ip_be: u32, port_be: u16) -> Tuple {
        Tuple {
            src_be: ip_be,
            dst_be: if ip_be == self.src_be {
                HAIRPIN_IP_BE
            } else {
                self.src_be
            },
            sport_be: port_be,
            dport_be: self.sport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The flow hash (Maglev pick, tunnel source port).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        crate::lb::flow_hash(
            self.src_be,
            self.dst_be,
            self.sport_be,
            self.dport_be,
            self.proto,
        )
    }
}

/// Direction of a [`CtKey`].
pub mod dir {
    /// Client -> VIP, as the client sent it.
    pub const FORWARD: u8 = 0;
    /// Backend -> client, as the backend replies.
    pub const REVERSE: u8 = 1;
}

/// The full 5-tuple plus direction. Build it from `Default` so the padding
/// is always zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `dir::*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The tuple this key was built from.
    #[inline(always)]
    pub const fn tuple(&self) -> Tuple {
        Tuple {
            src_be: self.src_be,
            dst_be: self.dst_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The reverse key of a forward entry (`self` with entry `e`).
    #[inline(always)]
    pub const fn reverse_of(&self, e: &CtEntry) -> CtKey {
        self.tuple()
            .reply_from(e.nat_ip_be, e.nat_port_be)
            .key(dir::REVERSE)
    }
}

/// A conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Forward: the backend chosen. Reverse: the same backend.
    pub backend_id: u32,
    /// Service id (counters, `meshctl conntrack` filter).
    pub service_id: u32,
    /// Forward: backend ip/port the flow is NATed to (checked against the
    /// backends map, so a reused backend id never captures an old flow).
    /// Reverse: the VIP/port to restore.
    pub nat_ip_be: u32,
    pub nat_port_be: u16,
    /// TCP flags seen in this direction, OR-ed (a SYN starts over: a new
    /// connection on the same tuple).
    pub tcp_flags: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// bpf_ktime_get_ns of the last packet.
    pub last_seen_ns: u64,
    /// bpf_ktime_get_ns when the flow was balanced.
    pub created_ns: u64,
}

/// A reverse entry of a hairpin flow (a backend reaching its own service):
/// its replies go to [`HAIRPIN_IP`] and get the client (the backend itself)
/// back as destination too.
pub const CT_F_HAIRPIN: u8 = 1;
/// A reverse entry whose direction carried a packet (the backend answered).
pub const CT_F_REPLIED: u8 = 2;
/// A reverse entry of a flow that came in through a published port on this
/// node (routing mesh): its replies get the node's address and published
/// port back as source and leave toward the client.
pub const CT_F_INGRESS: u8 = 4;
/// A reverse entry of a flow that came in through a published port on
/// another node and was tunnelled here: its replies go back through that
/// node (`nat_ip_be` is its underlay address), which translates them.
pub const CT_F_RETURN: u8 = 8;

/// The source a backend sees when it reaches its own service through the
/// VIP and Maglev picks it (source == destination would be dropped by its
/// kernel): a link-local address that is never routed off the host, so
/// its replies come back through the veth, where they are translated.
pub const HAIRPIN_IP: [u8; 4] = [169, 254, 42, 1];

/// [`HAIRPIN_IP`] in network order, as packets carry it.
pub const HAIRPIN_IP_BE: u32 = u32::from_ne_bytes(HAIRPIN_IP);

/// TCP flag bits as in the header.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// A fragmented datagram, as its fragments carry it: addresses, IPv4 id
/// and protocol (network order). Only the first fragment has ports, so it
/// records its translation here for the others.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the first fragment of a datagram got: the address that replaces
/// the destination (to a VIP) or the source (a reply), and the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub nat_ip_be: u32,
    pub backend_id: u32,
}

const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragEntry>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<Tuple>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields, explicit padding.
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
}

//! Live events from the programs (`meshctl monitor`): drops with their
//! reason and addresses, and new flows with the backend chosen, through a
//! BPF ring buffer ([`crate::maps::EVENTS`]).
//!
//! Nothing is written while nobody listens: the agent sets `on` in every
//! CPU's [`Budget`] ([`crate::maps::MONITOR`]) while a `meshctl monitor`
//! is attached, and the programs read that one word only where they drop a
//! packet or open a flow. While it is set, each CPU writes at most
//! [`RATE`] events per second (a flood cannot drown the agent); what is
//! over it, or does not fit the ring, is counted (`lost`).

/// An event's kind.
pub const DROP: u8 = 1;
pub const NEW_FLOW: u8 = 2;

/// Events per second and CPU at most.
pub const RATE: u32 = 2000;

/// One event, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// [`DROP`] or [`NEW_FLOW`].
    pub kind: u8,
    /// IP protocol (0: not IPv4, or too short to tell).
    pub proto: u8,
    /// The drop reason (`crate::stats::Stat` index).
    pub stat: u16,
    /// The interface the packet came in by (or left by, TC egress).
    pub ifindex: u32,
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// A new flow's backend id (the agent names it).
    pub backend_id: u32,
    pub _pad: u32,
    /// A new flow's service id.
    pub service_id: u32,
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
}

/// Each CPU's monitor state: whether anyone listens (written by the agent
/// into every CPU's slot), the rate limit, what was lost, and the event
/// being built (in the map, not on the programs' stack, which is at its
/// limit in the largest of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// 1 while a `meshctl monitor` listens.
    pub on: u32,
    /// Events written in `second`.
    pub count: u32,
    /// The second (ktime ns / 1e9) the count is for.
    pub second: u64,
    /// Events not written: over the rate, or the ring buffer full.
    pub lost: u64,
    pub event: Event,
}

const _: () = assert!(core::mem::size_of::<Event>() == 40);
const _: () = assert!(core::mem::size_of::<Budget>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields, explicit padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Budget {}
}

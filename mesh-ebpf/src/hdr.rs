//! Wire headers and bounds-checked access: `#[repr(C)]` views of the
//! formats the programs read and write, their field offsets, and
//! [`ptr_at`], through which every header access goes. A leaf: it knows
//! nothing of hooks or packets.
//!
//! Multi-byte fields are kept as network-order byte arrays or `_be`
//! integers so that no field is ever read in the wrong byte order by
//! accident.

use core::mem::size_of;

use crate::csum;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

/// An ARP packet for IPv4 over Ethernet (RFC 826), after the Ethernet
/// header.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct ArpEth {
    pub htype_be: u16,
    pub ptype_be: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op_be: u16,
    pub sha: [u8; 6],
    pub spa_be: u32,
    pub tha: [u8; 6],
    pub tpa_be: u32,
}
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV4_MIN_HLEN: usize = 20;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub vihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    /// Flags (3 high bits) and fragment offset.
    pub frag_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum_be: u16,
    pub src_be: u32,
    pub dst_be: u32,
}

impl Ipv4Hdr {
    /// A header this node sends (no options, TTL 64, not fragmented), for
    /// a datagram of `total_len` bytes, its checksum computed.
    #[inline(always)]
    pub fn ours(proto: u8, src_be: u32, dst_be: u32, total_len: u16) -> Ipv4Hdr {
        let mut h = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len_be: total_len.to_be(),
            id_be: 0,
            frag_be: 0,
            ttl: 64,
            proto,
            csum_be: 0,
            src_be,
            dst_be,
        };
        h.csum_be = h.checksum();
        h
    }

    /// The header checksum (its own checksum field taken as 0), in network
    /// order.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let h = Ipv4Hdr {
            csum_be: 0,
            ..*self
        };
        // SAFETY: Ipv4Hdr is repr(C), 20 bytes, no padding.
        let words: [u16; 10] = unsafe { core::mem::transmute(h) };
        csum::words(&words)
    }

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vihl >> 4
    }
    /// Header length in bytes (20..=60).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.vihl & 0x0f) as usize) * 4
    }
    /// More fragments follow (the MF flag).
    #[inline(always)]
    pub fn more_fragments(&self) -> bool {
        u16::from_be(self.frag_be) & 0x2000 != 0
    }
    /// Fragment offset in 8-byte units; non-zero for every fragment but the first.
    #[inline(always)]
    pub fn frag_offset(&self) -> u16 {
        u16::from_be(self.frag_be) & 0x1fff
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub len_be: u16,
    pub csum_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq_be: u32,
    pub ack_be: u32,
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window_be: u16,
    pub csum_be: u16,
    pub urg_be: u16,
}

const _: () = assert!(size_of::<EthHdr>() == ETH_HLEN);
const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_MIN_HLEN);
const _: () = assert!(size_of::<UdpHdr>() == 8);
const _: () = assert!(size_of::<TcpHdr>() == 20);

/// A `T` at `offset` bytes into the packet `[start, end)`, or `None` when the
/// packet is too short. Every header access goes through here.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*const T> {
    let at = start + offset;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *const T)
}

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub csum_be: u16,
    pub rest_be: u32,
}
const _: () = assert!(size_of::<IcmpHdr>() == 8);

/// Offsets of checksum fields, relative to their header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const ICMP_CSUM_OFF: usize = 2;

/// The VXLAN header (RFC 7348): flags (I = the VNI is valid), reserved,
/// the 24-bit VNI and a reserved byte.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub _reserved: [u8; 3],
    /// VNI << 8, network order.
    pub vni_be: u32,
}
const _: () = assert!(size_of::<VxlanHdr>() == mesh_common::tunnel::VXLAN_HLEN);

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        u32::from_be(self.vni_be) >> 8
    }
}

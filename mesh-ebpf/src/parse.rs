//! The one parser both hooks use ([`ipv4`]: Ethernet / IPv4 / TCP or UDP
//! to a [`Parsed`] view), over the [`Packet`] interface.

use mesh_common::ct::{FragKey, Tuple};

use crate::{
    ctx::Packet,
    hdr::{
        ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, Ipv4Hdr, TcpHdr,
        UdpHdr,
    },
};

/// Why a frame is not a parseable IPv4 packet. Each hook counts these
/// under its own path counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the headers it announces.
    Truncated,
    /// Not IPv4 (ARP, IPv6, VLAN, ...).
    NotIpv4,
    /// IPv4 with an invalid header (version, IHL, total length).
    BadIpv4,
}

/// An IPv4 packet as both hooks see it.
#[derive(Clone, Copy)]
pub struct Parsed {
    /// Ports are 0 unless the protocol is TCP or UDP.
    pub t: Tuple,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// A fragment other than the first: addresses only (no L4 header, so
    /// the ports are 0).
    pub fragment: bool,
    /// Part of a fragmented datagram (the first fragment included).
    pub fragmented: bool,
    /// The IPv4 id (network order): what ties fragments together.
    pub id_be: u16,
    pub ttl: u8,
    /// The IPv4 total length.
    pub ip_len: u16,
}

/// Parses Ethernet / IPv4 and, for TCP and UDP, the whole L4 header.
/// Ethernet may pad short frames, so the frame can be longer than the
/// datagram, never shorter.
#[inline(always)]
pub fn ipv4<P: Packet>(p: &P) -> Result<Parsed, ParseError> {
    let eth: EthHdr = p.load(0).ok_or(ParseError::Truncated)?;
    if u16::from_be(eth.proto_be) != ETH_P_IP {
        return Err(ParseError::NotIpv4);
    }
    let ip: Ipv4Hdr = p.load(ETH_HLEN).ok_or(ParseError::Truncated)?;
    let ihl = ip.header_len();
    let tot_len = u16::from_be(ip.tot_len_be) as usize;
    if ip.version() != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl {
        return Err(ParseError::BadIpv4);
    }
    if ETH_HLEN + tot_len > p.len() {
        return Err(ParseError::Truncated);
    }
    let l4_off = ETH_HLEN + ihl;
    let mut pk = Parsed {
        t: Tuple {
            src_be: ip.src_be,
            dst_be: ip.dst_be,
            proto: ip.proto,
            ..Tuple::default()
        },
        l4_off,
        tcp_flags: 0,
        fragment: ip.frag_offset() != 0,
        fragmented: ip.frag_offset() != 0 || ip.more_fragments(),
        id_be: ip.id_be,
        ttl: ip.ttl,
        ip_len: tot_len as u16,
    };
    if pk.fragment {
        return Ok(pk);
    }
    let t = &mut pk.t;
    match ip.proto {
        IPPROTO_TCP => {
            let tcp: TcpHdr = p.load(l4_off).ok_or(ParseError::Truncated)?;
            (t.sport_be, t.dport_be, pk.tcp_flags) = (tcp.sport_be, tcp.dport_be, tcp.flags);
        }
        IPPROTO_UDP => {
            let udp: UdpHdr = p.load(l4_off).ok_or(ParseError::Truncated)?;
            (t.sport_be, t.dport_be) = (udp.sport_be, udp.dport_be);
        }
        _ => {}
    }
    Ok(pk)
}

impl Parsed {
    /// The flow hash for routing: the addresses alone for a fragmented
    /// datagram, so all of its fragments take one path (one outer UDP
    /// source port), the whole 5-tuple otherwise.
    #[inline(always)]
    pub fn route_hash(&self) -> u32 {
        if self.fragmented {
            Tuple {
                sport_be: 0,
                dport_be: 0,
                ..self.t
            }
            .hash()
        } else {
            self.t.hash()
        }
    }

    /// This datagram's key among fragments.
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            src_be: self.t.src_be,
            dst_be: self.t.dst_be,
            id_be: self.id_be,
            proto: self.t.proto,
            _pad: 0,
        }
    }
}

//! Packet builders for fixtures. Built with etherparse, so lengths and
//! checksums come from an implementation independent of the data plane's.

use std::net::Ipv4Addr;

use etherparse::{IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, PacketBuilder};

pub const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const TTL: u8 = 64;

/// Ethernet / IPv4 / UDP.
pub fn udp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv4(src.0.octets(), dst.0.octets(), TTL)
        .udp(src.1, dst.1);
    let mut out = Vec::new();
    let r = b.write(&mut out, payload);
    write_out(r, out)
}

/// Ethernet / IPv4 / TCP with the given flags set (a builder closure picks them).
pub fn tcp4(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    flags: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv4(src.0.octets(), dst.0.octets(), TTL)
        .tcp(src.1, dst.1, seq, 64240);
    let mut out = Vec::new();
    let r = flags(b).write(&mut out, payload);
    write_out(r, out)
}

/// A TCP SYN with an MSS option.
pub fn syn_mss(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), mss: u16) -> Vec<u8> {
    tcp4(
        src,
        dst,
        1,
        |b| {
            b.syn()
                .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(mss)])
                .expect("MSS option")
        },
        b"",
    )
}

/// Ethernet / IPv4 with `options` (a multiple of 4 bytes, at most 40) / UDP.
pub fn udp4_with_options(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, TTL, IpNumber::UDP, src.0.octets(), dst.0.octets())
        .expect("valid IPv4 header");
    ip.options = options
        .try_into()
        .expect("IPv4 options: a multiple of 4, at most 40 bytes");
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .udp(src.1, dst.1);
    let mut out = Vec::new();
    let r = b.write(&mut out, payload);
    write_out(r, out)
}

/// Ethernet / IPv4 / ICMP echo request.
pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4_echo_request(id, seq);
    let mut out = Vec::new();
    let r = b.write(&mut out, b"ping");
    write_out(r, out)
}

/// Ethernet / IPv4 / ICMP echo reply with payload "ping".
pub fn icmp4_echo_reply(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4_echo_reply(id, seq);
    let mut out = Vec::new();
    let r = b.write(&mut out, b"ping");
    write_out(r, out)
}

/// Ethernet / IPv6 / UDP.
pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv6(src, dst, TTL)
        .udp(sport, dport);
    let mut out = Vec::new();
    let r = b.write(&mut out, payload);
    write_out(r, out)
}

/// An ARP request (EtherType 0x0806), padded to the Ethernet minimum.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC_PEER);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_PEER);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// The reply to [`arp_request`] from `sender` (who has `sender_mac`) to
/// `target` (at `target_mac`), padding kept.
pub fn arp_reply(
    (sender, sender_mac): (Ipv4Addr, [u8; 6]),
    (target, target_mac): (Ipv4Addr, [u8; 6]),
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// A VXLAN frame (RFC 7348): outer Ethernet / IPv4 / UDP to 4789 / VXLAN
/// header with `vni`, carrying `inner` (an Ethernet frame).
pub fn vxlan4(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    sport: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + inner.len());
    payload.extend_from_slice(&[0x08, 0, 0, 0]); // flags: I (VNI valid)
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    udp4((outer_src, sport), (outer_dst, 4789), &payload)
}

/// Sets bytes `at..at+bytes.len()` of `frame` (for hand-made malformations).
pub fn patch(mut frame: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    frame
}

/// The first `len` bytes of `frame`.
pub fn truncate(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

fn write_out(r: Result<(), etherparse::err::packet::BuildWriteError>, out: Vec<u8>) -> Vec<u8> {
    r.expect("fixture packet builds");
    out
}

/// Sets the Ethernet destination and source of `frame`.
pub fn macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// Ethernet / IPv4 / ICMP port unreachable quoting `quoted` (an IPv4 packet
/// without its Ethernet header), as a host's stack sends it.
pub fn icmp4_port_unreachable(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let b = PacketBuilder::ethernet2(MAC_PEER, MAC_NODE)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ));
    let mut out = Vec::new();
    let r = b.write(&mut out, quoted);
    write_out(r, out)
}

/// Sets the UDP checksum of an Ethernet/IPv4(no options)/UDP frame to 0
/// ("no checksum").
pub fn udp_no_checksum(frame: Vec<u8>) -> Vec<u8> {
    patch(frame, 14 + 20 + 6, &[0, 0])
}

/// A VXLAN frame exactly as the data plane builds one: outer Ethernet
/// `src_mac -> dst_mac`, IPv4 (TTL 64, id 0, no DF) `src -> dst`, UDP
/// `sport -> 4789` with checksum 0, VXLAN with `vni`, then `inner`.
pub fn vxlan_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    sport: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + inner.len());
    payload.extend_from_slice(&[0x08, 0, 0, 0]);
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, src.octets(), dst.octets())
        .expect("valid IPv4 header");
    ip.dont_fragment = false;
    ip.identification = 0;
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .udp(sport, 4789);
    let mut out = Vec::new();
    let r = b.write(&mut out, &payload);
    let out = write_out(r, out);
    patch(out, 14 + 20 + 6, &[0, 0])
}

/// Splits an Ethernet / IPv4 (no options) frame into IPv4 fragments whose
/// payloads are `chunk` bytes (a multiple of 8; the last one shorter), all
/// with IPv4 id `id`, each with its own header checksum.
pub fn fragments(frame: &[u8], chunk: usize, id: u16) -> Vec<Vec<u8>> {
    assert!(
        chunk.is_multiple_of(8) && chunk > 0,
        "fragment payloads are multiples of 8"
    );
    let (eth, ip, payload) = (&frame[..14], &frame[14..34], &frame[34..]);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    let last = pieces.len() - 1;
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut h = ip.to_vec();
            h[2..4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let offset = (i * chunk / 8) as u16 | if i < last { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&offset.to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let mut sum: u32 = h
                .chunks(2)
                .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            [eth, &h[..], piece].concat()
        })
        .collect()
}

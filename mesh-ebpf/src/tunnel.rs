//! The overlay: which node an address lives on, and VXLAN encapsulation.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use mesh_common::{
    stats::Stat,
    tunnel::{
        ENCAP_LEN, LocalNode, NODE_MASK, Node, SPORT_BASE, SPORT_MASK, VXLAN_FLAG_I, VXLAN_PORT,
    },
};

use crate::{
    maps::{LOCAL_EPS, LOCAL_NODE, NODES},
    parse::{ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_UDP, Ipv4Hdr},
    stats::bump,
};

/// This node's settings, when the agent has enabled the overlay.
#[inline(always)]
pub fn local() -> Option<LocalNode> {
    LOCAL_NODE.get(0).copied().filter(|l| l.enabled == 1)
}

/// Where an address lives.
pub enum Route {
    /// On this node, or outside the cluster: the stack delivers it.
    Here,
    /// On another node.
    Remote(Node),
}

#[inline(always)]
pub fn route(l: &LocalNode, dst_be: u32) -> Result<Route, Stat> {
    if dst_be & l.cluster_mask_be != l.cluster_be {
        return Ok(Route::Here);
    }
    let subnet = dst_be & NODE_MASK.to_be();
    if subnet == l.subnet_be {
        return Ok(Route::Here);
    }
    // SAFETY: plain data written by the agent.
    match unsafe { NODES.get(&subnet) } {
        Some(n) => Ok(Route::Remote(*n)),
        None => Err(Stat::TunnelNoNode),
    }
}

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header's length.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Wraps the whole frame in outer Ethernet / IPv4 / UDP / VXLAN for `node`
/// and redirects it out of the underlay NIC. The flags tell the kernel it
/// is a UDP tunnel with an inner Ethernet header, so GSO segments large
/// TCP sends correctly.
#[inline(always)]
pub fn encap(ctx: &TcContext, l: &LocalNode, node: &Node, flow_hash: u32) -> Result<i32, Stat> {
    let inner_len = ctx.len() as usize;
    let inner_eth: [u8; 12] = ctx.load(0).map_err(|_| Stat::TunnelEncapFail)?;
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        | encap_l2(ETH_HLEN as u64);
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Stat::TunnelEncapFail)?;

    // [outer eth 14][outer IPv4 20][UDP 8][VXLAN 8][inner eth 14] = 64 bytes,
    // written over the old Ethernet header and the 50 new bytes.
    let mut h = [0u8; 64];
    h[0..6].copy_from_slice(&node.mac);
    h[6..12].copy_from_slice(&l.underlay_mac);
    h[12] = 0x08; // IPv4
    let ip_len = (inner_len + ENCAP_LEN - ETH_HLEN) as u16;
    h[14] = 0x45;
    h[16..18].copy_from_slice(&ip_len.to_be_bytes());
    h[22] = 64; // TTL
    h[23] = IPPROTO_UDP;
    h[26..30].copy_from_slice(&l.underlay_ip_be.to_ne_bytes());
    h[30..34].copy_from_slice(&node.underlay_ip_be.to_ne_bytes());
    let csum = ipv4_csum(&h);
    h[24..26].copy_from_slice(&csum.to_be_bytes());
    let sport = SPORT_BASE | (flow_hash as u16 & SPORT_MASK);
    h[34..36].copy_from_slice(&sport.to_be_bytes());
    h[36..38].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    h[38..40].copy_from_slice(&((ip_len - 20).to_be_bytes()));
    // UDP checksum 0: allowed for VXLAN over IPv4 (RFC 7348 section 5).
    h[42] = VXLAN_FLAG_I;
    h[46..49].copy_from_slice(&l.vni.to_be_bytes()[1..4]);
    // The inner frame keeps the container's source MAC; its destination is
    // the receiving node's NIC, so that node's stack takes it as its own.
    h[50..56].copy_from_slice(&node.mac);
    h[56..62].copy_from_slice(&inner_eth[6..12]);
    h[62] = 0x08;
    ctx.store(0, &h, 0).map_err(|_| Stat::TunnelEncapFail)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(l.underlay_ifindex, 0) } as i32)
}

/// The IPv4 header checksum of `h[14..34]`.
#[inline(always)]
fn ipv4_csum(h: &[u8; 64]) -> u16 {
    let mut sum = 0u32;
    let mut i = 14;
    while i < 34 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// TC ingress on the underlay NIC, after XDP decapsulated what is ours: a
/// packet for a container on this node goes straight to its veth (as the
/// bridge would deliver it), so forwarding never depends on the host's
/// FORWARD chain. Everything else is left to the stack.
#[inline(always)]
pub fn underlay_ingress(ctx: &TcContext) -> i32 {
    use aya_ebpf::bindings::TC_ACT_OK;
    let deliver = || -> Option<i32> {
        let local = local()?;
        let eth: EthHdr = ctx.load(0).ok()?;
        if u16::from_be(eth.proto_be) != ETH_P_IP {
            return None;
        }
        let ip: Ipv4Hdr = ctx.load(ETH_HLEN).ok()?;
        if ip.dst_be & NODE_MASK.to_be() != local.subnet_be {
            return None;
        }
        // SAFETY: plain data written by the agent.
        let ep = unsafe { LOCAL_EPS.get(&ip.dst_be) }.copied()?;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&ep.mac);
        macs[6..].copy_from_slice(&local.underlay_mac);
        ctx.store(0, &macs, 0).ok()?;
        // SAFETY: plain helper call.
        Some(unsafe { bpf_redirect(ep.ifindex, 0) } as i32)
    };
    match deliver() {
        Some(v) => {
            bump(Stat::TunnelDeliver);
            v
        }
        None => {
            bump(Stat::TunnelPass);
            TC_ACT_OK
        }
    }
}

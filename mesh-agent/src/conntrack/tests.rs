use std::time::Duration;

use mesh_common::ct::{CT_F_HAIRPIN, CT_F_REPLIED, CtEntry, CtKey, Tuple, dir, tcp_flag};

use super::{FlowState, Timeouts, plan};

const S: u64 = 1_000_000_000;

fn ip(a: u8) -> u32 {
    u32::from_ne_bytes([10, 42, 0, a])
}

/// A balanced flow from 10.42.0.`client`:`sport` to the VIP, to backend
/// 10.42.0.`backend`:80: its forward and reverse entries, last seen at
/// `fwd_seen` / `rev_seen` (seconds), with TCP flags per direction.
#[allow(clippy::too_many_arguments)]
fn flow(
    proto: u8,
    client: u8,
    sport: u16,
    backend: u8,
    (fwd_flags, fwd_seen): (u8, u64),
    (rev_flags, rev_seen, replied): (u8, u64, bool),
) -> [(CtKey, CtEntry); 2] {
    let t = Tuple {
        src_be: ip(client),
        dst_be: u32::from_ne_bytes([10, 43, 0, 1]),
        sport_be: sport.to_be(),
        dport_be: 80u16.to_be(),
        proto,
        ..Tuple::default()
    };
    let fwd = CtEntry {
        backend_id: 1,
        service_id: 1,
        nat_ip_be: ip(backend),
        nat_port_be: 80u16.to_be(),
        tcp_flags: fwd_flags,
        flags: 0,
        last_seen_ns: fwd_seen * S,
        created_ns: 0,
    };
    let fkey = t.key(dir::FORWARD);
    let rev = CtEntry {
        nat_ip_be: t.dst_be,
        nat_port_be: t.dport_be,
        tcp_flags: rev_flags,
        flags: if replied { CT_F_REPLIED } else { 0 }
            | if client == backend { CT_F_HAIRPIN } else { 0 },
        last_seen_ns: rev_seen * S,
        ..fwd
    };
    [(fkey, fwd), (fkey.reverse_of(&fwd), rev)]
}

const SYN: u8 = tcp_flag::SYN;
const ACK: u8 = tcp_flag::ACK;
const FIN: u8 = tcp_flag::FIN;
const RST: u8 = tcp_flag::RST;

fn t() -> Timeouts {
    Timeouts {
        tcp_established: Duration::from_secs(3600),
        tcp_new: Duration::from_secs(30),
        tcp_closed: Duration::from_secs(5),
        udp: Duration::from_secs(20),
    }
}

#[test]
fn states_follow_both_directions() {
    let st = |proto, f: (u8, u64), r: (u8, u64, bool), new| {
        let [(_, fe), (_, re)] = flow(proto, 1, 1000, 2, f, r);
        FlowState::of(proto, Some(&fe), Some(&re), new)
    };
    assert_eq!(st(6, (SYN, 0), (0, 0, false), true), FlowState::TcpNew);
    assert_eq!(
        st(6, (SYN, 0), (SYN | ACK, 0, true), true),
        FlowState::TcpNew
    );
    assert_eq!(
        st(6, (SYN | ACK, 0), (SYN | ACK, 0, true), false),
        FlowState::TcpEstablished
    );
    // Half-closed is still open.
    assert_eq!(
        st(6, (ACK | FIN, 0), (ACK, 0, true), false),
        FlowState::TcpEstablished
    );
    assert_eq!(
        st(6, (ACK | FIN, 0), (ACK | FIN, 0, true), false),
        FlowState::TcpClosed
    );
    assert_eq!(
        st(6, (ACK, 0), (ACK | RST, 0, true), false),
        FlowState::TcpClosed
    );
    assert_eq!(
        st(6, (SYN | RST, 0), (SYN | ACK, 0, true), true),
        FlowState::TcpClosed
    );
    assert_eq!(st(17, (0, 0), (0, 0, false), true), FlowState::UdpNew);
    assert_eq!(st(17, (0, 0), (0, 0, true), true), FlowState::Udp);
    assert_eq!(st(17, (0, 0), (0, 0, true), false), FlowState::Udp);
}

#[test]
fn expired_flows_go_as_pairs_and_live_ones_stay() {
    let now = 10_000;
    let mut entries = Vec::new();
    // Closed 6 s ago: over the 5 s close timeout.
    let closed = flow(
        6,
        1,
        1001,
        9,
        (ACK | FIN, now - 6),
        (ACK | FIN, now - 7, true),
    );
    // Closed 2 s ago: stays.
    let closing = flow(
        6,
        1,
        1002,
        9,
        (ACK | FIN, now - 2),
        (ACK | FIN, now - 2, true),
    );
    // Established, idle 30 min (over the UDP timeout, under an hour): stays.
    let idle_tcp = flow(6, 2, 1003, 9, (ACK, now - 1800), (ACK, now - 1800, true));
    // UDP idle 25 s: goes. UDP whose reply came 10 s ago: stays (the
    // pair's idleness is its later side).
    let udp_old = flow(17, 3, 1004, 9, (0, now - 25), (0, now - 25, true));
    let udp_live = flow(17, 3, 1005, 9, (0, now - 40), (0, now - 10, true));
    for f in [&closed, &closing, &idle_tcp, &udp_old, &udp_live] {
        entries.extend_from_slice(f);
    }
    let p = plan(&entries, false, now * S, &t());
    assert_eq!(p.flows, 5);
    let mut want = vec![closed[0].0, closed[1].0, udp_old[0].0, udp_old[1].0];
    let mut got = p.delete.clone();
    want.sort_by_key(|k| (k.src_be, k.sport_be, k.dir));
    got.sort_by_key(|k| (k.src_be, k.sport_be, k.dir));
    assert_eq!(got, want);
    assert_eq!(
        p.expired,
        vec![(FlowState::TcpClosed, 1), (FlowState::Udp, 1)]
    );
}

#[test]
fn new_flows_expire_on_their_own_clock() {
    let now = 100;
    let syn_old = flow(6, 1, 2001, 9, (SYN, now - 31), (SYN | ACK, now - 31, true));
    let syn_young = flow(6, 1, 2002, 9, (SYN, now - 29), (0, now - 29, false));
    let mut entries = syn_old.to_vec();
    entries.extend_from_slice(&syn_young);
    let p = plan(&entries, true, now * S, &t());
    assert_eq!(p.delete.len(), 2);
    assert!(p.delete.contains(&syn_old[0].0) && p.delete.contains(&syn_old[1].0));
    assert_eq!(p.expired, vec![(FlowState::TcpNew, 1)]);
}

#[test]
fn orphans_are_judged_alone_and_hairpin_pairs_are_found() {
    let now = 10_000;
    // A forward entry whose reverse the LRU evicted, idle for 2 h: goes.
    let [fwd_only, _] = flow(6, 4, 3001, 9, (ACK, now - 7200), (ACK, now - 7200, true));
    // A reverse entry whose forward is gone, UDP idle 30 s: goes.
    let [_, rev_only] = flow(17, 5, 3002, 9, (0, now - 30), (0, now - 30, true));
    // A hairpin flow (the backend calls itself): the pair is recognised
    // through the hairpin address and stays while it is live.
    let hairpin = flow(6, 9, 3003, 9, (ACK, now - 1), (ACK, now - 1, true));
    assert_eq!(
        hairpin[1].0.dst_be,
        u32::from_ne_bytes(mesh_common::ct::HAIRPIN_IP)
    );
    let mut entries = vec![fwd_only, rev_only];
    entries.extend_from_slice(&hairpin);
    let p = plan(&entries, false, now * S, &t());
    assert_eq!(p.flows, 3, "the hairpin pair is one flow");
    assert_eq!(p.delete.len(), 2);
    assert!(p.delete.contains(&fwd_only.0) && p.delete.contains(&rev_only.0));
}

//! The VXLAN overlay with real sockets between two node namespaces (needs
//! root): container to container both ways (ICMP, TCP, UDP), a large TCP
//! transfer (GSO through the tunnel) compared end to end, and a VIP whose
//! backend is on the other node. Every loop is bounded.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use mesh_common::{
    lb::{PROTO_TCP, Service, ServiceKey},
    stats::Stat,
};
use mesh_tests::{fixtures::lb::backend, overlaylab::OverlayLab, servers::Servers};

fn ping(from: &mesh_tests::netns::Netns, to: std::net::Ipv4Addr) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", from.name))
        .args(["ping", "-c", "3", "-i", "0.2", "-W", "2", &to.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn containers_on_two_nodes_talk_over_vxlan() {
    let lab = OverlayLab::new();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    assert!(
        ping(&a.container, b.container_ip()),
        "ICMP node 1 -> node 2"
    );
    assert!(
        ping(&b.container, a.container_ip()),
        "ICMP node 2 -> node 1"
    );

    let _servers = [
        Servers::start(&a.container, "c1", 8080, 5353),
        Servers::start(&b.container, "c2", 8080, 5353),
    ];
    for (from, to, name) in [(a, b, "c2"), (b, a, "c1")] {
        let target = SocketAddr::from((to.container_ip(), 8080));
        let got = from.container.run(|| {
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .expect("TCP connect across nodes");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).expect("TCP answer");
            line.trim().to_owned()
        });
        assert_eq!(got, name, "TCP node {} -> node {}", from.n, to.n);
        let udp_target = SocketAddr::from((to.container_ip(), 5353));
        let got = from.container.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                s.send_to(b"who", udp_target).expect("send");
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    assert_eq!(from, udp_target);
                    return String::from_utf8_lossy(&buf[..n]).into_owned();
                }
            }
            panic!("no UDP answer across nodes");
        });
        assert_eq!(got, name, "UDP node {} -> node {}", from.n, to.n);
    }
    let encap = a.harness.counters()[Stat::TunnelEncap as usize];
    let decap = a.harness.counters()[Stat::XdpDecap as usize];
    println!("node 1: {encap} packets encapsulated, {decap} decapsulated");
    assert!(encap > 0 && decap > 0);
}

#[test]
fn a_large_tcp_transfer_crosses_intact() {
    let lab = OverlayLab::new();
    transfer_intact(&lab, 64 << 20);
}

/// Sends `size` bytes from node 1's container to node 2's over TCP and
/// asserts they arrive, all of them, unchanged.
fn transfer_intact(lab: &OverlayLab, size: usize) {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let listener = b
        .container
        .run(|| TcpListener::bind("0.0.0.0:9000").expect("bind"));
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let (mut n, mut sum) = (0usize, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            for (i, x) in buf[..k].iter().enumerate() {
                sum = sum
                    .wrapping_mul(31)
                    .wrapping_add(*x as u64 ^ ((n + i) as u64));
            }
            n += k;
        }
        (n, sum)
    });
    let target = SocketAddr::from((b.container_ip(), 9000));
    let start = Instant::now();
    let sent_sum = a.container.run(|| {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut sum = 0u64;
        let chunk: Vec<u8> = (0..1 << 16).map(|i| (i * 7 % 251) as u8).collect();
        for off in (0..size).step_by(chunk.len()) {
            for (i, x) in chunk.iter().enumerate() {
                sum = sum
                    .wrapping_mul(31)
                    .wrapping_add(*x as u64 ^ ((off + i) as u64));
            }
            s.write_all(&chunk).expect("write");
        }
        sum
    });
    let (n, got_sum) = receiver.join().expect("receiver");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} MiB across the tunnel in {secs:.2} s ({:.0} MiB/s), checksum {}",
        n >> 20,
        (n >> 20) as f64 / secs,
        if got_sum == sent_sum {
            "equal"
        } else {
            "DIFFERENT"
        }
    );
    assert_eq!(n, size);
    assert_eq!(got_sum, sent_sum, "the bytes arrive intact");
}

/// Without XDP and on an underlay without tunnel offloads (as virtio_net),
/// with the kernel's VXLAN device on node 2: GRO merges the tunnel's
/// frames, the underlay program hands the merged packets to the device,
/// whose program delivers them, and a bulk transfer arrives intact. VXLAN
/// that mesh refuses (from an address that is no node's) reaches the
/// device's socket too, and its program drops it: nothing of it reaches
/// the container.
#[test]
fn merged_tunnel_packets_go_through_the_kernel_vxlan_device() {
    use mesh_tests::overlaylab::VNI;
    let mut lab = OverlayLab::with_xdp(None);
    lab.unoffloaded_underlay();
    lab.vxlan_device(1);
    let before = lab.nodes[1].harness.counters();
    let tx = |ns: &mesh_tests::netns::Netns| {
        let s = &ns.link_stats("eth0")["tx"];
        (
            s["bytes"].as_u64().unwrap_or(0),
            s["packets"].as_u64().unwrap_or(0),
        )
    };
    let sent_before = tx(&lab.nodes[0].node);
    transfer_intact(&lab, 64 << 20);
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let sent_after = tx(&a.node);
    let after = b.harness.counters();
    let delta = |s: Stat| after[s as usize] - before[s as usize];
    // The tunnel's frames as large as the underlay takes: the sender's
    // segments kept their size through encapsulation.
    let frame = (sent_after.0 - sent_before.0) / (sent_after.1 - sent_before.1).max(1);
    println!(
        "node 1 sent frames of {frame} bytes on average; node 2: {} merged packets handed to mesh-vxlan, {} back out of it, {} decapsulated by mesh",
        delta(Stat::VxlanHandoff),
        delta(Stat::VxlanDeviceIn),
        delta(Stat::XdpDecap),
    );
    assert!(frame > 1490, "full-size tunnel frames: {frame} bytes");
    assert!(delta(Stat::VxlanHandoff) > 0, "GRO merged tunnel packets");
    assert!(
        delta(Stat::VxlanDeviceIn) > 0 && delta(Stat::VxlanDeviceIn) <= delta(Stat::VxlanHandoff),
        "what was handed over comes out of the device"
    );
    assert_eq!(delta(Stat::VxlanDeviceUnmarked), 0);

    // VXLAN from an address of node 1's NIC that is no cluster node's.
    let intruder = std::net::Ipv4Addr::new(192, 168, 77, 66);
    a.node
        .ip(&["addr", "add", &format!("{intruder}/24"), "dev", "eth0"]);
    let target = b.container_ip();
    let sink = b
        .container
        .run(|| UdpSocket::bind("0.0.0.0:6000").expect("bind the sink"));
    let frame = |body: &[u8]| {
        vxlan_payload(
            VNI,
            b.underlay_mac,
            (a.container_ip(), 7),
            (target, 6000),
            body,
        )
    };
    let (forged, control) = (frame(b"forged"), frame(b"control"));
    let vx = SocketAddr::from((b.underlay_ip, 4789));
    let before = b.harness.counters();
    a.node.run(|| {
        let s = UdpSocket::bind(SocketAddr::from((intruder, 0))).expect("bind intruder");
        for _ in 0..20 {
            s.send_to(&forged, vx).expect("send VXLAN");
        }
        let node = UdpSocket::bind(SocketAddr::from((a.underlay_ip, 0))).expect("bind node");
        for _ in 0..5 {
            node.send_to(&control, vx).expect("send control");
        }
    });
    let mut got = received(&sink, Duration::from_secs(2));
    got.dedup();
    let after = b.harness.counters();
    let delta = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "node 2: {} VXLAN frames from a non-node dropped by mesh-vxlan's program; the container got {got:?}",
        delta(Stat::VxlanDeviceUnmarked),
    );
    assert_eq!(got, ["control"], "only the node's VXLAN arrives");
    // How the agent turns GRO off on mesh-wg, tried on a NIC that has it on.
    b.node
        .run(|| mesh_agent::vxlandev::gro_off("eth0"))
        .expect("GRO off");
    let k = b.node.exec(&["ethtool", "-k", "eth0"]);
    assert!(k.contains("generic-receive-offload: off"), "{k}");
    assert_eq!(delta(Stat::XdpVxlanUntrusted), 20);
    assert_eq!(
        delta(Stat::VxlanDeviceUnmarked),
        20,
        "every forged frame dropped at the device"
    );
}

#[test]
fn a_vip_reaches_a_backend_on_the_other_node() {
    let mut lab = OverlayLab::new();
    let backend_ip = lab.nodes[1].container_ip();
    let _server = Servers::start(&lab.nodes[1].container, "remote", 8080, 5353);
    let vip = std::net::Ipv4Addr::new(10, 43, 0, 99);
    let a = &mut lab.nodes[0];
    a.harness
        .lb
        .set_backend(1, &backend(backend_ip, 8080, 0, [0; 6]))
        .expect("backend");
    a.harness.lb.set_ring(1, &[1; 1021]).expect("ring");
    let key = ServiceKey {
        vip_be: u32::from(vip).to_be(),
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        ..ServiceKey::default()
    };
    a.harness
        .lb
        .set_service(&key, &Service { id: 1, flags: 0 })
        .expect("service");
    let target = SocketAddr::from((vip, 80));
    let answers = a.container.run(|| {
        (0..50)
            .map(|_| {
                let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .expect("connect to the VIP");
                assert_eq!(
                    s.peer_addr().expect("peer"),
                    target,
                    "the client sees only the VIP"
                );
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).expect("answer");
                line.trim().to_owned()
            })
            .collect::<Vec<_>>()
    });
    assert!(answers.iter().all(|n| n == "remote"), "{answers:?}");
}

/// UDP GSO (`UDP_SEGMENT`, as QUIC servers send): one send of 16
/// datagrams from a container crosses the tunnel as one packet and arrives
/// as 16 datagrams, on the default data path (no XDP, mesh-vxlan).
#[test]
fn udp_gso_datagrams_cross_the_tunnel() {
    const SEGMENT: usize = 1200;
    const COUNT: usize = 16;
    let mut lab = OverlayLab::with_xdp(None);
    lab.vxlan_device(1);
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let sink = b
        .container
        .run(|| UdpSocket::bind("0.0.0.0:6001").expect("bind the sink"));
    let to = SocketAddr::from((b.container_ip(), 6001));
    let before = a.harness.counters();
    a.container.run(|| {
        use std::os::fd::AsRawFd;
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let size = SEGMENT as libc::c_int;
        // SAFETY: setsockopt on our own socket with an int, as it takes.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        let burst: Vec<u8> = (0..SEGMENT * COUNT).map(|i| (i / SEGMENT) as u8).collect();
        s.send_to(&burst, to).expect("send the burst");
    });
    sink.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < COUNT {
        match sink.recv(&mut buf) {
            Ok(n) => got.push((n, buf[0])),
            Err(_) => break,
        }
    }
    let after = a.harness.counters();
    let delta = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "node 1 encapsulated {} packet(s), {} failed; node 2's container got {} datagrams",
        delta(Stat::TunnelEncap),
        delta(Stat::TunnelEncapFail),
        got.len()
    );
    let want: Vec<(usize, u8)> = (0..COUNT).map(|i| (SEGMENT, i as u8)).collect();
    assert_eq!(got, want, "every datagram, whole, in order");
}

/// Datagrams that reach `sock` within `wait`, by payload.
fn received(sock: &UdpSocket, wait: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while start.elapsed() < wait {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// A VXLAN datagram's payload (header + inner frame) carrying UDP from
/// `src` to `dst`.
fn vxlan_payload(
    vni: u32,
    inner_dst_mac: [u8; 6],
    src: (std::net::Ipv4Addr, u16),
    dst: (std::net::Ipv4Addr, u16),
    body: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend(mesh_tests::pkt::macs(
        mesh_tests::pkt::udp4(src, dst, body),
        inner_dst_mac,
        [0x02, 0x42, 0, 0, 0, 0x99],
    ));
    p
}

#[test]
fn off_cluster_senders_and_spoofing_containers_reach_no_container() {
    use mesh_tests::overlaylab::VNI;
    let lab = OverlayLab::new();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let target = a.container_ip();
    let sink = a
        .container
        .run(|| UdpSocket::bind("0.0.0.0:6000").expect("bind the sink"));
    // An intruder on the underlay: an address of node 2's NIC that is not a
    // cluster node's, with a route to the container through node 1.
    let intruder = std::net::Ipv4Addr::new(192, 168, 77, 66);
    b.node
        .ip(&["addr", "add", &format!("{intruder}/24"), "dev", "eth0"]);
    b.node.ip(&[
        "route",
        "add",
        &format!("{target}/32"),
        "via",
        &a.underlay_ip.to_string(),
        "src",
        &intruder.to_string(),
    ]);
    let forged = vxlan_payload(
        VNI,
        a.underlay_mac,
        (b.container_ip(), 7),
        (target, 6000),
        b"vxlan",
    );
    let control = vxlan_payload(
        VNI,
        a.underlay_mac,
        (b.container_ip(), 7),
        (target, 6000),
        b"control",
    );
    let (vx, plain) = (
        SocketAddr::from((a.underlay_ip, 4789)),
        SocketAddr::from((target, 6000)),
    );
    let before = a.harness.counters();
    b.node.run(|| {
        let s = UdpSocket::bind(SocketAddr::from((intruder, 0))).expect("bind intruder");
        for _ in 0..20 {
            s.send_to(&forged, vx).expect("send VXLAN");
            s.send_to(b"plain", plain).expect("send plain");
        }
        // The same VXLAN from the node's own address is delivered: the
        // sink would see the intruder's too if they got through.
        let node = UdpSocket::bind(SocketAddr::from((b.underlay_ip, 0))).expect("bind node");
        for _ in 0..5 {
            node.send_to(&control, vx).expect("send control");
        }
    });
    // A container on node 2 forging another source address, beside a
    // legitimate flow from the same container.
    b.container
        .ip(&["addr", "add", "10.42.2.99/24", "dev", "eth0"]);
    let b_before = b.harness.counters();
    b.container.run(|| {
        let forger = UdpSocket::bind("10.42.2.99:0").expect("bind forged");
        let honest = UdpSocket::bind("10.42.2.2:0").expect("bind own");
        for _ in 0..20 {
            forger.send_to(b"spoofed", plain).expect("send spoofed");
        }
        for _ in 0..5 {
            honest.send_to(b"honest", plain).expect("send honest");
        }
    });
    let mut got = received(&sink, Duration::from_secs(2));
    got.sort();
    got.dedup_by(|x, y| x == y);
    let after = a.harness.counters();
    let delta = |s: Stat| after[s as usize] - before[s as usize];
    let spoofed =
        b.harness.counters()[Stat::TcSpoofed as usize] - b_before[Stat::TcSpoofed as usize];
    println!(
        "node 1: {} VXLAN frames from a non-node refused, {} plain frames for a container dropped; node 2: {spoofed} forged packets dropped; the container got {got:?}",
        delta(Stat::XdpVxlanUntrusted),
        delta(Stat::TunnelUnmarked),
    );
    assert_eq!(
        got,
        ["control", "honest"],
        "only the node's VXLAN and the honest flow arrive"
    );
    assert_eq!(
        delta(Stat::XdpVxlanUntrusted),
        20,
        "every forged VXLAN frame counted"
    );
    assert_eq!(delta(Stat::TunnelUnmarked), 20, "every plain frame counted");
    assert_eq!(spoofed, 20, "every forged source dropped at the veth");
}

/// A 4,000-byte UDP datagram from a container (MTU 1450) to a container on
/// the other node: its fragments all cross the tunnel and it arrives whole.
#[test]
fn a_datagram_larger_than_the_mtu_crosses_nodes_whole() {
    let lab = OverlayLab::new();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let _server = Servers::start(&b.container, "c2", 8080, 5353);
    let target = SocketAddr::from((b.container_ip(), 5353));
    let big = vec![0xa5_u8; 4000];
    let got = a.container.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        (0..10)
            .filter(|_| {
                (0..3).any(|_| {
                    s.send_to(&big, target).expect("send");
                    s.recv_from(&mut buf).is_ok()
                })
            })
            .count()
    });
    println!("10 datagrams of 4000 bytes across nodes: {got} answered");
    assert_eq!(got, 10, "every datagram arrives whole");
}

/// RFC 7348 interop: node 2 is replaced by a standard Linux vxlan device
/// (same VNI, port 4789, no mesh program), known to node 1 by a node
/// entry. Frames mesh sends carry the vxlan device's MAC as inner
/// destination (`Node::inner_mac`), so the device takes them; with its
/// NIC's MAC there (the old behaviour) it drops them. ICMP and TCP both ways
/// between the mesh container and the vxlan device's address.
#[test]
fn a_linux_vxlan_device_is_a_peer() {
    use mesh_common::tunnel::Node;
    use std::net::Ipv4Addr;

    let mut lab = OverlayLab::new();
    // Node 2 stops being a mesh node: its programs go, its bridge too.
    let two = lab.nodes.pop().expect("node 2");
    let (underlay_2, mac_2) = (two.underlay_ip, two.underlay_mac);
    let node2 = {
        let mesh_tests::overlaylab::NodeNs { harness, node, .. } = two;
        drop(harness);
        node
    };
    node2.ip(&["link", "del", "br0"]);
    let one = &mut lab.nodes[0];
    let peer_addr = Ipv4Addr::new(10, 42, 2, 1);
    node2.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "4242",
        "local",
        &underlay_2.to_string(),
        "dstport",
        "4789",
        "nolearning",
        "dev",
        "eth0",
    ]);
    node2.ip(&["addr", "add", &format!("{peer_addr}/24"), "dev", "vx0"]);
    node2.ip(&["link", "set", "vx0", "up"]);
    node2.ip(&["route", "add", "10.42.1.0/24", "dev", "vx0"]);
    // No ARP across the tunnel (mesh answers none): a static neighbour for
    // the container, and node 1 as the device's default destination.
    node2.ip(&[
        "neigh",
        "add",
        &one.container_ip().to_string(),
        "lladdr",
        "02:00:00:00:01:02",
        "dev",
        "vx0",
        "nud",
        "permanent",
    ]);
    let bridge = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", node2.name))
        .args([
            "bridge",
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx0",
            "dst",
        ])
        .arg(one.underlay_ip.to_string())
        .output()
        .expect("bridge fdb");
    assert!(bridge.status.success(), "{bridge:?}");
    let vx_mac_text = node2.link_field("vx0", "address");
    let vx_mac = vx_mac_text
        .as_str()
        .expect("mac")
        .parse::<mesh_common::mac::Mac>()
        .expect("vx0 MAC")
        .0;

    let subnet_2 = u32::from(Ipv4Addr::new(10, 42, 2, 0)).to_be();
    let set_inner = |one: &mut mesh_tests::overlaylab::NodeNs, inner_mac| {
        one.harness
            .overlay
            .set_node(
                subnet_2,
                &Node {
                    underlay_ip_be: u32::from(underlay_2).to_be(),
                    inner_mac,
                    ..Node::default()
                },
            )
            .expect("node entry");
    };
    // The NIC's MAC inside the tunnel: the vxlan device drops the frames.
    set_inner(one, mac_2);
    assert!(
        !ping(&one.container, peer_addr),
        "a vxlan device must not take frames for another MAC"
    );
    // Its own MAC: it answers.
    set_inner(one, vx_mac);
    assert!(
        ping(&one.container, peer_addr),
        "ICMP mesh container -> vxlan device"
    );
    assert!(
        ping(&node2, one.container_ip()),
        "ICMP vxlan device -> mesh container"
    );

    // TCP both ways.
    let listener = node2.run(|| TcpListener::bind((peer_addr, 9000)).expect("bind on vx0"));
    let server = std::thread::spawn(move || {
        let (mut s, from) = listener.accept().expect("accept");
        s.write_all(b"vxlan peer\n").expect("write");
        from
    });
    let first_line = |to: SocketAddr| {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        line
    };
    let line = one
        .container
        .run(|| first_line(SocketAddr::from((peer_addr, 9000))));
    assert_eq!(line.trim(), "vxlan peer");
    let from = server.join().expect("server thread");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(one.container_ip()),
        "no NAT on the way"
    );
    let _servers = Servers::start(&one.container, "c1", 8080, 5353);
    let name = node2.run(|| first_line(SocketAddr::from((one.container_ip(), 8080))));
    assert_eq!(name.trim(), "c1", "TCP vxlan device -> mesh container");
    let c = one.harness.counters();
    println!(
        "node 1 with a Linux vxlan peer: {} encapsulated, {} decapsulated",
        c[Stat::TunnelEncap as usize],
        c[Stat::XdpDecap as usize]
    );
}

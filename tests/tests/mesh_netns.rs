//! The routing mesh with real sockets in network namespaces (needs root):
//! two nodes on an underlay bridge, a service with a backend on each, its
//! ports published on both nodes' underlay addresses, and a client outside
//! the cluster on the underlay. Every loop is bounded in count and time.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use mesh_agent::maglev::{self, Identity};
use mesh_common::{
    lb::{PROTO_TCP, PROTO_UDP, Published, PublishedKey, Service, ServiceKey},
    stats::Stat,
};
use mesh_tests::{
    fixtures::lb::backend,
    netns::Netns,
    overlaylab::{NodeNs, OverlayLab},
    servers::Servers,
};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const PUBLISHED_TCP: u16 = 30080;
const PUBLISHED_UDP: u16 = 30053;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
const DEADLINE: Duration = Duration::from_secs(120);

/// The TCP service (id 1, VIP:80) and the UDP one (id 2, VIP:53) with the
/// containers of both nodes as backends (ids 1, 2 and 3, 4), published on
/// 30080/tcp and 30053/udp, written into every node's maps as each node's
/// agent would (a backend here has its veth, one elsewhere none).
fn publish(lab: &mut OverlayLab) {
    publish_on(lab, &[0, 1]);
}

/// As [`publish`], with only the containers of the nodes in `members`
/// (0-based) in the rings.
fn publish_on(lab: &mut OverlayLab, members: &[usize]) {
    let containers: Vec<(Ipv4Addr, u32, [u8; 6])> = lab
        .nodes
        .iter()
        .map(|n| {
            let ifindex = n
                .node
                .link_field("vc0", "ifindex")
                .as_u64()
                .expect("ifindex") as u32;
            let mac = n
                .container
                .link_field("eth0", "address")
                .as_str()
                .expect("mac")
                .parse::<mesh_common::mac::Mac>()
                .expect("MAC")
                .0;
            (n.container_ip(), ifindex, mac)
        })
        .collect();
    let ring = |base: u32, port: u16| {
        let members: Vec<(u32, Identity)> = containers
            .iter()
            .enumerate()
            .filter(|(i, _)| members.contains(i))
            .map(|(i, (ip, _, _))| (base + i as u32, Identity { ip: *ip, port }))
            .collect();
        maglev::build_ids(&members)
    };
    let (tcp_ring, udp_ring) = (ring(1, TCP_PORT), ring(3, UDP_PORT));
    for (n, node) in lab.nodes.iter_mut().enumerate() {
        if members.contains(&n) {
            node.harness.publishes(containers[n].1);
        }
        let lb = &mut node.harness.lb;
        for (i, (ip, ifindex, mac)) in containers.iter().enumerate() {
            let (ifindex, mac) = if i == n {
                (*ifindex, *mac)
            } else {
                (0, [0; 6])
            };
            lb.set_backend(1 + i as u32, &backend(*ip, TCP_PORT, ifindex, mac))
                .expect("tcp backend");
            lb.set_backend(3 + i as u32, &backend(*ip, UDP_PORT, ifindex, mac))
                .expect("udp backend");
        }
        lb.set_ring(1, &tcp_ring).expect("tcp ring");
        lb.set_ring(2, &udp_ring).expect("udp ring");
        for (port, proto, id, published) in [
            (80u16, PROTO_TCP, 1, PUBLISHED_TCP),
            (53, PROTO_UDP, 2, PUBLISHED_UDP),
        ] {
            let key = ServiceKey {
                vip_be: u32::from(VIP).to_be(),
                port_be: port.to_be(),
                proto,
                ..ServiceKey::default()
            };
            lb.set_service(&key, &Service { id, flags: 0 })
                .expect("service");
            let key = PublishedKey {
                port_be: published.to_be(),
                proto,
                ..PublishedKey::default()
            };
            lb.set_published(&key, &Published { service_id: id })
                .expect("published port");
        }
    }
}

/// One TCP connection to `to`: the backend's name and the address it saw
/// the client at.
fn tcp_ask(to: SocketAddr) -> Result<(String, String, SocketAddr), String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut name = String::new();
    r.read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    w.write_all(b"peer\n").map_err(|e| e.to_string())?;
    let mut peer = String::new();
    r.read_line(&mut peer).map_err(|e| format!("peer: {e}"))?;
    Ok((name.trim().to_owned(), peer.trim().to_owned(), local))
}

/// One UDP exchange with `to` from a fresh socket: the answer to `what`,
/// checked to come from `to`; and the socket's own address.
fn udp_ask(to: SocketAddr, what: &[u8]) -> Result<(String, SocketAddr), String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.connect(to).map_err(|e| e.to_string())?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 128];
    for _ in 0..3 {
        s.send(what).map_err(|e| e.to_string())?;
        // A connected socket only takes datagrams from `to`.
        if let Ok(n) = s.recv(&mut buf) {
            return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), local));
        }
    }
    Err(format!("no answer from {to}"))
}

fn counters(n: &NodeNs) -> Vec<u64> {
    n.harness.counters()
}

/// From a client outside the cluster, each node's published ports answer,
/// spread over the backends of both nodes, and every backend sees the
/// client's own address.
#[test]
fn published_ports_answer_on_every_node_with_the_client_address_kept() {
    let mut lab = OverlayLab::new();
    let _servers = [
        Servers::start(&lab.nodes[0].container, "c1", TCP_PORT, UDP_PORT),
        Servers::start(&lab.nodes[1].container, "c2", TCP_PORT, UDP_PORT),
    ];
    publish(&mut lab);
    let client: Netns = lab.outside_client(0);
    let client_ip = Ipv4Addr::new(192, 168, 77, 100);
    let start = Instant::now();
    for node in &lab.nodes {
        let addr = node.underlay_ip;
        let (tcp, udp) = client.run(|| {
            let tcp: Vec<(String, String, SocketAddr)> = (0..150)
                .map(|i| {
                    assert!(start.elapsed() < DEADLINE, "out of time");
                    tcp_ask(SocketAddr::from((addr, PUBLISHED_TCP)))
                        .unwrap_or_else(|e| panic!("TCP {i} to {addr}: {e}"))
                })
                .collect();
            let udp: Vec<(String, String, SocketAddr)> = (0..150)
                .map(|i| {
                    assert!(start.elapsed() < DEADLINE, "out of time");
                    let to = SocketAddr::from((addr, PUBLISHED_UDP));
                    let (name, _) =
                        udp_ask(to, b"who").unwrap_or_else(|e| panic!("UDP {i} to {addr}: {e}"));
                    let (peer, local) =
                        udp_ask(to, b"peer").unwrap_or_else(|e| panic!("UDP {i} to {addr}: {e}"));
                    (name, peer, local)
                })
                .collect();
            (tcp, udp)
        });
        for (proto, answers) in [("tcp", &tcp), ("udp", &udp)] {
            let mut tally = BTreeMap::<String, usize>::new();
            for (name, peer, local) in answers {
                *tally.entry(name.clone()).or_default() += 1;
                if proto == "tcp" {
                    assert_eq!(peer, &local.to_string(), "the backend sees the client");
                } else {
                    assert!(
                        peer.starts_with(&format!("{client_ip}:")),
                        "the backend sees the client: {peer}"
                    );
                }
            }
            println!("{proto} via {addr}: {} answers: {tally:?}", answers.len());
            for b in ["c1", "c2"] {
                let n = tally.get(b).copied().unwrap_or(0);
                assert!(
                    n * 5 >= answers.len(),
                    "{proto} via {addr}: {b} got {n}: {tally:?}"
                );
            }
        }
    }
    // From a container on the mesh: a node's address and published port
    // (its own node's and the other's) is balanced at the container's veth
    // like a VIP, answered from the address it called, the container's
    // own address kept.
    let c1 = lab.nodes[0].container_ip();
    for node in &lab.nodes {
        let addr = node.underlay_ip;
        let answers = lab.nodes[0].container.run(|| {
            (0..60)
                .map(|i| {
                    let (name, peer, local) = tcp_ask(SocketAddr::from((addr, PUBLISHED_TCP)))
                        .unwrap_or_else(|e| panic!("container TCP {i} to {addr}: {e}"));
                    // c1 reaching itself is a hairpin: it sees the
                    // hairpin address, as with a VIP.
                    let want = if name == "c1" {
                        SocketAddr::from((
                            Ipv4Addr::from(mesh_common::ct::HAIRPIN_IP),
                            local.port(),
                        ))
                    } else {
                        local
                    };
                    assert_eq!(peer, want.to_string(), "the backend sees the container");
                    let (uname, _) = udp_ask(SocketAddr::from((addr, PUBLISHED_UDP)), b"who")
                        .unwrap_or_else(|e| panic!("container UDP {i} to {addr}: {e}"));
                    (name, uname)
                })
                .collect::<Vec<_>>()
        });
        let mut tally = BTreeMap::<String, usize>::new();
        for (a, b) in &answers {
            *tally.entry(format!("tcp {a}")).or_default() += 1;
            *tally.entry(format!("udp {b}")).or_default() += 1;
        }
        println!("from container {c1} to {addr}: {tally:?}");
        assert_eq!(
            tally.len(),
            4,
            "both backends over both protocols: {tally:?}"
        );
    }

    let (one, two) = (counters(&lab.nodes[0]), counters(&lab.nodes[1]));
    for (name, c) in [("node 1", &one), ("node 2", &two)] {
        println!(
            "{name}: ingress_local {} ingress_remote {} ingress_reply {} ingress_return {}",
            c[Stat::IngressLocal as usize],
            c[Stat::IngressRemote as usize],
            c[Stat::IngressReply as usize],
            c[Stat::IngressReturn as usize],
        );
        assert!(c[Stat::IngressLocal as usize] > 0 && c[Stat::IngressRemote as usize] > 0);
        assert!(c[Stat::IngressReply as usize] > 0 && c[Stat::IngressReturn as usize] > 0);
        assert_eq!(c[Stat::IngressNoRoute as usize], 0);
    }
}

/// A container whose MTU (1500) does not know about the tunnel serves a
/// client outside the cluster through the other node: without clamping,
/// each side would send segments of 1460 bytes that no longer fit once
/// encapsulated. The ingress node clamps the client's SYN and the backend's
/// node the backend's SYN-ACK to 1410, so 32 MiB cross intact each way.
#[test]
fn mss_clamping_lets_full_size_segments_through_the_tunnel() {
    use std::io::Read;
    const SIZE: usize = 32 << 20;
    let mut lab = OverlayLab::new();
    lab.nodes[1]
        .container
        .ip(&["link", "set", "eth0", "mtu", "1500"]);
    // Only node 2's container serves: node 1 must tunnel every flow.
    publish_on(&mut lab, &[1]);
    let listener = lab.nodes[1]
        .container
        .run(|| std::net::TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind"));
    // The server reads SIZE bytes, then sends SIZE bytes back.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while got < SIZE {
            let k = s.read(&mut buf).expect("server read");
            assert!(k > 0, "upload cut short at {got}");
            assert!(buf[..k].iter().all(|b| *b == 0x5a), "upload intact");
            got += k;
        }
        let chunk = vec![0xa5u8; 1 << 16];
        for _ in 0..SIZE / chunk.len() {
            s.write_all(&chunk).expect("server write");
        }
        got
    });
    let client = lab.outside_client(0);
    let to = SocketAddr::from((lab.nodes[0].underlay_ip, PUBLISHED_TCP));
    let start = Instant::now();
    let down = client.run(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..SIZE / chunk.len() {
            s.write_all(&chunk).expect("upload");
        }
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while got < SIZE {
            let k = s.read(&mut buf).expect("download");
            assert!(k > 0, "download cut short at {got}");
            assert!(buf[..k].iter().all(|b| *b == 0xa5), "download intact");
            got += k;
        }
        got
    });
    let up = server.join().expect("server");
    let secs = start.elapsed().as_secs_f64();
    let clamped = |n: &NodeNs| counters(n)[Stat::MssClamped as usize];
    println!(
        "{} MiB up and {} MiB down through node 1's published port to node 2 in {secs:.1} s; \
         SYNs clamped: node 1 {}, node 2 {}",
        up >> 20,
        down >> 20,
        clamped(&lab.nodes[0]),
        clamped(&lab.nodes[1])
    );
    assert_eq!((up, down), (SIZE, SIZE));
    assert_eq!(
        clamped(&lab.nodes[0]),
        1,
        "the client's SYN, at the ingress node"
    );
    assert_eq!(
        clamped(&lab.nodes[1]),
        1,
        "the backend's SYN-ACK, at its node"
    );
}

/// A datagram that fits the client's path but not the tunnel (1472 bytes
/// of UDP payload, 1500 bytes of IPv4) to a published port whose backend
/// is on another node: with DF, the ingress node answers ICMP
/// fragmentation needed with the tunnel's MTU (1450); the client's kernel
/// learns it (the socket reports EMSGSIZE, IP_MTU is 1450), and a datagram
/// that fits gets its answer. Without DF it is dropped and counted.
#[test]
fn a_datagram_too_large_for_the_tunnel_gets_icmp_fragmentation_needed() {
    use std::os::fd::AsRawFd;
    let mut lab = OverlayLab::new();
    let _server = Servers::start(&lab.nodes[1].container, "c2", TCP_PORT, UDP_PORT);
    publish_on(&mut lab, &[1]);
    let client = lab.outside_client(0);
    let to = SocketAddr::from((lab.nodes[0].underlay_ip, PUBLISHED_UDP));
    let setopt = |s: &UdpSocket, opt: i32, v: i32| {
        // SAFETY: a valid socket and an int option.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                opt,
                (&v as *const i32).cast(),
                size_of::<i32>() as u32,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
    };
    let (first, mtu, small) = client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(to).expect("connect");
        // The ICMP error comes back within milliseconds; the margin is for
        // a machine busy with the other tests of this file.
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        setopt(&s, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
        let big = vec![b'x'; 1472];
        s.send(&big)
            .expect("a 1500-byte datagram fits the client's link");
        let mut buf = [0u8; 64];
        let first = s.recv(&mut buf).map(|_| ()).map_err(|e| e.raw_os_error());
        let mut mtu: i32 = 0;
        let mut len = size_of::<i32>() as u32;
        // SAFETY: a valid socket and an int option.
        unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&mut mtu as *mut i32).cast(),
                &mut len,
            )
        };
        let small = vec![b'y'; 1422];
        let mut answer = None;
        for _ in 0..3 {
            let _ = s.send(&small);
            if let Ok(n) = s.recv(&mut buf) {
                answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                break;
            }
        }
        (first, mtu, answer)
    });
    let c = counters(&lab.nodes[0]);
    println!(
        "1472-byte datagram with DF: recv {first:?} (EMSGSIZE = {}), path MTU now {mtu}; \
         1422 bytes answered by {small:?}; node 1: ingress_too_big {}, icmp_frag_needed {}",
        libc::EMSGSIZE,
        c[Stat::IngressTooBig as usize],
        c[Stat::IcmpFragNeeded as usize]
    );
    assert_eq!(first, Err(Some(libc::EMSGSIZE)), "the client hears of it");
    assert_eq!(mtu, 1450, "and learns the tunnel's MTU");
    assert_eq!(
        small.as_deref(),
        Some("c2"),
        "a datagram that fits goes through"
    );
    assert_eq!(c[Stat::IngressTooBig as usize], 1);
    assert_eq!(c[Stat::IcmpFragNeeded as usize], 1);

    // Without DF: dropped, counted.
    let other = lab.outside_client(1);
    other.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect(to).expect("connect");
        setopt(&s, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
        s.send(&[b'z'; 1472]).expect("send");
    });
    // Counted when node 1 sees it: within milliseconds, or seconds on a
    // machine busy with other tests (the Vagrant VMs).
    let start = std::time::Instant::now();
    let mut c = counters(&lab.nodes[0]);
    while c[Stat::IngressTooBigNoDf as usize] == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        c = counters(&lab.nodes[0]);
    }
    assert_eq!(
        c[Stat::IngressTooBigNoDf as usize],
        1,
        "dropped and counted"
    );
}

/// A cgroup v2 directory of the test's own, so the socket-level program it
/// gets sees only the processes the test puts in, and a bpffs directory for
/// the program's links; both removed on drop (unpinning detaches them).
struct TestCgroup {
    path: std::path::PathBuf,
    bpffs: std::path::PathBuf,
}

impl TestCgroup {
    fn new() -> Self {
        let root =
            mesh_agent::dataplane::sockets::cgroup2_dir(std::path::Path::new("/sys/fs/cgroup"))
                .unwrap_or_else(|e| panic!("socket-level balancing needs cgroup v2: {e}"));
        let path = root.join(mesh_tests::netns::unique("mesh-test"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bpffs =
            std::path::Path::new("/sys/fs/bpf").join(mesh_tests::netns::unique("mesh-test"));
        TestCgroup { path, bpffs }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `whoami ask tcp TO --count N` run in namespace `ns` as a process of
/// cgroup `cg`: the names that answered (and how many failed).
fn ask_from(
    cg: &TestCgroup,
    ns: &Netns,
    proto: &str,
    to: SocketAddr,
    count: u32,
) -> (BTreeMap<String, u32>, u32) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} {} ask {proto} {to} --count {count} --timeout-ms 3000",
            cg.path.display(),
            ns.name,
            mesh_tests::dockerlab::whoami_bin().display()
        ))
        .output()
        .expect("whoami ask runs");
    let mut names = BTreeMap::new();
    let mut failed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "ok", name] => *names.entry(name.to_string()).or_insert(0) += 1,
            [_, "err", ..] => {
                if failed == 0 {
                    println!("{to}: {line}");
                }
                failed += 1
            }
            _ => {}
        }
    }
    (names, failed)
}

/// Two nodes with a server in each container, the services published, and
/// node 1's socket programs on a cgroup of the test's.
fn socket_lab() -> (OverlayLab, [Servers; 2], TestCgroup) {
    let mut lab = OverlayLab::new();
    let servers = [
        Servers::start(&lab.nodes[0].container, "c1", TCP_PORT, UDP_PORT),
        Servers::start(&lab.nodes[1].container, "c2", TCP_PORT, UDP_PORT),
    ];
    publish(&mut lab);
    let cg = TestCgroup::new();
    balance_sockets(&mut lab.nodes[0], &cg);
    (lab, servers, cg)
}

/// 60 requests of `proto` to `to` from namespace `ns` (`who`) in cgroup
/// `cg`: every one answered, by the backends on both nodes.
fn ask_both(cg: &TestCgroup, ns: &Netns, who: &str, proto: &str, to: SocketAddr) {
    let (names, failed) = ask_from(cg, ns, proto, to, 60);
    println!("{who} -> {to}/{proto}: {names:?}, {failed} failed");
    assert_eq!(failed, 0, "every request to {to}/{proto} answered");
    assert!(
        names.get("c1").is_some_and(|n| *n >= 6) && names.get("c2").is_some_and(|n| *n >= 6),
        "backends on both nodes answer {to}/{proto}: {names:?}"
    );
}

/// Attaches the socket programs of `node` to cgroup `cg` and tells them
/// the node's namespace is the host's, as the agent does.
fn balance_sockets(node: &mut NodeNs, cg: &TestCgroup) {
    let used = mesh_agent::dataplane::sockets::attach(node.harness.ebpf_mut(), &cg.path, &cg.bpffs)
        .unwrap_or_else(|e| panic!("attaching the socket programs: {e}"));
    assert_eq!(used, cg.path);
    let cookie = node
        .node
        .run(mesh_agent::dataplane::sockets::netns_cookie)
        .expect("netns cookie");
    let mut config = mesh_tests::harness::VIP_RANGE
        .parse::<mesh_agent::vip::Cidr>()
        .expect("range")
        .config();
    config.host_netns_cookie = cookie;
    node.harness.overlay.set_config(&config).expect("config");
}

/// Appends or inserts (`-A`, `-I`) a rule to the NAT table's POSTROUTING
/// chain in `ns`.
fn nat_rule(ns: &Netns, how: &str, rule: &[&str]) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "iptables",
            "-t",
            "nat",
            how,
            "POSTROUTING",
        ])
        .args(rule)
        .output()
        .expect("iptables runs");
    assert!(out.status.success(), "{rule:?}: {out:?}");
}

/// Five datagrams from `from` to `to`; node `node`'s counters before and
/// after.
fn five_datagrams(from: &Netns, to: SocketAddr, node: &NodeNs) -> (Vec<u64>, Vec<u64>) {
    let before = counters(node);
    from.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("socket");
        for _ in 0..5 {
            s.send_to(b"in?", to).expect("sent");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    (before, counters(node))
}

/// A process on node 1 itself (its namespace, as the host's own `curl`)
/// calling a published port on localhost or on node 1's own address: no
/// packet crosses the NIC, so XDP never sees it; the cgroup connect4
/// program balances it at connect: to the backend here directly, or to the
/// published port of the node of a backend elsewhere.
#[test]
fn a_nodes_own_connects_to_its_published_ports_are_balanced() {
    let (lab, _servers, cg) = socket_lab();
    let before = counters(&lab.nodes[0]);
    let here = lab.nodes[0].underlay_ip;
    let node_ns = &lab.nodes[0].node;
    // TCP (connect4), and UDP from unconnected sockets (sendmsg4; every
    // answer must come from the address asked, or whoami counts it failed:
    // recvmsg4).
    for (proto, port) in [("tcp", PUBLISHED_TCP), ("udp", PUBLISHED_UDP)] {
        for to in [
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((here, port)),
        ] {
            ask_both(&cg, node_ns, "node 1 itself", proto, to);
        }
    }
    let after = counters(&lab.nodes[0]);
    let moved = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "sock_local {}, sock_remote {}, sock_datagram {}, sock_reply_restored {}, sock_no_backend {}",
        moved(Stat::SockLocal),
        moved(Stat::SockRemote),
        moved(Stat::SockDatagram),
        moved(Stat::SockReplyRestored),
        moved(Stat::SockNoBackend)
    );
    assert_eq!(moved(Stat::SockLocal) + moved(Stat::SockRemote), 120);
    assert_eq!(moved(Stat::SockDatagram), 120);
    assert_eq!(moved(Stat::SockReplyRestored), 120);
    // A process of the cgroup in another namespace (node 2's) is left
    // alone: its connect to node 1's published port goes out as any
    // client's, and node 1's XDP balances it.
    let before = counters(&lab.nodes[0]);
    let (names, failed) = ask_from(
        &cg,
        &lab.nodes[1].node,
        "tcp",
        SocketAddr::from((here, PUBLISHED_TCP)),
        20,
    );
    let after = counters(&lab.nodes[0]);
    assert_eq!(failed, 0, "node 2 -> node 1's published port: {names:?}");
    assert_eq!(
        after[Stat::SockLocal as usize] + after[Stat::SockRemote as usize],
        before[Stat::SockLocal as usize] + before[Stat::SockRemote as usize],
        "node 1's program left node 2's sockets alone"
    );
}

/// The host itself (node 1's namespace) calling VIPs: socket-level
/// balancing sends each connect and datagram to the backend Maglev picks;
/// one on node 2 is reached through node 1's host link (`mesh-host`, the
/// cluster CIDR routed to it from the gateway address), tunnelled, and its
/// answers come back into the stack through the same link (strict
/// reverse-path filtering on).
#[test]
fn a_nodes_own_connects_to_vips_reach_backends_on_every_node() {
    let mut lab = OverlayLab::new();
    let _servers = [
        Servers::start(&lab.nodes[0].container, "c1", TCP_PORT, UDP_PORT),
        Servers::start(&lab.nodes[1].container, "c2", TCP_PORT, UDP_PORT),
    ];
    publish(&mut lab);
    // Docker's masquerade rule for a bridge network, which the host's own
    // packets from the gateway address meet on their way out.
    nat_rule(
        &lab.nodes[0].node,
        "-A",
        &["-s", "10.42.1.0/24", "!", "-o", "br0", "-j", "MASQUERADE"],
    );
    let link = lab.host_link(0);
    println!("node 1's host link: {link:?}");
    let cg = TestCgroup::new();
    balance_sockets(&mut lab.nodes[0], &cg);
    let before = [counters(&lab.nodes[0]), counters(&lab.nodes[1])];
    // TCP (connect4) and UDP from unconnected sockets (sendmsg4; whoami
    // counts an answer from any other address than the VIP as failed).
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let to = SocketAddr::from((VIP, port));
        ask_both(&cg, &lab.nodes[0].node, "node 1 itself", proto, to);
    }
    let after = [counters(&lab.nodes[0]), counters(&lab.nodes[1])];
    let moved = |n: usize, s: Stat| after[n][s as usize] - before[n][s as usize];
    println!(
        "node 1: sock_vip {}, host_encap {}, host_deliver {}, host_spoofed {}, sock_reply_restored {}; \
         node 2: tunnel_deliver {}",
        moved(0, Stat::SockVip),
        moved(0, Stat::HostEncap),
        moved(0, Stat::HostDeliver),
        moved(0, Stat::HostSpoofed),
        moved(0, Stat::SockReplyRestored),
        moved(1, Stat::TunnelDeliver),
    );
    assert_eq!(moved(0, Stat::SockVip), 120, "every connect and datagram");
    assert_eq!(moved(0, Stat::SockReplyRestored), 60, "every UDP answer");
    assert!(moved(0, Stat::HostEncap) > 0 && moved(0, Stat::HostDeliver) > 0);
    assert_eq!(moved(0, Stat::HostSpoofed), 0);
    // The host link tunnels only the host's own packets: a client outside
    // the cluster routing the overlay through node 1 (forwarding on: the
    // route takes its packet to the host link) gets nowhere.
    let outside = lab.outside_client(1);
    outside.ip(&["route", "add", "10.42.0.0/16", "via", "192.168.77.1"]);
    lab.nodes[0]
        .node
        .sysctl("net.ipv4.conf.all.forwarding", "1");
    let there = SocketAddr::from((lab.nodes[1].container_ip(), UDP_PORT));
    let (before, after) = five_datagrams(&outside, there, &lab.nodes[0]);
    let spoofed = after[Stat::HostSpoofed as usize] - before[Stat::HostSpoofed as usize];
    println!("an outside client's packets through node 1's host link: host_spoofed +{spoofed}");
    assert_eq!(spoofed, 5, "each dropped and counted");
    assert_eq!(
        after[Stat::HostEncap as usize],
        before[Stat::HostEncap as usize],
        "none tunnelled"
    );
    // Masqueraded to the host link's own address (as Docker masquerades a
    // default-bridge container's packets), they are still not the host's.
    nat_rule(
        &lab.nodes[0].node,
        "-I",
        &[
            "-s",
            "192.168.77.0/24",
            "-o",
            mesh_agent::hostlink::NAME,
            "-j",
            "MASQUERADE",
        ],
    );
    let (before, after) = five_datagrams(&outside, there, &lab.nodes[0]);
    let moved = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "masqueraded to the host's address: host_forwarded +{}, host_spoofed +{}",
        moved(Stat::HostForwarded),
        moved(Stat::HostSpoofed)
    );
    assert_eq!(moved(Stat::HostForwarded), 5, "each dropped and counted");
    assert_eq!(moved(Stat::HostEncap), 0, "none tunnelled");
}

/// A container calling VIPs (node 1's container, its network namespace
/// listed as the agent lists a served container's): each connect and
/// datagram goes to the backend Maglev picks, here (the container itself)
/// or on node 2, with the backend's own address, so its packets take the
/// plain container path with nothing to translate and no conntrack entry;
/// getpeername and every UDP answer report the VIP. Unlisted, the same
/// container's connects are translated per packet, as before.
#[test]
fn a_containers_connects_to_vips_are_balanced_at_the_socket() {
    let (mut lab, _servers, cg) = socket_lab();
    let cookie = lab.nodes[0]
        .container
        .run(mesh_agent::dataplane::sockets::netns_cookie)
        .expect("the container's netns cookie");
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].container.name, "sleep", "30"])
        .spawn()
        .expect("a process in the container's namespace");
    std::thread::sleep(Duration::from_millis(200));
    let of_pid = mesh_agent::dataplane::sockets::netns_cookie_of(sleeper.id());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(
        of_pid.expect("read through a process of the namespace, as the agent reads it"),
        cookie
    );
    lab.nodes[0]
        .harness
        .lb
        .sock_netns
        .insert(cookie, 1, 0)
        .expect("listed");
    let before = counters(&lab.nodes[0]);
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let to = SocketAddr::from((VIP, port));
        ask_both(
            &cg,
            &lab.nodes[0].container,
            "node 1's container",
            proto,
            to,
        );
    }
    let after = counters(&lab.nodes[0]);
    let moved = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "node 1: sock_vip_container {}, sock_reply_restored {}, lb_new_flow {}, lb_ct_hit {}, tunnel_encap {}",
        moved(Stat::SockVipContainer),
        moved(Stat::SockReplyRestored),
        moved(Stat::LbNewFlow),
        moved(Stat::LbCtHit),
        moved(Stat::TunnelEncap),
    );
    assert_eq!(
        moved(Stat::SockVipContainer),
        120,
        "every connect and datagram"
    );
    assert_eq!(moved(Stat::SockReplyRestored), 60, "every UDP answer");
    assert_eq!(moved(Stat::LbNewFlow), 0, "nothing translated per packet");
    assert!(moved(Stat::TunnelEncap) > 0, "node 2's backend reached");
    // getpeername: the VIP, not the backend. (This test's own process
    // joins the cgroup for it: nextest runs each test in a process.)
    let procs = |dir: &std::path::Path| {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .expect("moved between cgroups")
    };
    procs(&cg.path);
    let seen = lab.nodes[0].container.run(|| {
        let s = std::net::TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), DEADLINE)
            .expect("connected");
        s.peer_addr().expect("peer")
    });
    procs(cg.path.parent().expect("the root"));
    assert_eq!(seen, SocketAddr::from((VIP, 80)));

    // Unlisted: translated per packet.
    lab.nodes[0]
        .harness
        .lb
        .sock_netns
        .remove(&cookie)
        .expect("unlisted");
    let before = counters(&lab.nodes[0]);
    let (names, failed) = ask_from(
        &cg,
        &lab.nodes[0].container,
        "tcp",
        SocketAddr::from((VIP, 80)),
        20,
    );
    let after = counters(&lab.nodes[0]);
    let moved = |s: Stat| after[s as usize] - before[s as usize];
    println!(
        "unlisted: {names:?}, {failed} failed, lb_new_flow {}",
        moved(Stat::LbNewFlow)
    );
    assert_eq!(failed, 0);
    assert_eq!(moved(Stat::SockVipContainer), 0);
    assert!(moved(Stat::LbNewFlow) >= 20, "each connect translated");
}

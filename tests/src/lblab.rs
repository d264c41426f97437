//! A one-node load-balancing lab in network namespaces: a "host" namespace
//! with a bridge (the node's `mesh` network), a client container and N
//! backend containers on it, each a namespace with a veth to the bridge,
//! and the TC programs on every container's host-side veth. Backends run
//! identity servers; the client talks to the VIP.

use std::net::Ipv4Addr;

use aya::programs::TcAttachType;
use mesh_agent::{
    dataplane::{self, progs},
    maglev::{self, Identity},
};
use mesh_common::lb::{Backend, PROTO_TCP, PROTO_UDP, backend_state};

use crate::{
    harness::Harness,
    netns::{Netns, unique},
    servers::Servers,
};

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
pub const VIP_TCP_PORT: u16 = 80;
pub const VIP_UDP_PORT: u16 = 53;
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;
const TCP_SERVICE: u32 = 1;
const UDP_SERVICE: u32 = 2;

pub struct BackendNs {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    /// Host-side veth.
    pub ifindex: u32,
    pub mac: [u8; 6],
}

pub struct LbLab {
    // Drop order: servers, then the data plane, then the namespaces.
    servers: Vec<Servers>,
    pub harness: Harness,
    pub backends: Vec<BackendNs>,
    pub client: Netns,
    /// More clients ([`Options::extra_clients`]): 10.42.0.3, .4, ...
    pub extra_clients: Vec<Netns>,
    pub host: Netns,
}

/// How to build an [`LbLab`] beyond the defaults.
#[derive(Default)]
pub struct Options {
    /// Pin the maps here (for meshctl or the conntrack sweeper).
    pub pin_dir: Option<std::path::PathBuf>,
    /// Map sizes by name.
    pub sizes: Vec<(&'static str, u32)>,
    pub extra_clients: usize,
}

/// The address of extra client `j` (0-based).
pub fn extra_client_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, 3 + j as u8)
}

impl LbLab {
    /// Builds the namespaces, starts `n` backends ("b1".."bN") and attaches
    /// the data plane. No service is programmed yet: see [`LbLab::program`].
    pub fn new(n: usize) -> Self {
        Self::with(n, &Options::default())
    }

    /// As [`LbLab::new`], with `opts`.
    pub fn with(n: usize, opts: &Options) -> Self {
        let host = Netns::new(&unique("mlh"));
        host.ip(&["link", "add", "br0", "type", "bridge"]);
        host.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "br0"]);
        host.ip(&["link", "set", "br0", "up"]);
        let client = container(&host, 0, CLIENT);
        // Extra clients use veths vc50, vc51, ...
        let extra: Vec<(usize, Ipv4Addr, Netns)> = (0..opts.extra_clients)
            .map(|j| {
                let ip = extra_client_ip(j);
                (50 + j, ip, container(&host, 50 + j, ip))
            })
            .collect();
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 1..=n {
            let ip = Ipv4Addr::new(10, 42, 0, 10 + i as u8);
            let ns = container(&host, i, ip);
            let name = format!("b{i}");
            servers.push(Servers::start(
                &ns,
                &name,
                BACKEND_TCP_PORT,
                BACKEND_UDP_PORT,
            ));
            let ifindex = host
                .link_field(&format!("vc{i}"), "ifindex")
                .as_u64()
                .expect("ifindex") as u32;
            let mac = parse_mac(ns.link_field("eth0", "address").as_str().expect("mac"));
            backends.push(BackendNs {
                name,
                ip,
                ns,
                ifindex,
                mac,
            });
        }
        let mut harness = Harness::load_with(opts.pin_dir.as_deref(), &opts.sizes);
        // Every container's address and veth (anti-spoofing), as the agent
        // writes them.
        let client_ifindex = host.link_field("vc0", "ifindex").as_u64().expect("ifindex") as u32;
        let client_mac = parse_mac(client.link_field("eth0", "address").as_str().expect("mac"));
        let extra_eps: Vec<(Ipv4Addr, u32, [u8; 6])> = extra
            .iter()
            .map(|(i, ip, ns)| {
                let ifindex = host
                    .link_field(&format!("vc{i}"), "ifindex")
                    .as_u64()
                    .expect("ifindex") as u32;
                let mac = parse_mac(ns.link_field("eth0", "address").as_str().expect("mac"));
                (*ip, ifindex, mac)
            })
            .collect();
        for (ip, ifindex, mac) in std::iter::once((CLIENT, client_ifindex, client_mac))
            .chain(backends.iter().map(|b| (b.ip, b.ifindex, b.mac)))
            .chain(extra_eps)
        {
            harness.container(ip, ifindex, mac);
        }
        let ifaces: Vec<String> = (0..=n)
            .chain(extra.iter().map(|(i, _, _)| *i))
            .map(|i| format!("vc{i}"))
            .collect();
        host.run(|| {
            for iface in &ifaces {
                for (name, at) in [
                    (progs::TC_FROM_CONTAINER, TcAttachType::Ingress),
                    (progs::TC_TO_CONTAINER, TcAttachType::Egress),
                ] {
                    dataplane::tc(harness.ebpf_mut(), name)
                        .expect("TC program")
                        .attach(iface, at)
                        .unwrap_or_else(|e| panic!("attach {name} to {iface}: {e:?}"));
                }
            }
        });
        LbLab {
            servers,
            harness,
            backends,
            client,
            extra_clients: extra.into_iter().map(|(_, _, ns)| ns).collect(),
            host,
        }
    }

    /// Programs the TCP (VIP:80 -> :8080) and UDP (VIP:53 -> :5353)
    /// services: backend `i` (id i+1) gets `states[i]` (0 = removed); the
    /// Maglev rings hold the active ones.
    pub fn program(&mut self, states: &[u8]) {
        let mut ring_members = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            let id = i as u32 + 1;
            let state = states.get(i).copied().unwrap_or(0);
            if state == 0 {
                self.harness.lb.clear_backend(id).expect("clear backend");
                continue;
            }
            if state == backend_state::ACTIVE {
                ring_members.push((
                    id,
                    Identity {
                        ip: b.ip,
                        port: BACKEND_TCP_PORT,
                    },
                ));
            }
            // Backend ids 1..=n serve TCP, n+1..=2n the UDP port.
            for (id, port) in [(id, BACKEND_TCP_PORT), (id + 100, BACKEND_UDP_PORT)] {
                let backend = Backend {
                    ip_be: u32::from(b.ip).to_be(),
                    port_be: port.to_be(),
                    state,
                    ifindex: b.ifindex,
                    mac: b.mac,
                    ..Backend::default()
                };
                self.harness
                    .lb
                    .set_backend(id, &backend)
                    .expect("set backend");
            }
        }
        let tcp_ring = maglev::build_ids(&ring_members);
        let udp_ring: Vec<u32> = tcp_ring.iter().map(|id| id + 100).collect();
        self.harness
            .lb
            .set_ring(TCP_SERVICE, &tcp_ring)
            .expect("tcp ring");
        self.harness
            .lb
            .set_ring(UDP_SERVICE, &udp_ring)
            .expect("udp ring");
        for (port, proto, id) in [
            (VIP_TCP_PORT, PROTO_TCP, TCP_SERVICE),
            (VIP_UDP_PORT, PROTO_UDP, UDP_SERVICE),
        ] {
            self.harness.set_service(VIP, port, proto, id);
        }
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// Stops backend `i`'s servers (its namespace stays).
    pub fn stop_servers(&mut self, i: usize) {
        self.servers.remove(i);
    }
}

/// Container `i`: a namespace with eth0 (address `ip`) whose peer `vc<i>`
/// is a port of the host's bridge, default route via the gateway.
fn container(host: &Netns, i: usize, ip: Ipv4Addr) -> Netns {
    let ns = Netns::new(&unique(&format!("mlc{i}")));
    let host_if = format!("vc{i}");
    host.ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "eth0", "netns", &ns.name,
    ]);
    host.ip(&["link", "set", &host_if, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string()]);
    ns
}

fn parse_mac(s: &str) -> [u8; 6] {
    s.parse::<mesh_common::mac::Mac>().expect("a MAC address").0
}

//! Data-plane scale, the agent's way: N services x 10 backends as gossip
//! would bring them (other nodes' endpoints), through the agent's own
//! desired-state computation, plan and apply into the kernel's maps (the
//! real ones, loaded as the agent loads them). Prints the time of each
//! step, a second pass with nothing changed, the maps' kernel memory, the
//! control plane's memory (RSS growth of this process: the peers' view,
//! the desired state, what was written, the DNS zone), and conntrack's
//! memory at its default sizes. Run optimised (the image profile), as the
//! agent is. Prints figures; asserts only that every service was written.

/// The agent's allocator (mesh-agent/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use mesh_agent::{
    desired::{self, Inputs},
    gossip::{
        peers::{Endpoint, Peer},
        subnet::Claim,
    },
    labels::Proto,
    reconcile::{self, Actual},
    vip::Cidr,
};
use mesh_common::maps;
use mesh_tests::harness::Harness;

/// Backends per node (a node's /24 holds 253 containers).
const PER_NODE: usize = 250;

/// The peers holding `services` x `per` backends: service `s`'s backend `j`
/// is endpoint `s * per + j`, on node `k / PER_NODE`.
fn peers(services: usize, per: usize) -> BTreeMap<String, Peer> {
    let mut peers: BTreeMap<String, Peer> = BTreeMap::new();
    for s in 0..services {
        for j in 0..per {
            let k = s * per + j;
            let node = k / PER_NODE;
            let p = peers.entry(format!("node{node}")).or_insert_with(|| Peer {
                underlay: Some(Ipv4Addr::new(
                    192,
                    168,
                    (node / 250) as u8,
                    (node % 250) as u8 + 1,
                )),
                mac: Some([2, 0, 0, 0, (node >> 8) as u8, node as u8]),
                subnet: Some(Claim {
                    node: format!("node{node}"),
                    index: node as u32,
                    since_ms: 1,
                }),
                ..Peer::default()
            });
            std::sync::Arc::make_mut(&mut p.endpoints).push(Endpoint {
                service: format!("svc-{s}"),
                created: format!("2026-11-30T00:00:{:02}.{s:09}Z", s % 60),
                ip: Ipv4Addr::new(
                    10,
                    100 + (node / 256) as u8,
                    node as u8,
                    (k % PER_NODE) as u8 + 2,
                ),
                ports: vec![(80, 8080, Proto::Tcp)],
                state: mesh_common::lb::backend_state::ACTIVE,
                publish: vec![],
            });
        }
    }
    peers
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    let per = 10;
    let vip_cidr: Cidr = "10.43.0.0/16".parse().expect("cidr");
    let (containers, draining, veths) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
    println!(
        "data-plane scale, the agent's path: other nodes' endpoints -> desired state -> plan -> kernel maps ({per} backends a service; \
         the agent's code optimised; real maps at their default sizes)"
    );
    println!(
        "{:>8} {:>9} {:>8} {:>10} {:>10} {:>12} {:>11} {:>13}",
        "services",
        "backends",
        "compute",
        "program",
        "no-op pass",
        "map memory",
        "conntrack",
        "control plane"
    );
    for n in [1_000usize, 10_000] {
        let mut h = Harness::new();
        let rss0 = rss();
        let peers = peers(n, per);
        // The agent's pass from Docker (nothing here) and the peers.
        let desired = |vips: &BTreeMap<String, Ipv4Addr>| {
            desired::compute(&Inputs {
                containers: &containers,
                draining: &draining,
                veths: &veths,
                peers: &peers,
                vips,
                vip_cidr,
            })
        };
        let t = Instant::now();
        let st = desired(&BTreeMap::new());
        let compute = t.elapsed();
        assert_eq!(st.lb.len(), n, "every service is in the desired state");
        let mut actual = Actual::default();
        let t = Instant::now();
        let plan = reconcile::plan(&st.lb, &actual);
        if let Err(e) = reconcile::apply(&plan, &mut h.lb, &mut actual) {
            panic!("programming {n} services: {e}");
        }
        let program = t.elapsed();
        assert_eq!(actual.services.len(), n, "every service was written");
        // The next pass, nothing changed: what every later pass costs. As
        // in the agent, the previous desired state is gone by then.
        let vips = st.vips.clone();
        drop((st, plan));
        let t = Instant::now();
        let st2 = desired(&vips);
        let plan2 = reconcile::plan(&st2.lb, &actual);
        let _ = reconcile::apply(&plan2, &mut h.lb, &mut actual);
        let noop = t.elapsed();
        let held = rss().saturating_sub(rss0);
        let (mem, ct) = (h.map_memory(n as u32), h.conntrack_memory());
        println!(
            "{n:>8} {:>9} {:>7.2}s {:>9.2}s {:>9.3}s {:>8.1} MiB {:>7.1} MiB {:>9.1} MiB",
            n * per,
            compute.as_secs_f64(),
            program.as_secs_f64(),
            noop.as_secs_f64(),
            mib(mem),
            mib(ct),
            mib(held),
        );
        drop((st2, actual));
    }
    println!(
        "(conntrack: MESH_CT {} + MESH_CT_NEW {} entries, the defaults; control plane: this process's RSS growth while it holds the peers' \
         endpoints, the desired state and what was written, as the agent does)",
        maps::CT_ENTRIES,
        maps::CT_NEW_ENTRIES
    );
}

//! Data-plane scale, the agent's way: N services x 10 backends as gossip
//! would bring them (other nodes' endpoints), through the agent's own
//! desired-state computation, plan and apply into the kernel's maps (the
//! real ones, loaded as the agent loads them). Prints the time of each
//! step, a second pass with nothing changed, the maps' kernel memory, the
//! control plane's memory (the heap it holds between passes: the peers'
//! view, the VIPs and what was written; and its peak, during the first
//! pass), and conntrack's memory at its default sizes. The heap is counted
//! by a wrapper around the agent's allocator, not read from RSS: mimalloc
//! reuses pages this process touched before, so RSS growth in one process
//! ranged from 5 to 62 MiB for the same 30.5 MiB held. Run optimised (the image profile), as the
//! agent is. Prints figures; asserts only that every service was written.

/// The agent's allocator (mesh-agent/src/main.rs), counting what is
/// allocated: now and at most since [`Heap::mark`].
struct Heap;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to mimalloc with the caller's layout and
// pointer; the counters do not touch the memory.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

impl Heap {
    /// Bytes allocated now; the peak starts again from here.
    fn mark() -> usize {
        let now = LIVE.load(Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
        now
    }
}

#[global_allocator]
static ALLOCATOR: Heap = Heap;

use std::{
    alloc::{GlobalAlloc, Layout},
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering},
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
                container: String::new(),
            });
        }
    }
    peers
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
        "{:>8} {:>9} {:>8} {:>10} {:>10} {:>12} {:>11} {:>11} {:>11}",
        "services",
        "backends",
        "compute",
        "program",
        "no-op pass",
        "map memory",
        "conntrack",
        "heap held",
        "heap peak"
    );
    for n in [1_000usize, 10_000] {
        let mut h = Harness::new();
        let heap0 = Heap::mark();
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
                networks: &[],
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
        let held = LIVE.load(Ordering::Relaxed).saturating_sub(heap0) as u64;
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(heap0) as u64;
        let (mem, ct) = (h.map_memory(n as u32), h.conntrack_memory());
        println!(
            "{n:>8} {:>9} {:>7.2}s {:>9.2}s {:>9.3}s {:>8.1} MiB {:>7.1} MiB {:>7.1} MiB {:>7.1} MiB",
            n * per,
            compute.as_secs_f64(),
            program.as_secs_f64(),
            noop.as_secs_f64(),
            mib(mem),
            mib(ct),
            mib(held),
            mib(peak),
        );
        drop((st2, actual));
    }
    println!(
        "(conntrack: MESH_CT {} + MESH_CT_NEW {} entries, the defaults; heap held: what the control plane holds after the second pass, \
         the peers' endpoints, the desired state and what was written, as the agent does; heap peak: the most it held at once, during \
         the first pass: the agent's RSS grows by about that much)",
        maps::CT_ENTRIES,
        maps::CT_NEW_ENTRIES
    );
}

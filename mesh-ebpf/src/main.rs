//! mesh data plane. Entry points only; the logic lives in one module per concern.
//!
//! LLVM inlines each program's body into its entry point but one, the
//! program for packets leaving a container, the largest: marked
//! `#[inline(always)]`, it is no BPF subprogram, whose call and return per
//! packet cost about 15 ns on a CPU with return-stack mitigations (perf:
//! docs/benchmarks.md). The others must stay as LLVM lays them out: the
//! bridge's program inlined by force exceeds the 512-byte stack.
#![no_std]
#![no_main]

mod bridge;
mod csum;
mod ct;
mod ctx;
mod fib;
mod hdr;
mod host;
mod ingress;
mod lb;
mod maps;
mod mark;
mod monitor;
mod nat;
mod parse;
mod sock;
mod stats;
mod tunnel;
mod underlay;
mod veth;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// Never attached: the agent runs it (BPF_PROG_TEST_RUN) on a packet of
/// at least 16 bytes, whose first 16 it overwrites with the kernel's
/// jiffies and CLOCK_MONOTONIC's coarse reading of the same moment (both
/// move at the tick): how the agent measures the tick and reads
/// conntrack's clock (`ct::now`).
#[classifier]
pub fn mesh_clock(ctx: TcContext) -> i32 {
    // SAFETY: plain helper calls.
    let pair = unsafe {
        [
            aya_ebpf::helpers::generated::bpf_jiffies64(),
            aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns(),
        ]
    };
    match ctx.store(0, &pair, 0) {
        Ok(()) => aya_ebpf::bindings::TC_ACT_OK,
        Err(_) => aya_ebpf::bindings::TC_ACT_SHOT,
    }
}

/// XDP on the underlay NIC: classifies and counts every frame,
/// decapsulates VXLAN for this node's /24 and balances requests to its
/// published ports (the routing mesh). Everything else passes untouched.
#[xdp]
pub fn mesh_xdp_underlay(ctx: XdpContext) -> u32 {
    ctx::finish::<ctx::Xdp, _>(&ctx, underlay::run(&ctx))
}

/// TC ingress on a container's host-side veth: packets leaving the
/// container (service load balancing, DNAT).
#[classifier]
#[inline(always)]
pub fn mesh_tc_from_container(ctx: TcContext) -> i32 {
    ctx::finish::<ctx::Tc, _>(&ctx, veth::from_container(&ctx))
}

/// TC egress on a container's host-side veth: packets entering the
/// container (reverse NAT).
#[classifier]
pub fn mesh_tc_to_container(ctx: TcContext) -> i32 {
    ctx::finish::<ctx::Tc, _>(&ctx, veth::to_container(&ctx))
}

/// TC ingress on the underlay NIC: decapsulated packets for local
/// containers go straight to their veths.
#[classifier]
pub fn mesh_tc_underlay_in(ctx: TcContext) -> i32 {
    underlay::tc_ingress(&ctx)
}

/// TC ingress on the WireGuard device (`mesh-wg`) of an encrypting
/// cluster: the tunnel's VXLAN, decrypted, decapsulated and handed on.
#[classifier]
pub fn mesh_tc_wg_in(ctx: TcContext) -> i32 {
    ctx::finish::<ctx::Tc, _>(&ctx, underlay::wg_ingress(&ctx))
}

/// TC ingress on `mesh-vxlan`, the kernel's VXLAN device: the packets GRO
/// merged, which the underlay's program leaves to the kernel to
/// decapsulate, handed on from there.
#[classifier]
pub fn mesh_tc_vxlan_in(ctx: TcContext) -> i32 {
    underlay::device_ingress(&ctx)
}

/// TC ingress on the bridge of another Docker network (the default
/// bridge, user-defined ones): its containers' calls to published ports.
#[classifier]
pub fn mesh_tc_bridge_in(ctx: TcContext) -> i32 {
    ctx::finish::<ctx::Tc, _>(&ctx, bridge::from_bridge(&ctx))
}

/// TC egress on the host link (`mesh-host`): the host's own packets for
/// other nodes' /24s (a VIP's backend there) go through the tunnel.
#[classifier]
pub fn mesh_tc_host_out(ctx: TcContext) -> i32 {
    ctx::finish::<ctx::Tc, _>(&ctx, host::host_out(&ctx))
}

/// cgroup connect4: a connect of this host's to a published port on
/// localhost or its own address, balanced before its first packet. Always
/// allows the connect.
#[cgroup_sock_addr(connect4)]
pub fn mesh_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx);
    1
}

/// cgroup sendmsg4: a datagram of this host's unconnected UDP socket to a
/// published port on localhost or its own address, balanced. Always
/// allows the send.
#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx);
    1
}

/// cgroup recvmsg4: an answer to a datagram socket balanced at connect or
/// sendmsg is reported as from the address asked for.
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg4(&ctx);
    1
}

/// cgroup getpeername4: a socket balanced at connect reports the address
/// it asked for.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::getpeername4(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

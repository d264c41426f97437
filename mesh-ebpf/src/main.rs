//! mesh data plane. Entry points only; the logic lives in one module per concern.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod stats;
mod underlay;

use aya_ebpf::{macros::xdp, programs::XdpContext};

/// XDP on the underlay NIC: VXLAN decapsulation and the routing mesh
/// (so far: parse, classify and count; every frame is passed).
#[xdp]
pub fn mesh_xdp_underlay(ctx: XdpContext) -> u32 {
    underlay::run(&ctx)
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

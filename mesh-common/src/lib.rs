//! Types shared by the kernel programs (`mesh-ebpf`) and user space.
//!
//! Everything that crosses the user/kernel boundary is defined once, here:
//! map names and sizes, `#[repr(C)]` map keys and values, counter indices,
//! and the flow hash. Fields in network byte order end in `_be`.
#![no_std]

pub mod ct;
pub mod hash;
pub mod lb;
pub mod mac;
pub mod maps;
pub mod monitor;
pub mod stats;
pub mod tunnel;

//! Creating a Maglev ring map and filling it in one copy.
//!
//! A ring is a BPF array created with [`RING_FLAGS`] (an inner map whose
//! size may differ from the template's, and mmap-able), so writing M slots
//! is one memcpy instead of M syscalls. aya 0.14 can neither create a map
//! with those flags and hand out its fd nor mmap it, hence the two raw
//! calls here; everything else goes through aya.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::maps::MapData;
use mesh_common::maps::RING_FLAGS;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE; the rest of
/// the union stays zero.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    _rest: [u8; 84],
}

/// A new ring map holding `[ring.len(), ring...]`.
pub fn create(ring: &[u32]) -> io::Result<MapData> {
    let len =
        u32::try_from(ring.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"mesh_ring\0");
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: len + 1,
        map_flags: RING_FLAGS,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name,
        _rest: [0; 84],
    };
    // SAFETY: BPF_MAP_CREATE reads `size_of::<MapCreateAttr>()` bytes of a
    // valid, zero-padded attribute struct.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreateAttr,
            size_of::<MapCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    fill(&fd, len, ring)?;
    MapData::from_fd(fd).map_err(io::Error::other)
}

/// The kernel stores array elements 8-byte aligned: a u32 slot takes 8 bytes.
const SLOT_STRIDE: usize = 8;
// A slot is written as a u64 whose low half is the u32 value: the first
// four bytes only on a little-endian host (x86_64, like the bpfel object).
const _: () = assert!(cfg!(target_endian = "little"));

/// Writes the slots through a shared mapping of the array's memory.
fn fill(fd: &OwnedFd, len: u32, ring: &[u32]) -> io::Result<()> {
    let bytes = (ring.len() + 1) * SLOT_STRIDE;
    // SAFETY: mapping an mmap-able BPF array of at least `bytes` bytes,
    // shared, at offset 0; unmapped below on every path.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptr maps `bytes` writable, page-aligned bytes: (len + 1)
    // slots of SLOT_STRIDE bytes, each holding a u32 at its start.
    unsafe {
        let slots = ptr.cast::<u64>();
        slots.write(len as u64);
        for (i, id) in ring.iter().enumerate() {
            slots.add(i + 1).write(*id as u64);
        }
        libc::munmap(ptr, bytes);
    }
    Ok(())
}

/// A ring's slots, read through a read-only mapping of its memory (one
/// syscall pair, not one lookup per slot: 10,000 rings of 1,000 slots
/// would be ten million lookups when a restarted agent adopts them).
pub fn read(map: &MapData) -> io::Result<Vec<u32>> {
    let entries = map.info().map_err(io::Error::other)?.max_entries() as usize;
    if entries == 0 {
        return Ok(Vec::new());
    }
    let bytes = entries * SLOT_STRIDE;
    // SAFETY: mapping an mmap-able BPF array of `entries` slots, shared,
    // read-only, at offset 0; unmapped below on every path.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptr maps `entries` readable slots of SLOT_STRIDE bytes, each
    // holding a u32 at its start; slot 0 is the ring's length, bounded by
    // the array here.
    let ring = unsafe {
        let slots = ptr.cast::<u64>();
        let len = (slots.read() as u32 as usize).min(entries - 1);
        let ring = (1..=len).map(|i| slots.add(i).read() as u32).collect();
        libc::munmap(ptr, bytes);
        ring
    };
    Ok(ring)
}

/// Puts many rings into the outer map with one BPF_MAP_UPDATE_BATCH: the
/// kernel waits for one RCU grace period per batch, not per ring (about
/// 8 ms each, which made programming 10,000 services take 86 s).
pub fn set_batch(outer: &MapData, slots: &[(u32, MapData)]) -> io::Result<()> {
    let keys: Vec<u32> = slots.iter().map(|(k, _)| *k).collect();
    let fds: Vec<u32> = slots
        .iter()
        .map(|(_, m)| m.fd().as_fd().as_raw_fd() as u32)
        .collect();
    super::batch::update(outer, &keys, &fds)
}

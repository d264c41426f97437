//! BPF batch commands (one syscall for many elements), which aya 0.14 does
//! not offer: BPF_MAP_UPDATE_BATCH (Maglev rings), BPF_MAP_LOOKUP_BATCH and
//! BPF_MAP_DELETE_BATCH (the conntrack sweep).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid batch attribute; the pointers in it are the
    // callers' buffers, sized for `count` elements of the map's key and
    // value size (checked by the callers).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// Writes `keys[i] -> values[i]` with one BPF_MAP_UPDATE_BATCH. `K` and `V`
/// must be the map's key and value types.
pub fn update<K: aya::Pod, V: aya::Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd(map),
        elem_flags: 0,
        flags: 0,
    };
    call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count as usize != keys.len() {
        return Err(io::Error::other(format!(
            "batch update wrote {} of {} elements",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

/// Every element of a hash map, read `chunk` at a time with
/// BPF_MAP_LOOKUP_BATCH. Elements added or removed meanwhile may or may not
/// be seen (as with any iteration of a live map). `K` and `V` must be the
/// map's key and value types.
pub fn lookup_all<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &MapData,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The batch token of a hash map is a bucket index (u32); room for more.
    let mut token = [0u64; 2];
    let mut first = true;
    loop {
        let mut next = [0u64; 2];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd(map),
            elem_flags: 0,
            flags: 0,
        };
        let r = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => {}
            // The end of the map (with the last elements, if any).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // A bucket larger than the chunk: retry with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                keys.resize(keys.len() * 2, K::default());
                values.resize(values.len() * 2, V::default());
                continue;
            }
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// Deletes `keys` with BPF_MAP_DELETE_BATCH; how many were there to delete.
/// A key that is already gone (the LRU, or the kernel) is skipped, not an
/// error.
pub fn delete<K: aya::Pod>(map: &MapData, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: rest.as_ptr() as u64,
            values: 0,
            count: rest.len() as u32,
            map_fd: fd(map),
            elem_flags: 0,
            flags: 0,
        };
        let r = call(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(rest.len());
        deleted += done;
        match r {
            Ok(()) => return Ok(deleted),
            // Stopped at a key that is gone: skip it and go on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(done + 1).min(rest.len())..]
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

//! The baseline of the per-packet benchmark: an empty program of the same
//! hook (`return TC_ACT_OK` / `return XDP_PASS`), loaded with the bpf
//! syscall and timed with BPF_PROG_TEST_RUN exactly as the data plane's
//! programs are. A figure less this baseline is the program's own cost.
//! Lives here, not in the data-plane object, so the product ships nothing
//! that only the benchmark needs.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD, zero-padded
/// to the size the kernel reads.
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    _rest: [u64; 12],
}

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: [u32; 5],
}

/// One eBPF instruction.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// An empty program of one hook.
pub struct EmptyProg {
    fd: OwnedFd,
}

impl EmptyProg {
    /// `return TC_ACT_OK;` as a TC classifier.
    pub fn tc() -> io::Result<Self> {
        Self::load(BPF_PROG_TYPE_SCHED_CLS, 0)
    }

    /// `return XDP_PASS;` as an XDP program.
    pub fn xdp() -> io::Result<Self> {
        Self::load(BPF_PROG_TYPE_XDP, 2)
    }

    fn load(prog_type: u32, ret: i32) -> io::Result<Self> {
        let insns = [
            // r0 = ret
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: ret,
            },
            // exit
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"mesh_empty");
        let attr = LoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        // SAFETY: the attribute block and everything it points to outlive
        // the call; the kernel reads at most its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const LoadAttr,
                size_of::<LoadAttr>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor the kernel gave us.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        })
    }

    /// The kernel-measured mean time of one test run repeating `input`
    /// `repeat` times, in ns.
    pub fn time(&self, input: &[u8], repeat: u32) -> io::Result<f64> {
        use std::os::fd::AsRawFd;
        let mut out = vec![0u8; input.len() + 256];
        let mut attr = TestAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: input.len() as u32,
            data_size_out: out.len() as u32,
            data_in: input.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ..Default::default()
        };
        // SAFETY: as above; the output buffer is as large as we say.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestAttr,
                size_of::<TestAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr.duration as f64)
    }

    /// The mean of `runs` single test runs on `input` (the baseline of
    /// figures taken one run per packet), in ns.
    pub fn time_single(&self, input: &[u8], runs: u32) -> io::Result<f64> {
        let mut total = 0.0;
        for _ in 0..runs {
            total += self.time(input, 1)?;
        }
        Ok(total / runs.max(1) as f64)
    }
}

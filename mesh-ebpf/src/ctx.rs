//! One packet interface for both hooks (cilium's overloadable skb/xdp
//! helpers, without macros): the parser, NAT and checksums are written
//! once over [`Packet`], which TC's `TcContext` and XDP's
//! `XdpContext` implement; and one [`Verdict`] whose counting is the same
//! for every program ([`finish`]).
//!
//! TC reads and writes through the skb helpers (they work on non-linear
//! skbs and keep offloaded checksums right); XDP uses direct, bounds-checked
//! packet access and RFC 1624 arithmetic for checksums.

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1, xdp_action,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use mesh_common::stats::Stat;

use crate::{
    csum::{self, BPF_F_MARK_MANGLED_0},
    hdr::ptr_at,
    stats::bump,
};

/// A packet either hook sees. Offsets are from the start of the frame.
pub trait Packet {
    /// Length of the whole frame.
    fn len(&self) -> usize;
    /// A `T` at `off`, if the packet is long enough.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    /// Writes `v` at `off`.
    fn store<T: Copy>(&self, off: usize, v: &T) -> Option<()>;
    /// Updates the IPv4 header checksum at `csum_off` for a field that
    /// changed from `from` to `to` (`size` 2 or 4 bytes).
    fn l3_csum_replace(&self, csum_off: usize, from: u32, to: u32, size: u64) -> Option<()>;
    /// Updates the TCP/UDP checksum at `csum_off`; `flags` as for
    /// bpf_l4_csum_replace (size in the low bits, `BPF_F_PSEUDO_HDR`,
    /// `BPF_F_MARK_MANGLED_0`).
    fn l4_csum_replace(&self, csum_off: usize, from: u32, to: u32, flags: u64) -> Option<()>;
    /// Tells a listening monitor (its slot `s`) that the packet is
    /// dropped for `reason`.
    fn monitor_drop(&self, reason: Stat, s: *mut mesh_common::monitor::Budget);
}

impl Packet for TcContext {
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    // Direct access where the bytes are in the skb's linear part (headers
    // almost always are), as XDP does; the helpers otherwise (a non-linear
    // skb). A direct write is what `bpf_skb_store_bytes` without flags
    // does (the verifier makes a cloned skb private first); checksums
    // still go through the helpers, which know the skb's checksum state.
    //
    // One-byte values always go through the helper: LLVM turns the bounds
    // check `at + 1 > end` into `at >= end`, from which the verifier learns
    // no range for a pointer at a variable offset.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        if size_of::<T>() > 1
            && let Some(p) = ptr_at::<T>(self.data(), self.data_end(), off)
        {
            // SAFETY: ptr_at checked that the T lies inside the linear data.
            return Some(unsafe { p.read() });
        }
        TcContext::load(self, off).ok()
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Option<()> {
        if size_of::<T>() > 1
            && let Some(p) = ptr_at::<T>(self.data(), self.data_end(), off)
        {
            // SAFETY: as above; the packet is this program's to rewrite.
            unsafe { p.cast_mut().write(*v) };
            return Some(());
        }
        TcContext::store(self, off, v, 0).ok()
    }
    // The IPv4 header checksum is plain arithmetic on its field: the helper
    // does nothing else (a header whose checksum compensates its change
    // leaves skb->csum right), so it is done here, a helper call saved.
    #[inline(always)]
    fn l3_csum_replace(&self, csum_off: usize, from: u32, to: u32, size: u64) -> Option<()> {
        let old: u16 = Packet::load(self, csum_off)?;
        let new = if size == 2 {
            csum::update16(old, from as u16, to as u16)
        } else {
            csum::update32(old, from, to)
        };
        Packet::store(self, csum_off, &new)
    }
    #[inline(always)]
    fn l4_csum_replace(&self, csum_off: usize, from: u32, to: u32, flags: u64) -> Option<()> {
        TcContext::l4_csum_replace(self, csum_off, from as u64, to as u64, flags).ok()
    }
    #[inline(always)]
    fn monitor_drop(&self, reason: Stat, s: *mut mesh_common::monitor::Budget) {
        crate::monitor::drop_tc(self.skb.skb, reason as u32, s);
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    // Direct loads and stores through the header pointer, as XDP code
    // does: `read_unaligned` would make the BPF backend split every field
    // into byte loads (measured: IPv4 frames 20 -> 40 ns). Packet headers
    // sit at 2-byte offsets; x86's JIT and the verifier (no strict
    // alignment) take word accesses there.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let p = ptr_at::<T>(self.data(), self.data_end(), off)?;
        // SAFETY: ptr_at checked that the T lies inside the packet.
        Some(unsafe { p.read() })
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Option<()> {
        let p = ptr_at::<T>(self.data(), self.data_end(), off)?;
        // SAFETY: as above; the frame is this program's to rewrite.
        unsafe { p.cast_mut().write(*v) };
        Some(())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, csum_off: usize, from: u32, to: u32, size: u64) -> Option<()> {
        let old: u16 = self.load(csum_off)?;
        let new = if size == 2 {
            csum::update16(old, from as u16, to as u16)
        } else {
            csum::update32(old, from, to)
        };
        self.store(csum_off, &new)
    }
    #[inline(always)]
    fn l4_csum_replace(&self, csum_off: usize, from: u32, to: u32, flags: u64) -> Option<()> {
        // XDP frames carry complete checksums (no CHECKSUM_PARTIAL), so the
        // pseudo-header flag changes nothing here.
        let old: u16 = self.load(csum_off)?;
        let mangled = flags & BPF_F_MARK_MANGLED_0 != 0;
        if mangled && old == 0 {
            return Some(());
        }
        let mut new = if flags & 0xf == 2 {
            csum::update16(old, from as u16, to as u16)
        } else {
            csum::update32(old, from, to)
        };
        if mangled && new == 0 {
            new = 0xffff;
        }
        self.store(csum_off, &new)
    }
    #[inline(always)]
    fn monitor_drop(&self, reason: Stat, s: *mut mesh_common::monitor::Budget) {
        crate::monitor::drop_xdp(self.ctx, reason as u32, s);
    }
}

/// What a program does with a packet, the same for every hook. A plain
/// struct rather than an enum with a payload: every field is always
/// initialised, so no path hands the verifier an undefined register.
#[derive(Clone, Copy)]
pub struct Verdict {
    action: u32,
    /// The redirect target (0 otherwise).
    ifindex: u32,
    /// The next hop of a neighbour redirect (network order; 0 otherwise).
    nexthop_be: u32,
}

const PASS: u32 = 0;
const DROP: u32 = 1;
const REDIRECT: u32 = 2;
const REDIRECT_NEIGH: u32 = 3;
const REDIRECT_INGRESS: u32 = 4;

impl Verdict {
    /// On to the stack, as it is now.
    pub const PASS: Verdict = Verdict {
        action: PASS,
        ifindex: 0,
        nexthop_be: 0,
    };
    /// Dropped (the reason is counted by whoever decided it).
    pub const DROP: Verdict = Verdict {
        action: DROP,
        ifindex: 0,
        nexthop_be: 0,
    };
    /// Out of interface `ifindex` (`bpf_redirect`).
    #[inline(always)]
    pub const fn redirect(ifindex: u32) -> Verdict {
        Verdict {
            action: REDIRECT,
            ifindex,
            nexthop_be: 0,
        }
    }
    /// TC: into interface `ifindex`, as if it had arrived there
    /// (`bpf_redirect` with `BPF_F_INGRESS`).
    #[inline(always)]
    pub const fn redirect_ingress(ifindex: u32) -> Verdict {
        Verdict {
            action: REDIRECT_INGRESS,
            ifindex,
            nexthop_be: 0,
        }
    }
    /// TC: out of interface `ifindex` toward next hop `nexthop_be` (0: the
    /// kernel's route for the destination), whose MAC the kernel's
    /// neighbour table resolves (`bpf_redirect_neigh`).
    #[inline(always)]
    pub const fn redirect_neigh(ifindex: u32, nexthop_be: u32) -> Verdict {
        Verdict {
            action: REDIRECT_NEIGH,
            ifindex,
            nexthop_be,
        }
    }
}

/// `AF_INET`.
pub const AF_INET: u32 = 2;

/// A hook's return codes and verdict counters.
pub trait Hook {
    type Code;
    /// Carries out `v` and returns the hook's code and its verdict counter.
    fn code(v: Verdict) -> (Self::Code, Stat);
}

pub struct Tc;

impl Hook for Tc {
    type Code = i32;
    #[inline(always)]
    fn code(v: Verdict) -> (i32, Stat) {
        match v.action {
            PASS => (TC_ACT_OK, Stat::TcOk),
            REDIRECT | REDIRECT_INGRESS => {
                let flags = if v.action == REDIRECT_INGRESS {
                    BPF_F_INGRESS as u64
                } else {
                    0
                };
                // SAFETY: plain helper call.
                let r = unsafe { bpf_redirect(v.ifindex, flags) } as i32;
                let stat = if r == TC_ACT_REDIRECT {
                    Stat::TcRedirect
                } else {
                    Stat::TcShot
                };
                (r, stat)
            }
            REDIRECT_NEIGH => {
                let mut nh = bpf_redir_neigh {
                    nh_family: AF_INET,
                    __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                        ipv4_nh: v.nexthop_be,
                    },
                };
                let (params, len) = if v.nexthop_be == 0 {
                    (core::ptr::null_mut(), 0)
                } else {
                    (
                        &mut nh as *mut bpf_redir_neigh,
                        size_of::<bpf_redir_neigh>() as i32,
                    )
                };
                // SAFETY: plain helper call; the parameter block, if any, is valid.
                let r = unsafe { bpf_redirect_neigh(v.ifindex, params, len, 0) } as i32;
                let stat = if r == TC_ACT_REDIRECT {
                    Stat::TcRedirect
                } else {
                    Stat::TcShot
                };
                (r, stat)
            }
            _ => (TC_ACT_SHOT, Stat::TcShot),
        }
    }
}

pub struct Xdp;

impl Hook for Xdp {
    type Code = u32;
    #[inline(always)]
    fn code(v: Verdict) -> (u32, Stat) {
        match v.action {
            PASS => (xdp_action::XDP_PASS, Stat::XdpPass),
            REDIRECT => {
                // SAFETY: plain helper call.
                let r = unsafe { bpf_redirect(v.ifindex, 0) } as u32;
                let stat = if r == xdp_action::XDP_REDIRECT {
                    Stat::XdpRedirect
                } else {
                    Stat::XdpAborted
                };
                (r, stat)
            }
            _ => (xdp_action::XDP_DROP, Stat::XdpDrop),
        }
    }
}

/// A program's result: `Ok` is a verdict, `Err` a drop reason. Counts the
/// drop reason (if any) and the verdict, tells a listening monitor of the
/// drop, and returns the hook's code.
#[inline(always)]
pub fn finish<H: Hook, P: Packet>(p: &P, r: Result<Verdict, Stat>) -> H::Code {
    let v = match r {
        Ok(v) => v,
        Err(reason) => {
            bump(reason);
            if let Some(s) = crate::monitor::on() {
                p.monitor_drop(reason, s);
            }
            Verdict::DROP
        }
    };
    let (code, stat) = H::code(v);
    bump(stat);
    code
}

/// Passes the packet untouched, counting why.
#[inline(always)]
pub fn pass(path: Stat) -> Result<Verdict, Stat> {
    bump(path);
    Ok(Verdict::PASS)
}

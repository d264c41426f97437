//! Conntrack's clock.
//!
//! The programs stamp conntrack entries (last seen, created) with the time
//! of the last tick, in ns. A clock helper would cost a call per packet
//! (15-20 ns on the tracked VIP path and the reply path, most of it the
//! call's return on CPUs with return-stack mitigations); `bpf_jiffies64`,
//! which the verifier inlines as a load, costs none, but counts ticks. So:
//!
//! - the agent measures the tick once, with `mesh_clock`, a program never
//!   attached whose test run returns jiffies and CLOCK_MONOTONIC's coarse
//!   reading of one moment: the ns between two readings 100 ms apart over
//!   the jiffies between them, rounded to the kernel's possible HZ (and
//!   measured again when it fits none, as on a machine too busy to read
//!   the tick in time);
//! - the base is `jiffies * tick - monotonic` at that moment, so the clock
//!   reads CLOCK_MONOTONIC then, and afterwards drifts from it only as NTP
//!   slews the one against the other (parts per million);
//! - both go to CONFIG (`tick_ns`, `clock_base_ns`), which is pinned: an
//!   agent that restarts keeps them, and the entries one clock;
//! - user space reads the same clock through the pinned `mesh_clock`
//!   ([`Clock::now_ns`]: the sweeper, `meshctl conntrack`), or, if it
//!   cannot, CLOCK_MONOTONIC, which it tracks that closely.

use std::{
    io,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use mesh_common::lb::Config;

/// What `mesh_clock` returns when it wrote the pair.
const TC_ACT_OK: u32 = 0;

/// The kernel's possible tick rates (Kconfig HZ_100, HZ_250, HZ_300,
/// HZ_1000).
const HZ: [u64; 4] = [100, 250, 300, 1000];

/// The tick and base the programs read in CONFIG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    pub tick_ns: u32,
    pub base_ns: u64,
}

impl Calibration {
    /// What `config` says (None: not measured).
    pub fn of(config: &Config) -> Option<Self> {
        (config.tick_ns != 0).then_some(Calibration {
            tick_ns: config.tick_ns,
            base_ns: config.clock_base_ns,
        })
    }

    /// `config` with this calibration.
    pub fn set(&self, config: &mut Config) {
        config.tick_ns = self.tick_ns;
        config.clock_base_ns = self.base_ns;
    }

    /// The clock at `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns as u64)
            .wrapping_sub(self.base_ns)
    }
}

/// Jiffies and CLOCK_MONOTONIC (coarse, ns) of one moment, from a test run
/// of `mesh_clock`.
pub fn read(prog: &SchedClassifier) -> io::Result<(u64, u64)> {
    // An Ethernet header's worth and more; EtherType 0 (no IP to check).
    let input = [0u8; 64];
    let mut out = [0u8; 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .map_err(io::Error::other)?;
    if r.return_value != TC_ACT_OK || (r.data_size_out as usize) < 16 {
        return Err(io::Error::other(format!(
            "mesh_clock returned {} with {} bytes",
            r.return_value, r.data_size_out
        )));
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    Ok((word(0), word(8)))
}

/// The first reading after jiffies passed `after`, read twice: the tick
/// moves jiffies and the monotonic clock one after the other, so a reading
/// at the very edge may pair the new jiffies with the old time; the one
/// after it, with the same jiffies, has both.
fn reading_past(prog: &SchedClassifier, after: u64, until: Instant) -> io::Result<(u64, u64)> {
    loop {
        let (j, _) = read(prog)?;
        if j > after {
            let (j2, m2) = read(prog)?;
            if j2 == j {
                return Ok((j2, m2));
            }
            continue;
        }
        if Instant::now() > until {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "jiffies did not move for a second",
            ));
        }
    }
}

/// How far apart a measurement's two readings are: many ticks at any HZ
/// (10 at HZ 100, 100 at HZ 1000), so a reading the tick reached late (a
/// busy machine, ticks caught up in one go) moves the result little.
const SPAN: Duration = Duration::from_millis(100);
/// Measurements made before the tick is given up as unknown.
const TRIES: usize = 5;

/// Measures the tick (`mesh_clock` loaded): two readings [`SPAN`] apart,
/// each just after a tick, rounded to the nearest possible HZ; a result
/// more than an eighth off every HZ is measured again, up to [`TRIES`]
/// times.
pub fn measure(prog: &SchedClassifier) -> io::Result<Calibration> {
    let mut why = String::new();
    for _ in 0..TRIES {
        match measure_once(prog)? {
            Ok(cal) => return Ok(cal),
            Err(e) => why = e,
        }
    }
    Err(io::Error::other(format!("{why} ({TRIES} tries)")))
}

/// One measurement: the calibration, or why it fits no HZ.
fn measure_once(prog: &SchedClassifier) -> io::Result<Result<Calibration, String>> {
    let (j0, _) = read(prog)?;
    let (j1, m1) = reading_past(prog, j0, Instant::now() + Duration::from_secs(1))?;
    std::thread::sleep(SPAN);
    let (jn, _) = read(prog)?;
    let (j2, m2) = reading_past(prog, jn, Instant::now() + Duration::from_secs(1))?;
    let per_tick = m2.saturating_sub(m1) / j2.saturating_sub(j1).max(1);
    let Some(tick_ns) = HZ
        .iter()
        .map(|hz| 1_000_000_000 / hz)
        .min_by_key(|t| t.abs_diff(per_tick))
        .filter(|t| t.abs_diff(per_tick) * 8 < *t)
    else {
        return Ok(Err(format!(
            "a tick of {per_tick} ns is none of HZ {HZ:?}'s (jiffies {j1}..{j2})"
        )));
    };
    let tick_ns = tick_ns as u32;
    Ok(Ok(Calibration {
        tick_ns,
        base_ns: j2.wrapping_mul(tick_ns as u64).wrapping_sub(m2),
    }))
}

/// The calibration of a data plane whose CONFIG holds `current` (None:
/// not measured, or a new map): kept if measured before (the entries carry
/// that clock), else measured with `mesh_clock`, loaded here.
pub fn settle(ebpf: &mut aya::Ebpf, current: Option<Calibration>) -> io::Result<Calibration> {
    if let Some(cal) = current {
        return Ok(cal);
    }
    let prog = super::tc(ebpf, super::progs::CLOCK).map_err(io::Error::other)?;
    measure(prog)
}

/// Pins `mesh_clock` (loaded) under `dir`, in place of an earlier agent's,
/// for [`Clock::open`].
pub fn pin(ebpf: &mut aya::Ebpf, dir: &Path) -> io::Result<()> {
    let prog = super::tc(ebpf, super::progs::CLOCK).map_err(io::Error::other)?;
    let path = dir.join(super::progs::CLOCK);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    prog.pin(&path).map_err(io::Error::other)
}

/// Conntrack's clock as user space reads it.
pub struct Clock {
    prog: Option<SchedClassifier>,
    cal: Option<Calibration>,
}

impl Clock {
    /// The clock an agent pinned under `dir` (`mesh_clock` and CONFIG);
    /// what is missing leaves CLOCK_MONOTONIC.
    pub fn open(dir: &Path) -> Self {
        let prog = SchedClassifier::from_pin(dir.join(super::progs::CLOCK)).ok();
        let cal = MapData::from_pin(dir.join(mesh_common::maps::CONFIG.name))
            .ok()
            .and_then(|m| Array::<MapData, Config>::try_from(aya::maps::Map::Array(m)).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .and_then(|c| Calibration::of(&c));
        Clock { prog, cal }
    }

    /// Now, in the clock the entries carry.
    pub fn now_ns(&self) -> u64 {
        if let (Some(prog), Some(cal)) = (&self.prog, &self.cal)
            && let Ok((jiffies, _)) = read(prog)
        {
            return cal.at(jiffies);
        }
        monotonic_ns()
    }
}

/// CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

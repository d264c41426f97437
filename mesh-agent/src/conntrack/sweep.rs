//! The conntrack sweep: reads both tables with batched lookups, asks
//! [`super::plan`] what expired, deletes it with batched deletes. It runs
//! on a thread of its own with its own map handles (opened from the pins),
//! so a large table never stalls the daemon's loop, DNS or gossip.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use aya::maps::MapData;
use mesh_common::{
    ct::{CtEntry, CtKey},
    maps,
};
use tracing::warn;

use super::{FlowState, Timeouts, plan};
use crate::dataplane::{batch, clock::Clock};

/// Elements per batched lookup.
const CHUNK: usize = 4096;

/// The sweep's figures, for /metrics.
#[derive(Debug, Default)]
pub struct SweepStats {
    pub runs: AtomicU64,
    pub errors: AtomicU64,
    /// Entries deleted (two per expired pair).
    pub deleted: AtomicU64,
    /// Flows expired, by [`FlowState::ALL`] index.
    pub expired: [AtomicU64; FlowState::ALL.len()],
    /// Entries in the confirmed and the new table at the last sweep.
    pub entries: [AtomicU64; 2],
    /// Duration of the last sweep and of all sweeps (µs).
    pub last_micros: AtomicU64,
    pub total_micros: AtomicU64,
}

/// One sweep's result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub entries: [u64; 2],
    pub deleted: u64,
    pub expired: Vec<(FlowState, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("opening {name}: {source}")]
    Open {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{name}: {source}")]
    Io {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The two conntrack tables, opened from their pins.
pub struct Sweeper {
    tables: [(&'static str, MapData); 2],
    /// The clock the entries carry.
    clock: Clock,
    pub timeouts: Timeouts,
}

impl Sweeper {
    pub fn open(dir: &Path, timeouts: Timeouts) -> Result<Self, SweepError> {
        let open = |name: &'static str| {
            MapData::from_pin(dir.join(name)).map_err(|source| SweepError::Open { name, source })
        };
        Ok(Sweeper {
            tables: [
                (maps::CONNTRACK.name, open(maps::CONNTRACK.name)?),
                (maps::CONNTRACK_NEW.name, open(maps::CONNTRACK_NEW.name)?),
            ],
            clock: Clock::open(dir),
            timeouts,
        })
    }

    /// One sweep of both tables.
    pub fn sweep(&self) -> Result<Report, SweepError> {
        let mut report = Report::default();
        let mut expired = std::collections::BTreeMap::<FlowState, u64>::new();
        for (i, (name, map)) in self.tables.iter().enumerate() {
            let io = |source| SweepError::Io { name, source };
            let entries: Vec<(CtKey, CtEntry)> = batch::lookup_all(map, CHUNK).map_err(io)?;
            report.entries[i] = entries.len() as u64;
            let p = plan(&entries, i == 1, self.clock.now_ns(), &self.timeouts);
            report.deleted += batch::delete(map, &p.delete).map_err(io)? as u64;
            for (state, n) in p.expired {
                *expired.entry(state).or_default() += n;
            }
        }
        report.expired = expired.into_iter().collect();
        Ok(report)
    }

    /// Sweeps and records the figures in `stats`.
    pub fn sweep_counted(&self, stats: &SweepStats) {
        let start = Instant::now();
        match self.sweep() {
            Ok(r) => {
                stats.deleted.fetch_add(r.deleted, Relaxed);
                for (state, n) in r.expired {
                    if let Some(i) = FlowState::ALL.iter().position(|s| *s == state) {
                        stats.expired[i].fetch_add(n, Relaxed);
                    }
                }
                for (slot, n) in stats.entries.iter().zip(r.entries) {
                    slot.store(n, Relaxed);
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Relaxed);
                warn!(error = %e, "conntrack sweep failed");
            }
        }
        let us = start.elapsed().as_micros() as u64;
        stats.last_micros.store(us, Relaxed);
        stats.total_micros.fetch_add(us, Relaxed);
        stats.runs.fetch_add(1, Relaxed);
    }
}

/// Sweeps every `interval` on a thread of its own, for as long as the
/// process lives.
pub fn spawn(sweeper: Sweeper, interval: Duration) -> std::io::Result<Arc<SweepStats>> {
    let stats = Arc::new(SweepStats::default());
    let shared = stats.clone();
    std::thread::Builder::new()
        .name("ct-sweep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                sweeper.sweep_counted(&shared);
            }
        })?;
    Ok(stats)
}

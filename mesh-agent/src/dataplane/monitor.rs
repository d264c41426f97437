//! The monitor's maps (`mesh_common::monitor`): the events' ring buffer
//! and the per-CPU slots whose `on` word tells the programs someone
//! listens.

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray, PerCpuValues, RingBuf},
    util::nr_cpus,
};
use mesh_common::{
    maps,
    monitor::{Budget, Event},
};

use super::lb::MapsError;

fn err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

pub struct MonitorMaps {
    pub events: RingBuf<MapData>,
    slots: PerCpuArray<MapData, Budget>,
}

impl MonitorMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let events = ebpf
            .take_map(maps::EVENTS.name)
            .ok_or(MapsError::Missing(maps::EVENTS.name))?;
        let slots = ebpf
            .take_map(maps::MONITOR.name)
            .ok_or(MapsError::Missing(maps::MONITOR.name))?;
        Ok(MonitorMaps {
            events: events.try_into().map_err(err(maps::EVENTS.name))?,
            slots: slots.try_into().map_err(err(maps::MONITOR.name))?,
        })
    }

    /// Tells the programs on every CPU whether someone listens; the rate
    /// limits start afresh.
    pub fn set_on(&mut self, on: bool) -> Result<(), MapsError> {
        let n = nr_cpus().map_err(|(_, e)| MapsError::Map {
            name: maps::MONITOR.name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        let lost = self.lost();
        let slot = Budget {
            on: on as u32,
            // The losses so far are kept on CPU 0.
            ..Budget::default()
        };
        let mut values = vec![slot; n];
        if let Some(v) = values.first_mut() {
            v.lost = lost;
        }
        let values = PerCpuValues::try_from(values).map_err(|e| MapsError::Map {
            name: maps::MONITOR.name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            }),
        })?;
        self.slots
            .set(0, values, 0)
            .map_err(err(maps::MONITOR.name))
    }

    /// Events not written, over every CPU: over the rate or the ring full.
    pub fn lost(&self) -> u64 {
        self.slots
            .get(&0, 0)
            .map(|v| v.iter().map(|b| b.lost).sum())
            .unwrap_or(0)
    }

    /// The next event in the ring, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        let item = self.events.next()?;
        (item.len() >= size_of::<Event>())
            // SAFETY: the programs write whole Events; read unaligned.
            .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) })
    }
}

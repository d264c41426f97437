//! Watching the hand-off of GRO-merged VXLAN to `mesh-vxlan`
//! (`crate::vxlandev`). A handed-over packet goes up the host's stack to the
//! device's socket, so the host's firewall sees it (INPUT, UDP to the
//! VXLAN port): one that drops it there would drop every merged packet, and
//! bulk transfers through the tunnel would crawl. When the device's socket
//! took in fewer than half of what was handed over in a period, the agent takes
//! the device down (no socket, so GRO no longer merges the tunnel's
//! packets and nothing is handed over), says why, and mesh decapsulates
//! everything itself, as without the device.

use mesh_common::{maps, stats::Stat};
use tracing::{debug, info, warn};

use super::Daemon;

/// How often the counters are looked at.
pub(super) const EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Packets handed over within one period below which nothing is judged (a
/// TCP flow whose merged packets are lost backs off to a trickle).
const MIN_HANDED: u64 = 16;

/// The counters seen at the last look, and whether the hand-off was
/// refused (the device taken down; it stays down until the agent
/// restarts).
#[derive(Debug, Default)]
pub(super) struct HandoffWatch {
    last: Option<(u64, u64)>,
    pub refused: bool,
}

impl HandoffWatch {
    /// With the counters now (packets handed over, packets the device took
    /// in): the period's figures if the device took in fewer than half of
    /// what was handed over. The device's own counter, not what came back
    /// out of it: its GRO cell may merge two packets into one.
    pub fn lost(&mut self, handed: u64, taken: u64) -> Option<(u64, u64)> {
        let (h0, t0) = self.last.replace((handed, taken))?;
        let (dh, dt) = (handed.saturating_sub(h0), taken.saturating_sub(t0));
        (dh >= MIN_HANDED && dt.saturating_mul(2) < dh).then_some((dh, dt))
    }
}

impl Daemon {
    /// One look at the hand-off counters (the diagnosis tick); refuses the
    /// hand-off when what was handed over was lost.
    pub(super) fn watch_handoff(&mut self) {
        if self.handoff.refused {
            return;
        }
        let Some((handed, back, unmarked)) = self.handoff_counters() else {
            return;
        };
        let device = match crate::vxlandev::counters() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "reading {}'s counters", crate::vxlandev::NAME);
                return;
            }
        };
        self.node_status(|n| {
            n.handoff = Some(mesh_core::status::Handoff {
                handed,
                device_rx: device.rx_packets,
                device_dropped: device.rx_dropped,
                device_errors: device.rx_errors,
                back,
                unmarked,
            })
        });
        let Some((dh, taken)) = self.handoff.lost(handed, device.rx_packets) else {
            return;
        };
        let Ok(mut local) = self.overlay.local.get(&0, 0) else {
            return;
        };
        if local.vxlan_device == 0 {
            return;
        }
        local.vxlan_device = 0;
        if let Err(e) = self.overlay.set_local(&local) {
            warn!(error = %e, "could not stop handing merged VXLAN to mesh-vxlan");
            return;
        }
        self.handoff.refused = true;
        let port = u16::from_be(local.vxlan_port_be());
        self.set_tunnel_gro(format!(
            "OFF: merged packets handed to {} did not arrive ({taken} of {dh}): a host firewall \
             dropping UDP {port} in INPUT? every tunnel packet is decapsulated unmerged until \
             the agent restarts",
            crate::vxlandev::NAME
        ));
        warn!(
            handed = dh,
            arrived = taken,
            port,
            "merged VXLAN handed to {} did not reach it: does the host's firewall drop UDP {port} \
             in INPUT? The device is taken down and mesh decapsulates every tunnel packet itself, \
             unmerged (slower on NICs without UDP tunnel offloads); accept UDP {port} from the \
             cluster's hosts and restart the agent to have GRO for the tunnel again",
            crate::vxlandev::NAME
        );
        match crate::vxlandev::down() {
            Ok(()) => info!(iface = crate::vxlandev::NAME, "VXLAN device down"),
            Err(e) => warn!(error = %e, "could not take the VXLAN device down"),
        }
    }

    /// The counters of packets handed to mesh-vxlan, taken back from it
    /// and dropped there unmarked, summed over CPUs.
    fn handoff_counters(&self) -> Option<(u64, u64, u64)> {
        let map = self.ebpf.map(maps::STATS.name)?;
        let map: aya::maps::PerCpuArray<&aya::maps::MapData, u64> = map.try_into().ok()?;
        let sum = |s: Stat| -> Option<u64> { Some(map.get(&s.index(), 0).ok()?.iter().sum()) };
        Some((
            sum(Stat::VxlanHandoff)?,
            sum(Stat::VxlanDeviceIn)?,
            sum(Stat::VxlanDeviceUnmarked)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_a_period_only_with_enough_handed_over() {
        let mut w = HandoffWatch::default();
        assert_eq!(w.lost(1000, 0), None, "the first look only remembers");
        assert_eq!(w.lost(1000 + MIN_HANDED - 1, 0), None, "too few to judge");
        assert_eq!(w.lost(2000, 1000), None, "the device took as many");
        assert_eq!(w.lost(3000, 1600), None, "it took most");
        assert_eq!(w.lost(4000, 1700), Some((1000, 100)), "most were lost");
    }

    #[test]
    fn counters_that_restart_lower_are_no_loss() {
        let mut w = HandoffWatch::default();
        w.lost(5000, 5000);
        assert_eq!(w.lost(10, 10), None);
    }
}

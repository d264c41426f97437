//! The overlay maps: this node's settings and the other nodes.

use std::collections::BTreeMap;

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use mesh_common::{
    lb::Config,
    maps,
    tunnel::{
        Bridge, LocalEndpoint, LocalNode, NET16_NODES, Node, VETH_PER_PACKET, VETH_PUBLISHED,
        VethSrc, net16,
    },
};

use super::{clock::Calibration, lb::MapsError};
use crate::reconcile::table::KeyedWriter;

pub struct OverlayMaps {
    pub local: Array<MapData, LocalNode>,
    pub nodes: HashMap<MapData, u32, Node>,
    pub local_eps: HashMap<MapData, u32, LocalEndpoint>,
    /// Underlay address -> /24 of every other node: VXLAN is accepted only
    /// from these.
    pub peers: HashMap<MapData, u32, u32>,
    /// Veth ifindex -> its container's address and network
    /// (anti-spoofing fast path, isolation).
    pub veth_src: Array<MapData, VethSrc>,
    /// By /16 (`net16`): the overlay network there besides `mesh` (its
    /// VNI) and whether nodes' addresses are there (`NET16_NODES`).
    pub nets: Array<MapData, u32>,
    /// Settings of the whole data plane.
    pub config: Array<MapData, Config>,
    /// Docker's other bridge networks, by bridge ifindex.
    pub bridges: HashMap<MapData, u32, Bridge>,
    /// Every service's VIP (a ping to one is answered).
    pub vips: HashMap<MapData, u32, u32>,
}

fn err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

impl OverlayMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut take =
            |def: &maps::MapDef| ebpf.take_map(def.name).ok_or(MapsError::Missing(def.name));
        let (local, nodes, eps, peers, veth_src, config, bridges, vips, nets) = (
            take(&maps::LOCAL_NODE)?,
            take(&maps::NODES)?,
            take(&maps::LOCAL_EPS)?,
            take(&maps::PEERS)?,
            take(&maps::VETH_SRC)?,
            take(&maps::CONFIG)?,
            take(&maps::BRIDGES)?,
            take(&maps::VIPS)?,
            take(&maps::NETS)?,
        );
        Ok(OverlayMaps {
            local: local.try_into().map_err(err(maps::LOCAL_NODE.name))?,
            nodes: nodes.try_into().map_err(err(maps::NODES.name))?,
            local_eps: eps.try_into().map_err(err(maps::LOCAL_EPS.name))?,
            peers: peers.try_into().map_err(err(maps::PEERS.name))?,
            veth_src: veth_src.try_into().map_err(err(maps::VETH_SRC.name))?,
            config: config.try_into().map_err(err(maps::CONFIG.name))?,
            bridges: bridges.try_into().map_err(err(maps::BRIDGES.name))?,
            vips: vips.try_into().map_err(err(maps::VIPS.name))?,
            nets: nets.try_into().map_err(err(maps::NETS.name))?,
        })
    }

    /// The written /16 slots as the kernel has them (a restarted agent
    /// starts here).
    pub fn read_nets(&self) -> Result<BTreeMap<u32, u32>, MapsError> {
        let mut out = BTreeMap::new();
        for (i, v) in self.nets.iter().enumerate() {
            let v = v.map_err(err(maps::NETS.name))?;
            if v != 0 {
                out.insert(i as u32, v);
            }
        }
        Ok(out)
    }

    /// A network's /16 (its base address, network order) and VNI, as the
    /// agent writes them (tests and labs without an agent).
    pub fn set_net(&mut self, base_be: u32, vni: u32) -> Result<(), MapsError> {
        let slot = net16(base_be);
        let old = self.nets.get(&slot, 0).map_err(err(maps::NETS.name))?;
        self.nets
            .set(slot, old & NET16_NODES | vni, 0)
            .map_err(err(maps::NETS.name))
    }

    /// The VIPs that answer pings, as the kernel has them.
    pub fn read_vips(&self) -> Result<BTreeMap<u32, u32>, MapsError> {
        read_all(&self.vips).map_err(err(maps::VIPS.name))
    }

    /// Docker's other bridge networks as the kernel has them.
    pub fn read_bridges(&self) -> Result<BTreeMap<u32, Bridge>, MapsError> {
        read_all(&self.bridges).map_err(err(maps::BRIDGES.name))
    }

    /// The accepted VXLAN sources as the kernel has them.
    pub fn read_peers(&self) -> Result<BTreeMap<u32, u32>, MapsError> {
        read_all(&self.peers).map_err(err(maps::PEERS.name))
    }

    /// A node's underlay address (network order) as a VXLAN source, with
    /// its /24.
    pub fn set_peer(&mut self, ip_be: u32, subnet_be: u32) -> Result<(), MapsError> {
        KeyedWriter::set(&mut Keyed(&mut self.peers), &ip_be, &subnet_be)
            .map_err(err(maps::PEERS.name))?;
        let slot = net16(ip_be);
        let old = self.nets.get(&slot, 0).map_err(err(maps::NETS.name))?;
        self.nets
            .set(slot, old | NET16_NODES, 0)
            .map_err(err(maps::NETS.name))
    }

    /// This node's settings; `enabled` set turns the overlay on.
    pub fn set_local(&mut self, l: &LocalNode) -> Result<(), MapsError> {
        self.local.set(0, l, 0).map_err(err(maps::LOCAL_NODE.name))
    }

    /// Another node, by its /24 (`subnet_be`: network order, host bits 0).
    pub fn set_node(&mut self, subnet_be: u32, n: &Node) -> Result<(), MapsError> {
        KeyedWriter::set(&mut Keyed(&mut self.nodes), &subnet_be, n).map_err(err(maps::NODES.name))
    }

    /// A container on this node (by address, network order).
    pub fn set_local_ep(&mut self, ip_be: u32, ep: &LocalEndpoint) -> Result<(), MapsError> {
        KeyedWriter::set(&mut Keyed(&mut self.local_eps), &ip_be, ep)
            .map_err(err(maps::LOCAL_EPS.name))
    }

    /// The data plane's settings; conntrack's clock in them stays as it
    /// is ([`Self::set_clock`]).
    pub fn set_config(&mut self, c: &Config) -> Result<(), MapsError> {
        let mut c = *c;
        if let Some(cal) = self.clock() {
            cal.set(&mut c);
        }
        self.config.set(0, c, 0).map_err(err(maps::CONFIG.name))
    }

    /// Conntrack's clock as CONFIG has it (None: not measured).
    pub fn clock(&self) -> Option<Calibration> {
        let c = self.config.get(&0, 0).ok()?;
        Calibration::of(&c)
    }

    /// Sets conntrack's clock, the other settings kept.
    pub fn set_clock(&mut self, cal: Calibration) -> Result<(), MapsError> {
        let mut c = self.config.get(&0, 0).map_err(err(maps::CONFIG.name))?;
        cal.set(&mut c);
        self.config.set(0, c, 0).map_err(err(maps::CONFIG.name))
    }

    /// The widest mask of Docker's other bridges, the other settings kept.
    pub fn set_bridge_mask(&mut self, mask_be: u32) -> Result<(), MapsError> {
        let mut c = self.config.get(&0, 0).map_err(err(maps::CONFIG.name))?;
        c.bridge_mask_be = mask_be;
        self.set_config(&c)
    }

    /// Veth `ifindex`'s container has address `v.ip_be` on network `v.vni`
    /// (the anti-spoofing fast path; indexes beyond the array are left to
    /// `MESH_LOCAL_EPS`).
    pub fn set_veth_src(&mut self, ifindex: u32, v: &VethSrc) -> Result<(), MapsError> {
        KeyedWriter::set(&mut Keyed(&mut self.veth_src), &ifindex, v)
            .map_err(err(maps::VETH_SRC.name))
    }

    /// The written slots of the veth array (a restarted agent starts here).
    pub fn read_veth_src(&self) -> Result<BTreeMap<u32, VethSrc>, MapsError> {
        let mut out = BTreeMap::new();
        for (i, v) in self.veth_src.iter().enumerate() {
            let v = v.map_err(err(maps::VETH_SRC.name))?;
            if v.ip_be != 0 {
                out.insert(i as u32, v);
            }
        }
        Ok(out)
    }

    /// The node table as the kernel has it (a restarted agent starts here).
    pub fn read_nodes(&self) -> Result<BTreeMap<u32, Node>, MapsError> {
        read_all(&self.nodes).map_err(err(maps::NODES.name))
    }

    /// The local endpoints as the kernel has them.
    pub fn read_local_eps(&self) -> Result<BTreeMap<u32, LocalEndpoint>, MapsError> {
        read_all(&self.local_eps).map_err(err(maps::LOCAL_EPS.name))
    }
}

fn read_all<K: Pod + Ord, V: Pod>(m: &HashMap<MapData, K, V>) -> Result<BTreeMap<K, V>, MapError> {
    m.iter().collect()
}

/// An agent-written map as a keyed table for the generic reconciler
/// (`reconcile::table`, which knows no kernel maps).
pub struct Keyed<'a, M>(pub &'a mut M);

/// An agent-written array is a keyed table too: removing a slot writes
/// zeros.
impl<V: Pod + Default> KeyedWriter<u32, V> for Keyed<'_, Array<MapData, V>> {
    type Error = MapError;
    fn set(&mut self, key: &u32, value: &V) -> Result<(), MapError> {
        self.0.set(*key, value, 0)
    }
    fn remove(&mut self, key: &u32) -> Result<(), MapError> {
        self.0.set(*key, V::default(), 0)
    }
}

/// The /16 array's contents: every served network's VNI at its /16, and
/// the flag on the /16 of each node's underlay address (`underlays`).
pub fn net16_slots(
    nets: impl IntoIterator<Item = (u32, u32)>,
    underlays: impl IntoIterator<Item = u32>,
) -> BTreeMap<u32, u32> {
    let mut out: BTreeMap<u32, u32> = nets
        .into_iter()
        .map(|(base_be, vni)| (net16(base_be), vni))
        .collect();
    for ip_be in underlays {
        *out.entry(net16(ip_be)).or_default() |= NET16_NODES;
    }
    out
}

/// The veth array's contents for `local_eps` (container address ->
/// endpoint): one slot per veth within the array, with the VNI of the
/// address's network (`vni_of`) and `VETH_PUBLISHED` for a backend of a
/// published port (`published`). The flag stays while the same container
/// holds the slot (`written`): its routing-mesh flows outlive its service's
/// ports; so does `VETH_PER_PACKET`, which the data plane sets (read back at
/// the agent's start).
pub fn veth_src(
    local_eps: &BTreeMap<u32, LocalEndpoint>,
    vni_of: impl Fn(u32) -> u32,
    published: impl Fn(u32) -> bool,
    written: &BTreeMap<u32, VethSrc>,
) -> BTreeMap<u32, VethSrc> {
    local_eps
        .iter()
        .filter(|(ip, ep)| ep.ifindex != 0 && ep.ifindex < maps::VETH_SLOTS && **ip != 0)
        .map(|(&ip_be, ep)| {
            let was = written
                .get(&ep.ifindex)
                .filter(|w| w.ip_be == ip_be)
                .map_or(0, |w| w.flags & (VETH_PUBLISHED | VETH_PER_PACKET));
            let flags = if published(ip_be) {
                was | VETH_PUBLISHED
            } else {
                was
            };
            (
                ep.ifindex,
                VethSrc {
                    ip_be,
                    vni: vni_of(ip_be),
                    flags,
                },
            )
        })
        .collect()
}

/// Agent-written hash maps are keyed tables for the generic reconciler.
impl<K: Pod + Ord, V: Pod> KeyedWriter<K, V> for Keyed<'_, HashMap<MapData, K, V>> {
    type Error = MapError;
    fn set(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.0.insert(key, value, 0)
    }
    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        match self.0.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_veth_array_indexes_local_endpoints_by_veth() {
        let ep = |ifindex| LocalEndpoint {
            ifindex,
            ..Default::default()
        };
        let eps = BTreeMap::from([
            (10, ep(7)),
            (11, ep(8)),
            // Beyond the array: left to MESH_LOCAL_EPS.
            (12, ep(maps::VETH_SLOTS)),
            // No veth (yet).
            (13, ep(0)),
        ]);
        let v = |ip_be, flags| VethSrc {
            ip_be,
            vni: 42,
            flags,
        };
        let none = BTreeMap::new();
        assert_eq!(
            veth_src(&eps, |_| 42, |_| false, &none),
            BTreeMap::from([(7, v(10, 0)), (8, v(11, 0))])
        );
        // 10 backs a published port.
        let written = veth_src(&eps, |_| 42, |ip| ip == 10, &none);
        assert_eq!(
            written,
            BTreeMap::from([(7, v(10, VETH_PUBLISHED)), (8, v(11, 0))])
        );
        // Its port is gone: the flag stays while 10 holds veth 7.
        assert_eq!(veth_src(&eps, |_| 42, |_| false, &written), written);
        // Another container on veth 7: no flag.
        let other = BTreeMap::from([(14, ep(7))]);
        assert_eq!(
            veth_src(&other, |_| 42, |_| false, &written),
            BTreeMap::from([(7, v(14, 0))])
        );
        // The data plane marked 11 as a per-packet flow's backend (read
        // back at a start): kept while 11 holds veth 8, with a published
        // port too.
        let read = BTreeMap::from([(8, v(11, VETH_PER_PACKET))]);
        assert_eq!(
            veth_src(&eps, |_| 42, |ip| ip == 11, &read)[&8],
            v(11, VETH_PER_PACKET | VETH_PUBLISHED)
        );
        assert_eq!(
            veth_src(&other, |_| 42, |_| false, &read),
            BTreeMap::from([(7, v(14, 0))])
        );
    }
}

//! The overlay maps: this node's settings and the other nodes.

use std::collections::BTreeMap;

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use mesh_common::{
    lb::Config,
    maps,
    tunnel::{Bridge, LocalEndpoint, LocalNode, Node, VethSrc},
};

use super::lb::MapsError;
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
    /// The overlay networks besides `mesh`: /16 -> VNI.
    pub nets: HashMap<MapData, u32, u32>,
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

    /// The overlay networks as the kernel has them.
    pub fn read_nets(&self) -> Result<BTreeMap<u32, u32>, MapsError> {
        read_all(&self.nets).map_err(err(maps::NETS.name))
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
            .map_err(err(maps::PEERS.name))
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

    /// The data plane's settings.
    pub fn set_config(&mut self, c: &Config) -> Result<(), MapsError> {
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

/// The veth array is a keyed table too: removing a slot writes zeros.
impl KeyedWriter<u32, VethSrc> for Keyed<'_, Array<MapData, VethSrc>> {
    type Error = MapError;
    fn set(&mut self, key: &u32, value: &VethSrc) -> Result<(), MapError> {
        self.0.set(*key, value, 0)
    }
    fn remove(&mut self, key: &u32) -> Result<(), MapError> {
        self.0.set(*key, VethSrc::default(), 0)
    }
}

/// The veth array's contents for `local_eps` (container address ->
/// endpoint): one slot per veth within the array, with the VNI of the
/// address's network (`vni_of`).
pub fn veth_src(
    local_eps: &BTreeMap<u32, LocalEndpoint>,
    vni_of: impl Fn(u32) -> u32,
) -> BTreeMap<u32, VethSrc> {
    local_eps
        .iter()
        .filter(|(ip, ep)| ep.ifindex != 0 && ep.ifindex < maps::VETH_SLOTS && **ip != 0)
        .map(|(ip, ep)| {
            (
                ep.ifindex,
                VethSrc {
                    ip_be: *ip,
                    vni: vni_of(*ip),
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
        let v = |ip_be| VethSrc { ip_be, vni: 42 };
        assert_eq!(
            veth_src(&eps, |_| 42),
            BTreeMap::from([(7, v(10)), (8, v(11))])
        );
    }
}

//! The overlay maps: this node's settings and the other nodes.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError},
};
use mesh_common::{
    maps,
    tunnel::{LocalEndpoint, LocalNode, Node},
};

use super::lb::MapsError;

pub struct OverlayMaps {
    pub local: Array<MapData, LocalNode>,
    pub nodes: HashMap<MapData, u32, Node>,
    pub local_eps: HashMap<MapData, u32, LocalEndpoint>,
}

fn err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

impl OverlayMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let local = ebpf
            .take_map(maps::LOCAL_NODE.name)
            .ok_or(MapsError::Missing(maps::LOCAL_NODE.name))?;
        let nodes = ebpf
            .take_map(maps::NODES.name)
            .ok_or(MapsError::Missing(maps::NODES.name))?;
        let eps = ebpf
            .take_map(maps::LOCAL_EPS.name)
            .ok_or(MapsError::Missing(maps::LOCAL_EPS.name))?;
        Ok(OverlayMaps {
            local: local.try_into().map_err(err(maps::LOCAL_NODE.name))?,
            nodes: nodes.try_into().map_err(err(maps::NODES.name))?,
            local_eps: eps.try_into().map_err(err(maps::LOCAL_EPS.name))?,
        })
    }

    /// This node's settings; `enabled` set turns the overlay on.
    pub fn set_local(&mut self, l: &LocalNode) -> Result<(), MapsError> {
        self.local.set(0, l, 0).map_err(err(maps::LOCAL_NODE.name))
    }

    /// Another node, by its /24 (`subnet_be`: network order, host bits 0).
    pub fn set_node(&mut self, subnet_be: u32, n: &Node) -> Result<(), MapsError> {
        self.nodes
            .insert(subnet_be, n, 0)
            .map_err(err(maps::NODES.name))
    }

    pub fn remove_node(&mut self, subnet_be: u32) -> Result<(), MapsError> {
        match self.nodes.remove(&subnet_be) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::NODES.name)(e)),
        }
    }

    /// A container on this node (by address, network order).
    pub fn set_local_ep(&mut self, ip_be: u32, ep: &LocalEndpoint) -> Result<(), MapsError> {
        self.local_eps
            .insert(ip_be, ep, 0)
            .map_err(err(maps::LOCAL_EPS.name))
    }

    pub fn remove_local_ep(&mut self, ip_be: u32) -> Result<(), MapsError> {
        match self.local_eps.remove(&ip_be) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(maps::LOCAL_EPS.name)(e)),
        }
    }
}

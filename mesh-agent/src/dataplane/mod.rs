//! The eBPF data plane: the embedded object, loading it, and its maps.

pub mod batch;
pub mod clock;
pub mod layout;
pub mod lb;
pub mod links;
pub mod monitor;
pub mod overlay;
mod ring;
pub mod sockets;
pub mod stats;

use mesh_common::maps::{MapDef, MapKind};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp},
};

/// The eBPF object built by build.rs from `mesh-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Program names in [`OBJECT`].
pub mod progs {
    /// XDP on the underlay NIC.
    pub const XDP_UNDERLAY: &str = "mesh_xdp_underlay";
    /// TC ingress on a container's host-side veth (leaving the container).
    pub const TC_FROM_CONTAINER: &str = "mesh_tc_from_container";
    /// TC egress on a container's host-side veth (entering the container).
    pub const TC_TO_CONTAINER: &str = "mesh_tc_to_container";
    /// TC ingress on the underlay NIC (decapsulated traffic to local containers).
    pub const TC_UNDERLAY_IN: &str = "mesh_tc_underlay_in";
    /// TC ingress on the bridge of another Docker network (its containers'
    /// calls to published ports).
    pub const TC_BRIDGE_IN: &str = "mesh_tc_bridge_in";
    /// TC egress on the host link (`mesh-host`): the host's own packets
    /// for other nodes' /24s, tunnelled.
    pub const TC_HOST_OUT: &str = "mesh_tc_host_out";
    /// TC ingress on the WireGuard device (`mesh-wg`): the tunnel's
    /// decrypted VXLAN, decapsulated.
    pub const TC_WG_IN: &str = "mesh_tc_wg_in";
    /// TC ingress on the kernel's VXLAN device (`mesh-vxlan`): the
    /// packets GRO merged, decapsulated by the kernel, handed on.
    pub const TC_VXLAN_IN: &str = "mesh_tc_vxlan_in";
    /// Never attached: conntrack's clock (`clock.rs`), run by the agent.
    pub const CLOCK: &str = "mesh_clock";
    /// cgroup connect4: socket-level balancing of the host's own connects.
    pub const SOCK_CONNECT4: &str = "mesh_sock_connect4";
    /// cgroup getpeername4: such a socket's peer as it asked for it.
    pub const SOCK_GETPEERNAME4: &str = "mesh_sock_getpeername4";
    /// cgroup sendmsg4: the host's unconnected UDP datagrams, balanced.
    pub const SOCK_SENDMSG4: &str = "mesh_sock_sendmsg4";
    /// cgroup recvmsg4: their answers, from the address asked for.
    pub const SOCK_RECVMSG4: &str = "mesh_sock_recvmsg4";
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{dir}: {source} (is bpffs mounted at /sys/fs/bpf?)")]
    Dir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("checking pinned maps: {0}")]
    Layout(#[from] layout::LayoutError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// Loads the embedded object into the kernel (maps created, programs not yet
/// verified or attached).
pub fn load() -> Result<Ebpf, LoadError> {
    load_with(&[])
}

/// As [`load`], with map sizes overridden by name.
pub fn load_with(sizes: &[(&'static str, u32)]) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for (name, size) in sizes {
        loader.map_max_entries(name, *size);
    }
    Ok(loader.load(OBJECT)?)
}

/// Loads the object with every pinned map of the inventory
/// ([`mesh_common::maps::ALL`]) pinned under `dir`: maps an earlier run
/// pinned there are reused as they are (nothing is flushed) when their
/// shape is this build's; pins of another shape (an upgrade changed the
/// layout, or `sizes` changed) are retired first and returned; missing
/// maps are created and pinned. `sizes` overrides max_entries by map name.
pub fn load_pinned(
    dir: &std::path::Path,
    sizes: &[(&'static str, u32)],
) -> Result<(Ebpf, Vec<layout::Retired>), LoadError> {
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    let retired = layout::retire_stale_pins(dir, &layout::object_shapes(OBJECT, sizes)?)?;
    let paths: Vec<(&'static str, std::path::PathBuf)> =
        pinned_maps().map(|d| (d.name, dir.join(d.name))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, size) in sizes {
        loader.map_max_entries(name, *size);
    }
    Ok((loader.load(OBJECT)?, retired))
}

/// The inventory's maps that are pinned.
pub fn pinned_maps() -> impl Iterator<Item = &'static MapDef> {
    mesh_common::maps::ALL.iter().filter(|d| d.pinned)
}

/// Pins every pinned map of the inventory under `dir` (created if
/// missing), replacing stale pins. For an object loaded with [`load`].
pub fn pin_maps(ebpf: &Ebpf, dir: &std::path::Path) -> Result<(), PinError> {
    std::fs::create_dir_all(dir).map_err(|source| PinError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    for def in pinned_maps() {
        let name = def.name;
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| PinError::Dir {
                dir: path.clone(),
                source,
            })?;
        }
        ebpf.map(name)
            .ok_or(PinError::Missing(name))?
            .pin(&path)
            .map_err(|source| PinError::Pin { name, source })?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{dir}: {source} (is bpffs mounted at /sys/fs/bpf?)")]
    Dir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("pinning {name}: {source}")]
    Pin {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
}

/// A map of the object checked against the inventory.
#[derive(Debug, PartialEq, Eq)]
pub enum InventoryError {
    /// The object has a map the inventory does not name.
    Unlisted(String),
    /// The inventory names a map the object lacks.
    Absent(&'static str),
    /// The object's map has another kind than the inventory says.
    Kind {
        name: &'static str,
        want: MapKind,
        got: String,
    },
}

impl std::fmt::Display for InventoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InventoryError::Unlisted(n) => write!(
                f,
                "map {n} is in the object but not in mesh_common::maps::ALL (add its row)"
            ),
            InventoryError::Absent(n) => {
                write!(f, "map {n} is in the inventory but not in the object")
            }
            InventoryError::Kind { name, want, got } => {
                write!(
                    f,
                    "map {name}: the inventory says {}, the object has {got}",
                    want.name()
                )
            }
        }
    }
}

/// Every disagreement between the object's maps (`(name, kind)`, as aya
/// reports them) and the inventory. Data sections (`.rodata`, `.bss`,
/// `.data`: load-time globals) are not maps of the data plane.
pub fn check_inventory<'a>(
    object: impl IntoIterator<Item = (&'a str, &'a aya::maps::Map)>,
) -> Vec<InventoryError> {
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    for (name, map) in object {
        if name.starts_with('.') {
            continue;
        }
        let Some(def) = mesh_common::maps::by_name(name) else {
            errors.push(InventoryError::Unlisted(name.to_owned()));
            continue;
        };
        seen.push(def.name);
        let ok = matches!(
            (def.kind, map),
            (MapKind::Array, aya::maps::Map::Array(_))
                | (MapKind::Hash, aya::maps::Map::HashMap(_))
                | (MapKind::LruHash, aya::maps::Map::LruHashMap(_))
                | (MapKind::PerCpuArray, aya::maps::Map::PerCpuArray(_))
                | (MapKind::ArrayOfMaps, aya::maps::Map::ArrayOfMaps(_))
                | (MapKind::RingBuf, aya::maps::Map::RingBuf(_))
        );
        if !ok {
            errors.push(InventoryError::Kind {
                name: def.name,
                want: def.kind,
                got: format!("{map:?}")
                    .split('(')
                    .next()
                    .unwrap_or("?")
                    .to_owned(),
            });
        }
    }
    for def in &mesh_common::maps::ALL {
        if !seen.contains(&def.name) {
            errors.push(InventoryError::Absent(def.name));
        }
    }
    errors
}

/// The XDP underlay program, verified.
pub fn xdp_underlay(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let name = progs::XDP_UNDERLAY;
    let prog: &mut Xdp = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

/// A TC program (one of the `progs::TC_*`), verified.
pub fn tc<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

/// A cgroup socket-address program (`progs::SOCK_*`), verified.
pub fn sock_addr<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::CgroupSockAddr, LoadError> {
    let prog: &mut aya::programs::CgroupSockAddr = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

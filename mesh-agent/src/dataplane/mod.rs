//! The eBPF data plane: the embedded object, loading it, and reading its maps.

pub mod stats;

use aya::{Ebpf, EbpfLoader};

/// The eBPF object built by build.rs from `mesh-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Program names in [`OBJECT`].
pub mod progs {
    /// XDP on the underlay NIC.
    pub const XDP_UNDERLAY: &str = "mesh_xdp_underlay";
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
}

/// Loads the embedded object into the kernel (maps created, programs not yet
/// verified or attached).
pub fn load() -> Result<Ebpf, LoadError> {
    Ok(EbpfLoader::new().load(OBJECT)?)
}

/// Loads (verifies) the XDP underlay program and returns it.
pub fn xdp_underlay(ebpf: &mut Ebpf) -> Result<&mut aya::programs::Xdp, LoadError> {
    let name = progs::XDP_UNDERLAY;
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

//! Pinned links on upgrade: a link pinned by an earlier agent keeps the
//! program that agent embedded. When that program is not the one this
//! agent embeds (another build: the program tags differ), the link is
//! switched to ours in one step (BPF_LINK_UPDATE), so traffic never sees
//! the hook empty; the maps, pinned separately, stay as they are.

use std::path::Path;

use aya::programs::{
    SchedClassifier, Xdp,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use tracing::info;

/// Why a pinned link could not be checked or replaced.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{path}: {source}")]
    Link {
        path: String,
        #[source]
        source: LinkError,
    },
    #[error("{path}: {source}")]
    Program {
        path: String,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// The pinned link at `pin` and the tag of the program it runs (None when
/// that program cannot be found).
fn running(pin: &Path) -> Result<(FdLink, Option<u64>), UpgradeError> {
    let path = pin.display().to_string();
    let link_err = |source| UpgradeError::Link {
        path: path.clone(),
        source,
    };
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(link_err)?);
    let prog_id = link.info().map_err(link_err)?.program_id();
    let tag = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .map(|p| p.tag());
    Ok((link, tag))
}

/// Switches the link pinned at `pin` to this build's program (tag `ours`)
/// if it runs another one, through `replace` (the program's
/// `attach_to_link`: BPF_LINK_UPDATE); whether it did.
fn upgrade<L: TryFrom<FdLink, Error = LinkError>>(
    pin: &Path,
    ours: u64,
    replace: impl FnOnce(L) -> Result<(), aya::programs::ProgramError>,
) -> Result<bool, UpgradeError> {
    let path = pin.display().to_string();
    let (link, tag) = running(pin)?;
    if tag == Some(ours) {
        return Ok(false);
    }
    let link = L::try_from(link).map_err(|source| UpgradeError::Link {
        path: path.clone(),
        source,
    })?;
    replace(link).map_err(|source| UpgradeError::Program {
        path: path.clone(),
        source,
    })?;
    info!(pin = %path, "pinned link switched to this build's program");
    Ok(true)
}

fn tag_of(
    info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
    pin: &Path,
) -> Result<u64, UpgradeError> {
    info.map(|i| i.tag())
        .map_err(|source| UpgradeError::Program {
            path: pin.display().to_string(),
            source,
        })
}

/// [`upgrade`] for a TC (tcx) link. The pin keeps the updated link; our
/// handle to it is dropped.
pub fn upgrade_tc(pin: &Path, prog: &mut SchedClassifier) -> Result<bool, UpgradeError> {
    let ours = tag_of(prog.info(), pin)?;
    upgrade(pin, ours, |link: SchedClassifierLink| {
        let id = prog.attach_to_link(link)?;
        prog.take_link(id).map(drop)
    })
}

/// [`upgrade`] for an XDP link.
pub fn upgrade_xdp(pin: &Path, prog: &mut Xdp) -> Result<bool, UpgradeError> {
    let ours = tag_of(prog.info(), pin)?;
    upgrade(pin, ours, |link: XdpLink| {
        let id = prog.attach_to_link(link)?;
        prog.take_link(id).map(drop)
    })
}

//! Pinned links on upgrade: a link pinned by an earlier agent keeps the
//! program that agent embedded. When that program is not the one this
//! agent loaded (another build: the program tags differ; or the same code
//! on other maps: a map whose layout changed was created anew, see
//! `layout.rs`), the link is switched to ours in one step
//! (BPF_LINK_UPDATE), so traffic never sees the hook empty; the maps,
//! pinned separately, stay as they are.

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

/// What identifies a loaded program for this purpose: its tag (a hash of
/// its instructions, map references left out) and the maps it uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub tag: u64,
    pub map_ids: Vec<u32>,
}

fn identity(info: &aya::programs::ProgramInfo) -> Result<Identity, aya::programs::ProgramError> {
    let mut map_ids = info.map_ids()?.unwrap_or_default();
    map_ids.sort_unstable();
    Ok(Identity {
        tag: info.tag(),
        map_ids,
    })
}

/// The pinned link at `pin` and the identity of the program it runs (None
/// when that program cannot be found).
fn running(pin: &Path) -> Result<(FdLink, Option<Identity>), UpgradeError> {
    let path = pin.display().to_string();
    let link_err = |source| UpgradeError::Link {
        path: path.clone(),
        source,
    };
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(link_err)?);
    let prog_id = link.info().map_err(link_err)?.program_id();
    let running = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .and_then(|p| identity(&p).ok());
    Ok((link, running))
}

/// Switches the link pinned at `pin` to this build's program (`ours`) if
/// it runs another one, through `replace` (the program's `attach_to_link`:
/// BPF_LINK_UPDATE); whether it did.
fn upgrade<L: TryFrom<FdLink, Error = LinkError>>(
    pin: &Path,
    ours: Identity,
    replace: impl FnOnce(L) -> Result<(), aya::programs::ProgramError>,
) -> Result<bool, UpgradeError> {
    let path = pin.display().to_string();
    let (link, running) = running(pin)?;
    if running.as_ref() == Some(&ours) {
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
    let why = match running {
        Some(r) if r.tag == ours.tag => "the same code on other maps",
        Some(_) => "another build's code",
        None => "a program that cannot be inspected",
    };
    info!(pin = %path, was = why, "pinned link switched to this build's program");
    Ok(true)
}

fn identity_of(
    info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
    pin: &Path,
) -> Result<Identity, UpgradeError> {
    info.and_then(|i| identity(&i))
        .map_err(|source| UpgradeError::Program {
            path: pin.display().to_string(),
            source,
        })
}

/// [`upgrade`] for a TC (tcx) link. The pin keeps the updated link; our
/// handle to it is dropped.
pub fn upgrade_tc(pin: &Path, prog: &mut SchedClassifier) -> Result<bool, UpgradeError> {
    let ours = identity_of(prog.info(), pin)?;
    upgrade(pin, ours, |link: SchedClassifierLink| {
        let id = prog.attach_to_link(link)?;
        prog.take_link(id).map(drop)
    })
}

/// [`upgrade`] for an XDP link.
pub fn upgrade_xdp(pin: &Path, prog: &mut Xdp) -> Result<bool, UpgradeError> {
    let ours = identity_of(prog.info(), pin)?;
    upgrade(pin, ours, |link: XdpLink| {
        let id = prog.attach_to_link(link)?;
        prog.take_link(id).map(drop)
    })
}

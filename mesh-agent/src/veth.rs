//! Container veths: which host-side interface belongs to a container, and
//! keeping the TC programs attached to it (links pinned in bpffs, so they
//! outlive the agent process).

use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        TcAttachType,
        links::{FdLink, LinkError},
    },
};
use tracing::{debug, info, warn};

use crate::dataplane::{self, progs};

/// The host-side ifindex of the container interface with `mac`, found
/// through the container's own sysfs (`/proc/PID/root/sys/class/net`):
/// a veth's `iflink` is its peer's ifindex.
pub fn host_ifindex(pid: u32, mac: [u8; 6]) -> io::Result<u32> {
    let want = mesh_common::mac::Mac(mac).to_string();
    let dir = PathBuf::from(format!("/proc/{pid}/root/sys/class/net"));
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let addr = std::fs::read_to_string(path.join("address")).unwrap_or_default();
        if addr.trim() == want {
            let iflink = std::fs::read_to_string(path.join("iflink"))?;
            return iflink
                .trim()
                .parse()
                .map_err(|_| io::Error::other(format!("bad iflink in {}", path.display())));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no interface with MAC {want} in {}", dir.display()),
    ))
}

/// The name of interface `ifindex` in this network namespace.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The pin name prefix of a Docker bridge's link (then its ifindex).
const BRIDGE_PIN: &str = "bridge_";

/// The pin name prefix of the host link's link (then its ifindex). Not
/// `tc_<number>`, which [`Attachments::sweep`] takes for a veth's.
const HOST_PIN: &str = "tc_hostlink_";
/// Pin prefix of the WireGuard device's program.
const WG_PIN: &str = "tc_wg_";
/// The pin of the VXLAN device's program, before its ifindex.
const VXLAN_PIN: &str = "tc_vxlan_";

/// TC attachments to container veths, pinned under `<bpffs>/links`.
pub struct Attachments {
    dir: PathBuf,
    /// Pins adopted and checked for this build's program in this run.
    checked: BTreeSet<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {0} does not exist")]
    NoInterface(u32),
    #[error("attaching to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of {iface}: {msg}")]
    Pin { iface: String, msg: String },
    #[error("{0}")]
    Load(#[from] dataplane::LoadError),
    #[error("{0}")]
    Upgrade(#[from] dataplane::links::UpgradeError),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
}

impl Attachments {
    pub fn new(bpffs_dir: &Path) -> Result<Self, AttachError> {
        let dir = bpffs_dir.join("links");
        std::fs::create_dir_all(&dir).map_err(|e| AttachError::Io(dir.clone(), e))?;
        Ok(Attachments {
            dir,
            checked: BTreeSet::new(),
        })
    }

    fn pin_path(&self, ifindex: u32, at: TcAttachType) -> PathBuf {
        let dir = if matches!(at, TcAttachType::Ingress) {
            "in"
        } else {
            "out"
        };
        self.dir.join(format!("tc_{ifindex}_{dir}"))
    }

    /// Makes sure both TC programs are attached to `ifindex`. Links pinned
    /// by an earlier agent run are kept as they are (adopted).
    pub fn ensure(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Result<bool, AttachError> {
        let iface = if_name(ifindex).ok_or(AttachError::NoInterface(ifindex))?;
        let mut attached = false;
        for (name, at) in [
            (progs::TC_FROM_CONTAINER, TcAttachType::Ingress),
            (progs::TC_TO_CONTAINER, TcAttachType::Egress),
        ] {
            let pin = self.pin_path(ifindex, at);
            attached |= self.attach_one(ebpf, &iface, name, at, pin)?;
        }
        if attached {
            info!(iface, ifindex, "TC programs attached");
        } else {
            debug!(iface, ifindex, "TC programs already attached (adopted)");
        }
        Ok(attached)
    }

    /// Makes sure the bridge program is attached (ingress) to the bridge
    /// of another Docker network, `ifindex`.
    pub fn ensure_bridge(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Result<bool, AttachError> {
        let iface = if_name(ifindex).ok_or(AttachError::NoInterface(ifindex))?;
        let pin = self.dir.join(format!("{BRIDGE_PIN}{ifindex}"));
        let attached = self.attach_one(
            ebpf,
            &iface,
            progs::TC_BRIDGE_IN,
            TcAttachType::Ingress,
            pin,
        )?;
        if attached {
            info!(iface, ifindex, "TC program attached to a Docker bridge");
        }
        Ok(attached)
    }

    /// Makes sure the host link's program is attached (egress) to the host
    /// link `ifindex` (`crate::hostlink`).
    pub fn ensure_host(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Result<bool, AttachError> {
        self.ensure_device(
            ebpf,
            ifindex,
            HOST_PIN,
            progs::TC_HOST_OUT,
            TcAttachType::Egress,
        )
    }

    /// Makes sure the WireGuard device's program is attached (ingress) to
    /// `ifindex` (`crate::wireguard`).
    pub fn ensure_wg(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Result<bool, AttachError> {
        self.ensure_device(
            ebpf,
            ifindex,
            WG_PIN,
            progs::TC_WG_IN,
            TcAttachType::Ingress,
        )
    }

    /// Makes sure the VXLAN device's program is attached (ingress) to
    /// `ifindex` (`crate::vxlandev`).
    pub fn ensure_vxlan(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Result<bool, AttachError> {
        self.ensure_device(
            ebpf,
            ifindex,
            VXLAN_PIN,
            progs::TC_VXLAN_IN,
            TcAttachType::Ingress,
        )
    }

    /// Makes sure `prog` is attached at `at` to the agent's own device
    /// `ifindex`, pinned as `prefix` and the ifindex; pins of an earlier
    /// device of the kind (another ifindex: the device was made anew) are
    /// removed.
    fn ensure_device(
        &mut self,
        ebpf: &mut Ebpf,
        ifindex: u32,
        prefix: &str,
        prog: &'static str,
        at: TcAttachType,
    ) -> Result<bool, AttachError> {
        let iface = if_name(ifindex).ok_or(AttachError::NoInterface(ifindex))?;
        let pin = self.dir.join(format!("{prefix}{ifindex}"));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && e.path() != pin {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let attached = self.attach_one(ebpf, &iface, prog, at, pin)?;
        if attached {
            info!(iface, ifindex, prog, "TC program attached");
        }
        Ok(attached)
    }

    /// Attaches program `name` to `iface` at `at`, pinned at `pin`; a pin
    /// left by an earlier run is adopted (once per run made sure it runs
    /// this build's program). Whether it attached anew.
    fn attach_one(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        name: &'static str,
        at: TcAttachType,
        pin: PathBuf,
    ) -> Result<bool, AttachError> {
        if pin.exists() {
            if self.checked.insert(pin.clone()) {
                let prog = dataplane::tc(ebpf, name)?;
                dataplane::links::upgrade_tc(&pin, prog)?;
            }
            return Ok(false);
        }
        let prog = dataplane::tc(ebpf, name)?;
        let attach_err = |source| AttachError::Attach {
            iface: iface.to_owned(),
            source,
        };
        let id = prog.attach(iface, at).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd: FdLink = link.try_into().map_err(|e: LinkError| AttachError::Pin {
            iface: iface.to_owned(),
            msg: e.to_string(),
        })?;
        // The pinned link keeps the program attached after we exit.
        fd.pin(&pin).map_err(|e| AttachError::Pin {
            iface: iface.to_owned(),
            msg: e.to_string(),
        })?;
        Ok(true)
    }

    /// Unpins the bridge links of bridges not in `live` (their networks
    /// are gone, or their interface was renumbered).
    pub fn sweep_bridges(&mut self, live: &BTreeSet<u32>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ifindex) = name
                .strip_prefix(BRIDGE_PIN)
                .and_then(|i| i.parse::<u32>().ok())
            else {
                continue;
            };
            if live.contains(&ifindex) {
                continue;
            }
            self.checked.remove(&e.path());
            match std::fs::remove_file(e.path()) {
                Ok(()) => info!(
                    ifindex,
                    "TC program detached from a Docker bridge that is gone"
                ),
                Err(err) => {
                    warn!(path = %e.path().display(), %err, "could not remove a stale link pin")
                }
            }
        }
    }

    /// Unpins links of veths not in `live` (their containers are gone).
    pub fn sweep(&self, live: &BTreeSet<u32>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ifindex: Option<u32> = name
                .strip_prefix("tc_")
                .and_then(|r| r.split('_').next())
                .and_then(|i| i.parse().ok());
            if let Some(ifindex) = ifindex
                && !live.contains(&ifindex)
            {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    warn!(path = %e.path().display(), %err, "could not remove a stale link pin");
                } else {
                    debug!(ifindex, "stale link pin removed");
                }
            }
        }
    }
}

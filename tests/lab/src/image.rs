//! The images the lab and the tests run, made locally (nothing is pulled):
//! directory trees imported FROM scratch.
//!
//! - the agent: `mesh-agent` and `meshctl` with exactly the shared
//!   libraries they load (`ldd`), and `/run/mesh` for its state;
//! - whoami, the test workload: the static whoami binary and Debian's static
//!   busybox for a shell (Docker's health checks run `/bin/sh -c`) and tools.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::cmd::Cmd;

/// The agent image every lab node and multi-host test runs.
pub const AGENT_IMAGE: &str = "mesh-agent:lab";
/// The whoami test image (entrypoint /whoami).
pub const WHOAMI_IMAGE: &str = "mesh-whoami:lab";

/// Busybox tools linked into the whoami image.
const TOOLS: [&str; 11] = [
    "sh", "nslookup", "cat", "sleep", "ping", "ip", "wget", "md5sum", "head", "dd", "nc",
];

/// The agent image's tree under `out`, from the binaries in `bin_dir`.
pub fn agent_tree(bin_dir: &Path, out: &Path) -> Result<PathBuf> {
    let root = out.join("agent");
    let _ = fs::remove_dir_all(&root);
    for bin in ["mesh-agent", "meshctl"] {
        copy_with_libs(&bin_dir.join(bin), &root, bin)?;
    }
    for dir in ["run/mesh", "etc", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    Ok(root)
}

/// The whoami image's tree under `out`.
pub fn whoami_tree(whoami: &Path, out: &Path) -> Result<PathBuf> {
    let root = out.join("whoami");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("tmp"))?;
    fs::copy(whoami, root.join("whoami"))
        .with_context(|| format!("copying {}", whoami.display()))?;
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("busybox-static (cargo xtask setup)")?;
    for tool in TOOLS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool))?;
    }
    Ok(root)
}

/// Copies `bin` to `root/name` and every shared library it loads to the
/// same path under `root`.
pub fn copy_with_libs(bin: &Path, root: &Path, name: &str) -> Result<()> {
    fs::create_dir_all(root)?;
    fs::copy(bin, root.join(name)).with_context(|| format!("copying {}", bin.display()))?;
    let out = Cmd::new("ldd").args([bin.as_os_str()]).output()?;
    for lib in out
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().context("lib path")?)?;
        fs::copy(lib, &dst).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

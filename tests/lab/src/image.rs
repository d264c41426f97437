//! The images the lab and the tests run, made locally (nothing is pulled).
//!
//! - the agent, as released ([`release`], `cargo xtask image`): `mesh-agent`
//!   and `meshctl` built with the `image` profile (optimised, stripped), with
//!   exactly the shared libraries they load (`ldd`), `/var/lib/mesh` for its
//!   state and `/run/mesh` for its control socket, one layer FROM scratch,
//!   written as a `docker save` archive (`docker load -i`), tagged with the
//!   version and the commit and labelled the OCI way. No Docker engine is
//!   needed to make it;
//! - whoami, the test workload: the static whoami binary and Debian's static
//!   busybox for a shell (Docker's health checks run `/bin/sh -c`) and tools,
//!   a tree imported FROM scratch.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::cmd::Cmd;

/// The agent image every lab node and multi-host test runs: the release
/// image's version tag.
pub const AGENT_IMAGE: &str = concat!("mesh-agent:", env!("CARGO_PKG_VERSION"));
/// The cargo profile of the released binaries (Cargo.toml).
pub const PROFILE: &str = "image";
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
    for dir in ["run/mesh", "var/lib/mesh", "etc", "tmp"] {
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

/// An image tree with Debian's nginx (this machine's `/usr/sbin/nginx`,
/// from `cargo xtask setup`) and its libraries, for the front-door example
/// (`deploy/front-door`): the binary at `/usr/sbin/nginx`, the users its
/// workers run as, and the directories it writes.
pub fn nginx_tree(out: &Path) -> Result<PathBuf> {
    let root = out.join("nginx");
    let _ = fs::remove_dir_all(&root);
    copy_with_libs(Path::new("/usr/sbin/nginx"), &root, "usr/sbin/nginx")
        .context("Debian's nginx (cargo xtask setup)")?;
    for dir in ["etc/nginx", "tmp", "var/lib/nginx", "var/log/nginx", "run"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(root)
}

/// Copies `bin` to `root/name` and every shared library it loads to the
/// same path under `root`.
pub fn copy_with_libs(bin: &Path, root: &Path, name: &str) -> Result<()> {
    let dst = root.join(name);
    fs::create_dir_all(dst.parent().unwrap_or(root))?;
    fs::copy(bin, &dst).with_context(|| format!("copying {}", bin.display()))?;
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

/// The release image as made by [`release`].
#[derive(Clone, Debug)]
pub struct Release {
    /// The `docker save` archive.
    pub tarball: PathBuf,
    /// `mesh-agent:VERSION` and `mesh-agent:VERSION-COMMIT`.
    pub tags: Vec<String>,
    /// Its one layer, uncompressed: what `docker images` shows.
    pub size: u64,
}

/// Builds `mesh-agent` and `meshctl` with the image profile and writes the
/// release image archive under `<target>/image/`.
pub fn release() -> Result<Release> {
    crate::cmd::cargo(&[
        "build",
        "-q",
        "--profile",
        PROFILE,
        "-p",
        "mesh-agent",
        "--bins",
    ])?;
    let target = crate::cmd::target_dir();
    let version = env!("CARGO_PKG_VERSION");
    let commit = Cmd::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    archive(
        &target.join(PROFILE),
        &target.join("image"),
        version,
        &commit,
    )
}

/// The archive from the binaries in `bin_dir`, under `out`.
pub fn archive(bin_dir: &Path, out: &Path, version: &str, commit: &str) -> Result<Release> {
    let root = agent_tree(bin_dir, out)?;
    let work = out.join("archive");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    // The layer: reproducible (sorted, no times or owners from here).
    let layer = work.join("layer.tar");
    reproducible_tar(&root, &layer, &["."])?;
    let size = fs::metadata(&layer)?.len();
    let layer_sum = sha256(&layer)?;
    let layer_dir = work.join(&layer_sum);
    fs::create_dir_all(&layer_dir)?;
    fs::rename(&layer, layer_dir.join("layer.tar"))?;
    let tags = vec![
        format!("mesh-agent:{version}"),
        format!("mesh-agent:{version}-{commit}"),
    ];
    let labels = serde_json::json!({
        "org.opencontainers.image.title": "mesh-agent",
        "org.opencontainers.image.description":
            "mesh: eBPF/XDP load balancer and overlay for Docker hosts (agent and meshctl)",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": commit,
        "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
    });
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/mesh-agent"],
            "Env": ["PATH=/"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sum}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config_path = work.join("config.json");
    fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let config_name = format!("{}.json", sha256(&config_path)?);
    fs::rename(&config_path, work.join(&config_name))?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": [format!("{layer_sum}/layer.tar")],
    }]);
    fs::write(work.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let tarball = out.join(format!("mesh-agent-{version}-{commit}.tar"));
    reproducible_tar(
        &work,
        &tarball,
        &["manifest.json", &config_name, &layer_sum],
    )?;
    let _ = fs::remove_dir_all(&work);
    Ok(Release {
        tarball,
        tags,
        size,
    })
}

/// `entries` of `dir` in the tar file `out`, the same bytes for the same
/// files: sorted, owner 0, time 0.
fn reproducible_tar(dir: &Path, out: &Path, entries: &[&str]) -> Result<()> {
    Cmd::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .args([std::ffi::OsStr::new("-C"), dir.as_os_str()])
        .args([std::ffi::OsStr::new("-cf"), out.as_os_str()])
        .args(entries)
        .output()
        .map(drop)
}

/// The hex SHA-256 of a file (coreutils' sha256sum).
fn sha256(path: &Path) -> Result<String> {
    let out = Cmd::new("sha256sum").args([path]).output()?;
    out.split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .map(str::to_owned)
        .with_context(|| format!("sha256sum {}: {out:?}", path.display()))
}

//! Builds the eBPF object (`mesh-ebpf`, target bpfel-unknown-none) and leaves
//! it in OUT_DIR for `include_bytes_aligned!`.
//!
//! The kernel side needs Debian's rustc 1.96 with its standard-library source
//! (`-Z build-std=core`) and bpf-linker (see docs/architecture.md, "Build").
//! When any of that is missing this stops with one message naming the setup
//! command instead of a wall of linker errors.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

const SETUP: &str = "cargo xtask setup";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Cargo prints `cargo::error` as the build's error, above its
            // dump of the script's output (where details go, on stderr).
            println!("cargo::error={msg}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or("mesh-agent has no parent directory")?;
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    for dir in ["mesh-ebpf", "mesh-common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=MESH_EBPF_RUSTC");
    println!("cargo:rerun-if-env-changed=PATH");

    let rustc =
        PathBuf::from(env::var("MESH_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into()));
    let toolchain = check_toolchain(&rustc)?;

    // One eBPF target dir for every profile of the host build, so `cargo
    // build`, `cargo test` and `cargo clippy` share a single eBPF build.
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("ebpf"))
        .ok_or("unexpected OUT_DIR layout")?;

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--package", "mesh-ebpf", "--bins", "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", &toolchain.path)
        // -Cdebuginfo + --btf: bpf-linker emits BTF, which the loader uses
        // for map definitions and the verifier for readable errors.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");
    let output = cmd
        .output()
        .map_err(|e| format!("could not run cargo for the eBPF build: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stderr}");
        return Err(format!(
            "building the eBPF programs (mesh-ebpf) failed; the compiler's output is below \
             (a toolchain problem? run `{SETUP}`)"
        ));
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=mesh-ebpf: {line}");
    }
    let object = target_dir.join(TARGET).join("release").join("mesh");
    std::fs::copy(&object, out_dir.join("mesh"))
        .map_err(|e| format!("copying {} into OUT_DIR: {e}", object.display()))?;
    Ok(())
}

struct Toolchain {
    /// PATH for the nested build, with ~/.cargo/bin so bpf-linker is found.
    path: std::ffi::OsString,
}

fn check_toolchain(rustc: &Path) -> Result<Toolchain, String> {
    let mut missing = Vec::new();
    if !rustc.exists() {
        missing.push(format!(
            "{} (Debian's rustc-web: the kernel side needs rustc 1.96 with library source)",
            rustc.display()
        ));
    } else {
        let sysroot = Command::new(rustc)
            .args(["--print", "sysroot"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let has_src = sysroot
            .map(|s| s.join("lib/rustlib/src/rust/library/core").is_dir())
            .unwrap_or(false);
        if !has_src {
            missing.push(
                "the standard-library source for -Z build-std (Debian's rust-web-src)".into(),
            );
        }
    }
    let mut paths: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        paths.push(home.join("bin"));
    }
    if !paths.iter().any(|p| p.join("bpf-linker").is_file()) {
        missing.push("bpf-linker (built against LLVM 22)".into());
    }
    if !missing.is_empty() {
        return Err(format!(
            "the eBPF toolchain is incomplete, missing {}: run `{SETUP}` (as root) to install it",
            missing.join("; ")
        ));
    }
    let path = env::join_paths(paths).map_err(|e| format!("bad PATH: {e}"))?;
    Ok(Toolchain { path })
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set (not run by cargo?)"))
}

//! Installs what a fresh Debian bookworm machine (as root) lacks to build,
//! test and run mesh. Each step checks first, so a second run does nothing
//! and takes about a second.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use mesh_lab::cmd::Cmd;

/// Debian packages, and why.
const APT: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 for the eBPF build (-Z build-std)"),
    (
        "rust-web-src",
        "standard-library source for -Z build-std=core",
    ),
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    (
        "libpolly-22-dev",
        "needed to link bpf-linker against LLVM 22",
    ),
    ("iproute2", "ip netns / veth for packet and lab tests"),
    ("iputils-ping", "ping in tests and the demo"),
    ("docker.io", "the Docker engine for agent and lab tests"),
    ("docker-compose", "the deploy/ compose file's test"),
    ("tar", "building local test images"),
    ("busybox-static", "a shell and tools inside the test images"),
    ("dnsutils", "dig, a real DNS client for the DNS tests"),
    ("curl", "the lab demo's client of the routing mesh"),
    ("wrk", "the load generator of `cargo xtask bench lb`"),
    ("nginx", "the backends of `cargo xtask bench lb`"),
    ("iperf3", "bulk throughput in `cargo xtask bench`"),
    (
        "linux-perf",
        "perf, the profiles of `cargo xtask bench profile`",
    ),
    (
        "knot",
        "Knot DNS, the reference the DNS benchmark compares with",
    ),
    ("dnsperf", "the DNS benchmark's second load generator"),
    (
        "ethtool",
        "the lab's underlay completes checksums as a real wire does, and goes without tunnel offloads as virtio_net does",
    ),
    ("tcpdump", "captures on the lab's underlay in tests"),
    (
        "prometheus",
        "promtool checks the agent's /metrics (the server is not started)",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What the Vagrant lab adds (libvirt and qemu from bookworm-backports: the
/// machine's qemu-utils is the backports one, bookworm's qemu conflicts).
const VAGRANT_APT: &[&str] = &[
    "qemu-system-x86",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "dnsmasq-base",
    "vagrant",
    "vagrant-libvirt",
    "debootstrap",
    "openssh-client",
];
const BACKPORTS: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

/// The Vagrant lab's packages; nothing where KVM is absent (the lab
/// cannot run there and its test says so).
pub fn vagrant() -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("setup: no /dev/kvm: skipping the Vagrant lab's packages");
        return Ok(());
    }
    let missing: Vec<&str> = VAGRANT_APT
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "setup: installing the Vagrant lab's packages: {}",
        missing.join(" ")
    );
    let has_backports = fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .chain(fs::read_to_string("/etc/apt/sources.list").ok())
        .any(|t| t.contains("bookworm-backports"));
    if !has_backports {
        fs::write(
            BACKPORTS,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )?;
    }
    Cmd::new("apt-get").args(["update", "-qq"]).run()?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(["-t", "bookworm-backports"])
        .args(&missing)
        .run()
}

fn installed(p: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", p])
        .output()
        .is_ok_and(|s| s.starts_with("ii"))
}

pub fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    apt()?;
    bpf_linker()?;
    bpffs()?;
    nextest()?;
    eprintln!("setup: all present");
    Ok(())
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in APT.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("setup: installing {p} ({why})");
    }
    Cmd::new("apt-get").args(["update", "-qq"]).run()?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .run()
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin("bpf-linker");
    let have = Cmd::new(&bin)
        .args(["--version"])
        .output()
        .unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    Cmd::new("cargo")
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .run()
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    // Fields: device, mount point, type, ...
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    }) {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .run()
}

fn nextest() -> Result<()> {
    if Cmd::new("cargo").args(["nextest", "--version"]).ok() {
        return Ok(());
    }
    eprintln!("setup: installing cargo-nextest (the test runner)");
    Cmd::new("cargo")
        .args(["install", "cargo-nextest", "--locked"])
        .run()
}

//! The Vagrant lab on real VMs (vagrant/): the local box, libvirt's
//! daemons, `vagrant up` with the release image and the demo workload, and
//! the VMs as demo [`Hosts`](crate::demo::Hosts) over SSH. Used by `cargo
//! xtask vagrant` and the Vagrant test.
//!
//! The packages (vagrant, vagrant-libvirt, libvirt and qemu from
//! bookworm-backports, debootstrap) come from `cargo xtask setup --vagrant`
//! (CI's `cargo xtask test` includes it). This machine has no systemd:
//! libvirtd and virtlogd are started here, as daemons, when not running.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{Cmd, root};

/// The local box's name (the Vagrantfile's default MESH_BOX).
pub const BOX: &str = "mesh-local";
/// The VMs' private network (the underlay): node N is .10+N, the host .1.
pub const PREFIX: &str = "192.168.56";
/// The start of the lab's libvirt domain names (the Vagrantfile's
/// `default_prefix`): node N is `mesh-lab-nodeN`.
pub const DOMAIN_PREFIX: &str = "mesh-lab-";

/// Why the Vagrant lab cannot run on this machine, if it cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm: this machine cannot run KVM guests".into());
    }
    if !Cmd::new("vagrant").args(["--version"]).ok() {
        return Some("vagrant is not installed (cargo xtask setup --vagrant)".into());
    }
    None
}

/// The lab's directory: vagrant/ of the repository.
pub fn dir() -> PathBuf {
    root().join("vagrant")
}

fn state() -> PathBuf {
    dir().join(".state")
}

fn box_dir() -> PathBuf {
    dir().join(".box")
}

/// libvirt's daemons, started when not running (no systemd here), with
/// qemu run as root (the lab's kernel and disk live under the repository).
pub fn libvirtd() -> Result<()> {
    let conf = Path::new("/etc/libvirt/qemu.conf");
    let text = fs::read_to_string(conf)
        .context("libvirt is not installed (cargo xtask setup --vagrant)")?;
    if !text.lines().any(|l| l.trim() == "user = \"root\"") {
        fs::write(
            conf,
            format!(
                "{text}\n# mesh lab\nuser = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n"
            ),
        )?;
    }
    for daemon in ["virtlogd", "libvirtd"] {
        if !Cmd::new("pgrep").args(["-x", daemon]).ok() {
            Cmd::new(daemon).args(["-d"]).run()?;
        }
    }
    let start = Instant::now();
    while !virsh().args(["version"]).ok() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("libvirtd did not answer within 30 s");
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Builds the box (vagrant/build-box.sh) unless it is there, and adds it to
/// Vagrant; the build takes a few minutes (debootstrap, packages).
pub fn ensure_box() -> Result<()> {
    let b = box_dir();
    let built = !b.join("mesh.box").exists() || !b.join("vmlinuz").exists();
    if built {
        Cmd::new("bash")
            .args([dir().join("build-box.sh").as_os_str(), b.as_os_str()])
            .run()?;
    }
    let listed = Cmd::new("vagrant").args(["box", "list"]).output()?;
    if built || !listed.lines().any(|l| l.starts_with(&format!("{BOX} "))) {
        // A box added again is a new image in libvirt's pool: the old
        // ones (about 800 MB each) go.
        let vols = virsh()
            .args(["vol-list", "default"])
            .output()
            .unwrap_or_default();
        for v in vols
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|v| v.starts_with(&format!("{BOX}_vagrant_box_image_")))
        {
            let _ = virsh().args(["vol-delete", "--pool", "default", v]).ok();
        }
        Cmd::new("vagrant")
            .args(["box", "add", "--force", "--name", BOX])
            .args([b.join("mesh.box")])
            .run()?;
    }
    Ok(())
}

/// libvirt's domain type for the VMs, and why: `kvm` when a KVM guest
/// boots the box's kernel here (its first lines within 15 s), else `qemu`
/// (software emulation). Measured on these machines: nested KVM stops the
/// box's kernel with an emulation error (host-model CPUs do not even
/// start), while software emulation reaches init in about 6 s.
/// MESH_VM_DRIVER overrides.
pub fn vm_driver() -> (String, String) {
    if let Ok(d) = std::env::var("MESH_VM_DRIVER") {
        return (d, "MESH_VM_DRIVER".into());
    }
    let b = box_dir();
    let out = std::process::Command::new("timeout")
        .args([
            "15",
            "qemu-system-x86_64",
            "-accel",
            "kvm",
            "-m",
            "512",
            "-nographic",
        ])
        .args(["-no-reboot", "-cpu", "host,-arch-capabilities", "-kernel"])
        .arg(b.join("vmlinuz"))
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(std::process::Stdio::null())
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if text.contains("Linux version") {
        ("kvm".into(), "a KVM guest boots the box's kernel".into())
    } else {
        (
            "qemu".into(),
            "KVM is here but a KVM guest does not boot the box's kernel (nested KVM): software emulation"
                .into(),
        )
    }
}

/// A running Vagrant lab of `nodes` VMs.
pub struct Lab {
    pub nodes: usize,
    ssh_config: PathBuf,
}

fn vagrant() -> Cmd {
    Cmd::new("vagrant")
        .env("VAGRANT_CWD", dir())
        .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
}

/// Environment every `vagrant` call of the lab gets.
fn with_files(c: Cmd, nodes: usize, agent: &Path, whoami: &Path, key: &Path) -> Cmd {
    let b = box_dir();
    c.env("MESH_NODES", nodes.to_string())
        .env("MESH_AGENT_IMAGE", agent)
        .env("MESH_WHOAMI_IMAGE", whoami)
        .env("MESH_CLUSTER_KEY", key)
        .env("MESH_BOX_KERNEL", b.join("vmlinuz"))
        .env("MESH_BOX_INITRD", b.join("initrd.img"))
}

impl Lab {
    /// `vagrant up` of `nodes` VMs with the agent image archive `agent` and
    /// the whoami image tree `whoami_tree` (the box and libvirt ready), the
    /// agents started with `--encrypt` when `encrypt`.
    pub fn up(nodes: usize, agent: &Path, whoami_tree: &Path, encrypt: bool) -> Result<Lab> {
        // Vagrant resolves relative paths from vagrant/.
        let agent = &fs::canonicalize(agent)
            .with_context(|| format!("the agent image {}", agent.display()))?;
        let (driver, why) = vm_driver();
        println!("vagrant: VMs of type {driver} ({why})");
        let st = state();
        fs::create_dir_all(&st)?;
        let key = st.join("cluster.key");
        fs::write(&key, format!("{}\n", crate::random_key()?))?;
        let whoami = st.join("whoami.tar");
        Cmd::new("tar")
            .args([std::ffi::OsStr::new("-C"), whoami_tree.as_os_str()])
            .args([std::ffi::OsStr::new("-cf"), whoami.as_os_str()])
            .args(["."])
            .output()?;
        remove_strays()?;
        with_files(vagrant(), nodes, agent, &whoami, &key)
            .env("MESH_VM_DRIVER", &driver)
            .env("MESH_ENCRYPT", if encrypt { "true" } else { "" })
            .args(["up", "--provision", "--provider", "libvirt"])
            .run()?;
        Lab::adopt(nodes)
    }

    /// The lab an earlier `up` left running.
    pub fn adopt(nodes: usize) -> Result<Lab> {
        let ssh_config = state().join("ssh-config");
        let names: Vec<String> = (1..=nodes).map(|n| format!("node{n}")).collect();
        let cfg = vagrant().args(["ssh-config"]).args(&names).output()?;
        fs::write(&ssh_config, cfg)?;
        Ok(Lab { nodes, ssh_config })
    }

    /// A command on node `n`, as root (arguments quoted for its shell).
    pub fn ssh(&self, n: usize, args: &[&str]) -> Cmd {
        let line: Vec<String> = args.iter().map(|a| quote(a)).collect();
        Cmd::new("ssh")
            .args([std::ffi::OsStr::new("-F"), self.ssh_config.as_os_str()])
            .args(["-o", "LogLevel=ERROR", &format!("node{n}"), "sudo"])
            .args(line)
    }
}

impl Lab {
    /// Every agent restarted with the tunnel encrypted (`on`: MESH_ENCRYPT
    /// in its mesh.env) or plain, all stopped first so none meets a peer of
    /// the other setting; then each has its peers again.
    pub fn set_encrypt(&self, on: bool) -> Result<()> {
        for n in 1..=self.nodes {
            self.ssh(n, &["docker", "stop", "mesh-agent"]).run()?;
        }
        for n in 1..=self.nodes {
            self.set_agent_encrypt(n, on)?;
        }
        Ok(())
    }

    /// Node `n`'s agent recreated with encryption `on` (its peers may
    /// differ: then it is refused).
    pub fn set_agent_encrypt(&self, n: usize, on: bool) -> Result<()> {
        self.set_agent_env(n, "MESH_ENCRYPT", on.then_some("true"))
    }

    /// Node `n`'s agent recreated with `key=value` in its mesh.env (None:
    /// the setting removed, the agent's default).
    pub fn set_agent_env(&self, n: usize, key: &str, value: Option<&str>) -> Result<()> {
        let mut edit = format!("sed -i '/^{key}=/d' /opt/mesh/mesh.env");
        if let Some(v) = value {
            edit.push_str(&format!(
                " && echo {key}={} >> /opt/mesh/mesh.env",
                quote(v)
            ));
        }
        self.ssh(n, &["sh", "-c", &edit]).run()?;
        self.ssh(
            n,
            &[
                "sh",
                "-c",
                "cd /opt/mesh && docker-compose up -d --force-recreate",
            ],
        )
        .run()
    }

    /// The host's bridge of the VMs' private network (every frame between
    /// nodes crosses it).
    pub fn underlay_bridge(&self) -> Result<String> {
        let info = virsh().args(["net-info", "mesh-underlay"]).output()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Bridge:").map(|b| b.trim().to_string()))
            .context("virsh net-info mesh-underlay names no bridge")
    }

    /// Writes `text` to `path` on node `n` in place (as an editor would:
    /// the agent's bind mount keeps seeing the same file).
    pub fn write_file(&self, n: usize, path: &str, text: &str) -> Result<()> {
        let line = format!("printf '%s' {} > {}", quote(text), quote(path));
        self.ssh(n, &["sh", "-c", &line]).run()
    }
}

/// Removes every VM of the lab (`vagrant destroy -f`) and the lab's
/// libvirt network; fine to run when nothing is there.
pub fn destroy(nodes: usize) -> Result<()> {
    vagrant()
        .env("MESH_NODES", nodes.to_string())
        .args(["destroy", "-f"])
        .run()?;
    remove_strays()?;
    for net in ["mesh-underlay", "vagrant-libvirt"] {
        let _ = virsh().args(["net-destroy", net]).ok();
    }
    Ok(())
}

fn virsh() -> Cmd {
    Cmd::new("virsh").args(["-c", "qemu:///system"])
}

/// Removes the lab's VMs that this checkout's Vagrant does not know: left
/// by another checkout, or by a machine copied with its VMs defined. Their
/// names would be taken (`vagrant up` stops: "domain about to create is
/// already taken") and, running, they hold the lab's addresses. One lab
/// runs on a machine at a time: its network and addresses are fixed.
fn remove_strays() -> Result<()> {
    let known: Vec<String> = fs::read_dir(dir().join(".vagrant/machines"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|m| fs::read_to_string(m.path().join("libvirt/id")).ok())
        .map(|id| id.trim().to_string())
        .collect();
    let names = virsh().args(["list", "--all", "--name"]).output()?;
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(DOMAIN_PREFIX))
    {
        let uuid = virsh().args(["domuuid", name]).output()?;
        if known.iter().any(|k| k == uuid.trim()) {
            continue;
        }
        println!("vagrant: removing VM {name}: a mesh lab VM this checkout did not make");
        let _ = virsh().args(["destroy", name]).ok();
        virsh()
            .args(["undefine", name, "--remove-all-storage"])
            .run()
            .with_context(|| format!("removing the stray VM {name}"))?;
    }
    Ok(())
}

/// `s` quoted for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl crate::demo::Hosts for Lab {
    fn docker(&self, n: usize, args: &[&str]) -> Result<String> {
        let mut all = vec!["docker"];
        all.extend_from_slice(args);
        self.ssh(n, &all).output()
    }
    fn node_ip(&self, n: usize) -> String {
        format!("{PREFIX}.{}", 10 + n)
    }
    fn node_name(&self, n: usize) -> String {
        // vagrant/provision.sh: MESH_NODE_NAME=node$n.
        format!("node{n}")
    }
    fn curl_outside(&self, url: &str) -> Result<String> {
        // The host itself: on the VMs' network, not a node.
        Cmd::new("curl")
            .args(["-s", "--max-time", "3", url])
            .output()
    }
    fn outside_ip(&self) -> String {
        format!("{PREFIX}.1")
    }
    fn curl_on(&self, n: usize, url: &str) -> Result<String> {
        self.ssh(n, &["curl", "-s", "--max-time", "3", url])
            .output()
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting() {
        assert_eq!(quote("docker"), "docker");
        assert_eq!(quote("mesh.service=whoami"), "mesh.service=whoami");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("{{.Names}}"), "'{{.Names}}'");
    }
}

//! Socket-level balancing's attachment: the sock_addr programs on a cgroup v2
//! directory (the host's root, so every process of the host is covered),
//! through a link pinned under the bpffs directory so it outlives the
//! agent, and the host's network-namespace cookie the program compares
//! sockets with.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, links::FdLink},
};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Whether `dir` is a cgroup v2 directory.
fn is_cgroup2(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we pass for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == CGROUP2_MAGIC
}

/// The cgroup v2 directory for `dir`: itself, or its `unified` mount on a
/// hybrid host (cgroup v1 controllers beside a v2 tree).
pub fn cgroup2_dir(dir: &Path) -> Result<PathBuf, String> {
    for d in [dir.to_owned(), dir.join("unified")] {
        if is_cgroup2(&d) {
            return Ok(d);
        }
    }
    Err(format!(
        "{} is no cgroup v2 directory (nor is {}/unified)",
        dir.display(),
        dir.display()
    ))
}

/// The cookie of the calling thread's network namespace
/// (SO_NETNS_COOKIE, Linux 5.14).
pub fn netns_cookie() -> std::io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of process `pid`'s network namespace: read from a socket
/// made there by a thread that enters the namespace (setns) and ends with
/// it, so no other thread of the agent ever leaves the host's.
pub fn netns_cookie_of(pid: u32) -> std::io::Result<u64> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            netns_cookie()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace reader panicked")))
    })
}

/// Attaches the connect4, getpeername4, sendmsg4 and recvmsg4 programs to
/// the cgroup v2 directory `cgroup` (or its `unified` mount), their links
/// pinned at `<bpffs>/links/sock_*`.
/// A link an earlier agent pinned there is replaced only once the new one
/// is attached (both run for a moment; the second sees a rewritten
/// destination and leaves it), so connects are never left unbalanced.
/// Returns the directory used.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, bpffs: &Path) -> Result<PathBuf, String> {
    let dir = cgroup2_dir(cgroup)?;
    let fd = std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let links = bpffs.join("links");
    std::fs::create_dir_all(&links).map_err(|e| format!("{}: {e}", links.display()))?;
    for (name, pin) in [
        (super::progs::SOCK_CONNECT4, "sock_connect4"),
        (super::progs::SOCK_GETPEERNAME4, "sock_getpeername4"),
        (super::progs::SOCK_SENDMSG4, "sock_sendmsg4"),
        (super::progs::SOCK_RECVMSG4, "sock_recvmsg4"),
    ] {
        let prog = super::sock_addr(ebpf, name).map_err(|e| format!("{e:?}"))?;
        // A BPF link (what aya makes here) always shares its cgroup with
        // other programs; link_create refuses the multi flag itself
        // (EINVAL), so the mode given is the default one.
        let id = prog
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(|e| format!("attaching {name} to {}: {e:?}", dir.display()))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
        // (bpffs takes no dots in names.)
        let fresh = links.join(format!("{pin}_new"));
        let _ = std::fs::remove_file(&fresh);
        link.pin(&fresh)
            .map_err(|e| format!("pinning {name}: {e}"))?;
        // The rename drops the old pin: its link (an earlier agent's) goes.
        let pin = links.join(pin);
        std::fs::rename(&fresh, &pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    }
    Ok(dir)
}

//! Network namespaces the tests create, use and remove themselves.
//!
//! A namespace is entered on a fresh thread (setns applies to one thread),
//! so the test's own thread never changes namespace. Sockets keep the
//! namespace they were created in, so they can be used from any thread.

use std::{fs::File, os::fd::AsRawFd, process::Command, sync::atomic::AtomicU32};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>` (at most 15 bytes
/// for short prefixes).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args...`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets sysctl `key` to `value` in this namespace, panicking on failure.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{key}={value}"))
            .output()
            .expect("sysctl runs");
        assert!(
            out.status.success(),
            "{key}={value} in {}: {out:?}",
            self.name
        );
    }

    /// Runs `cmd` (a program and its arguments) in this namespace,
    /// panicking with its output on failure.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?} in {}: {e}", self.name));
        assert!(out.status.success(), "{cmd:?} in {}: {out:?}", self.name);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.enter_then(f))
                .join()
                .expect("namespace thread panicked")
        })
    }

    /// Spawns `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    fn enter_then<T>(&self, f: impl FnOnce() -> T) -> T {
        enter(&self.path());
        f()
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A link's counters (`ip -j -s link`: "rx" and "tx", each with
    /// "bytes" and "packets").
    pub fn link_stats(&self, dev: &str) -> serde_json::Value {
        let out = self.ip(&["-j", "-s", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output is JSON");
        v[0]["stats64"].clone()
    }

    /// A link's `ip -j` JSON field (e.g. "address", "ifindex").
    pub fn link_field(&self, dev: &str, field: &str) -> serde_json::Value {
        let out = self.ip(&["-j", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output is JSON");
        v[0][field].clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a fresh thread in the network namespace of process `pid`
/// (a container's).
pub fn run_in_pid<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/proc/{pid}/ns/net");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// `ip args...`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs (iproute2 installed?)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

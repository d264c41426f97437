//! CPU profiles of a stretch of work for the benchmarks: Debian's perf
//! samples by the CPU clock (`cpu-clock`, a timer: the VMs these run on
//! have no hardware counters, so `bpftool prog profile` cannot count
//! cycles), and the report gives each symbol's samples. BPF programs show
//! by name (`bpf_prog_<tag>_<name>`, the JIT's kallsyms), next to the
//! kernel functions and helpers they call.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Samples per second per CPU.
pub const FREQ: u32 = 10_000;

/// A running `perf record`.
pub struct Recording {
    child: Child,
    file: PathBuf,
}

/// One symbol's share of a profile.
#[derive(Clone, Debug)]
pub struct Symbol {
    pub name: String,
    pub samples: u64,
}

/// Pins the calling thread to `cpu` (so a profile of that CPU sees its
/// work and only its work's interrupts).
pub fn pin_to_cpu(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

impl Recording {
    /// Starts sampling `cpus` (None: every CPU) into `file`, with call
    /// graphs off (the flat profile is what the tables use).
    pub fn start(cpus: Option<&str>, file: &Path) -> Result<Self, String> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q", "-e", "cpu-clock", "-F"])
            .arg(FREQ.to_string())
            .arg("-o")
            .arg(file);
        match cpus {
            Some(c) => cmd.args(["-C", c]),
            None => cmd.arg("-a"),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("perf record (Debian's linux-perf): {e}"))?;
        // perf opens its events before it samples: give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Recording {
            child,
            file: file.to_path_buf(),
        })
    }

    /// Stops sampling; every symbol's samples, most first.
    pub fn stop(self) -> Result<Vec<Symbol>, String> {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| format!("perf record: {e}"))?;
        // perf writes its file and then dies by the signal it got.
        use std::os::unix::process::ExitStatusExt;
        if !out.status.success() && out.status.signal() != Some(libc::SIGINT) {
            return Err(format!(
                "perf record: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        report(&self.file)
    }
}

/// The flat profile of `file`: samples per symbol, most first.
pub fn report(file: &Path) -> Result<Vec<Symbol>, String> {
    let out = Command::new("perf")
        .args(["report", "--no-children", "--sort", "sym", "--stdio", "-F"])
        .args(["sample,sym", "-i"])
        .arg(file)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("perf report: {e}"))?;
    if !out.status.success() {
        return Err(format!("perf report: {}", out.status));
    }
    Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
}

/// Lines of `perf report -F sample,sym`: `  1234  [k] name`.
fn parse_report(text: &str) -> Vec<Symbol> {
    let mut out: Vec<Symbol> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let samples = it.next()?.parse().ok()?;
            let _space = it.next()?;
            let name: Vec<&str> = it.collect();
            (!name.is_empty()).then(|| Symbol {
                name: name.join(" "),
                samples,
            })
        })
        .collect();
    // One symbol may come from several objects (perf lists each).
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| {
        let same = a.name == b.name;
        if same {
            b.samples += a.samples;
        }
        same
    });
    out.sort_by_key(|s| std::cmp::Reverse(s.samples));
    out
}

/// A BPF program's symbol without its tag: `bpf_prog_<tag>_<name>` ->
/// `bpf_prog <name>` (the tag changes with every build).
pub fn short_name(sym: &str) -> String {
    match sym.strip_prefix("bpf_prog_") {
        Some(rest) => match rest.split_once('_') {
            Some((_, name)) => format!("bpf_prog {name}"),
            None => sym.to_string(),
        },
        None => sym.to_string(),
    }
}

/// Whether a symbol is a CPU waiting for work (sampled while idle, which
/// is not CPU spent).
pub fn is_idle(sym: &str) -> bool {
    sym.contains("safe_halt") || sym.contains("idle")
}

/// Nanoseconds of CPU that `samples` stand for, per unit of work
/// (`units`: packets, connections).
pub fn ns_per(samples: u64, units: u64) -> f64 {
    samples as f64 * 1e9 / FREQ as f64 / units.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_parses_into_symbols_most_first() {
        let text = "# Samples: 3K of event 'cpu-clock'\n#\n        12  [k] htab_map_hash\n      1830  [k] bpf_prog_c9966795dd5a7575_mesh_tc_from_container\n        40  [.] core::ptr::foo<T>\n         3  [k] htab_map_hash\n\n";
        let s = parse_report(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2].samples, 15);
        assert_eq!(s[0].samples, 1830);
        assert_eq!(short_name(&s[0].name), "bpf_prog mesh_tc_from_container");
        assert_eq!(s[1].name, "core::ptr::foo<T>");
        assert_eq!(short_name("htab_map_hash"), "htab_map_hash");
        assert!((ns_per(10, 1000) - 1000.0).abs() < 1e-9);
        assert!(is_idle("pv_native_safe_halt") && is_idle("default_idle_call"));
        assert!(!is_idle("tcp_ack"));
    }
}

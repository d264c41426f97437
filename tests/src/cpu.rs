//! The whole machine's CPU time, for benchmarks that print CPU per unit of
//! work (the load generators, servers and data path share the machine).

/// Busy CPU time of the whole machine so far, in seconds, summed over its
/// CPUs (/proc/stat's first line: user, nice, system, irq, softirq and
/// steal; idle and iowait are not busy).
pub fn busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    (total - idle) / hz
}

/// Runs `f` and returns its result with the machine's busy CPU seconds
/// over it.
pub fn busy_during<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let b0 = busy_seconds();
    let r = f();
    (r, busy_seconds() - b0)
}

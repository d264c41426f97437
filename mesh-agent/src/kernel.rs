//! The running kernel's version, checked at start: the data plane needs
//! TCX links for its TC programs (Linux 6.6), on top of what older kernels
//! already have (XDP links, `bpf_fib_lookup`, `bpf_redirect_neigh` and
//! `bpf_redirect_peer`, BTF). An older kernel is refused with one clear
//! message instead of a verifier or attach error further on.

/// The oldest kernel the data plane runs on.
pub const MINIMUM: (u32, u32) = (6, 6);

/// (major, minor) of a release string such as `6.12.48+deb12-amd64`.
pub fn parse(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// This host's kernel release (uname -r).
pub fn release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Ok when the running kernel is new enough, else why not.
pub fn check() -> Result<(), String> {
    let Some(rel) = release() else {
        return Ok(()); // Unknown: let loading tell.
    };
    match parse(&rel) {
        Some(v) if v >= MINIMUM => Ok(()),
        Some(_) => Err(format!(
            "this host runs Linux {rel}; mesh needs Linux {}.{} or newer (TCX links for its TC \
             programs). On Debian bookworm: apt install -t bookworm-backports linux-image-amd64, \
             then reboot",
            MINIMUM.0, MINIMUM.1
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse("6.12.48+deb12-amd64"), Some((6, 12)));
        assert_eq!(parse("6.1.0-37-amd64"), Some((6, 1)));
        assert_eq!(parse("5.10.0"), Some((5, 10)));
        assert_eq!(parse("6.18.0"), Some((6, 18)));
        assert_eq!(parse("garbage"), None);
        assert!(parse("6.1.0-37-amd64") < Some(MINIMUM));
        assert!(parse("6.6.1") >= Some(MINIMUM));
    }
}

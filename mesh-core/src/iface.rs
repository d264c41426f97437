//! Network interface names from flags and from the kernel.

use std::ffi::CString;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IfaceError {
    #[error("interface name {0:?} is invalid (1-15 bytes, no '/', whitespace or NUL)")]
    InvalidName(String),
    #[error("no interface named {0:?} in this network namespace")]
    NotFound(String),
}

/// Checks `name` the way the kernel's dev_valid_name does.
pub fn validate(name: &str) -> Result<(), IfaceError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(IfaceError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// The interface index of `name` in the current network namespace.
pub fn index(name: &str) -> Result<u32, IfaceError> {
    validate(name)?;
    let c = CString::new(name).map_err(|_| IfaceError::InvalidName(name.to_owned()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(IfaceError::NotFound(name.to_owned())),
        i => Ok(i),
    }
}

/// The first IPv4 address of interface `name`.
pub fn ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    ipv4_addrs()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
}

/// Every IPv4 address of interface `name`.
pub fn ipv4_of(name: &str) -> Vec<std::net::Ipv4Addr> {
    ipv4_addrs()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, a)| a)
        .collect()
}

/// The interface of this namespace's default IPv4 route (the lowest metric
/// if several), from `/proc/net/route`.
pub fn default_route_iface() -> Option<String> {
    default_route_in(&std::fs::read_to_string("/proc/net/route").ok()?)
}

/// [`default_route_iface`] from the text of `/proc/net/route`: columns
/// Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask (hex,
/// network order).
fn default_route_in(text: &str) -> Option<String> {
    const RTF_UP: u32 = 1;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let default = f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000");
            (default && flags & RTF_UP != 0).then_some((f.get(6)?.parse::<u32>().ok()?, f[0]))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, name)| name.to_owned())
}

/// The interface that holds `addr`.
pub fn holding(addr: std::net::Ipv4Addr) -> Option<String> {
    ipv4_addrs()
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(n, _)| n)
}

/// Every IPv4 address of this network namespace.
pub fn local_addrs() -> Vec<std::net::IpAddr> {
    ipv4_addrs().into_iter().map(|(_, a)| a.into()).collect()
}

/// (interface, IPv4 address) for every address of this network namespace.
fn ipv4_addrs() -> Vec<(String, std::net::Ipv4Addr)> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        let addr = ifa.ifa_addr;
        // SAFETY: addr checked for null before reading its family.
        if !addr.is_null() && unsafe { (*addr).sa_family } as i32 == libc::AF_INET {
            // SAFETY: ifa_name is a NUL-terminated string; AF_INET
            // addresses are sockaddr_in.
            let (name, sin) = unsafe {
                (
                    std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy(),
                    &*(addr as *const libc::sockaddr_in),
                )
            };
            out.push((
                name.into_owned(),
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            ));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// Runs an interface ioctl (`SIOCGIF*`) for `name` on a throwaway socket;
/// the filled request on success. Answers for this network namespace.
fn ifreq_ioctl(name: &str, request: libc::Ioctl) -> Option<libc::ifreq> {
    validate(name).ok()?;
    // SAFETY: a plain socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIF* requests fill the ifreq we pass.
    let r = unsafe { libc::ioctl(fd, request, &mut req) };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    (r == 0).then_some(req)
}

/// The MAC address of interface `name` (sysfs may show another
/// namespace's interfaces; the ioctl does not).
pub fn mac(name: &str) -> Option<[u8; 6]> {
    let req = ifreq_ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Some(mac)
}

/// The MTU of interface `name` in this network namespace.
pub fn mtu(name: &str) -> Option<u32> {
    let req = ifreq_ioctl(name, libc::SIOCGIFMTU)?;
    // SAFETY: after SIOCGIFMTU the union holds ifru_mtu.
    Some(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_route_with_the_lowest_metric() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            enp1s0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            down0\t00000000\t0100000A\t0002\t0\t0\t1\t00000000\t0\t0\t0\n";
        assert_eq!(super::default_route_in(text).as_deref(), Some("enp1s0"));
        assert_eq!(super::default_route_in("Iface\tDestination\n"), None);
        assert_eq!(super::default_route_in("garbage\n\tx y\n"), None);
    }

    use super::*;

    #[test]
    fn names() {
        for ok in ["eth0", "veth1a2b3c4", "a", "123456789012345"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "1234567890123456",
            "a/b",
            "a b",
            "a\0b",
            ".",
            "..",
            "a:1",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn loopback_exists_unknown_does_not() {
        assert!(index("lo").is_ok());
        assert_eq!(
            index("nosuchif0"),
            Err(IfaceError::NotFound("nosuchif0".into()))
        );
    }
}

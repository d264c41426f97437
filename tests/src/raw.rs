//! Hand-made IPv4 packets sent as they are (a raw socket with the header
//! included: any source address), for tests that forge or inject.

use std::net::Ipv4Addr;

/// Sends the IPv4 packet `ip` (header included) toward `dst`, `count`
/// times, from the calling thread's network namespace; how many left.
pub fn send_ipv4(ip: &[u8], dst: Ipv4Addr, count: usize) -> usize {
    // SAFETY: a raw socket of our own, closed below; sendto with a
    // sockaddr_in of the right size and a buffer of `ip.len()` bytes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut sent = 0;
        for _ in 0..count {
            let r = libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            if r == ip.len() as isize {
                sent += 1;
            }
        }
        libc::close(fd);
        sent
    }
}

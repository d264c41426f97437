//! Datagrams in batches: `recvmmsg` takes up to [`BATCH`] queries in one
//! system call and `sendmmsg` sends their answers in one, as Knot's UDP
//! workers do. A DNS server's time goes mostly to the kernel's work per
//! datagram (a profile of the benchmark: a quarter in the server's own
//! code), so calls saved are the cheapest speed there is. Hand-written on
//! libc: neither tokio nor socket2 (the crates in the tree) offers the two
//! calls; the unsafe code is this file's only.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::RawFd,
};

/// Datagrams per call.
pub const BATCH: usize = 32;
/// The largest query taken (EDNS clients offer 1,232 to 4,096 bytes for
/// answers; a query is a fraction of that). A longer one is cut and then
/// refused as malformed.
pub const MAX_QUERY: usize = 4096;

/// Receive buffers for one batch.
pub struct Inbox {
    bufs: Vec<[u8; MAX_QUERY]>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    cut: Vec<bool>,
    n: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        // SAFETY: sockaddr_storage is plain data; all zeros is valid.
        let zero: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Inbox {
            bufs: vec![[0; MAX_QUERY]; BATCH],
            addrs: vec![zero; BATCH],
            lens: vec![0; BATCH],
            cut: vec![false; BATCH],
            n: 0,
        }
    }
}

impl Inbox {
    /// Receives what is queued, up to [`BATCH`] datagrams, without
    /// waiting: `WouldBlock` when there is none.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: MAX_QUERY,
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all zeros is valid.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `msgs` points into buffers owned by
        // self or this frame, alive and sized as declared for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = n as usize;
        for (i, m) in msgs.iter().take(self.n).enumerate() {
            self.lens[i] = (m.msg_len as usize).min(MAX_QUERY);
            self.cut[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(self.n)
    }

    /// The datagrams of the last batch: bytes (None if cut) and sender.
    pub fn datagrams(&self) -> impl Iterator<Item = (Option<&[u8]>, Option<SocketAddr>)> {
        (0..self.n).map(|i| {
            let bytes = (!self.cut[i]).then(|| &self.bufs[i][..self.lens[i]]);
            (bytes, socket_addr(&self.addrs[i]))
        })
    }
}

/// The address in `s`, if IPv4 or IPv6.
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Sends `out` (answer, destination) in as few calls as the socket takes
/// without waiting; how many went (the rest: `WouldBlock` or an error,
/// for the caller to send one by one).
pub fn send(fd: RawFd, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let names: Vec<socket2::SockAddr> = out.iter().map(|(_, a)| (*a).into()).collect();
    let mut iov: Vec<libc::iovec> = out
        .iter()
        .map(|(b, _)| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeros is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..out.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = names[i].as_ptr().cast_mut().cast();
        m.msg_hdr.msg_namelen = names[i].len();
        m.msg_hdr.msg_iov = &mut iov[i];
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < msgs.len() {
        // SAFETY: every pointer points into `out`, `names` or `iov`, alive
        // for the call; the kernel only reads the buffers.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs[sent..].as_mut_ptr(),
                (msgs.len() - sent) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            if sent > 0 {
                return Ok(sent);
            }
            return Err(io::Error::last_os_error());
        }
        sent += n as usize;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_with_its_senders() {
        use std::os::fd::AsRawFd;
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = server.local_addr().expect("addr");
        let clients: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 10], to).expect("send");
        }
        let mut inbox = Inbox::default();
        let mut got = Vec::new();
        for _ in 0..100 {
            match inbox.recv(server.as_raw_fd()) {
                Ok(_) => got.extend(inbox.datagrams().map(|(b, a)| (b.map(<[u8]>::to_vec), a))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got.len() == 3 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
        assert_eq!(got.len(), 3);
        let out: Vec<(Vec<u8>, SocketAddr)> = got
            .iter()
            .map(|(b, a)| (b.clone().expect("whole"), a.expect("an address")))
            .collect();
        assert_eq!(send(server.as_raw_fd(), &out).expect("sendmmsg"), 3);
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 64];
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
            let n = c.recv(&mut buf).expect("the echo");
            assert_eq!(&buf[..n], &[i as u8; 10]);
        }
        // Nothing queued: WouldBlock, not a wait.
        let e = inbox.recv(server.as_raw_fd()).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}

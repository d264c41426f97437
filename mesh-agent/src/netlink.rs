//! A blocking netlink socket for the agent's few requests (the host link
//! over rtnetlink, `mesh-wg` over generic netlink): rust-netlink's message
//! and socket crates, requests sent one at a time and their answers awaited
//! for at most 5 s. The agent makes a handful of such requests at start and
//! when peers change, so a blocking socket on the calling thread does.

use std::{fmt::Debug, io, os::fd::AsRawFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// An RTM_NEWLINK body for the agent's own device `name`: without ARP (its
/// neighbours need no resolution: every packet goes to its program), up
/// if `up`; callers add what else they set.
pub fn noarp_link(name: &str, up: bool) -> netlink_packet_route::link::LinkMessage {
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    let mut m = LinkMessage::default();
    m.header.change_mask = LinkFlags::Up | LinkFlags::Noarp;
    m.header.flags = if up {
        LinkFlags::Up | LinkFlags::Noarp
    } else {
        LinkFlags::Noarp
    };
    m.attributes = vec![LinkAttribute::IfName(name.to_string())];
    m
}

/// A netlink socket of one protocol (`netlink_sys::protocols`).
pub struct Netlink {
    socket: Socket,
}

impl Netlink {
    pub fn open(protocol: isize) -> io::Result<Netlink> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on the socket's own descriptor with a timeval
        // of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { socket })
    }

    /// Sends `msg` (made by [`request`]) and waits for its
    /// acknowledgement: Ok, or the kernel's error.
    pub fn request<T>(&self, msg: &NetlinkMessage<T>) -> io::Result<()>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.send(msg)?;
        loop {
            let (reply, _) = self.socket.recv_from_full()?;
            if let Some(r) = read::<T>(&reply, &mut Vec::new()) {
                return r;
            }
        }
    }

    /// Sends `msg` (made by [`dump`] or [`request`]) and gathers the
    /// messages of the answer until it ends (the end of a dump, or the
    /// acknowledgement of a plain request).
    pub fn query<T>(&self, msg: &NetlinkMessage<T>) -> io::Result<Vec<T>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.send(msg)?;
        let mut got = Vec::new();
        loop {
            let (reply, _) = self.socket.recv_from_full()?;
            if let Some(r) = read::<T>(&reply, &mut got) {
                return r.map(|()| got);
            }
        }
    }

    fn send<T: NetlinkSerializable + Debug>(&self, msg: &NetlinkMessage<T>) -> io::Result<()> {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map(drop)
    }
}

/// A request the kernel acknowledges, with `flags` besides.
pub fn request<T: NetlinkSerializable + Debug>(msg: T, flags: u16) -> NetlinkMessage<T> {
    message(msg, NLM_F_REQUEST | NLM_F_ACK | flags)
}

/// A dump request: every object the kernel has of the kind asked.
pub fn dump<T: NetlinkSerializable + Debug>(msg: T) -> NetlinkMessage<T> {
    message(msg, NLM_F_REQUEST | NLM_F_DUMP)
}

fn message<T: NetlinkSerializable + Debug>(msg: T, flags: u16) -> NetlinkMessage<T> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    m
}

/// Reads one datagram of an answer: its messages go to `got`; `Some` once
/// the answer ends (Ok for an acknowledgement or the end of a dump, the
/// kernel's error otherwise); a datagram that does not parse is an error.
pub fn read<T>(mut reply: &[u8], got: &mut Vec<T>) -> Option<io::Result<()>>
where
    T: NetlinkDeserializable + Debug,
{
    while !reply.is_empty() {
        let m = match NetlinkMessage::<T>::deserialize(reply) {
            Ok(m) => m,
            Err(e) => return Some(Err(io::Error::other(format!("netlink reply: {e}")))),
        };
        let len = (m.header.length as usize).max(16);
        match m.payload {
            NetlinkPayload::Error(e) => {
                return Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(e.to_io()),
                });
            }
            NetlinkPayload::Done(_) => return Some(Ok(())),
            NetlinkPayload::InnerMessage(inner) => got.push(inner),
            _ => {}
        }
        reply = reply.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::RouteNetlinkMessage;

    use super::*;

    fn ack(reply: &[u8]) -> Option<io::Result<()>> {
        read::<RouteNetlinkMessage>(reply, &mut Vec::new())
    }

    #[test]
    fn acknowledgements_and_errors_are_read_and_junk_is_refused() {
        let mut ok = vec![0u8; 36];
        ok[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ok[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(matches!(ack(&ok), Some(Ok(()))));
        let mut err = ok.clone();
        err[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        let e = ack(&err).expect("an answer").expect_err("an error");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let mut junk = ok.clone();
        junk[0..4].copy_from_slice(&9u32.to_ne_bytes());
        assert!(matches!(ack(&junk), Some(Err(_))));
        assert!(matches!(ack(&[1, 2, 3]), Some(Err(_))));
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        assert!(matches!(ack(&done), Some(Ok(()))));
    }
}

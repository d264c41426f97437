//! Ports a host process already uses, from `/proc/net/{tcp,udp}` of the
//! agent's network namespace (the host's: the agent runs with the host
//! network). XDP sees a published port's packets before any socket, so a
//! published port that a host process (or Docker's own `-p`, whose
//! docker-proxy listens on it) serves would silently take its traffic:
//! such a port is not published on this node, and the conflict is
//! reported. (Docker's `-p` with `userland-proxy: false` has no listening
//! socket and is not seen.)

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::labels::Proto;

/// TCP state LISTEN and UDP state "unconnected", as /proc prints them.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The ports bound for `proto` on the wildcard address or on `addr`, from
/// the text of `/proc/net/tcp` or `/proc/net/udp`. Lines that do not parse
/// are skipped.
pub fn bound(text: &str, proto: Proto, addr: Option<Ipv4Addr>) -> BTreeSet<u16> {
    let want_state = match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => UDP_UNCONNECTED,
    };
    let mut out = BTreeSet::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(_), Some(local), Some(_), Some(state)) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if state != want_state {
            continue;
        }
        let Some((ip_hex, port_hex)) = local.split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (
            u32::from_str_radix(ip_hex, 16),
            u16::from_str_radix(port_hex, 16),
        ) else {
            continue;
        };
        // The kernel prints the address's bytes (network order) read as
        // a native u32.
        let ip = Ipv4Addr::from(ip.to_ne_bytes());
        if ip.is_unspecified() || Some(ip) == addr {
            out.insert(port);
        }
    }
    out
}

/// What this host's processes hold, read now; empty where /proc cannot be
/// read.
pub fn read(addr: Option<Ipv4Addr>) -> BTreeSet<(u16, Proto)> {
    let mut out = BTreeSet::new();
    for (file, proto) in [("/proc/net/tcp", Proto::Tcp), ("/proc/net/udp", Proto::Udp)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        out.extend(bound(&text, proto, addr).into_iter().map(|p| (p, proto)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:24E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0164A8C0:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   3: 0164A8C0:9C40 0264A8C0:0050 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
garbage line
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:1F0A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5 2 0000000000000000 0
  101: 0100A8C0:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6 2 0000000000000000 0
";

    #[test]
    fn wildcard_and_own_address_count_loopback_and_others_do_not() {
        let me = Some(Ipv4Addr::new(192, 168, 100, 1));
        // 8080 on *, 80 on 192.168.100.1; 9448 on 127.0.0.1 and a
        // connected socket do not count.
        assert_eq!(bound(TCP, Proto::Tcp, me), [80, 8080].into());
        assert_eq!(bound(TCP, Proto::Tcp, None), [8080].into());
        // 7946 on *; 53 on 192.168.0.1 (not this node's address).
        assert_eq!(bound(UDP, Proto::Udp, me), [7946].into());
    }
}

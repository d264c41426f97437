//! A DNS client for tests and benchmarks that counts only real answers:
//! a datagram is an answer when it decodes, carries the query's id, is a
//! response with the expected code and, for a name that should resolve,
//! holds the expected A record. Anything else is an error that says what
//! came back.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

/// What a query must get back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// NOERROR with this address among the A records.
    A(Ipv4Addr),
    /// NOERROR with at least one A record.
    AnyA,
    /// The name does not exist (authoritative NXDOMAIN).
    NxDomain,
    /// NOERROR with an SRV record for this port.
    Srv(u16),
}

/// A query for `name` (type A, recursion desired) with `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    query_type(id, name, RecordType::A)
}

/// A query for `name`'s records of type `rtype` (recursion desired).
pub fn query_type(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries.push(Query::query(
        Name::from_ascii(name).expect("a valid test name"),
        rtype,
    ));
    m.to_vec().expect("encode")
}

/// Checks `reply` against the query `id` and `expect`.
pub fn check(reply: &[u8], id: u16, expect: Expect) -> Result<(), String> {
    let m = Message::from_vec(reply).map_err(|e| format!("undecodable reply: {e}"))?;
    if m.metadata.id != id {
        return Err(format!("id {} for query {id}", m.metadata.id));
    }
    if m.metadata.message_type != MessageType::Response {
        return Err("not a response".into());
    }
    let code = m.metadata.response_code;
    let addrs: Vec<Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    let ok = match expect {
        Expect::A(ip) => code == ResponseCode::NoError && addrs.contains(&ip),
        Expect::AnyA => code == ResponseCode::NoError && !addrs.is_empty(),
        Expect::NxDomain => code == ResponseCode::NXDomain,
        Expect::Srv(port) => {
            code == ResponseCode::NoError
                && m.answers
                    .iter()
                    .any(|r| matches!(&r.data, RData::SRV(s) if s.port == port))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{code} {addrs:?}, wanted {expect:?}"))
    }
}

/// One query on `sock`, sent once (no retry: a lost first try is a
/// failure, not a slower answer), answered within `timeout`; returns the
/// time from the send. Datagrams with another id (late answers to earlier
/// queries) are skipped.
pub fn ask(
    sock: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
    expect: Expect,
    timeout: Duration,
) -> Result<Duration, String> {
    let q = query(id, name);
    let start = Instant::now();
    sock.send_to(&q, server).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!("no answer within {timeout:?}"));
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| format!("timeout: {e}"))?;
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        };
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) != id {
            continue;
        }
        check(&buf[..n], id, expect)?;
        return Ok(start.elapsed());
    }
}

/// The `pct` percentile of `times` (sorted in place); None when empty.
pub fn percentile(times: &mut [Duration], pct: usize) -> Option<Duration> {
    times.sort();
    let last = times.len().checked_sub(1)?;
    times.get(last * pct / 100).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Record, rdata::A};

    fn reply(id: u16, code: ResponseCode, a: Option<Ipv4Addr>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        if let Some(ip) = a {
            m.answers.push(Record::from_rdata(
                Name::from_ascii("x.mesh.").expect("name"),
                5,
                RData::A(A(ip)),
            ));
        }
        m.to_vec().expect("encode")
    }

    #[test]
    fn only_the_expected_answer_counts() {
        let ip = Ipv4Addr::new(10, 43, 0, 10);
        let good = reply(7, ResponseCode::NoError, Some(ip));
        assert_eq!(check(&good, 7, Expect::A(ip)), Ok(()));
        assert!(check(&good, 8, Expect::A(ip)).is_err(), "wrong id");
        assert!(check(&good, 7, Expect::NxDomain).is_err());
        let other = reply(7, ResponseCode::NoError, Some(Ipv4Addr::new(10, 43, 0, 11)));
        assert!(check(&other, 7, Expect::A(ip)).is_err(), "wrong address");
        let fail = reply(7, ResponseCode::ServFail, None);
        assert!(check(&fail, 7, Expect::AnyA).is_err());
        assert!(check(&[0, 7, 0], 7, Expect::AnyA).is_err(), "garbage");
        let nx = reply(7, ResponseCode::NXDomain, None);
        assert_eq!(check(&nx, 7, Expect::NxDomain), Ok(()));
        assert!(
            check(&query(7, "x.mesh."), 7, Expect::NxDomain).is_err(),
            "a query"
        );
    }
}

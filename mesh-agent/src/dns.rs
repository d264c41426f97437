//! Service-name DNS: `NAME` -> VIP, `tasks.NAME` -> every backend, SRV for
//! ports; every other name forwarded to the upstream resolvers.
//!
//! Names (case-insensitive; `<domain>` defaults to `mesh`):
//!
//! | query | answer |
//! | --- | --- |
//! | `NAME`, `NAME.<domain>` A | the VIP (TTL `--dns-vip-ttl`, 60 s) |
//! | `tasks.NAME`, `tasks.NAME.<domain>` A | every live backend (TTL `--dns-tasks-ttl`, 5 s) |
//! | `_NAME._tcp`, `_NAME._udp` (+ `.<domain>`) SRV | one record per VIP port: `0 0 PORT NAME.<domain>.` (RFC 2782 `_Service._Proto.Name`) |
//! | a known name, another type (AAAA...) | NOERROR, no answer |
//! | unknown single labels, `tasks.X`, anything under `<domain>` | NXDOMAIN |
//! | everything else | forwarded upstream (UDP; TCP when the answer is truncated) |
//!
//! The zone is replaced by the reconciler after every pass; queries read
//! the current one. Malformed packets are dropped and counted; answers too
//! big for the client's UDP size are truncated (TC) and complete over TCP.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, Metadata, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA, SRV},
    },
    serialize::binary::BinEncoder,
};
use hickory_server::{
    net::{NetError, xfer::Protocol},
    server::{Request, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tracing::{debug, warn};

use crate::labels::Proto;

/// One service as DNS sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneService {
    pub vip: Option<Ipv4Addr>,
    /// VIP ports.
    pub ports: Vec<(u16, Proto)>,
    /// Live backends (active ones; draining and unhealthy are left out).
    pub tasks: Vec<Ipv4Addr>,
}

/// Service name (lower case) -> what to answer.
pub type Zone = BTreeMap<String, ZoneService>;

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The mesh domain, without dots at the ends ("mesh").
    pub domain: String,
    pub vip_ttl: u32,
    pub tasks_ttl: u32,
    pub upstreams: Vec<SocketAddr>,
}

/// Query counters, for /metrics.
#[derive(Default)]
pub struct DnsStats {
    /// (query type, result) -> count.
    pub queries: Mutex<BTreeMap<(String, &'static str), u64>>,
    pub malformed: AtomicU64,
}

impl DnsStats {
    fn count(&self, qtype: RecordType, result: &'static str) {
        let mut q = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        *q.entry((qtype.to_string(), result)).or_default() += 1;
    }
}

/// What a query name means.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Service(String),
    Tasks(String),
    Srv(String, Proto),
    /// In the mesh namespace, but not a name we know how to answer.
    Unknown,
    /// Not ours: forward.
    Forward,
}

/// Classifies a lower-case name with or without its trailing dot.
fn classify(name: &str, domain: &str) -> Target {
    let name = name.trim_end_matches('.');
    let (local, in_domain) = match name.strip_suffix(domain).and_then(|n| n.strip_suffix('.')) {
        Some(local) => (local, true),
        None if name == domain => return Target::Unknown,
        None => (name, false),
    };
    let labels: Vec<&str> = local.split('.').collect();
    match labels.as_slice() {
        [svc] if !svc.is_empty() && !svc.starts_with('_') => Target::Service(svc.to_string()),
        ["tasks", svc] => Target::Tasks(svc.to_string()),
        [svc, proto] if svc.starts_with('_') && (*proto == "_tcp" || *proto == "_udp") => {
            let p = if *proto == "_tcp" {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            Target::Srv(svc.trim_start_matches('_').to_string(), p)
        }
        _ if in_domain => Target::Unknown,
        _ => Target::Forward,
    }
}

pub struct Handler {
    zone: Arc<RwLock<Zone>>,
    cfg: DnsConfig,
    pub stats: Arc<DnsStats>,
}

impl Handler {
    pub fn new(zone: Arc<RwLock<Zone>>, cfg: DnsConfig, stats: Arc<DnsStats>) -> Self {
        Handler { zone, cfg, stats }
    }

    fn fqdn(&self, service: &str) -> Name {
        Name::from_ascii(format!("{service}.{}.", self.cfg.domain)).unwrap_or_else(|_| Name::root())
    }

    fn soa(&self) -> Record {
        let zone =
            Name::from_ascii(format!("{}.", self.cfg.domain)).unwrap_or_else(|_| Name::root());
        let host =
            Name::from_ascii(format!("ns.{}.", self.cfg.domain)).unwrap_or_else(|_| Name::root());
        let admin = Name::from_ascii(format!("hostmaster.{}.", self.cfg.domain))
            .unwrap_or_else(|_| Name::root());
        let soa = SOA::new(host, admin, 1, 60, 60, 600, self.cfg.tasks_ttl);
        Record::from_rdata(zone, self.cfg.tasks_ttl, RData::SOA(soa))
    }

    /// Answers one request through `responder`.
    pub async fn handle<R: ResponseHandler>(
        &self,
        request: &Request,
        mut responder: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Some(query) = request.queries.queries().first() else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return send(
                &mut responder,
                builder.error_msg(&request.metadata, ResponseCode::FormErr),
                request,
            )
            .await;
        };
        let qtype = query.query_type();
        let qname: Name = query.name().clone().into();
        let target = classify(&qname.to_ascii().to_ascii_lowercase(), &self.cfg.domain);
        if target == Target::Forward {
            return self.forward(request, responder, qtype).await;
        }
        let (code, answers, additionals) = self.lookup(&target, &qname, qtype);
        let result = match (code, answers.is_empty()) {
            (ResponseCode::NXDomain, _) => "nxdomain",
            (_, true) => "nodata",
            _ => "answer",
        };
        self.stats.count(qtype, result);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = true;
        meta.response_code = code;
        let soa = if answers.is_empty() {
            vec![self.soa()]
        } else {
            Vec::new()
        };
        let response = builder.build(
            meta,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            additionals.iter(),
        );
        send(&mut responder, response, request).await
    }

    /// (rcode, answers, additionals) for a name in the mesh namespace.
    fn lookup(
        &self,
        target: &Target,
        qname: &Name,
        qtype: RecordType,
    ) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        let zone = self.zone.read().unwrap_or_else(|p| p.into_inner());
        let a = |ip: Ipv4Addr, ttl: u32, name: &Name| {
            Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))
        };
        let wants_a = matches!(qtype, RecordType::A | RecordType::ANY);
        match target {
            Target::Service(svc) => match zone.get(svc) {
                Some(s) => {
                    let answers = match (wants_a, s.vip) {
                        (true, Some(vip)) => vec![a(vip, self.cfg.vip_ttl, qname)],
                        _ => Vec::new(),
                    };
                    (ResponseCode::NoError, answers, Vec::new())
                }
                None => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
            },
            Target::Tasks(svc) => match zone.get(svc) {
                Some(s) => {
                    let answers = if wants_a {
                        s.tasks
                            .iter()
                            .map(|ip| a(*ip, self.cfg.tasks_ttl, qname))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    (ResponseCode::NoError, answers, Vec::new())
                }
                None => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
            },
            Target::Srv(svc, proto) => match zone.get(svc) {
                Some(s) => {
                    let target = self.fqdn(svc);
                    let answers: Vec<Record> = if matches!(qtype, RecordType::SRV | RecordType::ANY)
                    {
                        s.ports
                            .iter()
                            .filter(|(_, p)| p == proto)
                            .map(|(port, _)| {
                                Record::from_rdata(
                                    qname.clone(),
                                    self.cfg.vip_ttl,
                                    RData::SRV(SRV::new(0, 0, *port, target.clone())),
                                )
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let extra = match (answers.is_empty(), s.vip) {
                        (false, Some(vip)) => vec![a(vip, self.cfg.vip_ttl, &target)],
                        _ => Vec::new(),
                    };
                    (ResponseCode::NoError, answers, extra)
                }
                None => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
            },
            Target::Unknown | Target::Forward => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
        }
    }

    /// Relays the query to the first upstream that answers.
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        mut responder: R,
        qtype: RecordType,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        for upstream in &self.cfg.upstreams {
            let answer = match forward_udp(*upstream, request.as_slice()).await {
                Ok(m) if m.metadata.truncation && request.protocol() == Protocol::Tcp => {
                    forward_tcp(*upstream, request.as_slice()).await
                }
                other => other,
            };
            match answer {
                Ok(m) if m.metadata.id == request.metadata.id => {
                    self.stats.count(qtype, "forwarded");
                    let mut meta = Metadata::response_from_request(&request.metadata);
                    meta.recursion_available = m.metadata.recursion_available;
                    meta.authoritative = m.metadata.authoritative;
                    meta.truncation = m.metadata.truncation;
                    meta.response_code = m.metadata.response_code;
                    let response = builder.build(
                        meta,
                        m.answers.iter(),
                        m.authorities.iter(),
                        std::iter::empty(),
                        m.additionals.iter(),
                    );
                    return send(&mut responder, response, request).await;
                }
                Ok(_) => debug!(%upstream, "upstream answered with another id"),
                Err(e) => debug!(%upstream, error = %e, "upstream failed"),
            }
        }
        self.stats.count(qtype, "servfail");
        send(
            &mut responder,
            builder.error_msg(&request.metadata, ResponseCode::ServFail),
            request,
        )
        .await
    }
}

async fn send<'a, R: ResponseHandler>(
    responder: &mut R,
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match responder.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "sending a DNS response failed");
            let mut meta = Metadata::response_from_request(&request.metadata);
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_proto::op::Header {
                metadata: meta,
                counts: Default::default(),
            })
        }
    }
}

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> Result<Message, String> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(upstream).await.map_err(|e| e.to_string())?;
    sock.send(query).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf[..n]).map_err(|e| e.to_string())
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> Result<Message, String> {
    let io = async {
        let mut s = TcpStream::connect(upstream).await?;
        s.write_all(&(query.len() as u16).to_be_bytes()).await?;
        s.write_all(query).await?;
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(UPSTREAM_TIMEOUT, io)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf).map_err(|e| e.to_string())
}

/// Encodes a response in at most `max` bytes: records that do not fit are
/// left out and the TC flag set.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max: u16,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let mut bytes = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut bytes);
    enc.set_max_size(max);
    let info = response
        .destructive_emit(&mut enc)
        .map_err(|e| NetError::from(e.to_string()))?;
    Ok((info, bytes))
}

/// Sends responses over UDP, truncated (TC) to what the client can take.
#[derive(Clone)]
struct UdpResponder {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
    max: u16,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, self.max)?;
        self.sock.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// Sends responses over a TCP connection (2-byte length prefix).
#[derive(Clone)]
struct TcpResponder {
    out: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
}

#[async_trait::async_trait]
impl ResponseHandler for TcpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode(response, u16::MAX)?;
        let mut out = self.out.lock().await;
        out.write_all(&(bytes.len() as u16).to_be_bytes()).await?;
        out.write_all(&bytes).await?;
        Ok(info)
    }
}

/// Parses a query; `None` (counted) when it is malformed or not a query.
fn parse(raw: Vec<u8>, src: SocketAddr, protocol: Protocol, stats: &DnsStats) -> Option<Request> {
    match Request::from_bytes(raw, src, protocol) {
        Ok(r) if r.metadata.message_type == hickory_proto::op::MessageType::Query => Some(r),
        _ => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Serves DNS on `addr` over UDP and TCP until the process ends.
pub async fn serve(addr: SocketAddr, handler: Arc<Handler>) -> std::io::Result<()> {
    let udp = Arc::new(UdpSocket::bind(addr).await?);
    let tcp = TcpListener::bind(addr).await?;
    let h = handler.clone();
    tokio::spawn(async move {
        loop {
            let Ok((conn, src)) = tcp.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move { serve_tcp_conn(conn, src, h).await });
        }
    });
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "DNS UDP receive");
                continue;
            }
        };
        let Some(req) = parse(buf[..n].to_vec(), src, Protocol::Udp, &handler.stats) else {
            continue;
        };
        let responder = UdpResponder {
            sock: udp.clone(),
            dst: src,
            max: req.max_payload(),
        };
        let h = handler.clone();
        tokio::spawn(async move {
            h.handle(&req, responder).await;
        });
    }
}

/// One TCP client: length-prefixed queries until EOF, an idle gap of
/// 10 s, or a malformed query.
async fn serve_tcp_conn(conn: TcpStream, src: SocketAddr, h: Arc<Handler>) {
    let (mut r, w) = conn.into_split();
    let out = Arc::new(tokio::sync::Mutex::new(w));
    loop {
        let read = async {
            let len = r.read_u16().await? as usize;
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let Ok(Ok(raw)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
            return;
        };
        let Some(req) = parse(raw, src, Protocol::Tcp, &h.stats) else {
            return;
        };
        h.handle(&req, TcpResponder { out: out.clone() }).await;
    }
}

/// The nameservers in a resolv.conf, on port 53; `skip` (our own address)
/// left out.
pub fn upstreams_from_resolv_conf(text: &str, skip: std::net::IpAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != skip)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_targets() {
        let d = "mesh";
        assert_eq!(classify("whoami.", d), Target::Service("whoami".into()));
        assert_eq!(
            classify("whoami.mesh.", d),
            Target::Service("whoami".into())
        );
        assert_eq!(classify("tasks.whoami.", d), Target::Tasks("whoami".into()));
        assert_eq!(
            classify("tasks.whoami.mesh", d),
            Target::Tasks("whoami".into())
        );
        assert_eq!(
            classify("_whoami._tcp.mesh.", d),
            Target::Srv("whoami".into(), Proto::Tcp)
        );
        assert_eq!(
            classify("_dns._udp.", d),
            Target::Srv("dns".into(), Proto::Udp)
        );
        assert_eq!(classify("a.b.mesh.", d), Target::Unknown);
        assert_eq!(classify("mesh.", d), Target::Unknown);
        assert_eq!(classify("example.com.", d), Target::Forward);
        assert_eq!(classify("tasks.example.com.", d), Target::Forward);
    }

    #[test]
    fn resolv_conf() {
        let text = "# x\nnameserver 10.0.0.2\nnameserver 10.42.0.1\nsearch lan\nnameserver ::1\nnameserver bogus\n";
        let got = upstreams_from_resolv_conf(text, "10.42.0.1".parse().expect("ip"));
        assert_eq!(
            got,
            vec![
                "10.0.0.2:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
    }
}

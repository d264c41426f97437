//! Answering from the zone; what is not ours goes to `forward.rs`.

use std::{
    net::Ipv4Addr,
    sync::{Arc, RwLock, atomic::Ordering},
};

use hickory_proto::{
    op::{Metadata, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA, SRV},
    },
};
use hickory_server::{
    net::xfer::Protocol,
    server::{Request, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
};
use tracing::{debug, warn};

use crate::labels::Proto;

use super::{
    DnsConfig, DnsStats, Zone,
    forward::{forward_tcp, forward_udp},
};

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    Service(String),
    Tasks(String),
    Srv(String, Proto),
    /// In the mesh namespace, but not a name we know how to answer.
    Unknown,
    /// Not ours: forward.
    Forward,
}

/// Classifies a lower-case name with or without its trailing dot.
pub(super) fn classify(name: &str, domain: &str) -> Target {
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
    /// The upstreams once the server knows its own address (never itself).
    upstreams: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
    /// Forwarded queries in flight ([`super::MAX_FORWARDS`]).
    forwarding: tokio::sync::Semaphore,
}

impl Handler {
    pub fn new(zone: Arc<RwLock<Zone>>, cfg: DnsConfig, stats: Arc<DnsStats>) -> Self {
        Handler {
            zone,
            cfg,
            stats,
            upstreams: std::sync::OnceLock::new(),
            forwarding: tokio::sync::Semaphore::new(super::MAX_FORWARDS),
        }
    }

    /// Leaves the server's own address (`listen`; any `local` address on
    /// its port when it listens on all) out of the upstreams; what it left
    /// out.
    pub fn exclude_self(
        &self,
        listen: std::net::SocketAddr,
        local: &[std::net::IpAddr],
    ) -> Vec<std::net::SocketAddr> {
        let (kept, dropped) = super::without_self(&self.cfg.upstreams, listen, local);
        let _ = self.upstreams.set(kept);
        dropped
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
        // Bounded: past the limit, SERVFAIL at once rather than one more
        // socket and buffer waiting on an upstream.
        let Ok(_permit) = self.forwarding.try_acquire() else {
            self.stats.count(qtype, "overload");
            return send(
                &mut responder,
                builder.error_msg(&request.metadata, ResponseCode::ServFail),
                request,
            )
            .await;
        };
        let upstreams = self.upstreams.get().unwrap_or(&self.cfg.upstreams);
        for upstream in upstreams {
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

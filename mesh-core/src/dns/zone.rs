//! Answering from the zone; what is not ours goes to `forward.rs`.

use std::{
    net::Ipv4Addr,
    sync::{Arc, RwLock, atomic::Ordering},
};

use hickory_proto::{
    op::{Edns, Metadata, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, NS, PTR, SOA, SRV},
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
    DnsConfig, DnsStats, SharedZone, Zone, ZoneService,
    forward::{forward_tcp, forward_udp},
};

/// A lookup's response code, answers and additional records.
type Answer = (ResponseCode, Vec<Record>, Vec<Record>);

/// An A record.
fn a(ip: Ipv4Addr, ttl: u32, name: &Name) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    Service(String),
    Tasks(String),
    Srv(String, Proto),
    /// The zone's apex (`mesh.`): SOA and NS.
    Apex,
    /// A reverse name (`D.C.B.A.in-addr.arpa.`): ours if A.B.C.D is a VIP
    /// or a task, else forwarded.
    Reverse(Ipv4Addr),
    /// In the mesh namespace, but not a name we know how to answer.
    Unknown,
    /// Not ours: forward.
    Forward,
}

/// Classifies a lower-case name with or without its trailing dot.
pub(super) fn classify(name: &str, domain: &str) -> Target {
    let name = name.trim_end_matches('.');
    if let Some(ip) = reverse_v4(name) {
        return Target::Reverse(ip);
    }
    let (local, in_domain) = match name.strip_suffix(domain).and_then(|n| n.strip_suffix('.')) {
        Some(local) => (local, true),
        None if name == domain => return Target::Apex,
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

/// The address of `D.C.B.A.in-addr.arpa` (lower case, no trailing dot).
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let octets: Vec<u8> = name
        .strip_suffix(".in-addr.arpa")?
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    match octets.as_slice() {
        [d, c, b, a] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
        _ => None,
    }
}

/// The EDNS a response carries when the query had one (RFC 6891: an OPT
/// in the query means an OPT in the response).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|_| {
        let mut e = Edns::new();
        e.set_max_payload(RESPONSE_PAYLOAD);
        e.set_version(0);
        e
    })
}

/// The UDP payload size this server announces in its OPT.
const RESPONSE_PAYLOAD: u16 = 1232;

pub struct Handler {
    zone: Arc<SharedZone>,
    cfg: DnsConfig,
    pub stats: Arc<DnsStats>,
    /// The upstreams once the server knows its own address (never itself).
    upstreams: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
    /// Forwarded queries in flight ([`super::MAX_FORWARDS`]).
    forwarding: tokio::sync::Semaphore,
    /// This host's addresses (always allowed to ask), set when serving.
    local: std::sync::OnceLock<Vec<std::net::IpAddr>>,
    /// The subnets of the engine's other networks (allowed to ask), as
    /// the agent last listed them.
    engine_nets: RwLock<Vec<super::Net>>,
    /// The overlay networks besides `mesh`, by subnet: an asker there sees
    /// its network's services (allowed to ask).
    networks: RwLock<Vec<(super::Net, Arc<str>)>>,
}

/// The zone's key for `service` as seen from network `view` (None: `mesh`),
/// as `crate::desired::service_key` makes them.
fn key(service: &str, view: Option<&str>) -> String {
    match view {
        Some(n) => format!("{service}@{n}"),
        None => service.to_owned(),
    }
}

impl Handler {
    pub fn new(zone: Arc<SharedZone>, cfg: DnsConfig, stats: Arc<DnsStats>) -> Self {
        Handler {
            zone,
            cfg,
            stats,
            upstreams: std::sync::OnceLock::new(),
            forwarding: tokio::sync::Semaphore::new(super::MAX_FORWARDS),
            local: std::sync::OnceLock::new(),
            engine_nets: RwLock::default(),
            networks: RwLock::default(),
        }
    }

    /// The overlay networks changed: their containers ask, each in its view.
    pub fn set_networks(&self, nets: Vec<(super::Net, String)>) {
        *self.networks.write().unwrap_or_else(|p| p.into_inner()) =
            nets.into_iter().map(|(n, name)| (n, name.into())).collect();
    }

    /// The network whose view `src` gets (None: `mesh`'s).
    pub(super) fn view(&self, src: std::net::IpAddr) -> Option<Arc<str>> {
        let std::net::IpAddr::V4(v4) = src else {
            return None;
        };
        let nets = self.networks.read().unwrap_or_else(|p| p.into_inner());
        nets.iter()
            .find(|(n, _)| n.contains(v4))
            .map(|(_, name)| name.clone())
    }

    /// The zone's generation (read before answering from it).
    pub(super) fn generation(&self) -> u64 {
        self.zone.generation()
    }

    /// The engine's other networks changed: their containers may ask.
    pub fn set_engine_nets(&self, nets: Vec<super::Net>) {
        *self.engine_nets.write().unwrap_or_else(|p| p.into_inner()) = nets;
    }

    /// Records this host's addresses (always allowed to ask).
    pub fn set_local(&self, local: Vec<std::net::IpAddr>) {
        let _ = self.local.set(local);
    }

    /// Whether `src` may ask; refusals are counted.
    pub fn admits(&self, src: std::net::IpAddr) -> bool {
        let local = self.local.get().map_or(&[][..], Vec::as_slice);
        let ok = super::allowed(&self.cfg.clients, local, &[], src) || {
            let engine = self.engine_nets.read().unwrap_or_else(|p| p.into_inner());
            let networks = self.networks.read().unwrap_or_else(|p| p.into_inner());
            let nets = networks.iter().map(|(n, _)| *n);
            super::allowed(
                &self.cfg.clients,
                local,
                &engine.iter().copied().chain(nets).collect::<Vec<_>>(),
                src,
            )
        };
        if !ok {
            self.stats.refused_source.fetch_add(1, Ordering::Relaxed);
        }
        ok
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

    /// Whether `request` goes to an upstream (its answer waits on the
    /// network); every other request is answered from memory at once.
    pub fn forwards(&self, request: &Request) -> bool {
        if request.metadata.op_code != OpCode::Query
            || request.edns.as_ref().is_some_and(|e| e.version() > 0)
        {
            return false;
        }
        request
            .queries
            .queries()
            .first()
            .is_some_and(|q| self.target(&q.name().clone().into()) == Target::Forward)
    }

    /// What `qname` asks for; a reverse name this zone does not know is
    /// forwarded.
    fn target(&self, qname: &Name) -> Target {
        match classify(&qname.to_ascii().to_ascii_lowercase(), &self.cfg.domain) {
            Target::Reverse(ip) if !self.knows(ip) => Target::Forward,
            t => t,
        }
    }

    /// Answers one request through `responder`.
    pub async fn handle<R: ResponseHandler>(
        &self,
        request: &Request,
        mut responder: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
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
        // Only standard queries (STATUS, NOTIFY, UPDATE: not implemented),
        // only EDNS version 0 (RFC 6891: BADVERS, with our version).
        let refusal = if request.metadata.op_code != OpCode::Query {
            Some((ResponseCode::NotImp, "notimp"))
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some((ResponseCode::BADVERS, "badvers"))
        } else {
            None
        };
        if let Some((code, result)) = refusal {
            self.stats.count(qtype, result);
            return send(
                &mut responder,
                builder.error_msg(&request.metadata, code),
                request,
            )
            .await;
        }
        let qname: Name = query.name().clone().into();
        let target = self.target(&qname);
        if target == Target::Forward {
            return self.forward(request, responder, qtype, edns.as_ref()).await;
        }
        let view = self.view(request.src().ip());
        let (code, answers, additionals) = self.lookup(&target, &qname, qtype, view.as_deref());
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
        // NXDOMAIN and NODATA carry the zone's SOA (negative caching).
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
    /// `view`: the asker's network (None: `mesh`); a name of another
    /// network's is NXDOMAIN.
    fn lookup(
        &self,
        target: &Target,
        qname: &Name,
        qtype: RecordType,
        view: Option<&str>,
    ) -> Answer {
        let zone = self.zone.read();
        let wants_a = matches!(qtype, RecordType::A | RecordType::ANY);
        let found = |svc: &String| zone.get(&key(svc, view)).ok_or(ResponseCode::NXDomain);
        let answer = match target {
            Target::Service(svc) => found(svc).map(|s| match (wants_a, s.vip) {
                (true, Some(vip)) => (vec![a(vip, self.cfg.vip_ttl, qname)], Vec::new()),
                _ => (Vec::new(), Vec::new()),
            }),
            Target::Tasks(svc) => found(svc).map(|s| {
                let tasks = s.tasks.iter().map(|ip| a(*ip, self.cfg.tasks_ttl, qname));
                (
                    if wants_a { tasks.collect() } else { Vec::new() },
                    Vec::new(),
                )
            }),
            Target::Srv(svc, proto) => found(svc).map(|s| self.srv(svc, s, *proto, qname, qtype)),
            Target::Apex => Ok((
                match qtype {
                    RecordType::SOA => vec![self.soa()],
                    RecordType::NS => vec![self.ns()],
                    RecordType::ANY => vec![self.soa(), self.ns()],
                    _ => Vec::new(),
                },
                Vec::new(),
            )),
            Target::Reverse(ip) if matches!(qtype, RecordType::PTR | RecordType::ANY) => {
                Ok((self.ptr(&zone, *ip, qname, view), Vec::new()))
            }
            Target::Reverse(_) => Ok((Vec::new(), Vec::new())),
            Target::Unknown | Target::Forward => Err(ResponseCode::NXDomain),
        };
        match answer {
            Ok((answers, extra)) => (ResponseCode::NoError, answers, extra),
            Err(code) => (code, Vec::new(), Vec::new()),
        }
    }

    /// SRV records for `svc`'s ports of `proto`, and its VIP as the
    /// additional record for their target.
    fn srv(
        &self,
        svc: &str,
        s: &ZoneService,
        proto: Proto,
        qname: &Name,
        qtype: RecordType,
    ) -> (Vec<Record>, Vec<Record>) {
        let target = self.fqdn(svc);
        if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
            return (Vec::new(), Vec::new());
        }
        let answers: Vec<Record> = s
            .ports
            .iter()
            .filter(|(_, p)| *p == proto)
            .map(|(port, _)| {
                Record::from_rdata(
                    qname.clone(),
                    self.cfg.vip_ttl,
                    RData::SRV(SRV::new(0, 0, *port, target.clone())),
                )
            })
            .collect();
        let extra = match (answers.is_empty(), s.vip) {
            (false, Some(vip)) => vec![a(vip, self.cfg.vip_ttl, &target)],
            _ => Vec::new(),
        };
        (answers, extra)
    }

    /// PTR records for `ip`: the service whose VIP it is, or whose task.
    fn ptr(&self, zone: &Zone, ip: Ipv4Addr, qname: &Name, view: Option<&str>) -> Vec<Record> {
        zone.iter()
            .filter_map(|(k, s)| {
                // Only names of the asker's network, by their name there.
                let name = match (k.split_once('@'), view) {
                    (None, None) => k.as_str(),
                    (Some((name, net)), Some(v)) if net == v => name,
                    _ => return None,
                };
                if s.vip == Some(ip) {
                    Some(self.fqdn(name))
                } else if s.tasks.contains(&ip) {
                    Some(self.fqdn(&format!("tasks.{name}")))
                } else {
                    None
                }
            })
            .map(|target| {
                Record::from_rdata(qname.clone(), self.cfg.tasks_ttl, RData::PTR(PTR(target)))
            })
            .collect()
    }

    /// Whether `ip` is a VIP or a task of the zone (its reverse name is
    /// ours to answer).
    fn knows(&self, ip: Ipv4Addr) -> bool {
        let zone = self.zone.read();
        zone.values()
            .any(|s| s.vip == Some(ip) || s.tasks.contains(&ip))
    }

    fn ns(&self) -> Record {
        let zone =
            Name::from_ascii(format!("{}.", self.cfg.domain)).unwrap_or_else(|_| Name::root());
        let host =
            Name::from_ascii(format!("ns.{}.", self.cfg.domain)).unwrap_or_else(|_| Name::root());
        Record::from_rdata(zone, self.cfg.vip_ttl, RData::NS(NS(host)))
    }

    /// Relays the query to the first upstream that answers.
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        mut responder: R,
        qtype: RecordType,
        edns: Option<&Edns>,
    ) -> ResponseInfo {
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns {
            builder.edns(e);
        }
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

//! The container label grammar.
//!
//! ```text
//! mesh.service = NAME                  a DNS label: 1-63 of [a-z0-9-], not starting
//!                                      or ending with '-'; case-insensitive
//! mesh.port    = SPEC[,SPEC...]        SPEC = VIPPORT[:CONTAINERPORT][/tcp|/udp]
//!                                      default container port = VIP port, default tcp
//! mesh.publish = PUBLISHED:VIPPORT[/tcp|/udp][,...]   (routing mesh)
//! ```
//!
//! Examples: `mesh.port=80` (VIP:80 -> container:80/tcp),
//! `mesh.port=80:8080/tcp,53/udp`. A container without `mesh.service` is not
//! part of any service. A service container without `mesh.port` is in DNS
//! (`tasks.NAME`) but has no VIP ports. Ports are 1-65535; one VIP
//! port/protocol may appear once per container.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "mesh.service";
pub const PORT: &str = "mesh.port";
pub const PUBLISH: &str = "mesh.publish";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => mesh_common::lb::PROTO_TCP,
            Proto::Udp => mesh_common::lb::PROTO_UDP,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// VIP port -> container port, for one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortMap {
    pub vip_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

/// A published port: every node's address, this port -> the service's VIP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Publish {
    pub published: u16,
    pub vip_port: u16,
    pub proto: Proto,
}

/// What a container's labels say about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceLabels {
    pub service: String,
    pub ports: Vec<PortMap>,
    pub publish: Vec<Publish>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error(
        "{SERVICE}={0:?}: not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
    )]
    BadName(String),
    #[error("{label}={value:?}: {why}")]
    BadPort {
        label: &'static str,
        value: String,
        why: String,
    },
    #[error("{PORT}: VIP port {port}/{proto} is given twice")]
    Conflict { port: u16, proto: Proto },
    #[error("{0} is set but {SERVICE} is not")]
    NoService(&'static str),
    #[error("{label} lists {count} ports; at most {MAX_PORTS} per container")]
    TooMany { label: &'static str, count: usize },
}

/// Ports one container may list in `mesh.port` or `mesh.publish`: every
/// port is a service, a ring and an entry on every node, so a label with
/// thousands would cost every node (a 20,000-port label made the ring batch
/// fail on every pass everywhere). Beyond it, the container is skipped with
/// the reason.
pub const MAX_PORTS: usize = 32;

/// The comma-separated specs of `label`, at most [`MAX_PORTS`].
fn specs<'a>(label: &'static str, value: &'a str) -> Result<Vec<&'a str>, LabelError> {
    let specs: Vec<&str> = value.split(',').collect();
    if specs.len() > MAX_PORTS {
        return Err(LabelError::TooMany {
            label,
            count: specs.len(),
        });
    }
    Ok(specs)
}

/// Parses a container's labels: `Ok(None)` when it is not a mesh service.
pub fn parse(labels: &HashMap<String, String>) -> Result<Option<ServiceLabels>, LabelError> {
    let Some(name) = labels.get(SERVICE) else {
        for l in [PORT, PUBLISH] {
            if labels.contains_key(l) {
                return Err(LabelError::NoService(l));
            }
        }
        return Ok(None);
    };
    let service = service_name(name)?;
    let ports = match labels.get(PORT) {
        Some(v) => port_list(v)?,
        None => Vec::new(),
    };
    let publish = match labels.get(PUBLISH) {
        Some(v) => publish_list(v)?,
        None => Vec::new(),
    };
    Ok(Some(ServiceLabels {
        service,
        ports,
        publish,
    }))
}

/// A service name: a DNS label, lower-cased.
pub fn service_name(s: &str) -> Result<String, LabelError> {
    let n = s.trim().to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-');
    if ok {
        Ok(n)
    } else {
        Err(LabelError::BadName(s.to_owned()))
    }
}

fn port(label: &'static str, value: &str, s: &str) -> Result<u16, LabelError> {
    let bad = |why: String| LabelError::BadPort {
        label,
        value: value.to_owned(),
        why,
    };
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| bad(format!("{s:?} is not a port number")))?;
    match n {
        1..=65535 => Ok(n as u16),
        _ => Err(bad(format!("port {n} is outside 1-65535"))),
    }
}

fn proto(label: &'static str, value: &str, s: Option<&str>) -> Result<Proto, LabelError> {
    match s.map(|p| p.trim().to_ascii_lowercase()).as_deref() {
        None | Some("tcp") => Ok(Proto::Tcp),
        Some("udp") => Ok(Proto::Udp),
        Some(other) => Err(LabelError::BadPort {
            label,
            value: value.to_owned(),
            why: format!("unknown protocol {other:?} (tcp or udp)"),
        }),
    }
}

fn port_list(value: &str) -> Result<Vec<PortMap>, LabelError> {
    let mut out: Vec<PortMap> = Vec::new();
    for spec in specs(PORT, value)? {
        let (ports, p) = match spec.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (spec, None),
        };
        let proto = proto(PORT, value, p)?;
        let (vip_port, container_port) = match ports.split_once(':') {
            Some((v, c)) => (port(PORT, value, v)?, port(PORT, value, c)?),
            None => {
                let v = port(PORT, value, ports)?;
                (v, v)
            }
        };
        if out
            .iter()
            .any(|m| m.vip_port == vip_port && m.proto == proto)
        {
            return Err(LabelError::Conflict {
                port: vip_port,
                proto,
            });
        }
        out.push(PortMap {
            vip_port,
            container_port,
            proto,
        });
    }
    out.sort();
    Ok(out)
}

fn publish_list(value: &str) -> Result<Vec<Publish>, LabelError> {
    let mut out: Vec<Publish> = Vec::new();
    for spec in specs(PUBLISH, value)? {
        let (ports, p) = match spec.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (spec, None),
        };
        let proto = proto(PUBLISH, value, p)?;
        let (published, vip_port) = ports.split_once(':').ok_or_else(|| LabelError::BadPort {
            label: PUBLISH,
            value: value.to_owned(),
            why: format!("{spec:?} is not PUBLISHED:PORT[/proto]"),
        })?;
        let (published, vip_port) = (
            port(PUBLISH, value, published)?,
            port(PUBLISH, value, vip_port)?,
        );
        if out
            .iter()
            .any(|m| m.published == published && m.proto == proto)
        {
            return Err(LabelError::Conflict {
                port: published,
                proto,
            });
        }
        out.push(Publish {
            published,
            vip_port,
            proto,
        });
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_lists_a_bounded_number_of_ports() {
        let many: Vec<String> = (1..=20_000).map(|p| p.to_string()).collect();
        let l = labels(&[("mesh.service", "web"), ("mesh.port", &many.join(","))]);
        let e = parse(&l).expect_err("20,000 ports are refused");
        assert_eq!(
            e.to_string(),
            "mesh.port lists 20000 ports; at most 32 per container"
        );
        let ok: Vec<String> = (1..=32).map(|p| p.to_string()).collect();
        let l = labels(&[("mesh.service", "web"), ("mesh.port", &ok.join(","))]);
        assert_eq!(
            parse(&l)
                .expect("32 are fine")
                .expect("a service")
                .ports
                .len(),
            32
        );
        let publish: Vec<String> = (1..=33).map(|p| format!("{}:80", 30000 + p)).collect();
        let l = labels(&[
            ("mesh.service", "web"),
            ("mesh.port", "80"),
            ("mesh.publish", &publish.join(",")),
        ]);
        assert!(matches!(
            parse(&l),
            Err(LabelError::TooMany {
                label: "mesh.publish",
                count: 33
            })
        ));
    }

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn not_a_service() {
        assert_eq!(parse(&labels(&[("other", "x")])), Ok(None));
        assert_eq!(
            parse(&labels(&[(PORT, "80")])),
            Err(LabelError::NoService(PORT))
        );
    }

    #[test]
    fn good_labels() {
        let l = parse(&labels(&[
            (SERVICE, "WhoAmI"),
            (PORT, "80:8080/tcp, 53/UDP,443"),
        ]))
        .expect("valid")
        .expect("service");
        assert_eq!(l.service, "whoami");
        assert_eq!(
            l.ports,
            vec![
                PortMap {
                    vip_port: 53,
                    container_port: 53,
                    proto: Proto::Udp
                },
                PortMap {
                    vip_port: 80,
                    container_port: 8080,
                    proto: Proto::Tcp
                },
                PortMap {
                    vip_port: 443,
                    container_port: 443,
                    proto: Proto::Tcp
                },
            ]
        );
        let l = parse(&labels(&[(SERVICE, "web"), (PUBLISH, "8080:80/tcp")]))
            .expect("valid")
            .expect("service");
        assert_eq!(
            l.publish,
            vec![Publish {
                published: 8080,
                vip_port: 80,
                proto: Proto::Tcp
            }]
        );
        assert!(l.ports.is_empty(), "DNS-only service");
    }

    #[test]
    fn bad_labels_say_why() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(SERVICE, "")], "not a DNS label"),
            (&[(SERVICE, "-web")], "not a DNS label"),
            (&[(SERVICE, "a.b")], "not a DNS label"),
            (&[(SERVICE, &"x".repeat(64))], "not a DNS label"),
            (
                &[(SERVICE, "web"), (PORT, "80/sctp")],
                "unknown protocol \"sctp\"",
            ),
            (&[(SERVICE, "web"), (PORT, "0")], "outside 1-65535"),
            (&[(SERVICE, "web"), (PORT, "70000")], "outside 1-65535"),
            (&[(SERVICE, "web"), (PORT, "http")], "not a port number"),
            (&[(SERVICE, "web"), (PORT, "80:")], "not a port number"),
            (&[(SERVICE, "web"), (PORT, "")], "not a port number"),
            (
                &[(SERVICE, "web"), (PORT, "80:8080,80:9090")],
                "given twice",
            ),
            (&[(SERVICE, "web"), (PUBLISH, "8080")], "not PUBLISHED:PORT"),
        ];
        for (kv, want) in cases {
            let e = parse(&labels(kv)).expect_err("must be rejected");
            assert!(e.to_string().contains(want), "{kv:?}: {e} (want {want:?})");
        }
        // Same port, different protocols: fine.
        assert!(parse(&labels(&[(SERVICE, "dns"), (PORT, "53/tcp,53/udp")])).is_ok());
    }
}

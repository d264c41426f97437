//! Docker, through bollard: connecting (and waiting for the engine), the
//! `mesh` network, and what the agent needs to know about each container.

use std::{collections::HashMap, net::Ipv4Addr, path::Path, time::Duration};

use bollard::{
    Docker,
    container::{InspectContainerOptions, ListContainersOptions},
    models::{ContainerInspectResponse, EndpointSettings, HealthStatusEnum, Ipam, IpamConfig},
    network::{
        ConnectNetworkOptions, CreateNetworkOptions, DisconnectNetworkOptions,
        InspectNetworkOptions, ListNetworksOptions,
    },
};
use tracing::{info, warn};

use mesh_common::{mac::Mac, tunnel::Bridge};

use crate::vip::Cidr;

/// The Docker network every mesh container joins.
pub const NETWORK: &str = "mesh";
/// Label marking the network as created by the agent.
const MANAGED: &str = "mesh.managed";
/// Label naming the overlay network (`crate::network`) a Docker network
/// is this node's part of.
pub const OVERLAY_LABEL: &str = "mesh.network";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker API: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error(
        "a Docker network named {NETWORK:?} already exists with {what}, but this node's mesh \
         network needs {want}: remove it (docker network rm {NETWORK}) or start the agent with \
         the matching --node-subnet"
    )]
    Conflict { what: String, want: String },
}

/// Connects to the engine at `socket`, waiting with backoff while it is
/// not there (logged once, not in a loop).
pub async fn connect(socket: &Path) -> Docker {
    let mut delay = Duration::from_millis(100);
    let mut said = false;
    loop {
        let attempt =
            Docker::connect_with_unix(&socket.to_string_lossy(), 30, bollard::API_DEFAULT_VERSION);
        let ready = match attempt {
            Ok(d) => match d.negotiate_version().await {
                Ok(d) => match d.ping().await {
                    Ok(_) => Ok(d),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match ready {
            Ok(d) => {
                info!(socket = %socket.display(), api = %d.client_version(), "connected to Docker");
                return d;
            }
            Err(e) if !said => {
                warn!(socket = %socket.display(), error = %e, "Docker is not reachable; waiting for it (retrying with backoff)");
                said = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        // At most a second: a restarted dockerd is back within that.
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// The bridge driver's MTU option.
const MTU_OPTION: &str = "com.docker.network.driver.mtu";

/// Makes sure the `mesh` bridge network with this node's subnet exists.
/// The agent's own network (labelled [`MANAGED`]) on another subnet is
/// moved to this one with its containers (this node took a new /24, see
/// `daemon::pass::give_up_subnet`); any other network of that name is
/// never touched.
pub async fn ensure_network(
    d: &Docker,
    subnet: Cidr,
    bridge: &str,
    mtu: u32,
) -> Result<(), DockerError> {
    match d
        .inspect_network(NETWORK, None::<InspectNetworkOptions<String>>)
        .await
    {
        Ok(net) => {
            let driver = net.driver.unwrap_or_default();
            let subnets: Vec<String> = net
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.subnet)
                .collect();
            let ours = net
                .labels
                .as_ref()
                .is_some_and(|l| l.get(MANAGED).is_some_and(|v| v == "true"));
            let has_mtu = net
                .options
                .as_ref()
                .and_then(|o| o.get(MTU_OPTION))
                .and_then(|v| v.parse::<u32>().ok());
            if driver == "bridge" && subnets == [subnet.to_string()] {
                if !ours || has_mtu == Some(mtu) {
                    info!(network = NETWORK, %subnet, "mesh network present");
                    return Ok(());
                }
                // Another --mtu (--encrypt changes the default): a bridge
                // network's MTU is fixed when it is made.
                warn!(network = NETWORK, old = ?has_mtu, new = mtu, "the mesh network's MTU differs from --mtu: making it anew with its containers");
                return renumber(d, subnet, bridge, mtu).await;
            }
            if !ours || driver != "bridge" {
                return Err(DockerError::Conflict {
                    what: format!("driver {driver:?} and subnets {subnets:?}"),
                    want: format!("driver \"bridge\" and subnet {subnet}"),
                });
            }
            warn!(network = NETWORK, old = ?subnets, new = %subnet, "this node's /24 changed: moving the mesh network and its containers");
            renumber(d, subnet, bridge, mtu).await
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => create(d, subnet, bridge, mtu).await,
        Err(e) => Err(e.into()),
    }
}

async fn create(d: &Docker, subnet: Cidr, bridge: &str, mtu: u32) -> Result<(), DockerError> {
    let gateway = subnet.gateway();
    let opts = CreateNetworkOptions {
        name: NETWORK.to_string(),
        check_duplicate: true,
        driver: "bridge".to_string(),
        ipam: Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: Some(gateway.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        },
        options: HashMap::from([
            (
                "com.docker.network.bridge.name".to_string(),
                bridge.to_string(),
            ),
            (MTU_OPTION.to_string(), mtu.to_string()),
        ]),
        labels: HashMap::from([(MANAGED.to_string(), "true".to_string())]),
        ..Default::default()
    };
    d.create_network(opts).await?;
    info!(network = NETWORK, %subnet, %gateway, bridge, mtu, "created the mesh network");
    Ok(())
}

/// Makes the agent's `mesh` network anew on `subnet` (a new /24, or a new
/// MTU): every container on it (running or not) is disconnected, the
/// network made anew, and each
/// container connected again with its aliases; Docker gives it an address
/// in the new /24. Running containers keep running; their open
/// connections over the old address end.
async fn renumber(d: &Docker, subnet: Cidr, bridge: &str, mtu: u32) -> Result<(), DockerError> {
    let list = d
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            filters: HashMap::from([("network".to_string(), vec![NETWORK.to_string()])]),
            ..Default::default()
        }))
        .await?;
    let mut moved = Vec::new();
    for c in list {
        let Some(id) = c.id else { continue };
        let name = c
            .names
            .and_then(|n| n.first().cloned())
            .unwrap_or_else(|| id.clone());
        let old_ep = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(NETWORK));
        let aliases = old_ep.as_ref().and_then(|e| e.aliases.clone());
        let old_ip = old_ep.and_then(|e| e.ip_address).unwrap_or_default();
        d.disconnect_network(
            NETWORK,
            DisconnectNetworkOptions {
                container: id.clone(),
                force: true,
            },
        )
        .await?;
        moved.push((id, name, aliases, old_ip));
    }
    d.remove_network(NETWORK).await?;
    create(d, subnet, bridge, mtu).await?;
    for (id, name, aliases, old_ip) in moved {
        let r = d
            .connect_network(
                NETWORK,
                ConnectNetworkOptions {
                    container: id.clone(),
                    endpoint_config: EndpointSettings {
                        aliases,
                        ..Default::default()
                    },
                },
            )
            .await;
        match r {
            Ok(()) => {
                info!(container = %name, %old_ip, new = %subnet, "container moved to the new /24")
            }
            // One container that cannot come back (removed meanwhile) does
            // not keep the others out.
            Err(e) => {
                warn!(container = %name, error = %e, "could not connect the container to the mesh network again")
            }
        }
    }
    Ok(())
}

/// Makes sure the Docker network `name` is this node's part of the
/// overlay network `name`: a bridge whose subnet is the whole network
/// (`cidr`, so a container's route to every node's slice, and to the VIPs,
/// leaves through it), giving out addresses from this node's `slice`,
/// gateway its first address. Returns the bridge interface's name. A
/// network of that name that mesh did not make is never touched.
pub async fn ensure_overlay(
    d: &Docker,
    name: &str,
    cidr: Cidr,
    slice: Cidr,
    mtu: u32,
) -> Result<String, String> {
    match d
        .inspect_network(name, None::<InspectNetworkOptions<String>>)
        .await
    {
        Ok(net) => {
            if !made_for(&net, name) {
                return Err(format!(
                    "a Docker network {name:?} that mesh did not make exists on this engine: \
                     remove it (docker network rm {name}) or use another name"
                ));
            }
            let configs = net.ipam.clone().and_then(|i| i.config).unwrap_or_default();
            let same = configs.iter().any(|c| {
                c.subnet.as_deref() == Some(&cidr.to_string())
                    && c.ip_range.as_deref() == Some(&slice.to_string())
            });
            if same {
                return Ok(bridge_dev(&net));
            }
            let users = net.containers.as_ref().map_or(0, |c| c.len());
            if users > 0 {
                return Err(format!(
                    "its Docker network has another subnet or slice than {cidr} / {slice}, and \
                     {users} containers on it"
                ));
            }
            d.remove_network(name).await.map_err(|e| e.to_string())?;
            create_overlay(d, name, cidr, slice, mtu).await
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => create_overlay(d, name, cidr, slice, mtu).await,
        Err(e) => Err(e.to_string()),
    }
}

async fn create_overlay(
    d: &Docker,
    name: &str,
    cidr: Cidr,
    slice: Cidr,
    mtu: u32,
) -> Result<String, String> {
    let gateway = slice.gateway();
    let opts = CreateNetworkOptions {
        name: name.to_string(),
        check_duplicate: true,
        driver: "bridge".to_string(),
        ipam: Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(cidr.to_string()),
                ip_range: Some(slice.to_string()),
                gateway: Some(gateway.to_string()),
                // Never a container's: the slice's first and last address.
                auxiliary_addresses: Some(HashMap::from([
                    ("slice-net".to_string(), slice.base.to_string()),
                    (
                        "slice-end".to_string(),
                        Ipv4Addr::from(u32::from(slice.base) | 0xff).to_string(),
                    ),
                ])),
            }]),
            ..Default::default()
        },
        options: HashMap::from([(MTU_OPTION.to_string(), mtu.to_string())]),
        labels: HashMap::from([
            (MANAGED.to_string(), "true".to_string()),
            (OVERLAY_LABEL.to_string(), name.to_string()),
        ]),
        ..Default::default()
    };
    d.create_network(opts).await.map_err(|e| e.to_string())?;
    info!(network = name, %cidr, %slice, %gateway, mtu, "created an overlay network's Docker network");
    let net = d
        .inspect_network(name, None::<InspectNetworkOptions<String>>)
        .await
        .map_err(|e| e.to_string())?;
    Ok(bridge_dev(&net))
}

/// Removes this node's Docker network of the overlay network `name`, if
/// mesh made it; refused while containers are on it (their names).
pub async fn remove_overlay(d: &Docker, name: &str) -> Result<(), String> {
    match d
        .inspect_network(name, None::<InspectNetworkOptions<String>>)
        .await
    {
        Ok(net) => {
            if !made_for(&net, name) {
                return Ok(());
            }
            let users: Vec<String> = net
                .containers
                .unwrap_or_default()
                .into_values()
                .filter_map(|c| c.name)
                .collect();
            if !users.is_empty() {
                return Err(format!(
                    "removed from the cluster, but containers are on it here: {users:?}"
                ));
            }
            d.remove_network(name).await.map_err(|e| e.to_string())?;
            info!(
                network = name,
                "removed an overlay network's Docker network"
            );
            Ok(())
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether Docker network `n` is the one mesh made for overlay network
/// `name` (its label says so).
fn made_for(n: &bollard::models::Network, name: &str) -> bool {
    n.labels
        .as_ref()
        .is_some_and(|l| l.get(OVERLAY_LABEL).is_some_and(|v| v == name))
}

/// A bridge network's interface: its `bridge.name` option, else `br-`
/// and the id's first 12 characters (Docker's rule).
fn bridge_dev(n: &bollard::models::Network) -> String {
    let id = n.id.clone().unwrap_or_default();
    n.options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| format!("br-{}", id.get(..12).unwrap_or(&id)))
}

/// Container health as Docker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No HEALTHCHECK.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// What the agent needs to know about one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// RFC 3339 creation time (orders services by age for VIPs).
    pub created: String,
    pub running: bool,
    pub pid: u32,
    pub labels: HashMap<String, String>,
    /// Address and MAC on each network it is attached to (IPv4 ones).
    pub nets: std::collections::BTreeMap<String, (Ipv4Addr, [u8; 6])>,
    pub health: Health,
}

/// Inspects a container; `Ok(None)` when it no longer exists.
pub async fn inspect(d: &Docker, id: &str) -> Result<Option<Container>, DockerError> {
    match d
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => Ok(Some(from_inspect(c))),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Docker's bridge networks other than `mesh`, by bridge interface name
/// (IPv4 only): their containers may call published ports
/// (`mesh_tc_bridge_in`).
pub async fn list_bridges(
    d: &Docker,
) -> Result<std::collections::BTreeMap<String, Bridge>, DockerError> {
    let opts = ListNetworksOptions {
        filters: HashMap::from([("driver", vec!["bridge"])]),
    };
    Ok(d.list_networks(Some(opts))
        .await?
        .into_iter()
        .filter_map(other_bridge)
        .collect())
}

/// A bridge network's interface name and IPv4 subnet, unless it is mesh's
/// own or has no IPv4 subnet.
fn other_bridge(n: bollard::models::Network) -> Option<(String, Bridge)> {
    if n.name.as_deref() == Some(NETWORK)
        || n.driver.as_deref() != Some("bridge")
        || n.labels
            .as_ref()
            .is_some_and(|l| l.contains_key(OVERLAY_LABEL))
    {
        return None;
    }
    let dev = bridge_dev(&n);
    n.ipam?.config?.into_iter().find_map(|c| {
        let (base, len) = c
            .subnet?
            .split_once('/')
            .map(|(b, l)| (b.to_owned(), l.to_owned()))?;
        let base: Ipv4Addr = base.parse().ok()?;
        let len: u32 = len.parse().ok().filter(|l| (1..=32).contains(l))?;
        let mask = u32::MAX << (32 - len);
        let gateway = c
            .gateway
            .and_then(|g| g.parse::<Ipv4Addr>().ok())
            .map_or(0, |g| u32::from(g).to_be());
        Some((
            dev.clone(),
            Bridge {
                net_be: (u32::from(base) & mask).to_be(),
                mask_be: mask.to_be(),
                gateway_be: gateway,
            },
        ))
    })
}

/// Every running container on `mesh` or one of `overlays`.
pub async fn list_mesh(d: &Docker, overlays: &[String]) -> Result<Vec<Container>, DockerError> {
    let mut nets = vec![NETWORK.to_string()];
    nets.extend(overlays.iter().cloned());
    let opts = ListContainersOptions::<String> {
        all: false,
        filters: HashMap::from([("network".to_string(), nets)]),
        ..Default::default()
    };
    let mut out = Vec::new();
    for summary in d.list_containers(Some(opts)).await? {
        if let Some(id) = summary.id
            && let Some(c) = inspect(d, &id).await?
        {
            out.push(c);
        }
    }
    Ok(out)
}

fn from_inspect(c: ContainerInspectResponse) -> Container {
    let state = c.state.unwrap_or_default();
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        _ => Health::None,
    };
    let nets = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, ep)| {
            let ip: Ipv4Addr = ep.ip_address?.parse().ok()?;
            let mac = ep.mac_address?.parse::<Mac>().ok()?.0;
            Some((name, (ip, mac)))
        })
        .collect();
    Container {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        created: c.created.unwrap_or_default(),
        running: state.running.unwrap_or(false),
        pid: state.pid.unwrap_or(0).max(0) as u32,
        labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
        nets,
        health,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::Network;

    fn net(name: &str, id: &str, dev: Option<&str>, subnets: &[(&str, Option<&str>)]) -> Network {
        Network {
            name: Some(name.into()),
            id: Some(id.into()),
            driver: Some("bridge".into()),
            options: dev.map(|d| {
                HashMap::from([("com.docker.network.bridge.name".to_string(), d.to_string())])
            }),
            ipam: Some(Ipam {
                config: Some(
                    subnets
                        .iter()
                        .map(|(s, g)| IpamConfig {
                            subnet: Some(s.to_string()),
                            gateway: g.map(str::to_string),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn other_bridges_by_interface_name() {
        let be = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip")).to_be();
        let (dev, b) = other_bridge(net(
            "bridge",
            "f00",
            Some("docker0"),
            &[("172.17.0.0/16", Some("172.17.0.1"))],
        ))
        .expect("the default bridge");
        assert_eq!(dev, "docker0");
        assert_eq!(
            b,
            Bridge {
                net_be: be("172.17.0.0"),
                mask_be: be("255.255.0.0"),
                gateway_be: be("172.17.0.1"),
            }
        );
        assert!(b.contains(be("172.17.3.4")) && !b.contains(be("172.18.0.1")));
        // A user-defined network: br- and the id's first 12 characters;
        // IPv6 subnets and host bits are skipped or masked.
        let (dev, b) = other_bridge(net(
            "app",
            "0123456789abcdef",
            None,
            &[("fd00::/64", None), ("10.9.8.7/24", None)],
        ))
        .expect("a user network");
        assert_eq!(dev, "br-0123456789ab");
        assert_eq!((b.net_be, b.gateway_be), (be("10.9.8.0"), 0));
        // Mesh's own network, and a network without IPv4, are not others.
        assert!(
            other_bridge(net(NETWORK, "1", Some("mesh0"), &[("10.42.1.0/24", None)])).is_none()
        );
        assert!(other_bridge(net("v6", "2", None, &[("fd01::/64", None)])).is_none());
        assert!(other_bridge(net("bad", "3", None, &[("10.0.0.0/40", None)])).is_none());
    }
}

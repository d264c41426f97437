//! Docker, through bollard: connecting (and waiting for the engine), the
//! `mesh` network, and what the agent needs to know about each container.

use std::{collections::HashMap, net::Ipv4Addr, path::Path, time::Duration};

use bollard::{
    Docker,
    container::{InspectContainerOptions, ListContainersOptions},
    models::{ContainerInspectResponse, HealthStatusEnum, Ipam, IpamConfig},
    network::{CreateNetworkOptions, InspectNetworkOptions},
};
use tracing::{info, warn};

use mesh_common::mac::Mac;

use crate::vip::Cidr;

/// The Docker network every mesh container joins.
pub const NETWORK: &str = "mesh";
/// Label marking the network as created by the agent.
const MANAGED: &str = "mesh.managed";

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
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Makes sure the `mesh` bridge network with this node's subnet exists.
/// A network of that name with another driver or subnet is never touched.
pub async fn ensure_network(
    d: &Docker,
    subnet: Cidr,
    bridge: &str,
    mtu: u32,
) -> Result<(), DockerError> {
    let gateway = Ipv4Addr::from(u32::from(subnet.base) + 1);
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
            if driver != "bridge" || subnets != [subnet.to_string()] {
                return Err(DockerError::Conflict {
                    what: format!("driver {driver:?} and subnets {subnets:?}"),
                    want: format!("driver \"bridge\" and subnet {subnet}"),
                });
            }
            info!(network = NETWORK, %subnet, "mesh network present");
            Ok(())
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
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
                    ("com.docker.network.driver.mtu".to_string(), mtu.to_string()),
                ]),
                labels: HashMap::from([(MANAGED.to_string(), "true".to_string())]),
                ..Default::default()
            };
            d.create_network(opts).await?;
            info!(network = NETWORK, %subnet, %gateway, bridge, mtu, "created the mesh network");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
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
    /// Address and MAC on the mesh network; None when not attached.
    pub mesh: Option<(Ipv4Addr, [u8; 6])>,
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

/// Every running container on the mesh network.
pub async fn list_mesh(d: &Docker) -> Result<Vec<Container>, DockerError> {
    let opts = ListContainersOptions::<String> {
        all: false,
        filters: HashMap::from([("network".to_string(), vec![NETWORK.to_string()])]),
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
    let mesh = c
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|mut n| n.remove(NETWORK))
        .and_then(|ep| {
            let ip: Ipv4Addr = ep.ip_address?.parse().ok()?;
            let mac = ep.mac_address?.parse::<Mac>().ok()?.0;
            Some((ip, mac))
        });
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
        mesh,
        health,
    }
}

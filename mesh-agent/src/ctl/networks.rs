//! `meshctl network create|ls|inspect|rm`: the cluster's overlay networks
//! (what `docker network create -d overlay` gives a Swarm user), through
//! the agent's control socket.

use std::path::Path;

use super::{CtlError, table::Table};
use crate::status::NetworkRow;

impl Table for NetworkRow {
    const HEADER: &'static [&'static str] = &[
        "NETWORK",
        "SUBNET",
        "VNI",
        "THIS NODE",
        "VIPS",
        "CONTAINERS",
        "DOCKER",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.subnet.clone(),
            self.vni.to_string(),
            self.slice.clone(),
            self.vips.clone(),
            self.containers.len().to_string(),
            self.docker.clone(),
        ]
    }
}

/// The agent's answer to `command`; its `{"error": ...}` as an error.
pub(super) fn ask(path: &Path, command: &str) -> Result<String, CtlError> {
    let raw = crate::api::ask(path, command).map_err(|source| CtlError::Agent {
        path: path.to_owned(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&raw)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) => Err(CtlError::Usage(e.to_owned())),
        None => Ok(raw),
    }
}

/// Every network, `mesh` first.
pub fn list(path: &Path) -> Result<Vec<NetworkRow>, CtlError> {
    serde_json::from_str(&ask(path, "networks")?)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))
}

/// One network, in full.
pub fn inspect(path: &Path, name: &str) -> Result<NetworkRow, CtlError> {
    list(path)?
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| CtlError::Usage(format!("no network {name}")))
}

pub fn create(path: &Path, name: &str, subnet: Option<&str>) -> Result<NetworkRow, CtlError> {
    let cmd = match subnet {
        Some(s) => format!("network create {name} {s}"),
        None => format!("network create {name}"),
    };
    if cmd.len() > 200 || name.contains(char::is_whitespace) {
        return Err(CtlError::Usage(format!("{name:?} is not a network name")));
    }
    serde_json::from_str(&ask(path, &cmd)?)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))
}

pub fn remove(path: &Path, name: &str) -> Result<(), CtlError> {
    if name.len() > 100 || name.contains(char::is_whitespace) {
        return Err(CtlError::Usage(format!("{name:?} is not a network name")));
    }
    ask(path, &format!("network rm {name}")).map(|_| ())
}

//! `meshctl nodes`: every node of the cluster as this node knows it (what
//! `docker node ls` tells a Swarm user), from the agent's control socket.

use std::path::Path;

use super::{CtlError, table::Table};
use crate::status::NodeRow;

impl Table for NodeRow {
    const HEADER: &'static [&'static str] = &[
        "NODE", "UNDERLAY", "SUBNET", "STATE", "GONE", "VERSION", "TUNNEL",
    ];
    fn cells(&self) -> Vec<String> {
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        vec![
            if self.this {
                format!("{} (this node)", self.name)
            } else {
                self.name.clone()
            },
            or_dash(&self.underlay),
            or_dash(&self.subnet),
            self.state.clone(),
            if self.gone_s > 0.0 {
                format!("{:.0} s ago", self.gone_s)
            } else {
                "-".into()
            },
            or_dash(&self.version),
            or_dash(&self.tunnel),
        ]
    }
}

/// The node table from the agent at `path`.
pub fn nodes(path: &Path) -> Result<Vec<NodeRow>, CtlError> {
    let raw = crate::api::ask(path, "nodes").map_err(|source| CtlError::Agent {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&raw)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))
}

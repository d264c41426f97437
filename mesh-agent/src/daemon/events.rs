//! Docker events to what the daemon knows about containers.

use std::collections::HashMap;

use bollard::{
    Docker,
    models::{EventMessage, EventMessageTypeEnum},
    system::EventsOptions,
};
use tracing::{debug, warn};

use super::Daemon;
use crate::docker;

/// Container and `mesh` network events since `since` (seconds).
pub(super) fn options(since: u64) -> EventsOptions<String> {
    EventsOptions::<String> {
        since: Some(since.to_string()),
        until: None,
        filters: HashMap::from([(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        )]),
    }
}

impl Daemon {
    /// Updates what we know from one event; whether it may change anything.
    pub(super) async fn on_event(&mut self, d: &Docker, ev: EventMessage) -> bool {
        let action = ev.action.clone().unwrap_or_default();
        let attrs = ev
            .actor
            .as_ref()
            .and_then(|a| a.attributes.clone())
            .unwrap_or_default();
        let id = match ev.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                let relevant = matches!(
                    action.as_str(),
                    "start" | "restart" | "die" | "kill" | "stop" | "destroy" | "pause" | "unpause"
                ) || action.starts_with("health_status");
                if !relevant {
                    return false;
                }
                ev.actor.and_then(|a| a.id)
            }
            Some(EventMessageTypeEnum::NETWORK) => {
                let name = attrs.get("name").map(String::as_str).unwrap_or_default();
                let ours =
                    name == docker::NETWORK || self.nets.served.iter().any(|n| n.name == name);
                if !ours {
                    // Another network: its bridge matters to the routing
                    // mesh (its containers may call published ports).
                    if matches!(action.as_str(), "create" | "destroy")
                        && attrs.get("type").map(String::as_str) == Some("bridge")
                    {
                        let before = self.docker.bridges.clone();
                        self.list_bridges(d).await;
                        return self.docker.bridges != before;
                    }
                    return false;
                }
                attrs.get("container").cloned()
            }
            _ => None,
        };
        let Some(id) = id else { return false };
        debug!(%action, container = %id, "docker event");
        let changed = self.apply_event(d, &action, id).await;
        if changed && let Some(t) = ev.time_nano {
            self.pending_events.push(t);
        }
        changed
    }

    /// Whether `c` is on `mesh` or an overlay network this node serves.
    fn attached(&self, c: &docker::Container) -> bool {
        c.nets
            .keys()
            .any(|n| n == docker::NETWORK || self.nets.served.iter().any(|s| &s.name == n))
    }

    async fn apply_event(&mut self, d: &Docker, action: &str, id: String) -> bool {
        let v = &mut self.docker;
        match action {
            // `docker stop` sends a signal first: drain at once. The event
            // says all we need; an inspect now would wait for the stop.
            "kill" | "stop" | "pause" => {
                if !v.containers.contains_key(&id) {
                    return false;
                }
                return v.draining.insert(id);
            }
            "die" | "destroy" => {
                v.draining.remove(&id);
                v.veths.retain(|(c, _), _| c != &id);
                return v.containers.remove(&id).is_some();
            }
            "start" | "restart" | "unpause" => {
                v.draining.remove(&id);
                v.veths.retain(|(c, _), _| c != &id);
            }
            _ => {}
        }
        match docker::inspect(d, &id).await {
            Ok(Some(c)) if c.running && self.attached(&c) => {
                self.docker.containers.insert(id, c);
            }
            Ok(_) => {
                let v = &mut self.docker;
                v.containers.remove(&id);
                v.draining.remove(&id);
                v.veths.retain(|(c, _), _| c != &id);
            }
            Err(e) => warn!(container = %id, error = %e, "inspect failed; keeping what we knew"),
        }
        true
    }
}

//! `meshctl check`: whether every node's kernel holds what it should
//! (`crate::daemon`'s check: the same services, backends, rings and
//! published ports everywhere, a node table of every other node, nothing
//! changed behind an agent's back), one row per node.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CtlError, table::Table};
use crate::shared::CheckRow;

/// The agent's answer to `check`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CheckAnswer {
    pub round: String,
    /// Nodes that did not answer the round in time.
    pub unanswered: Vec<String>,
    pub rows: Vec<CheckRow>,
}

/// One node's line.
#[derive(Serialize)]
struct Line {
    node: String,
    state: String,
    since: String,
    differences: String,
}

impl Table for Line {
    const HEADER: &'static [&'static str] = &["NODE", "STATE", "SINCE", "DIFFERENCES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.node.clone(),
            self.state.clone(),
            self.since.clone(),
            self.differences.clone(),
        ]
    }
}

/// Runs a check round; the table (or JSON), and whether every node agrees.
pub fn check(path: &Path, json: bool) -> Result<(String, bool), CtlError> {
    let raw = super::networks::ask(path, "check")?;
    let a: CheckAnswer = serde_json::from_str(&raw)
        .map_err(|e| CtlError::Usage(format!("bad answer from the agent: {e}")))?;
    let agree = a.unanswered.is_empty() && a.rows.iter().all(|r| r.differences.is_empty());
    if json {
        return Ok((raw, agree));
    }
    let lines: Vec<Line> = a
        .rows
        .iter()
        .map(|r| {
            let answered = r.answered.contains(&a.round);
            let state = match (answered, r.differences.is_empty()) {
                (false, _) => "NO ANSWER",
                (true, true) => "agrees",
                (true, false) => "DIFFERS",
            };
            let mut differences = r.differences.join("; ");
            if !answered {
                differences = format!("did not answer round {} within 10 s", a.round);
            }
            Line {
                node: if r.this_node {
                    format!("{} (this node)", r.node)
                } else {
                    r.node.clone()
                },
                state: state.into(),
                since: since(r.since_ms),
                differences,
            }
        })
        .collect();
    let mut out = super::table::render(false, &lines)?;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&if agree {
        format!("every node agrees (round {})\n", a.round)
    } else {
        format!("nodes differ (round {})\n", a.round)
    });
    Ok((out, agree))
}

/// `HH:MM:SS` (UTC) of a time in ms since the epoch; "-" for none.
fn since(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_day() {
        assert_eq!(since(0), "-");
        assert_eq!(since((3 * 3600 + 4 * 60 + 5) * 1000 + 999), "03:04:05");
    }
}

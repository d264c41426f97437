//! The control socket (default /run/mesh/agent.sock). A client connects,
//! sends one line with a command ("status"), and reads one JSON document
//! until EOF. Unknown commands get `{"error": ...}`, and so do requests
//! the agent refuses (`network create|rm`).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use crate::shared::Shared;

/// Binds the socket (replacing a stale one) and serves it forever.
pub async fn serve(path: &Path, shared: Arc<Mutex<Shared>>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    loop {
        let (conn, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, shared).await {
                warn!(error = %e, "control socket client");
            }
        });
    }
}

async fn answer(conn: UnixStream, shared: Arc<Mutex<Shared>>) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    // Bounded: one short line, within 5 s.
    let mut reader = BufReader::new(r.take(256));
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if line.trim() == "monitor" {
        return monitor(reader, w, &shared).await;
    }
    let body = match line.trim() {
        "status" | "" => {
            let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            // Read now: a node with the wrong key sees no membership change
            // (and so no pass) while it rejects every datagram.
            if let Some(g) = sh.gossip.clone() {
                use std::sync::atomic::Ordering::Relaxed;
                let node = &mut sh.status.node;
                node.gossip_rejected = g.bad_auth.load(Relaxed);
                node.gossip_sent = g.sent.load(Relaxed);
                node.gossip_received = g.received.load(Relaxed);
                node.clustered = true;
            }
            if let Some(p) = sh.probe.clone() {
                sh.status.node.tunnels = p.report();
            }
            if let Some(k) = sh.keys.clone() {
                sh.status.node.cluster_keys = k.ids();
            }
            serde_json::to_vec_pretty(&sh.status)?
        }
        "nodes" => {
            let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec_pretty(&node_rows(&sh))?
        }
        "backends" => {
            let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec_pretty(&sh.backend_names)?
        }
        "networks" => {
            let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec_pretty(&sh.networks)?
        }
        cmd if cmd.starts_with("network ") || cmd == "key renew" => request(cmd, &shared).await?,
        "check" => check(&shared).await?,
        other => serde_json::to_vec(
            &serde_json::json!({ "error": format!("unknown command {other:?}") }),
        )?,
    };
    w.write_all(&body).await?;
    w.shutdown().await
}

/// `monitor`: the programs' events, one JSON line each, until the client
/// goes away (`crate::monitor`).
async fn monitor(
    mut r: impl tokio::io::AsyncRead + Unpin,
    mut w: tokio::net::unix::OwnedWriteHalf,
    shared: &Mutex<Shared>,
) -> std::io::Result<()> {
    let Some(m) = shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .monitor
        .clone()
    else {
        w.write_all(b"{\"error\": \"the agent has no monitor\"}\n")
            .await?;
        return w.shutdown().await;
    };
    let mut l = m.listen();
    let mut scratch = [0u8; 64];
    loop {
        let got = tokio::select! {
            got = l.lines.recv() => got,
            // The client closed its end (or sent something: it may not).
            _ = r.read(&mut scratch) => return Ok(()),
        };
        let line = match got {
            Ok(line) => line.to_string(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                serde_json::json!({ "kind": "lost", "count": n, "why": "this client fell behind" })
                    .to_string()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        };
        // A client that went away ends the stream (and, the last one, the
        // programs' events).
        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            return Ok(());
        }
    }
}

/// How long `check` waits for every live node's answer (answers spread
/// by the regular gossip rounds: a few seconds at 200 nodes).
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// `{"error": e}`.
fn error_body(e: String) -> std::io::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::json!({ "error": e }))?)
}

/// Hands the daemon the request `make` builds around its reply channel
/// and waits (10 s) for the answer; the answer, or why there is none.
async fn ask_daemon<T>(
    shared: &Mutex<Shared>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> crate::requests::Request,
) -> Result<T, String> {
    let tx = shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .net_requests
        .clone()
        .ok_or("the agent takes no requests yet")?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| "the agent is stopping".to_owned())?;
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(r)) => r,
        _ => Err("the agent did not answer in time".into()),
    }
}

/// `check`: a consistency check round (every node reports what its kernel
/// holds now), awaited for at most [`CHECK_WAIT`]; the rows, or
/// `{"error": ...}`.
async fn check(shared: &Mutex<Shared>) -> std::io::Result<Vec<u8>> {
    use crate::requests::Request as R;
    let round = match ask_daemon(shared, |reply| R::Check { reply }).await {
        Ok(r) => r,
        Err(e) => return error_body(e),
    };
    let start = tokio::time::Instant::now();
    loop {
        let view = shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check
            .clone();
        let waiting: Vec<&str> = view
            .rows
            .iter()
            .filter(|r| !r.answered.contains(&round))
            .map(|r| r.node.as_str())
            .collect();
        if waiting.is_empty() || start.elapsed() >= CHECK_WAIT {
            let body = serde_json::json!({
                "round": round,
                "unanswered": waiting,
                "rows": view.rows,
            });
            return Ok(serde_json::to_vec_pretty(&body)?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `network create NAME [SUBNET]`, `network rm NAME` or `key renew`,
/// handed to the daemon; its answer (the new network's row, `{}`, the new
/// public key) or `{"error": ...}`.
async fn request(cmd: &str, shared: &Mutex<Shared>) -> std::io::Result<Vec<u8>> {
    use crate::requests::{NetworkRequest, Request as R};
    let words: Vec<&str> = cmd.split_whitespace().collect();
    match words.as_slice() {
        ["network", "create", name, rest @ ..] if rest.len() <= 1 => {
            let (name, subnet) = ((*name).to_owned(), rest.first().map(|s| (*s).to_owned()));
            let r = ask_daemon(shared, |reply| {
                R::Network(NetworkRequest::Create {
                    name,
                    subnet,
                    reply,
                })
            })
            .await;
            match r {
                Ok(row) => Ok(serde_json::to_vec_pretty(&row)?),
                Err(e) => error_body(e),
            }
        }
        ["network", "rm", name] => {
            let name = (*name).to_owned();
            let r = ask_daemon(shared, |reply| {
                R::Network(NetworkRequest::Remove { name, reply })
            })
            .await;
            match r {
                Ok(()) => Ok(b"{}".to_vec()),
                Err(e) => error_body(e),
            }
        }
        ["key", "renew"] => match ask_daemon(shared, |reply| R::RenewKey { reply }).await {
            Ok(key) => Ok(serde_json::to_vec(
                &serde_json::json!({ "public_key": key }),
            )?),
            Err(e) => error_body(e),
        },
        _ => error_body(format!("unknown command {cmd:?}")),
    }
}

/// The node table: this node, then every node gossip showed, with its
/// state now and its tunnel as the probes find it.
fn node_rows(sh: &crate::shared::Shared) -> Vec<crate::status::NodeRow> {
    let st = &sh.status;
    let tunnels = sh.probe.as_ref().map(|p| p.report()).unwrap_or_default();
    let mut rows = vec![crate::status::NodeRow {
        name: st.node.name.clone(),
        this: true,
        underlay: st.node.underlay.clone(),
        subnet: st.node.subnet.clone(),
        state: "alive".into(),
        gone_s: 0.0,
        version: st.version.clone(),
        tunnel: String::new(),
    }];
    for (name, k) in &sh.known_nodes {
        let live = st.node.peers.contains(name);
        let probe = tunnels.iter().find(|t| &t.peer == name);
        let state = if !live {
            "dead"
        } else if st.node.agent_down.contains(name) {
            "agent down (forwarding)"
        } else if st.node.restarting.contains(name) {
            "restarting"
        } else if probe.is_some_and(|t| !t.up) {
            // Gossip still hears it, its tunnel does not answer: a cut
            // on the way, or a host going down.
            "suspect (tunnel silent)"
        } else {
            "alive"
        };
        let tunnel = probe.map_or_else(String::new, |t| {
            if t.up {
                format!("ok ({:.2} ms)", t.rtt_ms)
            } else {
                format!("NO ANSWER for {:.0} s", t.silent_s)
            }
        });
        rows.push(crate::status::NodeRow {
            name: name.clone(),
            this: false,
            underlay: k.underlay.clone(),
            subnet: k.subnet.clone(),
            state: state.into(),
            gone_s: if live {
                0.0
            } else {
                k.seen.elapsed().as_secs_f64()
            },
            version: k.version.clone(),
            tunnel,
        });
    }
    rows
}

/// Asks the agent at `path` for `command`; the raw JSON answer.
pub fn ask(path: &Path, command: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

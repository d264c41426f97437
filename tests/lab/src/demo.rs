//! The demo, on any set of hosts: the namespace lab (`cargo xtask lab
//! demo`) and the Vagrant VMs (`cargo xtask vagrant demo`) run the same
//! steps through [`Hosts`]. Three nodes: whoami scaled 1 -> 2 -> 3 over
//! nodes 1 and 2, a client on node 3 resolving the name and calling the VIP,
//! meshctl on every node, then the routing mesh: `curl` of every node's
//! published port from a host outside the cluster; last, `curl` of the VIP
//! on every node itself. Returns what it saw, so a test can check it.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{image::WHOAMI_IMAGE, whoami};

/// The port whoami's HTTP answers on at every node (routing mesh).
pub const PUBLISHED: u16 = 8080;

/// Where the demo runs.
pub trait Hosts {
    /// `docker ARGS` on node `n` (1-based): its stdout.
    fn docker(&self, n: usize, args: &[&str]) -> Result<String>;
    /// Node `n`'s underlay address.
    fn node_ip(&self, n: usize) -> String;
    /// Node `n`'s name in the cluster.
    fn node_name(&self, n: usize) -> String;
    /// `curl -s --max-time 3 URL` from a host outside the cluster.
    fn curl_outside(&self, url: &str) -> Result<String>;
    /// That host's address (as the replicas should see it).
    fn outside_ip(&self) -> String;
    /// `curl -s --max-time 3 URL` on node `n` itself (its host, not a
    /// container).
    fn curl_on(&self, n: usize, url: &str) -> Result<String>;
}

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Report {
    pub vip: String,
    /// Requests from node 3's client to the VIP, by replica.
    pub answers: BTreeMap<String, usize>,
    /// (URL, answer) of every curl from outside.
    pub curls: Vec<(String, String)>,
    /// (node, answer) of every curl of the VIP on a node itself.
    pub host_curls: Vec<(usize, String)>,
    /// `ping -c 2 whoami` from node 3's client: its summary line.
    pub ping: String,
    /// `meshctl backends` on node 3.
    pub backends: String,
    /// The nodes' names in the cluster (nodes 1 to 3).
    pub node_names: Vec<String>,
}

impl Report {
    /// The demo's outcome: the 12 requests answered, spread over more than
    /// one replica (12 random flows miss one of 3 replicas 2% of the time,
    /// so all 3 is not asked), every node's published port answered by a
    /// replica that saw `outside` (the client's own address) as the client,
    /// the VIP answered on every node itself, the VIP answered a ping, and
    /// `meshctl backends` names every replica's node and container.
    pub fn check(&self, outside: &str) -> Result<()> {
        if !self.ping.contains("2 packets received") {
            bail!("ping whoami: 2 answers expected: {:?}", self.ping);
        }
        for (n, name) in NAMES {
            let node = self.node_names.get(n - 1).map_or("?", String::as_str);
            if !self
                .backends
                .lines()
                .any(|l| l.contains(&format!(" {node} ")) && l.contains(&format!(" {name} ")))
            {
                bail!(
                    "meshctl backends names {name} on node {node}:\n{}",
                    self.backends
                );
            }
        }
        if self.answers.len() < 2 || self.answers.values().sum::<usize>() != 12 {
            bail!("12 requests over the replicas expected: {:?}", self.answers);
        }
        if self.curls.len() != 9 {
            bail!("3 requests to each of 3 nodes expected: {:?}", self.curls);
        }
        for (url, answer) in &self.curls {
            if !answer.starts_with("whoami-") || !answer.contains(&format!(" {outside}:")) {
                bail!("{url} answered {answer:?}, not a replica seeing {outside}");
            }
        }
        if self.host_curls.len() != 6 {
            bail!(
                "2 requests to the VIP on each of 3 nodes expected: {:?}",
                self.host_curls
            );
        }
        for (n, answer) in &self.host_curls {
            if !answer.starts_with("whoami-") {
                bail!("node {n} itself: the VIP answered {answer:?}, not a replica");
            }
        }
        Ok(())
    }
}

const NAMES: [(usize, &str); 3] = [(1, "whoami-1"), (2, "whoami-2"), (1, "whoami-3")];

/// Runs the demo on nodes 1 to 3 of `h`, printing as it goes.
pub fn run(h: &dyn Hosts) -> Result<Report> {
    let mut report = Report::default();
    for n in 1..=3 {
        wait_ready(h, n)?;
    }
    println!("\n== whoami replicas on nodes 1 and 2; a client on node 3");
    for (n, name) in NAMES {
        let _ = h.docker(n, &["rm", "-f", name]);
    }
    let _ = h.docker(3, &["rm", "-f", "client"]);
    idle_client(h, 3, "client")?;
    for (i, (n, name)) in NAMES.into_iter().enumerate() {
        let port = format!("mesh.port=80/tcp,80/udp,{}/tcp", whoami::HTTP_PORT);
        let publish = format!("mesh.publish={PUBLISHED}:{}/tcp", whoami::HTTP_PORT);
        let args = whoami::run_args(name, &["mesh.service=whoami", &port, &publish], &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.docker(n, &args)?;
        report.vip = wait_replicas(h, 3, i + 1)?;
        println!(
            "-- scaled to {} (on node {n}): whoami is {} on every node",
            i + 1,
            report.vip
        );
    }
    println!(
        "\n== from the client on node 3: the name, a ping (the VIP answers), then 12 requests to the VIP"
    );
    println!(
        "{}",
        h.docker(3, &["exec", "client", "nslookup", "whoami"])
            .unwrap_or_else(|e| e.to_string())
    );
    let ping = h
        .docker(
            3,
            &["exec", "client", "ping", "-c", "2", "-W", "2", "whoami"],
        )
        .unwrap_or_else(|e| e.to_string());
    println!("{ping}");
    report.ping = ping
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_string();
    let target = format!("{}:80", report.vip);
    let args = whoami::ask_args("client", "tcp", &target, 12, 100, 2000);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.docker(3, &args).unwrap_or_else(|e| e.to_string());
    println!("{out}");
    for line in out.lines() {
        let mut f = line.split(' ');
        if let (Some(_), Some("ok"), Some(name)) = (f.next(), f.next(), f.next()) {
            *report.answers.entry(name.to_string()).or_default() += 1;
        }
    }
    let maglev = format!("{}:80/tcp", report.vip);
    for n in 1..=3 {
        println!("== node {n}: meshctl status / services / maglev");
        for args in [&["status"][..], &["services"], &["maglev", &maglev]] {
            let mut a = vec!["exec", "mesh-agent", "/meshctl"];
            a.extend(args);
            println!("{}\n", h.docker(n, &a).unwrap_or_else(|e| e.to_string()));
        }
    }
    println!("== node 3: meshctl nodes");
    println!(
        "{}\n",
        h.docker(3, &["exec", "mesh-agent", "/meshctl", "nodes"])
            .unwrap_or_else(|e| e.to_string())
    );
    println!("== node 3: meshctl backends (the node and container of each)");
    let backends = h
        .docker(3, &["exec", "mesh-agent", "/meshctl", "backends"])
        .unwrap_or_else(|e| e.to_string());
    println!("{backends}\n");
    report.backends = backends;
    report.node_names = (1..=3).map(|n| h.node_name(n)).collect();
    println!(
        "== the routing mesh: from {}, a host outside the cluster, curl every node's port \
         {PUBLISHED} (whoami answers with its name and the client it sees)",
        h.outside_ip()
    );
    for n in 1..=3 {
        wait_published(h, n)?;
    }
    for n in 1..=3 {
        let url = format!("http://{}:{PUBLISHED}/", h.node_ip(n));
        for _ in 0..3 {
            let out = h
                .curl_outside(&url)
                .unwrap_or_else(|e| format!("failed: {e}"));
            println!("  curl {url}  ->  {}", out.trim());
            report.curls.push((url.clone(), out.trim().to_string()));
        }
    }
    let url = format!("http://{}:{}/", report.vip, whoami::HTTP_PORT);
    println!(
        "\n== each node itself: curl the VIP (balanced at connect; replicas on other nodes \
         through the node's mesh-host link, so they see its mesh gateway address)"
    );
    for n in 1..=3 {
        for _ in 0..2 {
            let out = h
                .curl_on(n, &url)
                .unwrap_or_else(|e| format!("failed: {e}"));
            println!("  node {n}: curl {url}  ->  {}", out.trim());
            report.host_curls.push((n, out.trim().to_string()));
        }
    }
    println!();
    Ok(report)
}

/// `meshctl status --json` on node `n`.
fn status(h: &dyn Hosts, n: usize) -> String {
    h.docker(n, &["exec", "mesh-agent", "/meshctl", "status", "--json"])
        .unwrap_or_default()
}

/// Polls node `n`'s `meshctl status --json` until `found` reads a `T` in
/// it, for at most `timeout`; the error says `what` was not seen, with the
/// last status.
fn wait_status<T>(
    h: &dyn Hosts,
    n: usize,
    timeout: Duration,
    what: &str,
    found: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let st = status(h, n);
        if let Some(t) = found(&st) {
            return Ok(t);
        }
        if start.elapsed() > timeout {
            bail!("node {n}: {what} not seen within {timeout:?}:\n{st}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until node `n`'s agent is connected to Docker, with its `mesh`
/// network made (a new node makes it once its /24 claim has settled,
/// seconds after it starts), and sees the two other nodes.
pub fn wait_ready(h: &dyn Hosts, n: usize) -> Result<()> {
    let what = "the agent connected to Docker, with two peers";
    wait_status(h, n, Duration::from_secs(120), what, |st| {
        let v: serde_json::Value = serde_json::from_str(st).ok()?;
        let connected = v.pointer("/docker/connected")?.as_bool()?;
        let peers = v.pointer("/node/peers")?.as_array()?.len();
        (connected && peers == 2).then_some(())
    })
}

/// Waits until node `n`'s agent sees `count` active whoami backends; the VIP.
fn wait_replicas(h: &dyn Hosts, n: usize, count: usize) -> Result<String> {
    let what = format!("{count} whoami replicas");
    wait_status(h, n, Duration::from_secs(60), &what, |st| {
        whoami_vip(st, count)
    })
}

/// Waits until node `n`'s agent publishes whoami's port.
fn wait_published(h: &dyn Hosts, n: usize) -> Result<()> {
    let want = format!("\"{PUBLISHED}/tcp -> {}\"", whoami::HTTP_PORT);
    let what = format!("{PUBLISHED}/tcp published");
    wait_status(h, n, Duration::from_secs(30), &what, |st| {
        st.contains(&want).then_some(())
    })
}

/// Waits until node `n`'s agent sees `count` active backends of
/// `service`; its VIP.
pub fn wait_service(h: &dyn Hosts, n: usize, service: &str, count: usize) -> Result<String> {
    let what = format!("{count} backends of {service}");
    wait_status(h, n, Duration::from_secs(60), &what, |st| {
        service_vip(st, service, count)
    })
}

/// The VIP of whoami in a `meshctl status --json` answer, when it has
/// `count` active backends.
fn whoami_vip(status: &str, count: usize) -> Option<String> {
    service_vip(status, "whoami", count)
}

/// The VIP of `service` in a `meshctl status --json` answer, when it has
/// `count` active backends.
fn service_vip(status: &str, service: &str, count: usize) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    let svc = v
        .get("services")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(service))?;
    (svc.get("active")?.as_u64()? == count as u64)
        .then(|| svc.get("vip")?.as_str().map(str::to_owned))
        .flatten()
}

/// A container `name` of network `mesh` on node `n` that only idles (a
/// server on a port nobody calls): where a test or benchmark runs its
/// clients with `docker exec`.
pub fn idle_client(h: &dyn Hosts, n: usize, name: &str) -> Result<()> {
    h.docker(
        n,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "mesh",
            WHOAMI_IMAGE,
            "serve",
            "--tcp",
            "9",
        ],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_of_a_status() {
        let st = r#"{"services": [{"name": "web", "vip": "10.43.0.9", "active": 1},
                    {"name": "whoami", "vip": "10.43.0.5", "active": 3}]}"#;
        assert_eq!(whoami_vip(st, 3).as_deref(), Some("10.43.0.5"));
        assert_eq!(whoami_vip(st, 2), None);
        assert_eq!(whoami_vip("not json", 3), None);
    }
}

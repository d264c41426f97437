//! The routing mesh against Docker's own publishing, on two Docker hosts
//! of the lab's kind (their agents as the lab's containers, one cluster):
//! one whoami replica on node 1, published by mesh
//! (`mesh.publish=8080:8000`: XDP balances, TC translates) and by Docker
//! (`-p 9080:8000`: iptables DNAT, docker-proxy), asked over HTTP with a
//! new connection per request by a host outside the cluster: mesh through
//! the replica's node and through the other node (tunnelled), Docker on
//! the replica's node, each path from an outside host of its own. Prints
//! requests/s, latency and CPU per request for each, from one run;
//! asserts only that every request was answered.
//! Bounded: a fixed number of requests, each with a 2 s timeout.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_tests::dockerlab::{Hosts, WHOAMI_IMAGE};

/// One HTTP GET on a new connection: the body ("NAME PEER").
fn get(to: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.take(4096)
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    out.split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_owned())
        .ok_or_else(|| format!("not HTTP: {out:?}"))
}

fn main() {
    let requests: usize = std::env::var("MESH_PUBLISH_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let clients = 4;
    let hosts = Hosts::start(2);
    let (engine, underlay) = (&hosts.engines[0], &hosts.underlay);
    engine.docker_ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--hostname",
        "web",
        "--network",
        "mesh",
        "-p",
        "9080:8000",
        "--label",
        "mesh.service=web",
        "--label",
        "mesh.port=8000/tcp",
        "--label",
        "mesh.publish=8080:8000/tcp",
        WHOAMI_IMAGE,
        "serve",
        "--http",
        "8000",
    ]);
    for a in &hosts.agents {
        a.wait_for(
            "8080 published, web's backend known",
            Duration::from_secs(60),
            |s| {
                s.services
                    .iter()
                    .any(|x| x.name == "web" && !x.published.is_empty() && x.active > 0)
            },
        );
    }
    println!(
        "\npublished port, one replica on node 1 of two Docker hosts, HTTP GET with a new connection \
         each, {requests} requests from {clients} clients outside the cluster (CPU: the whole machine, \
         client included)"
    );
    println!(
        "{:<58} {:>9} {:>9} {:>9} {:>11}  the replica saw the client as",
        "", "req/s", "p50", "p99", "CPU/req"
    );
    let mut rates = Vec::new();
    // Each row's clients are another outside host. All three paths keep
    // the client's address and port, so one host's port reused toward
    // another path would reach the replica as the same connection, which
    // may still be in its TIME_WAIT (it closes first) and refuse the SYN.
    for (row, (name, node, port)) in [
        (
            "mesh via the replica's node (XDP balances, TC DNATs)",
            1u8,
            8080u16,
        ),
        ("mesh via the other node (tunnelled both ways)", 2, 8080),
        (
            "Docker -p on the replica's node (iptables, docker-proxy)",
            1,
            9080,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let outside = underlay.outside(100 + row as u8);
        let node: std::net::Ipv4Addr = underlay.addr(node).parse().expect("node's address");
        let to = SocketAddr::from((node, port));
        // Warm-up; the last answer says how the replica saw the client.
        let seen = outside.run(|| {
            let mut seen = String::new();
            for _ in 0..50 {
                if let Ok(body) = get(to) {
                    seen = body;
                }
            }
            seen
        });
        assert!(
            !seen.is_empty(),
            "{name}: {to} answered none of 50 warm-up requests"
        );
        let busy0 = mesh_tests::cpu::busy_seconds();
        let start = Instant::now();
        let per = requests / clients;
        let results: Vec<Result<Duration, String>> = outside.run(|| {
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    std::thread::spawn(move || {
                        (0..per)
                            .map(|_| {
                                let t = Instant::now();
                                get(to).map(|_| t.elapsed())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("client thread"))
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let busy1 = mesh_tests::cpu::busy_seconds();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{name}: {} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        let mut lat: Vec<Duration> = results.into_iter().filter_map(Result::ok).collect();
        lat.sort();
        let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let cpu_us = (busy1 - busy0) * 1e6 / lat.len() as f64;
        rates.push(lat.len() as f64 / secs);
        println!(
            "{name:<58} {:>9.0} {:>7.2}ms {:>7.2}ms {:>9.0}µs  {}",
            lat.len() as f64 / secs,
            q(0.5).as_secs_f64() * 1e3,
            q(0.99).as_secs_f64() * 1e3,
            cpu_us,
            seen.split_whitespace().nth(1).unwrap_or("?")
        );
    }
    if let [here, there, docker] = rates[..] {
        println!(
            "mesh against Docker's -p, requests/s: via the replica's node {:.2}x (goal >= 1.5x), via the \
             other node {:.2}x (goal >= 1.0x)",
            here / docker,
            there / docker
        );
    }
    drop(hosts);
}

//! One iperf3 stream (TCP, or small UDP datagrams) between two network
//! namespaces, each entered by a command prefix (`ip netns exec NAME`,
//! `nsenter -t PID -n`).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

/// Gbit/s of one TCP stream for `seconds` from the namespace `client`
/// enters to the iperf3 server the one `server` enters, at `addr`; `None`
/// if iperf3 gave no figure. Bounded: the client is killed 20 s after its
/// stream should have ended, the server once the client is done.
pub fn gbits(server: &[&str], client: &[&str], addr: &str, seconds: u64) -> Option<f64> {
    let json = run(server, client, addr, seconds, &[])?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
}

/// Datagrams of `len` bytes the server received per second, the client
/// sending as fast as it can for `seconds` (UDP, `-b 0`); as [`gbits`].
pub fn udp_received_per_second(
    server: &[&str],
    client: &[&str],
    addr: &str,
    seconds: u64,
    len: usize,
) -> Option<f64> {
    let len = len.to_string();
    let json = run(
        server,
        client,
        addr,
        seconds,
        &["-u", "-b", "0", "-l", &len],
    )?;
    let sum = &json["end"]["sum"];
    let received = sum["packets"].as_f64()? - sum["lost_packets"].as_f64()?;
    Some(received / sum["seconds"].as_f64().filter(|s| *s > 0.0)?)
}

/// One iperf3 run with the client's `extra` arguments: its JSON report.
fn run(
    server: &[&str],
    client: &[&str],
    addr: &str,
    seconds: u64,
    extra: &[&str],
) -> Option<serde_json::Value> {
    let (srv_cmd, srv_args) = server.split_first()?;
    let mut srv = Command::new(srv_cmd)
        .args(srv_args)
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("timeout")
        .arg((seconds + 20).to_string())
        .args(client)
        .args([
            "iperf3",
            "-c",
            addr,
            "-p",
            "5201",
            "-J",
            "-t",
            &seconds.to_string(),
        ])
        .args(extra)
        .output()
        .ok();
    let _ = srv.kill();
    let _ = srv.wait();
    serde_json::from_slice(&out?.stdout).ok()
}

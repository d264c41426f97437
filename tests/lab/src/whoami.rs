//! The test workload's command lines, for the demo and the tests alike.

use crate::image::WHOAMI_IMAGE;

/// The port whoami serves HTTP on in a replica (TCP and UDP: 80).
pub const HTTP_PORT: u16 = 8000;

/// `docker run` arguments for a whoami replica named `name` on the mesh
/// network (serving TCP and UDP on port 80, HTTP on [`HTTP_PORT`]), with
/// `labels` and `extra` docker flags.
pub fn run_args(name: &str, labels: &[&str], extra: &[&str]) -> Vec<String> {
    run_args_serving(name, labels, extra, &[])
}

/// [`run_args`] with more `whoami serve` flags (e.g. `--term-delay-ms`).
pub fn run_args_serving(
    name: &str,
    labels: &[&str],
    extra: &[&str],
    serve: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["run", "-d", "--name", name, "--hostname", name]
        .iter()
        .chain(&["--network", "mesh"])
        .map(|s| s.to_string())
        .collect();
    for l in labels {
        args.push("--label".into());
        args.push(l.to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(
        [
            WHOAMI_IMAGE,
            "serve",
            "--tcp",
            "80",
            "--udp",
            "80",
            "--http",
            "8000",
        ]
        .iter()
        .chain(serve)
        .map(|s| s.to_string()),
    );
    args
}

/// `docker exec` arguments for a bounded client loop in container
/// `client`: `count` requests over `proto` to `target`, `interval_ms`
/// apart, each given up after `timeout_ms`. It prints one line per request
/// (`TIME ok NAME` or `TIME err WHY`) and a total.
pub fn ask_args(
    client: &str,
    proto: &str,
    target: &str,
    count: u32,
    interval_ms: u32,
    timeout_ms: u32,
) -> Vec<String> {
    ["exec", client, "/whoami", "ask", proto, target, "--count"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            count.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
            "--timeout-ms".into(),
            timeout_ms.to_string(),
        ])
        .collect()
}

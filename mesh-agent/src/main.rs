//! mesh-agent: loads the mesh data plane, attaches it and keeps its maps.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use clap::Parser;
use mesh_agent::{
    DEFAULT_BPFFS_DIR, dataplane, iface,
    logging::{self, LogFormat},
};
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "mesh node agent: eBPF overlay and service load balancer"
)]
struct Args {
    /// The underlay NIC: XDP attaches here.
    #[arg(long, env = "MESH_UNDERLAY_IFACE", value_parser = parse_iface)]
    underlay_iface: String,
    /// bpffs directory for this agent's pinned maps.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

fn parse_iface(s: &str) -> Result<String, String> {
    iface::validate(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    logging::init(args.log_format);

    let ifindex = iface::index(&args.underlay_iface)?;
    let mut ebpf = dataplane::load().context("loading the data plane")?;
    let prog = dataplane::xdp_underlay(&mut ebpf).context("verifying the XDP program")?;
    prog.attach_to_if_index(ifindex, XdpMode::default())
        .with_context(|| format!("attaching XDP to {}", args.underlay_iface))?;
    info!(iface = %args.underlay_iface, ifindex, "XDP attached to the underlay NIC");

    // Pins left by an earlier run are replaced (adopting live maps across
    // restarts comes with the reconciler).
    dataplane::pin_maps(&ebpf, &args.bpffs_dir).context("pinning maps")?;
    info!(dir = %args.bpffs_dir.display(), "maps pinned");

    wait_for_shutdown().await?;
    info!("shutting down: detaching XDP, removing pins");
    for name in dataplane::map_names() {
        let _ = std::fs::remove_file(args.bpffs_dir.join(name));
    }
    Ok(())
}

async fn wait_for_shutdown() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

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

    std::fs::create_dir_all(&args.bpffs_dir).with_context(|| {
        format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf?)",
            args.bpffs_dir.display()
        )
    })?;
    let pin = args.bpffs_dir.join(maps::STATS);
    // A pin left by an earlier run of this agent is replaced (adopting live
    // maps across restarts comes with the reconciler).
    if pin.exists() {
        std::fs::remove_file(&pin)
            .with_context(|| format!("removing stale pin {}", pin.display()))?;
    }
    ebpf.map(maps::STATS)
        .context("stats map missing from the object")?
        .pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    info!(path = %pin.display(), "maps pinned");

    wait_for_shutdown().await?;
    info!("shutting down: detaching XDP, removing pins");
    let _ = std::fs::remove_file(&pin);
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

//! meshctl: shows what the kernel is doing, read straight from the pinned maps.

use std::{io, path::PathBuf, process::ExitCode};

use aya::maps::{MapData, MapError, PerCpuArray};
use clap::{Parser, Subcommand};
use mesh_agent::{DEFAULT_BPFFS_DIR, dataplane::stats};
use mesh_common::maps;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Inspect the mesh data plane")]
struct Args {
    /// bpffs directory where the agent pinned its maps.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR, global = true)]
    bpffs_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Packet counters: verdicts and the path each packet took, summed over CPUs.
    Stats {
        /// Show counters that are zero too.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    match args.cmd {
        Cmd::Stats { all } => {
            let map = open(args, maps::STATS)?;
            let map: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(map).map_err(|e| format!("{}: {e}", maps::STATS))?;
            let counters =
                stats::read(&map).map_err(|e| format!("reading {}: {e}", maps::STATS))?;
            let shown: Vec<_> = counters
                .into_iter()
                .filter(|c| all || c.value != 0)
                .collect();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&shown).map_err(|e| e.to_string())?
                );
            } else {
                println!("{:<24} {:>16}", "COUNTER", "PACKETS");
                for c in shown {
                    println!("{:<24} {:>16}", c.name, c.value);
                }
            }
            Ok(())
        }
    }
}

/// Opens a pinned map, explaining the usual reasons it cannot be.
fn open(args: &Args, name: &str) -> Result<aya::maps::Map, String> {
    let path = args.bpffs_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| explain(&path, e))?;
    aya::maps::Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))
}

fn explain(path: &std::path::Path, e: MapError) -> String {
    let io = match &e {
        MapError::SyscallError(s) => Some(s.io_error.kind()),
        _ => None,
    };
    match io {
        Some(io::ErrorKind::NotFound) => format!(
            "{} does not exist: is mesh-agent running on this host (and --bpffs-dir the same as the agent's)?",
            path.display()
        ),
        Some(io::ErrorKind::PermissionDenied) => format!(
            "permission denied opening {}: meshctl reads kernel maps and needs root (or CAP_BPF)",
            path.display()
        ),
        _ => format!("opening {}: {e}", path.display()),
    }
}

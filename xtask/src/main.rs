//! Project chores: `cargo xtask <command>`.
//!
//! setup  installs what a fresh Debian bookworm root machine lacks (idempotent)
//! image  the release agent image (`docker save` archive)
//! test   setup, lint, packet benchmark, then every test (the CI command)
//! bench  the packet, publishing, bulk (the lab's and the Vagrant VMs') and DNS benchmarks (`bench lb`, `bench cluster`: the others)
//! lint   rustfmt, import cycles, clippy
//! lab    the demo (`lab demo`)
//! vagrant the same lab and demo on real VMs (`vagrant up|demo|down|test`)

mod cycles;
mod lab;
mod setup;
mod vagrant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use mesh_lab::cmd::{self, target_dir};

#[derive(Parser)]
#[command(name = "xtask", about = "mesh project chores")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages, bpf-linker, bpffs, cargo-nextest.
    Setup {
        /// Also what the Vagrant lab needs (vagrant, vagrant-libvirt,
        /// libvirt and qemu from bookworm-backports, debootstrap).
        #[arg(long)]
        vagrant: bool,
    },
    /// The release agent image: mesh-agent and meshctl, optimised, FROM
    /// scratch, written as a `docker save` archive under target/image/.
    Image,
    /// Setup, lint, benchmark and run every test: what CI runs.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Per-packet cost of the data-plane programs (BPF_PROG_TEST_RUN) and
    /// DNS queries per second.
    Bench {
        /// Runs per fixture.
        #[arg(long, default_value_t = 100_000)]
        repeat: u32,
        #[command(subcommand)]
        what: Option<BenchCmd>,
    },
    /// rustfmt --check and clippy -D warnings.
    Lint,
    /// The lab.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// The lab on real VMs (vagrant/, libvirt).
    Vagrant {
        #[command(subcommand)]
        cmd: VagrantCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The tunnel plain and encrypted (--encrypt) on the Vagrant VMs, one
    /// run: bulk TCP and CPU per GB on both nodes, short requests' p50/p99
    /// and conn/s, through a VIP across nodes.
    Crypto {
        /// MiB per bulk transfer.
        #[arg(long, default_value_t = 512)]
        mib: u64,
    },
    /// N agent control planes on this machine (real gossip, desired state
    /// and reconcile into fake maps): propagation, failure detection,
    /// gossip traffic, CPU and memory per node.
    Cluster {
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        /// Endpoints per node.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Endpoint changes per second during the churn phase.
        #[arg(long, default_value_t = 5)]
        churn: usize,
    },
    /// Where the time goes (perf, sampling by the CPU clock): the container
    /// veth's paths per packet (kernel test runs), and short connections
    /// through plain routing and through mesh's VIP per connection.
    Profile {
        /// Seconds of wrk per mode.
        #[arg(long, default_value_t = 5)]
        secs: u32,
    },
    /// Plain routing, iptables DNAT (kube-proxy's layout) and mesh's VIP
    /// side by side in one namespace topology: wrk connections/s and
    /// requests/s with p50/p99, UDP packets/s, CPU per unit.
    Lb {
        /// Runs per mode (medians are printed).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Other services' iptables rules ahead of ours.
        #[arg(long, default_value_t = 1000)]
        services_ahead: usize,
    },
}

#[derive(Subcommand)]
enum VagrantCmd {
    /// Build what is missing (box, images), then `vagrant up` N VMs.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The tunnel between the VMs encrypted (the agents' --encrypt:
        /// kernel WireGuard).
        #[arg(long)]
        encrypt: bool,
    },
    /// The demo on the VMs (nodes 1 to 3).
    Demo,
    /// Destroy the VMs.
    Down,
    /// Up, demo (checked), down, with times: what CI runs.
    Test,
}

#[derive(Subcommand)]
enum LabCmd {
    /// N nodes (namespaces on three routed subnets, one behind a 1400-byte
    /// link), each with its own Docker engine and a mesh agent container.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// All nodes on one bridge (one subnet) instead.
        #[arg(long)]
        flat: bool,
    },
    /// Run a command in a node's namespace (DOCKER_HOST set to its engine).
    Exec {
        /// n1, n2, ...
        node: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Containers and `meshctl status` of every node.
    Status,
    /// Remove everything the lab made.
    Down,
    /// Three nodes, whoami scaled over two of them, a client on the third,
    /// requests rotating over the replicas, meshctl on every node.
    Demo {
        /// All nodes on one bridge (one subnet) instead of routed subnets.
        #[arg(long)]
        flat: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup { vagrant } => {
            setup::run()?;
            if vagrant {
                setup::vagrant()?;
            }
            Ok(())
        }
        Cmd::Vagrant { cmd } => {
            setup::run()?;
            setup::vagrant()?;
            match cmd {
                VagrantCmd::Up { nodes, encrypt } => {
                    vagrant::up(nodes, &build_whoami()?, encrypt).map(drop)
                }
                VagrantCmd::Demo => vagrant::demo(),
                VagrantCmd::Down => vagrant::down(),
                VagrantCmd::Test => vagrant::test(&build_whoami()?),
            }
        }
        Cmd::Test { no_lint } => {
            setup::run()?;
            setup::vagrant()?;
            if !no_lint {
                lint()?;
            }
            // The tests and benchmarks run the agent as released: build
            // the image once (test runners build only test binaries).
            let image = image()?;
            bench(10_000, Some(&image.tarball))?;
            bench_lb(1, 1000)?;
            bench_cluster(50, 10, 5)?;
            let whoami = build_whoami()?;
            let agent = target_dir()
                .join(mesh_lab::image::PROFILE)
                .join("mesh-agent");
            disk_report();
            // Last, so its summary closes the output.
            cmd::Cmd::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["nextest", "run", "--no-fail-fast"])
                .env("MESH_WHOAMI", whoami)
                .env("MESH_AGENT_BIN", agent)
                .env("MESH_AGENT_IMAGE", image.tarball)
                .run()
        }
        Cmd::Image => {
            setup::run()?;
            image().map(drop)
        }
        Cmd::Bench { repeat, what } => {
            setup::run()?;
            match what {
                None => {
                    setup::vagrant()?;
                    bench(repeat, None)
                }
                Some(BenchCmd::Cluster {
                    nodes,
                    endpoints,
                    churn,
                }) => bench_cluster(nodes, endpoints, churn),
                Some(BenchCmd::Lb {
                    runs,
                    services_ahead,
                }) => bench_lb(runs, services_ahead),
                Some(BenchCmd::Profile { secs }) => {
                    let bench = |name: &str, env: &str| {
                        cmd::Cmd::new("cargo")
                            .args(["bench", "--profile", "dev", "-p", "mesh-tests"])
                            .args(["--bench", name])
                            .env(env, "1")
                            .env("MESH_LB_BENCH_SECS", secs.to_string())
                            .run()
                    };
                    bench("packet", "MESH_BENCH_PROFILE")?;
                    bench("lb", "MESH_LB_BENCH_PROFILE")
                }
                Some(BenchCmd::Crypto { mib }) => {
                    setup::vagrant()?;
                    cmd::Cmd::new("cargo")
                        .args(["bench", "--profile", "dev", "-p", "mesh-tests"])
                        .args(["--bench", "crypto"])
                        .env("MESH_CRYPTO_MIB", mib.to_string())
                        .run()
                }
            }
        }
        Cmd::Lint => lint(),
        Cmd::Lab { cmd } => {
            match &cmd {
                LabCmd::Exec { node, cmd } => return lab::exec(node, cmd),
                LabCmd::Status => return lab::status(),
                LabCmd::Down => return lab::down(),
                _ => {}
            }
            setup::run()?;
            let images = lab::build(&build_whoami()?)?;
            let layout = |flat| {
                if flat {
                    mesh_lab::underlay::Layout::Flat
                } else {
                    mesh_lab::underlay::Layout::Routed
                }
            };
            match cmd {
                LabCmd::Up { nodes, flat } => lab::up(nodes, layout(flat), &images),
                LabCmd::Demo { flat } => lab::demo(layout(flat), &images),
                _ => Ok(()),
            }
        }
    }
}

/// Builds the release image and says what it made.
fn image() -> Result<mesh_lab::image::Release> {
    let start = std::time::Instant::now();
    let r = mesh_lab::image::release()?;
    println!(
        "image: {} ({:.1} MB, one layer FROM scratch) built in {:.0} s",
        r.tags.join(", "),
        r.size as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    println!(
        "image: archive {} (docker load -i it on each host)",
        r.tarball.display()
    );
    Ok(r)
}

/// One line on the disk the run writes to: the target directory's size
/// and what is left for the tests (the Vagrant box needs 3 GB of it). A
/// report, never a failure.
fn disk_report() {
    let target = target_dir();
    let used = cmd::Cmd::new("du").args(["-sh"]).args([&target]).output();
    let free = cmd::Cmd::new("df")
        .args(["-h", "--output=avail"])
        .args([&target])
        .output();
    let first = |r: Result<String>, n: usize| {
        r.ok()
            .and_then(|s| s.split_whitespace().nth(n).map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "disk: target {} in {}, {} free",
        first(used, 0),
        target.display(),
        first(free, 1)
    );
}

fn lint() -> Result<()> {
    cmd::cargo(&["fmt", "--all", "--", "--check"])?;
    for krate in ["mesh-common", "mesh-core", "mesh-ebpf", "mesh-agent"] {
        cycles::check(&cmd::root().join(krate).join("src"))?;
    }
    // Default members only: mesh-ebpf cannot build for the host target.
    cmd::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

/// The static whoami test binary (runs in FROM scratch images).
fn build_whoami() -> Result<std::path::PathBuf> {
    let target = target_dir().join("static");
    cmd::Cmd::new("cargo")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "-q",
            "-p",
            "mesh-whoami",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .args([std::ffi::OsStr::new("--target-dir"), target.as_os_str()])
        .run()?;
    Ok(target.join("x86_64-unknown-linux-gnu/release/whoami"))
}

/// The cluster benchmark, optimised like the agent (the image profile,
/// whose dependencies the image build already compiled).
fn bench_cluster(nodes: usize, endpoints: usize, churn: usize) -> Result<()> {
    cmd::Cmd::new("cargo")
        .args([
            "bench",
            "--profile",
            mesh_lab::image::PROFILE,
            "-p",
            "mesh-tests",
        ])
        .args(["--bench", "cluster"])
        .env("MESH_CLUSTER_NODES", nodes.to_string())
        .env("MESH_CLUSTER_ENDPOINTS", endpoints.to_string())
        .env("MESH_CLUSTER_CHURN", churn.to_string())
        .run()
}

/// The comparative load-balancing benchmark (dev profile: the data path is
/// the kernel's and the JIT's, the load wrk's and nginx's).
fn bench_lb(runs: usize, services_ahead: usize) -> Result<()> {
    cmd::Cmd::new("cargo")
        .args([
            "bench",
            "--profile",
            "dev",
            "-p",
            "mesh-tests",
            "--bench",
            "lb",
        ])
        .env("MESH_LB_BENCH_RUNS", runs.to_string())
        .env("MESH_LB_BENCH_SERVICES_AHEAD", services_ahead.to_string())
        .run()
}

/// The packet and publishing benchmarks run in the dev profile: the kernel
/// JIT-compiles the programs and the agent runs from its image, so the
/// host build's optimisation level does not change their figures, and the
/// test build is reused. The DNS benchmark measures the agent's own code,
/// so it runs optimised like the agent (the image profile), and so does
/// the data-plane scale benchmark (the agent's path into the kernel maps).
fn bench(repeat: u32, image: Option<&std::path::Path>) -> Result<()> {
    let mut c = cmd::Cmd::new("cargo")
        .args(["bench", "--profile", "dev", "-p", "mesh-tests"])
        .args([
            "--bench", "packet", "--bench", "publish", "--bench", "local", "--bench", "bulk",
        ])
        // The bulk figures on the Vagrant VMs, beside the lab's.
        .args(["--bench", "vmbulk"])
        .env("MESH_BENCH_REPEAT", repeat.to_string());
    if let Some(image) = image {
        c = c.env("MESH_AGENT_IMAGE", image);
    }
    c.run()?;
    cmd::Cmd::new("cargo")
        .args(["bench", "--profile", mesh_lab::image::PROFILE])
        .args(["-p", "mesh-tests", "--bench", "dns", "--bench", "scale"])
        .run()
}

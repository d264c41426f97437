//! The Vagrant lab as the VM benchmarks use it (`crypto`, `vmbulk`): three
//! VMs of their own, destroyed when done, or with MESH_BENCH_ADOPT=1 the
//! ones an earlier `cargo xtask vagrant up` left (and left running).

use mesh_lab::{
    image,
    vagrant::{self, Lab},
};

use crate::dockerlab::{agent_image, whoami_bin};

/// A benchmark's VMs; dropped, they go (unless adopted).
pub struct BenchLab {
    pub lab: Lab,
    adopted: bool,
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if !self.adopted {
            let _ = vagrant::destroy(3);
        }
    }
}

/// Three VMs running the agent for benchmark `bench`, or None where the
/// lab cannot run (said on stdout, as the benchmark's line: SKIPPED).
pub fn lab(bench: &str) -> Option<BenchLab> {
    if let Some(why) = vagrant::unavailable() {
        println!("{bench}: SKIPPED: the Vagrant lab cannot run here: {why}");
        return None;
    }
    let adopted = std::env::var("MESH_BENCH_ADOPT").as_deref() == Ok("1");
    vagrant::libvirtd().unwrap_or_else(|e| panic!("{e:#}"));
    let lab = if adopted {
        Lab::adopt(3).unwrap_or_else(|e| panic!("{e:#}"))
    } else {
        vagrant::ensure_box().unwrap_or_else(|e| panic!("{e:#}"));
        let tree = image::whoami_tree(&whoami_bin(), &vagrant::dir().join(".state/img"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let _ = vagrant::destroy(3);
        Lab::up(3, &agent_image(), &tree, false).unwrap_or_else(|e| panic!("{e:#}"))
    };
    Some(BenchLab { lab, adopted })
}

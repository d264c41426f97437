//! `cargo xtask vagrant`: the lab and its demo on real VMs (mesh_lab::vagrant,
//! vagrant/). The images are built here and copied into the VMs.

use std::{path::Path, time::Instant};

use anyhow::{Result, bail};
use mesh_lab::{
    cmd::target_dir,
    demo, image,
    vagrant::{self, Lab},
};

/// Builds what is missing and brings up `nodes` VMs (the tunnel
/// encrypted with `encrypt`).
pub fn up(nodes: usize, whoami: &Path, encrypt: bool) -> Result<Lab> {
    if let Some(why) = vagrant::unavailable() {
        bail!("the Vagrant lab cannot run here: {why}");
    }
    vagrant::libvirtd()?;
    vagrant::ensure_box()?;
    let agent = image::release()?;
    let tree = image::whoami_tree(whoami, &target_dir().join("lab-images"))?;
    Lab::up(nodes, &agent.tarball, &tree, encrypt)
}

pub fn demo() -> Result<()> {
    vagrant::libvirtd()?;
    demo::run(&Lab::adopt(3)?).map(drop)
}

pub fn down() -> Result<()> {
    if vagrant::unavailable().is_none() {
        vagrant::libvirtd()?;
        vagrant::destroy(3)?;
    }
    Ok(())
}

/// Up, the demo with its outcome checked, down; the times of each step.
pub fn test(whoami: &Path) -> Result<()> {
    if let Some(why) = vagrant::unavailable() {
        println!("vagrant test: SKIPPED: {why}");
        return Ok(());
    }
    let t = Instant::now();
    let lab = up(3, whoami, false)?;
    let up_time = t.elapsed();
    let t = Instant::now();
    let result = demo::run(&lab).and_then(|r| r.check(&demo::Hosts::outside_ip(&lab)));
    let demo_time = t.elapsed();
    let t = Instant::now();
    vagrant::destroy(3)?;
    println!(
        "vagrant test: up {:.0} s (box, images, 3 VMs), demo {:.0} s, destroy {:.0} s",
        up_time.as_secs_f64(),
        demo_time.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    result
}

//! The Vagrant lab on real VMs (vagrant/, libvirt): the local box (built
//! from Debian packages by vagrant/build-box.sh, the bookworm-backports
//! kernel), three VMs provisioned with the release image and the compose
//! file, the demo inside (whoami over two VMs, the VIP from the third, every
//! VM's published port from the host with the host's own address kept), and
//! `vagrant destroy`. Also the compatibility test of the data plane on the
//! kernel the VMs boot (not this machine's). Where it cannot run it says so
//! and skips, except under CI=true, where that fails. Prints its times.

use std::time::Instant;

use mesh_lab::{
    demo::{self, Hosts},
    image,
    vagrant::{self, Lab},
};
use mesh_tests::dockerlab::{agent_image, whoami_bin};

/// Destroys the VMs however the test ends.
struct Destroy;

impl Drop for Destroy {
    fn drop(&mut self) {
        let t = Instant::now();
        if let Err(e) = vagrant::destroy(3) {
            eprintln!("vagrant destroy: {e:#}");
        }
        println!("vagrant destroy: {:.0} s", t.elapsed().as_secs_f64());
    }
}

#[test]
fn vagrant_three_vms_run_the_demo() {
    if let Some(why) = vagrant::unavailable() {
        // In CI (CI=true) a lab that cannot run is a failure: a skip there
        // would hide that the VMs were never tried.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the Vagrant lab cannot run here: {why} (CI=true: failing, not skipping)"
        );
        println!("SKIPPED: the Vagrant lab cannot run here: {why}");
        return;
    }
    vagrant::libvirtd().unwrap_or_else(|e| panic!("{e:#}"));
    let t = Instant::now();
    vagrant::ensure_box().unwrap_or_else(|e| panic!("{e:#}"));
    let box_time = t.elapsed();
    let agent = agent_image();
    let tree = image::whoami_tree(&whoami_bin(), &vagrant::dir().join(".state/img"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let _ = vagrant::destroy(3);
    let _destroy = Destroy;
    let t = Instant::now();
    let lab = Lab::up(3, &agent, &tree).unwrap_or_else(|e| panic!("{e:#}"));
    let up_time = t.elapsed();
    let kernel = lab.ssh(1, &["uname", "-r"]).output().unwrap_or_default();
    let t = Instant::now();
    let report = demo::run(&lab).unwrap_or_else(|e| panic!("{e:#}"));
    let demo_time = t.elapsed();
    println!(
        "vagrant lab: box {:.0} s (built or found), 3 VMs up and provisioned {:.0} s, demo {:.0} s; guest kernel {}",
        box_time.as_secs_f64(),
        up_time.as_secs_f64(),
        demo_time.as_secs_f64(),
        kernel.trim()
    );
    println!("VIP answers from node 3: {:?}", report.answers);
    report
        .check(&lab.outside_ip())
        .unwrap_or_else(|e| panic!("{e:#}"));
}

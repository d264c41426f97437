//! The map inventory (mesh_common::maps::ALL) against the real object
//! (needs root): every map the object has is listed with its kind, every
//! listed map exists, and the agent's loader pins every one of them, so a
//! restarted agent adopts the very maps its pinned programs use.

use std::path::PathBuf;

use mesh_agent::dataplane::{self, InventoryError};
use mesh_common::maps::{ALL, MapKind};

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_map_of_the_object_is_in_the_inventory_and_pinned() {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/mesh-inventory-{}",
        std::process::id()
    )));
    let ebpf = dataplane::load_pinned(&dir.0)
        .unwrap_or_else(|e| panic!("loading the object (root and bpffs needed): {e}"));
    let errors = dataplane::check_inventory(ebpf.maps());
    assert!(
        errors.is_empty(),
        "the object and the inventory disagree:\n{}",
        errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let names: Vec<&str> = ebpf.maps().map(|(n, _)| n).collect();
    for def in &ALL {
        assert!(
            def.pinned,
            "{}: every map of the data plane is pinned",
            def.name
        );
        assert!(
            dir.0.join(def.name).exists(),
            "{} is not pinned under {} (object maps: {names:?})",
            def.name,
            dir.0.display()
        );
    }
}

/// The check itself catches a map left out of the inventory, one the
/// object lacks, and a wrong kind (shown on a real object by checking it
/// against a map list with one name changed).
#[test]
fn the_check_catches_drift() {
    let ebpf = dataplane::load().unwrap_or_else(|e| panic!("loading the object: {e}"));
    let mut renamed: Vec<(String, &aya::maps::Map)> =
        ebpf.maps().map(|(n, m)| (n.to_owned(), m)).collect();
    let victim = renamed
        .iter_mut()
        .find(|(n, _)| n == "MESH_LOCAL_EPS")
        .expect("the object has MESH_LOCAL_EPS");
    victim.0 = "MESH_NOT_LISTED".into();
    let errors = dataplane::check_inventory(renamed.iter().map(|(n, m)| (n.as_str(), *m)));
    assert!(
        errors.contains(&InventoryError::Unlisted("MESH_NOT_LISTED".into())),
        "{errors:?}"
    );
    assert!(
        errors.contains(&InventoryError::Absent("MESH_LOCAL_EPS")),
        "{errors:?}"
    );
    // A kind mismatch: present the stats array under the conntrack name.
    let stats = ebpf.map("MESH_STATS").expect("stats map");
    let errors = dataplane::check_inventory([("MESH_CT", stats)]);
    assert!(
        errors.iter().any(|e| matches!(
            e,
            InventoryError::Kind {
                name: "MESH_CT",
                want: MapKind::LruHash,
                ..
            }
        )),
        "{errors:?}"
    );
}

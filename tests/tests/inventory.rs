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
    let (ebpf, retired) = dataplane::load_pinned(&dir.0, &[])
        .unwrap_or_else(|e| panic!("loading the object (root and bpffs needed): {e}"));
    assert!(
        retired.is_empty(),
        "a fresh directory has no pins: {retired:?}"
    );
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

/// Upgrades across a layout change: a pinned map whose shape is not this
/// build's (another size here, another type below) is retired and created
/// anew; every other pin is adopted as it is (same map id), and a second
/// load of the same build retires nothing.
#[test]
fn pins_of_another_layout_are_retired_and_the_rest_adopted() {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/mesh-layout-{}",
        std::process::id()
    )));
    let ids = |ebpf: &aya::Ebpf| -> std::collections::BTreeMap<String, u32> {
        ebpf.maps()
            .filter(|(n, _)| !n.starts_with('.'))
            .map(|(n, m)| {
                let id = match m {
                    aya::maps::Map::Array(d)
                    | aya::maps::Map::HashMap(d)
                    | aya::maps::Map::LruHashMap(d)
                    | aya::maps::Map::PerCpuArray(d)
                    | aya::maps::Map::ArrayOfMaps(d)
                    | aya::maps::Map::RingBuf(d) => d.info().expect("map info").id(),
                    other => panic!("unexpected map kind {other:?}"),
                };
                (n.to_owned(), id)
            })
            .collect()
    };
    // An "older build" whose node table had half the entries.
    let (old, retired) = dataplane::load_pinned(&dir.0, &[("MESH_NODES", 512)])
        .unwrap_or_else(|e| panic!("loading the object (root and bpffs needed): {e}"));
    assert!(retired.is_empty(), "{retired:?}");
    let old_ids = ids(&old);
    drop(old);

    let (new, retired) = dataplane::load_pinned(&dir.0, &[]).expect("second load");
    let names: Vec<&str> = retired.iter().map(|r| r.name).collect();
    assert_eq!(names, ["MESH_NODES"], "{retired:?}");
    assert_eq!(retired[0].pinned.max_entries, 512);
    assert_eq!(retired[0].ours.max_entries, mesh_common::maps::MAX_SLICES);
    let new_ids = ids(&new);
    for (name, id) in &old_ids {
        if name == "MESH_NODES" {
            assert_ne!(new_ids[name], *id, "MESH_NODES must be a new map");
        } else {
            assert_eq!(new_ids[name], *id, "{name} must be adopted, not recreated");
        }
    }
    drop(new);

    // The same build again: nothing to retire.
    let (again, retired) = dataplane::load_pinned(&dir.0, &[]).expect("third load");
    assert!(retired.is_empty(), "{retired:?}");
    assert_eq!(ids(&again), new_ids);
    drop(again);

    // A pin of another type under a map's name (the stats array where the
    // peers hash belongs) is retired too.
    let peers = dir.0.join("MESH_PEERS");
    std::fs::remove_file(&peers).expect("unpin MESH_PEERS");
    aya::maps::MapData::from_pin(dir.0.join("MESH_STATS"))
        .expect("stats pin")
        .pin(&peers)
        .expect("pin the stats map as MESH_PEERS");
    let (_, retired) = dataplane::load_pinned(&dir.0, &[]).expect("fourth load");
    let names: Vec<&str> = retired.iter().map(|r| r.name).collect();
    assert_eq!(names, ["MESH_PEERS"], "{retired:?}");
    println!(
        "retired {}: pinned {} -> ours {}",
        retired[0].name, retired[0].pinned, retired[0].ours
    );
}

//! Map layouts across upgrades.
//!
//! aya reuses a pinned map as it finds it, whatever its shape. A build whose
//! map has another key or value size, type, size or flags than the pinned
//! one would then run its programs on a map laid out for other code (the
//! verifier refuses some cases, others would read garbage). So before
//! loading, every pin of the inventory is compared with this build's
//! definition, read from the object itself (never a hand-kept list); a pin
//! whose shape differs is removed, so the loader creates the map anew. The
//! programs still running on the old map keep it until their links are
//! switched to this build's programs (`links.rs` switches a link whose
//! program uses other map ids, too). What the new map loses: the agent
//! rewrites the maps it owns from its desired state; kernel-written maps
//! (conntrack, fragments, counters) start empty: tracked flows are balanced
//! again by Maglev, which picks the same backend while the backend set is
//! unchanged.

use std::{collections::BTreeMap, path::Path};

use aya::maps::MapInfo;

/// What makes two maps interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} value {} entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A pinned map that did not match this build and was retired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retired {
    pub name: &'static str,
    pub pinned: Shape,
    pub ours: Shape,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("parsing the eBPF object: {0}")]
    Object(String),
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("{path}: {source}")]
    Pin {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The shapes of the inventory's maps in `object`, with `sizes`
/// overriding max_entries by name (as the loader will).
pub fn object_shapes(
    object: &[u8],
    sizes: &[(&'static str, u32)],
) -> Result<BTreeMap<&'static str, Shape>, LayoutError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| LayoutError::Object(e.to_string()))?;
    let mut out = BTreeMap::new();
    for def in super::pinned_maps() {
        let m = obj
            .maps
            .get(def.name)
            .ok_or(LayoutError::Missing(def.name))?;
        let max_entries = sizes
            .iter()
            .find(|(n, _)| *n == def.name)
            .map_or(m.max_entries(), |(_, s)| *s);
        out.insert(
            def.name,
            Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
            },
        );
    }
    Ok(out)
}

/// The shape of the map pinned at `path`, if there is one that can be read.
pub fn pinned_shape(path: &Path) -> Option<Shape> {
    let info = MapInfo::from_pin(path).ok()?;
    Some(Shape {
        map_type: info.map_type().ok()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Removes every pin under `dir` whose map differs from this build's
/// (`ours`, from [`object_shapes`]); what it removed.
pub fn retire_stale_pins(
    dir: &Path,
    ours: &BTreeMap<&'static str, Shape>,
) -> Result<Vec<Retired>, LayoutError> {
    let mut retired = Vec::new();
    for (&name, &shape) in ours {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = pinned_shape(&path);
        if pinned == Some(shape) {
            continue;
        }
        std::fs::remove_file(&path).map_err(|source| LayoutError::Pin {
            path: path.display().to_string(),
            source,
        })?;
        retired.push(Retired {
            name,
            // An unreadable pin is retired too; it shows as all zeros.
            pinned: pinned.unwrap_or(Shape {
                map_type: 0,
                key_size: 0,
                value_size: 0,
                max_entries: 0,
                flags: 0,
            }),
            ours: shape,
        });
    }
    Ok(retired)
}

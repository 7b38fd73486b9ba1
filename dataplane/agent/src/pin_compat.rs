//! Pinned maps left by another build of the agent. aya reuses a pinned map whatever its shape, and
//! a program of this build then fails the verifier on a map whose values are shorter than it
//! reads (or, worse, passes it and reads another layout). So before loading, every pinned map is
//! compared with this build's definition, and one that differs is unpinned: the load creates it
//! afresh, the agent programs endpoints and policies again from its records, and the programs on
//! the pinned links are swapped for this build's, which use the new maps. What such a map held
//! is lost, so it is said loudly; the exception is a `CONNTRACK` of an earlier build's layout (the
//! LRU table, with or without window tracking), whose entries [`crate::ct_migrate`] carries over.

use std::path::PathBuf;

use aya::maps::MapInfo;
use tracing::warn;

/// What a program of this build needs of a pinned map to use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Maximum entries; `None` where the operator may choose it (the conntrack table size).
    pub max_entries: Option<u32>,
}

impl MapShape {
    fn of_pinned(info: &MapInfo) -> Option<MapShape> {
        Some(MapShape {
            map_type: info.map_type().ok()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: Some(info.max_entries()),
        })
    }

    /// Whether a pinned map of shape `pinned` can serve as this one.
    pub fn accepts(&self, pinned: &MapShape) -> bool {
        self.map_type == pinned.map_type
            && self.key_size == pinned.key_size
            && self.value_size == pinned.value_size
            && self
                .max_entries
                .is_none_or(|n| Some(n) == pinned.max_entries)
    }
}

/// The shapes of the maps `object` defines, by name; `any_size` names the maps whose
/// `max_entries` is the operator's choice.
pub fn shapes(
    object: &[u8],
    any_size: &[&str],
) -> Result<Vec<(String, MapShape)>, aya_obj::ParseError> {
    let obj = aya_obj::Object::parse(object)?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                MapShape {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: (!any_size.contains(&name.as_str())).then_some(m.max_entries()),
                },
            )
        })
        .collect())
}

/// Unpins every map of `pins` (name, pin path) that exists with a shape `expected` does not
/// accept; returns their names. A pin that cannot be read is left for the load to report.
pub fn unpin_incompatible(
    expected: &[(String, MapShape)],
    pins: &[(&'static str, PathBuf)],
) -> std::io::Result<Vec<&'static str>> {
    let mut replaced = Vec::new();
    for (name, path) in pins {
        let Some(want) = expected.iter().find(|(n, _)| n == name).map(|(_, s)| s) else {
            continue;
        };
        let Ok(info) = MapInfo::from_pin(path) else {
            continue;
        };
        let Some(have) = MapShape::of_pinned(&info) else {
            continue;
        };
        if want.accepts(&have) {
            continue;
        }
        warn!(
            map = name,
            pinned = ?have,
            expected = ?want,
            path = %path.display(),
            "pinned map from an incompatible build: replacing it, what it held is lost"
        );
        std::fs::remove_file(path)?;
        replaced.push(*name);
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: MapShape = MapShape {
        map_type: 2,
        key_size: 4,
        value_size: 152,
        max_entries: Some(1),
    };

    #[test]
    fn a_map_of_another_value_size_type_or_size_is_not_accepted() {
        assert!(SHAPE.accepts(&SHAPE));
        for other in [
            MapShape {
                value_size: 136,
                ..SHAPE
            },
            MapShape {
                map_type: 1,
                ..SHAPE
            },
            MapShape {
                key_size: 8,
                ..SHAPE
            },
            MapShape {
                max_entries: Some(2),
                ..SHAPE
            },
        ] {
            assert!(!SHAPE.accepts(&other), "{other:?}");
        }
    }

    #[test]
    fn the_conntrack_size_is_the_operators_choice() {
        let any = MapShape {
            max_entries: None,
            ..SHAPE
        };
        assert!(any.accepts(&MapShape {
            max_entries: Some(4096),
            ..SHAPE
        }));
    }
}

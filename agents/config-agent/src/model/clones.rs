//! Clones (an app made from another app's snapshot), shared by both sources.

use cairn_types::VolumeOrigin;
use uuid::Uuid;

use super::{ConfigError, DeviceConfig};

/// An app made from another app's snapshot, as either source names it.
#[derive(Debug, Clone)]
pub(super) struct CloneSpec {
    /// The clone's index in the config's apps.
    pub(super) app: usize,
    /// The field's name in its source (`clone_of`, `cairn_clone`), for errors.
    pub(super) field: &'static str,
    /// The app cloned.
    pub(super) source: Uuid,
    /// The snapshot of `source` the clone starts from.
    pub(super) snapshot: Uuid,
}

/// Turns each clone spec into origins of the clone's volumes: its volume `j` (a volume of its
/// own, declared in the config's volumes) starts as a copy of the source app's volume `j` in the
/// snapshot (`VolumeOrigin::Snapshot`, made by the volume-manager from the snapshot's record).
/// Checks: the source app is in the config and is not the clone, the snapshot is listed in the
/// source's snapshots, both have as many volumes, of the same format, no volume of the clone is
/// used by another app, and none has a base image. Run after [`validate`] (the volume refs are
/// known to name configured volumes).
///
/// The origin only matters when a volume is made: once the clone exists, its spec may be
/// dropped from the config (it must be before the snapshot leaves the source's list) and the
/// clone lives on as an ordinary app.
pub(super) fn apply_clones(
    config: &mut DeviceConfig,
    clones: &[CloneSpec],
) -> Result<(), ConfigError> {
    for spec in clones {
        let i = spec.app;
        let at = format!("apps[{i}].{}", spec.field);
        let clone = &config.apps[i];
        if spec.source == clone.app_uuid() {
            return Err(ConfigError::at(
                format!("{at}.app"),
                "an app cannot be a clone of itself",
            ));
        }
        let Some((k, source)) = config
            .apps
            .iter()
            .enumerate()
            .find(|(_, a)| a.app_uuid() == spec.source)
        else {
            return Err(ConfigError::at(
                format!("{at}.app"),
                format!("app {} is not in the config's apps", spec.source),
            ));
        };
        if !source
            .snapshot
            .snapshots
            .iter()
            .any(|d| d.snapshot_id == spec.snapshot)
        {
            return Err(ConfigError::at(
                format!("{at}.snapshot"),
                format!(
                    "snapshot {} is not in the snapshots of app {} (apps[{k}].snapshot.snapshots)",
                    spec.snapshot, spec.source
                ),
            ));
        }
        let (mine, theirs) = (
            &clone.volume_ref_config_list,
            &source.volume_ref_config_list,
        );
        if mine.len() != theirs.len() {
            return Err(ConfigError::at(
                format!("apps[{i}].volume_refs"),
                format!(
                    "a clone has one volume of its own per volume of its source: {} here, {} in app {} (apps[{k}])",
                    mine.len(),
                    theirs.len(),
                    spec.source
                ),
            ));
        }
        let mut origins = Vec::new();
        for (j, (to, from)) in mine.iter().zip(theirs).enumerate() {
            let at = format!("apps[{i}].volume_refs[{j}].uuid");
            if let Some((n, other)) = config.apps.iter().enumerate().find(|(n, a)| {
                *n != i
                    && a.volume_ref_config_list
                        .iter()
                        .any(|r| r.volume_id == to.volume_id)
            }) {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "volume {} is also used by app {} (apps[{n}]); a clone's volumes must be its own new volumes",
                        to.volume_id,
                        other.app_uuid()
                    ),
                ));
            }
            let format_of = |id: Uuid, generation: i64| {
                config
                    .volumes
                    .iter()
                    .find(|v| v.volume_id == id && v.generation_counter == generation)
                    .or_else(|| config.volumes.iter().find(|v| v.volume_id == id))
                    .map(|v| v.format)
            };
            let (want, have) = (
                format_of(from.volume_id, from.generation_counter),
                format_of(to.volume_id, to.generation_counter),
            );
            if want != have {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "volume {} is {have:?} but the volume it clones ({} of app {}) is {want:?}; a clone has its source's formats",
                        to.volume_id, from.volume_id, spec.source
                    ),
                ));
            }
            origins.push((to.volume_id, from.volume_id));
        }
        for (to, from) in origins {
            for (n, volume) in config.volumes.iter_mut().enumerate() {
                if volume.volume_id != to {
                    continue;
                }
                if matches!(volume.origin, VolumeOrigin::BaseImage { .. }) {
                    return Err(ConfigError::at(
                        format!("volumes[{n}].base_image"),
                        format!(
                            "volume {to} is a clone's volume (app {}): its content comes from snapshot {}, it cannot also have a base image",
                            config.apps[i].app_uuid(),
                            spec.snapshot
                        ),
                    ));
                }
                volume.origin = VolumeOrigin::Snapshot {
                    snapshot: spec.snapshot,
                    volume: from,
                };
            }
        }
    }
    Ok(())
}

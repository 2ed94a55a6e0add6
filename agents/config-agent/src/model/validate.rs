//! Validation, shared by both sources: the config as a whole, and the names both sources
//! spell the same way (snapshot modes, restart policies).

use std::collections::{BTreeSet, HashMap};

use cairn_types::{DomainSpec, SnapshotType, VolumeFormat, VolumeOrigin};
use uuid::Uuid;

use super::{ConfigError, DeviceConfig};

/// A snapshot mode by its name; empty is `stopped`.
pub(super) fn snapshot_mode(
    text: &str,
    path: &str,
) -> Result<cairn_types::SnapshotMode, ConfigError> {
    use cairn_types::SnapshotMode;
    match text.trim() {
        "" | "stopped" => Ok(SnapshotMode::Stopped),
        "live" => Ok(SnapshotMode::Live),
        "stateful" => Ok(SnapshotMode::Stateful),
        other => Err(ConfigError::at(
            path,
            format!("unknown snapshot mode {other:?}: use stopped, live or stateful"),
        )),
    }
}

pub(super) fn restart_policy(
    text: &str,
    path: &str,
) -> Result<cairn_types::RestartPolicy, ConfigError> {
    use cairn_types::RestartPolicy;
    match text.trim() {
        "" | "always" => Ok(RestartPolicy::Always),
        "on_failure" => Ok(RestartPolicy::OnFailure),
        "never" => Ok(RestartPolicy::Never),
        other => Err(ConfigError::at(
            path,
            format!("unknown restart policy {other:?}: use always, on_failure or never"),
        )),
    }
}

/// A volume made from a content tree the config does not have is the controller's fault in
/// that one object: the volume is accepted and reported Failed with the reason (EVE's
/// volumemgr would wait for the tree forever, saying so only in its log), and the rest of the
/// config goes into force.
pub(super) fn mark_unusable_volumes(config: &mut DeviceConfig) {
    let trees: BTreeSet<Uuid> = config.content_trees.iter().map(|t| t.content_id).collect();
    for volume in &mut config.volumes {
        if let VolumeOrigin::ContentTree { id } = volume.origin
            && !trees.contains(&id)
        {
            volume.unusable = Some(format!(
                "volume {} is made from content tree {id}, which is not in the config's content trees",
                volume.volume_id
            ));
        }
    }
}

/// Faults that no field type can express: duplicates and dangling references.
pub fn validate(config: &DeviceConfig) -> Result<(), ConfigError> {
    let items = cairn_types::ConfigItemValueMap {
        items: config.config_items.clone(),
    };
    if let Err(why) = items.volume_delete_grace_seconds() {
        return Err(ConfigError::at(
            format!(
                "config_items[{:?}]",
                cairn_types::device::VOLUME_DELETE_GRACE_ITEM
            ),
            why,
        ));
    }
    let mut apps: HashMap<Uuid, usize> = HashMap::new();
    let mut snapshots: HashMap<Uuid, String> = HashMap::new();
    let volumes: BTreeSet<Uuid> = config.volumes.iter().map(|v| v.volume_id).collect();
    for (i, app) in config.apps.iter().enumerate() {
        let uuid = app.app_uuid();
        if let Some(first) = apps.insert(uuid, i) {
            return Err(ConfigError::at(
                format!("apps[{i}].uuid"),
                format!("app {uuid} appears twice (also apps[{first}])"),
            ));
        }
        let mut groups: HashMap<Uuid, usize> = HashMap::new();
        for (j, desc) in app.snapshot.snapshots.iter().enumerate() {
            let at = format!("apps[{i}].snapshot.snapshots[{j}].id");
            if let Some(first) = snapshots.insert(desc.snapshot_id, at.clone()) {
                return Err(ConfigError::at(
                    at,
                    format!("snapshot {} appears twice (also {first})", desc.snapshot_id),
                ));
            }
            // Group members meet at stop barriers: a group snapshot stops them.
            if !desc.group_id.is_nil() && desc.mode != cairn_types::SnapshotMode::Stopped {
                return Err(ConfigError::at(
                    format!("apps[{i}].snapshot.snapshots[{j}].mode"),
                    format!(
                        "snapshot {} of group snapshot {} is {:?}: a group snapshot is taken stopped",
                        desc.snapshot_id, desc.group_id, desc.mode
                    ),
                ));
            }
            // Memory state exists only for a VM.
            if desc.mode == cairn_types::SnapshotMode::Stateful
                && !matches!(app.domain, Some(DomainSpec::Vm(_)))
            {
                return Err(ConfigError::at(
                    format!("apps[{i}].snapshot.snapshots[{j}].mode"),
                    format!(
                        "snapshot {} of app {uuid} ({}) is stateful, but the app is not a VM: only a VM has memory state to save; use live or stopped",
                        desc.snapshot_id, app.display_name
                    ),
                ));
            }
            // A group snapshot is one snapshot per member app, taken now (IMMEDIATE).
            if !desc.group_id.is_nil() {
                let at = format!("apps[{i}].snapshot.snapshots[{j}].group");
                if let Some(first) = groups.insert(desc.group_id, j) {
                    return Err(ConfigError::at(
                        at,
                        format!(
                            "group {} is listed twice by this app (also snapshots[{first}]): a member takes one snapshot of a group",
                            desc.group_id
                        ),
                    ));
                }
                if desc.snapshot_type != SnapshotType::Immediate {
                    return Err(ConfigError::at(
                        at,
                        format!(
                            "snapshot {} of group {} must be of type immediate",
                            desc.snapshot_id, desc.group_id
                        ),
                    ));
                }
            }
        }
        if app
            .snapshot
            .policy
            .as_ref()
            .is_some_and(|p| p.mode == cairn_types::SnapshotMode::Stateful)
            && !matches!(app.domain, Some(DomainSpec::Vm(_)))
        {
            return Err(ConfigError::at(
                format!("apps[{i}].snapshot.schedule_mode"),
                format!(
                    "app {uuid} ({}) schedules stateful snapshots, but it is not a VM: only a VM has memory state to save; use live or stopped",
                    app.display_name
                ),
            ));
        }
        let active = &app.snapshot.active_snapshot;
        if !active.is_empty() && active.parse::<Uuid>().is_err() {
            return Err(ConfigError::at(
                format!("apps[{i}].snapshot.active_snapshot"),
                format!("{active:?} is not a UUID"),
            ));
        }
        for (j, volume) in app.volume_ref_config_list.iter().enumerate() {
            if !volumes.contains(&volume.volume_id) {
                return Err(ConfigError::at(
                    format!("apps[{i}].volume_refs[{j}].uuid"),
                    format!("volume {} is not in the config's volumes", volume.volume_id),
                ));
            }
        }
        if let Some(DomainSpec::Vm(vm)) = &app.domain
            && vm.memory_mib == 0
        {
            return Err(ConfigError::at(
                format!("apps[{i}].domain.memory_mib"),
                "a VM needs memory (MiB > 0)",
            ));
        }
    }
    let mut trees: HashMap<Uuid, usize> = HashMap::new();
    for (i, tree) in config.content_trees.iter().enumerate() {
        if let Some(first) = trees.insert(tree.content_id, i) {
            return Err(ConfigError::at(
                format!("content_trees[{i}].uuid"),
                format!(
                    "content tree {} appears twice (also content_trees[{first}])",
                    tree.content_id
                ),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, volume) in config.volumes.iter().enumerate() {
        crate::container::check_image_volume(volume, &config.content_trees, i)?;
        if let VolumeOrigin::ContentTree { id } = volume.origin
            && volume.format == VolumeFormat::Dir
            && !crate::container::is_container_tree(id, &config.content_trees)
        {
            return Err(ConfigError::at(
                format!("volumes[{i}].format"),
                format!(
                    "volume {} is made from content tree {id} (a disk image): its format must be qcow2 or raw",
                    volume.volume_id
                ),
            ));
        }
        if let VolumeOrigin::RemoteExport { remote, .. } = &volume.origin
            && !config.remotes.iter().any(|r| r.id == *remote)
        {
            return Err(ConfigError::at(
                format!("volumes[{i}].from_export.remote"),
                format!(
                    "volume {} is restored from an export at remote {remote}, which is not in the config's remotes",
                    volume.volume_id
                ),
            ));
        }
        if matches!(
            volume.origin,
            VolumeOrigin::Export { .. } | VolumeOrigin::RemoteExport { .. }
        ) && volume.format == VolumeFormat::Raw
        {
            return Err(ConfigError::at(
                format!("volumes[{i}].format"),
                format!(
                    "volume {} is restored from an export, which holds qcow2 images and directory trees: its format must be qcow2 or dir",
                    volume.volume_id
                ),
            ));
        }
        if !seen.insert((volume.volume_id, volume.generation_counter)) {
            return Err(ConfigError::at(
                format!("volumes[{i}].uuid"),
                format!(
                    "volume {} generation {} appears twice",
                    volume.volume_id, volume.generation_counter
                ),
            ));
        }
    }
    Ok(())
}

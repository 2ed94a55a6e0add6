//! Snapshot config and records. Field names are EVE's, so the three files EVE
//! writes under `/persist/snapshots/<id>/` load as they are.

use std::collections::BTreeMap;

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_repr::{Deserialize_repr, Serialize_repr};
use uuid::Uuid;

use crate::common::{
    AppInstanceOpsCmd, ErrorDescription, UUIDandVersion, go_time, null_as_default,
};

/// When a snapshot is taken; numbers as the API's `SnapshotType`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize_repr, Deserialize_repr, Persist,
)]
#[repr(i32)]
pub enum SnapshotType {
    #[default]
    Unspecified = 0,
    /// Taken at the next upgrade or purge, with the config in use before the change.
    AppUpdate = 1,
    /// Stop the app now, take it, start again.
    Immediate = 2,
}

/// One snapshot asked for by the controller (EVE `SnapshotDesc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default)]
pub struct SnapshotDesc {
    #[serde(rename = "SnapshotID")]
    #[persist(mandatory)]
    pub snapshot_id: Uuid,
    #[serde(rename = "SnapshotType")]
    pub snapshot_type: SnapshotType,
    /// Cairn: a name and a description for people; scheduled snapshots are named by their
    /// policy's pattern.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    /// Cairn: expire this snapshot this long after it was taken; 0 = as its policy says
    /// (scheduled snapshots by the policy's expiry, others never).
    #[serde(rename = "ExpirySeconds")]
    pub expiry_seconds: u64,
    /// Cairn: the consistency group this snapshot belongs to (nil: none). The members of a
    /// group snapshot each list their own snapshot with the same group id; they are taken (and
    /// rolled back) together, all or nothing, at one logical time.
    #[serde(rename = "GroupID")]
    pub group_id: Uuid,
    /// Cairn: how the snapshot is taken; absent in EVE's records: stopped.
    #[serde(rename = "Mode")]
    pub mode: SnapshotMode,
    /// Cairn: taken by the app's snapshot policy on the device, not asked for by the
    /// controller; EVE's type (immediate) says how it is taken, this says why. Absent: false.
    #[serde(rename = "Scheduled", skip_serializing_if = "std::ops::Not::not")]
    pub scheduled: bool,
}

/// Cairn: how a snapshot is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Stop the app, take it, start the app again (EVE's way).
    #[default]
    Stopped,
    /// No stop: a VM is paused briefly while its qcow2 disks are snapshotted; directory
    /// volumes of a process need a copy-on-write backend (btrfs, zfs).
    Live,
    /// Live, plus a VM's memory and device state: a rollback resumes the VM where it was.
    Stateful,
}

/// The snapshot block of an app's config (EVE `SnapshotConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct SnapshotConfig {
    /// The snapshot the controller believes the app runs on; empty when none.
    pub active_snapshot: String,
    pub max_snapshots: u32,
    /// A rollback to `active_snapshot` is asked for each time this counter increases.
    pub rollback_cmd: AppInstanceOpsCmd,
    #[serde(deserialize_with = "null_as_default")]
    pub snapshots: Vec<SnapshotDesc>,
    /// Cairn: schedule, expiry, retention and naming of device-originated snapshots; `None`
    /// (EVE's configs, and most apps) is no policy. Boxed: most configs travel without one.
    pub policy: Option<Box<crate::policy::SnapshotPolicy>>,
}

/// Why a snapshot was taken (EVE `SnapshotWhen`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize_repr, Deserialize_repr, Persist)]
#[repr(u8)]
pub enum SnapshotWhen {
    #[default]
    NoSnapshotTake = 0,
    SnapshotImmediate = 1,
    SnapshotOnUpgrade = 2,
}

/// The record of one snapshot of one app, persisted as `snapshotInstanceStatus.json`.
/// EVE's mandatory fields: `Snapshot`, `AppInstanceID`, `ConfigVersion`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "SnapshotInstanceStatus", version = 1, plain_import)]
pub struct SnapshotInstanceStatus {
    #[persist(mandatory)]
    pub snapshot: SnapshotDesc,
    /// Whether the controller has been told about it.
    pub reported: bool,
    #[serde(with = "go_time")]
    pub time_triggered: Option<DateTime<Utc>>,
    #[serde(with = "go_time")]
    pub time_created: Option<DateTime<Utc>>,
    #[serde(rename = "AppInstanceID")]
    #[persist(mandatory)]
    pub app_instance_id: Uuid,
    /// The app config the snapshot belongs to: the one restored by a rollback.
    #[persist(mandatory)]
    pub config_version: UUIDandVersion,
    pub error: ErrorDescription,
    /// Cairn: the tenant of the app the snapshot belongs to; `""` is the default tenant.
    pub tenant: String,
    /// Cairn: how long a live or stateful snapshot paused the VM, in milliseconds (0: not
    /// paused, or a stopped snapshot).
    #[serde(rename = "PauseMs")]
    pub pause_ms: u64,
}

/// The snapshot part of an app's status (EVE `SnapshottingStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct SnapshottingStatus {
    pub max_snapshots: u32,
    #[serde(deserialize_with = "null_as_default")]
    pub requested_snapshots: Vec<SnapshotInstanceStatus>,
    #[serde(deserialize_with = "null_as_default")]
    pub available_snapshots: Vec<SnapshotInstanceStatus>,
    /// Deletions wait for the app's next deactivation; they are reported as pending meanwhile.
    #[serde(deserialize_with = "null_as_default")]
    pub snapshots_to_be_deleted: Vec<SnapshotDesc>,
    #[serde(
        rename = "PreparedVolumesSnapshotConfigs",
        deserialize_with = "null_as_default"
    )]
    pub prepared_volumes_snapshot_configs: Vec<VolumesSnapshotConfig>,
    pub snapshot_taken_type: SnapshotWhen,
    pub has_rollback_request: bool,
    pub active_snapshot: String,
    pub rollback_in_progress: bool,
}

/// What the volume-manager is asked to do with a snapshot; numbers as EVE's.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize_repr, Deserialize_repr, Persist,
)]
#[repr(u8)]
pub enum VolumesSnapshotAction {
    #[default]
    Unspecified = 0,
    Create = 1,
    Rollback = 2,
    Delete = 3,
}

/// app-manager → volume-manager: act on the snapshot of an app's volumes. Key: snapshot id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "VolumesSnapshotConfig", version = 1, plain_import)]
pub struct VolumesSnapshotConfig {
    #[serde(rename = "SnapshotID")]
    #[persist(mandatory)]
    pub snapshot_id: Uuid,
    #[persist(mandatory)]
    pub action: VolumesSnapshotAction,
    #[serde(rename = "VolumeIDs", deserialize_with = "null_as_default")]
    pub volume_ids: Vec<Uuid>,
    #[serde(rename = "AppUUID")]
    #[persist(mandatory)]
    pub app_uuid: Uuid,
    /// Cairn: increased to ask again for the same action (EVE would see an equal value and do
    /// nothing).
    pub request_counter: u64,
    /// Cairn: per volume id, the volume key (`<uuid>#<generation>`) to act on. A snapshot taken at
    /// a purge must be of the pre-purge generation while the new one already exists; without a
    /// key the volume-manager takes the highest configured generation (EVE's records).
    #[serde(rename = "VolumeKeys", deserialize_with = "null_as_default")]
    pub volume_keys: BTreeMap<Uuid, String>,
    /// Cairn: a create while the app runs. A VM's qcow2 disks were snapshotted by
    /// the domain-manager under the snapshot id's tag: the volume-manager records that snapshot
    /// without writing the image. Directory volumes need a copy-on-write backend.
    pub live: bool,
    /// Cairn: a live create of a container app: its cgroup (`/cairn/<container id>`), frozen
    /// while its volumes are snapshotted so that they agree with each other (empty: none).
    #[serde(deserialize_with = "null_as_default")]
    pub freeze_cgroup: String,
}

/// volume-manager → app-manager: the result, persisted as `volumesSnapshotStatus.json` before
/// it is published. EVE's mandatory fields: `SnapshotID`, `VolumeSnapshotMeta`, `AppUUID`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "VolumesSnapshotStatus", version = 1, plain_import)]
pub struct VolumesSnapshotStatus {
    #[serde(rename = "SnapshotID")]
    #[persist(mandatory)]
    pub snapshot_id: Uuid,
    /// Per volume id, the backend's own description of its snapshot (EVE keeps a bare
    /// snapshot name here for qcow2).
    #[persist(mandatory)]
    pub volume_snapshot_meta: BTreeMap<Uuid, serde_json::Value>,
    #[serde(with = "go_time")]
    pub time_created: Option<DateTime<Utc>>,
    #[serde(rename = "AppUUID")]
    #[persist(mandatory)]
    pub app_uuid: Uuid,
    pub ref_count: i64,
    pub result_of_action: VolumesSnapshotAction,
    /// Cairn: the request this status answers, so a repeated request is seen as answered.
    pub request_counter: u64,
    /// Cairn: per-volume errors of the last action (EVE keeps only one error).
    #[serde(deserialize_with = "null_as_default")]
    pub volume_errors: BTreeMap<Uuid, String>,
    /// Cairn: the action persisted as an intent and not finished yet (`Unspecified` when none).
    /// Written before any backend call, so a restarted volume-manager resumes or undoes it.
    pub in_progress: VolumesSnapshotAction,
    /// Cairn: the request counter of the action in progress.
    pub in_progress_counter: u64,
    /// Cairn: how long `freeze_cgroup` was frozen for a live create, in milliseconds rounded
    /// up (0: nothing was frozen).
    pub pause_ms: u64,
    /// Cairn: the cgroup a live create in progress freezes (with the intent, empty once it
    /// is finished): a restarted volume-manager that finds the request withdrawn thaws it,
    /// since nobody would ask for that create again.
    #[serde(deserialize_with = "null_as_default")]
    pub freeze_cgroup: String,
    /// EVE embeds `ErrorAndTimeWithSource`, so these keys sit at the top level.
    pub error_source_type: String,
    #[serde(flatten)]
    pub error: ErrorDescription,
}

impl VolumesSnapshotStatus {
    /// The typed metadata of one volume's snapshot (EVE's bare qcow2 snapshot name included).
    pub fn meta_of(&self, volume_id: Uuid) -> Option<crate::volume::VolumeSnapshotMeta> {
        self.volume_snapshot_meta
            .get(&volume_id)
            .map(crate::volume::VolumeSnapshotMeta::from_value)
    }

    /// Whether an action is recorded as begun and not finished.
    pub fn is_in_progress(&self) -> bool {
        self.in_progress != VolumesSnapshotAction::Unspecified
    }
}

crate::topic!(VolumesSnapshotConfig, |v| v.snapshot_id.to_string());
crate::topic!(VolumesSnapshotStatus, |v| v.snapshot_id.to_string());

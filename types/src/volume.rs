//! Volumes: what the config asks for and what the volume-manager made of it.

use std::path::PathBuf;

use cairn_persist::Persist;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::common::{ErrorDescription, null_as_default};

/// How a volume is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum VolumeFormat {
    #[default]
    Qcow2,
    Raw,
    /// A directory (btrfs subvolume when the volume root is on btrfs).
    Dir,
}

/// Where a volume's first content comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(tag = "Type")]
pub enum VolumeOrigin {
    /// Empty, of the configured size.
    #[default]
    Blank,
    /// A copy of a local image file, verified against its sha256 before use.
    BaseImage {
        #[serde(rename = "Path")]
        path: PathBuf,
        #[serde(rename = "Sha256")]
        sha256: String,
    },
}

/// config-agent → volume-manager. Key: `<VolumeID>#<generation>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "VolumeConfig", version = 1)]
pub struct VolumeConfig {
    #[serde(rename = "VolumeID")]
    #[persist(mandatory)]
    pub volume_id: Uuid,
    pub generation_counter: i64,
    pub local_generation_counter: i64,
    pub display_name: String,
    pub max_vol_size: u64,
    pub format: VolumeFormat,
    pub origin: VolumeOrigin,
    /// Snapshots of a purgeable volume keep the whole pre-purge volume.
    pub purgeable: bool,
}

impl VolumeConfig {
    pub fn key(&self) -> String {
        volume_key(
            self.volume_id,
            self.generation_counter + self.local_generation_counter,
        )
    }
}

/// The bus and file key of a volume at a generation, as EVE writes it.
pub fn volume_key(volume_id: Uuid, generation: i64) -> String {
    format!("{volume_id}#{generation}")
}

/// The snapshot backend serving a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum SnapshotBackendKind {
    #[default]
    None,
    Qcow2,
    Btrfs,
    Zfs,
    Purgeable,
    Copy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum VolumeState {
    #[default]
    Creating,
    Ready,
    Deleting,
    Failed,
}

/// volume-manager → app-manager, domain-manager, cli. Key: as [`VolumeConfig::key`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "VolumeStatus", version = 1)]
pub struct VolumeStatus {
    #[serde(rename = "VolumeID")]
    #[persist(mandatory)]
    pub volume_id: Uuid,
    pub generation_counter: i64,
    pub local_generation_counter: i64,
    pub display_name: String,
    pub state: VolumeState,
    pub format: VolumeFormat,
    pub backend: SnapshotBackendKind,
    pub file_location: PathBuf,
    pub max_vol_size: u64,
    /// Bytes allocated on disk.
    pub current_size: u64,
    pub error: ErrorDescription,
    #[serde(deserialize_with = "null_as_default")]
    pub warnings: Vec<String>,
}

impl VolumeStatus {
    pub fn key(&self) -> String {
        volume_key(
            self.volume_id,
            self.generation_counter + self.local_generation_counter,
        )
    }
}

/// What the volume-manager keeps per volume in `VolumesSnapshotStatus.VolumeSnapshotMeta`
/// (serialized into that map's JSON value). EVE stores a bare string there (the qcow2 snapshot
/// name); [`VolumeSnapshotMeta::from_value`] reads that as a qcow2 snapshot of that name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct VolumeSnapshotMeta {
    /// The backend that made the snapshot.
    pub backend: SnapshotBackendKind,
    /// The snapshot's name on the backend (the snapshot UUID for Cairn's snapshots).
    pub name: String,
    /// The volume key (`<uuid>#<generation>`) the snapshot was taken of.
    pub volume_key: String,
    /// The volume's file or directory when the snapshot was taken.
    pub file_location: PathBuf,
    /// Where the snapshot itself lives when it is not inside the volume: the btrfs read-only
    /// subvolume, the copy directory, the kept pre-purge volume; the ZFS `dataset@name`.
    pub snapshot_location: PathBuf,
    /// Bytes the snapshot took when made, if the backend knows (copy backend).
    pub size: u64,
}

impl VolumeSnapshotMeta {
    /// Reads Cairn's object or EVE's bare snapshot name; anything else yields an empty meta
    /// whose `name` is the JSON text, so the caller can report it.
    pub fn from_value(value: &serde_json::Value) -> Self {
        match value {
            serde_json::Value::String(name) => Self {
                backend: SnapshotBackendKind::Qcow2,
                name: name.clone(),
                ..Self::default()
            },
            other => serde_json::from_value(other.clone()).unwrap_or_else(|_| Self {
                name: other.to_string(),
                ..Self::default()
            }),
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// app-manager → volume-manager: the volumes an app holds now (EVE: the `VolumeRefConfig`s
/// zedmanager publishes to volumemgr). Key: app UUID. A volume whose config is gone (an old
/// generation after a purge) stays while an app holds it: the app may still run on it, a
/// snapshot may be about to be taken of it, or a rollback may have pointed the app back at it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "AppVolumeRefs", version = 1)]
pub struct AppVolumeRefs {
    #[serde(rename = "AppUUID")]
    #[persist(mandatory)]
    pub app_uuid: Uuid,
    /// Volume keys (`<uuid>#<generation>`), as [`VolumeStatus::key`].
    #[serde(deserialize_with = "null_as_default")]
    pub volume_keys: std::collections::BTreeSet<String>,
}

crate::topic!(VolumeConfig, |v| v.key());
crate::topic!(AppVolumeRefs, |v| v.app_uuid.to_string());
crate::topic!(VolumeStatus, |v| v.key());

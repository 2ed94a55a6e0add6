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

crate::topic!(VolumeConfig, |v| v.key());
crate::topic!(VolumeStatus, |v| v.key());

//! Exports of snapshots off the device: the job request (`cairn` → volume-manager), its status,
//! the manifest written into every export directory, and the volume-manager's job record.

use std::path::PathBuf;

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::common::{go_time, null_as_default};

/// The manifest's file name inside an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The suffix of an export directory being written; never a complete export.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum ExportAction {
    /// Write an export of a snapshot into the target directory.
    #[default]
    Export,
    /// Re-read an export directory (`TargetDir`) and check every checksum; changes nothing.
    Verify,
}

/// cli → volume-manager: one export or verify job. Key: job UUID. A job runs at most once per
/// id; setting `Cancel` (or unpublishing the request) cancels it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ExportConfig", version = 1)]
pub struct ExportConfig {
    #[serde(rename = "JobID")]
    #[persist(mandatory)]
    pub job_id: Uuid,
    pub action: ExportAction,
    #[serde(rename = "SnapshotID")]
    pub snapshot_id: Uuid,
    #[serde(rename = "AppUUID")]
    pub app_uuid: Uuid,
    /// Export: the directory the export directory is made in. Verify: the export directory.
    pub target_dir: PathBuf,
    /// Carry only the clusters changed since the previous export in `TargetDir` (falls back to
    /// a full export, saying why, when that cannot be done exactly).
    pub incremental: bool,
    pub cancel: bool,
    /// Export: the id of a configured remote ([`crate::RemoteConfig`]) to write to instead of
    /// `TargetDir`; empty: `TargetDir`.
    pub remote: String,
    /// Under the remote's own prefix: the key prefix the export is written below.
    pub remote_prefix: String,
    /// An incremental export to a remote: a full one instead once the base's chain already
    /// has this many links (a full export every N); 0: chains grow without limit.
    pub full_every: u32,
    /// After a complete export to a remote: keep the newest this many exports of the app under
    /// the prefix (and every export a kept one builds on), delete the others; 0: keep all.
    pub keep_exports: u32,
    /// A request that stays in force (the config's, the schedule's): when a complete export of
    /// this snapshot is already under the prefix, the job is Done with it and writes nothing,
    /// so a request replayed after a restart does not export again.
    pub once: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum ExportState {
    #[default]
    Running,
    Done,
    Failed,
    Cancelled,
}

/// One volume's outcome in an export or a verify.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ExportVolumeResult {
    #[serde(rename = "VolumeID")]
    pub volume_id: Uuid,
    pub file: String,
    pub kind: ExportKind,
    /// Bytes of the exported file.
    pub size: u64,
    /// Bytes of the volume's data carried (virtual size for a full export, changed clusters for
    /// an incremental one).
    pub data_bytes: u64,
    /// Why an incremental export of this volume became a full one; empty otherwise.
    pub fallback_reason: String,
}

/// volume-manager → cli: progress and outcome of an [`ExportConfig`]. Key: job UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ExportStatus", version = 1)]
pub struct ExportStatus {
    #[serde(rename = "JobID")]
    #[persist(mandatory)]
    pub job_id: Uuid,
    pub action: ExportAction,
    /// The snapshot exported and its app, from the job's config (nil after a restart found
    /// only the job's intent record): what the read-outs show the job under.
    #[serde(rename = "SnapshotID")]
    pub snapshot_id: Uuid,
    #[serde(rename = "AppUUID")]
    pub app_uuid: Uuid,
    pub state: ExportState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// An export to a remote: bytes of export files uploaded so far.
    pub bytes_uploaded: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub volumes: Vec<ExportVolumeResult>,
    /// An incremental export that became full for some volume (see their `FallbackReason`).
    pub fell_back_to_full: bool,
    /// The finished export directory (Done), or the one checked (Verify).
    pub export_dir: PathBuf,
    /// An export to a remote: `REMOTE:KEY-PREFIX` of the export (its manifest is
    /// `<KEY-PREFIX>/manifest.json`), once it is complete.
    pub remote_export: String,
    /// What failed, naming the volume and file where one is at fault.
    pub error: String,
    /// When the job ended (Done, Failed or Cancelled); none while it runs.
    #[serde(with = "go_time")]
    pub finished: Option<DateTime<Utc>>,
    /// Retention after the export: the exports it removed from the remote (their keys).
    #[serde(deserialize_with = "null_as_default")]
    pub removed_exports: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum ExportKind {
    #[default]
    Full,
    /// Only changed clusters; the qcow2's backing file is the same volume in `Base`.
    Incremental,
}

/// The previous link of an incremental volume's chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ExportBase {
    /// The base export's directory name, a sibling of this export's directory.
    pub dir: String,
    /// sha256 of the base export's manifest file.
    pub manifest_sha256: String,
}

/// One volume in a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ManifestVolume {
    #[serde(rename = "VolumeID")]
    pub volume_id: Uuid,
    pub display_name: String,
    /// The qcow2 file in the export directory.
    pub file: String,
    pub virtual_size: u64,
    pub sha256: String,
    pub kind: ExportKind,
    pub base: Option<ExportBase>,
    /// Why this volume is full although an incremental export was asked.
    pub fallback_reason: String,
    /// What the file holds (absent in older manifests: a qcow2 image).
    pub content: ExportContent,
}

/// What a volume's file in an export holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExportContent {
    /// A zstd-compressed qcow2 image (an image volume).
    #[default]
    Qcow2,
    /// A directory volume's tree as a zstd-compressed tar (owners, modes, nanosecond mtimes,
    /// symlinks, hard links and xattrs in PAX records).
    Tree,
}

/// `manifest.json` in an export directory, written last: its presence (under the final name)
/// marks a complete export.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ExportManifest {
    pub format: u32,
    #[serde(rename = "AppUUID")]
    pub app_uuid: Uuid,
    pub app_name: String,
    #[serde(rename = "SnapshotID")]
    pub snapshot_id: Uuid,
    pub snapshot_name: String,
    #[serde(with = "go_time")]
    pub snapshot_time: Option<DateTime<Utc>>,
    #[serde(with = "go_time")]
    pub export_time: Option<DateTime<Utc>>,
    /// The app config saved with the snapshot (`appInstanceConfig.json`), as it was.
    pub app_config: serde_json::Value,
    #[serde(deserialize_with = "null_as_default")]
    pub volumes: Vec<ManifestVolume>,
}

impl ExportManifest {
    pub fn volume(&self, id: Uuid) -> Option<&ManifestVolume> {
        self.volumes.iter().find(|v| v.volume_id == id)
    }
}

/// The volume-manager's intent record of a running export, written before the partial
/// directory is made and removed once the export is final or cleaned away.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ExportJobRecord", version = 1)]
pub struct ExportJobRecord {
    #[serde(rename = "JobID")]
    #[persist(mandatory)]
    pub job_id: Uuid,
    #[persist(mandatory)]
    pub partial_dir: PathBuf,
    #[serde(with = "go_time")]
    pub started: Option<DateTime<Utc>>,
    /// An export to a remote: its id and the key prefix of the export being written (what a
    /// restart removes unless its manifest is there), and the multipart uploads begun.
    pub remote: String,
    pub remote_dir: String,
    #[serde(deserialize_with = "null_as_default")]
    pub uploads: Vec<RemoteUpload>,
}

/// A multipart upload an export began: aborted by a restart that finds it unfinished.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct RemoteUpload {
    pub key: String,
    #[serde(rename = "UploadID")]
    pub upload_id: String,
}

crate::topic!(ExportConfig, |v| v.job_id.to_string());
crate::topic!(ExportStatus, |v| v.job_id.to_string());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_with_its_chain_link() {
        let manifest = ExportManifest {
            format: MANIFEST_FORMAT,
            volumes: vec![ManifestVolume {
                file: "v.qcow2".into(),
                kind: ExportKind::Incremental,
                base: Some(ExportBase {
                    dir: "a".into(),
                    manifest_sha256: "00".into(),
                }),
                ..ManifestVolume::default()
            }],
            ..ExportManifest::default()
        };
        let text = serde_json::to_string(&manifest).unwrap_or_default();
        assert!(text.contains(r#""Kind":"Incremental""#), "{text}");
        assert_eq!(
            serde_json::from_str::<ExportManifest>(&text).ok(),
            Some(manifest)
        );
    }
}

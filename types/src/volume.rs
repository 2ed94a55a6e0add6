//! Volumes: what the config asks for and what the volume-manager made of it.

use std::path::PathBuf;

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
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
    /// A clone: a copy of volume `volume`'s state in snapshot `snapshot` (read from that
    /// snapshot's `volumesSnapshotStatus.json`). The copy is independent of its source: deleting
    /// or rolling back the source volume or snapshot afterwards does not touch it. The origin only
    /// matters when the volume is made (first time, or a purge's fresh generation).
    Snapshot {
        #[serde(rename = "SnapshotID")]
        snapshot: Uuid,
        #[serde(rename = "VolumeID")]
        volume: Uuid,
    },
    /// Restored from an export (`cairn export`): volume `volume` of the export directory `dir`
    /// (an incremental one with its chain). The export is verified (every sha256 of the chain)
    /// before the volume is made from it, as an independent qcow2.
    Export {
        #[serde(rename = "Dir")]
        dir: PathBuf,
        #[serde(rename = "VolumeID")]
        volume: Uuid,
    },
    /// Restored from an export at an object-store remote ([`crate::RemoteConfig`] `remote`):
    /// volume `volume` of the export whose manifest is `<key>/manifest.json` under the remote's
    /// prefix (an incremental one with its chain, sibling keys). The volume's files are
    /// downloaded and every sha256 checked before a byte is used; then as [`Self::Export`].
    RemoteExport {
        #[serde(rename = "Remote")]
        remote: String,
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "VolumeID")]
        volume: Uuid,
    },
    /// Made from a downloaded, verified content tree (EVE's `VCOT_DOWNLOAD` with
    /// `downloadContentTreeID`): converted from the image's format into the volume's, then
    /// grown to the volume's size. The volume waits until the content tree is LOADED.
    ContentTree {
        #[serde(rename = "ContentTreeID")]
        id: Uuid,
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
    /// How a directory volume is snapshotted and restored (Cairn; `Auto` for other formats).
    pub restore_mode: DirRestoreMode,
    /// Why the volume cannot be made from what the config says (a controller fault in one
    /// object, such as a content tree the config does not have): the volume is reported
    /// Failed with this reason instead of the whole config being refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// The snapshot/restore mode of a directory volume, chosen per volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum DirRestoreMode {
    /// The volume-manager chooses from the filesystem: btrfs swap on btrfs, else copy.
    #[default]
    Auto,
    /// Read-only subvolume snapshot; restore swaps in a writable snapshot of it.
    BtrfsSwap,
    /// Snapshot = squashfs image of the tree; the volume is an overlay on the image it was
    /// restored from; restore drops the upper layer.
    SquashfsOverlay,
    /// Snapshot = rsync copy (hard links to the previous one); restore moves changed files back.
    Rsync,
    /// Snapshot = full copy; restore copies it back and swaps it in.
    Copy,
}

impl VolumeConfig {
    pub fn key(&self) -> String {
        volume_key_local(
            self.volume_id,
            self.generation_counter,
            self.local_generation_counter,
        )
    }
}

/// The bus and file key of a volume at a generation, as EVE writes it.
pub fn volume_key(volume_id: Uuid, generation: i64) -> String {
    format!("{volume_id}#{generation}")
}

/// The key of a volume at the controller's `generation` and the device's `local` generation:
/// `<uuid>#<generation>` while `local` is 0 (every key the controller's configs name, and every
/// key written before local generations existed), `<uuid>#<generation>.<local>` otherwise.
///
/// EVE writes `<uuid>#<generation + local>`, which makes the controller's next generation and a
/// local purge of the current one the same key; Cairn keeps them apart. The app-manager gives a
/// volume a new local generation at a bare purge (purge counter up, generation unchanged), and
/// the volume-manager makes a fresh volume for it (see [`AppVolumeRefs`]).
pub fn volume_key_local(volume_id: Uuid, generation: i64, local: i64) -> String {
    if local == 0 {
        volume_key(volume_id, generation)
    } else {
        format!("{volume_id}#{generation}.{local}")
    }
}

/// The volume id, generation and local generation a key names, if it is one
/// [`volume_key_local`] makes (`None` for anything else, including a non-canonical spelling).
pub fn parse_volume_key(key: &str) -> Option<(Uuid, i64, i64)> {
    let (id, rest) = key.split_once('#')?;
    let id = id.parse::<Uuid>().ok()?;
    let (generation, local) = match rest.split_once('.') {
        Some((g, l)) => (g.parse::<i64>().ok()?, l.parse::<i64>().ok()?),
        None => (rest.parse::<i64>().ok()?, 0),
    };
    (volume_key_local(id, generation, local) == key).then_some((id, generation, local))
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
    /// A squashfs image of the tree; the volume is an overlayfs over it.
    Squashfs,
    /// An rsync copy of the tree.
    Rsync,
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
    /// Why `backend` was chosen, e.g. `btrfs: /persist/volumes is on btrfs` (Cairn; absent in
    /// EVE's records and in Cairn's before it was added).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub backend_reason: String,
    pub file_location: PathBuf,
    pub max_vol_size: u64,
    /// Bytes allocated on disk.
    pub current_size: u64,
    pub error: ErrorDescription,
    #[serde(deserialize_with = "null_as_default")]
    pub warnings: Vec<String>,
    /// Set while the volume, gone from the config, is kept for the deletion grace period
    /// (Cairn; absent in EVE's records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_deletion: Option<PendingDeletion>,
}

/// A volume whose uuid left the config: detached (no app can use it), kept with its data and
/// the snapshots living in it until `delete_at`, and given back as it is if the same volume
/// (uuid and generation) comes back into the config before then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct PendingDeletion {
    /// When the volume-manager saw the volume leave the config; the deadline counts from it.
    pub since: Option<DateTime<Utc>>,
    /// When it will be deleted (`since` + the grace period in force).
    pub delete_at: Option<DateTime<Utc>>,
    /// Why it is pending deletion, for the technician and the controller.
    pub reason: String,
}

impl VolumeStatus {
    pub fn key(&self) -> String {
        volume_key_local(
            self.volume_id,
            self.generation_counter,
            self.local_generation_counter,
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
    /// The volume key (`<uuid>#<generation>[.<local>]`) the snapshot was taken of.
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
///
/// A held key is also a request: a key at a local generation (`<uuid>#<gen>.<local>`, made by a
/// bare purge) has no `VolumeConfig` of its own, and the volume-manager makes a fresh volume for
/// it from the config of `<uuid>#<gen>`. That config's own volume is then superseded: it goes
/// once nothing holds it and no snapshot needs it, like an unconfigured generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "AppVolumeRefs", version = 1)]
pub struct AppVolumeRefs {
    #[serde(rename = "AppUUID")]
    #[persist(mandatory)]
    pub app_uuid: Uuid,
    /// Volume keys (`<uuid>#<generation>` or `<uuid>#<generation>.<local>`), as
    /// [`VolumeStatus::key`].
    #[serde(deserialize_with = "null_as_default")]
    pub volume_keys: std::collections::BTreeSet<String>,
}

crate::topic!(VolumeConfig, |v| v.key());
crate::topic!(AppVolumeRefs, |v| v.app_uuid.to_string());
crate::topic!(VolumeStatus, |v| v.key());

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn a_clone_origin_round_trips_and_older_origins_read_as_before() {
        let origin = VolumeOrigin::Snapshot {
            snapshot: Uuid::from_u128(1),
            volume: Uuid::from_u128(2),
        };
        let text = serde_json::to_string(&origin).unwrap_or_default();
        assert!(text.contains(r#""Type":"Snapshot""#), "{text}");
        assert!(
            text.contains("SnapshotID") && text.contains("VolumeID"),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<VolumeOrigin>(&text).ok(),
            Some(origin)
        );
        assert_eq!(
            serde_json::from_str::<VolumeOrigin>(r#"{"Type":"Blank"}"#).ok(),
            Some(VolumeOrigin::Blank)
        );
    }

    #[test]
    fn keys_without_a_local_generation_are_unchanged_and_local_ones_round_trip() {
        let id = Uuid::from_u128(7);
        assert_eq!(volume_key_local(id, 3, 0), volume_key(id, 3));
        assert_eq!(parse_volume_key(&volume_key(id, 3)), Some((id, 3, 0)));
        let local = volume_key_local(id, 3, 2);
        assert_eq!(local, format!("{id}#3.2"));
        assert_eq!(parse_volume_key(&local), Some((id, 3, 2)));
        for bad in [
            "x#1",
            "",
            &format!("{id}#1.0"),
            &format!("{id}#a"),
            &format!("{id}"),
        ] {
            assert_eq!(parse_volume_key(bad), None, "{bad}");
        }
        let status = VolumeStatus {
            volume_id: id,
            generation_counter: 3,
            local_generation_counter: 2,
            ..Default::default()
        };
        assert_eq!(status.key(), local);
    }
}

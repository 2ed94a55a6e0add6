//! btrfs: a snapshot is a read-only subvolume snapshot beside the volume; rollback makes a
//! writable snapshot of it and exchanges it with the volume in one `renameat2`, then deletes the
//! old content.

use std::path::{Path, PathBuf};

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{SnapshotBackend, VolumeRef, exchange, snapshot_path};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT};

pub const TOOL: &str = "btrfs";
pub const PACKAGE: &str = "btrfs-progs";

#[derive(Debug, Clone, Default)]
pub struct BtrfsBackend;

/// Whether `path` lies on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

async fn btrfs(volume: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    process::run(TOOL, args, COMMAND_TIMEOUT)
        .await
        .map(drop)
        .map_err(|source| {
            if source.stderr().to_lowercase().contains("no space left") {
                VolumeError::NoSpace {
                    volume: volume.to_string(),
                    path: PathBuf::from(args.last().copied().unwrap_or_default()),
                    detail: source.stderr().to_string(),
                }
            } else {
                VolumeError::Command {
                    volume: volume.to_string(),
                    source,
                }
            }
        })
}

/// `btrfs subvolume create <path>`.
pub async fn create_subvolume(volume: &str, path: &Path) -> Result<()> {
    btrfs(
        volume,
        &["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
    )
    .await
}

/// `btrfs subvolume delete <path>`; a missing path is not an error.
pub async fn delete_subvolume(volume: &str, path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    btrfs(
        volume,
        &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
    )
    .await
}

/// `btrfs subvolume snapshot <from> <to>`: a writable snapshot (a clone's volume).
pub async fn writable_snapshot(volume: &str, from: &Path, to: &Path) -> Result<()> {
    if !from.exists() {
        return Err(VolumeError::NoSnapshot {
            volume: volume.to_string(),
            snapshot: from.display().to_string(),
        });
    }
    btrfs(
        volume,
        &[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            from.as_os_str(),
            to.as_os_str(),
        ],
    )
    .await
}

/// Where an interrupted rollback's scratch subvolume lives (removed before the next one).
pub fn rollback_scratch(volume: &Path) -> PathBuf {
    let name = volume
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    volume.with_file_name(format!(".{name}.rollback"))
}

impl SnapshotBackend for BtrfsBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Btrfs
    }

    fn snapshot_location(&self, volume: &VolumeRef, name: &str) -> PathBuf {
        snapshot_path(volume, name)
    }

    async fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        let _ = fresh; // looking is as cheap as not
        let meta = self.plan(volume, name);
        if !volume.path.exists() {
            return Err(VolumeError::Missing {
                volume: volume.key.clone(),
                path: volume.path.clone(),
            });
        }
        if meta.snapshot_location.exists() {
            tracing::info!(volume = %volume.key, snapshot = name, "btrfs snapshot already there: adopted");
            return Ok(meta);
        }
        super::ensure_parent(&volume.key, &meta.snapshot_location)?;
        btrfs(
            &volume.key,
            &[
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                "-r".as_ref(),
                volume.path.as_os_str(),
                meta.snapshot_location.as_os_str(),
            ],
        )
        .await?;
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let volume = &meta.volume_key;
        if !meta.snapshot_location.exists() {
            return Err(VolumeError::NoSnapshot {
                volume: volume.clone(),
                snapshot: meta.name.clone(),
            });
        }
        let scratch = rollback_scratch(&meta.file_location);
        delete_subvolume(volume, &scratch).await?;
        btrfs(
            volume,
            &[
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                meta.snapshot_location.as_os_str(),
                scratch.as_os_str(),
            ],
        )
        .await?;
        if meta.file_location.exists() {
            exchange(&scratch, &meta.file_location).map_err(VolumeError::io(
                volume,
                "cannot exchange the rolled-back subvolume with",
                &meta.file_location,
            ))?;
            delete_subvolume(volume, &scratch).await?;
        } else {
            std::fs::rename(&scratch, &meta.file_location).map_err(VolumeError::io(
                volume,
                "cannot move the rolled-back subvolume to",
                &meta.file_location,
            ))?;
        }
        Ok(())
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        delete_subvolume(&meta.volume_key, &meta.snapshot_location).await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(meta.snapshot_location.exists())
    }
}

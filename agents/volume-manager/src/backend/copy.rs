//! Plain directory volumes on a filesystem without snapshots: the snapshot is a full copy
//! (`copy_file_range`, which reflinks where the filesystem can), made under a `.partial` name
//! and renamed when complete, so only complete copies are ever adopted. Progress is logged.
//! Every copied file and directory is fsynced before the rename, and the rename before the
//! caller records it: a record written after a power cut's lost page cache must not describe a
//! copy that is missing or holds empty files.

// File work: its blocking calls are in the sync helpers below, run on the blocking pool
// (`blocking`); only they may call the crate's banned methods.

use std::path::{Path, PathBuf};

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{
    CloneTarget, SnapshotBackend, VolumeRef, blocking, exchange, is_dir_blocking, partial,
    remove_tree, snapshot_path, sync_parent,
};
use crate::error::{Result, VolumeError};

#[derive(Debug, Clone, Default)]
pub struct CopyBackend;

/// Log a progress line every this many bytes.
const PROGRESS_STEP: u64 = 256 << 20;

/// Copies the tree `from` into the new directory `to`, logging progress; returns bytes copied.
pub fn copy_tree(volume: &str, from: &Path, to: &Path) -> Result<u64> {
    with_progress(volume, from, |progress| {
        copy_dir(volume, from, to, progress)
    })
}

/// Copies what the tree `from` holds into the existing directory `to` (a clone's new volume),
/// logging progress; returns bytes copied.
pub fn copy_contents(volume: &str, from: &Path, to: &Path) -> Result<u64> {
    with_progress(volume, from, |progress| {
        copy_entries(volume, from, to, progress)
    })
}

/// Runs `copy` with a progress callback that logs every `PROGRESS_STEP` bytes of the tree
/// `from`; returns the bytes copied.
fn with_progress(
    volume: &str,
    from: &Path,
    copy: impl FnOnce(&mut dyn FnMut(u64)) -> Result<()>,
) -> Result<u64> {
    let total = tree_size(from);
    let mut done = 0u64;
    let mut next_report = PROGRESS_STEP;
    copy(&mut |bytes| {
        done += bytes;
        if done >= next_report {
            next_report += PROGRESS_STEP;
            tracing::info!(volume, copied = done, total, "copying volume");
        }
    })?;
    Ok(done)
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn copy_dir(volume: &str, from: &Path, to: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
    std::fs::create_dir(to).map_err(VolumeError::io(volume, "cannot create directory", to))?;
    copy_entries(volume, from, to, progress)
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn copy_entries(volume: &str, from: &Path, to: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(VolumeError::io(volume, "cannot read", from))?;
    for entry in entries {
        let entry = entry.map_err(VolumeError::io(volume, "cannot read", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(VolumeError::io(volume, "cannot stat", &src))?;
        if kind.is_dir() {
            copy_dir(volume, &src, &dst, progress)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(VolumeError::io(
                volume,
                "cannot read link",
                &src,
            ))?;
            std::os::unix::fs::symlink(target, &dst).map_err(VolumeError::io(
                volume,
                "cannot create link",
                &dst,
            ))?;
        } else {
            let bytes = std::fs::copy(&src, &dst).map_err(VolumeError::io(
                volume,
                "cannot copy to",
                &dst,
            ))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(VolumeError::io(volume, "cannot sync", &dst))?;
            progress(bytes);
        }
    }
    let perms = std::fs::metadata(from)
        .map_err(VolumeError::io(volume, "cannot stat", from))?
        .permissions();
    std::fs::set_permissions(to, perms).map_err(VolumeError::io(volume, "cannot chmod", to))?;
    // Its entries (the files above, and the subdirectories, each synced by its own call).
    cairn_persist::sync_dir(to).map_err(VolumeError::io(volume, "cannot sync", to))
}

/// Bytes in regular files under `path`.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| tree_size(&e.path())).sum::<u64>())
            .unwrap_or(0)
    } else if meta.is_file() {
        meta.len()
    } else {
        0
    }
}

/// The snapshot `to`: a copy of the volume `from`, made under its partial name, then renamed,
/// durably. Returns the bytes copied.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn make_copy(key: &str, from: &Path, to: &Path) -> Result<u64> {
    let tmp = partial(to);
    remove_tree(key, &tmp)?;
    super::ensure_parent(key, to)?;
    let copied = copy_tree(key, from, &tmp).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    std::fs::rename(&tmp, to).map_err(VolumeError::io(key, "cannot rename to", to))?;
    sync_parent(key, to)?;
    Ok(copied)
}

/// The volume `vol` made again from the snapshot `snap`: copied aside, then exchanged (or
/// renamed, when the volume was released) into place, durably.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn restore_copy(key: &str, snap: &Path, vol: &Path) -> Result<()> {
    let scratch = super::rollback_scratch(vol);
    remove_tree(key, &scratch)?;
    copy_tree(key, snap, &scratch)?;
    if vol.exists() {
        exchange(&scratch, vol).map_err(VolumeError::io(
            key,
            "cannot exchange the restored copy with",
            vol,
        ))?;
        sync_parent(key, vol)?;
        remove_tree(key, &scratch)
    } else {
        std::fs::rename(&scratch, vol).map_err(VolumeError::io(key, "cannot rename to", vol))?;
        sync_parent(key, vol)
    }
}

impl SnapshotBackend for CopyBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Copy
    }

    fn name(&self) -> &'static str {
        "copy"
    }

    /// A snapshot is a copy of the tree, outside the volume.
    fn snapshot_outside_volume(&self) -> bool {
        true
    }

    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        if target.image_format().is_some() {
            return Err(target.mismatch(source));
        }
        target.copy_tree(&source.snapshot_location).await
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
        let (mut meta, there) = super::create_preamble(self, volume, name, true).await?;
        let (key, from, to) = (
            volume.key.clone(),
            volume.path.clone(),
            meta.snapshot_location.clone(),
        );
        meta.size = blocking(&volume.key, move || {
            if there {
                return Ok(tree_size(&to));
            }
            make_copy(&key, &from, &to)
        })
        .await?;
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if !is_dir_blocking(&meta.snapshot_location).await {
            return Err(VolumeError::NoSnapshot {
                volume: meta.volume_key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        let (key, snap, vol) = (
            meta.volume_key.clone(),
            meta.snapshot_location.clone(),
            meta.file_location.clone(),
        );
        blocking(&meta.volume_key, move || restore_copy(&key, &snap, &vol)).await
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let (key, snap) = (meta.volume_key.clone(), meta.snapshot_location.clone());
        blocking(&meta.volume_key, move || {
            remove_tree(&key, &partial(&snap))?;
            remove_tree(&key, &snap)?;
            // Durable before the caller removes the record: else a leak after a power cut.
            sync_parent(&key, &snap)
        })
        .await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(is_dir_blocking(&meta.snapshot_location).await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn copy_snapshot_round_trip_restores_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let vol = VolumeRef {
            key: "v#0".into(),
            path: dir.path().join("v#0"),
        };
        std::fs::create_dir_all(vol.path.join("sub")).unwrap();
        std::fs::write(vol.path.join("sub/a"), b"before").unwrap();
        let b = CopyBackend;
        let meta = b.create(&vol, "s1", true).await.unwrap();
        assert_eq!(meta.size, 6);
        std::fs::write(vol.path.join("sub/a"), b"after").unwrap();
        std::fs::write(vol.path.join("new"), b"x").unwrap();
        b.rollback(&meta).await.unwrap();
        assert_eq!(std::fs::read(vol.path.join("sub/a")).unwrap(), b"before");
        assert!(!vol.path.join("new").exists());
        assert!(b.exists(&meta).await.unwrap());
        b.delete(&meta).await.unwrap();
        b.delete(&meta).await.unwrap();
        assert!(!b.exists(&meta).await.unwrap());
    }
}

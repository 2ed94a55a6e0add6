//! btrfs: a snapshot is a read-only subvolume snapshot beside the volume; rollback makes a
//! writable snapshot of it and exchanges it with the volume in one `renameat2`, then deletes the
//! old content.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::btrfs_ioctl;
use super::{
    Auto, CloneTarget, SnapshotBackend, ToolSpec, VolumeRef, exchange, exists_blocking,
    snapshot_path,
};
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

/// Whether `path` is the root of a btrfs subvolume (inode 256 on btrfs).
fn is_subvolume(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == 256) && is_btrfs(path)
}

/// Deletes the subvolume at `path` (`BTRFS_IOC_SNAP_DESTROY`, `btrfs subvolume delete` where
/// the ioctl is not there); a missing path is not an error.
pub async fn delete_subvolume(volume: &str, path: &Path) -> Result<()> {
    let (key, p) = (volume.to_string(), path.to_path_buf());
    match super::blocking(volume, move || destroy_by_ioctl(&key, &p)).await? {
        Destroyed::Done => Ok(()),
        Destroyed::NoIoctl(e) => {
            tracing::debug!(volume, path = %path.display(), "btrfs delete ioctl unavailable ({e}): the CLI deletes it");
            btrfs(
                volume,
                &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
            )
            .await
        }
    }
}

/// What [`destroy_by_ioctl`] did.
enum Destroyed {
    /// Deleted, or there was nothing at the path.
    Done,
    /// The ioctl is not available here (or the path is no subvolume): the CLI is to delete it,
    /// and say why not if it cannot.
    NoIoctl(nix::errno::Errno),
}

/// Deletes the subvolume at `path` by the kernel's ioctl (blocking).
#[allow(clippy::disallowed_methods)] // on the blocking pool
fn destroy_by_ioctl(key: &str, path: &Path) -> Result<Destroyed> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(Destroyed::Done);
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Destroyed::NoIoctl(nix::errno::Errno::EINVAL));
    };
    let dir = std::fs::File::open(parent).map_err(VolumeError::io(key, "cannot open", parent))?;
    match btrfs_ioctl::destroy(&dir, name) {
        Ok(()) => Ok(Destroyed::Done),
        Err(e) if btrfs_ioctl::unavailable(e) => Ok(Destroyed::NoIoctl(e)),
        Err(e) => Err(VolumeError::io(key, "cannot delete the subvolume", path)(
            e.into(),
        )),
    }
}

/// `btrfs subvolume snapshot <from> <to>`: a writable snapshot (a clone's volume).
pub async fn writable_snapshot(volume: &str, from: &Path, to: &Path) -> Result<()> {
    if !exists_blocking(from).await {
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

/// What [`snapshot_by_ioctl`] did.
enum Taken {
    Made,
    /// The snapshot was there already (made before a restart).
    Adopted,
    /// The ioctl is not available here: the CLI is to make it.
    NoIoctl(nix::errno::Errno),
}

/// The read-only snapshot of the subvolume `from` at `to`, by the kernel's ioctl (blocking).
#[allow(clippy::disallowed_methods)] // on the blocking pool
fn snapshot_by_ioctl(key: &str, from: &Path, to: &Path) -> Result<Taken> {
    if !from.exists() {
        return Err(VolumeError::Missing {
            volume: key.to_string(),
            path: from.to_path_buf(),
        });
    }
    if to.exists() {
        return Ok(Taken::Adopted);
    }
    super::ensure_parent(key, to)?;
    let (Some(parent), Some(name)) = (to.parent(), to.file_name()) else {
        return Err(VolumeError::Unsupported {
            volume: key.to_string(),
            what: format!("{} is no place for a snapshot", to.display()),
        });
    };
    let source = std::fs::File::open(from).map_err(VolumeError::io(key, "cannot open", from))?;
    let dir = std::fs::File::open(parent).map_err(VolumeError::io(key, "cannot open", parent))?;
    match btrfs_ioctl::snapshot_read_only(&source, &dir, name) {
        Ok(()) => Ok(Taken::Made),
        Err(e) if btrfs_ioctl::unavailable(e) => Ok(Taken::NoIoctl(e)),
        Err(e) => Err(VolumeError::io(
            key,
            "cannot make the read-only snapshot",
            to,
        )(e.into())),
    }
}

/// The rollback by the kernel's ioctls (blocking): a writable snapshot of the snapshot `from`
/// (named `snapshot`)
/// under the scratch name beside the volume `to`, exchanged with the volume in one
/// `renameat2`, and the old content (now under the scratch name) deleted. A scratch left by
/// an interrupted rollback goes first. `NoIoctl` before anything changed when the calls are
/// not there.
#[allow(clippy::disallowed_methods)] // on the blocking pool
fn rollback_by_ioctl(key: &str, snapshot: &str, from: &Path, to: &Path) -> Result<Destroyed> {
    if !from.exists() {
        return Err(VolumeError::NoSnapshot {
            volume: key.to_string(),
            snapshot: snapshot.to_string(),
        });
    }
    let scratch = super::rollback_scratch(to);
    if let Destroyed::NoIoctl(e) = destroy_by_ioctl(key, &scratch)? {
        return Ok(Destroyed::NoIoctl(e));
    }
    let (Some(parent), Some(name)) = (scratch.parent(), scratch.file_name()) else {
        return Ok(Destroyed::NoIoctl(nix::errno::Errno::EINVAL));
    };
    let source = std::fs::File::open(from).map_err(VolumeError::io(key, "cannot open", from))?;
    let dir = std::fs::File::open(parent).map_err(VolumeError::io(key, "cannot open", parent))?;
    match btrfs_ioctl::snapshot_writable(&source, &dir, name) {
        Ok(()) => {}
        Err(e) if btrfs_ioctl::unavailable(e) => return Ok(Destroyed::NoIoctl(e)),
        Err(e) => {
            return Err(VolumeError::io(
                key,
                "cannot make the writable snapshot",
                &scratch,
            )(e.into()));
        }
    }
    if !to.exists() {
        std::fs::rename(&scratch, to).map_err(VolumeError::io(
            key,
            "cannot move the rolled-back subvolume to",
            to,
        ))?;
        return Ok(Destroyed::Done);
    }
    exchange(&scratch, to).map_err(VolumeError::io(
        key,
        "cannot exchange the rolled-back subvolume with",
        to,
    ))?;
    // The old content: its deletion cannot be unavailable now that the calls above worked,
    // but where it is, the CLI deletes it.
    match destroy_by_ioctl(key, &scratch)? {
        Destroyed::Done => Ok(Destroyed::Done),
        Destroyed::NoIoctl(e) => Err(VolumeError::io(
            key,
            "cannot delete the old content of the volume at",
            &scratch,
        )(e.into())),
    }
}

/// The rollback by the `btrfs` CLI, where the ioctls are not there: the same steps.
async fn rollback_by_cli(meta: &VolumeSnapshotMeta) -> Result<()> {
    let volume = &meta.volume_key;
    if !exists_blocking(&meta.snapshot_location).await {
        return Err(VolumeError::NoSnapshot {
            volume: volume.clone(),
            snapshot: meta.name.clone(),
        });
    }
    let scratch = super::rollback_scratch(&meta.file_location);
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
    let (k, from, to) = (volume.clone(), scratch.clone(), meta.file_location.clone());
    #[allow(clippy::disallowed_methods)] // on the blocking pool
    let exchanged = super::blocking(volume, move || {
        if to.exists() {
            exchange(&from, &to).map_err(VolumeError::io(
                &k,
                "cannot exchange the rolled-back subvolume with",
                &to,
            ))?;
            Ok(true)
        } else {
            std::fs::rename(&from, &to).map_err(VolumeError::io(
                &k,
                "cannot move the rolled-back subvolume to",
                &to,
            ))?;
            Ok(false)
        }
    })
    .await?;
    if exchanged {
        delete_subvolume(volume, &scratch).await?;
    }
    Ok(())
}

impl SnapshotBackend for BtrfsBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Btrfs
    }

    fn name(&self) -> &'static str {
        "btrfs"
    }

    /// A snapshot is a subvolume of its own, outside the volume.
    fn snapshot_outside_volume(&self) -> bool {
        true
    }

    fn tool(&self) -> Option<ToolSpec> {
        Some(ToolSpec {
            name: TOOL,
            package: PACKAGE,
            probe: &["--version"],
        })
    }

    fn live(&self) -> bool {
        true // an atomic read-only snapshot of the live tree
    }

    fn host_missing(&self, volumes: &Path) -> Option<String> {
        let dir = super::nearest_existing(volumes);
        (!is_btrfs(dir)).then(|| {
            format!(
                "it needs the volumes directory {} on btrfs, and it is on {}; use rsync, squashfs_overlay or copy",
                volumes.display(),
                super::fs_name(dir)
            )
        })
    }

    fn auto(&self, volumes: &Path, path: &Path) -> Auto {
        let dir = super::nearest_existing(volumes);
        if !is_btrfs(dir) {
            return Auto::No;
        }
        match std::fs::symlink_metadata(path) {
            // Only a subvolume can be snapshotted: a plain directory (made by the copy
            // backend) stays with it.
            Ok(meta) if meta.is_dir() && meta.ino() != 256 => Auto::Cannot(format!(
                "{} is a plain directory on btrfs, not a subvolume (made by the copy backend)",
                path.display()
            )),
            _ => Auto::Serves(format!("{} is on btrfs", dir.display())),
        }
    }

    fn owns(&self, path: &Path) -> bool {
        is_subvolume(path)
    }

    async fn make(&self, key: &str, path: &Path) -> Result<()> {
        create_subvolume(key, path).await
    }

    async fn remove(&self, key: &str, path: &Path) -> Result<()> {
        delete_subvolume(key, path).await
    }

    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        if target.image_format().is_some() {
            return Err(target.mismatch(source));
        }
        if target.kind == SnapshotBackendKind::Btrfs {
            writable_snapshot(target.key, &source.snapshot_location, target.path).await
        } else {
            target.copy_tree(&source.snapshot_location).await
        }
    }

    fn snapshot_location(&self, volume: &VolumeRef, name: &str) -> PathBuf {
        snapshot_path(volume, name)
    }

    /// The snapshot's parent directory made (durably: an fsync of a btrfs directory is a log
    /// commit) and the volume's filesystem flushed: the snapshot commits the transaction,
    /// writing what is dirty, and a container's own `sync` holds its freeze.
    async fn prepare_live(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let (key, location, volume) = (
            meta.volume_key.clone(),
            meta.snapshot_location.clone(),
            meta.file_location.clone(),
        );
        #[allow(clippy::disallowed_methods)] // on the blocking pool
        let prepared = super::blocking(&meta.volume_key, move || {
            super::ensure_parent(&key, &location)?;
            let dir = std::fs::File::open(&volume).map_err(VolumeError::io(
                &key,
                "cannot open",
                &volume,
            ))?;
            nix::unistd::syncfs(&dir).map_err(|e| VolumeError::Io {
                volume: key.clone(),
                what: "cannot flush the filesystem of",
                path: volume.clone(),
                source: e.into(),
            })
        });
        prepared.await
    }

    async fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        let _ = fresh; // looking is as cheap as not
        let meta = self.plan(volume, name);
        // One trip to the blocking pool for the checks and the snapshot: inside a live
        // create's pause every hop counts.
        let (key, from, to) = (
            volume.key.clone(),
            volume.path.clone(),
            meta.snapshot_location.clone(),
        );
        match super::blocking(&volume.key, move || snapshot_by_ioctl(&key, &from, &to)).await? {
            Taken::Made => {}
            Taken::Adopted => {
                tracing::info!(volume = %volume.key, snapshot = name, backend = self.name(), "snapshot already there: adopted");
            }
            Taken::NoIoctl(e) => {
                tracing::debug!(volume = %volume.key, "btrfs snapshot ioctl unavailable ({e}): the CLI makes it");
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
            }
        }
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let volume = &meta.volume_key;
        // One trip to the blocking pool for the whole swap, by ioctls: the app waits, stopped,
        // for this step, and three `btrfs` processes were most of it.
        let (key, name, from, to) = (
            volume.clone(),
            meta.name.clone(),
            meta.snapshot_location.clone(),
            meta.file_location.clone(),
        );
        match super::blocking(volume, move || rollback_by_ioctl(&key, &name, &from, &to)).await? {
            Destroyed::Done => Ok(()),
            Destroyed::NoIoctl(e) => {
                tracing::debug!(volume = %volume, "btrfs ioctls unavailable ({e}): the CLI rolls back");
                rollback_by_cli(meta).await
            }
        }
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        delete_subvolume(&meta.volume_key, &meta.snapshot_location).await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(exists_blocking(&meta.snapshot_location).await)
    }
}

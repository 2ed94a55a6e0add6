//! Snapshot backends: one module per kind, all behind [`SnapshotBackend`]. A backend's snapshot
//! is named by the snapshot UUID, so a restarted agent finds (and adopts) one it made before a
//! crash instead of failing with "already exists". Every operation works from the metadata alone
//! (no config needed), so an intent record is enough to finish or undo an interrupted action.

use std::future::Future;
use std::path::{Path, PathBuf};

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use crate::error::{Result, VolumeError};

pub mod btrfs;
pub mod copy;
pub mod purgeable;
pub mod qcow2;
pub mod restore_mode;
pub mod rsync;
pub mod squashfs;
#[cfg(feature = "zfs")]
pub mod zfs;

/// The volume a backend acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    /// `<uuid>#<generation>`.
    pub key: String,
    /// Its file (qcow2) or directory.
    pub path: PathBuf,
}

impl VolumeRef {
    pub fn of_meta(meta: &VolumeSnapshotMeta) -> Self {
        Self {
            key: meta.volume_key.clone(),
            path: meta.file_location.clone(),
        }
    }
}

/// create → metadata, rollback(metadata), delete(metadata).
pub trait SnapshotBackend: Send + Sync {
    fn kind(&self) -> SnapshotBackendKind;

    /// The metadata a snapshot `name` of `volume` will have, before it exists (for the intent
    /// record).
    fn plan(&self, volume: &VolumeRef, name: &str) -> VolumeSnapshotMeta {
        VolumeSnapshotMeta {
            backend: self.kind(),
            name: name.to_string(),
            volume_key: volume.key.clone(),
            file_location: volume.path.clone(),
            snapshot_location: self.snapshot_location(volume, name),
            ..VolumeSnapshotMeta::default()
        }
    }

    /// Where snapshot `name` lives when it is not inside the volume itself (empty when it is,
    /// as for qcow2 internal snapshots).
    fn snapshot_location(&self, volume: &VolumeRef, name: &str) -> PathBuf {
        let _ = (volume, name);
        PathBuf::new()
    }

    /// Makes snapshot `name` of `volume`, or adopts it if it already exists. `fresh` says no
    /// record of this snapshot existed before this request (a record always precedes a backend
    /// snapshot), so nothing of this name can be there and a backend may skip looking.
    fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> impl Future<Output = Result<VolumeSnapshotMeta>> + Send;

    /// Brings the volume back to the snapshot's content.
    fn rollback(&self, meta: &VolumeSnapshotMeta) -> impl Future<Output = Result<()>> + Send;

    /// Removes the snapshot; one already gone is not an error.
    fn delete(&self, meta: &VolumeSnapshotMeta) -> impl Future<Output = Result<()>> + Send;

    /// Whether the snapshot exists on the backend.
    fn exists(&self, meta: &VolumeSnapshotMeta) -> impl Future<Output = Result<bool>> + Send;
}

/// Makes the directory `path` goes into, durably (its own entry in its parent too).
pub fn ensure_parent(volume: &str, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        cairn_persist::create_dir_durable(parent).map_err(VolumeError::io(
            volume,
            "cannot create directory",
            parent,
        ))?;
    }
    Ok(())
}

/// The filesystem `path` lies on, for messages: `btrfs`, `ext2/3/4`, ...
pub fn fs_name(path: &Path) -> String {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
        statfs,
    };
    match statfs(path).map(|fs| fs.filesystem_type()) {
        Ok(t) if t == BTRFS_SUPER_MAGIC => "btrfs".into(),
        Ok(t) if t == EXT4_SUPER_MAGIC => "ext2/3/4".into(),
        Ok(t) if t == TMPFS_MAGIC => "tmpfs".into(),
        Ok(t) if t == XFS_SUPER_MAGIC => "xfs".into(),
        Ok(t) if t == OVERLAYFS_SUPER_MAGIC => "overlayfs".into(),
        Ok(t) => format!("a filesystem of type {:#x}", t.0),
        Err(e) => format!("an unreadable filesystem ({e})"),
    }
}

/// `path` or its nearest existing ancestor: the filesystem a directory not made yet (the
/// volumes directory of a fresh device) will be made on.
pub fn nearest_existing(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

/// `<volumes>/.snapshots/<volume-key>/<name>`: where directory backends keep snapshots, on the
/// same filesystem as the volume (btrfs snapshots and renames need that).
pub fn snapshot_path(volume: &VolumeRef, name: &str) -> PathBuf {
    let parent = volume.path.parent().unwrap_or(Path::new("/"));
    parent.join(".snapshots").join(&volume.key).join(name)
}

/// Exchanges two paths atomically (renameat2 RENAME_EXCHANGE): the volume is either the old or
/// the new content at every instant.
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).map_err(std::io::Error::from)
}

/// All backends with their tools' availability; dispatches on the kind recorded in the metadata.
#[derive(Debug, Clone)]
pub struct Backends {
    pub tools: crate::tools::Tools,
}

macro_rules! dispatch {
    ($self:ident, $kind:expr, $volume:expr, |$b:ident| $call:expr) => {{
        $self.check($kind, $volume)?;
        match $kind {
            SnapshotBackendKind::Qcow2 => {
                let $b = qcow2::Qcow2Backend;
                $call
            }
            SnapshotBackendKind::Btrfs => {
                let $b = btrfs::BtrfsBackend;
                $call
            }
            SnapshotBackendKind::Copy => {
                let $b = copy::CopyBackend;
                $call
            }
            SnapshotBackendKind::Purgeable => {
                let $b = purgeable::PurgeableBackend;
                $call
            }
            SnapshotBackendKind::Squashfs => {
                let $b = squashfs::SquashfsBackend;
                $call
            }
            SnapshotBackendKind::Rsync => {
                let $b = rsync::RsyncBackend;
                $call
            }
            #[cfg(feature = "zfs")]
            SnapshotBackendKind::Zfs => {
                let $b = zfs::ZfsBackend;
                $call
            }
            other => Err(crate::error::VolumeError::Unsupported {
                volume: $volume.to_string(),
                what: format!("it has no snapshot backend ({other:?})"),
            }),
        }
    }};
}

impl Backends {
    /// Refuses a kind that cannot act: no backend, or its tool missing.
    pub fn check(&self, kind: SnapshotBackendKind, volume: &str) -> Result<()> {
        use crate::error::VolumeError;
        let tool = match kind {
            SnapshotBackendKind::Qcow2 => Some(&self.tools.qemu_img),
            SnapshotBackendKind::Btrfs => Some(&self.tools.btrfs),
            SnapshotBackendKind::Zfs if cfg!(feature = "zfs") => Some(&self.tools.zfs),
            SnapshotBackendKind::Squashfs => Some(&self.tools.squashfs),
            SnapshotBackendKind::Rsync => Some(&self.tools.rsync),
            SnapshotBackendKind::Copy | SnapshotBackendKind::Purgeable => None,
            SnapshotBackendKind::Zfs | SnapshotBackendKind::None => {
                return Err(VolumeError::Unsupported {
                    volume: volume.to_string(),
                    what: format!(
                        "it has no snapshot backend ({kind:?}): a raw image has no internal snapshots; use the qcow2 format or mark the volume purgeable"
                    ),
                });
            }
        };
        match tool {
            Some(tool) if !tool.is_available() => Err(VolumeError::ToolMissing {
                volume: volume.to_string(),
                tool: tool.name,
                package: tool.package,
                backend: match kind {
                    SnapshotBackendKind::Qcow2 => "qcow2",
                    SnapshotBackendKind::Btrfs => "btrfs",
                    SnapshotBackendKind::Squashfs => "squashfs_overlay",
                    SnapshotBackendKind::Rsync => "rsync",
                    _ => "zfs",
                },
            }),
            _ => Ok(()),
        }
    }

    pub fn plan(
        &self,
        kind: SnapshotBackendKind,
        volume: &VolumeRef,
        name: &str,
    ) -> Result<VolumeSnapshotMeta> {
        dispatch!(self, kind, &volume.key, |b| Ok(b.plan(volume, name)))
    }

    pub async fn create(
        &self,
        kind: SnapshotBackendKind,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        let meta = dispatch!(self, kind, &volume.key, |b| b
            .create(volume, name, fresh)
            .await)?;
        // Change tracking for incremental exports (qcow2 volumes already tracked).
        crate::export::bitmap::after_create(&meta).await;
        Ok(meta)
    }

    pub async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        // qemu refuses to apply a snapshot while the image has bitmaps (export tracking).
        let tracked = crate::export::bitmap::before_rollback(meta).await;
        dispatch!(self, meta.backend, &meta.volume_key, |b| b
            .rollback(meta)
            .await)?;
        crate::export::bitmap::after_rollback(meta, tracked).await;
        Ok(())
    }

    pub async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        dispatch!(self, meta.backend, &meta.volume_key, |b| b
            .delete(meta)
            .await)?;
        crate::export::bitmap::after_delete(meta).await;
        Ok(())
    }

    pub async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        dispatch!(self, meta.backend, &meta.volume_key, |b| b
            .exists(meta)
            .await)
    }
}

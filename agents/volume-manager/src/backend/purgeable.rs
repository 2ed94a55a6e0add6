//! Purgeable volumes: the snapshot is the whole pre-purge volume, kept aside (not deleted when its
//! generation's config goes) for as long as a snapshot record refers to it. Rollback checks it is
//! still there; the app is pointed back at it by the restored app config, which asks for that
//! generation again, and the volume-manager adopts the kept volume. Deleting the snapshot releases
//! the volume; the volume-manager removes it once no config refers to it either.

use std::path::PathBuf;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{CloneTarget, SnapshotBackend, VolumeRef, exists_blocking};
use crate::error::{Result, VolumeError};

#[derive(Debug, Clone, Default)]
pub struct PurgeableBackend;

impl SnapshotBackend for PurgeableBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Purgeable
    }

    fn name(&self) -> &'static str {
        "purgeable"
    }

    /// A copy of the kept volume: `qemu-img convert` for an image, a tree copy for a directory.
    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        let kept = &source.snapshot_location;
        let p = kept.clone();
        let is_file = tokio::task::spawn_blocking(move || p.is_file())
            .await
            .unwrap_or(false);
        match target.image_format() {
            None => target.copy_tree(kept).await,
            Some(fmt) if is_file => {
                target.backends.check_image_tool(target.key)?;
                super::qemu_img(
                    target.key,
                    kept,
                    &[
                        "convert".as_ref(),
                        "-U".as_ref(),
                        "-f".as_ref(),
                        fmt.as_ref(),
                        "-O".as_ref(),
                        fmt.as_ref(),
                        kept.as_os_str(),
                        target.path.as_os_str(),
                    ],
                )
                .await
            }
            Some(_) => Err(target.mismatch(source)),
        }
    }

    fn snapshot_location(&self, volume: &VolumeRef, _name: &str) -> PathBuf {
        volume.path.clone()
    }

    async fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        let _ = fresh; // nothing to make: the kept volume is the snapshot
        let (meta, _) = super::create_preamble(self, volume, name, false).await?;
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if exists_blocking(&meta.snapshot_location).await {
            Ok(())
        } else {
            Err(VolumeError::Missing {
                volume: meta.volume_key.clone(),
                path: meta.snapshot_location.clone(),
            })
        }
    }

    async fn delete(&self, _meta: &VolumeSnapshotMeta) -> Result<()> {
        Ok(()) // the kept volume is released by the record's removal
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(exists_blocking(&meta.snapshot_location).await)
    }
}

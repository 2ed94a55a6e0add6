//! Purgeable volumes: the snapshot is the whole pre-purge volume, kept aside (not deleted when its
//! generation's config goes) for as long as a snapshot record refers to it. Rollback checks it is
//! still there; the app is pointed back at it by the restored app config, which asks for that
//! generation again, and the volume-manager adopts the kept volume. Deleting the snapshot releases
//! the volume; the volume-manager removes it once no config refers to it either.

use std::path::PathBuf;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{SnapshotBackend, VolumeRef};
use crate::error::{Result, VolumeError};

#[derive(Debug, Clone, Default)]
pub struct PurgeableBackend;

impl SnapshotBackend for PurgeableBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Purgeable
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
        let _ = fresh; // looking is as cheap as not
        if !volume.path.exists() {
            return Err(VolumeError::Missing {
                volume: volume.key.clone(),
                path: volume.path.clone(),
            });
        }
        Ok(self.plan(volume, name))
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if meta.snapshot_location.exists() {
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
        Ok(meta.snapshot_location.exists())
    }
}

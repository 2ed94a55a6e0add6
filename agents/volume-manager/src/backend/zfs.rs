//! ZFS dataset snapshots through the `zfs` CLI (kernel ZFS or zfs-fuse). A volume is served by
//! ZFS when its directory is the mountpoint of a dataset. libzetta is not used yet: the CLI
//! works against both kernel ZFS and zfs-fuse, which is what the tests can reach.

use std::path::Path;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{SnapshotBackend, VolumeRef};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT};

pub const TOOL: &str = "zfs";
pub const PACKAGE: &str = "zfsutils-linux (or zfs-fuse)";

#[derive(Debug, Clone, Default)]
pub struct ZfsBackend;

async fn zfs(volume: &str, args: &[&str]) -> Result<String> {
    process::run(TOOL, args, COMMAND_TIMEOUT)
        .await
        .map(|o| o.stdout)
        .map_err(|source| VolumeError::Command {
            volume: volume.to_string(),
            source,
        })
}

/// The dataset mounted exactly at `dir`, if any.
pub async fn dataset_at(dir: &Path) -> Option<String> {
    let out = process::run(
        TOOL,
        &["list", "-H", "-o", "name,mountpoint"],
        COMMAND_TIMEOUT,
    )
    .await
    .ok()?;
    parse_dataset_at(&out.stdout, dir)
}

/// From `zfs list -H -o name,mountpoint`, the dataset mounted at `dir`.
pub fn parse_dataset_at(list: &str, dir: &Path) -> Option<String> {
    list.lines().find_map(|line| {
        let (name, mountpoint) = line.split_once('\t')?;
        (Path::new(mountpoint.trim()) == dir).then(|| name.to_string())
    })
}

fn full_name(meta: &VolumeSnapshotMeta) -> String {
    meta.snapshot_location.to_string_lossy().into_owned()
}

impl ZfsBackend {
    /// Makes snapshot `name` of the dataset mounted at `volume.path`.
    pub async fn create_on(&self, volume: &VolumeRef, name: &str) -> Result<VolumeSnapshotMeta> {
        let dataset = dataset_at(&volume.path)
            .await
            .ok_or_else(|| VolumeError::Unsupported {
                volume: volume.key.clone(),
                what: format!("{} is not a ZFS dataset mountpoint", volume.path.display()),
            })?;
        let meta = VolumeSnapshotMeta {
            backend: SnapshotBackendKind::Zfs,
            name: name.to_string(),
            volume_key: volume.key.clone(),
            file_location: volume.path.clone(),
            snapshot_location: format!("{dataset}@{name}").into(),
            size: 0,
        };
        if !self.exists(&meta).await? {
            zfs(&volume.key, &["snapshot", &full_name(&meta)]).await?;
        }
        Ok(meta)
    }
}

impl SnapshotBackend for ZfsBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Zfs
    }

    async fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        let _ = fresh;
        self.create_on(volume, name).await
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if !self.exists(meta).await? {
            return Err(VolumeError::NoSnapshot {
                volume: meta.volume_key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        zfs(&meta.volume_key, &["rollback", "-r", &full_name(meta)])
            .await
            .map(drop)
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if self.exists(meta).await? {
            zfs(&meta.volume_key, &["destroy", &full_name(meta)]).await?;
        }
        Ok(())
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        if meta.snapshot_location.as_os_str().is_empty() {
            return Ok(false);
        }
        Ok(process::run(
            TOOL,
            &[
                "list",
                "-H",
                "-t",
                "snapshot",
                "-o",
                "name",
                &full_name(meta),
            ],
            COMMAND_TIMEOUT,
        )
        .await
        .is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_is_found_by_its_mountpoint() {
        let list = "tank\t/tank\ntank/v1\t/persist/volumes/v1\n";
        assert_eq!(
            parse_dataset_at(list, Path::new("/persist/volumes/v1")).as_deref(),
            Some("tank/v1")
        );
        assert_eq!(parse_dataset_at(list, Path::new("/x")), None);
    }
}

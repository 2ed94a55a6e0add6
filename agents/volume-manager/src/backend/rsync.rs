//! rsync restore mode for directory volumes: a snapshot is a copy of the tree made with
//! `rsync --link-dest` to the volume's previous snapshot (unchanged files are hard links to it,
//! so each snapshot costs only what changed), built under a `.partial` name and renamed when
//! complete. Restore is `rsync --delete` from the snapshot into the live directory: only files
//! that differ move, and running it again finishes an interrupted one.
//!
//! Files are compared by size and modification time to the nanosecond (`--modify-window=-1`);
//! a file rewritten with the same size within the same timestamp tick would be missed, as with
//! any rsync quick check.

// File work: its blocking calls are in the sync helpers below, run on the blocking pool
// (`blocking`); only they may call the crate's banned methods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{
    CloneTarget, SnapshotBackend, ToolSpec, VolumeRef, blocking, is_dir_blocking, partial,
    remove_tree, snapshot_path,
};
use crate::error::{Result, VolumeError};
use crate::process;

pub const TOOL: &str = "rsync";
pub const PACKAGE: &str = "rsync";

/// A copy reads the whole tree: allow for large volumes.
const COPY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Archive mode with hard links and extended attributes, numeric owners, exact timestamps.
const COMMON: &[&str] = &["-aHX", "--numeric-ids", "--modify-window=-1"];

#[derive(Debug, Clone, Default)]
pub struct RsyncBackend;

/// `<dir>/` : rsync copies a directory's content (and its own attributes) with the slash.
fn contents(dir: &Path) -> std::ffi::OsString {
    let mut s = dir.as_os_str().to_os_string();
    s.push("/");
    s
}

/// The newest complete snapshot of the volume other than `name`, to hard-link unchanged files to.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn previous_snapshot(dir: &Path, name: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            !n.ends_with(".partial") && e.path() != name && e.path().is_dir()
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
}

/// rsync fsyncs nothing: the copy `tmp`, then its rename to `snap`, are made durable before
/// the record says the snapshot exists.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn put_in_place(key: &str, tmp: &Path, snap: &Path) -> Result<()> {
    super::sync_tree(key, tmp)?;
    std::fs::rename(tmp, snap).map_err(VolumeError::io(key, "cannot rename to", snap))?;
    super::sync_parent(key, snap)
}

async fn rsync(volume: &str, args: Vec<std::ffi::OsString>) -> Result<()> {
    process::run(TOOL, &args, COPY_TIMEOUT)
        .await
        .map(drop)
        .map_err(|source| {
            if source.stderr().to_lowercase().contains("no space left") {
                VolumeError::NoSpace {
                    volume: volume.to_string(),
                    path: PathBuf::from(args.last().cloned().unwrap_or_default()),
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

impl SnapshotBackend for RsyncBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Rsync
    }

    fn name(&self) -> &'static str {
        "rsync"
    }

    /// A snapshot is a hard-linked copy of the tree, outside the volume.
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
        let key = &volume.key;
        let snap = meta.snapshot_location.clone();
        if !there {
            let tmp = partial(&snap);
            let (k, t, s) = (key.clone(), tmp.clone(), snap.clone());
            let previous = blocking(key, move || {
                remove_tree(&k, &t)?;
                super::ensure_parent(&k, &s)?;
                Ok(previous_snapshot(s.parent().unwrap_or(Path::new("/")), &s))
            })
            .await?;
            let mut args: Vec<std::ffi::OsString> = COMMON.iter().map(Into::into).collect();
            args.push("--delete".into());
            if let Some(previous) = previous {
                let mut link = std::ffi::OsString::from("--link-dest=");
                link.push(previous.as_os_str());
                args.push(link);
            }
            args.push(contents(&volume.path));
            args.push(contents(&tmp));
            if let Err(e) = rsync(key, args).await {
                let (k, t) = (key.clone(), tmp.clone());
                let _ = blocking(key, move || remove_tree(&k, &t)).await;
                return Err(e);
            }
            let (k, s) = (key.clone(), snap.clone());
            blocking(key, move || put_in_place(&k, &tmp, &s)).await?;
        }
        meta.size = blocking(key, move || Ok(super::copy::tree_size(&snap))).await?;
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let key = &meta.volume_key;
        if !is_dir_blocking(&meta.snapshot_location).await {
            return Err(VolumeError::NoSnapshot {
                volume: key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        // A volume released after a purge is made again at its old place.
        let (k, vol) = (key.clone(), meta.file_location.clone());
        blocking(key, move || {
            std::fs::create_dir_all(&vol).map_err(VolumeError::io(&k, "cannot create", &vol))
        })
        .await?;
        let mut args: Vec<std::ffi::OsString> = COMMON.iter().map(Into::into).collect();
        args.push("--delete".into());
        // In place: each file's data is durable before rsync renames it over the volume's
        // (else a power cut can leave the new name with no data).
        args.push("--fsync".into());
        args.push(contents(&meta.snapshot_location));
        args.push(contents(&meta.file_location));
        rsync(key, args).await?;
        // Durable before the record says rolled back.
        let (k, vol) = (key.clone(), meta.file_location.clone());
        blocking(key, move || super::sync_tree(&k, &vol)).await
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let (key, snap) = (meta.volume_key.clone(), meta.snapshot_location.clone());
        blocking(&meta.volume_key, move || {
            remove_tree(&key, &partial(&snap))?;
            remove_tree(&key, &snap)?;
            // Durable before the caller removes the record: else a leak after a power cut.
            super::sync_parent(&key, &snap)
        })
        .await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(is_dir_blocking(&meta.snapshot_location).await)
    }
}

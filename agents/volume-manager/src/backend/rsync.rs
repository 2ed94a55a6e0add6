//! rsync restore mode for directory volumes: a snapshot is a copy of the tree made with
//! `rsync --link-dest` to the volume's previous snapshot (unchanged files are hard links to it,
//! so each snapshot costs only what changed), built under a `.partial` name and renamed when
//! complete. Restore is `rsync --delete` from the snapshot into the live directory: only files
//! that differ move, and running it again finishes an interrupted one.
//!
//! Files are compared by size and modification time to the nanosecond (`--modify-window=-1`);
//! a file rewritten with the same size within the same timestamp tick would be missed, as with
//! any rsync quick check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{SnapshotBackend, VolumeRef, snapshot_path};
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

fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// `<dir>/` : rsync copies a directory's content (and its own attributes) with the slash.
fn contents(dir: &Path) -> std::ffi::OsString {
    let mut s = dir.as_os_str().to_os_string();
    s.push("/");
    s
}

/// The newest complete snapshot of the volume other than `name`, to hard-link unchanged files to.
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

fn remove_tree(volume: &str, path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VolumeError::io(volume, "cannot remove", path)(e))
        }
        _ => Ok(()),
    }
}

impl SnapshotBackend for RsyncBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Rsync
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
        let mut meta = self.plan(volume, name);
        let key = &volume.key;
        if !volume.path.is_dir() {
            return Err(VolumeError::Missing {
                volume: key.clone(),
                path: volume.path.clone(),
            });
        }
        let snap = meta.snapshot_location.clone();
        if !snap.is_dir() {
            let tmp = partial(&snap);
            remove_tree(key, &tmp)?;
            let parent = snap.parent().unwrap_or(Path::new("/"));
            super::ensure_parent(key, &snap)?;
            let mut args: Vec<std::ffi::OsString> = COMMON.iter().map(Into::into).collect();
            args.push("--delete".into());
            if let Some(previous) = previous_snapshot(parent, &snap) {
                let mut link = std::ffi::OsString::from("--link-dest=");
                link.push(previous.as_os_str());
                args.push(link);
            }
            args.push(contents(&volume.path));
            args.push(contents(&tmp));
            if let Err(e) = rsync(key, args).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, &snap).map_err(VolumeError::io(
                key,
                "cannot rename to",
                &snap,
            ))?;
            let _ = cairn_persist::sync_dir(parent);
        }
        meta.size = super::copy::tree_size(&snap);
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let key = &meta.volume_key;
        if !meta.snapshot_location.is_dir() {
            return Err(VolumeError::NoSnapshot {
                volume: key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        // A volume released after a purge is made again at its old place.
        std::fs::create_dir_all(&meta.file_location).map_err(VolumeError::io(
            key,
            "cannot create",
            &meta.file_location,
        ))?;
        let mut args: Vec<std::ffi::OsString> = COMMON.iter().map(Into::into).collect();
        args.push("--delete".into());
        args.push(contents(&meta.snapshot_location));
        args.push(contents(&meta.file_location));
        rsync(key, args).await
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let (key, snap) = (meta.volume_key.clone(), meta.snapshot_location.clone());
        tokio::task::spawn_blocking(move || {
            remove_tree(&key, &partial(&snap))?;
            remove_tree(&key, &snap)
        })
        .await
        .map_err(|e| VolumeError::Io {
            volume: meta.volume_key.clone(),
            what: "delete task failed",
            path: meta.snapshot_location.clone(),
            source: std::io::Error::other(e),
        })?
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(meta.snapshot_location.is_dir())
    }
}

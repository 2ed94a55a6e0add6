//! Making and removing volumes: qcow2 blank or from a verified base image, raw, and directory
//! volumes (a btrfs subvolume when the volume root is on btrfs). A volume is built under a dot
//! name and renamed into place, so a crash never leaves a half-made volume under its real name.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_types::volume::{
    SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeSnapshotMeta,
};
use sha2::{Digest, Sha256};

use crate::backend::{btrfs, copy, qcow2, restore_mode, squashfs};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT};
use crate::tools::Tools;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// `<volumes>/<key>.qcow2`, `<key>.img` or `<key>/`.
pub fn volume_path(volumes: &Path, config: &VolumeConfig) -> PathBuf {
    let key = config.key();
    match config.format {
        VolumeFormat::Qcow2 => volumes.join(format!("{key}.qcow2")),
        VolumeFormat::Raw => volumes.join(format!("{key}.img")),
        VolumeFormat::Dir => volumes.join(key),
    }
}

/// The snapshot backend chosen for a volume, and why (for its status and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: SnapshotBackendKind,
    /// `<backend>: <reason>`, e.g. `btrfs: /persist/volumes is on btrfs`.
    pub reason: String,
}

impl BackendChoice {
    fn new(kind: SnapshotBackendKind, reason: String) -> Self {
        Self { kind, reason }
    }
}

/// The snapshot backend for a volume, from its config, its filesystem and the tools present.
/// The filesystem is that of the volumes directory, or of its nearest existing ancestor when it
/// is not made yet (a fresh device root): the directory will be made there.
pub fn choose_backend(config: &VolumeConfig, volumes: &Path, tools: &Tools) -> BackendChoice {
    use SnapshotBackendKind as K;
    if config.purgeable {
        return BackendChoice::new(
            K::Purgeable,
            "purgeable: the volume is purgeable (its snapshot keeps the whole volume)".into(),
        );
    }
    match config.format {
        VolumeFormat::Qcow2 => BackendChoice::new(K::Qcow2, "qcow2: format".into()),
        VolumeFormat::Raw => {
            BackendChoice::new(K::None, "none: format raw (no internal snapshots)".into())
        }
        VolumeFormat::Dir => {
            if let Some(kind) = restore_mode::kind(config.restore_mode) {
                // checked when the volume is made
                return BackendChoice::new(
                    kind,
                    format!(
                        "{}: restore mode {}",
                        format!("{kind:?}").to_lowercase(),
                        restore_mode::name(config.restore_mode)
                    ),
                );
            }
            #[cfg(feature = "zfs")]
            if tools.zfs.is_available() && zfs_served(volumes, config) {
                return BackendChoice::new(
                    K::Zfs,
                    format!(
                        "zfs: {} is a ZFS dataset's mountpoint",
                        volume_path(volumes, config).display()
                    ),
                );
            }
            let dir = crate::backend::nearest_existing(volumes);
            let fs = crate::backend::fs_name(dir);
            let path = volume_path(volumes, config);
            if !btrfs::is_btrfs(dir) {
                return BackendChoice::new(
                    K::Copy,
                    format!("copy: {} is on {fs}, no btrfs/zfs", dir.display()),
                );
            }
            if let Err(missing) = &tools.btrfs.available {
                return BackendChoice::new(
                    K::Copy,
                    format!("copy: {} is on btrfs, but {missing}", dir.display()),
                );
            }
            match std::fs::symlink_metadata(&path) {
                // inode 256 is the root of a btrfs subvolume; only a subvolume can be snapshotted
                Ok(meta) if meta.is_dir() && meta.ino() != 256 => BackendChoice::new(
                    K::Copy,
                    format!(
                        "copy: {} is a plain directory on btrfs, not a subvolume (made by the copy backend)",
                        path.display()
                    ),
                ),
                _ => BackendChoice::new(K::Btrfs, format!("btrfs: {} is on btrfs", dir.display())),
            }
        }
    }
}

#[cfg(feature = "zfs")]
fn zfs_served(volumes: &Path, config: &VolumeConfig) -> bool {
    // A dataset mountpoint is a mount of its own: its device differs from the parent's.
    let path = volume_path(volumes, config);
    match (std::fs::metadata(&path), std::fs::metadata(volumes)) {
        (Ok(v), Ok(root)) => v.dev() != root.dev(),
        _ => false,
    }
}

/// Bytes allocated on disk for a file or a directory tree.
pub fn allocated_size(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| allocated_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(meta) => meta.blocks() * 512,
        Err(_) => 0,
    }
}

/// The hex sha256 of a file (blocking).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks an existing volume is usable: present, and for qcow2 a qcow2 header.
pub fn check_existing(key: &str, path: &Path, format: VolumeFormat) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|_| VolumeError::Missing {
        volume: key.to_string(),
        path: path.to_path_buf(),
    })?;
    if format == VolumeFormat::Qcow2 {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
        if meta.len() < 4 || read.is_err() || &magic != QCOW2_MAGIC {
            return Err(VolumeError::Corrupt {
                volume: key.to_string(),
                file: path.to_path_buf(),
                detail: "no qcow2 header (magic QFI\\xfb missing)".into(),
            });
        }
    }
    Ok(())
}

fn creating_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.creating"))
}

async fn verify_base(key: &str, base: &Path, expected: &str) -> Result<()> {
    let path = base.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .map_err(|e| VolumeError::io(key, "cannot hash", base)(std::io::Error::other(e)))?
        .map_err(VolumeError::io(key, "cannot read base image", base))?;
    if !actual.eq_ignore_ascii_case(expected.trim()) {
        return Err(VolumeError::Sha256Mismatch {
            volume: key.to_string(),
            path: base.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

async fn qemu_img(key: &str, file: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    process::run(qcow2::TOOL, args, COMMAND_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| qcow2::classify(key, file, e))
}

/// The temporary name a new volume is built under (`.<name>.creating`, cleared of any leftover),
/// with its parent directory made durably.
async fn staging(key: &str, path: &Path) -> Result<PathBuf> {
    let tmp = creating_path(path);
    remove(key, &tmp).await?;
    if let Some(parent) = path.parent() {
        let parent = parent.to_path_buf();
        let p = parent.clone();
        tokio::task::spawn_blocking(move || cairn_persist::create_dir_durable(&p))
            .await
            .map_err(|e| VolumeError::io(key, "cannot create", &parent)(std::io::Error::other(e)))?
            .map_err(VolumeError::io(key, "cannot create", &parent))?;
    }
    Ok(tmp)
}

/// Creates the volume of `config` at `path` (which must not exist yet).
pub async fn create(
    config: &VolumeConfig,
    path: &Path,
    backend: SnapshotBackendKind,
    tools: &Tools,
) -> Result<()> {
    let key = config.key();
    restore_mode::check(config, path.parent().unwrap_or(path), tools)?;
    let tmp = staging(&key, path).await?;
    let size = config.max_vol_size.to_string();
    let needs_qemu = config.format == VolumeFormat::Qcow2
        || matches!(config.origin, VolumeOrigin::BaseImage { .. });
    if needs_qemu && config.format != VolumeFormat::Dir && !tools.qemu_img.is_available() {
        return Err(VolumeError::ToolMissing {
            volume: key,
            tool: qcow2::TOOL,
            package: qcow2::PACKAGE,
            backend: "qcow2",
        });
    }
    let result = match (&config.format, &config.origin) {
        (_, VolumeOrigin::Snapshot { snapshot, volume }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: format!(
                "a clone (of volume {volume} in snapshot {snapshot}) is made from the snapshot's record, not from its config alone"
            ),
        }),
        (VolumeFormat::Qcow2, VolumeOrigin::Export { dir, volume }) => {
            crate::export::import::materialize(&key, dir, *volume, &tmp).await
        }
        (_, VolumeOrigin::Export { .. }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: "a volume restored from an export must be qcow2 (exports hold qcow2 images)"
                .into(),
        }),
        (VolumeFormat::Dir, VolumeOrigin::BaseImage { .. }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: "a directory volume cannot be made from a base image file; use qcow2 or raw"
                .into(),
        }),
        (VolumeFormat::Dir, VolumeOrigin::Blank) => {
            if backend == SnapshotBackendKind::Btrfs {
                btrfs::create_subvolume(&key, &tmp).await
            } else {
                std::fs::create_dir(&tmp).map_err(VolumeError::io(&key, "cannot create", &tmp))
            }
        }
        (format, VolumeOrigin::Blank) => {
            let fmt = if *format == VolumeFormat::Qcow2 {
                "qcow2"
            } else {
                "raw"
            };
            qemu_img(
                &key,
                &tmp,
                &[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    fmt.as_ref(),
                    tmp.as_os_str(),
                    size.as_ref(),
                ],
            )
            .await
        }
        (format, VolumeOrigin::BaseImage { path: base, sha256 }) => {
            verify_base(&key, base, sha256).await?;
            let fmt = if *format == VolumeFormat::Qcow2 {
                "qcow2"
            } else {
                "raw"
            };
            qemu_img(
                &key,
                &tmp,
                &[
                    "convert".as_ref(),
                    "-O".as_ref(),
                    fmt.as_ref(),
                    base.as_os_str(),
                    tmp.as_os_str(),
                ],
            )
            .await
        }
    };
    put_in_place(&key, &tmp, path, backend, result).await
}

/// The end of making a volume in its staging place `tmp`: after a failure `tmp` goes; else it
/// is renamed to `path` (durably) and brought into service.
async fn put_in_place(
    key: &str,
    tmp: &Path,
    path: &Path,
    backend: SnapshotBackendKind,
    made: Result<()>,
) -> Result<()> {
    if let Err(e) = made {
        let _ = remove(key, tmp).await;
        return Err(e);
    }
    std::fs::rename(tmp, path).map_err(VolumeError::io(key, "cannot rename into", path))?;
    if let Some(parent) = path.parent() {
        let _ = cairn_persist::sync_dir(parent);
    }
    activate(key, path, backend).await
}

/// Brings an existing volume into service: a squashfs-overlay volume's mounts are adopted or
/// made again (they do not survive a reboot). Nothing to do for the other backends.
pub async fn activate(key: &str, path: &Path, backend: SnapshotBackendKind) -> Result<()> {
    if backend == SnapshotBackendKind::Squashfs || squashfs::has_state(path) {
        squashfs::activate(key, path).await
    } else {
        Ok(())
    }
}

/// Creates the clone volume of `config` at `path` (which must not exist yet) as a copy of the
/// snapshot `source` describes (read from the snapshot's `volumesSnapshotStatus.json`):
///
/// - qcow2 internal snapshot: `qemu-img convert -U -f qcow2 -O <format> -l snapshot.name=<S>`
///   (`-U`: the source may be in use by its running VM; an internal snapshot's clusters do not
///   change while it exists);
/// - btrfs: a writable `btrfs subvolume snapshot` of the read-only snapshot subvolume;
/// - copy backend: a copy of the snapshot's directory (`copy_file_range`, which reflinks where
///   the filesystem can);
/// - purgeable: a copy of the kept volume (`qemu-img convert` for an image, a tree copy for a
///   directory);
/// - ZFS: a copy of the snapshot's directory `<mountpoint>/.zfs/snapshot/<S>` when the
///   filesystem shows it (kernel ZFS does; a `zfs clone` would stay tied to its origin snapshot,
///   and send/receive would need a dataset of its own for the clone), else refused.
///
/// Like [`create`], the copy is made under a dot name (`.<name>.creating`, removed at the next
/// start by [`sweep_leftovers`]) and renamed into place, so a crash never leaves a half clone.
/// The clone shares nothing with its source: deleting or rolling back the source afterwards
/// does not touch it.
pub async fn create_clone(
    config: &VolumeConfig,
    path: &Path,
    backend: SnapshotBackendKind,
    source: &VolumeSnapshotMeta,
    tools: &Tools,
) -> Result<()> {
    let key = config.key();
    restore_mode::check(config, path.parent().unwrap_or(path), tools)?;
    let tmp = staging(&key, path).await?;
    let unsupported = |what: String| VolumeError::Unsupported {
        volume: key.clone(),
        what,
    };
    let image_format = match config.format {
        VolumeFormat::Qcow2 => Some("qcow2"),
        VolumeFormat::Raw => Some("raw"),
        VolumeFormat::Dir => None,
    };
    if image_format.is_some() && !tools.qemu_img.is_available() {
        return Err(VolumeError::ToolMissing {
            volume: key,
            tool: qcow2::TOOL,
            package: qcow2::PACKAGE,
            backend: "qcow2",
        });
    }
    let snapshot_option = format!("snapshot.name={}", source.name);
    let result = match (image_format, source.backend) {
        (Some(fmt), SnapshotBackendKind::Qcow2) => {
            qemu_img(
                &key,
                &source.file_location,
                &[
                    "convert".as_ref(),
                    "-U".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-O".as_ref(),
                    fmt.as_ref(),
                    "-l".as_ref(),
                    snapshot_option.as_ref(),
                    source.file_location.as_os_str(),
                    tmp.as_os_str(),
                ],
            )
            .await
        }
        (Some(fmt), SnapshotBackendKind::Purgeable) if source.snapshot_location.is_file() => {
            qemu_img(
                &key,
                &source.snapshot_location,
                &[
                    "convert".as_ref(),
                    "-U".as_ref(),
                    "-f".as_ref(),
                    fmt.as_ref(),
                    "-O".as_ref(),
                    fmt.as_ref(),
                    source.snapshot_location.as_os_str(),
                    tmp.as_os_str(),
                ],
            )
            .await
        }
        (None, SnapshotBackendKind::Btrfs) if backend == SnapshotBackendKind::Btrfs => {
            btrfs::writable_snapshot(&key, &source.snapshot_location, &tmp).await
        }
        (None, SnapshotBackendKind::Squashfs) => {
            unsquash_into(&key, &source.snapshot_location, &tmp, backend, tools).await
        }
        (None, SnapshotBackendKind::Btrfs | SnapshotBackendKind::Copy)
        | (None, SnapshotBackendKind::Rsync | SnapshotBackendKind::Purgeable) => {
            copy_into(&key, &source.snapshot_location, &tmp, backend).await
        }
        (None, SnapshotBackendKind::Zfs) => {
            let dir = source
                .file_location
                .join(".zfs")
                .join("snapshot")
                .join(&source.name);
            if dir.is_dir() {
                copy_into(&key, &dir, &tmp, backend).await
            } else {
                Err(unsupported(format!(
                    "the ZFS snapshot {} does not show as {} (snapdir not available on this ZFS), so it cannot be copied; clone it with `zfs send | zfs receive` by hand",
                    source.snapshot_location.display(),
                    dir.display()
                )))
            }
        }
        (_, kind) => Err(unsupported(format!(
            "a {:?} volume cannot be cloned from a {kind:?} snapshot (volume {}); the clone's format must be the source volume's",
            config.format, source.volume_key
        ))),
    };
    put_in_place(&key, &tmp, path, backend, result).await
}

/// Makes the directory (a subvolume on the btrfs backend) `to` and copies the tree `from` into
/// it; a missing `from` is reported as a missing snapshot.
async fn copy_into(key: &str, from: &Path, to: &Path, backend: SnapshotBackendKind) -> Result<()> {
    if !from.is_dir() {
        return Err(VolumeError::NoSnapshot {
            volume: key.to_string(),
            snapshot: from.display().to_string(),
        });
    }
    if backend == SnapshotBackendKind::Btrfs {
        btrfs::create_subvolume(key, to).await?;
    } else {
        std::fs::create_dir(to).map_err(VolumeError::io(key, "cannot create", to))?;
    }
    let (k, f, t) = (key.to_string(), from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || copy::copy_contents(&k, &f, &t))
        .await
        .map_err(|e| VolumeError::io(key, "cannot copy to", to)(std::io::Error::other(e)))?
        .map(drop)
}

/// Makes the directory (a subvolume on the btrfs backend) `to` and unpacks the squashfs image
/// `from` into it.
async fn unsquash_into(
    key: &str,
    from: &Path,
    to: &Path,
    backend: SnapshotBackendKind,
    tools: &Tools,
) -> Result<()> {
    if !from.is_file() {
        return Err(VolumeError::NoSnapshot {
            volume: key.to_string(),
            snapshot: from.display().to_string(),
        });
    }
    if !tools.squashfs.is_available() {
        return Err(VolumeError::ToolMissing {
            volume: key.to_string(),
            tool: "unsquashfs",
            package: squashfs::PACKAGE,
            backend: "squashfs_overlay",
        });
    }
    if backend == SnapshotBackendKind::Btrfs {
        btrfs::create_subvolume(key, to).await?;
    } else {
        std::fs::create_dir(to).map_err(VolumeError::io(key, "cannot create", to))?;
    }
    let args: [&std::ffi::OsStr; 6] = [
        "-f".as_ref(),
        "-q".as_ref(),
        "-n".as_ref(),
        "-d".as_ref(),
        to.as_os_str(),
        from.as_os_str(),
    ];
    process::run("unsquashfs", &args, COMMAND_TIMEOUT * 30)
        .await
        .map(drop)
        .map_err(|source| VolumeError::Command {
            volume: key.to_string(),
            source,
        })
}

/// Removes a volume file, directory or btrfs subvolume; one already gone is not an error.
pub async fn remove(key: &str, path: &Path) -> Result<()> {
    if squashfs::has_state(path) {
        return squashfs::remove_volume(key, path).await;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        if meta.ino() == 256 && btrfs::is_btrfs(path) {
            // inode 256 is the root of a btrfs subvolume
            return btrfs::delete_subvolume(key, path).await;
        }
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&p))
            .await
            .map_err(|e| VolumeError::io(key, "cannot remove", path)(std::io::Error::other(e)))?
            .map_err(VolumeError::io(key, "cannot remove", path))
    } else {
        std::fs::remove_file(path).map_err(VolumeError::io(key, "cannot remove", path))
    }
}

/// Leftovers of interrupted work in the volumes directory: half-made volumes, partial copies.
pub async fn sweep_leftovers(volumes: &Path) {
    let Ok(entries) = std::fs::read_dir(volumes) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".creating") || name.ends_with(".rollback")) {
            tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted action");
            if let Err(e) = remove(&name, &entry.path()).await {
                tracing::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

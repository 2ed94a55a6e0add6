//! Making and removing volumes: qcow2 blank or from a verified base image, raw, and directory
//! volumes (a btrfs subvolume when the volume root is on btrfs). A volume is built under a dot
//! name and renamed into place, so a crash never leaves a half-made volume under its real name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_types::volume::{
    SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeSnapshotMeta,
};

use crate::backend::{self, Backends, CloneTarget, Tools, restore_mode};
use crate::error::{Result, VolumeError};

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
            let (kind, reason) =
                backend::choose_auto(volumes, &volume_path(volumes, config), tools);
            BackendChoice::new(kind, reason)
        }
    }
}

/// Bytes allocated on disk for a file or a directory tree (blocking: a walk).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn allocated_size(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| allocated_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(meta) => meta.blocks() * 512,
        Err(_) => 0,
    }
}

/// [`allocated_size`] off the runtime (a directory volume is a whole tree to walk).
pub async fn allocated_size_blocking(path: &Path) -> u64 {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || allocated_size(&p))
        .await
        .unwrap_or(0)
}

/// [`check_existing`] off the runtime.
pub async fn check_existing_blocking(key: &str, path: &Path, format: VolumeFormat) -> Result<()> {
    let (k, p) = (key.to_string(), path.to_path_buf());
    backend::blocking(key, move || check_existing(&k, &p, format)).await
}

pub use cairn_persist::digest::sha256_file;

/// Checks an existing volume is usable: present, and for qcow2 a qcow2 header.
pub fn check_existing(key: &str, path: &Path, format: VolumeFormat) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|_| VolumeError::Missing {
        volume: key.to_string(),
        path: path.to_path_buf(),
    })?;
    if format == VolumeFormat::Qcow2 {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
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

/// The temporary name a new volume is built under (`.<name>.creating`, cleared of any leftover),
/// with its parent directory made durably.
pub(crate) async fn staging(key: &str, path: &Path) -> Result<PathBuf> {
    let tmp = creating_path(path);
    remove(key, &tmp).await?;
    if let Some(parent) = path.parent() {
        let parent = parent.to_path_buf();
        let p = parent.clone();
        tokio::task::spawn_blocking(move || create_dir_durable(&p))
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
    kind: SnapshotBackendKind,
    backends: &Backends,
) -> Result<()> {
    let key = config.key();
    restore_mode::check(config, path.parent().unwrap_or(path), backends)?;
    let tmp = staging(&key, path).await?;
    let size = config.max_vol_size.to_string();
    let needs_qemu = config.format == VolumeFormat::Qcow2
        || matches!(config.origin, VolumeOrigin::BaseImage { .. });
    if needs_qemu && config.format != VolumeFormat::Dir {
        backends.check_image_tool(&key)?;
    }
    let result = match (&config.format, &config.origin) {
        (_, VolumeOrigin::ContentTree { id }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: format!(
                "a volume from content tree {id} is made from the downloaded blob, not from its config alone"
            ),
        }),
        (_, VolumeOrigin::Snapshot { snapshot, volume }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: format!(
                "a clone (of volume {volume} in snapshot {snapshot}) is made from the snapshot's record, not from its config alone"
            ),
        }),
        (VolumeFormat::Qcow2, VolumeOrigin::Export { dir, volume }) => {
            crate::export::import::materialize(&key, dir, *volume, &tmp, false).await
        }
        (VolumeFormat::Dir, VolumeOrigin::Export { dir, volume }) => {
            match backends.make(kind, &key, &tmp).await {
                Ok(()) => crate::export::import::materialize(&key, dir, *volume, &tmp, true).await,
                Err(e) => Err(e),
            }
        }
        (_, VolumeOrigin::RemoteExport { remote, .. }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: format!(
                "a volume restored from an export at remote {remote} is made with the remote's config, not from its own alone"
            ),
        }),
        (_, VolumeOrigin::Export { .. }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: "a volume restored from an export must be qcow2 (an image) or dir (a tree)"
                .into(),
        }),
        (VolumeFormat::Dir, VolumeOrigin::BaseImage { .. }) => Err(VolumeError::Unsupported {
            volume: key.clone(),
            what: "a directory volume cannot be made from a base image file; use qcow2 or raw"
                .into(),
        }),
        (VolumeFormat::Dir, VolumeOrigin::Blank) => backends.make(kind, &key, &tmp).await,
        (format, VolumeOrigin::Blank) => {
            let fmt = if *format == VolumeFormat::Qcow2 {
                "qcow2"
            } else {
                "raw"
            };
            backend::qemu_img(
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
            backend::qemu_img(
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
    put_in_place(&key, &tmp, path, kind, backends, result).await
}

/// Creates the volume of `config` (origin [`VolumeOrigin::RemoteExport`]) at `path` from the
/// export at `remote`: downloaded into a dot directory beside it (swept at start like a half-made
/// volume), every sha256 checked, then converted; nothing is made when any check fails.
pub async fn create_from_remote(
    config: &VolumeConfig,
    path: &Path,
    kind: SnapshotBackendKind,
    remote: &cairn_types::RemoteConfig,
    persist: &Path,
    backends: &Backends,
) -> Result<()> {
    let key = config.key();
    let VolumeOrigin::RemoteExport {
        key: export,
        volume,
        ..
    } = &config.origin
    else {
        return Err(VolumeError::Unsupported {
            volume: key,
            what: "not a volume restored from a remote export".into(),
        });
    };
    let tree = match config.format {
        VolumeFormat::Qcow2 => false,
        VolumeFormat::Dir => true,
        VolumeFormat::Raw => {
            return Err(VolumeError::Unsupported {
                volume: key,
                what: "a volume restored from an export must be qcow2 (an image) or dir (a tree)"
                    .into(),
            });
        }
    };
    if !tree {
        backends.check_image_tool(&key)?;
    }
    restore_mode::check(config, path.parent().unwrap_or(path), backends)?;
    let tmp = staging(&key, path).await?;
    if tree && let Err(e) = backends.make(kind, &key, &tmp).await {
        let _ = remove(&key, &tmp).await;
        return Err(e);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let download = path.with_file_name(format!(".{name}.download.creating"));
    remove(&key, &download).await?;
    let made = crate::export::restore::materialize(
        &key, persist, remote, export, *volume, &download, &tmp, tree,
    )
    .await;
    put_in_place(&key, &tmp, path, kind, backends, made).await
}

/// The end of making a volume in its staging place `tmp`: after a failure `tmp` goes; else it
/// is renamed to `path` (durably) and brought into service.
pub(crate) async fn put_in_place(
    key: &str,
    tmp: &Path,
    path: &Path,
    kind: SnapshotBackendKind,
    backends: &Backends,
    made: Result<()>,
) -> Result<()> {
    if let Err(e) = made {
        let _ = remove(key, tmp).await;
        return Err(e);
    }
    let (k, from, to) = (key.to_string(), tmp.to_path_buf(), path.to_path_buf());
    backend::blocking(key, move || rename_durably(&k, &from, &to)).await?;
    backends.activate(kind, key, path).await
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    cairn_persist::create_dir_durable(dir)
}

/// Makes the made volume durable, renames it into place, and its directory entry durably
/// (blocking). The makers do not all sync what they write (`qemu-img convert` leaves its output
/// in the page cache), and Ready must not be said of data a power cut can take.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn rename_durably(key: &str, from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        backend::sync_tree(key, from)?;
    } else {
        std::fs::File::open(from)
            .and_then(|f| f.sync_all())
            .map_err(VolumeError::io(key, "cannot sync", from))?;
    }
    std::fs::rename(from, to).map_err(VolumeError::io(key, "cannot rename into", to))?;
    // A failed fsync is an error: Ready must not be said of a volume a power cut can take.
    backend::sync_parent(key, to)
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
    kind: SnapshotBackendKind,
    source: &VolumeSnapshotMeta,
    backends: &Backends,
) -> Result<()> {
    let key = config.key();
    restore_mode::check(config, path.parent().unwrap_or(path), backends)?;
    let tmp = staging(&key, path).await?;
    if config.format != VolumeFormat::Dir {
        backends.check_image_tool(&key)?;
    }
    let target = CloneTarget {
        key: &key,
        path: &tmp,
        format: config.format,
        kind,
        backends,
    };
    let result = backends.clone_to(source, &target).await;
    put_in_place(&key, &tmp, path, kind, backends, result).await
}

/// Removes a volume file, directory, or one its backend owns (a btrfs subvolume, an overlay);
/// one already gone is not an error.
pub async fn remove(key: &str, path: &Path) -> Result<()> {
    backend::remove_volume(key, path).await
}

/// Leftovers of interrupted work in the volumes directory: half-made volumes, partial copies.
pub async fn sweep_leftovers(volumes: &Path) {
    let dir = volumes.to_path_buf();
    #[allow(clippy::disallowed_methods)] // on the blocking pool
    let leftovers = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                (name.starts_with('.')
                    && (name.ends_with(".creating") || name.ends_with(".rollback")))
                .then(|| (name, entry.path()))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (name, path) in leftovers {
        tracing::info!(path = %path.display(), "removing leftover of an interrupted action");
        if let Err(e) = remove(&name, &path).await {
            tracing::warn!("{e}");
        }
    }
}

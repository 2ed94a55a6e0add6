//! Snapshot backends: one module per kind, all behind [`SnapshotBackend`]. A backend's snapshot
//! is named by the snapshot UUID, so a restarted agent finds (and adopts) one it made before a
//! crash instead of failing with "already exists". Every operation works from the metadata alone
//! (no config needed), so an intent record is enough to finish or undo an interrupted action.

use std::future::Future;
use std::path::{Path, PathBuf};

use cairn_types::volume::{SnapshotBackendKind, VolumeFormat, VolumeSnapshotMeta};

use crate::error::{Result, VolumeError};
pub use tools::{Tool, ToolSpec, Tools};

pub mod btrfs;
pub mod btrfs_ioctl;
pub mod copy;
pub mod purgeable;
pub mod qcow2;
pub mod restore_mode;
pub mod rsync;
pub mod squashfs;
pub mod tools;
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

/// One snapshot backend: what it needs installed, how it makes and removes the volumes it
/// serves, and snapshot create (or adopt) → metadata, rollback(metadata), delete(metadata).
/// Only `backend/` names a concrete backend; the rest of the agent goes through [`Backends`].
pub trait SnapshotBackend: Send + Sync {
    fn kind(&self) -> SnapshotBackendKind;

    /// The backend's name in messages (`squashfs_overlay`, ...).
    fn name(&self) -> &'static str;

    /// The command it runs, and its Debian package; `None` when it needs none.
    fn tool(&self) -> Option<ToolSpec> {
        None
    }

    /// Which implementation serves it, when it has more than one (ZFS: libzetta or CLI), for
    /// the log; choosing it here makes the choice at start, not at the first use.
    fn driver(&self) -> &'static str {
        ""
    }

    /// Whether its snapshots are trees or files of their own, outside the volume: they do not
    /// keep a released volume, and a rollback to one makes a released volume again. Snapshots
    /// that live in the volume (qcow2 internal, ZFS, purgeable) keep it.
    fn snapshot_outside_volume(&self) -> bool {
        false
    }

    /// Whether it can snapshot a volume while its app runs (an atomic copy-on-write snapshot).
    fn live(&self) -> bool {
        false
    }

    /// Whether a live snapshot is taken by the app's hypervisor (the domain-manager) and only
    /// recorded here ([`Self::adopt_live`]).
    fn live_taken_by_hypervisor(&self) -> bool {
        false
    }

    /// Why this host cannot serve the backend when a volume asks for it by its restore mode
    /// (a kernel feature, the filesystem of `volumes`); its tool is checked apart.
    fn host_missing(&self, volumes: &Path) -> Option<String> {
        let _ = volumes;
        None
    }

    /// Whether it serves a directory volume at `path` whose restore mode is `auto`.
    fn auto(&self, volumes: &Path, path: &Path) -> Auto {
        let _ = (volumes, path);
        Auto::No
    }

    /// Whether the volume at `path` is one of this backend's own making that a plain removal
    /// would not remove (a mount, a subvolume).
    fn owns(&self, path: &Path) -> bool {
        let _ = path;
        false
    }

    /// Makes an empty directory volume at `path` (a plain directory unless the backend needs
    /// its own kind).
    fn make(&self, key: &str, path: &Path) -> impl Future<Output = Result<()>> + Send {
        make_dir(key, path)
    }

    /// Removes a volume at `path` that [`Self::owns`]; one already gone is not an error.
    fn remove(&self, key: &str, path: &Path) -> impl Future<Output = Result<()>> + Send {
        remove_plain(key, path)
    }

    /// Brings an existing volume into service (mounts that do not survive a reboot).
    fn activate(&self, key: &str, path: &Path) -> impl Future<Output = Result<()>> + Send {
        let _ = (key, path);
        std::future::ready(Ok(()))
    }

    /// Records the snapshot `name` someone else took of the live volume (see
    /// [`Self::live_taken_by_hypervisor`]).
    fn adopt_live(
        &self,
        volume: &VolumeRef,
        name: &str,
    ) -> impl Future<Output = Result<VolumeSnapshotMeta>> + Send {
        let _ = name;
        std::future::ready(Err(VolumeError::Unsupported {
            volume: volume.key.clone(),
            what: format!(
                "the {} backend takes its live snapshots itself",
                self.name()
            ),
        }))
    }

    /// Fills the new volume `target.path` (not there yet) with the content of `source`, one of
    /// this backend's snapshots: a clone.
    fn clone_to(
        &self,
        source: &VolumeSnapshotMeta,
        target: &CloneTarget<'_>,
    ) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Err(target.mismatch(source)))
    }

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

    /// What a live create can do before the app is stopped (a container's cgroup frozen), so
    /// that the pause holds the snapshot only: nothing by default.
    fn prepare_live(&self, meta: &VolumeSnapshotMeta) -> impl Future<Output = Result<()>> + Send {
        let _ = meta;
        std::future::ready(Ok(()))
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

/// A backend's answer for a directory volume in `auto` restore mode.
pub enum Auto {
    /// It serves it; why (`<dir> is on btrfs`).
    Serves(String),
    /// It would, but cannot; why (`<dir> is a plain directory, not a subvolume`).
    Cannot(String),
    /// Not its kind of place.
    No,
}

/// The shared start of a backend's `create`: the planned metadata, the volume checked present,
/// and whether a snapshot of that name is already there (to adopt). `look` false skips the
/// look (a fresh request where looking costs a command).
pub async fn create_preamble<B: SnapshotBackend>(
    backend: &B,
    volume: &VolumeRef,
    name: &str,
    look: bool,
) -> Result<(VolumeSnapshotMeta, bool)> {
    let meta = backend.plan(volume, name);
    if !exists_blocking(&volume.path).await {
        return Err(VolumeError::Missing {
            volume: volume.key.clone(),
            path: volume.path.clone(),
        });
    }
    let there = look && backend.exists(&meta).await?;
    if there {
        tracing::info!(volume = %volume.key, snapshot = name, backend = backend.name(), "snapshot already there: adopted");
    }
    Ok((meta, there))
}

/// The volume a clone is being made into.
pub struct CloneTarget<'a> {
    pub key: &'a str,
    /// Where to make it (its staging place).
    pub path: &'a Path,
    pub format: VolumeFormat,
    /// The backend that will serve it.
    pub kind: SnapshotBackendKind,
    pub backends: &'a Backends,
}

impl CloneTarget<'_> {
    /// `qcow2` or `raw` for an image volume, `None` for a directory.
    pub fn image_format(&self) -> Option<&'static str> {
        match self.format {
            VolumeFormat::Qcow2 => Some("qcow2"),
            VolumeFormat::Raw => Some("raw"),
            VolumeFormat::Dir => None,
        }
    }

    /// The refusal when the clone's format cannot be made from `source`.
    pub fn mismatch(&self, source: &VolumeSnapshotMeta) -> VolumeError {
        VolumeError::Unsupported {
            volume: self.key.to_string(),
            what: format!(
                "a {:?} volume cannot be cloned from a {:?} snapshot (volume {}); the clone's format must be the source volume's",
                self.format, source.backend, source.volume_key
            ),
        }
    }

    /// Makes the (empty) directory volume, as its own backend makes one.
    pub async fn make_dir(&self) -> Result<()> {
        self.backends.make(self.kind, self.key, self.path).await
    }

    /// Makes the directory volume and copies the tree `from` into it; a missing `from` is
    /// reported as a missing snapshot.
    pub async fn copy_tree(&self, from: &Path) -> Result<()> {
        if !is_dir_blocking(from).await {
            return Err(VolumeError::NoSnapshot {
                volume: self.key.to_string(),
                snapshot: from.display().to_string(),
            });
        }
        self.make_dir().await?;
        let (k, f, t) = (
            self.key.to_string(),
            from.to_path_buf(),
            self.path.to_path_buf(),
        );
        blocking(self.key, move || copy::copy_contents(&k, &f, &t).map(drop)).await
    }
}

/// Runs blocking file work (walks, copies, removals, fsyncs) off the runtime.
pub async fn blocking<T: Send + 'static>(
    volume: &str,
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| VolumeError::Io {
            volume: volume.to_string(),
            what: "background file task failed",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

/// Whether `path` exists, asked off the runtime (a stat can wait on a busy disk).
pub async fn exists_blocking(path: &Path) -> bool {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || p.exists())
        .await
        .unwrap_or(false)
}

/// Whether `path` is a directory, asked off the runtime.
pub async fn is_dir_blocking(path: &Path) -> bool {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || p.is_dir())
        .await
        .unwrap_or(false)
}

/// Removes the tree at `path`; one already gone is not an error (blocking).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn remove_tree(volume: &str, path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VolumeError::io(volume, "cannot remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// Makes a rename, exchange or removal of `path` durable: fsync of its directory (blocking).
/// A directory already gone needs none.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn sync_parent(volume: &str, path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) => match cairn_persist::sync_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(VolumeError::io(volume, "cannot sync", dir)(e))
            }
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// fsyncs every file and directory under `path` (and `path`): a tree made by a tool that does
/// not (rsync) is durable before a record says it is there (blocking). Symlinks are durable
/// with their directory.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn sync_tree(volume: &str, path: &Path) -> Result<()> {
    let entries = std::fs::read_dir(path).map_err(VolumeError::io(volume, "cannot read", path))?;
    for entry in entries {
        let entry = entry.map_err(VolumeError::io(volume, "cannot read", path))?;
        let kind =
            entry
                .file_type()
                .map_err(VolumeError::io(volume, "cannot stat", &entry.path()))?;
        if kind.is_dir() {
            sync_tree(volume, &entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())
                .and_then(|f| f.sync_all())
                .map_err(VolumeError::io(volume, "cannot sync", &entry.path()))?;
        }
    }
    cairn_persist::sync_dir(path).map_err(VolumeError::io(volume, "cannot sync", path))
}

/// Removes the file at `path`; one already gone is not an error (blocking).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn remove_file(volume: &str, path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VolumeError::io(volume, "cannot remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// `<path>.partial`: where a snapshot is built before it is renamed complete.
pub fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Makes the empty directory `path` (off the runtime).
async fn make_dir(key: &str, path: &Path) -> Result<()> {
    let (k, p) = (key.to_string(), path.to_path_buf());
    blocking(key, move || {
        std::fs::create_dir(&p).map_err(VolumeError::io(&k, "cannot create", &p))
    })
    .await
}

/// Removes a plain file or directory tree (off the runtime); one already gone is not an error.
async fn remove_plain(key: &str, path: &Path) -> Result<()> {
    let (k, p) = (key.to_string(), path.to_path_buf());
    blocking(key, move || match std::fs::symlink_metadata(&p) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_dir() => remove_tree(&k, &p),
        Ok(_) => remove_file(&k, &p),
    })
    .await
}

/// Makes the directory `path` goes into, durably (its own entry in its parent too).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
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

/// `.<name>.rollback` beside the volume: where a rollback builds the restored content before
/// it is exchanged in (a leftover is removed before the next one and by the start-up sweep).
pub fn rollback_scratch(volume: &Path) -> PathBuf {
    let name = volume
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    volume.with_file_name(format!(".{name}.rollback"))
}

/// Exchanges two paths atomically (renameat2 RENAME_EXCHANGE): the volume is either the old or
/// the new content at every instant.
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).map_err(std::io::Error::from)
}

// ---- the registry: adding a backend = its module, a `KINDS` entry and a `with_backend!` arm.

/// Every backend built in, in the order they are asked: who owns a volume path (squashfs
/// before btrfs: an overlay may sit on btrfs), who serves an `auto` directory volume (ZFS
/// before btrfs; `Copy` when none does).
const KINDS: &[SnapshotBackendKind] = &[
    SnapshotBackendKind::Squashfs,
    #[cfg(feature = "zfs")]
    SnapshotBackendKind::Zfs,
    SnapshotBackendKind::Btrfs,
    SnapshotBackendKind::Qcow2,
    SnapshotBackendKind::Rsync,
    SnapshotBackendKind::Copy,
    SnapshotBackendKind::Purgeable,
];

/// Runs `$call` with `$b` bound to the backend of `$kind`; `$none` when no backend serves it.
macro_rules! with_backend {
    ($kind:expr, |$b:ident| $call:expr, else $none:expr) => {{
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
            #[allow(unreachable_patterns)]
            _ => $none,
        }
    }};
}

/// The tools of the backends that need one (probed once at start).
pub fn tool_specs() -> Vec<(SnapshotBackendKind, ToolSpec)> {
    KINDS
        .iter()
        .filter_map(|kind| with_backend!(*kind, |b| b.tool(), else None).map(|t| (*kind, t)))
        .collect()
}

/// The backend chosen for a directory volume in `auto` restore mode at `path` (under
/// `volumes`), and why: the first that serves it and has its tool, else `Copy`.
pub fn choose_auto(volumes: &Path, path: &Path, tools: &Tools) -> (SnapshotBackendKind, String) {
    let mut declined = None;
    for kind in KINDS {
        let answer =
            with_backend!(*kind, |b| (b.name(), b.auto(volumes, path)), else ("", Auto::No));
        match answer {
            (name, Auto::Serves(why)) => match tools.usable(*kind) {
                Ok(()) => return (*kind, format!("{name}: {why}")),
                Err(missing) => declined = declined.or(Some(format!("{why}, but {missing}"))),
            },
            (_, Auto::Cannot(why)) => declined = declined.or(Some(why)),
            (_, Auto::No) => {}
        }
    }
    let why = declined.unwrap_or_else(|| {
        let dir = nearest_existing(volumes);
        format!("{} is on {}, no btrfs/zfs", dir.display(), fs_name(dir))
    });
    (SnapshotBackendKind::Copy, format!("copy: {why}"))
}

/// Removes a volume file, directory, or one its backend owns (a subvolume, an overlay); one
/// already gone is not an error.
pub async fn remove_volume(key: &str, path: &Path) -> Result<()> {
    for kind in KINDS {
        if with_backend!(*kind, |b| b.owns(path), else false) {
            return with_backend!(*kind, |b| b.remove(key, path).await, else Ok(()));
        }
    }
    remove_plain(key, path).await
}

/// qemu-img's failure on an image file, in terms of the volume (images are qcow2's tool).
pub fn image_error(volume: &str, file: &Path, err: crate::process::CommandError) -> VolumeError {
    qcow2::classify(volume, file, err)
}

/// The internal snapshot tags of a qcow2 image (read with `-U`: works while a VM runs).
pub async fn image_snapshots(volume: &str, file: &Path) -> Result<Vec<String>> {
    qcow2::list(volume, file).await
}

/// Runs qemu-img on the image `file` of volume `key`.
pub async fn qemu_img(key: &str, file: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    qcow2::run_qemu_img(key, file, args).await
}

/// All backends with their tools' availability; dispatches on the kind recorded in the metadata.
#[derive(Debug, Clone)]
pub struct Backends {
    pub tools: Tools,
}

impl Backends {
    fn unsupported(kind: SnapshotBackendKind, volume: &str) -> VolumeError {
        VolumeError::Unsupported {
            volume: volume.to_string(),
            what: match kind {
                SnapshotBackendKind::None => format!(
                    "it has no snapshot backend ({kind:?}): a raw image has no internal snapshots; use the qcow2 format or mark the volume purgeable"
                ),
                _ => format!("it has no snapshot backend ({kind:?}) in this build"),
            },
        }
    }

    /// Refuses a kind that cannot act: no backend, or its tool missing.
    pub fn check(&self, kind: SnapshotBackendKind, volume: &str) -> Result<()> {
        let name =
            with_backend!(kind, |b| b.name(), else return Err(Self::unsupported(kind, volume)));
        match self.tools.of(kind) {
            Some(tool) if !tool.is_available() => Err(VolumeError::ToolMissing {
                volume: volume.to_string(),
                tool: tool.name,
                package: tool.package,
                backend: name,
            }),
            _ => Ok(()),
        }
    }

    /// Whether the image tool (qemu-img, for qcow2 and raw volumes) is there.
    pub fn check_image_tool(&self, volume: &str) -> Result<()> {
        self.check(SnapshotBackendKind::Qcow2, volume)
    }

    /// Why this host cannot serve backend `kind` for a volume asking for it by its restore
    /// mode: its tool missing, or what [`SnapshotBackend::host_missing`] says.
    pub fn host_missing(&self, kind: SnapshotBackendKind, volumes: &Path) -> Option<String> {
        if let Err(missing) = self.tools.usable(kind) {
            return Some(missing);
        }
        with_backend!(kind, |b| b.host_missing(volumes), else Some(format!("no {kind:?} backend in this build")))
    }

    /// The driver serving `kind`, for the log (empty for backends with one).
    pub fn driver(kind: SnapshotBackendKind) -> &'static str {
        with_backend!(kind, |b| b.driver(), else "")
    }

    /// Makes the empty directory volume `path` the way backend `kind` needs.
    pub async fn make(&self, kind: SnapshotBackendKind, key: &str, path: &Path) -> Result<()> {
        with_backend!(kind, |b| b.make(key, path).await, else make_dir(key, path).await)
    }

    /// Brings an existing volume into service: whoever owns it, or its backend.
    pub async fn activate(&self, kind: SnapshotBackendKind, key: &str, path: &Path) -> Result<()> {
        for owner in KINDS {
            if with_backend!(*owner, |b| b.owns(path), else false) {
                return with_backend!(*owner, |b| b.activate(key, path).await, else Ok(()));
            }
        }
        with_backend!(kind, |b| b.activate(key, path).await, else Ok(()))
    }

    /// Refuses a live snapshot on a backend that cannot take one, naming the backend.
    pub fn check_live(&self, kind: SnapshotBackendKind, volume: &str) -> Result<()> {
        if with_backend!(kind, |b| b.live(), else false) {
            return Ok(());
        }
        Err(VolumeError::Unsupported {
            volume: volume.to_string(),
            what: format!(
                "a live snapshot needs a copy-on-write backend (qcow2 of a VM, btrfs, zfs); this volume's backend is {}: take the snapshot with mode stopped",
                format!("{kind:?}").to_lowercase()
            ),
        })
    }

    /// Whether snapshots on `kind` live outside their volume (see
    /// [`SnapshotBackend::snapshot_outside_volume`]); a kind not built in keeps its volume.
    pub fn snapshot_outside_volume(&self, kind: SnapshotBackendKind) -> bool {
        with_backend!(kind, |b| b.snapshot_outside_volume(), else false)
    }

    /// Whether a live snapshot on `kind` is taken by the hypervisor and only recorded here.
    pub fn live_taken_by_hypervisor(&self, kind: SnapshotBackendKind) -> bool {
        with_backend!(kind, |b| b.live_taken_by_hypervisor(), else false)
    }

    /// Records the live snapshot `name` the hypervisor took of the volume `meta` describes.
    pub async fn adopt_live(
        &self,
        meta: &VolumeSnapshotMeta,
        name: &str,
    ) -> Result<VolumeSnapshotMeta> {
        self.check(meta.backend, &meta.volume_key)?;
        let volume = VolumeRef::of_meta(meta);
        with_backend!(meta.backend, |b| b.adopt_live(&volume, name).await, else Err(Self::unsupported(meta.backend, &meta.volume_key)))
    }

    /// Readies snapshot `meta` of a live create before the app is stopped
    /// ([`SnapshotBackend::prepare_live`]).
    pub async fn prepare_live(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        self.check(meta.backend, &meta.volume_key)?;
        with_backend!(meta.backend, |b| b.prepare_live(meta).await, else Err(Self::unsupported(meta.backend, &meta.volume_key)))
    }

    /// Makes `target` a copy of snapshot `source`'s content (a clone).
    pub async fn clone_to(
        &self,
        source: &VolumeSnapshotMeta,
        target: &CloneTarget<'_>,
    ) -> Result<()> {
        with_backend!(source.backend, |b| b.clone_to(source, target).await, else Err(target.mismatch(source)))
    }

    pub fn plan(
        &self,
        kind: SnapshotBackendKind,
        volume: &VolumeRef,
        name: &str,
    ) -> Result<VolumeSnapshotMeta> {
        self.check(kind, &volume.key)?;
        with_backend!(kind, |b| Ok(b.plan(volume, name)), else Err(Self::unsupported(kind, &volume.key)))
    }

    pub async fn create(
        &self,
        kind: SnapshotBackendKind,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        self.check(kind, &volume.key)?;
        let meta = with_backend!(kind, |b| b.create(volume, name, fresh).await, else Err(Self::unsupported(kind, &volume.key)))?;
        // Change tracking for incremental exports (qcow2 volumes already tracked).
        crate::export::bitmap::after_create(&meta).await;
        Ok(meta)
    }

    pub async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        self.check(meta.backend, &meta.volume_key)?;
        // qemu refuses to apply a snapshot while the image has bitmaps (export tracking).
        let tracked = crate::export::bitmap::before_rollback(meta).await;
        with_backend!(meta.backend, |b| b.rollback(meta).await, else Err(Self::unsupported(meta.backend, &meta.volume_key)))?;
        crate::export::bitmap::after_rollback(meta, tracked).await;
        Ok(())
    }

    pub async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        self.check(meta.backend, &meta.volume_key)?;
        with_backend!(meta.backend, |b| b.delete(meta).await, else Err(Self::unsupported(meta.backend, &meta.volume_key)))?;
        crate::export::bitmap::after_delete(meta).await;
        Ok(())
    }

    pub async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        self.check(meta.backend, &meta.volume_key)?;
        with_backend!(meta.backend, |b| b.exists(meta).await, else Err(Self::unsupported(meta.backend, &meta.volume_key)))
    }
}

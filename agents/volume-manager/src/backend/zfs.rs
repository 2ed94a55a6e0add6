//! ZFS dataset snapshots. A volume is served by ZFS when its directory is the mountpoint of a
//! dataset. One backend, two drivers, chosen once at startup ([`driver`]):
//! - libzetta (libzfs_core ioctls on `/dev/zfs`) where `/dev/zfs` exists (kernel ZFS);
//! - the `zfs` CLI otherwise: zfs-fuse (userspace ZFS, what the tests reach) has no `/dev/zfs`.
//!
//! `CAIRN_ZFS_DRIVER=cli|libzetta` forces one; a forced libzetta that cannot open `/dev/zfs` makes
//! every ZFS operation fail with that reason instead of silently using the CLI. Both drivers
//! find a volume's dataset with `zfs list` (libzetta has no mountpoint lookup and runs the CLI
//! for its own listings), so the `zfs` tool is needed either way.

mod libzetta;

use std::path::Path;
use std::sync::OnceLock;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{Auto, CloneTarget, SnapshotBackend, ToolSpec, VolumeRef};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT};

pub const TOOL: &str = "zfs";
pub const PACKAGE: &str = "zfsutils-linux (or zfs-fuse)";
/// The device libzfs_core talks to; only kernel ZFS has it.
pub const DEV_ZFS: &str = "/dev/zfs";
/// Forces a driver: `cli` or `libzetta` (unset or `auto`: libzetta where `/dev/zfs` exists).
pub const DRIVER_ENV: &str = "CAIRN_ZFS_DRIVER";

/// Which driver to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// libzetta where `/dev/zfs` exists (and libzfs_core opens it), else the CLI.
    Auto,
    Cli,
    Libzetta,
}

impl Selection {
    /// From [`DRIVER_ENV`]'s value.
    pub fn parse(value: Option<&str>) -> std::result::Result<Self, String> {
        match value.map(str::trim) {
            None | Some("" | "auto") => Ok(Self::Auto),
            Some("cli") => Ok(Self::Cli),
            Some("libzetta") => Ok(Self::Libzetta),
            Some(other) => Err(format!(
                "{DRIVER_ENV}={other} is not a ZFS driver; use cli, libzetta or auto"
            )),
        }
    }
}

/// How ZFS is driven.
#[derive(Debug, Clone)]
pub enum Driver {
    /// The `zfs` CLI; `reason` says why it was chosen.
    Cli { reason: String },
    /// libzetta on `/dev/zfs`.
    Libzetta(libzetta::Engine),
}

impl Driver {
    /// Picks the driver for `selection`; `dev_zfs` is where `/dev/zfs` is looked for (Auto only:
    /// libzfs_core itself always opens `/dev/zfs`). `Err` only for a forced libzetta that cannot
    /// start, and says why, naming `/dev/zfs`.
    pub fn select(selection: Selection, dev_zfs: &Path) -> std::result::Result<Self, String> {
        match selection {
            Selection::Cli => Ok(Self::Cli {
                reason: format!("forced by {DRIVER_ENV}=cli"),
            }),
            Selection::Libzetta => libzetta::Engine::open().map(Self::Libzetta).map_err(|e| {
                format!(
                    "the libzetta ZFS driver is forced ({DRIVER_ENV}=libzetta) but cannot start: {e}; unset {DRIVER_ENV} to use the zfs CLI"
                )
            }),
            Selection::Auto if !dev_zfs.exists() => Ok(Self::Cli {
                reason: format!(
                    "{} does not exist (no kernel ZFS; zfs-fuse has no {DEV_ZFS})",
                    dev_zfs.display()
                ),
            }),
            Selection::Auto => Ok(match libzetta::Engine::open() {
                Ok(engine) => Self::Libzetta(engine),
                Err(e) => Self::Cli {
                    reason: format!("{} exists but libzetta cannot use it: {e}", dev_zfs.display()),
                },
            }),
        }
    }

    /// For statuses and logs: `zfs (libzetta)` or `zfs (cli)`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Cli { .. } => "zfs (cli)",
            Self::Libzetta(_) => "zfs (libzetta)",
        }
    }

    /// Why this driver.
    pub fn reason(&self) -> String {
        match self {
            Self::Cli { reason } => reason.clone(),
            Self::Libzetta(_) => format!("{DEV_ZFS} is there and libzfs_core opened it"),
        }
    }
}

/// The process's driver, chosen on first use from [`DRIVER_ENV`] and `/dev/zfs`, and logged.
/// `Err`: a forced libzetta that cannot start (every ZFS operation then fails with it).
pub fn driver() -> &'static std::result::Result<Driver, String> {
    static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let chosen = Selection::parse(std::env::var(DRIVER_ENV).ok().as_deref())
            .and_then(|selection| Driver::select(selection, Path::new(DEV_ZFS)));
        match &chosen {
            Ok(d) => tracing::info!(driver = d.label(), reason = %d.reason(), "ZFS driver chosen"),
            Err(e) => tracing::error!("ZFS backend disabled: {e}"),
        }
        chosen
    })
}

/// The label of the process's driver, for `VolumeStatus` (`zfs (libzetta)`, `zfs (cli)`, or
/// `zfs (unavailable)` when a forced libzetta cannot start).
pub fn driver_label() -> &'static str {
    driver().as_ref().map_or("zfs (unavailable)", Driver::label)
}

fn current(volume: &str) -> Result<&'static Driver> {
    driver().as_ref().map_err(|e| VolumeError::Unsupported {
        volume: volume.to_string(),
        what: e.clone(),
    })
}

/// The ZFS backend; acts through the process's [`driver`].
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

/// What the libzetta driver's rollback to `snapshot` would destroy first, from the text of
/// `zfs list -t snapshot -o name -Hr <dataset>` (the listing libzetta runs): lets a test check,
/// on a real pool, that the listing is in creation order.
pub fn libzetta_later_snapshots(listing: &str, dataset: &str, snapshot: &str) -> Vec<String> {
    let listed: Vec<std::path::PathBuf> = listing.lines().map(|l| l.trim().into()).collect();
    libzetta::later_snapshots(&listed, dataset, snapshot)
        .into_iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// `pool/ds` from `pool/ds@name`.
fn dataset_of(full: &str) -> &str {
    full.split_once('@').map_or(full, |(dataset, _)| dataset)
}

impl Driver {
    /// Makes snapshot `name` of the dataset mounted at `volume.path` (adopts an existing one).
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
            let full = full_name(&meta);
            match self {
                Self::Cli { .. } => zfs(&volume.key, &["snapshot", &full]).await.map(drop)?,
                Self::Libzetta(engine) => engine.snapshot(&full).await.map_err(VolumeError::io(
                    &volume.key,
                    "zfs snapshot (libzetta) of",
                    &full,
                ))?,
            }
        }
        Ok(meta)
    }

    pub async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if !self.exists(meta).await? {
            return Err(VolumeError::NoSnapshot {
                volume: meta.volume_key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        let full = full_name(meta);
        match self {
            Self::Cli { .. } => zfs(&meta.volume_key, &["rollback", "-r", &full])
                .await
                .map(drop),
            Self::Libzetta(engine) => {
                engine
                    .rollback(dataset_of(&full), &full)
                    .await
                    .map_err(VolumeError::io(
                        &meta.volume_key,
                        "zfs rollback (libzetta) to",
                        &full,
                    ))
            }
        }
    }

    pub async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if self.exists(meta).await? {
            let full = full_name(meta);
            match self {
                Self::Cli { .. } => zfs(&meta.volume_key, &["destroy", &full]).await.map(drop)?,
                Self::Libzetta(engine) => engine.destroy(&full).await.map_err(VolumeError::io(
                    &meta.volume_key,
                    "zfs destroy (libzetta) of",
                    &full,
                ))?,
            }
        }
        Ok(())
    }

    pub async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        if meta.snapshot_location.as_os_str().is_empty() {
            return Ok(false);
        }
        let full = full_name(meta);
        match self {
            Self::Cli { .. } => Ok(process::run(
                TOOL,
                &["list", "-H", "-t", "snapshot", "-o", "name", &full],
                COMMAND_TIMEOUT,
            )
            .await
            .is_ok()),
            Self::Libzetta(engine) => engine.exists(&full).await.map_err(VolumeError::io(
                &meta.volume_key,
                "zfs exists (libzetta)",
                &full,
            )),
        }
    }
}

impl ZfsBackend {
    /// Makes snapshot `name` of the dataset mounted at `volume.path`.
    pub async fn create_on(&self, volume: &VolumeRef, name: &str) -> Result<VolumeSnapshotMeta> {
        current(&volume.key)?.create_on(volume, name).await
    }
}

impl SnapshotBackend for ZfsBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Zfs
    }

    fn name(&self) -> &'static str {
        "zfs"
    }

    fn tool(&self) -> Option<ToolSpec> {
        Some(ToolSpec {
            name: TOOL,
            package: PACKAGE,
            probe: &["list", "-H"],
        })
    }

    fn driver(&self) -> &'static str {
        driver_label()
    }

    fn live(&self) -> bool {
        true // an atomic dataset snapshot of the live tree
    }

    fn auto(&self, volumes: &Path, path: &Path) -> Auto {
        use std::os::unix::fs::MetadataExt;
        // A dataset mountpoint is a mount of its own: its device differs from the parent's.
        match (std::fs::metadata(path), std::fs::metadata(volumes)) {
            (Ok(v), Ok(root)) if v.dev() != root.dev() => {
                Auto::Serves(format!("{} is a ZFS dataset's mountpoint", path.display()))
            }
            _ => Auto::No,
        }
    }

    /// A copy of the snapshot's directory `<mountpoint>/.zfs/snapshot/<S>` when the filesystem
    /// shows it (kernel ZFS does; a `zfs clone` would stay tied to its origin snapshot, and
    /// send/receive would need a dataset of its own for the clone), else refused.
    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        if target.image_format().is_some() {
            return Err(target.mismatch(source));
        }
        let dir = source
            .file_location
            .join(".zfs")
            .join("snapshot")
            .join(&source.name);
        if super::is_dir_blocking(&dir).await {
            target.copy_tree(&dir).await
        } else {
            Err(VolumeError::Unsupported {
                volume: target.key.to_string(),
                what: format!(
                    "the ZFS snapshot {} does not show as {} (snapdir not available on this ZFS), so it cannot be copied; clone it with `zfs send | zfs receive` by hand",
                    source.snapshot_location.display(),
                    dir.display()
                ),
            })
        }
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
        current(&meta.volume_key)?.rollback(meta).await
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        current(&meta.volume_key)?.delete(meta).await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        current(&meta.volume_key)?.exists(meta).await
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

    #[test]
    fn the_driver_is_forced_by_name_or_chosen_automatically() {
        assert_eq!(Selection::parse(None), Ok(Selection::Auto));
        assert_eq!(Selection::parse(Some("auto")), Ok(Selection::Auto));
        assert_eq!(Selection::parse(Some("cli")), Ok(Selection::Cli));
        assert_eq!(
            Selection::parse(Some(" libzetta ")),
            Ok(Selection::Libzetta)
        );
        let e = Selection::parse(Some("kernel")).unwrap_err();
        assert!(e.contains(DRIVER_ENV) && e.contains("kernel"), "{e}");
    }

    #[test]
    fn without_dev_zfs_the_cli_driver_is_chosen_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("zfs");
        let d = Driver::select(Selection::Auto, &absent).unwrap();
        assert_eq!(d.label(), "zfs (cli)");
        let reason = d.reason();
        eprintln!("{}: {reason}", d.label());
        assert!(
            reason.contains(&absent.display().to_string()) && reason.contains("does not exist"),
            "{reason}"
        );
        // This machine's own choice, as the agent makes it (no kernel ZFS here).
        if !Path::new(DEV_ZFS).exists() && std::env::var_os(DRIVER_ENV).is_none() {
            let d = driver().as_ref().unwrap();
            assert_eq!((d.label(), driver_label()), ("zfs (cli)", "zfs (cli)"));
            assert!(d.reason().contains(DEV_ZFS), "{}", d.reason());
        }
    }

    #[test]
    fn a_forced_libzetta_without_dev_zfs_fails_naming_it() {
        if Path::new(DEV_ZFS).exists() {
            eprintln!("skipped: {DEV_ZFS} exists here, libzetta can start");
            return;
        }
        // The real libzfs_core_init, which finds no /dev/zfs: an error, not a panic.
        let e = Driver::select(Selection::Libzetta, Path::new(DEV_ZFS)).unwrap_err();
        eprintln!("{e}");
        assert!(
            e.contains(DEV_ZFS) && e.contains(DRIVER_ENV) && e.contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn a_libzetta_rollback_removes_only_the_later_snapshots_of_the_dataset() {
        let listed: Vec<std::path::PathBuf> = [
            "tank/v1@a",
            "tank/v1@b",
            "tank/v1/child@c",
            "tank/v1@c",
            "tank/v10@d",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let later = libzetta::later_snapshots(&listed, "tank/v1", "tank/v1@a");
        assert_eq!(later, [Path::new("tank/v1@b"), Path::new("tank/v1@c")]);
        assert!(libzetta::later_snapshots(&listed, "tank/v1", "tank/v1@c").is_empty());
        assert!(libzetta::later_snapshots(&listed, "tank/v1", "tank/v1@gone").is_empty());
    }

    #[test]
    fn a_snapshot_name_gives_its_dataset() {
        assert_eq!(dataset_of("tank/v1@x"), "tank/v1");
        assert_eq!(dataset_of("tank/v1"), "tank/v1");
    }
}

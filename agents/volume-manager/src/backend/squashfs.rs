//! squashfs + overlayfs restore mode for directory volumes. The volume is an overlayfs mounted at
//! its path: the lower layer is the squashfs image it was last restored from (mounted read-only
//! through a loop device; an empty directory before the first restore), the upper and work
//! directories sit beside it under `<volumes>/.overlay/<name>/`.
//!
//! - snapshot: a new squashfs image of the merged view (what the app sees), built under a
//!   `.partial` name and renamed when complete;
//! - restore: unmount, drop the upper layer (renamed aside, deleted after the remount), hard-link
//!   the snapshot image as the new base, mount again. Every step can be repeated, so an
//!   interrupted restore is finished by running it again;
//! - the mounts outlive the agent: at start an existing overlay is adopted, a missing one is
//!   mounted again ([`activate`]);
//! - loop devices are made by `mount -o loop` with autoclear, so unmounting the lower layer frees
//!   its device; delete also detaches any device still backed by the volume's own base image.

// File work: its blocking calls run on the blocking pool (`blocking`, `spawn_blocking`).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{
    CloneTarget, SnapshotBackend, ToolSpec, VolumeRef, blocking, partial, remove_file, remove_tree,
    snapshot_path,
};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT};

pub const TOOL: &str = "mksquashfs";
pub const PACKAGE: &str = "squashfs-tools";

/// In a restore, after the upper layer is dropped and before the new base is in place.
pub const CRASH_AFTER_UPPER_DROPPED: &str = "volume-manager:squashfs-after-upper-dropped";

/// Building an image reads the whole tree: allow for large volumes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, Default)]
pub struct SquashfsBackend;

/// The files of one squashfs-overlay volume.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<volumes>/.overlay/<name>`.
    pub state: PathBuf,
    /// The image the lower layer comes from (absent before the first restore).
    pub base: PathBuf,
    /// Where `base` is mounted.
    pub lower: PathBuf,
    /// The lower layer while there is no base.
    pub empty: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// The layout of the volume at `volume` (its mount point).
pub fn layout(volume: &Path) -> Layout {
    let parent = volume.parent().unwrap_or(Path::new("/"));
    let name = volume.file_name().unwrap_or_default();
    let state = parent.join(".overlay").join(name);
    Layout {
        base: state.join("base.sqfs"),
        lower: state.join("lower"),
        empty: state.join("empty"),
        upper: state.join("upper"),
        work: state.join("work"),
        state,
    }
}

/// Whether the volume at `volume` is (or was) a squashfs-overlay volume.
pub fn has_state(volume: &Path) -> bool {
    layout(volume).state.is_dir()
}

/// The filesystem type mounted at `path`, if `path` is a mount point (the top mount).
pub fn mounted_type(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in text.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        if Path::new(&unescape(point)) == path {
            found = right.split(' ').next().map(str::to_string);
        }
    }
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the kernel has filesystem `name` (from `/proc/filesystems`).
pub fn kernel_has(name: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|text| {
            text.lines()
                .any(|line| line.split_whitespace().last() == Some(name))
        })
        .unwrap_or(false)
}

/// Why this kernel cannot serve the mode, if it cannot.
pub fn kernel_missing() -> Option<String> {
    let missing: Vec<&str> = ["overlay", "squashfs"]
        .into_iter()
        .filter(|fs| !kernel_has(fs))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the kernel has no {} filesystem (not in /proc/filesystems; load the module with modprobe)",
            missing.join(" and no ")
        )
    })
}

fn command_error(volume: &str, source: process::CommandError) -> VolumeError {
    if source.stderr().to_lowercase().contains("no space left") {
        VolumeError::NoSpace {
            volume: volume.to_string(),
            path: PathBuf::new(),
            detail: source.stderr().to_string(),
        }
    } else {
        VolumeError::Command {
            volume: volume.to_string(),
            source,
        }
    }
}

async fn run(volume: &str, program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    process::run(program, args, COMMAND_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| command_error(volume, e))
}

/// Unmounts `path` if something is mounted there; a busy mount is an error naming the volume.
async fn unmount(volume: &str, path: &Path) -> Result<()> {
    if mounted_type(path).is_none() {
        return Ok(());
    }
    process::run("umount", &[path.as_os_str()], COMMAND_TIMEOUT)
        .await
        .map(drop)
        .map_err(|source| {
            if source.stderr().contains("busy") {
                VolumeError::Unsupported {
                    volume: volume.to_string(),
                    what: format!(
                        "{} is in use (a process has files open in it); stop the app first",
                        path.display()
                    ),
                }
            } else {
                command_error(volume, source)
            }
        })
}

/// overlayfs option values: `,`, `:` and `\` are escaped with a backslash.
fn option_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn mkdirs(volume: &str, dirs: &[&Path]) -> Result<()> {
    for dir in dirs {
        std::fs::create_dir_all(dir).map_err(VolumeError::io(volume, "cannot create", *dir))?;
    }
    Ok(())
}

/// Moves what a plain directory at `from` holds into `to` (entry by entry, so an interrupted
/// move is finished by the next one).
fn move_entries(volume: &str, from: &Path, to: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(VolumeError::io(volume, "cannot read", from))?;
    for entry in entries {
        let entry = entry.map_err(VolumeError::io(volume, "cannot read", from))?;
        let target = to.join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(VolumeError::io(
            volume,
            "cannot move into the upper layer",
            &target,
        ))?;
    }
    Ok(())
}

/// Makes the volume at `volume` an overlay: its state directories, then its mounts. An overlay
/// already mounted is adopted. Content found in the unmounted mount point (a volume made in
/// another mode) becomes the upper layer, so nothing is hidden under the mount.
pub async fn activate(key: &str, volume: &Path) -> Result<()> {
    let l = layout(volume);
    if mounted_type(volume).as_deref() == Some("overlay") {
        tracing::debug!(volume = key, "overlay already mounted: adopted");
        return Ok(());
    }
    let (k, lay, point) = (key.to_string(), l.clone(), volume.to_path_buf());
    let has_base = blocking(key, move || {
        mkdirs(&k, &[&point, &lay.lower, &lay.empty, &lay.upper, &lay.work])?;
        move_entries(&k, &point, &lay.upper)?;
        Ok(lay.base.is_file())
    })
    .await?;
    let lowerdir = if has_base {
        if mounted_type(&l.lower).is_none() {
            run(
                key,
                "mount",
                &[
                    "-t".as_ref(),
                    "squashfs".as_ref(),
                    "-o".as_ref(),
                    "loop,ro".as_ref(),
                    l.base.as_os_str(),
                    l.lower.as_os_str(),
                ],
            )
            .await?;
        }
        &l.lower
    } else {
        &l.empty
    };
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        option_path(lowerdir),
        option_path(&l.upper),
        option_path(&l.work)
    );
    run(
        key,
        "mount",
        &[
            "-t".as_ref(),
            "overlay".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            "overlay".as_ref(),
            volume.as_os_str(),
        ],
    )
    .await?;
    tracing::info!(volume = key, lower = %lowerdir.display(), "overlay mounted");
    Ok(())
}

/// Loop devices backed by `image` (`losetup -j`): only the volume's own base image is asked
/// about, so no other device is ever touched.
async fn loop_devices_of(key: &str, image: &Path) -> Result<Vec<String>> {
    if !super::exists_blocking(image).await {
        return Ok(Vec::new());
    }
    let out = process::run(
        "losetup",
        &["-j".as_ref(), image.as_os_str()],
        COMMAND_TIMEOUT,
    )
    .await
    .map_err(|e| command_error(key, e))?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|line| line.split(':').next())
        .filter(|dev| !dev.is_empty())
        .map(str::to_string)
        .collect())
}

/// Unmounts the overlay and its lower layer (freeing the loop device).
pub async fn deactivate(key: &str, volume: &Path) -> Result<()> {
    let l = layout(volume);
    unmount(key, volume).await?;
    unmount(key, &l.lower).await?;
    for device in loop_devices_of(key, &l.base).await? {
        tracing::warn!(
            volume = key,
            device,
            "detaching a loop device left on the base image"
        );
        run(key, "losetup", &["-d".as_ref(), device.as_ref()]).await?;
    }
    Ok(())
}

/// Removes a squashfs-overlay volume: mounts, loop devices, layers and the mount point.
pub async fn remove_volume(key: &str, volume: &Path) -> Result<()> {
    deactivate(key, volume).await?;
    let l = layout(volume);
    let (k, state, point) = (key.to_string(), l.state.clone(), volume.to_path_buf());
    blocking(key, move || {
        remove_tree(&k, &state)?;
        match std::fs::remove_dir(&point) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(VolumeError::io(&k, "cannot remove", &point)(e))
            }
            _ => Ok(()),
        }
    })
    .await
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Empties `dir` by renaming it aside and removing the old one (a crash leaves either the old
/// directory or an empty new one, plus a leftover that the next call removes).
fn empty_dir(key: &str, dir: &Path) -> Result<()> {
    let aside = dir.with_extension("drop");
    remove_tree(key, &aside)?;
    if dir.exists() {
        std::fs::rename(dir, &aside).map_err(VolumeError::io(key, "cannot rename", dir))?;
    }
    std::fs::create_dir(dir).map_err(VolumeError::io(key, "cannot create", dir))?;
    remove_tree(key, &aside)
}

/// Where a dropped upper layer waits for its removal: `<volumes>/.<name>.<nanos>.rollback`, a
/// leftover the start-up sweep removes if the agent stops before it is gone.
fn trash_path(volume: &Path) -> PathBuf {
    let name = volume
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    volume.with_file_name(format!(".{name}.{nanos}.rollback"))
}

/// Replaces the upper layer with an empty one at once: the old one is renamed to `trash` and
/// returned, to be removed once the volume is mounted again (a restore does not wait for the
/// deletion of everything written since). Removed here when it cannot be renamed there.
fn drop_upper(key: &str, upper: &Path, trash: &Path) -> Result<Option<PathBuf>> {
    let empty = std::fs::read_dir(upper)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(true);
    if empty {
        std::fs::create_dir_all(upper).map_err(VolumeError::io(key, "cannot create", upper))?;
        return Ok(None);
    }
    if std::fs::rename(upper, trash).is_err() {
        empty_dir(key, upper)?;
        return Ok(None);
    }
    std::fs::create_dir(upper).map_err(VolumeError::io(key, "cannot create", upper))?;
    Ok(Some(trash.to_path_buf()))
}

/// Makes `base` the same image as `snapshot`: a hard link (images are never written), or a copy
/// where the two are on different filesystems; placed with a rename.
fn link_base(key: &str, snapshot: &Path, base: &Path) -> Result<()> {
    let tmp = base.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(snapshot, &tmp).is_err() {
        std::fs::copy(snapshot, &tmp).map_err(VolumeError::io(key, "cannot copy to", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(VolumeError::io(key, "cannot sync", &tmp))?;
    }
    std::fs::rename(&tmp, base).map_err(VolumeError::io(key, "cannot rename to", base))?;
    super::sync_parent(key, base)
}

impl SnapshotBackend for SquashfsBackend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Squashfs
    }

    fn name(&self) -> &'static str {
        "squashfs_overlay"
    }

    /// A snapshot is an image file, outside the volume.
    fn snapshot_outside_volume(&self) -> bool {
        true
    }

    fn tool(&self) -> Option<ToolSpec> {
        Some(ToolSpec {
            name: TOOL,
            package: PACKAGE,
            probe: &["-version"],
        })
    }

    fn host_missing(&self, _volumes: &Path) -> Option<String> {
        kernel_missing()
    }

    fn owns(&self, path: &Path) -> bool {
        has_state(path)
    }

    async fn remove(&self, key: &str, path: &Path) -> Result<()> {
        remove_volume(key, path).await
    }

    async fn activate(&self, key: &str, path: &Path) -> Result<()> {
        activate(key, path).await
    }

    /// Makes the directory volume and unpacks the snapshot's image into it.
    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        if target.image_format().is_some() {
            return Err(target.mismatch(source));
        }
        let from = &source.snapshot_location;
        let f = from.clone();
        if !tokio::task::spawn_blocking(move || f.is_file())
            .await
            .unwrap_or(false)
        {
            return Err(VolumeError::NoSnapshot {
                volume: target.key.to_string(),
                snapshot: from.display().to_string(),
            });
        }
        if target
            .backends
            .tools
            .usable(SnapshotBackendKind::Squashfs)
            .is_err()
        {
            return Err(VolumeError::ToolMissing {
                volume: target.key.to_string(),
                tool: "unsquashfs",
                package: PACKAGE,
                backend: self.name(),
            });
        }
        target.make_dir().await?;
        let args: [&std::ffi::OsStr; 6] = [
            "-f".as_ref(),
            "-q".as_ref(),
            "-n".as_ref(),
            "-d".as_ref(),
            target.path.as_os_str(),
            from.as_os_str(),
        ];
        process::run("unsquashfs", &args, COMMAND_TIMEOUT * 30)
            .await
            .map(drop)
            .map_err(|source| VolumeError::Command {
                volume: target.key.to_string(),
                source,
            })
    }

    /// `<volumes>/.snapshots/<key>/<name>.sqfs`.
    fn snapshot_location(&self, volume: &VolumeRef, name: &str) -> PathBuf {
        snapshot_path(volume, &format!("{name}.sqfs"))
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
        if !there {
            // The image is of the merged view: never of a bare mount point.
            activate(key, &volume.path).await?;
            let tmp = partial(&meta.snapshot_location);
            let (k, t, location) = (key.clone(), tmp.clone(), meta.snapshot_location.clone());
            blocking(key, move || {
                remove_file(&k, &t)?;
                super::ensure_parent(&k, &location)
            })
            .await?;
            let built = process::run(
                TOOL,
                &[
                    volume.path.as_os_str(),
                    tmp.as_os_str(),
                    "-noappend".as_ref(),
                    "-no-progress".as_ref(),
                    "-quiet".as_ref(),
                    "-comp".as_ref(),
                    "lz4".as_ref(),
                ],
                BUILD_TIMEOUT,
            )
            .await;
            if let Err(e) = built {
                let (k, t) = (key.clone(), tmp.clone());
                let _ = blocking(key, move || remove_file(&k, &t)).await;
                return Err(command_error(key, e));
            }
            let (k, location) = (key.clone(), meta.snapshot_location.clone());
            blocking(key, move || {
                let file =
                    std::fs::File::open(&tmp).map_err(VolumeError::io(&k, "cannot open", &tmp))?;
                file.sync_all()
                    .map_err(VolumeError::io(&k, "cannot sync", &tmp))?;
                std::fs::rename(&tmp, &location).map_err(VolumeError::io(
                    &k,
                    "cannot rename to",
                    &location,
                ))?;
                // A failed fsync is an error: the record must not say made before it is.
                super::sync_parent(&k, &location)
            })
            .await?;
        }
        let location = meta.snapshot_location.clone();
        meta.size = blocking(key, move || Ok(file_size(&location))).await?;
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        let key = &meta.volume_key;
        if !self.exists(meta).await? {
            return Err(VolumeError::NoSnapshot {
                volume: key.clone(),
                snapshot: meta.name.clone(),
            });
        }
        let volume = &meta.file_location;
        let l = layout(volume);
        deactivate(key, volume).await?;
        let (k, snap, lay, point) = (
            key.clone(),
            meta.snapshot_location.clone(),
            l.clone(),
            volume.clone(),
        );
        let trash = trash_path(volume);
        let dropped = blocking(key, move || {
            mkdirs(&k, &[&point, &lay.lower, &lay.empty])?;
            // Upper first: a crash here leaves the previous base alone, a consistent state.
            let dropped = drop_upper(&k, &lay.upper, &trash)?;
            empty_dir(&k, &lay.work)?;
            cairn_persist::crash_point(CRASH_AFTER_UPPER_DROPPED);
            link_base(&k, &snap, &lay.base)?;
            Ok(dropped)
        })
        .await?;
        let mounted = activate(key, volume).await;
        if let Some(trash) = dropped {
            let key = key.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&trash) {
                    tracing::warn!(volume = key, path = %trash.display(), "cannot remove the dropped upper layer (removed at the next start): {e}");
                }
            });
        }
        mounted
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        // The volume's base is a link of its own: deleting the snapshot leaves it standing.
        let (k, location) = (meta.volume_key.clone(), meta.snapshot_location.clone());
        blocking(&meta.volume_key, move || {
            remove_file(&k, &partial(&location))?;
            remove_file(&k, &location)
        })
        .await
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        let location = meta.snapshot_location.clone();
        blocking(&meta.volume_key, move || Ok(location.is_file())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn overlay_options_escape_separators() {
        assert_eq!(option_path(Path::new("/a,b:c")), r"/a\,b\:c");
    }
}

//! The restore mode a directory volume asks for (`VolumeConfig::restore_mode`): which backend
//! serves it, and the fail-fast check made when the volume is created, so a missing tool or
//! kernel feature is reported then, not at the first restore.

use std::path::Path;

use cairn_types::volume::{DirRestoreMode, SnapshotBackendKind, VolumeConfig, VolumeFormat};

use super::Backends;
use crate::error::{Result, VolumeError};

/// The mode as the config spells it.
pub fn name(mode: DirRestoreMode) -> &'static str {
    match mode {
        DirRestoreMode::Auto => "auto",
        DirRestoreMode::BtrfsSwap => "btrfs_swap",
        DirRestoreMode::SquashfsOverlay => "squashfs_overlay",
        DirRestoreMode::Rsync => "rsync",
        DirRestoreMode::Copy => "copy",
    }
}

/// The backend an explicit mode asks for (`None` for `Auto`: chosen from the filesystem).
pub fn kind(mode: DirRestoreMode) -> Option<SnapshotBackendKind> {
    match mode {
        DirRestoreMode::Auto => None,
        DirRestoreMode::BtrfsSwap => Some(SnapshotBackendKind::Btrfs),
        DirRestoreMode::SquashfsOverlay => Some(SnapshotBackendKind::Squashfs),
        DirRestoreMode::Rsync => Some(SnapshotBackendKind::Rsync),
        DirRestoreMode::Copy => Some(SnapshotBackendKind::Copy),
    }
}

/// Refuses a volume whose restore mode cannot work here, naming the mode, the missing command
/// and its Debian package, or the missing kernel feature, or the wrong filesystem.
pub fn check(config: &VolumeConfig, volumes: &Path, backends: &Backends) -> Result<()> {
    let mode = config.restore_mode;
    if mode == DirRestoreMode::Auto {
        return Ok(());
    }
    let refuse = |what: String| {
        Err(VolumeError::Unsupported {
            volume: config.key(),
            what: format!("restore mode {} cannot be used: {what}", name(mode)),
        })
    };
    if config.format != VolumeFormat::Dir {
        return refuse(format!(
            "it applies to directory volumes only, and this volume is {:?}; drop the restore mode",
            config.format
        ));
    }
    if config.purgeable {
        return refuse(
            "a purgeable volume's snapshots keep the whole volume; drop the restore mode or purgeable"
                .into(),
        );
    }
    match kind(mode).and_then(|kind| backends.host_missing(kind, volumes)) {
        Some(why) => refuse(why),
        None => Ok(()),
    }
}

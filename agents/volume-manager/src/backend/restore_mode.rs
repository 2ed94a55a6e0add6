//! The restore mode a directory volume asks for (`VolumeConfig::restore_mode`): which backend
//! serves it, and the fail-fast check made when the volume is created, so a missing tool or
//! kernel feature is reported then, not at the first restore.

use std::path::Path;

use cairn_types::volume::{DirRestoreMode, SnapshotBackendKind, VolumeConfig, VolumeFormat};

use super::{btrfs, squashfs};
use crate::error::{Result, VolumeError};
use crate::tools::{Tool, Tools};

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
pub fn check(config: &VolumeConfig, volumes: &Path, tools: &Tools) -> Result<()> {
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
    let tool_missing = |tool: &Tool| -> Result<()> {
        match &tool.available {
            Ok(()) => Ok(()),
            Err(reason) => refuse(reason.clone()),
        }
    };
    match mode {
        DirRestoreMode::Auto | DirRestoreMode::Copy => Ok(()),
        DirRestoreMode::BtrfsSwap => {
            tool_missing(&tools.btrfs)?;
            if btrfs::is_btrfs(super::nearest_existing(volumes)) {
                Ok(())
            } else {
                refuse(format!(
                    "it needs the volumes directory {} on btrfs, and it is on {}; use rsync, squashfs_overlay or copy",
                    volumes.display(),
                    super::fs_name(super::nearest_existing(volumes))
                ))
            }
        }
        DirRestoreMode::SquashfsOverlay => {
            tool_missing(&tools.squashfs)?;
            match squashfs::kernel_missing() {
                Some(why) => refuse(why),
                None => Ok(()),
            }
        }
        DirRestoreMode::Rsync => tool_missing(&tools.rsync),
    }
}

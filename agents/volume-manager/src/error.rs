//! The volume-manager's errors. Each names the volume or snapshot and says what to do.

use std::path::PathBuf;

use uuid::Uuid;

use crate::process::CommandError;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "volume {volume}: {tool} is not installed (install the Debian package {package}); the {backend} backend is disabled"
    )]
    ToolMissing {
        volume: String,
        tool: &'static str,
        package: &'static str,
        backend: &'static str,
    },
    #[error("volume {volume}: {source}")]
    Command {
        volume: String,
        #[source]
        source: CommandError,
    },
    #[error("volume {volume}: image {} is in use by a running VM (qemu holds its write lock); stop the app before snapshotting, rolling back or deleting: {detail}", file.display())]
    Locked {
        volume: String,
        file: PathBuf,
        detail: String,
    },
    #[error("volume {volume}: {what}")]
    Unsupported { volume: String, what: String },
    #[error("{source}; the image {} was checked and its refcounts repaired (`qemu-img check -r leaks`): it is consistent, retry when the cause is fixed", file.display())]
    Repaired {
        file: PathBuf,
        source: Box<VolumeError>,
    },
    #[error("{source}; the image {} could not be checked afterwards ({check}): run `qemu-img check -r leaks` on it once the disk is sound", file.display())]
    Unchecked {
        file: PathBuf,
        check: String,
        source: Box<VolumeError>,
    },
    #[error("volume {volume}: {source}")]
    Image {
        volume: String,
        #[source]
        source: crate::image::ImageError,
    },
    #[error("volume {volume}: image {} is corrupt ({detail}); restore it from a snapshot or purge the volume", file.display())]
    Corrupt {
        volume: String,
        file: PathBuf,
        detail: String,
    },
    #[error("volume {volume}: {} is missing (deleted outside Cairn?); purge the volume to recreate it", path.display())]
    Missing { volume: String, path: PathBuf },
    #[error("volume {volume}: base image {} has sha256 {actual}, expected {expected}; fetch the image again", path.display())]
    Sha256Mismatch {
        volume: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("volume {volume}: no space left on the device holding {}; free space and retry ({detail})", path.display())]
    NoSpace {
        volume: String,
        path: PathBuf,
        detail: String,
    },
    #[error("volume {volume}: {what} {}: {source}", path.display())]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {volume}: no volume with this id is configured; check the app's volume list")]
    UnknownVolume { volume: Uuid },
    #[error(
        "volume {volume}: generation {key} is not on this device (purged and released?); a snapshot of it cannot be made"
    )]
    UnknownGeneration { volume: Uuid, key: String },
    #[error(
        "volume {volume}: snapshot {snapshot} does not exist on the backend; it cannot be rolled back to"
    )]
    NoSnapshot { volume: String, snapshot: String },
    #[error(
        "volume {volume}: cannot be cloned from volume {source_volume} in snapshot {snapshot}: {why}; the clone is made when that snapshot is available"
    )]
    CloneSourceUnavailable {
        volume: String,
        snapshot: Uuid,
        source_volume: Uuid,
        why: String,
    },
    /// Not a failure: the volume waits for its content (reported as Creating with this text).
    #[error("volume {volume}: waiting for content tree {tree}: {state}")]
    ContentNotReady {
        volume: String,
        tree: Uuid,
        state: String,
    },
    #[error(
        "volume {volume}: its content cannot be had: {why}; the volume is made once content tree {tree} is LOADED"
    )]
    ContentFailed {
        volume: String,
        tree: Uuid,
        why: String,
    },
    /// The config-agent accepted the volume but says why it cannot be made (a fault of the
    /// controller in this one object); it stays Failed until the config changes.
    #[error("volume {volume} cannot be made: {why}")]
    Unusable { volume: String, why: String },
}

impl VolumeError {
    pub fn io(
        volume: impl ToString,
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let volume = volume.to_string();
        let path = path.into();
        move |source| {
            if source.raw_os_error() == Some(nix::libc::ENOSPC) {
                Self::NoSpace {
                    volume,
                    path,
                    detail: source.to_string(),
                }
            } else {
                Self::Io {
                    volume,
                    what,
                    path,
                    source,
                }
            }
        }
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

//! Fail fast at startup: each backend checks its tool once. A missing tool disables its backend
//! with a message naming the Debian package; it never crashes the agent.

use std::time::Duration;

use crate::backend;
use crate::process;

/// Whether a backend's tool is there; `Err` holds the message for the status.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    pub available: Result<(), String>,
}

impl Tool {
    async fn probe(name: &'static str, package: &'static str, args: &[&str]) -> Self {
        let available = process::run(name, args, Duration::from_secs(10))
            .await
            .map(drop)
            .map_err(|e| {
                format!("{name} is not usable ({e}); install the Debian package {package}")
            });
        if let Err(reason) = &available {
            tracing::error!(tool = name, package, "backend disabled: {reason}");
        }
        Self {
            name,
            package,
            available,
        }
    }

    /// A tool known to be missing (tests).
    pub fn missing(name: &'static str, package: &'static str) -> Self {
        Self {
            name,
            package,
            available: Err(format!(
                "{name} is not installed; install the Debian package {package}"
            )),
        }
    }

    pub fn is_available(&self) -> bool {
        self.available.is_ok()
    }
}

/// The tools of all backends.
#[derive(Debug, Clone)]
pub struct Tools {
    pub qemu_img: Tool,
    pub btrfs: Tool,
    pub zfs: Tool,
    /// mksquashfs: the squashfs_overlay restore mode.
    pub squashfs: Tool,
    /// rsync: the rsync restore mode.
    pub rsync: Tool,
}

impl Tools {
    pub async fn detect() -> Self {
        let zfs = if cfg!(feature = "zfs") {
            Tool::probe("zfs", "zfsutils-linux (or zfs-fuse)", &["list", "-H"]).await
        } else {
            Tool::missing("zfs", "zfsutils-linux; and build with --features zfs")
        };
        Self {
            qemu_img: Tool::probe(
                backend::qcow2::TOOL,
                backend::qcow2::PACKAGE,
                &["--version"],
            )
            .await,
            btrfs: Tool::probe(
                backend::btrfs::TOOL,
                backend::btrfs::PACKAGE,
                &["--version"],
            )
            .await,
            zfs,
            squashfs: Tool::probe(
                backend::squashfs::TOOL,
                backend::squashfs::PACKAGE,
                &["-version"],
            )
            .await,
            rsync: Tool::probe(
                backend::rsync::TOOL,
                backend::rsync::PACKAGE,
                &["--version"],
            )
            .await,
        }
    }
}

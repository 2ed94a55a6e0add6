//! qcow2 internal snapshots through `qemu-img snapshot -c/-a/-d/-l`, only while no VM holds the
//! image (qemu's write lock makes `qemu-img` fail, reported as [`VolumeError::Locked`]).
//! qemu-img accepts duplicate tags, so `create` lists first and adopts an existing snapshot.

use std::path::Path;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};

use super::{CloneTarget, SnapshotBackend, ToolSpec, VolumeRef, exists_blocking};
use crate::error::{Result, VolumeError};
use crate::process::{self, COMMAND_TIMEOUT, CommandError};

pub const TOOL: &str = "qemu-img";
pub const PACKAGE: &str = "qemu-utils";

#[derive(Debug, Clone, Default)]
pub struct Qcow2Backend;

/// Turns a qemu-img failure into what it means for the volume.
pub fn classify(volume: &str, file: &Path, err: CommandError) -> VolumeError {
    let stderr = err.stderr().to_string();
    let lower = stderr.to_lowercase();
    if snapshot_missing(&stderr) {
        VolumeError::Command {
            volume: volume.to_string(),
            source: err,
        }
    } else if lower.contains("\"write\" lock")
        || lower.contains("\"read\" lock")
        || lower.contains("lock") && lower.contains("another process")
    {
        VolumeError::Locked {
            volume: volume.to_string(),
            file: file.to_path_buf(),
            detail: stderr,
        }
    } else if lower.contains("no space left") {
        VolumeError::NoSpace {
            volume: volume.to_string(),
            path: file.to_path_buf(),
            detail: stderr,
        }
    } else if lower.contains("no such file") {
        VolumeError::Missing {
            volume: volume.to_string(),
            path: file.to_path_buf(),
        }
    } else if lower.contains("not in qcow2 format")
        || lower.contains("corrupt")
        || lower.contains("unsupported qcow2 version")
        || lower.contains("image is not in")
        || lower.contains("invalid")
    {
        VolumeError::Corrupt {
            volume: volume.to_string(),
            file: file.to_path_buf(),
            detail: stderr,
        }
    } else {
        VolumeError::Command {
            volume: volume.to_string(),
            source: err,
        }
    }
}

fn is_not_found(e: &VolumeError) -> bool {
    matches!(e, VolumeError::Command { source, .. } if snapshot_missing(source.stderr()))
}

/// qemu-img's words for "no snapshot of that name": `-d` says "snapshot not found", `-a` says
/// "Failed to load snapshot" with ENOENT; an I/O error under `-a` says it with its own errno.
fn snapshot_missing(stderr: &str) -> bool {
    stderr.contains("snapshot not found")
        || stderr.contains("Failed to load snapshot: No such file or directory")
}

/// The tags in `qemu-img snapshot -l` output.
pub fn parse_list(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|line| !line.starts_with("ID"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Runs qemu-img on the image `file` of volume `volume`.
pub async fn run_qemu_img(volume: &str, file: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    process::run(TOOL, args, COMMAND_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| classify(volume, file, e))
}

/// The snapshot tags of `file` (read with `-U`, so it works while a VM runs).
pub async fn list(volume: &str, file: &Path) -> Result<Vec<String>> {
    if !exists_blocking(file).await {
        return Err(VolumeError::Missing {
            volume: volume.to_string(),
            path: file.to_path_buf(),
        });
    }
    let out = process::run(
        TOOL,
        &[
            "snapshot".as_ref(),
            "-l".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )
    .await
    .map_err(|e| classify(volume, file, e))?;
    Ok(parse_list(&out.stdout))
}

async fn snapshot_op(volume: &str, op: &str, name: &str, file: &Path) -> Result<()> {
    let failed = match raw_snapshot_op(volume, op, name, file).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    // Refused before any write: nothing to repair.
    if is_not_found(&failed)
        || matches!(
            failed,
            VolumeError::Locked { .. } | VolumeError::Missing { .. } | VolumeError::Corrupt { .. }
        )
    {
        return Err(failed);
    }
    Err(repair(volume, file, failed).await)
}

/// A snapshot create, apply or delete that fails half-way (an I/O error or a full disk under
/// a metadata write) leaves refcounts raised for a snapshot never recorded, or clusters of a
/// removed one still counted: `qemu-img check` then finds leaks and OFLAG_COPIED errors, and
/// further writes could corrupt data. `check -r leaks` sets the refcounts to what the tables
/// reference (what qemu-iotests do after blkdebug errors), before anything writes again.
async fn repair(volume: &str, file: &Path, failed: VolumeError) -> VolumeError {
    match check_repairing_leaks(file).await {
        Ok(_) => {
            tracing::warn!(volume, file = %file.display(), "qcow2 refcounts repaired after a failed snapshot operation: {failed}");
            VolumeError::Repaired {
                file: file.to_path_buf(),
                source: Box::new(failed),
            }
        }
        // Corruption leak repair cannot mend: the volume is unusable as it is.
        Err(e) if unrepairable(&e) => VolumeError::Corrupt {
            volume: volume.to_string(),
            file: file.to_path_buf(),
            detail: format!("{failed}; then `qemu-img check -r leaks` could not repair it: {e}"),
        },
        // The check itself failed (the same full or failing disk): nothing known either way.
        Err(e) => VolumeError::Unchecked {
            file: file.to_path_buf(),
            check: e.to_string(),
            source: Box::new(failed),
        },
    }
}

/// A writer stopped half-way (a power cut or a SIGKILL under `qemu-img snapshot`, a VM's qemu
/// killed while it allocated) leaves clusters counted that no table references: qemu runs on
/// with them, but their space is lost and `qemu-img check` is no longer clean, and nothing
/// later would mend them. So an existing image is checked and its leaks repaired when the
/// agent takes it up, before an app is started on it. An image a running VM holds (the agent
/// restarted under it) is that VM's to write: left alone. A check that cannot run (a
/// read-only or failing disk) is said and the volume used as it is: leaks cost space, not data.
/// Corruption that leak repair cannot mend refuses the volume, naming the image.
pub async fn mend_leaks(volume: &str, file: &Path) -> Result<()> {
    match check_repairing_leaks(file).await {
        Ok(out) => {
            let fixed = leaks_fixed(&out.stdout);
            if fixed > 0 {
                tracing::warn!(volume, file = %file.display(), clusters = fixed, "repaired leaked qcow2 clusters an unclean stop left (`qemu-img check -r leaks`)");
            }
            Ok(())
        }
        Err(e) if unrepairable(&e) => Err(VolumeError::Corrupt {
            volume: volume.to_string(),
            file: file.to_path_buf(),
            detail: format!("`qemu-img check -r leaks` found corruption it cannot repair: {e}"),
        }),
        Err(e) => {
            match classify(volume, file, e) {
                VolumeError::Locked { .. } => {}
                other => {
                    tracing::warn!(volume, file = %file.display(), "the image could not be checked for leaked clusters; used as it is: {other}")
                }
            }
            Ok(())
        }
    }
}

/// `qemu-img check -r leaks` of `file`, its report as JSON.
async fn check_repairing_leaks(file: &Path) -> std::result::Result<process::Output, CommandError> {
    process::run(
        TOOL,
        &[
            "check".as_ref(),
            "-r".as_ref(),
            "leaks".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )
    .await
}

/// Exit 2 of `qemu-img check`: corruption that leak repair cannot mend.
fn unrepairable(e: &CommandError) -> bool {
    matches!(e, CommandError::Failed { status, .. } if status.contains("exit status: 2"))
}

/// The `leaks-fixed` count of `qemu-img check --output=json`; 0 when absent.
fn leaks_fixed(json: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("leaks-fixed").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

async fn raw_snapshot_op(volume: &str, op: &str, name: &str, file: &Path) -> Result<()> {
    process::run(
        TOOL,
        &[
            "snapshot".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            op.as_ref(),
            name.as_ref(),
            file.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )
    .await
    .map(drop)
    .map_err(|e| classify(volume, file, e))
}

impl SnapshotBackend for Qcow2Backend {
    fn kind(&self) -> SnapshotBackendKind {
        SnapshotBackendKind::Qcow2
    }

    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn tool(&self) -> Option<ToolSpec> {
        Some(ToolSpec {
            name: TOOL,
            package: PACKAGE,
            probe: &["--version"],
        })
    }

    fn live(&self) -> bool {
        true // through the domain-manager: the VM's own block layer
    }

    fn live_taken_by_hypervisor(&self) -> bool {
        true
    }

    /// An existing image is mended before anything starts it: see [`mend_leaks`].
    async fn activate(&self, key: &str, path: &Path) -> Result<()> {
        mend_leaks(key, path).await
    }

    /// Records the internal snapshot `name` the domain-manager took of a running VM's disk.
    /// The VM holds the image's write lock, so nothing is written: the tag is looked up
    /// read-only (`-l -U`) and must be there.
    async fn adopt_live(&self, volume: &VolumeRef, name: &str) -> Result<VolumeSnapshotMeta> {
        if !list(&volume.key, &volume.path)
            .await?
            .iter()
            .any(|tag| tag == name)
        {
            return Err(VolumeError::Unsupported {
                volume: volume.key.clone(),
                what: format!(
                    "the live snapshot {name} is not in {} (the domain-manager did not take it): nothing recorded",
                    volume.path.display()
                ),
            });
        }
        tracing::info!(volume = %volume.key, snapshot = name, "live qcow2 snapshot recorded");
        Ok(self.plan(volume, name))
    }

    /// `qemu-img convert -U -f qcow2 -O <format> -l snapshot.name=<S>` (`-U`: the source may
    /// be in use by its running VM; an internal snapshot's clusters do not change while it
    /// exists).
    async fn clone_to(&self, source: &VolumeSnapshotMeta, target: &CloneTarget<'_>) -> Result<()> {
        let Some(fmt) = target.image_format() else {
            return Err(target.mismatch(source));
        };
        target.backends.check_image_tool(target.key)?;
        let snapshot_option = format!("snapshot.name={}", source.name);
        run_qemu_img(
            target.key,
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
                target.path.as_os_str(),
            ],
        )
        .await
    }

    async fn create(
        &self,
        volume: &VolumeRef,
        name: &str,
        fresh: bool,
    ) -> Result<VolumeSnapshotMeta> {
        // Listing costs a command: a fresh request cannot find its snapshot there.
        let (meta, there) = super::create_preamble(self, volume, name, !fresh).await?;
        if !there {
            snapshot_op(&volume.key, "-c", name, &volume.path).await?;
        }
        Ok(meta)
    }

    async fn rollback(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if !exists_blocking(&meta.file_location).await {
            return Err(VolumeError::Missing {
                volume: meta.volume_key.clone(),
                path: meta.file_location.clone(),
            });
        }
        match snapshot_op(&meta.volume_key, "-a", &meta.name, &meta.file_location).await {
            Err(e) if is_not_found(&e) => Err(VolumeError::NoSnapshot {
                volume: meta.volume_key.clone(),
                snapshot: meta.name.clone(),
            }),
            other => other,
        }
    }

    async fn delete(&self, meta: &VolumeSnapshotMeta) -> Result<()> {
        if !exists_blocking(&meta.file_location).await {
            return Ok(()); // the volume went, and its internal snapshots with it
        }
        // One `-d`: Cairn never makes duplicate tags (it looks before creating unless fresh).
        match snapshot_op(&meta.volume_key, "-d", &meta.name, &meta.file_location).await {
            Err(e) if is_not_found(&e) => Ok(()),
            // qemu drops the tag from the table first and frees its clusters after: a failure
            // in between (repaired above) still removed the snapshot, so its record must go.
            Err(e @ (VolumeError::Repaired { .. } | VolumeError::Unchecked { .. })) => {
                match self.exists(meta).await {
                    Ok(false) => {
                        tracing::warn!(volume = %meta.volume_key, snapshot = %meta.name, "the snapshot was removed although qemu-img failed after it: {e}");
                        Ok(())
                    }
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    async fn exists(&self, meta: &VolumeSnapshotMeta) -> Result<bool> {
        Ok(list(&meta.volume_key, &meta.file_location)
            .await?
            .contains(&meta.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output_yields_the_tags() {
        let out = "Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n1         3f0c            0 B 2026-11-24 08:46:01 00:00:00.000          0\n2         b               0 B 2026-11-24 08:46:01 00:00:00.000          0\n";
        assert_eq!(parse_list(out), vec!["3f0c", "b"]);
        assert!(parse_list("").is_empty());
    }

    #[test]
    fn the_write_lock_error_is_reported_as_a_running_vm() {
        let err = CommandError::Failed {
            command: "qemu-img snapshot".into(),
            status: "exit status: 1".into(),
            stderr: "qemu-img: Could not open 't.qcow2': Failed to get \"write\" lock\nIs another process using the image [t.qcow2]?".into(),
        };
        let e = classify("v#0", Path::new("t.qcow2"), err);
        assert!(matches!(e, VolumeError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("stop the app"));
    }

    #[test]
    fn an_io_error_while_applying_is_not_a_missing_snapshot() {
        assert!(snapshot_missing(
            "qemu-img: Could not apply snapshot 'x': Failed to load snapshot: No such file or directory"
        ));
        assert!(snapshot_missing(
            "qemu-img: Could not delete snapshot 'x': snapshot not found"
        ));
        assert!(!snapshot_missing(
            "qemu-img: Could not apply snapshot 'x': Failed to load snapshot: Input/output error"
        ));
    }
}

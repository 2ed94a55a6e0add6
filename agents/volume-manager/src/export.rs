//! Exports of snapshots to a target directory, their verification, and the change tracking that
//! makes incremental exports possible.
//!
//! An export is a directory `<target>/<app>-<snapshot>-<time>/` with one zstd-compressed qcow2
//! per volume and `manifest.json` (sha256 of every file, the app config, the chain link). It is
//! written as `<name>.partial/`, fsynced, the manifest last, then renamed: a directory without
//! the suffix is always complete. A job record (`<persist>/volume-manager/exports/<job>.json`) is
//! written before the partial directory is made, so a restart removes what a killed job left.
//!
//! An export to a remote (issue 22, `cairn-objstore`) writes the same files under
//! `<remote prefix>/<REMOTE-PREFIX>/<app>-<snapshot>-<time>/`: each volume file is made in a
//! spool directory, uploaded as a multipart upload (its id in the job record first) and removed,
//! the manifest is put last: an export without its manifest is never complete. A restart settles
//! a remote job record once the remote's config arrives: finished if the manifest is there,
//! else its uploads aborted and its objects deleted, reported either way.
//!
//! Change tracking: a persistent qcow2 dirty bitmap `cairn-<snapshot>` on the volume records
//! every cluster written after that snapshot. A full export of snapshot S starts tracking (adds
//! `cairn-S`) when the volume still equals S; from then on every qemu-img snapshot of the volume
//! gets its own bitmap. An incremental export of S2 over a previous export of S reads only the
//! clusters `cairn-S` marks, from S2's state (`qemu-nbd -l S2 -B cairn-S`), into a qcow2 whose
//! backing file is the previous export. qemu refuses to apply an internal snapshot while the
//! image has bitmaps, so a rollback drops them and restarts tracking at the snapshot rolled back
//! to. A bitmap that is missing or `in-use` (a VM running, or one that crashed before storing it)
//! makes the export full, and the status and manifest say why.

pub mod bitmap;
pub mod import;
mod job;
pub mod restore;
pub mod retention;
pub mod tree;
pub mod verify;

pub use job::{ExportJobs, JobSource};
pub use retention::CRASH_MID_RETENTION;
pub use verify::{VerifyError, verify_export};

/// Crash point: after the first volume file of an export is written, before the manifest.
pub const CRASH_MID_EXPORT: &str = "volume-manager:mid-export";
/// Crash point: an export to a remote, after the first part of a volume file's multipart
/// upload is sent, before the upload is completed.
pub const CRASH_MID_UPLOAD: &str = "volume-manager:mid-upload";

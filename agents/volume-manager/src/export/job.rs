//! Export and verify jobs: each runs in its own tokio task beside the manager's work, reports
//! progress through a channel (at most every [`PROGRESS_EVERY`]), and is cancelled through a
//! watch flag (its qemu processes die with it: `kill_on_drop`).

// File work: its blocking calls run on the blocking pool (`blocking`, `spawn_blocking`).
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cairn_objstore::{Remote, join_key};
use cairn_types::RemoteConfig;
use cairn_types::app::AppInstanceConfig;
use cairn_types::export::{
    ExportAction, ExportBase, ExportConfig, ExportContent, ExportJobRecord, ExportKind,
    ExportManifest, ExportState, ExportStatus, ExportVolumeResult, MANIFEST_FILE, MANIFEST_FORMAT,
    ManifestVolume, PARTIAL_SUFFIX, RemoteUpload,
};
use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, snapshot_dir};
use cairn_types::snapshot::{VolumesSnapshotAction, VolumesSnapshotStatus};
use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::bitmap;
use super::tree;
use super::verify::{self, VerifyError};

/// Progress is published at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// A target with less free space than this is refused before anything is written.
const MIN_FREE: u64 = 16 << 20;
/// Dirty extents closer than this are read as one (fewer qemu-img runs, a little more data).
const MERGE_GAP: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long a `qemu-nbd` may take to serve (a loaded device starts it in well under a second).
const NBD_START: Duration = Duration::from_secs(30);

/// What the manager knows about the snapshot an export job names.
#[derive(Debug, Clone, Default)]
pub struct JobSource {
    pub record: Option<VolumesSnapshotStatus>,
    /// Display names of the volumes, by id.
    pub volume_names: BTreeMap<Uuid, String>,
    /// The remote the job names, when it is configured.
    pub remote: Option<RemoteConfig>,
}

/// An export being written to a remote: the volume files pass one at a time through a spool
/// directory (`partial`) on their way up; `dir` is the export's key under the remote's prefix.
struct RemoteTarget {
    remote: Remote,
    dir: String,
    record: ExportJobRecord,
    record_path: PathBuf,
    /// Empty stand-ins for base exports' volume files (an incremental qcow2 opens its backing
    /// file; the data written over it never reads from it), removed when the job ends.
    placeholders: Vec<PathBuf>,
}

impl RemoteTarget {
    fn shown(&self) -> String {
        format!("{}:{}", self.remote.id, self.remote.full_key(&self.dir))
    }

    /// Removes what the export put in the bucket: its multipart uploads aborted, its objects
    /// deleted. Returns (objects deleted, uploads aborted).
    async fn remove(&self) -> Result<(usize, usize), cairn_objstore::RemoteError> {
        remove_remote_partial(&self.remote, &self.record).await
    }
}

async fn remove_remote_partial(
    remote: &Remote,
    record: &ExportJobRecord,
) -> Result<(usize, usize), cairn_objstore::RemoteError> {
    for upload in &record.uploads {
        remote.abort_upload(&upload.key, &upload.upload_id).await?;
    }
    let deleted = remote.delete_under(&record.remote_dir).await?;
    Ok((deleted, record.uploads.len()))
}

/// The jobs of this process and the outcomes of finished ones (a job runs at most once per id).
pub struct ExportJobs {
    persist: PathBuf,
    running: HashMap<Uuid, watch::Sender<bool>>,
    finished: HashMap<Uuid, ExportStatus>,
    tx: mpsc::UnboundedSender<ExportStatus>,
    /// Remote exports a previous process left unfinished, waiting for their remote's config to
    /// be checked and cleaned up.
    interrupted_remote: Vec<ExportJobRecord>,
    /// Jobs of those being settled now.
    settling: std::collections::HashSet<Uuid>,
}

/// The directory remote exports' volume files pass through.
fn spool_dir(persist: &Path) -> PathBuf {
    jobs_dir(persist).join("spool")
}

fn jobs_dir(persist: &Path) -> PathBuf {
    persist.join("volume-manager").join("exports")
}

fn job_record_path(persist: &Path, job: Uuid) -> PathBuf {
    jobs_dir(persist).join(format!("{job}.json"))
}

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    /// A standing request for a snapshot older than the app's newest export: not exported.
    #[error("{0}")]
    Superseded(String),
}

impl ExportJobs {
    /// Removes what jobs killed with a previous process left (their partial directories) and
    /// returns their Failed statuses, to publish.
    pub async fn open(persist: &Path) -> (Self, mpsc::UnboundedReceiver<ExportStatus>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let dir = jobs_dir(persist);
        let spool = spool_dir(persist);
        let (interrupted, interrupted_remote) = tokio::task::spawn_blocking(move || {
            let swept = sweep_interrupted(&dir);
            // No job runs yet: whatever is spooled was left by a killed one.
            let _ = std::fs::remove_dir_all(&spool);
            swept
        })
        .await
        .unwrap_or_default();
        let mut jobs = Self {
            persist: persist.to_path_buf(),
            running: HashMap::new(),
            finished: HashMap::new(),
            tx,
            interrupted_remote,
            settling: Default::default(),
        };
        for status in interrupted {
            jobs.finished.insert(status.job_id, status.clone());
            let _ = jobs.tx.send(status);
        }
        (jobs, rx)
    }

    /// An `ExportConfig` create or modify: starts the job, or cancels it.
    pub fn handle_config(&mut self, config: ExportConfig, source: JobSource) {
        if let Some(cancel) = self.running.get(&config.job_id) {
            if config.cancel {
                tracing::info!(job = %config.job_id, "export cancel requested");
                let _ = cancel.send(true);
            }
            return;
        }
        // A job a restart interrupted runs no more: it is reported once settled.
        if self.finished.contains_key(&config.job_id)
            || self.settling.contains(&config.job_id)
            || self
                .interrupted_remote
                .iter()
                .any(|r| r.job_id == config.job_id)
        {
            return;
        }
        if config.cancel {
            let status = ExportStatus {
                job_id: config.job_id,
                action: config.action,
                snapshot_id: config.snapshot_id,
                app_uuid: config.app_uuid,
                state: ExportState::Cancelled,
                error: "cancelled before it started".into(),
                ..ExportStatus::default()
            };
            self.finished.insert(config.job_id, status.clone());
            let _ = self.tx.send(status);
            return;
        }
        let (cancel_tx, cancel_rx) = watch::channel(false);
        self.running.insert(config.job_id, cancel_tx);
        let tx = self.tx.clone();
        let persist = self.persist.clone();
        tracing::info!(job = %config.job_id, action = ?config.action, snapshot = %config.snapshot_id, target = %config.target_dir.display(), incremental = config.incremental, "export job started");
        tokio::spawn(async move {
            let status = run_job(&persist, config, source, cancel_rx, tx.clone()).await;
            let _ = tx.send(status);
        });
    }

    /// The request is gone: a running job is cancelled.
    pub fn handle_config_delete(&mut self, job: &str) {
        if let Ok(id) = job.parse::<Uuid>()
            && let Some(cancel) = self.running.get(&id)
        {
            tracing::info!(job = %id, "export request withdrawn: cancelling");
            let _ = cancel.send(true);
        }
    }

    /// Notes a status the bus is about to publish; a final one ends the job (and gets its
    /// end time).
    pub fn note(&mut self, status: &mut ExportStatus) {
        if status.state != ExportState::Running {
            status.finished.get_or_insert_with(chrono::Utc::now);
            self.running.remove(&status.job_id);
            self.settling.remove(&status.job_id);
            tracing::info!(job = %status.job_id, state = ?status.state, dir = %status.export_dir.display(), error = %status.error, "export job ended");
            self.finished.insert(status.job_id, status.clone());
        }
    }

    pub fn is_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// The statuses a previous process published (the bus kept them): their jobs ended and
    /// are not run again when their requests, still in force, come again.
    pub fn remember(&mut self, statuses: impl IntoIterator<Item = ExportStatus>) {
        for status in statuses {
            if status.state != ExportState::Running {
                self.finished.entry(status.job_id).or_insert(status);
            }
        }
    }

    /// A remote's config (new or changed): exports to it a previous process left unfinished
    /// are settled now, in tasks: complete (the manifest is there) or removed from the bucket.
    pub fn handle_remote(&mut self, config: &RemoteConfig) {
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.interrupted_remote)
            .into_iter()
            .partition(|r| r.remote == config.id);
        self.interrupted_remote = others;
        for record in mine {
            self.settling.insert(record.job_id);
            let tx = self.tx.clone();
            let persist = self.persist.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let _ = tx.send(settle_interrupted(&persist, &config, record).await);
            });
        }
    }
}

/// An export to a remote interrupted by a restart: finished if its manifest made it (the commit
/// point), else its objects and multipart uploads are removed. The record goes once settled;
/// when the remote cannot be used now it stays for the next start, and the status says so.
async fn settle_interrupted(
    persist: &Path,
    config: &RemoteConfig,
    record: ExportJobRecord,
) -> ExportStatus {
    let mut status = ExportStatus {
        job_id: record.job_id,
        state: ExportState::Failed,
        ..ExportStatus::default()
    };
    let remote = match Remote::open(config, persist).await {
        Ok(remote) => remote,
        Err(e) => {
            status.error = format!(
                "interrupted: the volume-manager stopped during the export; its unfinished export under {} is removed once the remote can be used: {e}",
                record.remote_dir
            );
            return status;
        }
    };
    let shown = format!("{}:{}", remote.id, remote.full_key(&record.remote_dir));
    let manifest = join_key(&[&record.remote_dir, MANIFEST_FILE]);
    let outcome = match remote.exists(&manifest).await {
        Ok(true) => {
            tracing::info!(job = %record.job_id, export = %shown, "export to a remote finished before the restart");
            status.state = ExportState::Done;
            status.remote_export = shown.clone();
            Ok(())
        }
        Ok(false) => match remove_remote_partial(&remote, &record).await {
            Ok((objects, uploads)) => {
                tracing::warn!(job = %record.job_id, export = %shown, objects, uploads, "export to a remote interrupted by a restart: removed");
                status.error = format!(
                    "interrupted: the volume-manager stopped during the export; the unfinished export {shown} was removed ({objects} objects deleted, {uploads} multipart uploads aborted)"
                );
                Ok(())
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::warn!(job = %record.job_id, export = %shown, "an interrupted export to a remote could not be settled: {e}");
        status.error = format!(
            "interrupted: the volume-manager stopped during the export; the unfinished export {shown} could not be removed yet (retried at the next start): {e}"
        );
        return status;
    }
    let path = job_record_path(persist, record.job_id);
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    status
}

/// The Failed statuses of local exports a previous process left (their partial directories
/// removed), and the records of remote ones (their spooled files removed; the bucket is
/// cleaned once the remote's config is known).
fn sweep_interrupted(dir: &Path) -> (Vec<ExportStatus>, Vec<ExportJobRecord>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (Vec::new(), Vec::new());
    };
    let mut out = Vec::new();
    let mut remote = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json")
            || path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        match cairn_persist::load::<ExportJobRecord>(&path) {
            Ok(loaded) => {
                let record = loaded.record;
                let removed = remove_partial(&record.partial_dir);
                if !record.remote.is_empty() {
                    remote.push(record);
                    continue;
                }
                tracing::warn!(job = %record.job_id, partial = %record.partial_dir.display(), "export interrupted by a restart: partial export removed");
                out.push(ExportStatus {
                    job_id: record.job_id,
                    state: ExportState::Failed,
                    error: format!(
                        "interrupted: the volume-manager stopped during the export; the unfinished {} was {}",
                        record.partial_dir.display(),
                        if removed { "removed" } else { "not found" }
                    ),
                    ..ExportStatus::default()
                });
            }
            Err(e) => {
                tracing::error!(path = %path.display(), "export job record unusable: {e}");
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    (out, remote)
}

fn remove_partial(dir: &Path) -> bool {
    // Only ever a `.partial` directory: never anything that looks complete.
    if !dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(PARTIAL_SUFFIX))
    {
        return false;
    }
    std::fs::remove_dir_all(dir).is_ok()
}

/// Publishes progress at most every [`PROGRESS_EVERY`].
struct Progress {
    status: ExportStatus,
    tx: mpsc::UnboundedSender<ExportStatus>,
    last: Option<Instant>,
}

impl Progress {
    fn set(&mut self, done: u64) {
        self.status.bytes_done = done.min(self.status.bytes_total);
        self.publish();
    }

    fn uploaded(&mut self, bytes: u64) {
        self.status.bytes_uploaded = bytes;
        self.publish();
    }

    fn publish(&mut self) {
        if self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            self.last = Some(Instant::now());
            let _ = self.tx.send(self.status.clone());
        }
    }
}

async fn run_job(
    persist: &Path,
    config: ExportConfig,
    source: JobSource,
    mut cancel: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<ExportStatus>,
) -> ExportStatus {
    let mut progress = Progress {
        status: ExportStatus {
            job_id: config.job_id,
            action: config.action,
            snapshot_id: config.snapshot_id,
            app_uuid: config.app_uuid,
            state: ExportState::Running,
            ..ExportStatus::default()
        },
        tx,
        last: None,
    };
    let _ = progress.tx.send(progress.status.clone());
    let mut partial: Option<PathBuf> = None;
    let mut remote: Option<RemoteTarget> = None;
    let outcome = {
        let work = async {
            match config.action {
                ExportAction::Export => {
                    export(
                        persist,
                        &config,
                        &source,
                        &mut progress,
                        &mut partial,
                        &mut remote,
                    )
                    .await
                }
                ExportAction::Verify => verify_job(&config, &mut progress).await.map(|()| None),
            }
        };
        tokio::select! {
            result = work => result,
            _ = cancel.wait_for(|c| *c) => Err(JobError::Cancelled),
        }
    };
    if let Some(target) = &remote {
        let dirs = target.placeholders.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
        .await;
    }
    let outcome = match (outcome, partial.take()) {
        (Ok(Some(_)), Some(dir)) if remote.is_some() => {
            // The manifest is in the bucket: the export is complete; only the spool goes.
            let record = job_record_path(persist, config.job_id);
            let _ = tokio::task::spawn_blocking(move || {
                remove_partial(&dir);
                let _ = std::fs::remove_file(record);
            })
            .await;
            progress.status.remote_export =
                remote.as_ref().map(RemoteTarget::shown).unwrap_or_default();
            if let Some(target) = &remote {
                keep_exports(persist, &config, &target.remote, &mut progress.status).await;
            }
            Ok(())
        }
        (Ok(Some(final_dir)), Some(dir)) => {
            match finish(persist, config.job_id, dir.clone(), final_dir.clone()).await {
                Ok(()) => {
                    progress.status.export_dir = final_dir;
                    Ok(())
                }
                Err(e) => {
                    partial = Some(dir);
                    Err(e)
                }
            }
        }
        (result, dir) => {
            partial = dir;
            result.map(drop)
        }
    };
    let mut status = progress.status.clone();
    match outcome {
        Ok(()) => status.state = ExportState::Done,
        Err(e) => {
            status.state = match e {
                JobError::Cancelled | JobError::Superseded(_) => ExportState::Cancelled,
                _ => ExportState::Failed,
            };
            status.error = e.to_string();
            status.export_dir = PathBuf::new();
            let mut keep_record = false;
            if let Some(target) = remote.take() {
                match target.remove().await {
                    Ok((objects, uploads)) => {
                        tracing::info!(job = %config.job_id, export = %target.shown(), objects, uploads, "unfinished export removed from the remote");
                    }
                    Err(e) => {
                        // The record stays: the next start removes it.
                        keep_record = true;
                        status.error = format!(
                            "{}; the unfinished export {} could not be removed now (it is at the next start): {e}",
                            status.error,
                            target.shown()
                        );
                    }
                }
            }
            if let Some(dir) = partial {
                let record = job_record_path(persist, config.job_id);
                let _ = tokio::task::spawn_blocking(move || {
                    remove_partial(&dir);
                    if !keep_record {
                        let _ = std::fs::remove_file(record);
                    }
                })
                .await;
            }
        }
    }
    status
}

async fn verify_job(config: &ExportConfig, progress: &mut Progress) -> Result<(), JobError> {
    let dir = config.target_dir.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = tokio::task::spawn_blocking(move || {
        verify::verify_export(&dir, &mut |done, total| {
            let _ = tx.send((done, total));
            stop_rx.try_recv().is_err()
        })
    });
    // Stops the blocking read when this future is dropped (cancel).
    struct Stop(std::sync::mpsc::Sender<()>);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let _stop = Stop(stop_tx);
    while let Some((done, total)) = rx.recv().await {
        progress.status.bytes_total = total;
        progress.set(done);
    }
    let result = handle
        .await
        .map_err(|e| JobError::Failed(format!("verify task: {e}")))?;
    match result {
        Ok((manifest, total)) => {
            progress.status.bytes_total = total;
            progress.status.bytes_done = total;
            progress.status.export_dir = config.target_dir.clone();
            progress.status.volumes = manifest
                .volumes
                .iter()
                .map(|v| ExportVolumeResult {
                    volume_id: v.volume_id,
                    file: v.file.clone(),
                    kind: v.kind,
                    size: 0,
                    data_bytes: v.virtual_size,
                    fallback_reason: v.fallback_reason.clone(),
                })
                .collect();
            Ok(())
        }
        Err(VerifyError::Cancelled) => Err(JobError::Cancelled),
        Err(e) => Err(JobError::Failed(format!("verify failed: {e}"))),
    }
}

/// One volume to export.
struct Plan {
    meta: VolumeSnapshotMeta,
    volume_id: Uuid,
    name: String,
    virtual_size: u64,
    /// The base link for an incremental export, or why there is none.
    base: Result<BaseLink, String>,
    /// A directory volume: its snapshot's tree, exported as a tar.
    tree: Option<PathBuf>,
}

fn refuse(text: String) -> JobError {
    JobError::Refused(text)
}

async fn export(
    persist: &Path,
    config: &ExportConfig,
    source: &JobSource,
    progress: &mut Progress,
    partial: &mut Option<PathBuf>,
    remote_target: &mut Option<RemoteTarget>,
) -> Result<Option<PathBuf>, JobError> {
    let snapshot = config.snapshot_id;
    let record = source.record.as_ref().ok_or_else(|| {
        refuse(format!(
            "snapshot {snapshot} is not available on this device (not taken yet, or deleted)"
        ))
    })?;
    if record.is_in_progress() {
        return Err(refuse(format!(
            "snapshot {snapshot} is not available: it is being {}",
            if record.in_progress == VolumesSnapshotAction::Delete {
                "deleted"
            } else {
                "taken or rolled back"
            }
        )));
    }
    if record.result_of_action == VolumesSnapshotAction::Create && record.error.is_error() {
        return Err(refuse(format!(
            "snapshot {snapshot} is not available: it failed ({})",
            record.error.error
        )));
    }
    // An export to a remote: checked first (credentials, bucket), its files spooled locally
    // one volume at a time on their way up.
    let remote = if config.remote.is_empty() {
        None
    } else {
        Some(open_remote(persist, config, source).await?)
    };
    let spool;
    let target = match &remote {
        Some(_) => {
            spool = spool_dir(persist);
            tokio::fs::create_dir_all(&spool).await.map_err(|e| {
                JobError::Failed(format!("creating the spool {}: {e}", spool.display()))
            })?;
            &spool
        }
        None => &config.target_dir,
    };
    match tokio::fs::metadata(target).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(refuse(format!(
                "target {} is not a directory",
                target.display()
            )));
        }
        Err(e) => {
            return Err(refuse(format!(
                "target {} cannot be used: {e}",
                target.display()
            )));
        }
    }
    let free = nix::sys::statvfs::statvfs(target)
        .map(|s| s.blocks_available() * s.fragment_size())
        .map_err(|e| {
            refuse(format!(
                "target {}: cannot read its free space: {e}",
                target.display()
            ))
        })?;
    if free < MIN_FREE {
        return Err(refuse(format!(
            "target {} is full: {free} bytes free, at least {MIN_FREE} needed",
            target.display()
        )));
    }
    let app = record.app_uuid;
    if !config.app_uuid.is_nil() && config.app_uuid != app {
        return Err(refuse(format!(
            "snapshot {snapshot} belongs to app {app}, not to app {}",
            config.app_uuid
        )));
    }
    progress.status.app_uuid = app;
    let saved = load_app_config(persist, snapshot).await?;
    let app_name = saved
        .as_ref()
        .map(|c| c.display_name.clone())
        .unwrap_or_default();
    let snapshot_name = saved
        .as_ref()
        .and_then(|c| {
            c.snapshot
                .snapshots
                .iter()
                .find(|s| s.snapshot_id == snapshot)
        })
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let app_config = match &saved {
        Some(c) => serde_json::to_value(c)
            .map_err(|e| JobError::Failed(format!("encoding the app config: {e}")))?,
        None => serde_json::Value::Null,
    };
    let snapshot_time = record.time_created;

    // A request that stays in force, replayed after a restart: done if its export is there.
    if let (true, Some(remote)) = (config.once, &remote) {
        let listed = super::retention::list(remote, &config.remote_prefix, app)
            .await
            .map_err(JobError::Failed)?;
        if let Some(done) = listed
            .iter()
            .find(|l| l.complete.is_some() && l.snapshot == snapshot)
        {
            let key = join_key(&[&config.remote_prefix, &done.dir]);
            progress.status.remote_export = format!("{}:{}", remote.id, remote.full_key(&key));
            tracing::info!(job = %config.job_id, export = %progress.status.remote_export, "snapshot already exported: nothing to write");
            // A retention a kill interrupted after the export is finished now.
            keep_exports(persist, config, remote, &mut progress.status).await;
            return Ok(None);
        }
        // Its export may be gone by retention (a schedule's request published again after a
        // reboot): an export of a newer snapshot is there, so this one is not made again.
        if let Some(newer) = listed.iter().find(|l| {
            l.complete.is_some()
                && matches!((l.snapshot_time, snapshot_time), (Some(t), Some(mine)) if t > mine)
        }) {
            return Err(JobError::Superseded(format!(
                "not exported: snapshot {snapshot} is older than the export {} already at {} (a request kept in force is not made again once a newer export is there)",
                newer.dir,
                remote.full_key(&config.remote_prefix)
            )));
        }
    }

    // Leftovers of this app's interrupted jobs on this target go first (only this app's: a
    // share may hold other devices' exports in progress).
    let target_clone = target.clone();
    let _ = tokio::task::spawn_blocking(move || sweep_partials(&target_clone, app)).await;

    // The base for an incremental export: the newest complete export of this app in the target
    // made from an older snapshot.
    let base = if let (true, Some(remote)) = (config.incremental, &remote) {
        find_base_remote(remote, &config.remote_prefix, app, snapshot, snapshot_time)
            .await
            .map(|(dir, manifest, sha)| (target.join(dir), manifest, sha))
    } else if config.incremental {
        let target = target.clone();
        let time = snapshot_time;
        tokio::task::spawn_blocking(move || find_base(&target, app, snapshot, time))
            .await
            .unwrap_or_else(|e| Err(format!("looking for a base export: {e}")))
    } else {
        Err(String::new())
    };
    // A full export every `full_every`: the base's chain is long enough already.
    let base = match (base, &remote) {
        (Ok((dir, manifest, sha)), Some(remote)) if config.full_every > 0 => {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            super::retention::check_chain(
                remote,
                &config.remote_prefix,
                &name,
                &manifest,
                config.full_every,
            )
            .await
            .map(|()| (dir, manifest, sha))
        }
        (base, _) => base,
    };

    let mut plans = Vec::new();
    for (volume_id, value) in &record.volume_snapshot_meta {
        let meta = VolumeSnapshotMeta::from_value(value);
        let name = source
            .volume_names
            .get(volume_id)
            .cloned()
            .unwrap_or_default();
        if meta.backend != SnapshotBackendKind::Qcow2 {
            // A directory volume whose snapshot is a plain tree (copy, btrfs, rsync, a kept
            // pre-purge directory): exported whole as a tar.
            let root = meta.snapshot_location.clone();
            let is_tree = tokio::fs::symlink_metadata(&root)
                .await
                .is_ok_and(|m| m.is_dir());
            if !is_tree {
                return Err(refuse(format!(
                    "volume {volume_id} ({name}) of snapshot {snapshot}: export of {:?} snapshots is not supported yet (qcow2 images, and directory snapshots kept as trees: copy, btrfs, rsync)",
                    meta.backend
                )));
            }
            let counted = root.clone();
            let size = tokio::task::spawn_blocking(move || tree::data_bytes(&counted))
                .await
                .unwrap_or(0);
            plans.push(Plan {
                meta,
                volume_id: *volume_id,
                name,
                virtual_size: size,
                base: Err("a directory volume is exported whole".into()),
                tree: Some(root),
            });
            continue;
        }
        let info = bitmap::info(&meta.file_location).await.map_err(|e| {
            refuse(format!(
                "volume {volume_id} ({name}): {} cannot be read: {e}",
                meta.file_location.display()
            ))
        })?;
        let plan_base = match &base {
            Err(why) => Err(why.clone()),
            Ok((dir, manifest, sha)) => {
                incremental_base(&meta, &info, *volume_id, dir, manifest, sha)
            }
        };
        plans.push(Plan {
            meta,
            volume_id: *volume_id,
            name,
            virtual_size: info.virtual_size,
            base: plan_base,
            tree: None,
        });
    }
    if plans.is_empty() {
        return Err(refuse(format!(
            "snapshot {snapshot} has no volume to export"
        )));
    }

    let stamp = chrono::Utc::now();
    let dir_name = format!("{app}-{snapshot}-{}", stamp.format("%Y%m%dT%H%M%S%.3fZ"));
    let final_dir = target.join(&dir_name);
    let partial_dir = target.join(format!("{dir_name}{PARTIAL_SUFFIX}"));
    // Intent first: a killed job's partial directory is found and removed at the next start.
    let remote_dir = join_key(&[&config.remote_prefix, &dir_name]);
    let job_record = ExportJobRecord {
        job_id: config.job_id,
        partial_dir: partial_dir.clone(),
        started: Some(stamp),
        remote: config.remote.clone(),
        remote_dir: if remote.is_some() {
            remote_dir.clone()
        } else {
            String::new()
        },
        uploads: Vec::new(),
    };
    let record_path = job_record_path(persist, config.job_id);
    store_job_record(&record_path, &job_record).await?;
    if let Some(remote) = remote {
        *remote_target = Some(RemoteTarget {
            remote,
            dir: remote_dir,
            record: job_record,
            record_path: record_path.clone(),
            placeholders: Vec::new(),
        });
    }
    tokio::fs::create_dir(&partial_dir)
        .await
        .map_err(|e| JobError::Failed(format!("creating {}: {e}", partial_dir.display())))?;
    *partial = Some(partial_dir.clone());

    // Totals: full volumes by virtual size, incremental ones by their changed extents.
    let mut extents: Vec<Option<Vec<(u64, u64)>>> = Vec::new();
    let mut nbd: Vec<Option<Nbd>> = Vec::new();
    for plan in &mut plans {
        if let Ok(base) = &plan.base {
            let bitmap_name = bitmap::name(&base.snapshot.to_string());
            match Nbd::start(&plan.meta, Some(&bitmap_name)).await {
                Ok(server) => match server.dirty_extents(&bitmap_name, plan.virtual_size).await {
                    Ok(found) => {
                        extents.push(Some(found));
                        nbd.push(Some(server));
                        continue;
                    }
                    Err(e) => plan.base = Err(e),
                },
                Err(e) => plan.base = Err(format!("{e}: a full export instead")),
            }
        }
        extents.push(None);
        nbd.push(None);
    }
    progress.status.bytes_total = plans
        .iter()
        .zip(&extents)
        .map(|(p, e)| match e {
            Some(list) => list.iter().map(|(_, l)| l).sum(),
            None => p.virtual_size,
        })
        .sum();
    progress.set(0);

    let mut manifest_volumes = Vec::new();
    let mut done = 0u64;
    for ((plan, found), server) in plans.iter().zip(extents).zip(nbd) {
        let file = match plan.tree {
            Some(_) => format!("{}{}", plan.volume_id, tree::TREE_SUFFIX),
            None => format!("{}.qcow2", plan.volume_id),
        };
        let out = partial_dir.join(&file);
        let fail = |what: String| {
            JobError::Failed(format!("volume {} ({}): {what}", plan.volume_id, plan.name))
        };
        let fallback_reason = if config.incremental {
            match &plan.base {
                Err(why) => why.clone(),
                Ok(_) => String::new(),
            }
        } else {
            String::new()
        };
        let began = std::time::Instant::now();
        let (kind, base, data_bytes) = match (found, server, &plan.base) {
            (Some(list), Some(server), Ok(base)) => {
                let backing = Path::new("..").join(&base.link.dir).join(&base.file);
                if let Some(target) = remote_target.as_mut() {
                    let stand_in = partial_dir.join(&backing);
                    create_placeholder(&stand_in, plan.virtual_size)
                        .await
                        .map_err(&fail)?;
                    if let Some(dir) = stand_in.parent() {
                        target.placeholders.push(dir.to_path_buf());
                    }
                }
                create_overlay(&out, &backing, plan.virtual_size)
                    .await
                    .map_err(&fail)?;
                let mut copied = 0u64;
                for (offset, len) in &list {
                    server
                        .copy_extent(&out, *offset, *len)
                        .await
                        .map_err(&fail)?;
                    copied += len;
                    progress.set(done + copied);
                }
                drop(server);
                (ExportKind::Incremental, Some(base.link.clone()), copied)
            }
            _ if plan.tree.is_some() => {
                let root = plan.tree.clone().unwrap_or_default();
                write_tree(&root, &out, progress, done)
                    .await
                    .map_err(&fail)?;
                (ExportKind::Full, None, plan.virtual_size)
            }
            _ => {
                let base_done = done;
                convert_full(&plan.meta, &out, &mut |fraction| {
                    progress.set(base_done + (fraction * plan.virtual_size as f64) as u64)
                })
                .await
                .map_err(&fail)?;
                (ExportKind::Full, None, plan.virtual_size)
            }
        };
        done += data_bytes;
        progress.set(done);
        let written = began.elapsed();
        let (sha, size) = if let Some(target) = remote_target.as_mut() {
            // Hashed as it goes up, no fsync: a spooled file is removed once sent, and what
            // a crash leaves in the spool is swept at start.
            upload_volume(target, &out, &file, progress)
                .await
                .map_err(&fail)?
        } else {
            let file_path = out.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
                let out = file_path;
                let f = std::fs::File::open(&out)?;
                let size = f.metadata()?.len();
                // qemu-img writes without a flush: this fsync makes the file durable while the
                // hash reads it from the page cache, instead of after.
                std::thread::scope(|scope| {
                    let synced = scope.spawn(|| f.sync_all());
                    let sha = verify::sha256_file(&out, &mut |_| true);
                    synced
                        .join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked")))?;
                    Ok((sha?, size))
                })
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("reading back {}: {e}", out.display())))?
        };
        if kind == ExportKind::Full && config.incremental {
            progress.status.fell_back_to_full = true;
        }
        progress.status.volumes.push(ExportVolumeResult {
            volume_id: plan.volume_id,
            file: file.clone(),
            kind,
            size,
            data_bytes,
            fallback_reason: fallback_reason.clone(),
        });
        manifest_volumes.push(ManifestVolume {
            volume_id: plan.volume_id,
            display_name: plan.name.clone(),
            file: file.clone(),
            virtual_size: plan.virtual_size,
            sha256: sha,
            kind,
            base,
            fallback_reason,
            content: if plan.tree.is_some() {
                ExportContent::Tree
            } else {
                ExportContent::Qcow2
            },
        });
        let hashed = began.elapsed();
        cairn_persist::crash_point(super::CRASH_MID_EXPORT);
        // Tracking starts at this snapshot if the volume still equals it.
        if kind == ExportKind::Full && plan.tree.is_none() {
            start_tracking(&plan.meta).await;
        }
        tracing::info!(
            volume = %plan.volume_id,
            ?kind,
            write_ms = written.as_millis() as u64,
            // To a remote: the upload, which hashes as it reads; to a directory: hash + fsync.
            hash_or_upload_ms = (hashed - written).as_millis() as u64,
            tracking_ms = (began.elapsed() - hashed).as_millis() as u64,
            "volume exported"
        );
    }

    let manifest = ExportManifest {
        format: MANIFEST_FORMAT,
        app_uuid: app,
        app_name,
        snapshot_id: snapshot,
        snapshot_name,
        snapshot_time,
        export_time: Some(stamp),
        app_config,
        volumes: manifest_volumes,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| JobError::Failed(format!("encoding the manifest: {e}")))?;
    // The snapshot was read with force-share: had it been deleted meanwhile, what was read
    // cannot be trusted. Deleted snapshots never come back under the same name.
    for plan in &plans {
        if let Some(root) = &plan.tree {
            if tokio::fs::symlink_metadata(root).await.is_err() {
                return Err(JobError::Failed(format!(
                    "volume {} ({}): snapshot {snapshot} was deleted during the export",
                    plan.volume_id, plan.name
                )));
            }
            continue;
        }
        let tags = crate::backend::image_snapshots(&plan.meta.volume_key, &plan.meta.file_location)
            .await
            .map_err(|e| JobError::Failed(e.to_string()))?;
        if !tags.contains(&plan.meta.name) {
            return Err(JobError::Failed(format!(
                "volume {} ({}): snapshot {snapshot} was deleted during the export",
                plan.volume_id, plan.name
            )));
        }
    }
    if let Some(target) = remote_target.as_ref() {
        // The commit point: a listing shows an export only once its manifest is there.
        target
            .remote
            .put(&join_key(&[&target.dir, MANIFEST_FILE]), text)
            .await
            .map_err(|e| JobError::Failed(format!("writing the manifest: {e}")))?;
    } else {
        let partial_dir = partial_dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            write_synced(&partial_dir.join(MANIFEST_FILE), &text)?;
            std::fs::File::open(&partial_dir)?.sync_all()
        })
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?
        .map_err(|e| JobError::Failed(format!("writing the manifest: {e}")))?;
    }
    progress.status.bytes_done = progress.status.bytes_total;
    Ok(Some(final_dir))
}

/// Writes the tree `root` as a zstd tar into `out` on the blocking pool, reporting progress
/// from `base_done`; stopped when this future is dropped (cancel).
async fn write_tree(
    root: &Path,
    out: &Path,
    progress: &mut Progress,
    base_done: u64,
) -> Result<(), String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let stopped = stop.0.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let (root, out) = (root.to_path_buf(), out.to_path_buf());
    let shown = root.display().to_string();
    let handle = tokio::task::spawn_blocking(move || {
        let mut last = Instant::now();
        tree::write(&root, &out, &mut |done| {
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                let _ = tx.send(done);
            }
            !stopped.load(Ordering::Relaxed)
        })
    });
    while let Some(done) = rx.recv().await {
        progress.set(base_done + done);
    }
    drop(stop);
    handle
        .await
        .map_err(|e| format!("writing the tree of {shown}: {e}"))?
        .map_err(|e| classify_write(&format!("writing the tree of {shown} as a tar: {e}")))
}

async fn store_job_record(path: &Path, record: &ExportJobRecord) -> Result<(), JobError> {
    let path = path.to_path_buf();
    let record = record.clone();
    tokio::task::spawn_blocking(move || cairn_persist::store(&path, &record))
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?
        .map_err(|e| JobError::Failed(format!("writing the export job record: {e}")))
}

/// The job's remote, opened and checked (credentials, bucket) before anything is written.
async fn open_remote(
    persist: &Path,
    config: &ExportConfig,
    source: &JobSource,
) -> Result<Remote, JobError> {
    let remote_config = source.remote.as_ref().ok_or_else(|| {
        refuse(format!(
            "remote {} is not configured on this device",
            config.remote
        ))
    })?;
    let remote = Remote::open(remote_config, persist)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    remote.check().await.map_err(|e| refuse(e.to_string()))?;
    Ok(remote)
}

/// Uploads a spooled volume file (its upload id recorded first, so that a restart after a
/// crash aborts it), then removes it from the spool; returns its sha256 and size.
async fn upload_volume(
    target: &mut RemoteTarget,
    local: &Path,
    file: &str,
    progress: &mut Progress,
) -> Result<(String, u64), String> {
    let key = join_key(&[&target.dir, file]);
    let upload_id = target
        .remote
        .begin_upload(&key)
        .await
        .map_err(|e| e.to_string())?;
    target.record.uploads.push(RemoteUpload {
        key: key.clone(),
        upload_id: upload_id.clone(),
    });
    store_job_record(&target.record_path, &target.record)
        .await
        .map_err(|e| e.to_string())?;
    let before = progress.status.bytes_uploaded;
    let sent = target
        .remote
        .send_file(local, &key, &upload_id, &mut |sent| {
            progress.uploaded(before + sent);
            if sent >= cairn_objstore::PART_SIZE as u64 {
                cairn_persist::crash_point(super::CRASH_MID_UPLOAD);
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    progress.uploaded(before + sent.size);
    tokio::fs::remove_file(local)
        .await
        .map_err(|e| format!("removing the spooled {}: {e}", local.display()))?;
    Ok((sent.sha256, sent.size))
}

/// After a complete export to a remote: retention of the app's exports under the prefix. Its
/// failure does not undo the export (it is complete); the status says what was not removed.
async fn keep_exports(
    persist: &Path,
    config: &ExportConfig,
    remote: &Remote,
    status: &mut ExportStatus,
) {
    if config.keep_exports == 0 {
        return;
    }
    match super::retention::apply(
        persist,
        remote,
        &config.remote_prefix,
        status.app_uuid,
        config.job_id,
        config.keep_exports,
    )
    .await
    {
        Ok(removed) => status.removed_exports = removed,
        Err(e) => {
            tracing::warn!(job = %config.job_id, "retention of exports at {}: {e}", remote.id);
            status.error = format!(
                "the export is complete, but retention (keep {}) at remote {} did not finish: {e}; it is tried again after the next export",
                config.keep_exports, remote.id
            );
        }
    }
}

/// The newest complete export of `app` under `prefix` of the remote from a snapshot older
/// than `time`: its directory name, manifest and manifest sha256. One listing of the prefix
/// and one read per export of this app (their names start with the app's UUID).
async fn find_base_remote(
    remote: &Remote,
    prefix: &str,
    app: Uuid,
    snapshot: Uuid,
    time: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(String, ExportManifest, String), String> {
    use sha2::Digest;
    let dirs = remote.list_dirs(prefix).await.map_err(|e| e.to_string())?;
    let mine = format!("{app}-");
    let same = format!("{app}-{snapshot}-");
    let mut best: Option<(String, ExportManifest, String)> = None;
    for dir in dirs
        .into_iter()
        .filter(|d| d.starts_with(&mine) && !d.starts_with(&same))
    {
        let bytes = match remote.get(&join_key(&[prefix, &dir, MANIFEST_FILE])).await {
            Ok(bytes) => bytes,
            // No manifest: never completed.
            Err(e) if e.kind == cairn_objstore::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("looking for a base export: {e}")),
        };
        let Ok(manifest) = serde_json::from_slice::<ExportManifest>(&bytes) else {
            continue;
        };
        if manifest.app_uuid != app || manifest.snapshot_id == snapshot {
            continue;
        }
        if let (Some(base_time), Some(time)) = (manifest.snapshot_time, time)
            && base_time >= time
        {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(_, b, _)| b.export_time < manifest.export_time)
        {
            let sha = format!("{:x}", sha2::Sha256::digest(&bytes));
            best = Some((dir, manifest, sha));
        }
    }
    best.ok_or_else(|| {
        format!(
            "no previous export of this app from an older snapshot at {}",
            remote.full_key(prefix)
        )
    })
}

/// An empty qcow2 of `size` at `path` (its directory made).
async fn create_placeholder(path: &Path, size: u64) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    crate::process::run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
            size.to_string().as_ref(),
        ],
        crate::process::COMMAND_TIMEOUT,
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Renames the written export to its final name (not cancellable: it is complete) and drops
/// the job record.
async fn finish(
    persist: &Path,
    job: Uuid,
    partial: PathBuf,
    final_dir: PathBuf,
) -> Result<(), JobError> {
    let record = job_record_path(persist, job);
    let target = final_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let shown = final_dir.display().to_string();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::rename(&partial, &final_dir)?;
        std::fs::File::open(&target)?.sync_all()?;
        let _ = std::fs::remove_file(record);
        Ok(())
    })
    .await
    .map_err(|e| JobError::Failed(e.to_string()))?
    .map_err(|e| JobError::Failed(format!("finishing {shown}: {e}")))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The app config the app-manager saved with the snapshot (`appInstanceConfig.json`), read with
/// the record loader (checksum, migrations, mandatory fields) off the runtime; `None` when
/// there is none (a snapshot the app-manager did not describe). An unusable one refuses the
/// export, naming the file: the manifest would otherwise carry a config nobody can trust.
async fn load_app_config(
    persist: &Path,
    snapshot: Uuid,
) -> Result<Option<AppInstanceConfig>, JobError> {
    let path = snapshot_dir(persist, snapshot).join(APP_INSTANCE_CONFIG_FILE);
    tokio::task::spawn_blocking(move || {
        if !path.exists() {
            tracing::info!(snapshot = %snapshot, path = %path.display(), "no app config saved with the snapshot: the manifest carries none");
            return Ok(None);
        }
        cairn_persist::load::<AppInstanceConfig>(&path)
            .map(|loaded| Some(loaded.record))
            .map_err(|e| {
                refuse(format!(
                    "snapshot {snapshot}: its app config {} is unusable ({e}); the export would not carry it",
                    path.display()
                ))
            })
    })
    .await
    .map_err(|e| JobError::Failed(format!("reading the app config: {e}")))?
}

fn sweep_partials(target: &Path, app: Uuid) {
    let Ok(entries) = std::fs::read_dir(target) else {
        return;
    };
    let prefix = format!("{app}-");
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(&prefix)
            && path.is_dir()
            && remove_partial(&path)
        {
            tracing::warn!(dir = %path.display(), "removed an unfinished export left by an interrupted job");
        }
    }
}

/// The newest complete export of `app` in `target` from a snapshot older than `time`: its
/// directory, manifest and manifest sha256.
fn find_base(
    target: &Path,
    app: Uuid,
    snapshot: Uuid,
    time: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(PathBuf, ExportManifest, String), String> {
    let entries =
        std::fs::read_dir(target).map_err(|e| format!("reading {}: {e}", target.display()))?;
    let mut best: Option<(PathBuf, ExportManifest, String)> = None;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok((manifest, sha)) = verify::read_manifest(&dir) else {
            continue;
        };
        if manifest.app_uuid != app || manifest.snapshot_id == snapshot {
            continue;
        }
        if let (Some(base_time), Some(time)) = (manifest.snapshot_time, time)
            && base_time >= time
        {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(_, b, _)| b.export_time < manifest.export_time)
        {
            best = Some((dir, manifest, sha));
        }
    }
    best.ok_or_else(|| {
        format!(
            "no previous export of this app from an older snapshot in {}",
            target.display()
        )
    })
}

/// The previous link of an incremental volume's chain.
struct BaseLink {
    link: ExportBase,
    /// The volume's file in the base export.
    file: String,
    /// The base export's snapshot: its bitmap tracks the changes since.
    snapshot: Uuid,
}

/// Whether `meta`'s volume can be exported incrementally over `manifest`: the base has this
/// volume at the same size and a trustworthy bitmap tracks changes since the base's snapshot.
fn incremental_base(
    meta: &VolumeSnapshotMeta,
    info: &bitmap::ImageInfo,
    volume: Uuid,
    dir: &Path,
    manifest: &ExportManifest,
    sha: &str,
) -> Result<BaseLink, String> {
    let base_volume = manifest.volume(volume).ok_or_else(|| {
        format!(
            "the previous export {} does not include this volume",
            dir.display()
        )
    })?;
    if base_volume.virtual_size != info.virtual_size {
        return Err(format!(
            "the volume's size changed since the previous export ({} -> {} bytes)",
            base_volume.virtual_size, info.virtual_size
        ));
    }
    let wanted = bitmap::name(&manifest.snapshot_id.to_string());
    let found = info.bitmaps.iter().find(|b| b.name == wanted).ok_or_else(|| {
        format!(
            "no change-tracking bitmap {wanted} on {} (lost after a crash or a rollback, or the volume changed before its previous export): a full export instead",
            meta.file_location.display()
        )
    })?;
    if let Some(why) = found.unusable() {
        return Err(format!("{why}: a full export instead"));
    }
    Ok(BaseLink {
        link: ExportBase {
            dir: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            manifest_sha256: sha.to_string(),
        },
        file: base_volume.file.clone(),
        snapshot: manifest.snapshot_id,
    })
}

/// `qemu-img convert` of snapshot `meta` into a zstd-compressed qcow2, reporting the fraction done.
/// Sixteen coroutines writing out of order (`-m 16 -W`): compressed clusters are written as
/// they are ready, not in guest order, which keeps both cores compressing (0.4-0.8x the time
/// of the default on this machine); the file is hashed after, so its layout does not matter.
async fn convert_full(
    meta: &VolumeSnapshotMeta,
    out: &Path,
    progress: &mut (dyn FnMut(f64) + Send),
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("qemu-img")
        .args(["convert", "-p", "-U", "-f", "qcow2", "-l"])
        .arg(format!("snapshot.name={}", meta.name))
        .args(["-m", "16", "-W"])
        .args(["-c", "-O", "qcow2", "-o", "compression_type=zstd"])
        .arg(&meta.file_location)
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run qemu-img convert: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("qemu-img: no stdout")?;
    let mut stderr = child.stderr.take().ok_or("qemu-img: no stderr")?;
    let err_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    // -p prints "    (12.34/100%)\r" repeatedly.
    let mut buf = [0u8; 512];
    let mut line = String::new();
    loop {
        let n = stdout
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading qemu-img progress: {e}"))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(p) = parse_percent(&line) {
                    progress(p / 100.0);
                }
                line.clear();
            } else {
                line.push(b as char);
            }
        }
    }
    let status = tokio::time::timeout(TOOL_TIMEOUT, child.wait())
        .await
        .map_err(|_| "qemu-img convert did not finish".to_string())?
        .map_err(|e| format!("qemu-img convert: {e}"))?;
    let stderr = err_task.await.unwrap_or_default();
    if !status.success() {
        return Err(classify_write(&format!(
            "qemu-img convert of snapshot {} of {} failed ({status}): {}",
            meta.name,
            meta.file_location.display(),
            stderr.trim()
        )));
    }
    Ok(())
}

fn classify_write(text: &str) -> String {
    if text.to_lowercase().contains("no space left") {
        format!("the target is full: {text}")
    } else {
        text.to_string()
    }
}

fn parse_percent(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?;
    let (value, _) = inner.split_once('/')?;
    value.parse().ok()
}

async fn create_overlay(out: &Path, backing: &Path, size: u64) -> Result<(), String> {
    crate::process::run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "compression_type=zstd,cluster_size=65536".as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            out.as_os_str(),
            size.to_string().as_ref(),
        ],
        crate::process::COMMAND_TIMEOUT,
    )
    .await
    .map(drop)
    .map_err(|e| classify_write(&e.to_string()))
}

/// A `qemu-nbd` serving a snapshot's state read-only with a bitmap of the live image; killed
/// when dropped.
struct Nbd {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A path inside a qemu option string (commas doubled).
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl Nbd {
    /// Serves snapshot `meta` of its volume read-only, with the volume's bitmap `bitmap` if
    /// given. `force-share`: the export never holds a lock that would stop a VM, a snapshot or
    /// a rollback of the volume.
    async fn start(meta: &VolumeSnapshotMeta, bitmap: Option<&str>) -> Result<Self, String> {
        let socket =
            std::env::temp_dir().join(format!("cairn-export-{}.sock", Uuid::new_v4().simple()));
        let mut command = tokio::process::Command::new("qemu-nbd");
        command
            .args(["-r", "-t", "--shared=4", "--image-opts", "-l"])
            .arg(format!("snapshot.name={}", meta.name));
        if let Some(bitmap) = bitmap {
            command.arg("-B").arg(bitmap);
        }
        let child = command
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "driver=qcow2,force-share=on,file.driver=file,file.filename={}",
                opt_path(&meta.file_location)
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run qemu-nbd (Debian package qemu-utils): {e}"))?;
        let mut server = Self { child, socket };
        let deadline = Instant::now() + NBD_START;
        // Ready when it accepts a connection: the socket file is there from qemu-nbd's bind,
        // before it listens, and a client that came in between (a loaded machine) was refused.
        while tokio::net::UnixStream::connect(&server.socket)
            .await
            .is_err()
        {
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut text = String::new();
                if let Some(mut err) = server.child.stderr.take() {
                    let _ = err.read_to_string(&mut text).await;
                }
                return Err(format!(
                    "qemu-nbd could not serve snapshot {} of {} ({status}): {}",
                    meta.name,
                    meta.file_location.display(),
                    text.trim()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "qemu-nbd did not start within {} s",
                    NBD_START.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(server)
    }

    fn nbd_opts(&self) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={}",
            self.socket.display()
        )
    }

    /// The extents the bitmap marks dirty, cluster-aligned and merged across small gaps.
    async fn dirty_extents(&self, bitmap: &str, size: u64) -> Result<Vec<(u64, u64)>, String> {
        let opts = format!(
            "{},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
            self.nbd_opts()
        );
        let out = crate::process::run(
            "qemu-img",
            &["map", "--output=json", "--image-opts", opts.as_str()],
            crate::process::COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| format!("reading bitmap {bitmap}: {e}: a full export instead"))?;
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("qemu-img map output: {e}: a full export instead"))?;
        // With x-dirty-bitmap a dirty extent reads as "data": false.
        let dirty = entries.iter().filter_map(|e| {
            let start = e.get("start")?.as_u64()?;
            let length = e.get("length")?.as_u64()?;
            let data = e.get("data")?.as_bool()?;
            (!data).then_some((start, length))
        });
        Ok(merge_extents(dirty, size))
    }

    /// Copies `[offset, offset+len)` of the snapshot into `out` at the same place, compressed.
    async fn copy_extent(&self, out: &Path, offset: u64, len: u64) -> Result<(), String> {
        let source = format!(
            "driver=raw,offset={offset},size={len},file.{}",
            self.nbd_opts().replace(",", ",file.")
        );
        let target = format!(
            "driver=raw,offset={offset},size={len},file.driver=compress,file.file.driver=qcow2,file.file.file.driver=file,file.file.file.filename={}",
            opt_path(out)
        );
        crate::process::run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "--image-opts",
                source.as_str(),
                "--target-image-opts",
                target.as_str(),
            ],
            TOOL_TIMEOUT,
        )
        .await
        .map(drop)
        .map_err(|e| classify_write(&format!("copying changed clusters {offset}+{len}: {e}")))
    }
}

/// Aligns extents to 64 KiB clusters (the end clamped to `size`) and merges those less than
/// [`MERGE_GAP`] apart.
fn merge_extents(extents: impl Iterator<Item = (u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    const CLUSTER: u64 = 65536;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in extents {
        if len == 0 {
            continue;
        }
        let begin = start / CLUSTER * CLUSTER;
        let end = (start + len)
            .div_ceil(CLUSTER)
            .saturating_mul(CLUSTER)
            .min(size);
        match out.last_mut() {
            Some((s, l)) if begin <= *s + *l + MERGE_GAP => *l = end.max(*s + *l) - *s,
            _ => out.push((begin, end - begin)),
        }
    }
    out
}

/// After a full export of snapshot `meta`: if the volume has no bitmap for it and still equals
/// it, one is added, so the next export can be incremental. Needs the volume free (no VM).
async fn start_tracking(meta: &VolumeSnapshotMeta) {
    let wanted = bitmap::name(&meta.name);
    let Ok(info) = bitmap::info(&meta.file_location).await else {
        return;
    };
    if info.bitmaps.iter().any(|b| b.name == wanted) {
        return;
    }
    // The volume must still equal the snapshot: compare it against the snapshot's state.
    let Ok(server) = Nbd::start(meta, None).await else {
        return;
    };
    let active = format!(
        "driver=qcow2,force-share=on,file.driver=file,file.filename={}",
        opt_path(&meta.file_location)
    );
    let nbd = server.nbd_opts();
    let same = crate::process::run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-q",
            "--image-opts",
            nbd.as_str(),
            active.as_str(),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .is_ok();
    drop(server);
    if !same {
        tracing::info!(volume = %meta.volume_key, snapshot = %meta.name, "volume changed since the snapshot: change tracking starts with its next snapshot");
        // From the next snapshot on, the volume is tracked.
        let _ = bitmap::add_marker(&meta.file_location).await;
        return;
    }
    match bitmap::add(&meta.file_location, &wanted).await {
        Ok(()) => {
            tracing::info!(volume = %meta.volume_key, bitmap = %wanted, "change tracking started for incremental exports")
        }
        Err(e) => {
            tracing::warn!(volume = %meta.volume_key, "change tracking not started (is the app running?): {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_cluster_aligned_and_close_ones_merged() {
        let got = merge_extents(
            [(100, 10), (70000, 10), (10 << 20, 65536)].into_iter(),
            64 << 20,
        );
        assert_eq!(got, vec![(0, 131072), (10 << 20, 65536)]);
        assert_eq!(merge_extents([(0, 100)].into_iter(), 50), vec![(0, 50)]);
    }

    #[test]
    fn qemu_img_progress_lines_parse() {
        assert_eq!(parse_percent("    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_percent("garbage"), None);
    }
}

//! The slow half of a snapshot operation, run in a task of its own so that the manager goes on
//! with other volumes meanwhile: the intent record, the backend calls, the final record, in
//! that order, with the crash points between them. It reads no manager state: what it needs
//! was planned by the manager, and what it did goes back as an [`Outcome`] the manager applies.
//! Making and removing a volume run the same way ([`make_volume`], [`remove_volume`]): a big
//! clone or image conversion does not hold up other apps' requests.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use cairn_persist::crash_point;
use cairn_types::ContentFormat;
use cairn_types::common::{ErrorDescription, ErrorSeverity};
use cairn_types::snapshot::{VolumesSnapshotAction, VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{SnapshotBackendKind, VolumeConfig, VolumeSnapshotMeta, VolumeStatus};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::backend::{Backends, VolumeRef};
use crate::error::VolumeError;
use crate::manager::{
    CRASH_AFTER_BACKEND_CREATE, CRASH_AFTER_BACKEND_DELETE, CRASH_AFTER_BACKEND_ROLLBACK,
    CRASH_AFTER_INTENT_WRITE, CRASH_AFTER_RECORD_WRITE, record_path,
};
use crate::volumes;

/// The slow half of an operation, ready to be awaited or spawned.
pub type Work = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// What the slow half did; every record it names is durable.
#[derive(Debug)]
pub enum Outcome {
    Create {
        config: VolumesSnapshotConfig,
        previous: Option<VolumesSnapshotStatus>,
        result: Created,
    },
    Rollback {
        config: VolumesSnapshotConfig,
        previous: VolumesSnapshotStatus,
        result: RolledBack,
    },
    Delete {
        config: VolumesSnapshotConfig,
        previous: VolumesSnapshotStatus,
        result: Deleted,
    },
    Volume(VolumeOutcome),
}

/// Making or removing a volume, ready to be awaited or spawned.
pub type VolumeWork = Pin<Box<dyn Future<Output = VolumeOutcome> + Send + 'static>>;

/// What making or removing a volume did.
#[derive(Debug)]
pub enum VolumeOutcome {
    /// `status` is the one planned (Creating); `result` the volume's allocated size, or why it
    /// was not made.
    Made {
        key: String,
        status: Box<VolumeStatus>,
        result: Result<u64, VolumeError>,
    },
    Removed {
        key: String,
        result: Result<(), VolumeError>,
    },
}

/// How a volume is made, as planned on the manager's state.
#[derive(Debug)]
pub enum Making {
    /// Its file or directory is there: checked and activated.
    Existing,
    /// A copy of another volume's state in a snapshot.
    Clone(Box<VolumeSnapshotMeta>),
    /// From a content tree's verified blob.
    Content {
        tree: Uuid,
        blob: (PathBuf, ContentFormat),
    },
    /// Restored from an export at this remote (its credentials under `persist`).
    RemoteExport {
        remote: Box<cairn_types::RemoteConfig>,
        persist: PathBuf,
    },
    /// Empty, or from its base image.
    Fresh,
}

#[derive(Debug)]
pub enum Created {
    /// The intent record could not be written: nothing was done.
    IntentFailed(String),
    /// A volume's snapshot failed; those already made were removed (`status` says what is
    /// left). `error` is the volume's failure.
    Failed {
        status: VolumesSnapshotStatus,
        volume_key: String,
        error: VolumeError,
    },
    Made(VolumesSnapshotStatus),
    /// The container could not be frozen for a live create: nothing was taken, no volume is
    /// at fault.
    NotFrozen(VolumesSnapshotStatus),
}

/// Ends a create's freeze, if any: how long it lasted. A thaw that fails is logged (the
/// container stays stopped until a restarted volume-manager thaws it again).
async fn thaw(frozen: Option<crate::freeze::Frozen>, id: Uuid) -> Option<std::time::Duration> {
    match frozen?.thaw().await {
        Ok(paused) => Some(paused),
        Err(e) => {
            tracing::error!(snapshot = %id, "{e}");
            None
        }
    }
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per operation, moved once
pub enum RolledBack {
    IntentFailed(String),
    Done {
        record: VolumesSnapshotStatus,
        /// Volumes whose rollback failed (by key).
        failed: Vec<(String, VolumeError)>,
        /// Released volumes the rollback made again, with their size.
        restored: Vec<(Uuid, VolumeSnapshotMeta, u64)>,
    },
}

#[derive(Debug)]
pub enum Deleted {
    IntentFailed(String),
    /// Deleted everywhere and its record removed; the status to publish.
    Removed(VolumesSnapshotStatus),
    /// Some remains (or the record could not be removed): the record kept, with the errors.
    Kept(VolumesSnapshotStatus),
}

/// A volume's snapshot: its key in the record, the record's value, and the metadata completed.
pub type MetaEntry = (Uuid, serde_json::Value, VolumeSnapshotMeta);

pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

pub(crate) fn error(text: impl Into<String>) -> ErrorDescription {
    ErrorDescription::new(text, ErrorSeverity::Error, now())
}

/// The answer to a request that failed with `text`.
pub(crate) fn failed_status(
    config: &VolumesSnapshotConfig,
    text: String,
    volume_errors: BTreeMap<Uuid, String>,
) -> VolumesSnapshotStatus {
    VolumesSnapshotStatus {
        snapshot_id: config.snapshot_id,
        app_uuid: config.app_uuid,
        result_of_action: config.action,
        request_counter: config.request_counter,
        volume_errors,
        error: error(text),
        ..VolumesSnapshotStatus::default()
    }
}

/// Writes a snapshot's record durably (on the blocking pool).
pub(crate) async fn store_record(
    persist: &Path,
    record: &VolumesSnapshotStatus,
) -> Result<(), String> {
    let path = record_path(persist, record.snapshot_id);
    let record = record.clone();
    #[allow(clippy::disallowed_methods)] // on the blocking pool
    let stored = tokio::task::spawn_blocking(move || cairn_persist::store(&path, &record));
    stored
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e}; check the disk under the persist root"))
}

/// Removes a snapshot's record durably (on the blocking pool).
pub(crate) async fn remove_record(persist: &Path, snapshot: Uuid) -> Result<(), String> {
    let path = record_path(persist, snapshot);
    #[allow(clippy::disallowed_methods)] // on the blocking pool
    let removed = tokio::task::spawn_blocking(move || {
        for file in [cairn_persist::backup_path(&path), path.clone()] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // The directory is shared with the app-manager's files: removed only when empty.
        // One fsync either way: of the parent if the directory went, else of the directory.
        match path.parent() {
            Some(dir) if std::fs::remove_dir(dir).is_ok() => {
                dir.parent().map_or(Ok(()), cairn_persist::sync_dir)
            }
            Some(dir) => cairn_persist::sync_dir(dir),
            None => Ok(()),
        }
    });
    removed
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot remove the record of snapshot {snapshot}: {e}"))
}

/// Writes the final record; a failed write turns a success into an error the controller sees.
pub(crate) async fn finish_record(
    persist: &Path,
    mut record: VolumesSnapshotStatus,
) -> VolumesSnapshotStatus {
    if let Err(e) = store_record(persist, &record).await {
        tracing::error!(snapshot = %record.snapshot_id, "{e}");
        if !record.error.is_error() {
            record.error = error(format!(
                "snapshot {}: the action succeeded but its record could not be written: {e}",
                record.snapshot_id
            ));
        }
    }
    crash_point(CRASH_AFTER_RECORD_WRITE);
    record
}

/// Deletes each volume's snapshot; returns the record values of those that remain and the
/// errors.
pub(crate) async fn delete_all(
    backends: &Backends,
    snapshot: Uuid,
    metas: &[MetaEntry],
) -> (BTreeMap<Uuid, serde_json::Value>, BTreeMap<Uuid, String>) {
    let mut left = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (volume, value, meta) in metas {
        if let Err(e) = backends.delete(meta).await {
            tracing::error!(snapshot = %snapshot, volume = %volume, "delete failed: {e}");
            errors.insert(*volume, e.to_string());
            left.insert(*volume, value.clone());
        }
    }
    (left, errors)
}

/// Makes the volume `config` names at `path` as `making` says; at most as many at once as
/// `permits` holds (a boot with many volumes does not start every conversion together), when
/// given.
pub(crate) fn make_volume(
    backends: Backends,
    config: VolumeConfig,
    path: PathBuf,
    backend: SnapshotBackendKind,
    making: Making,
    status: VolumeStatus,
    permits: Option<Arc<Semaphore>>,
) -> VolumeWork {
    Box::pin(async move {
        let key = config.key();
        let _permit = match permits {
            Some(permits) => permits.acquire_owned().await.ok(),
            None => None,
        };
        let made = match making {
            Making::Existing => {
                match volumes::check_existing_blocking(&key, &path, config.format).await {
                    Ok(()) => backends.activate(backend, &key, &path).await,
                    Err(e) => Err(e),
                }
            }
            Making::Clone(source) => {
                volumes::create_clone(&config, &path, backend, &source, &backends).await
            }
            Making::Content { tree, blob } => {
                crate::content::create(&config, &path, backend, tree, blob, &backends).await
            }
            Making::RemoteExport { remote, persist } => {
                volumes::create_from_remote(&config, &path, backend, &remote, &persist, &backends)
                    .await
            }
            Making::Fresh => volumes::create(&config, &path, backend, &backends).await,
        };
        let result = match made {
            Ok(()) => Ok(volumes::allocated_size_blocking(&path).await),
            Err(e) => Err(e),
        };
        VolumeOutcome::Made {
            key,
            status: Box::new(status),
            result,
        }
    })
}

/// Removes volume `key` at `path`, under the same bound as [`make_volume`].
pub(crate) fn remove_volume(key: String, path: PathBuf, permits: Arc<Semaphore>) -> VolumeWork {
    Box::pin(async move {
        let _permit = permits.acquire_owned().await.ok();
        let result = volumes::remove(&key, &path).await;
        VolumeOutcome::Removed { key, result }
    })
}

/// Intent, each volume's snapshot made (or adopted), final record; all or nothing: a failure
/// removes the snapshots already made.
pub(crate) fn create(
    backends: Backends,
    persist: PathBuf,
    config: VolumesSnapshotConfig,
    previous: Option<VolumesSnapshotStatus>,
    mut record: VolumesSnapshotStatus,
    plan: Vec<(Uuid, VolumeSnapshotMeta)>,
) -> Work {
    Box::pin(async move {
        let result = async {
            let id = config.snapshot_id;
            let name = id.to_string();
            if let Err(e) = store_record(&persist, &record).await {
                return Created::IntentFailed(format!(
                    "snapshot {id}: cannot write its intent record ({e}); no snapshot was made"
                ));
            }
            crash_point(CRASH_AFTER_INTENT_WRITE);
            // A running container stops between two instructions while its volumes are taken;
            // what can be done before is (a failure here is met again by the create itself).
            let mut frozen = None;
            if config.live && !config.freeze_cgroup.is_empty() {
                let prepared = futures_util::future::join_all(
                    plan.iter().map(|(_, meta)| backends.prepare_live(meta)),
                )
                .await;
                for (e, (volume, _)) in prepared.into_iter().zip(&plan) {
                    if let Err(e) = e {
                        tracing::warn!(snapshot = %id, volume = %volume, "{e}");
                    }
                }
                match crate::freeze::Frozen::freeze(&config.freeze_cgroup).await {
                    Ok(f) => frozen = Some(f),
                    Err(e) => {
                        tracing::error!(snapshot = %id, cgroup = %config.freeze_cgroup, "{e}");
                        // An interrupted earlier attempt may have left some: removed.
                        let mut undo: Vec<MetaEntry> = Vec::new();
                        for (volume, meta) in &plan {
                            if matches!(backends.exists(meta).await, Ok(true)) {
                                undo.push((*volume, meta.to_value(), meta.clone()));
                            }
                        }
                        let (left, errors) = delete_all(&backends, id, &undo).await;
                        let mut status = failed_status(
                            &config,
                            format!("snapshot {id}: live snapshot not taken: {e}"),
                            errors,
                        );
                        status.volume_snapshot_meta = left;
                        return Created::NotFrozen(finish_record(&persist, status).await);
                    }
                }
            }
            // A frozen container waits for all of them: taken at once, so that on one btrfs
            // they share a transaction commit, most of the pause.
            let mut at_once: Vec<Option<crate::error::Result<VolumeSnapshotMeta>>> =
                if frozen.is_some() && plan.len() > 1 {
                    let fresh = previous.is_none();
                    futures_util::future::join_all(plan.iter().map(|(_, meta)| {
                        let (backends, name, vref) = (&backends, &name, VolumeRef::of_meta(meta));
                        async move { backends.create(meta.backend, &vref, name, fresh).await }
                    }))
                    .await
                    .into_iter()
                    .map(Some)
                    .collect()
                } else {
                    Vec::new()
                };
            let mut made = Vec::new();
            for (k, (volume, meta)) in plan.iter().enumerate() {
                // A running VM's disk was snapshotted by the domain-manager: record it only.
                let made_live = config.live && backends.live_taken_by_hypervisor(meta.backend);
                let created = if let Some(taken) = at_once.get_mut(k).and_then(Option::take) {
                    taken
                } else if made_live {
                    backends.adopt_live(meta, &name).await
                } else {
                    backends
                        .create(
                            meta.backend,
                            &VolumeRef::of_meta(meta),
                            &name,
                            previous.is_none(),
                        )
                        .await
                };
                let e = match created {
                    Ok(done) => {
                        record.volume_snapshot_meta.insert(*volume, done.to_value());
                        made.push(*volume);
                        crash_point(CRASH_AFTER_BACKEND_CREATE);
                        continue;
                    }
                    Err(e) => e,
                };
                tracing::error!(snapshot = %id, volume = %volume, "snapshot failed: {e}");
                thaw(frozen.take(), id).await;
                // Undo on volumes 0..k, and on k if the failure left a snapshot there.
                let mut undo: Vec<MetaEntry> = plan[..k]
                    .iter()
                    .map(|(v, m)| (*v, m.to_value(), m.clone()))
                    .collect();
                if matches!(backends.exists(meta).await, Ok(true)) {
                    undo.push((*volume, meta.to_value(), meta.clone()));
                }
                // Taken at once: the volumes after this one may have theirs too.
                if !at_once.is_empty() {
                    for (v, m) in &plan[k + 1..] {
                        if matches!(backends.exists(m).await, Ok(true)) {
                            undo.push((*v, m.to_value(), m.clone()));
                        }
                    }
                }
                let (left, mut errors) = delete_all(&backends, id, &undo).await;
                errors.insert(*volume, e.to_string());
                let undone: Vec<String> = made.iter().map(Uuid::to_string).collect();
                let mut text = format!(
                    "snapshot {id}: creating it on volume {volume} (number {} of {}) failed: {e}; the snapshots already made on volumes [{}] were removed",
                    k + 1,
                    plan.len(),
                    undone.join(", ")
                );
                if !left.is_empty() {
                    text.push_str(
                        "; some could not be removed (see the volume errors): request a delete",
                    );
                }
                let mut status = failed_status(&config, text, errors);
                status.volume_snapshot_meta = left;
                return Created::Failed {
                    status: finish_record(&persist, status).await,
                    volume_key: meta.volume_key.clone(),
                    error: e,
                };
            }
            let stopping = frozen.as_ref().map(|f| f.stopping.as_micros() as u64);
            if let Some(paused) = thaw(frozen.take(), id).await {
                record.pause_ms = crate::freeze::pause_ms(paused);
                tracing::info!(snapshot = %id, cgroup = %config.freeze_cgroup, pause_us = paused.as_micros() as u64, stopping_us = stopping.unwrap_or(0), "container frozen while its volumes were taken");
            }
            record.in_progress = VolumesSnapshotAction::Unspecified;
            record.in_progress_counter = 0;
            record.freeze_cgroup.clear();
            record.result_of_action = VolumesSnapshotAction::Create;
            record.request_counter = config.request_counter;
            record.time_created = record.time_created.or(Some(now()));
            record.volume_errors.clear();
            record.error = ErrorDescription::default();
            tracing::info!(snapshot = %id, app = %config.app_uuid, volumes = plan.len(), "snapshot created");
            Created::Made(finish_record(&persist, record).await)
        }
        .await;
        Outcome::Create {
            config,
            previous,
            result,
        }
    })
}

/// A volume to roll back: its snapshot's metadata and whether its volume was released (a
/// rollback makes it again), or why it cannot be.
pub type RollbackItem = (Uuid, Result<(VolumeSnapshotMeta, bool), String>);

/// Intent, each volume rolled back, final record.
pub(crate) fn rollback(
    backends: Backends,
    persist: PathBuf,
    config: VolumesSnapshotConfig,
    previous: VolumesSnapshotStatus,
    mut record: VolumesSnapshotStatus,
    items: Vec<RollbackItem>,
) -> Work {
    Box::pin(async move {
        let result = async {
            let id = config.snapshot_id;
            if let Err(e) = store_record(&persist, &record).await {
                return RolledBack::IntentFailed(format!(
                    "snapshot {id}: cannot write its intent record ({e}); nothing was rolled back"
                ));
            }
            let mut errors = BTreeMap::new();
            let (mut failed, mut restored) = (Vec::new(), Vec::new());
            for (volume, item) in items {
                let (meta, released) = match item {
                    Ok(item) => item,
                    Err(why) => {
                        errors.insert(volume, why);
                        continue;
                    }
                };
                if let Err(e) = backends.rollback(&meta).await {
                    tracing::error!(snapshot = %id, volume = %volume, "rollback failed: {e}");
                    errors.insert(volume, e.to_string());
                    failed.push((meta.volume_key.clone(), e));
                } else if released {
                    let size = volumes::allocated_size_blocking(&meta.file_location).await;
                    restored.push((volume, meta, size));
                }
            }
            crash_point(CRASH_AFTER_BACKEND_ROLLBACK);
            record.in_progress = VolumesSnapshotAction::Unspecified;
            record.in_progress_counter = 0;
            record.result_of_action = VolumesSnapshotAction::Rollback;
            record.request_counter = config.request_counter;
            record.error = if errors.is_empty() {
                tracing::info!(snapshot = %id, app = %config.app_uuid, "rolled back");
                ErrorDescription::default()
            } else {
                let names: Vec<String> = errors.keys().map(Uuid::to_string).collect();
                error(format!(
                    "snapshot {id}: rollback failed on volumes [{}] (see the volume errors); the app must stay stopped until a rollback succeeds",
                    names.join(", ")
                ))
            };
            record.volume_errors = errors;
            RolledBack::Done {
                record: finish_record(&persist, record).await,
                failed,
                restored,
            }
        }
        .await;
        Outcome::Rollback {
            config,
            previous,
            result,
        }
    })
}

/// Intent, each volume's snapshot deleted, the record removed (or kept with what is left).
pub(crate) fn delete(
    backends: Backends,
    persist: PathBuf,
    config: VolumesSnapshotConfig,
    previous: VolumesSnapshotStatus,
    mut record: VolumesSnapshotStatus,
    metas: Vec<MetaEntry>,
) -> Work {
    Box::pin(async move {
        let result = async {
            let id = config.snapshot_id;
            if let Err(e) = store_record(&persist, &record).await {
                return Deleted::IntentFailed(format!(
                    "snapshot {id}: cannot write its intent record ({e}); nothing was deleted"
                ));
            }
            let intent_done = std::time::Instant::now();
            let (left, errors) = delete_all(&backends, id, &metas).await;
            crash_point(CRASH_AFTER_BACKEND_DELETE);
            tracing::debug!(snapshot = %id, backend_ms = intent_done.elapsed().as_secs_f64() * 1e3, "backend delete done");
            record.in_progress = VolumesSnapshotAction::Unspecified;
            record.in_progress_counter = 0;
            record.result_of_action = VolumesSnapshotAction::Delete;
            record.request_counter = config.request_counter;
            if left.is_empty() {
                if let Err(e) = remove_record(&persist, id).await {
                    // The snapshots are gone: the record kept for the error must not say
                    // otherwise; the delete asked again removes it.
                    record.volume_snapshot_meta.clear();
                    record.error = error(e);
                    return Deleted::Kept(finish_record(&persist, record).await);
                }
                tracing::info!(snapshot = %id, "snapshot deleted");
                record.volume_snapshot_meta.clear();
                record.volume_errors.clear();
                record.error = ErrorDescription::default();
                Deleted::Removed(record)
            } else {
                // A failed delete stays visible, with what is left and why.
                let names: Vec<String> = errors.keys().map(Uuid::to_string).collect();
                record.error = error(format!(
                    "snapshot {id}: delete failed on volumes [{}] (see the volume errors); fix the cause and request the delete again",
                    names.join(", ")
                ));
                record.volume_snapshot_meta = left;
                record.volume_errors = errors;
                Deleted::Kept(finish_record(&persist, record).await)
            }
        }
        .await;
        Outcome::Delete {
            config,
            previous,
            result,
        }
    })
}

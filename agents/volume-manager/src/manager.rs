//! The volume-manager's core: config events in, actions on volumes and backends, statuses out.
//!
//! Snapshot record lifecycle (`<persist>/snapshots/<id>/volumesSnapshotStatus.json`):
//! 1. intent: the record with `InProgress` = the action and the planned per-volume metadata is
//!    written durably before any backend call;
//! 2. the backend acts on each volume (snapshot name = the snapshot UUID);
//! 3. the final record (`InProgress` cleared, `ResultOfAction`, `RequestCounter`, errors) is
//!    written, then published. A successful delete removes the record instead.
//!
//! After a restart an in-progress record is resumed when its request is still there (a create
//! adopts the backend snapshots already made) and undone when it is not.
//!
//! Steps 1 (on disk) to 3 run in a task of their own ([`crate::work`]); the manager plans before
//! and applies the outcome after, and starts operations in the order [`crate::queue`] allows:
//! in arrival order on a shared snapshot or volume, side by side otherwise.
//!
//! Making and removing a volume run in tasks too (with [`VolumeManager::with_volume_tasks`], as
//! the agent does; library callers await them in place): the work claims the volume's uuid (a
//! clone also its source and the snapshot), so snapshot operations on it wait, and a config,
//! hold or removal that meets a volume being worked on is deferred until the work ends. No
//! record is written for it: a half-made volume is under a dot name, swept at the next start.
//!
//! A volume goes when no config, no snapshot record and no app refers to it. The apps' holds
//! (`AppVolumeRefs`, from the app-manager) matter after a purge: the old generation has lost its
//! config, but the app may still run on it, an APP_UPDATE snapshot may be about to be taken of
//! it, or a rollback to a purgeable snapshot may have pointed the app back at it. Until the
//! app-manager's table is known complete (its publication passed its restart barrier), no volume
//! is released at all.
//!
//! Local generations (a bare purge: the app-manager wants fresh volumes while the controller's
//! generation stays): a `VolumeConfig` `<uuid>#<gen>` configures the *line* (uuid, gen); the
//! volumes of that line are `<uuid>#<gen>` (local generation 0, made when the config arrives) and
//! `<uuid>#<gen>.<local>`, made from the same config (fresh, from its origin) when an app holds
//! that key ([`VolumeManager::handle_app_volume_refs`]). A line's volume is *superseded* when a
//! volume of a higher local generation of the line exists or is held: it is then released like
//! an unconfigured one (kept while held or while a snapshot lives in it), and not made again
//! when its config comes back after a restart (the persistent `VolumeStatus` of the newer one
//! says it was superseded). Nothing is recorded besides the statuses and the holds.
//!
//! Deletion grace: a volume whose uuid leaves the config entirely (no generation of
//! it configured) is not deleted at once. It is detached (no `VolumeConfig` names it, so no app
//! may use it), kept with its data and the snapshots living in it, and reported in
//! `VolumeStatus.PendingDeletion` with the reason and the deadline: `since` + the grace in force
//! (config item `cairn.volume.delete.grace.seconds`, default 24 h; 0 is EVE's immediate
//! deletion). The status is persistent and written before delivery, so a restart keeps counting
//! from the same `since`; a deadline is acted on only once the config items are known (never
//! early on a default). The same key configured again within the grace gets the volume back as
//! it is. A superseded generation (the uuid still configured at another generation: a purge)
//! keeps the rules above; so does a volume past its deadline (holds and snapshots keep it).
//!
//! A snapshot keeps its volume only if it lives in it: qcow2 internal snapshots, the purgeable
//! backend (the snapshot is the volume), ZFS (a dataset's snapshots go with it). Copy and btrfs
//! snapshots are trees of their own, so a purged volume they were taken of is released; a
//! rollback to one makes the volume again at its old place and reports it Ready.

//!
//! Clones (`VolumeOrigin::Snapshot`, made by the config-agent from an app's `clone_of`): a new
//! volume made as a copy of another volume's state in a snapshot, read from that snapshot's
//! record ([`volumes::create_clone`] says how per backend). While the snapshot is not available
//! (not taken yet, being taken, failed, being deleted or deleted) the clone is `Failed` with the
//! reason, and it is made as soon as a create of that snapshot succeeds (or its config comes
//! again). Once made, a clone is an ordinary volume: nothing ties it to its source.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_types::layout::{VOLUMES_SNAPSHOT_STATUS_FILE, snapshot_dir, snapshots_dir, volumes_dir};
use cairn_types::snapshot::{VolumesSnapshotAction, VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{
    AppVolumeRefs, SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin,
    VolumeSnapshotMeta, VolumeState, VolumeStatus, parse_volume_key,
};
use uuid::Uuid;

use crate::backend::Tools;
use crate::backend::{Backends, VolumeRef};
use crate::error::VolumeError;
use crate::queue::{Claim, Claims, OperationId, Queue};
use crate::volumes;
use crate::work::{
    self, Created, Deleted, Making, MetaEntry, Outcome, RolledBack, VolumeOutcome, VolumeWork,
    Work, error, now,
};

/// The agent's name on the bus.
pub const AGENT: &str = "volume-manager";
/// After the intent record is written, before any backend call.
pub const CRASH_AFTER_INTENT_WRITE: &str = "volume-manager:after-intent-write";
/// After a backend snapshot is made, before the record says so.
pub const CRASH_AFTER_BACKEND_CREATE: &str = "volume-manager:after-backend-create";
/// After the final record is written, before it is published.
pub const CRASH_AFTER_RECORD_WRITE: &str = "volume-manager:after-record-write";
/// After the backend snapshots are deleted, before the record is removed.
pub const CRASH_AFTER_BACKEND_DELETE: &str = "volume-manager:after-backend-delete";
/// After the volumes are rolled back, before the record says so.
pub const CRASH_AFTER_BACKEND_ROLLBACK: &str = "volume-manager:after-backend-rollback";

/// What the bus layer must do with the outcome of a handler, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Publish {
    Volume(VolumeStatus),
    UnpublishVolume(String),
    Snapshot(VolumesSnapshotStatus),
    UnpublishSnapshot(String),
    /// The snapshot requests known at start are reconciled: the snapshot statuses are complete
    /// (the publication's restart barrier may pass).
    SnapshotsReconciled,
}

/// A snapshot event, queued in arrival order ([`VolumeManager::submit`]).
#[derive(Debug, Clone)]
pub enum SnapshotEvent {
    /// A `VolumesSnapshotConfig` created or modified.
    Request(VolumesSnapshotConfig),
    /// A `VolumesSnapshotConfig` deleted.
    Withdrawn(Uuid),
    /// The requests are synchronized: these are all of them.
    Synchronized(BTreeSet<Uuid>),
}

/// The default bound on snapshot operations running at once: the CPUs, and at least 8. The
/// work mostly waits on the disk and on qemu-img, so the CPUs are a poor bound; eight apps
/// snapshotted at one moment took 1.2-1.7x eight raw `qemu-img` in parallel with 4, 0.9-1.4x
/// with 8.
pub fn default_parallel_operations() -> usize {
    std::thread::available_parallelism().map_or(8, |n| n.get().max(8))
}

/// A snapshot operation's slow half ended (or its task died): for [`VolumeManager::complete`].
pub struct OperationDone(Result<(tokio::task::Id, Outcome), tokio::task::JoinError>);

/// What a running task is doing, for [`VolumeManager::complete`].
enum Running {
    Snapshot(OperationId, VolumesSnapshotConfig),
    /// Making (`planned` is its Creating status) or removing volume `key`.
    Volume {
        operation: OperationId,
        key: String,
        planned: Option<Box<VolumeStatus>>,
    },
}

/// A request's first half: answered at once, or slow work to run.
enum Step {
    Done(Vec<Publish>),
    Work(Work),
}

/// The volumes an event may have changed the fate of: every one, or those with these uuids.
enum Scope {
    All,
    Volumes(BTreeSet<Uuid>),
}

impl Scope {
    /// The volumes these keys name; every volume if one is not a volume key.
    fn of_keys<K: AsRef<str>>(keys: impl IntoIterator<Item = K>) -> Self {
        let mut ids = BTreeSet::new();
        for key in keys {
            match parse_volume_key(key.as_ref()) {
                Some((id, _, _)) => ids.insert(id),
                None => return Self::All,
            };
        }
        Self::Volumes(ids)
    }
}

/// The entries of a map keyed by volume key (`<uuid>#<generation>[.<local>]`) that name the
/// volume `id`, at any generation: they sort together, between `<uuid>#` and `<uuid>$`.
fn of_volume<V>(
    map: &BTreeMap<String, V>,
    id: Uuid,
) -> std::collections::btree_map::Range<'_, String, V> {
    map.range(format!("{id}#")..format!("{id}$"))
}

/// The path of a snapshot's volume record.
pub fn record_path(persist: &Path, snapshot: Uuid) -> PathBuf {
    snapshot_dir(persist, snapshot).join(VOLUMES_SNAPSHOT_STATUS_FILE)
}

pub struct VolumeManager {
    persist: PathBuf,
    volumes_dir: PathBuf,
    backends: Backends,
    configs: BTreeMap<String, VolumeConfig>,
    statuses: BTreeMap<String, VolumeStatus>,
    /// Volume keys that had a volume before this process started (from the reloaded publication).
    known_before: BTreeSet<String>,
    records: BTreeMap<Uuid, VolumesSnapshotStatus>,
    /// Record files that could not be read: reported, never trusted, never deleted.
    pub unreadable_records: Vec<(PathBuf, String)>,
    /// Per app, the volume keys it holds (the app-manager's `AppVolumeRefs`).
    app_holds: BTreeMap<Uuid, BTreeSet<String>>,
    /// `app_holds` the other way round: per held key, the apps holding it. Keyed by volume key
    /// like `statuses` and `configs`, so one volume's entries are one range ([`of_volume`]).
    held: BTreeMap<String, BTreeSet<Uuid>>,
    /// Whether `app_holds` is the app-manager's whole table; until it is, nothing is released.
    app_holds_known: bool,
    /// The deletion grace of a volume that left the config, once the config items are known.
    delete_grace: Option<chrono::Duration>,
    /// Snapshot events waiting for their turn, and the claims of the running ones.
    queue: Queue<SnapshotEvent>,
    /// The slow halves running, each with its operation and request.
    running: tokio::task::JoinSet<Outcome>,
    running_ops: HashMap<tokio::task::Id, Running>,
    /// Whether volume work runs in tasks (the agent) or is awaited where it starts.
    volume_tasks: bool,
    /// Keys of the volumes being made or removed in tasks.
    volume_work: BTreeSet<String>,
    /// Bounds volume work running at once, as the queue's limit bounds snapshot operations.
    volume_permits: Arc<tokio::sync::Semaphore>,
    /// Volume uuids whose making or removal waited for a snapshot operation on them.
    deferred: BTreeSet<Uuid>,
    /// The downloader's content trees (volumes with a `ContentTree` origin wait for theirs).
    content_trees: BTreeMap<Uuid, cairn_types::ContentTreeStatus>,
    /// The object-store remotes (volumes restored from an export at one wait for its config).
    remotes: BTreeMap<String, cairn_types::RemoteConfig>,
}

impl VolumeManager {
    /// Loads the snapshot records under `persist` and sweeps leftovers of interrupted volume work.
    /// `previous` are the volume statuses the agent published before it restarted.
    pub async fn open(persist: &Path, tools: Tools, previous: Vec<VolumeStatus>) -> Self {
        let dir = snapshots_dir(persist);
        let (records, unreadable_records) = tokio::task::spawn_blocking(move || load_records(&dir))
            .await
            .unwrap_or_default();
        for (path, why) in &unreadable_records {
            tracing::error!(path = %path.display(), "snapshot record unusable, left as it is: {why}");
        }
        let volumes_dir = volumes_dir(persist);
        volumes::sweep_leftovers(&volumes_dir).await;
        Self {
            persist: persist.to_path_buf(),
            volumes_dir,
            backends: Backends { tools },
            configs: BTreeMap::new(),
            statuses: BTreeMap::new(),
            known_before: previous
                .iter()
                .filter(|s| s.state == VolumeState::Ready)
                .map(VolumeStatus::key)
                .collect(),
            records,
            unreadable_records,
            app_holds: BTreeMap::new(),
            held: BTreeMap::new(),
            app_holds_known: false,
            delete_grace: None,
            queue: Queue::new(default_parallel_operations()),
            running: tokio::task::JoinSet::new(),
            running_ops: HashMap::new(),
            volume_tasks: false,
            volume_work: BTreeSet::new(),
            volume_permits: Arc::new(tokio::sync::Semaphore::new(default_parallel_operations())),
            deferred: BTreeSet::new(),
            content_trees: BTreeMap::new(),
            remotes: BTreeMap::new(),
        }
    }

    /// At most `limit` snapshot operations run at once.
    pub fn with_parallel_operations(mut self, limit: usize) -> Self {
        self.queue.set_limit(limit);
        self.volume_permits = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
        self
    }

    /// Volumes are made and removed in tasks of their own, their ends awaited with
    /// [`Self::operation_done`] like snapshot operations; else each is awaited where it starts.
    pub fn with_volume_tasks(mut self) -> Self {
        self.volume_tasks = true;
        self
    }

    pub fn record(&self, snapshot: Uuid) -> Option<&VolumesSnapshotStatus> {
        self.records.get(&snapshot)
    }

    pub fn records(&self) -> impl Iterator<Item = &VolumesSnapshotStatus> {
        self.records.values()
    }

    pub fn volume_status(&self, key: &str) -> Option<&VolumeStatus> {
        self.statuses.get(key)
    }

    pub fn volumes_dir(&self) -> &Path {
        &self.volumes_dir
    }

    // ---- volumes -------------------------------------------------------------------------

    /// `VolumeConfig` create or modify: make the volume, or adopt the one already there; and the
    /// held local generations of its line. A line's volume superseded by a newer local
    /// generation (before a restart) is not made again unless an app holds it.
    pub async fn handle_volume_config(&mut self, config: VolumeConfig) -> Vec<Publish> {
        let key = config.key();
        self.configs.insert(key.clone(), config.clone());
        let mut out = Vec::new();
        let absent = !self.statuses.contains_key(&key)
            && !volumes::volume_path(&self.volumes_dir, &config).exists();
        if absent && self.superseded(&key, true) && self.holding_apps(&key).is_empty() {
            tracing::info!(volume = %key, "superseded by a newer local generation: not made again");
        } else {
            out.extend(self.make_volume(&config).await);
        }
        out.extend(
            self.make_held(&Scope::Volumes(BTreeSet::from([config.volume_id])))
                .await,
        );
        out
    }

    /// Makes the volume `config` names (its key, local generation included), or adopts the one
    /// already there; a volume known before and now missing is reported, not made empty.
    /// Nothing yet while a snapshot operation runs on it (or on a clone's source), or while it
    /// is being made or removed: seen again when that ends.
    async fn make_volume(&mut self, config: &VolumeConfig) -> Option<Publish> {
        let key = config.key();
        let path = volumes::volume_path(&self.volumes_dir, config);
        if self.volume_work.contains(&key) {
            tracing::info!(volume = %key, "being made or removed: seen again once that ends");
            self.deferred.insert(config.volume_id);
            return None;
        }
        if let Some(status) = self.statuses.get_mut(&key)
            && status.state == VolumeState::Ready
            && path.exists()
        {
            status.display_name = config.display_name.clone();
            if status.pending_deletion.take().is_some() {
                tracing::info!(volume = %key, "back in the config within its deletion grace: kept as it is");
            }
            return Some(Publish::Volume(status.clone()));
        }
        if self.waits_for_snapshot_work(config) {
            return None;
        }
        let choice = volumes::choose_backend(config, &self.volumes_dir, &self.backends.tools);
        let backend = choice.kind;
        let mut status = VolumeStatus {
            volume_id: config.volume_id,
            generation_counter: config.generation_counter,
            local_generation_counter: config.local_generation_counter,
            display_name: config.display_name.clone(),
            state: VolumeState::Creating,
            format: config.format,
            backend,
            backend_reason: choice.reason,
            file_location: path.clone(),
            max_vol_size: config.max_vol_size,
            ..VolumeStatus::default()
        };
        if let Err(e) = self.backends.check(backend, &key) {
            status.warnings.push(format!("snapshots unavailable: {e}"));
        }
        // A clone still waiting for its snapshot (Failed, never made) is tried again.
        // So is one waiting for its content tree (Creating or Failed, never made).
        let waiting_clone = !self.known_before.contains(&key)
            && self
                .statuses
                .get(&key)
                .is_some_and(|s| match config.origin {
                    VolumeOrigin::Snapshot { .. } => s.state == VolumeState::Failed,
                    VolumeOrigin::ContentTree { .. } => s.state != VolumeState::Ready,
                    // Never made: tried again (a remote configured or changed since).
                    VolumeOrigin::RemoteExport { .. } => s.state == VolumeState::Failed,
                    _ => false,
                });
        let mut claims = BTreeSet::from([Claim::Volume(config.volume_id)]);
        let making = if let Some(why) = &config.unusable {
            Err(VolumeError::Unusable {
                volume: key.clone(),
                why: why.clone(),
            })
        } else if path.exists() {
            Ok(Making::Existing)
        } else if !waiting_clone
            && (self.known_before.contains(&key) || self.statuses.contains_key(&key))
        {
            Err(VolumeError::Missing {
                volume: key.clone(),
                path: path.clone(),
            })
        } else if let VolumeOrigin::Snapshot { snapshot, volume } = config.origin {
            match self.clone_source(&key, snapshot, volume).await {
                Ok(source) => {
                    tracing::info!(volume = %key, snapshot = %snapshot, source = %source.volume_key, backend = ?source.backend, "cloning a volume from a snapshot");
                    // The snapshot and its volume stay as they are while they are read.
                    claims.extend([Claim::Volume(volume), Claim::Snapshot(snapshot)]);
                    Ok(Making::Clone(Box::new(source)))
                }
                Err(e) => Err(e),
            }
        } else if let VolumeOrigin::ContentTree { id } = config.origin {
            match crate::content::usable_blob(&key, id, &self.content_trees, &self.persist) {
                Ok(blob) => Ok(Making::Content { tree: id, blob }),
                Err(e) => Err(e),
            }
        } else if let VolumeOrigin::RemoteExport { remote, .. } = &config.origin {
            match self.remotes.get(remote) {
                Some(found) => Ok(Making::RemoteExport {
                    remote: Box::new(found.clone()),
                    persist: self.persist.clone(),
                }),
                None => Err(VolumeError::Unsupported {
                    volume: key.clone(),
                    what: format!(
                        "it is restored from an export at remote {remote}, which is not configured: it is made once the remote is"
                    ),
                }),
            }
        } else {
            Ok(Making::Fresh)
        };
        let making = match making {
            Ok(making) => making,
            Err(e) => return Some(self.volume_made(key, status, Err(e))),
        };
        // A volume already there is only checked and activated, here: at a restart every
        // configured volume is so, and each is published again before the restart barrier.
        let in_place = !self.volume_tasks || matches!(making, Making::Existing);
        let permits = (!in_place).then(|| self.volume_permits.clone());
        let work = work::make_volume(
            self.backends.clone(),
            config.clone(),
            path,
            backend,
            making,
            status.clone(),
            permits,
        );
        if in_place {
            return self.volume_done(work.await);
        }
        let planned = Publish::Volume(status.clone());
        // Creating until the work ends: configs, holds and removals that meet it wait.
        self.statuses.insert(key.clone(), status.clone());
        self.start_volume_work(key, Claims::Some(claims), work, Some(Box::new(status)));
        Some(planned)
    }

    /// Runs volume work in a task of its own, holding `claims`; [`Self::complete`] applies
    /// what it did.
    fn start_volume_work(
        &mut self,
        key: String,
        claims: Claims,
        work: VolumeWork,
        planned: Option<Box<VolumeStatus>>,
    ) {
        let operation = self.queue.start_now(claims);
        let task = self
            .running
            .spawn(async move { Outcome::Volume(work.await) });
        self.running_ops.insert(
            task.id(),
            Running::Volume {
                operation,
                key: key.clone(),
                planned,
            },
        );
        self.volume_work.insert(key);
    }

    /// What volume work did, in the statuses.
    fn volume_done(&mut self, outcome: VolumeOutcome) -> Option<Publish> {
        match outcome {
            VolumeOutcome::Made {
                key,
                status,
                result,
            } => Some(self.volume_made(key, *status, result)),
            VolumeOutcome::Removed { key, result } => self.volume_removed(key, result),
        }
    }

    /// A volume made (its size), or why not: its status, to publish.
    fn volume_made(
        &mut self,
        key: String,
        mut status: VolumeStatus,
        outcome: Result<u64, VolumeError>,
    ) -> Publish {
        // The config may have changed its name while the volume was made.
        if let Some(config) = self.configs.get(&key) {
            status.display_name = config.display_name.clone();
        }
        let backend = status.backend;
        match outcome {
            Ok(size) => {
                status.state = VolumeState::Ready;
                status.current_size = size;
                tracing::info!(volume = %key, backend = ?backend, reason = %status.backend_reason, driver = backend_driver(backend), path = %status.file_location.display(), "volume ready");
            }
            Err(e @ VolumeError::ContentNotReady { .. }) => {
                tracing::info!(volume = %key, "{e}");
                status.warnings.push(e.to_string());
            }
            Err(e) => {
                tracing::error!(volume = %key, "volume failed: {e}");
                status.state = VolumeState::Failed;
                status.error = error(e.to_string());
                if let VolumeError::ContentFailed { tree, .. } = &e {
                    status.error = status
                        .error
                        .about(cairn_types::ErrorEntityType::ContentTree, tree);
                }
            }
        }
        self.statuses.insert(key, status.clone());
        Publish::Volume(status)
    }

    /// A volume removed, or why not.
    fn volume_removed(&mut self, key: String, result: Result<(), VolumeError>) -> Option<Publish> {
        match result {
            Ok(()) => {
                tracing::info!(volume = %key, "volume deleted");
                self.statuses.remove(&key);
                Some(Publish::UnpublishVolume(key))
            }
            Err(e) => {
                let status = self.statuses.get_mut(&key)?;
                status.state = VolumeState::Failed;
                status.error = error(format!("cannot delete the volume: {e}"));
                Some(Publish::Volume(status.clone()))
            }
        }
    }

    /// Whether the volume `config` names, or a clone's source, has a snapshot operation
    /// running or waiting: then it is made after the operations on it.
    fn waits_for_snapshot_work(&mut self, config: &VolumeConfig) -> bool {
        let mut volumes = vec![config.volume_id];
        if let VolumeOrigin::Snapshot { volume, .. } = config.origin {
            volumes.push(volume);
        }
        let busy = volumes.iter().any(|v| self.volume_claimed(*v));
        if busy {
            tracing::info!(volume = %config.key(), "a snapshot operation runs or waits on it: made after it");
            self.deferred.extend(volumes);
        }
        busy
    }

    /// Whether a snapshot operation running or waiting claims the volume `volume`: the volume
    /// is neither made nor removed under it (a request that came before a removal still finds
    /// its volume).
    fn volume_claimed(&self, volume: Uuid) -> bool {
        let claim = Claim::Volume(volume);
        self.queue.busy(&claim) || self.queue.waiting().any(|e| self.claims(e).holds(&claim))
    }

    /// After snapshot operations: the volumes that waited for them are made or removed now.
    async fn retry_deferred(&mut self) -> Vec<Publish> {
        if self.deferred.is_empty() {
            return Vec::new();
        }
        let free: BTreeSet<Uuid> = self
            .deferred
            .iter()
            .filter(|v| !self.volume_claimed(**v))
            .copied()
            .collect();
        if free.is_empty() {
            return Vec::new();
        }
        self.deferred.retain(|v| !free.contains(v));
        let waiting: Vec<VolumeConfig> = self
            .configs
            .values()
            .filter(|c| {
                let source = match c.origin {
                    VolumeOrigin::Snapshot { volume, .. } => Some(volume),
                    _ => None,
                };
                (free.contains(&c.volume_id) || source.is_some_and(|s| free.contains(&s)))
                    && self
                        .statuses
                        .get(&c.key())
                        .is_none_or(|s| s.state != VolumeState::Ready)
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for config in waiting {
            out.extend(self.handle_volume_config(config).await);
        }
        let scope = Scope::Volumes(free);
        out.extend(self.make_held(&scope).await);
        out.extend(self.collect_volumes(&scope).await);
        out
    }

    /// The downloader's status of a content tree: the volumes waiting for it are made now
    /// (LOADED), or say why they cannot be (its error), or how far it got.
    pub async fn handle_content_tree(
        &mut self,
        status: Option<cairn_types::ContentTreeStatus>,
        id: Uuid,
    ) -> Vec<Publish> {
        let before = match status {
            Some(status) => self.content_trees.insert(id, status),
            None => self.content_trees.remove(&id),
        };
        // Progress, or the same error again at a retry, changes nothing for a volume.
        let now = self.content_trees.get(&id);
        if before.as_ref().map(|s| (s.state, &s.error.error))
            == now.map(|s| (s.state, &s.error.error))
        {
            return Vec::new();
        }
        let waiting: Vec<VolumeConfig> = self
            .configs
            .values()
            .filter(|c| {
                matches!(c.origin, VolumeOrigin::ContentTree { id: t } if t == id)
                    && self
                        .statuses
                        .get(&c.key())
                        .is_some_and(|s| s.state != VolumeState::Ready)
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for config in waiting {
            out.extend(self.make_volume(&config).await);
        }
        out
    }

    /// A remote's config (new or changed): the volumes restored from an export at it that are
    /// not made yet are tried (again).
    pub async fn handle_remote(&mut self, config: cairn_types::RemoteConfig) -> Vec<Publish> {
        let id = config.id.clone();
        self.remotes.insert(id.clone(), config);
        let waiting: Vec<VolumeConfig> = self
            .configs
            .values()
            .filter(|c| {
                matches!(&c.origin, VolumeOrigin::RemoteExport { remote, .. } if *remote == id)
                    && self
                        .statuses
                        .get(&c.key())
                        .is_none_or(|s| s.state == VolumeState::Failed)
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for config in waiting {
            out.extend(self.make_volume(&config).await);
        }
        out
    }

    /// The metadata of volume `source` in snapshot `snapshot`, from the snapshot's record, for
    /// cloning it into `key`: refused (with the reason) while the snapshot is not complete and
    /// present on its backend: not taken yet, being taken, failed, being deleted or deleted.
    async fn clone_source(
        &self,
        key: &str,
        snapshot: Uuid,
        source: Uuid,
    ) -> Result<VolumeSnapshotMeta, VolumeError> {
        let unavailable = |why: String| VolumeError::CloneSourceUnavailable {
            volume: key.to_string(),
            snapshot,
            source_volume: source,
            why,
        };
        let Some(record) = self.records.get(&snapshot) else {
            return Err(unavailable(
                "the snapshot is not on this device (not taken yet, or deleted)".into(),
            ));
        };
        match record.in_progress {
            VolumesSnapshotAction::Create => {
                return Err(unavailable("the snapshot is being taken".into()));
            }
            VolumesSnapshotAction::Delete => {
                return Err(unavailable("the snapshot is being deleted".into()));
            }
            _ => {}
        }
        if record.result_of_action == VolumesSnapshotAction::Create && record.error.is_error() {
            return Err(unavailable(format!(
                "the snapshot failed: {}",
                record.error.error
            )));
        }
        let Some(meta) = record.meta_of(source) else {
            return Err(unavailable(
                "the snapshot does not include that volume".into(),
            ));
        };
        let meta = self.complete_legacy_meta(source, meta);
        match self.backends.exists(&meta).await {
            Ok(true) => Ok(meta),
            Ok(false) => Err(unavailable(
                "the snapshot is no longer on its backend (removed outside Cairn?)".into(),
            )),
            Err(e) => Err(unavailable(format!("its backend cannot read it: {e}"))),
        }
    }

    /// Clone volumes waiting for `snapshot` (Failed because it was not available): made now.
    async fn make_waiting_clones(&mut self, snapshot: Uuid) -> Vec<Publish> {
        let waiting: Vec<VolumeConfig> = self
            .configs
            .values()
            .filter(|c| {
                matches!(c.origin, VolumeOrigin::Snapshot { snapshot: s, .. } if s == snapshot)
                    && self
                        .statuses
                        .get(&c.key())
                        .is_some_and(|s| s.state == VolumeState::Failed)
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for config in waiting {
            tracing::info!(volume = %config.key(), snapshot = %snapshot, "snapshot available: making the clone waiting for it");
            out.extend(self.make_volume(&config).await);
        }
        out
    }

    /// Held keys with no volume whose line is configured: made from the line's config at the
    /// held local generation (a bare purge's fresh volume; or, after a rollback to a snapshot
    /// taken before the purge, the superseded line volume again). Only the keys of the volumes
    /// in `scope`: what an event can have changed.
    async fn make_held(&mut self, scope: &Scope) -> Vec<Publish> {
        let held: Vec<String> = match scope {
            Scope::All => self.held.keys().cloned().collect(),
            Scope::Volumes(ids) => ids
                .iter()
                .flat_map(|id| of_volume(&self.held, *id).map(|(k, _)| k.clone()))
                .collect(),
        };
        let mut wanted = Vec::new();
        for key in held {
            if self.statuses.contains_key(&key) {
                continue;
            }
            let Some((volume_id, generation, local)) = parse_volume_key(&key) else {
                continue;
            };
            let line = of_volume(&self.configs, volume_id)
                .map(|(_, c)| c)
                .find(|c| c.generation_counter == generation);
            if let Some(line) = line {
                let mut config = line.clone();
                config.local_generation_counter = local;
                if config.key() == key {
                    wanted.push(config);
                }
            }
        }
        let mut out = Vec::new();
        for config in wanted {
            tracing::info!(volume = %config.key(), "making the volume an app holds at a new local generation");
            out.extend(self.make_volume(&config).await);
        }
        out
    }

    /// Whether a volume of a higher local generation of `key`'s line exists or is held (or,
    /// with `before`, was Ready before this process started).
    fn superseded(&self, key: &str, before: bool) -> bool {
        let Some((id, generation, local)) = parse_volume_key(key) else {
            return false;
        };
        let range = format!("{id}#")..format!("{id}$");
        let known_before = before
            .then(|| self.known_before.range(range))
            .into_iter()
            .flatten();
        of_volume(&self.statuses, id)
            .map(|(k, _)| k)
            .chain(known_before)
            .chain(of_volume(&self.held, id).map(|(k, _)| k))
            .filter_map(|k| parse_volume_key(k))
            .any(|(i, g, l)| i == id && g == generation && l > local)
    }

    /// Whether `key`'s line (uuid, generation) is configured.
    fn line_configured(&self, key: &str) -> bool {
        match parse_volume_key(key) {
            Some((id, generation, _)) => {
                of_volume(&self.configs, id).any(|(_, c)| c.generation_counter == generation)
            }
            None => self.configs.contains_key(key),
        }
    }

    /// The volumes in `scope` that are not their configured line's newest ([`line_configured`]
    /// and not [`superseded`]), which is kept like a configured one, held or not (the app may
    /// be deactivated: its purged volume is its data now). Volume by volume, each a range of
    /// the maps keyed by volume key: an app's event costs its own volumes, not a pass over all
    /// of them (at 1,000 apps that pass at every `AppVolumeRefs` made populating quadratic).
    ///
    /// [`line_configured`]: Self::line_configured
    /// [`superseded`]: Self::superseded
    fn not_current(&self, scope: &Scope) -> Vec<String> {
        match scope {
            Scope::All => {
                let mut ids = BTreeSet::new();
                let mut out = Vec::new();
                for key in self.statuses.keys() {
                    match parse_volume_key(key) {
                        Some((id, _, _)) => {
                            ids.insert(id);
                        }
                        None if !self.configs.contains_key(key) => out.push(key.clone()),
                        None => {}
                    }
                }
                for id in ids {
                    out.extend(self.not_current_of(id));
                }
                out
            }
            Scope::Volumes(ids) => ids.iter().flat_map(|id| self.not_current_of(*id)).collect(),
        }
    }

    /// [`Self::not_current`] of the volume `id`'s keys (any generation).
    fn not_current_of(&self, id: Uuid) -> Vec<String> {
        let configured: BTreeSet<i64> = of_volume(&self.configs, id)
            .map(|(_, c)| c.generation_counter)
            .collect();
        let mut newest: BTreeMap<i64, i64> = BTreeMap::new();
        let keys = of_volume(&self.statuses, id)
            .map(|(k, _)| k)
            .chain(of_volume(&self.held, id).map(|(k, _)| k));
        for (_, generation, local) in keys.filter_map(|k| parse_volume_key(k)) {
            let top = newest.entry(generation).or_insert(local);
            *top = (*top).max(local);
        }
        of_volume(&self.statuses, id)
            .filter(|(key, _)| match parse_volume_key(key) {
                Some((_, generation, local)) => {
                    !configured.contains(&generation)
                        || newest.get(&generation).is_some_and(|top| *top > local)
                }
                None => !self.configs.contains_key(*key),
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// `VolumeConfig` delete: the volume goes unless a snapshot still keeps it.
    pub async fn handle_volume_config_delete(&mut self, key: &str) -> Vec<Publish> {
        self.configs.remove(key);
        self.collect_volumes(&Scope::of_keys([key])).await
    }

    /// Volumes published by a previous run whose config is gone: removed unless a snapshot
    /// keeps them.
    pub async fn adopt_unconfigured(&mut self, previous: Vec<VolumeStatus>) -> Vec<Publish> {
        let mut adopted = Vec::new();
        for status in previous {
            let key = status.key();
            if !self.configs.contains_key(&key) {
                self.statuses.entry(key.clone()).or_insert(status);
                adopted.push(key);
            }
        }
        let mut out = self.collect_volumes(&Scope::All).await;
        // Published again before the restart barrier, which drops what was not: a kept volume
        // (pending deletion, or held) must stay visible.
        for key in adopted {
            if let Some(status) = self.statuses.get(&key) {
                out.push(Publish::Volume(status.clone()));
            }
        }
        out
    }

    // ---- apps' holds ---------------------------------------------------------------------

    /// Replaces `app`'s holds (none: it holds nothing any more), keeping [`Self::held`] in
    /// step; the volumes whose holds changed, released or taken.
    ///
    /// [`Self::held`]: VolumeManager
    fn set_holds(&mut self, app: Uuid, keys: Option<BTreeSet<String>>) -> Scope {
        let old = match keys.clone() {
            Some(keys) => self.app_holds.insert(app, keys),
            None => self.app_holds.remove(&app),
        }
        .unwrap_or_default();
        let new = keys.unwrap_or_default();
        for key in old.difference(&new) {
            if let Some(apps) = self.held.get_mut(key) {
                apps.remove(&app);
                if apps.is_empty() {
                    self.held.remove(key);
                }
            }
        }
        for key in new.difference(&old) {
            self.held.entry(key.clone()).or_default().insert(app);
        }
        Scope::of_keys(old.symmetric_difference(&new))
    }

    /// `AppVolumeRefs` create or modify: volumes the app no longer holds may go.
    /// Held keys of a new local generation are made first.
    pub async fn handle_app_volume_refs(&mut self, refs: AppVolumeRefs) -> Vec<Publish> {
        let scope = self.set_holds(refs.app_uuid, Some(refs.volume_keys));
        let mut out = self.make_held(&scope).await;
        out.extend(self.collect_volumes(&scope).await);
        out
    }

    /// `AppVolumeRefs` delete: the app holds nothing any more.
    pub async fn handle_app_volume_refs_delete(&mut self, app: Uuid) -> Vec<Publish> {
        let scope = self.set_holds(app, None);
        self.collect_volumes(&scope).await
    }

    /// The app-manager's table is complete (its publication passed its restart barrier):
    /// volumes nothing refers to may go from now on.
    pub async fn handle_app_volume_refs_complete(&mut self) -> Vec<Publish> {
        self.app_holds_known = true;
        self.collect_volumes(&Scope::All).await
    }

    /// The app-manager restarted: until its table is complete again, no volume is released (a
    /// rebooted app-manager starts with an empty table).
    pub fn handle_app_volume_refs_restarting(&mut self) {
        self.app_holds_known = false;
    }

    // ---- deletion grace ------------------------------------------------------------------

    /// The config items in force (`None`: not known, e.g. no config in force yet): the grace
    /// applies to every volume pending deletion, counted from when it left the config.
    pub async fn handle_config_items(
        &mut self,
        items: Option<&cairn_types::ConfigItemValueMap>,
    ) -> Vec<Publish> {
        self.delete_grace = items.map(|items| {
            let seconds = items.volume_delete_grace_seconds().unwrap_or_else(|why| {
                // The config-agent refuses such a config; a longer wait is the safe side.
                tracing::warn!("{why}; the default applies");
                cairn_types::device::DEFAULT_VOLUME_DELETE_GRACE_SECONDS
            });
            chrono::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 1000))
        });
        let mut out = Vec::new();
        let grace = self.grace_or_default();
        for status in self.statuses.values_mut() {
            if let Some(pending) = status.pending_deletion.as_mut() {
                let delete_at = pending.since.map(|since| since + grace);
                if pending.delete_at != delete_at {
                    pending.delete_at = delete_at;
                    out.push(Publish::Volume(status.clone()));
                }
            }
        }
        tracing::info!(
            grace_s = grace.num_seconds(),
            known = self.delete_grace.is_some(),
            "volume deletion grace"
        );
        out.extend(self.collect_volumes(&Scope::All).await);
        out
    }

    fn grace_or_default(&self) -> chrono::Duration {
        self.delete_grace.unwrap_or_else(|| {
            chrono::Duration::seconds(
                cairn_types::device::DEFAULT_VOLUME_DELETE_GRACE_SECONDS as i64,
            )
        })
    }

    /// The earliest deadline still to come of a volume pending deletion, once the grace is
    /// known. (One passed is acted on at once; if a hold or a snapshot keeps the volume, their
    /// release collects it.)
    pub fn next_deletion(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.delete_grace?;
        let now = now();
        self.statuses
            .values()
            .filter_map(|s| s.pending_deletion.as_ref()?.delete_at)
            .filter(|at| *at > now)
            .min()
    }

    /// A deadline passed: the volumes due go (unless held or kept by a snapshot).
    pub async fn handle_deletion_due(&mut self) -> Vec<Publish> {
        self.collect_volumes(&Scope::All).await
    }

    /// Whether `key`'s volume is kept for its deletion grace: its uuid has left the config
    /// and the deadline has not passed (or the grace is not known yet). Marks it pending the
    /// first time, in `out`.
    fn in_grace(&mut self, key: &str, out: &mut Vec<Publish>) -> bool {
        let Some((id, _, _)) = parse_volume_key(key) else {
            return false;
        };
        if of_volume(&self.configs, id).next().is_some() {
            return false; // superseded by another generation: a purge, EVE's rules
        }
        let grace = self.grace_or_default();
        let known = self.delete_grace.is_some();
        let Some(status) = self.statuses.get_mut(key) else {
            return false;
        };
        if status.pending_deletion.is_none() {
            if known && grace.is_zero() {
                return false;
            }
            let since = now();
            let delete_at = since + grace;
            status.pending_deletion = Some(cairn_types::PendingDeletion {
                since: Some(since),
                delete_at: Some(delete_at),
                reason: format!(
                    "volume {id} is no longer in the config: detached and kept with its data until its deletion time; put it back in the config (same uuid and generation) to keep it (config item {} sets the grace)",
                    cairn_types::device::VOLUME_DELETE_GRACE_ITEM
                ),
            });
            tracing::warn!(volume = %key, %delete_at, "left the config: pending deletion");
            out.push(Publish::Volume(status.clone()));
            return true;
        }
        if !known {
            return true;
        }
        // The grace in force counts from `since` (a grace changed while the agent was down
        // applies too).
        let Some(pending) = status.pending_deletion.as_mut() else {
            return false;
        };
        let delete_at = pending.since.map(|since| since + grace);
        if pending.delete_at != delete_at {
            pending.delete_at = delete_at;
            out.push(Publish::Volume(status.clone()));
        }
        delete_at.is_none_or(|at| now() < at)
    }

    fn holding_apps(&self, key: &str) -> Vec<Uuid> {
        self.held
            .get(key)
            .map(|apps| apps.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Snapshots that live in the volume `key` (see the module doc): a copy or btrfs snapshot
    /// does not keep its volume.
    fn keeping_snapshots(&self, key: &str) -> Vec<Uuid> {
        self.records
            .values()
            .filter(|r| {
                r.volume_snapshot_meta.values().any(|m| {
                    let meta = VolumeSnapshotMeta::from_value(m);
                    meta.volume_key == key && !self.backends.snapshot_outside_volume(meta.backend)
                })
            })
            .map(|r| r.snapshot_id)
            .collect()
    }

    /// Removes the volumes in `scope` no config (or only a superseded one), no app and no
    /// snapshot living in them refers to; marks the ones kept.
    async fn collect_volumes(&mut self, scope: &Scope) -> Vec<Publish> {
        let mut out = Vec::new();
        let orphans = self.not_current(scope);
        for key in orphans {
            if self.volume_work.contains(&key) {
                continue; // being made (seen again at its end) or already being removed
            }
            if self.in_grace(&key, &mut out) {
                continue;
            }
            let keepers = self.keeping_snapshots(&key);
            let holders = self.holding_apps(&key);
            let known = self.app_holds_known;
            let configured = self.line_configured(&key);
            let claimed = self
                .statuses
                .get(&key)
                .is_some_and(|s| self.volume_claimed(s.volume_id));
            let Some(status) = self.statuses.get_mut(&key) else {
                continue;
            };
            if !keepers.is_empty() || !holders.is_empty() {
                let mut why = Vec::new();
                if !keepers.is_empty() {
                    why.push(format!("snapshot(s) {keepers:?}"));
                }
                if !holders.is_empty() {
                    why.push(format!("app(s) {holders:?} using it"));
                }
                let what = if configured {
                    "kept after a purge (superseded by a newer local generation)"
                } else {
                    "kept without config"
                };
                let warning = format!("{what} for {}", why.join(" and "));
                if !status.warnings.contains(&warning) {
                    status.warnings.retain(|w| {
                        !w.starts_with("kept without config")
                            && !w.starts_with("kept after a purge")
                    });
                    status.warnings.push(warning);
                    out.push(Publish::Volume(status.clone()));
                }
                continue;
            }
            if !known {
                tracing::debug!(volume = %key, "unconfigured; released once the app-manager's holds are known");
                continue;
            }
            if claimed {
                tracing::info!(volume = %key, "a snapshot operation runs or waits on it: removed after it");
                self.deferred.insert(status.volume_id);
                continue;
            }
            let claims = Claims::Some(BTreeSet::from([Claim::Volume(status.volume_id)]));
            let work = work::remove_volume(
                key.clone(),
                status.file_location.clone(),
                self.volume_permits.clone(),
            );
            if self.volume_tasks {
                self.start_volume_work(key, claims, work, None);
            } else {
                out.extend(self.volume_done(work.await));
            }
        }
        out
    }

    /// The volume a snapshot request names: the generation it asks for (a purge's snapshot is
    /// of the pre-purge generation, configured or not), else the current one.
    fn requested_volume(
        &self,
        config: &VolumesSnapshotConfig,
        volume_id: Uuid,
    ) -> Result<(VolumeRef, SnapshotBackendKind), VolumeError> {
        let Some(key) = config.volume_keys.get(&volume_id) else {
            return self
                .current_volume(volume_id)
                .ok_or(VolumeError::UnknownVolume { volume: volume_id });
        };
        match self.statuses.get(key) {
            Some(s) if s.state == VolumeState::Ready => Ok((
                VolumeRef {
                    key: key.clone(),
                    path: s.file_location.clone(),
                },
                s.backend,
            )),
            Some(s) => Err(VolumeError::Unsupported {
                volume: key.clone(),
                what: format!("it is {:?}, not ready: {}", s.state, s.error.error),
            }),
            None => Err(VolumeError::UnknownGeneration {
                volume: volume_id,
                key: key.clone(),
            }),
        }
    }

    /// The current volume of `volume_id` (its highest configured generation).
    fn current_volume(&self, volume_id: Uuid) -> Option<(VolumeRef, SnapshotBackendKind)> {
        of_volume(&self.configs, volume_id)
            .map(|(_, c)| c)
            .max_by_key(|c| c.generation_counter + c.local_generation_counter)
            .and_then(|c| self.statuses.get(&c.key()))
            .map(|s| {
                (
                    VolumeRef {
                        key: s.key(),
                        path: s.file_location.clone(),
                    },
                    s.backend,
                )
            })
    }

    fn mark_volume_failed(&mut self, key: &str, e: &VolumeError) -> Option<Publish> {
        if !matches!(e, VolumeError::Missing { .. } | VolumeError::Corrupt { .. }) {
            return None;
        }
        let status = self.statuses.get_mut(key)?;
        status.state = VolumeState::Failed;
        status.error = error(e.to_string());
        Some(Publish::Volume(status.clone()))
    }

    // ---- snapshots -----------------------------------------------------------------------

    async fn store(&self, record: &VolumesSnapshotStatus) -> Result<(), String> {
        work::store_record(&self.persist, record).await
    }

    async fn remove_record(&self, snapshot: Uuid) -> Result<(), String> {
        work::remove_record(&self.persist, snapshot).await
    }

    /// A snapshot event in arrival order: it runs as soon as no earlier event on the same
    /// snapshot or volume is waiting or running, its slow half in a task of its own (see
    /// [`crate::queue`]); the publications of what could be done at once.
    pub async fn submit(&mut self, event: SnapshotEvent) -> Vec<Publish> {
        self.queue.push(event);
        let mut out = self.dispatch().await;
        out.extend(self.retry_deferred().await);
        out
    }

    /// Whether snapshot operations are running (their ends are awaited with
    /// [`Self::operation_done`]).
    pub fn operations_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// The next running snapshot operation to end (pending forever when none runs). Cancel-safe.
    pub async fn operation_done(&mut self) -> OperationDone {
        match self.running.join_next_with_id().await {
            Some(done) => OperationDone(done),
            None => std::future::pending().await,
        }
    }

    /// Applies what an operation's slow half did, then makes or removes the volumes that
    /// waited for it and starts the events that can run now.
    pub async fn complete(&mut self, done: OperationDone) -> Vec<Publish> {
        let (task, outcome) = match done.0 {
            Ok((task, outcome)) => (task, Ok(outcome)),
            Err(e) => (e.id(), Err(e)),
        };
        let (operation, config) = match self.running_ops.remove(&task) {
            Some(Running::Snapshot(operation, config)) => (operation, config),
            Some(Running::Volume {
                operation,
                key,
                planned,
            }) => {
                self.queue.finished(operation);
                self.volume_work.remove(&key);
                let mut out: Vec<Publish> = match outcome {
                    Ok(outcome) => self.apply(outcome).await,
                    Err(e) => self
                        .volume_work_died(&key, planned, &e)
                        .into_iter()
                        .collect(),
                };
                // A config or hold that went while the volume was made: it may go now.
                let scope = Scope::of_keys([&key]);
                if self.statuses.contains_key(&key) && self.not_current(&scope).contains(&key) {
                    out.extend(self.collect_volumes(&scope).await);
                }
                out.extend(self.dispatch().await);
                out.extend(self.retry_deferred().await);
                return out;
            }
            None => return Vec::new(),
        };
        self.queue.finished(operation);
        let mut out = match outcome {
            Ok(outcome) => self.apply(outcome).await,
            Err(e) => {
                // Its records are as a crash would leave them: the next start resumes them.
                tracing::error!(snapshot = %config.snapshot_id, "snapshot operation ended abnormally: {e}");
                let text = format!(
                    "snapshot {}: the operation ended abnormally ({e}); it is resumed when the volume-manager restarts",
                    config.snapshot_id
                );
                vec![Publish::Snapshot(work::failed_status(
                    &config,
                    text,
                    BTreeMap::new(),
                ))]
            }
        };
        // Queued events first: one that came before a removal still finds its volume.
        out.extend(self.dispatch().await);
        out.extend(self.retry_deferred().await);
        out
    }

    /// Volume work whose task died: the volume is Failed with the reason (a half-made one is
    /// swept at the next start and made again).
    fn volume_work_died(
        &mut self,
        key: &str,
        planned: Option<Box<VolumeStatus>>,
        e: &tokio::task::JoinError,
    ) -> Option<Publish> {
        tracing::error!(volume = %key, "volume work ended abnormally: {e}");
        let status = match planned {
            Some(planned) => self.statuses.entry(key.to_string()).or_insert(*planned),
            None => self.statuses.get_mut(key)?,
        };
        status.state = VolumeState::Failed;
        status.error = error(format!("volume {key}: its work ended abnormally: {e}"));
        Some(Publish::Volume(status.clone()))
    }

    /// Starts the queued events that may run now, in arrival order.
    async fn dispatch(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        loop {
            let records = &self.records;
            let Some((operation, event, claims)) =
                self.queue.take_ready(|e| event_claims(records, e))
            else {
                break;
            };
            match event {
                SnapshotEvent::Request(config) => match self.begin_request(config.clone()).await {
                    Step::Done(published) => out.extend(published),
                    Step::Work(work) => {
                        let task = self.running.spawn(work);
                        self.running_ops
                            .insert(task.id(), Running::Snapshot(operation, config));
                        self.queue.started(operation, claims);
                    }
                },
                SnapshotEvent::Withdrawn(snapshot) => {
                    out.extend(self.handle_snapshot_config_delete(snapshot).await);
                }
                SnapshotEvent::Synchronized(requested) => {
                    out.extend(self.reconcile(&requested).await);
                    out.push(Publish::SnapshotsReconciled);
                }
            }
        }
        out
    }

    /// What an event touches: its snapshot and the uuids of the volumes it names or its record
    /// holds. The requests' synchronization is a barrier (its reconcile spans all records).
    fn claims(&self, event: &SnapshotEvent) -> Claims {
        event_claims(&self.records, event)
    }

    /// A `VolumesSnapshotConfig` create or modify, carried out to its end before returning
    /// (the bus path queues it with [`Self::submit`] instead).
    pub async fn handle_snapshot_config(&mut self, config: VolumesSnapshotConfig) -> Vec<Publish> {
        let step = self.begin_request(config).await;
        self.run(step).await
    }

    /// A request's first half, on the manager's state: answered at once, or planned (its
    /// intent in the records) with its slow half to run.
    async fn begin_request(&mut self, config: VolumesSnapshotConfig) -> Step {
        if let Some(record) = self.records.get(&config.snapshot_id)
            && !record.is_in_progress()
            && record.result_of_action == config.action
            && record.request_counter == config.request_counter
        {
            return Step::Done(vec![Publish::Snapshot(record.clone())]); // answered before a restart
        }
        tracing::info!(snapshot = %config.snapshot_id, app = %config.app_uuid, action = ?config.action, counter = config.request_counter, "snapshot request");
        match config.action {
            VolumesSnapshotAction::Create => match self.begin_create(&config).await {
                Step::Done(mut out) => {
                    out.extend(self.make_waiting_clones(config.snapshot_id).await);
                    Step::Done(out)
                }
                work => work,
            },
            VolumesSnapshotAction::Rollback => self.begin_rollback(config),
            VolumesSnapshotAction::Delete => self.begin_delete(config).await,
            VolumesSnapshotAction::Unspecified => Step::Done(Vec::new()),
        }
    }

    /// A request's second half, on the manager's state: what the slow half did, published
    /// after its records are durable.
    async fn apply(&mut self, outcome: Outcome) -> Vec<Publish> {
        let mut out = Vec::new();
        match outcome {
            Outcome::Volume(done) => out.extend(self.volume_done(done)),
            Outcome::Create {
                config,
                previous,
                result,
            } => {
                match result {
                    Created::IntentFailed(text) => {
                        self.restore_record(config.snapshot_id, previous);
                        out.push(Self::refusal(&config, text));
                    }
                    Created::Failed {
                        status,
                        volume_key,
                        error,
                    } => {
                        out.extend(self.mark_volume_failed(&volume_key, &error));
                        self.records.insert(status.snapshot_id, status.clone());
                        out.push(Publish::Snapshot(status));
                    }
                    Created::Made(record) | Created::NotFrozen(record) => {
                        self.records.insert(record.snapshot_id, record.clone());
                        out.push(Publish::Snapshot(record));
                    }
                }
                out.extend(self.make_waiting_clones(config.snapshot_id).await);
            }
            Outcome::Rollback {
                config,
                previous,
                result,
            } => match result {
                RolledBack::IntentFailed(text) => {
                    self.restore_record(config.snapshot_id, Some(previous));
                    out.push(Self::refusal(&config, text));
                }
                RolledBack::Done {
                    record,
                    failed,
                    restored,
                } => {
                    for (key, e) in failed {
                        out.extend(self.mark_volume_failed(&key, &e));
                    }
                    for (volume, meta, size) in restored {
                        out.extend(self.restored_volume(volume, &meta, size));
                    }
                    self.records.insert(record.snapshot_id, record.clone());
                    out.push(Publish::Snapshot(record));
                }
            },
            Outcome::Delete {
                config,
                previous,
                result,
            } => match result {
                Deleted::IntentFailed(text) => {
                    self.restore_record(config.snapshot_id, Some(previous));
                    out.push(Self::refusal(&config, text));
                }
                Deleted::Removed(status) => {
                    self.records.remove(&status.snapshot_id);
                    out.push(Publish::Snapshot(status));
                    // Only the volumes it was taken of can have been kept by it.
                    let taken_of = previous.volume_snapshot_meta.iter().flat_map(|(id, m)| {
                        let key = VolumeSnapshotMeta::from_value(m).volume_key;
                        [*id]
                            .into_iter()
                            .chain(parse_volume_key(&key).map(|(i, _, _)| i))
                    });
                    let scope = Scope::Volumes(taken_of.collect());
                    out.extend(self.collect_volumes(&scope).await);
                }
                Deleted::Kept(record) => {
                    self.records.insert(record.snapshot_id, record.clone());
                    out.push(Publish::Snapshot(record));
                }
            },
        }
        out
    }

    /// An intent that could not be written: the record in memory is what it was.
    fn restore_record(&mut self, snapshot: Uuid, previous: Option<VolumesSnapshotStatus>) {
        match previous {
            Some(record) => self.records.insert(snapshot, record),
            None => self.records.remove(&snapshot),
        };
    }

    /// A `VolumesSnapshotConfig` delete: the status goes; an unfinished create is undone.
    pub async fn handle_snapshot_config_delete(&mut self, snapshot: Uuid) -> Vec<Publish> {
        let mut out = Vec::new();
        if let Some(record) = self.records.get(&snapshot).cloned() {
            out.extend(self.abandon(record).await);
        }
        out.push(Publish::UnpublishSnapshot(snapshot.to_string()));
        out
    }

    /// After the snapshot requests are synchronized: in-progress records nobody asks for any more
    /// are undone (create), finished (delete) or closed with an error (rollback).
    pub async fn reconcile(&mut self, requested: &BTreeSet<Uuid>) -> Vec<Publish> {
        let mut out = Vec::new();
        let stale: Vec<VolumesSnapshotStatus> = self
            .records
            .values()
            .filter(|r| r.is_in_progress() && !requested.contains(&r.snapshot_id))
            .cloned()
            .collect();
        for record in stale {
            out.extend(self.abandon(record).await);
        }
        out
    }

    async fn abandon(&mut self, record: VolumesSnapshotStatus) -> Vec<Publish> {
        let id = record.snapshot_id;
        match record.in_progress {
            VolumesSnapshotAction::Create => {
                tracing::info!(snapshot = %id, "undoing an unfinished create nobody asks for");
                // Cut short between freeze and thaw, it left the container frozen, and nobody
                // will ask for it again: thawed here (work on the same app's volumes waits for
                // this, so no other create has it frozen now).
                if !record.freeze_cgroup.is_empty() {
                    match crate::freeze::thaw(&record.freeze_cgroup).await {
                        Ok(()) => {
                            tracing::info!(snapshot = %id, cgroup = %record.freeze_cgroup, "thawed the container of a withdrawn live create")
                        }
                        Err(e) => tracing::error!(snapshot = %id, "{e}"),
                    }
                }
                let (left, errors) = self.delete_metas(&record).await;
                if left.is_empty() {
                    if let Err(e) = self.remove_record(id).await {
                        tracing::error!(snapshot = %id, "{e}");
                    }
                    self.records.remove(&id);
                    return self.collect_volumes(&Scope::All).await;
                }
                let mut record = record;
                record.volume_snapshot_meta = left;
                record.volume_errors = errors;
                record.in_progress = VolumesSnapshotAction::Unspecified;
                record.freeze_cgroup.clear();
                record.error = error(format!(
                    "snapshot {id}: an interrupted create could not be fully undone; request a delete"
                ));
                let _ = self.store(&record).await;
                self.records.insert(id, record);
                Vec::new()
            }
            VolumesSnapshotAction::Delete => {
                let config = VolumesSnapshotConfig {
                    snapshot_id: id,
                    action: VolumesSnapshotAction::Delete,
                    volume_ids: Vec::new(),
                    app_uuid: record.app_uuid,
                    request_counter: record.in_progress_counter,
                    ..VolumesSnapshotConfig::default()
                };
                let step = self.begin_delete(config).await;
                let _ = self.run(step).await;
                Vec::new()
            }
            VolumesSnapshotAction::Rollback => {
                let mut record = record;
                record.in_progress = VolumesSnapshotAction::Unspecified;
                record.error = error(format!(
                    "snapshot {id}: a rollback was interrupted by a restart and is no longer requested; the volumes may be partly rolled back, request the rollback again"
                ));
                let _ = self.store(&record).await;
                self.records.insert(id, record);
                Vec::new()
            }
            VolumesSnapshotAction::Unspecified => Vec::new(),
        }
    }

    /// Each volume's snapshot of `record` with its metadata completed.
    fn meta_entries(&self, record: &VolumesSnapshotStatus) -> Vec<MetaEntry> {
        record
            .volume_snapshot_meta
            .iter()
            .map(|(volume, value)| {
                let meta = VolumeSnapshotMeta::from_value(value);
                (
                    *volume,
                    value.clone(),
                    self.complete_legacy_meta(*volume, meta),
                )
            })
            .collect()
    }

    /// Deletes each volume's snapshot of `record`; returns the metadata of those that remain and
    /// the errors.
    async fn delete_metas(
        &self,
        record: &VolumesSnapshotStatus,
    ) -> (BTreeMap<Uuid, serde_json::Value>, BTreeMap<Uuid, String>) {
        work::delete_all(
            &self.backends,
            record.snapshot_id,
            &self.meta_entries(record),
        )
        .await
    }

    /// EVE's records hold only the qcow2 snapshot name: fill in the volume from the config.
    fn complete_legacy_meta(
        &self,
        volume: Uuid,
        mut meta: VolumeSnapshotMeta,
    ) -> VolumeSnapshotMeta {
        if meta.file_location.as_os_str().is_empty()
            && let Some((vref, _)) = self.current_volume(volume)
        {
            meta.volume_key = vref.key;
            meta.file_location = vref.path;
        }
        if meta.volume_key.is_empty() {
            meta.volume_key = volume.to_string();
        }
        meta
    }

    /// A request answered with `text` alone, no volume touched.
    fn refusal(config: &VolumesSnapshotConfig, text: String) -> Publish {
        Publish::Snapshot(work::failed_status(config, text, BTreeMap::new()))
    }

    /// Internal snapshots change an image's size on disk: the main loop calls this now and then
    /// (not per operation, to keep the persistent status writes off the snapshot path). Image
    /// files only, one stat each; directory trees are walked by the disk scan
    /// ([`Self::directory_volumes`], `disk_scan.rs`).
    pub async fn refresh_sizes(&mut self) -> Vec<Publish> {
        let files: Vec<(String, PathBuf)> = self
            .statuses
            .iter()
            .map(|(key, status)| (key.clone(), status.file_location.clone()))
            .collect();
        // One stat per volume: off the runtime, all together.
        let sizes = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .filter(|(_, path)| path.is_file())
                .map(|(key, path)| (key, volumes::allocated_size(&path)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.apply_sizes(sizes)
    }

    /// The directory volumes in service, to measure (key, tree).
    pub fn directory_volumes(&self) -> Vec<(String, PathBuf)> {
        self.statuses
            .iter()
            .filter(|(_, s)| s.format == VolumeFormat::Dir && s.state == VolumeState::Ready)
            .map(|(key, s)| (key.clone(), s.file_location.clone()))
            .collect()
    }

    /// Sizes measured elsewhere: each volume still here whose size changed is published.
    pub fn apply_sizes(&mut self, sizes: Vec<(String, u64)>) -> Vec<Publish> {
        let mut out = Vec::new();
        for (key, size) in sizes {
            if let Some(status) = self.statuses.get_mut(&key)
                && size != status.current_size
            {
                status.current_size = size;
                out.push(Publish::Volume(status.clone()));
            }
        }
        out
    }

    /// A create's first half: a repeated create answered from the record, else the plan (the
    /// volume and backend of each requested volume) and the intent in the records.
    async fn begin_create(&mut self, config: &VolumesSnapshotConfig) -> Step {
        let id = config.snapshot_id;
        let name = id.to_string();
        let mut out = Vec::new();
        let previous = self.records.get(&id).cloned();
        // An attempt cut short between freeze and thaw left the container frozen.
        if config.live
            && !config.freeze_cgroup.is_empty()
            && previous.as_ref().is_some_and(|p| p.is_in_progress())
        {
            match crate::freeze::thaw(&config.freeze_cgroup).await {
                Ok(()) => {
                    tracing::info!(snapshot = %id, cgroup = %config.freeze_cgroup, "thawed the container of an interrupted live create")
                }
                Err(e) => tracing::error!(snapshot = %id, "{e}"),
            }
        }
        if let Some(made) = previous.as_ref().filter(|p| {
            !p.is_in_progress()
                && p.result_of_action == VolumesSnapshotAction::Create
                && !p.error.is_error()
                && !p.volume_snapshot_meta.is_empty()
        }) {
            return Step::Done(self.repeat_create(config, made.clone()).await);
        }

        // Plan: the volume and backend of each requested volume, before touching anything. An
        // interrupted or failed earlier attempt's metadata is reused (its snapshots are adopted).
        let mut plan: Vec<(Uuid, VolumeSnapshotMeta)> = Vec::new();
        for volume in &config.volume_ids {
            let resumed = previous.as_ref().and_then(|r| r.meta_of(*volume));
            let planned = match resumed {
                Some(meta) => Ok(meta),
                None => self
                    .requested_volume(config, *volume)
                    .and_then(|(vref, kind)| self.backends.plan(kind, &vref, &name)),
            };
            // A live create needs a backend that can take one.
            let planned = planned.and_then(|meta| {
                if config.live {
                    self.backends.check_live(meta.backend, &meta.volume_key)?;
                }
                Ok(meta)
            });
            match planned {
                Ok(meta) => plan.push((*volume, meta)),
                Err(e) => {
                    let text = format!(
                        "snapshot {id}: volume {volume} cannot be snapshotted: {e}; no snapshot was made"
                    );
                    tracing::error!(snapshot = %id, volume = %volume, "{e}");
                    let status = work::failed_status(
                        config,
                        text,
                        BTreeMap::from([(*volume, e.to_string())]),
                    );
                    // An interrupted attempt of this request is undone; a finished (failed)
                    // one keeps its record.
                    if let Some(p) = previous.filter(|p| p.is_in_progress()) {
                        out.extend(self.abandon(p).await);
                    }
                    out.push(Publish::Snapshot(status));
                    return Step::Done(out);
                }
            }
        }

        // Intent: in the records now (a clone of this snapshot waits, the volumes are kept),
        // on disk before any backend call.
        let record = VolumesSnapshotStatus {
            snapshot_id: id,
            app_uuid: config.app_uuid,
            volume_snapshot_meta: plan.iter().map(|(v, m)| (*v, m.to_value())).collect(),
            time_created: previous.as_ref().and_then(|p| p.time_created),
            ref_count: previous.as_ref().map_or(0, |p| p.ref_count),
            result_of_action: previous
                .as_ref()
                .map_or(VolumesSnapshotAction::Unspecified, |p| p.result_of_action),
            request_counter: previous.as_ref().map_or(0, |p| p.request_counter),
            in_progress: VolumesSnapshotAction::Create,
            in_progress_counter: config.request_counter,
            freeze_cgroup: if config.live {
                config.freeze_cgroup.clone()
            } else {
                String::new()
            },
            ..VolumesSnapshotStatus::default()
        };
        self.records.insert(id, record.clone());
        Step::Work(work::create(
            self.backends.clone(),
            self.persist.clone(),
            config.clone(),
            previous,
            record,
            plan,
        ))
    }

    /// Create again of a snapshot already made: every volume's snapshot must still be there.
    /// Nothing is re-made: a snapshot re-taken now would not hold the content of its time.
    async fn repeat_create(
        &mut self,
        config: &VolumesSnapshotConfig,
        made: VolumesSnapshotStatus,
    ) -> Vec<Publish> {
        let id = config.snapshot_id;
        let mut out = Vec::new();
        let requested: BTreeSet<Uuid> = config.volume_ids.iter().copied().collect();
        let have: BTreeSet<Uuid> = made.volume_snapshot_meta.keys().copied().collect();
        if requested != have {
            let text = format!(
                "snapshot {id} already exists on volumes {have:?}; it cannot be made again on {requested:?}: delete it first or use a new snapshot id"
            );
            out.push(Self::refusal(config, text));
            return out;
        }
        let mut errors = BTreeMap::new();
        for volume in &requested {
            let Some(meta) = made.meta_of(*volume) else {
                continue;
            };
            let meta = self.complete_legacy_meta(*volume, meta);
            match self.backends.exists(&meta).await {
                Ok(true) => {}
                Ok(false) => {
                    errors.insert(*volume, format!("volume {volume}: snapshot {id} has vanished from the backend (removed outside Cairn?); delete this snapshot and take a new one"));
                }
                Err(e) => {
                    errors.insert(*volume, e.to_string());
                }
            }
        }
        if errors.is_empty() {
            let mut record = made;
            record.request_counter = config.request_counter;
            self.finish(record, &mut out).await;
        } else {
            let names: Vec<String> = errors.keys().map(Uuid::to_string).collect();
            let text = format!(
                "snapshot {id}: repeated create found it missing or unreadable on volumes [{}]",
                names.join(", ")
            );
            let mut status = work::failed_status(config, text, errors);
            status.volume_snapshot_meta = made.volume_snapshot_meta;
            status.time_created = made.time_created;
            out.push(Publish::Snapshot(status));
        }
        out
    }

    /// A rollback's first half: the snapshot's metadata for each volume, and the intent in
    /// the records.
    fn begin_rollback(&mut self, config: VolumesSnapshotConfig) -> Step {
        let id = config.snapshot_id;
        let Some(previous) = self.records.get(&id).cloned().filter(|r| {
            r.in_progress != VolumesSnapshotAction::Create && !r.volume_snapshot_meta.is_empty()
        }) else {
            let text = format!(
                "snapshot {id}: there is no complete snapshot of this id on this device; it cannot be rolled back to"
            );
            return Step::Done(vec![Self::refusal(&config, text)]);
        };
        let volumes: Vec<Uuid> = if config.volume_ids.is_empty() {
            previous.volume_snapshot_meta.keys().copied().collect()
        } else {
            config.volume_ids.clone()
        };
        let mut record = previous.clone();
        record.in_progress = VolumesSnapshotAction::Rollback;
        record.in_progress_counter = config.request_counter;
        let items: Vec<work::RollbackItem> = volumes
            .iter()
            .map(|volume| {
                let item = match record.meta_of(*volume) {
                    Some(meta) => {
                        let meta = self.complete_legacy_meta(*volume, meta);
                        let released = !self.statuses.contains_key(&meta.volume_key);
                        Ok((meta, released))
                    }
                    None => Err(format!("volume {volume} is not part of snapshot {id}")),
                };
                (*volume, item)
            })
            .collect();
        self.records.insert(id, record.clone());
        Step::Work(work::rollback(
            self.backends.clone(),
            self.persist.clone(),
            config,
            previous,
            record,
            items,
        ))
    }

    /// A rollback of a snapshot that does not live in its volume (copy, btrfs) to a volume
    /// released after a purge made the volume again at its old place: it is reported Ready
    /// under its old key (kept from now on by the app that rolled back onto it).
    fn restored_volume(
        &mut self,
        volume: Uuid,
        meta: &VolumeSnapshotMeta,
        current_size: u64,
    ) -> Option<Publish> {
        if !self.backends.snapshot_outside_volume(meta.backend) || !meta.file_location.is_dir() {
            return None;
        }
        let (volume_id, generation, local) =
            parse_volume_key(&meta.volume_key).unwrap_or((volume, 0, 0));
        let line = of_volume(&self.configs, volume_id)
            .map(|(_, c)| c)
            .find(|c| c.generation_counter == generation)
            .or_else(|| of_volume(&self.configs, volume_id).map(|(_, c)| c).next());
        let status = VolumeStatus {
            volume_id,
            generation_counter: generation,
            local_generation_counter: local,
            display_name: line.map(|c| c.display_name.clone()).unwrap_or_default(),
            state: VolumeState::Ready,
            format: VolumeFormat::Dir,
            backend: meta.backend,
            file_location: meta.file_location.clone(),
            max_vol_size: line.map_or(0, |c| c.max_vol_size),
            current_size,
            ..VolumeStatus::default()
        };
        tracing::info!(volume = %meta.volume_key, "a rollback made a released volume again");
        self.statuses
            .insert(meta.volume_key.clone(), status.clone());
        Some(Publish::Volume(status))
    }

    /// A delete's first half: the snapshots to delete, and the intent in the records (a clone
    /// of this snapshot is refused from now on).
    async fn begin_delete(&mut self, config: VolumesSnapshotConfig) -> Step {
        let id = config.snapshot_id;
        let Some(mut previous) = self.records.get(&id).cloned() else {
            // Already gone: a delete of nothing succeeds.
            return Step::Done(vec![Publish::Snapshot(VolumesSnapshotStatus {
                snapshot_id: id,
                app_uuid: config.app_uuid,
                result_of_action: VolumesSnapshotAction::Delete,
                request_counter: config.request_counter,
                ..VolumesSnapshotStatus::default()
            })]);
        };
        // A live create cut short between freeze and thaw left the container frozen (its
        // record names the cgroup until it ends); asked to delete it instead of again, nobody
        // else will thaw it.
        if !previous.freeze_cgroup.is_empty() {
            match crate::freeze::thaw(&previous.freeze_cgroup).await {
                Ok(()) => {
                    tracing::info!(snapshot = %id, cgroup = %previous.freeze_cgroup, "thawed the container of an interrupted live create asked to be deleted");
                    previous.freeze_cgroup.clear();
                }
                Err(e) => tracing::error!(snapshot = %id, "{e}"),
            }
        }
        let mut record = previous.clone();
        record.in_progress = VolumesSnapshotAction::Delete;
        record.in_progress_counter = config.request_counter;
        let metas = self.meta_entries(&record);
        self.records.insert(id, record.clone());
        Step::Work(work::delete(
            self.backends.clone(),
            self.persist.clone(),
            config,
            previous,
            record,
            metas,
        ))
    }

    /// Runs a request's slow half here, to its end.
    async fn run(&mut self, step: Step) -> Vec<Publish> {
        match step {
            Step::Done(out) => out,
            Step::Work(work) => {
                let outcome = work.await;
                self.apply(outcome).await
            }
        }
    }

    /// Writes the final record, then hands it out for publication.
    async fn finish(&mut self, record: VolumesSnapshotStatus, out: &mut Vec<Publish>) {
        let record = work::finish_record(&self.persist, record).await;
        self.records.insert(record.snapshot_id, record.clone());
        out.push(Publish::Snapshot(record));
    }
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn load_records(
    dir: &Path,
) -> (
    BTreeMap<Uuid, VolumesSnapshotStatus>,
    Vec<(PathBuf, String)>,
) {
    let mut records = BTreeMap::new();
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (records, bad);
    };
    for entry in entries.flatten() {
        let path = entry.path().join(VOLUMES_SNAPSHOT_STATUS_FILE);
        if !path.exists() {
            continue;
        }
        match cairn_persist::load::<VolumesSnapshotStatus>(&path) {
            Ok(loaded) => {
                records.insert(loaded.record.snapshot_id, loaded.record);
            }
            Err(e) => bad.push((path, e.to_string())),
        }
    }
    (records, bad)
}

/// The driver behind a backend, for the log: only ZFS has more than one.
fn backend_driver(backend: SnapshotBackendKind) -> &'static str {
    Backends::driver(backend)
}

/// What an event touches (see [`VolumeManager::claims`]), from the records alone.
fn event_claims(records: &BTreeMap<Uuid, VolumesSnapshotStatus>, event: &SnapshotEvent) -> Claims {
    let snapshot = match event {
        SnapshotEvent::Request(config) => config.snapshot_id,
        SnapshotEvent::Withdrawn(snapshot) => *snapshot,
        SnapshotEvent::Synchronized(_) => return Claims::All,
    };
    let mut claims = BTreeSet::from([Claim::Snapshot(snapshot)]);
    if let SnapshotEvent::Request(config) = event {
        claims.extend(config.volume_ids.iter().copied().map(Claim::Volume));
    }
    if let Some(record) = records.get(&snapshot) {
        claims.extend(
            record
                .volume_snapshot_meta
                .keys()
                .copied()
                .map(Claim::Volume),
        );
    }
    Claims::Some(claims)
}

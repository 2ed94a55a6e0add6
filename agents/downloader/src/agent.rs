//! The agent: content tree configs in, content tree statuses out, one download job per blob.
//!
//! A job belongs to a sha256, not to a content tree: two trees with the same sha256 share one
//! download and one blob. An attempt tries the tree's datastores in their order until one
//! succeeds (EVE's `doDownload`); when all failed, the job waits `timer.download.retry` (EVE's
//! `maybeRetryDownload`: 600 s) and tries again, forever, keeping the partial file of a stalled
//! or cut connection for a `Range` resume, and dropping it after a hash mismatch or a size over
//! the limit. Each tree's status carries the last error until its content is LOADED. A blob no
//! tree holds any more is kept `timer.defer.content.delete` for reuse (EVE's deferred content
//! delete; 0, the default, removes it at once).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_pubsub::{Bus, BusError, Event, Publication, PublishOptions, Subscription};
use cairn_types::{
    ConfigItemValueMap, ContentTreeConfig, ContentTreeState, ContentTreeStatus, ErrorDescription,
    ErrorEntityType, ErrorSeverity,
};
use chrono::Utc;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::fetch::{self, FetchError, Limits, Progress};
use crate::registry;
use crate::store::{self, ContentStore, StoreError};

/// EVE's global setting: the longest wait before a failed download is tried again (seconds).
pub const RETRY_ITEM: &str = "timer.download.retry";
/// EVE's global setting: a download with no progress for this long is cancelled (seconds).
pub const STALLED_ITEM: &str = "timer.download.stalled";
/// EVE's global setting: how long a blob no content tree holds is kept for reuse (seconds).
pub const DEFER_DELETE_ITEM: &str = "timer.defer.content.delete";
/// EVE's bounds (pillar `types/global.go`): `timer.download.retry` 60 s and up,
/// `timer.defer.content.delete` 0 to a day; a value outside gives the default, as in EVE.
const RETRY_MIN_S: u64 = 60;
const DEFER_DELETE_MAX_S: u64 = 24 * 3600;

/// Timings of the jobs; the config items above override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub stall: Duration,
    /// The wait after an attempt in which every datastore failed.
    pub retry: Duration,
    /// How long a blob nobody holds is kept (zero: removed at once).
    pub defer_delete: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

mod image;

/// What a job tells the agent about its blob.
#[derive(Debug)]
enum JobEvent {
    /// About a container image tree's pull (`image.rs`).
    Image {
        tree: Uuid,
        event: image::ImageEvent,
    },
    Progress {
        sha: String,
        state: ContentTreeState,
        progress: Progress,
    },
    Failed {
        sha: String,
        error: String,
        retry_in: Duration,
        /// Retries made before this failure (EVE's `RetryCount`).
        retried: u32,
    },
    Loaded {
        sha: String,
        path: PathBuf,
    },
    /// A tree's OCI image archive loaded into the store (or not: why).
    ArchiveLoaded {
        tree: Uuid,
        cancel: Arc<AtomicBool>,
        loaded: Result<crate::archive::Loaded, String>,
    },
}

/// A tree's OCI image archive being loaded on the blocking pool, so that the event loop goes
/// on with the other trees. Cancelled before the tree's holds are released or changed: the
/// load then holds nothing more, and its result is dropped.
struct ArchiveLoad {
    sha: String,
    cancel: Arc<AtomicBool>,
}

struct Job {
    handle: tokio::task::JoinHandle<()>,
    /// The tree whose config it follows; other trees with the same sha256 share it as it is.
    owner: Uuid,
    /// What it downloads from (datastores with their trust, URL, size limit): the owner's
    /// config changing any of it restarts the job.
    origin: JobOrigin,
}

type JobOrigin = (Vec<cairn_types::DatastoreConfig>, String, u64);

fn job_origin(config: &ContentTreeConfig) -> JobOrigin {
    (
        config.datastores.clone(),
        config.relative_url.clone(),
        config.max_download_size,
    )
}

pub struct Downloader {
    /// Locked only on the blocking pool (its work writes and fsyncs).
    store: Arc<Mutex<ContentStore>>,
    /// `<persist>/content`, for paths without taking the lock.
    content: PathBuf,
    /// Trees whose reference is written: their jobs' news is theirs.
    held: BTreeSet<Uuid>,
    statuses: Publication<ContentTreeStatus>,
    configs: BTreeMap<Uuid, ContentTreeConfig>,
    jobs: BTreeMap<String, Job>,
    /// Per tree, its archive load in progress.
    loads: BTreeMap<Uuid, ArchiveLoad>,
    events: mpsc::Sender<JobEvent>,
    settings: watch::Sender<Settings>,
    defaults: Settings,
    /// When the first blob kept for reuse is due (a copy of the store's, kept off the lock).
    next_deferred: Option<chrono::DateTime<Utc>>,
    /// Trees whose reference could not be recorded (a full or failing disk): nothing is
    /// downloaded for them until it is, and their config is handled again every
    /// [`HOLD_RETRY`].
    unheld: BTreeSet<Uuid>,
}

/// How often a tree whose reference could not be recorded is tried again.
const HOLD_RETRY: Duration = Duration::from_secs(5);

/// Ready when the first kept blob is due; checked each minute at least, against clock jumps.
async fn deferred_due(at: Option<chrono::DateTime<Utc>>) {
    let Some(at) = at else {
        return std::future::pending().await;
    };
    let wait = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
}

fn lock(store: &Arc<Mutex<ContentStore>>) -> std::sync::MutexGuard<'_, ContentStore> {
    // A panic while holding the lock leaves the refs as last saved on disk: still usable.
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    bus: &Bus,
    persist: &Path,
    technicians_gid: Option<u32>,
    defaults: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let p = persist.to_path_buf();
    let store = tokio::task::spawn_blocking(move || ContentStore::open(&p)).await??;
    let access = technicians_gid
        .map(cairn_pubsub::Access::with_group_readers)
        .unwrap_or_default();
    let statuses = bus
        .publish::<ContentTreeStatus>(PublishOptions {
            persistent: true,
            access,
            ..Default::default()
        })
        .await?;
    let mut configs: Subscription<ContentTreeConfig> = bus.subscribe("config-agent");
    let mut items: Subscription<ConfigItemValueMap> = bus.subscribe("config-agent");
    let (events, mut job_events) = mpsc::channel(256);
    let (settings, _) = watch::channel(defaults);
    let mut agent = Downloader {
        content: store.root().to_path_buf(),
        held: BTreeSet::new(),
        store: Arc::new(Mutex::new(store)),
        statuses,
        configs: BTreeMap::new(),
        jobs: BTreeMap::new(),
        loads: BTreeMap::new(),
        events,
        settings,
        defaults,
        next_deferred: None,
        unheld: BTreeSet::new(),
    };
    agent.next_deferred = agent.blocking(|store| store.next_deferred()).await?;
    let mut restarted = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            event = configs.recv() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    agent.handle_config(value).await?;
                }
                Event::Delete { last, .. } => agent.handle_delete(last.content_id).await?,
                Event::Synchronized if !restarted => {
                    agent.collect_garbage().await?;
                    agent.statuses.signal_restarted().await?;
                    restarted = true;
                }
                _ => {}
            },
            event = items.recv() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    agent.handle_items(&value);
                }
                Event::Delete { .. } => agent.handle_items(&ConfigItemValueMap::default()),
                _ => {}
            },
            Some(event) = job_events.recv() => agent.handle_job(event).await?,
            _ = deferred_due(agent.next_deferred) => agent.expire_deferred().await?,
            _ = tokio::time::sleep(HOLD_RETRY), if !agent.unheld.is_empty() => {
                agent.retry_unheld().await?;
            }
            _ = &mut shutdown => break,
        }
    }
    for job in agent.jobs.values() {
        job.handle.abort();
    }
    agent.statuses.flush().await?;
    Ok(())
}

impl Downloader {
    fn handle_items(&self, items: &ConfigItemValueMap) {
        let seconds = |key: &str, bounds: std::ops::RangeInclusive<u64>| {
            let text = items.items.get(key)?;
            let value = text
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|s| bounds.contains(s));
            if value.is_none() {
                tracing::warn!(item = key, value = %text, "not a number of seconds within EVE's bounds; the default applies");
            }
            value.map(Duration::from_secs)
        };
        let settings = Settings {
            stall: seconds(STALLED_ITEM, 1..=u64::MAX).unwrap_or(self.defaults.stall),
            retry: seconds(RETRY_ITEM, RETRY_MIN_S..=u64::from(u32::MAX))
                .unwrap_or(self.defaults.retry),
            defer_delete: seconds(DEFER_DELETE_ITEM, 0..=DEFER_DELETE_MAX_S)
                .unwrap_or(self.defaults.defer_delete),
        };
        self.settings.send_if_modified(|s| {
            let changed = *s != settings;
            *s = settings;
            changed
        });
    }

    async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut ContentStore) -> R + Send + 'static,
    ) -> Result<R, AgentError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || work(&mut lock(&store))).await?)
    }

    /// The status a tree starts from: its published one (kept across restarts) with the
    /// config's fields.
    fn base_status(&self, config: &ContentTreeConfig) -> ContentTreeStatus {
        let key = config.content_id.to_string();
        let mut status = self.statuses.get(&key).unwrap_or_default();
        if status.content_sha256 != config.content_sha256 {
            status = ContentTreeStatus::default();
        }
        status.content_id = config.content_id;
        status.display_name = config.display_name.clone();
        status.relative_url = config.relative_url.clone();
        status.format = config.format;
        status.content_sha256 = config.content_sha256.clone();
        status.max_download_size = config.max_download_size;
        status.generation_counter = config.generation_counter;
        status
    }

    fn error(config: &ContentTreeConfig, text: &str) -> ErrorDescription {
        ErrorDescription::new(
            format!(
                "content tree {} ({}): {text}",
                config.content_id,
                if config.display_name.is_empty() {
                    config.relative_url.as_str()
                } else {
                    config.display_name.as_str()
                }
            ),
            ErrorSeverity::Error,
            Utc::now(),
        )
        .about(ErrorEntityType::ContentTree, config.content_id)
    }

    async fn handle_config(&mut self, config: ContentTreeConfig) -> Result<(), AgentError> {
        let id = config.content_id;
        if self.configs.get(&id) == Some(&config) {
            return Ok(());
        }
        self.configs.insert(id, config.clone());
        if self.loads.get(&id).is_some_and(|l| {
            l.sha != config.content_sha256 || config.format != cairn_types::ContentFormat::Container
        }) {
            self.cancel_load(id);
        }
        if registry::is_registry_tree(&config) {
            return self.handle_image_config(config).await;
        }
        let mut status = self.base_status(&config);
        let sources = if store::is_sha256(&config.content_sha256) {
            fetch::sources(&config)
        } else {
            Err(format!(
                "sha256 {:?} is not 64 hex digits: the content could not be verified, so it is not downloaded",
                config.content_sha256
            ))
        };
        let sources = match sources {
            Ok(sources) => sources,
            Err(reason) => {
                tracing::warn!(tree = %id, "{reason}");
                self.release(id).await?;
                status.state = ContentTreeState::Initial;
                status.error = Self::error(&config, &reason);
                return Ok(self.statuses.publish(status).await?);
            }
        };
        let sha = config.content_sha256.clone();
        let s = sha.clone();
        let keep = self.keep_until();
        // An image archive's tree holds the image's blobs too: they stay while it holds the
        // archive (a volume may be made from them right now).
        let archive = config.format == cairn_types::ContentFormat::Container;
        let released = match self
            .blocking(move |store| {
                let holds = store.refs().blobs.get(&s).is_some_and(|t| t.contains(&id));
                if archive && holds {
                    Ok(Vec::new())
                } else {
                    store.hold(id, &s, keep)
                }
            })
            .await?
        {
            Ok(released) => {
                if self.unheld.remove(&id) {
                    tracing::info!(tree = %id, "its reference is recorded again");
                }
                released
            }
            Err(e) => {
                // Nothing is downloaded without its reference on disk; tried again shortly.
                tracing::error!(tree = %id, "{e}");
                status.error = Self::error(
                    &config,
                    &format!("{e}; tried again every {} s", HOLD_RETRY.as_secs()),
                );
                self.unheld.insert(id);
                return Ok(self.statuses.publish(status).await?);
            }
        };
        for old in released {
            self.drop_content(&old).await;
        }
        self.held.insert(id);
        let blob = self.content.join("blobs").join(&sha);
        if blob.exists() {
            status.state = ContentTreeState::Loaded;
            status.file_location = blob.display().to_string();
            status.blobs = vec![sha.clone()];
            status.progress = 100;
            status.create_time = status.create_time.or(Some(Utc::now()));
            status.error = ErrorDescription::default();
            tracing::info!(tree = %id, sha256 = %sha, "content already in the store");
            if config.format == cairn_types::ContentFormat::Container {
                self.load_archive(&config, &mut status);
            }
        } else {
            let current = self.jobs.get(&sha).is_some_and(|job| {
                !job.handle.is_finished() && (job.owner != id || job.origin == job_origin(&config))
            });
            if !current {
                // A corrected URL, certificate or limit is used at once, not after the old one's
                // retries.
                if let Some(old) = self.jobs.remove(&sha) {
                    old.handle.abort();
                    let _ = old.handle.await;
                }
                self.start_job(&sha, id, sources, job_origin(&config));
            }
            if status.state == ContentTreeState::Loaded {
                // Its blob went (removed by hand?): it is downloaded again.
                status.state = ContentTreeState::Initial;
                status.file_location.clear();
                status.blobs.clear();
                status.progress = 0;
                status.create_time = None;
            }
        }
        self.statuses.publish(status).await?;
        self.next_deferred = self.blocking(|store| store.next_deferred()).await?;
        Ok(())
    }

    /// A CONTAINER tree from an HTTP datastore: its verified file is an OCI image archive,
    /// loaded into the store (`crate::archive`) off the event loop; the tree is LOADING
    /// meanwhile ([`Self::archive_loaded`] finishes it).
    fn load_archive(&mut self, config: &ContentTreeConfig, status: &mut ContentTreeStatus) {
        let (id, sha) = (config.content_id, config.content_sha256.clone());
        status.state = ContentTreeState::Loading;
        status.file_location.clear();
        if self.loads.get(&id).is_some_and(|l| l.sha == sha) {
            return;
        }
        self.cancel_load(id);
        let cancel = Arc::new(AtomicBool::new(false));
        self.loads.insert(
            id,
            ArchiveLoad {
                sha: sha.clone(),
                cancel: cancel.clone(),
            },
        );
        let (store, path) = (self.store.clone(), self.content.join("blobs").join(&sha));
        let events = self.events.clone();
        tracing::info!(tree = %id, sha256 = %sha, "loading the OCI image archive");
        tokio::spawn(async move {
            let c = cancel.clone();
            let loaded =
                tokio::task::spawn_blocking(move || crate::archive::load(&store, id, &path, &c))
                    .await
                    .unwrap_or_else(|e| Err(format!("its load ended abnormally: {e}")));
            let _ = events
                .send(JobEvent::ArchiveLoaded {
                    tree: id,
                    cancel,
                    loaded,
                })
                .await;
        });
    }

    /// Stops `id`'s archive load, if any, before its holds change.
    fn cancel_load(&mut self, id: Uuid) {
        if let Some(load) = self.loads.remove(&id) {
            load.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// A tree's archive load ended: the tree holds the image's blobs, its manifest first,
    /// and the archive; its file is the image's manifest. A bad archive is the tree's error,
    /// and it holds the archive only. A cancelled load's result is dropped.
    async fn archive_loaded(
        &mut self,
        id: Uuid,
        cancel: &Arc<AtomicBool>,
        loaded: Result<crate::archive::Loaded, String>,
    ) -> Result<(), AgentError> {
        if !self
            .loads
            .get(&id)
            .is_some_and(|l| Arc::ptr_eq(&l.cancel, cancel))
        {
            return Ok(());
        }
        let Some(load) = self.loads.remove(&id) else {
            return Ok(());
        };
        let Some(config) = self.configs.get(&id).cloned() else {
            return Ok(());
        };
        let sha = load.sha;
        let mut status = self.base_status(&config);
        // The image's blobs, its manifest first (what the volume-manager unpacks), then the
        // archive.
        let mut held = Vec::new();
        if let Ok(image) = &loaded {
            held.extend(image.blobs.iter().cloned());
        }
        held.push(sha.clone());
        let blobs = held.clone();
        let released = match self
            .blocking(move |store| store.hold_exactly(id, &blobs))
            .await?
        {
            Ok(released) => released,
            Err(e) => {
                tracing::error!(tree = %id, "{e}; collected at the next start");
                Vec::new()
            }
        };
        for old in released {
            self.drop_content(&old).await;
        }
        match loaded {
            Ok(image) => {
                tracing::info!(tree = %id, sha256 = %sha, manifest = %image.manifest_sha, blobs = image.blobs.len(), "OCI image archive loaded");
                status.state = ContentTreeState::Loaded;
                status.file_location = self
                    .content
                    .join("blobs")
                    .join(&image.manifest_sha)
                    .display()
                    .to_string();
                status.blobs = held;
                status.progress = 100;
                status.create_time = status.create_time.or(Some(Utc::now()));
                status.error = ErrorDescription::default();
            }
            Err(reason) => {
                let text = format!("OCI image archive sha256 {sha}: {reason}");
                tracing::warn!(tree = %id, "{text}");
                status.state = ContentTreeState::Initial;
                status.file_location.clear();
                status.blobs.clear();
                status.progress = 0;
                status.error = Self::error(&config, &text);
            }
        }
        Ok(self.statuses.publish(status).await?)
    }

    /// Until when a blob nobody holds from now on is kept (`None`: removed at once).
    fn keep_until(&self) -> Option<chrono::DateTime<Utc>> {
        let defer = self.settings.borrow().defer_delete;
        (!defer.is_zero())
            .then(|| Utc::now() + chrono::Duration::from_std(defer).unwrap_or_default())
    }

    /// Removes the kept blobs that are due. A failure leaves them to the next start's collection.
    async fn expire_deferred(&mut self) -> Result<(), AgentError> {
        match self
            .blocking(|store| store.expire_deferred(Utc::now()))
            .await?
        {
            Ok(due) => {
                for sha in due {
                    self.drop_content(&sha).await;
                }
            }
            Err(e) => tracing::error!("{e}; collected at the next start"),
        }
        self.next_deferred = self.blocking(|store| store.next_deferred()).await?;
        Ok(())
    }

    fn start_job(
        &mut self,
        sha: &str,
        owner: Uuid,
        sources: Vec<fetch::Source>,
        origin: JobOrigin,
    ) {
        let max_size = origin.2;
        let urls: Vec<&str> = sources.iter().map(|s| s.url.as_str()).collect();
        tracing::info!(sha256 = %sha, urls = ?urls, "downloading");
        let (partial, store) = (self.content.join("partial").join(sha), self.store.clone());
        let handle = tokio::spawn(job(
            sha.to_string(),
            sources,
            partial,
            max_size,
            store,
            self.settings.subscribe(),
            self.events.clone(),
        ));
        let job = Job {
            handle,
            owner,
            origin,
        };
        self.jobs.insert(sha.to_string(), job);
    }

    /// Drops `id`'s reference. A reference that cannot be removed now stays on disk and is
    /// dropped by the next start's collection (the tree is no longer configured then).
    async fn release(&mut self, id: Uuid) -> Result<(), AgentError> {
        self.cancel_load(id);
        self.held.remove(&id);
        let keep = self.keep_until();
        match self.blocking(move |store| store.release(id, keep)).await? {
            Ok(released) => {
                for sha in released {
                    self.drop_content(&sha).await;
                }
            }
            Err(e) => tracing::error!(tree = %id, "{e}; collected at the next start"),
        }
        self.next_deferred = self.blocking(|store| store.next_deferred()).await?;
        Ok(())
    }

    /// Stops the job of `sha` (held by nobody now) and removes its files; files that cannot
    /// be removed now go at the next start's collection.
    async fn drop_content(&mut self, sha: &str) {
        if let Some(job) = self.jobs.remove(sha) {
            job.handle.abort();
            let _ = job.handle.await;
        }
        tracing::info!(sha256 = %sha, "no content tree holds the blob any more: removing it");
        let s = sha.to_string();
        match self.blocking(move |store| store.remove_content(&s)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sha256 = %sha, "{e}; collected at the next start"),
            Err(e) => tracing::error!(sha256 = %sha, "{e}"),
        }
    }

    /// Handles again the configs of the trees whose reference could not be recorded.
    async fn retry_unheld(&mut self) -> Result<(), AgentError> {
        for id in std::mem::take(&mut self.unheld) {
            // Removed first: an unchanged config is otherwise taken as already handled.
            if let Some(config) = self.configs.remove(&id) {
                self.handle_config(config).await?;
            }
        }
        Ok(())
    }

    async fn handle_delete(&mut self, id: Uuid) -> Result<(), AgentError> {
        self.configs.remove(&id);
        self.unheld.remove(&id);
        self.stop_image_job(id).await;
        self.release(id).await?;
        self.statuses.unpublish(&id.to_string()).await?;
        Ok(())
    }

    /// Drops what no configured tree holds; a failure only delays that to the next start.
    async fn collect_garbage(&mut self) -> Result<(), AgentError> {
        let configured: BTreeSet<Uuid> = self.configs.keys().copied().collect();
        if let Err(e) = self
            .blocking(move |store| store.collect_garbage(&configured, Utc::now()))
            .await?
        {
            tracing::error!("{e}; tried again at the next start");
        }
        Ok(())
    }

    async fn handle_job(&mut self, event: JobEvent) -> Result<(), AgentError> {
        let event = match event {
            JobEvent::Image { tree, event } => return self.handle_image_event(tree, event).await,
            JobEvent::ArchiveLoaded {
                tree,
                cancel,
                loaded,
            } => return self.archive_loaded(tree, &cancel, loaded).await,
            other => other,
        };
        let sha = match &event {
            JobEvent::Image { .. } | JobEvent::ArchiveLoaded { .. } => return Ok(()),
            JobEvent::Progress { sha, .. }
            | JobEvent::Failed { sha, .. }
            | JobEvent::Loaded { sha, .. } => sha.clone(),
        };
        let trees: Vec<ContentTreeConfig> = self
            .configs
            .values()
            .filter(|c| c.content_sha256 == sha && self.held.contains(&c.content_id))
            .cloned()
            .collect();
        if let JobEvent::Loaded { .. } = event {
            self.jobs.remove(&sha);
        }
        for config in trees {
            let mut status = self.base_status(&config);
            match &event {
                JobEvent::Image { .. } | JobEvent::ArchiveLoaded { .. } => {}
                JobEvent::Progress {
                    state, progress, ..
                } => {
                    status.state = *state;
                    status.current_size = progress.current as i64;
                    status.total_size = progress.total.map_or(0, |t| t as i64);
                    status.progress = match progress.total {
                        Some(t) if t > 0 => (progress.current.min(t) * 100 / t) as u32,
                        _ => 0,
                    };
                }
                JobEvent::Failed {
                    error,
                    retry_in,
                    retried,
                    ..
                } => {
                    status.error = Self::error(&config, error);
                    status.error.error_retry_condition = format!(
                        "will retry in {}s; have retried {retried} times",
                        retry_in.as_secs_f64().ceil()
                    );
                    tracing::warn!(tree = %config.content_id, sha256 = %sha, retry_in = ?retry_in, "download failed: {error}");
                }
                JobEvent::Loaded { path, .. } => {
                    status.state = ContentTreeState::Loaded;
                    status.file_location = path.display().to_string();
                    status.blobs = vec![sha.clone()];
                    status.progress = 100;
                    status.create_time = Some(Utc::now());
                    status.error = ErrorDescription::default();
                    tracing::info!(tree = %config.content_id, sha256 = %sha, "content verified and loaded");
                }
            }
            if matches!(event, JobEvent::Loaded { .. })
                && config.format == cairn_types::ContentFormat::Container
            {
                self.load_archive(&config, &mut status);
            }
            self.statuses.publish(status).await?;
        }
        Ok(())
    }
}

/// Downloads, verifies and stores one blob, retrying until it is LOADED or the job is aborted:
/// each round tries every datastore in order; after a round where all failed, it waits the
/// retry time (EVE's `timer.download.retry`, the same wait every time) and goes again.
async fn job(
    sha: String,
    sources: Vec<fetch::Source>,
    partial: PathBuf,
    max_size: u64,
    store: Arc<Mutex<ContentStore>>,
    settings: watch::Receiver<Settings>,
    events: mpsc::Sender<JobEvent>,
) {
    let mut retried: u32 = 0;
    loop {
        let now = *settings.borrow();
        let mut errors = Vec::new();
        for source in &sources {
            match attempt_once(&sha, source, &partial, max_size, now.stall, &store, &events).await {
                Ok(path) => {
                    let _ = events.send(JobEvent::Loaded { sha, path }).await;
                    return;
                }
                Err(error) => errors.push(error),
            }
        }
        let failed = JobEvent::Failed {
            sha: sha.clone(),
            // Every datastore's reason, as EVE accumulates them.
            error: errors.join("; "),
            retry_in: now.retry,
            retried,
        };
        if events.send(failed).await.is_err() {
            return;
        }
        tokio::time::sleep(now.retry).await;
        retried = retried.saturating_add(1);
    }
}

/// One attempt: download (resuming), verify, store. `Err` is the reason, for the status.
async fn attempt_once(
    sha: &str,
    source: &fetch::Source,
    partial: &Path,
    max_size: u64,
    stall: Duration,
    store: &Arc<Mutex<ContentStore>>,
    events: &mpsc::Sender<JobEvent>,
) -> Result<PathBuf, String> {
    let progress_events = events.clone();
    let s = sha.to_string();
    let limits = Limits { max_size, stall };
    let fetched = fetch::fetch(source, partial, limits, move |progress| {
        // A full channel drops a progress report; the next one says more anyway.
        let _ = progress_events.try_send(JobEvent::Progress {
            sha: s.clone(),
            state: ContentTreeState::Downloading,
            progress,
        });
    })
    .await;
    let length = match fetched {
        Ok(length) => length,
        Err(e) => {
            // Bytes past the limit are never resumed; a stalled or cut download is.
            if matches!(e, FetchError::TooLarge { .. }) {
                let _ = remove_partial(partial).await;
            }
            return Err(e.to_string());
        }
    };
    let done = Progress {
        current: length,
        total: Some(length),
    };
    for state in [ContentTreeState::Downloaded, ContentTreeState::Verifying] {
        let _ = events
            .send(JobEvent::Progress {
                sha: sha.to_string(),
                state,
                progress: done,
            })
            .await;
    }
    let p = partial.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || store::sha256_file(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read {} to verify it: {e}", partial.display()))?;
    if actual != sha {
        let _ = remove_partial(partial).await;
        return Err(format!(
            "sha256 mismatch: {} sent {length} bytes with sha256 {actual}, the config says {sha}; the download is discarded",
            source.url
        ));
    }
    let (store, s) = (store.clone(), sha.to_string());
    tokio::task::spawn_blocking(move || {
        let store = lock(&store);
        // Released meanwhile: nobody wants it, so it never enters the store.
        if !store.refs().blobs.contains_key(&s) {
            return Err("released while it was verified".to_string());
        }
        store.promote(&s).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn remove_partial(partial: &Path) -> std::io::Result<()> {
    let p = partial.to_path_buf();
    tokio::task::spawn_blocking(move || store::remove_if_present(&p))
        .await
        .map_err(std::io::Error::other)?
}

//! The I/O around the state machine: bus subscriptions become machine inputs, machine actions
//! become publications and files. One task, one app at a time, so decisions never interleave.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_persist::{Loaded, Origin, PersistError, crash_point};
use cairn_pubsub::{Access, Bus, BusError, Event, Publication, PublishOptions, Subscription};
use cairn_types::domain::{
    DomainLiveOp, DomainLiveOpConfig, DomainLiveOpState, DomainLiveOpStatus,
};
use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, snapshot_dir};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, AppVolumeRefs, DiskConfig, DomainConfig, DomainSpec,
    DomainState, DomainStatus, ExportConfig, ExportState, ExportStatus, VolumeState, VolumeStatus,
    VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::machine::{self, Action, AppState, FoundSnapshot, Input};
use crate::{app_status, snapshot_instance_status};

/// How long a starting app-manager waits for the other agents' tables before deciding anyway.
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// The longest the executor sleeps towards a wake-up time: the timer runs on the monotonic
/// clock, the schedule on the wall clock, so a clock step (NTP after boot) is noticed within
/// this long.
const MAX_SLEEP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("{0}")]
    Clock(String),
    /// The app's state could not be written: its step is not carried out.
    #[error("{0}")]
    Unrecorded(PersistError),
}

/// How often an app whose state could not be recorded tries again.
const UNRECORDED_RETRY: Duration = Duration::from_secs(10);

/// Inputs held for an app while its state cannot be written (a read-only or full `<persist>`):
/// none is stepped, so nothing is done that a restart would not know of.
/// `<run>/app-manager.boot`: when this boot's first config was in hand (RFC 3339).
const BOOT_FILE: &str = "app-manager.boot";

/// A taken snapshot whose records could not be written.
struct Unwritten {
    app: Uuid,
    why: String,
    since: DateTime<Utc>,
}

struct Unrecorded {
    why: String,
    since: DateTime<Utc>,
    inputs: Vec<Input>,
}

/// `<persist>/app-manager/apps/<uuid>.json`: one app's state machine.
pub fn state_file(persist: &Path, app: Uuid) -> PathBuf {
    persist
        .join("app-manager")
        .join("apps")
        .join(format!("{app}.json"))
}

pub struct AppManager {
    persist: PathBuf,
    apps: BTreeMap<Uuid, AppState>,
    /// Why an app's records could not be used, reported in its status.
    problems: BTreeMap<Uuid, Vec<String>>,
    /// Each app's state as it is on disk: a step that changes nothing is not written again
    /// (after a restart most steps only confirm facts, and each write is an fsync or three).
    persisted: BTreeMap<Uuid, AppState>,
    /// The domain-manager's last error for an app (it could not start it, or it died).
    domain_errors: BTreeMap<Uuid, cairn_types::ErrorDescription>,
    domain_configs: Publication<DomainConfig>,
    volume_requests: Publication<VolumesSnapshotConfig>,
    /// The volumes each app holds, so the volume-manager releases none still in use.
    volume_refs: Publication<AppVolumeRefs>,
    statuses: Publication<AppInstanceStatus>,
    /// Per app, when its machine wants the next [`Input::Tick`] ([`machine::next_wakeup`]).
    wakeups: BTreeMap<Uuid, DateTime<Utc>>,
    /// The wall clock, or a test's ([`crate::clock`]): every `now` the machine sees comes from it.
    clock: crate::clock::Clock,
    configs: Subscription<AppInstanceConfig>,
    domains: Subscription<DomainStatus>,
    volumes: Subscription<VolumeStatus>,
    results: Subscription<VolumesSnapshotStatus>,
    /// Consistency groups are coordinated once every app's state is resumed after a start.
    coordinating: bool,
    /// Live operations asked of the domain-manager, and its answers.
    live_requests: Publication<DomainLiveOpConfig>,
    live_results: Subscription<DomainLiveOpStatus>,
    /// Per app, the live request published for its machine's live step.
    live_published: BTreeMap<Uuid, Uuid>,
    /// Per app, the `Resume` asked for a domain found paused with no live step in progress
    /// (the domain-manager or this agent died mid-snapshot).
    unpausing: BTreeMap<Uuid, Uuid>,
    /// Quiesce hooks run in their own tasks ([`crate::hooks`]) and end here.
    hook_results: tokio::sync::mpsc::UnboundedReceiver<crate::hooks::HookDone>,
    hook_sender: tokio::sync::mpsc::UnboundedSender<crate::hooks::HookDone>,
    /// The run root: where the domain-manager puts a VM's guest agent port.
    run: PathBuf,
    /// Per app, an input an action's outcome gave (a domain request that could not be made),
    /// fed to its machine right after the step's actions.
    follow_ups: BTreeMap<Uuid, Input>,
    /// Apps whose last step could not be recorded, with the inputs held since, in order.
    unrecorded: BTreeMap<Uuid, Unrecorded>,
    /// When this boot's first config was in hand (the start delay's base), once known.
    boot_ready_at: Option<DateTime<Utc>>,
    /// Snapshots taken whose records (config, status) could not be written, by snapshot:
    /// tried again with the held steps, said in their app's status meanwhile.
    unwritten: BTreeMap<Uuid, Unwritten>,
    /// Exports of scheduled snapshots asked of the volume-manager (`machine::scheduled_exports`),
    /// and its outcomes: a request stays published until its job has ended.
    export_requests: Publication<ExportConfig>,
    export_statuses: Subscription<ExportStatus>,
    /// Per app, the export jobs published for it.
    exports_published: BTreeMap<Uuid, BTreeSet<Uuid>>,
    /// Per app, export jobs of its requests that have ended (their requests are withdrawn);
    /// forgotten with their snapshot.
    exports_ended: BTreeMap<Uuid, BTreeSet<Uuid>>,
}

impl AppManager {
    /// `technicians` read every app's status; each `(tenant, gid)` of `tenant_readers` makes
    /// the members of `gid` readers of that tenant's apps only.
    pub async fn open(
        bus: &Bus,
        technicians: Option<u32>,
        tenant_readers: &[(String, u32)],
    ) -> Result<Self, AgentError> {
        let status_access = technicians
            .map(Access::with_group_readers)
            .unwrap_or_default()
            .with_tenant_readers(tenant_readers.iter().cloned());
        let (hook_sender, hook_results) = tokio::sync::mpsc::unbounded_channel();
        let mut manager = Self {
            persist: bus.persist_dir().to_path_buf(),
            apps: BTreeMap::new(),
            problems: BTreeMap::new(),
            persisted: BTreeMap::new(),
            domain_errors: BTreeMap::new(),
            domain_configs: bus.publish(PublishOptions::for_requests()).await?,
            volume_requests: bus.publish(PublishOptions::for_requests()).await?,
            volume_refs: bus.publish(PublishOptions::for_requests()).await?,
            statuses: bus
                .publish(PublishOptions {
                    access: status_access,
                    ..Default::default()
                })
                .await?,
            wakeups: BTreeMap::new(),
            clock: crate::clock::Clock::from_env().map_err(AgentError::Clock)?,
            configs: bus.subscribe("config-agent"),
            domains: bus.subscribe("domain-manager"),
            volumes: bus.subscribe("volume-manager"),
            results: bus.subscribe("volume-manager"),
            coordinating: false,
            live_requests: bus.publish(PublishOptions::for_requests()).await?,
            live_results: bus.subscribe("domain-manager"),
            live_published: BTreeMap::new(),
            unpausing: BTreeMap::new(),
            hook_results,
            hook_sender,
            run: bus.run_dir().to_path_buf(),
            follow_ups: BTreeMap::new(),
            unrecorded: BTreeMap::new(),
            boot_ready_at: None,
            unwritten: BTreeMap::new(),
            export_requests: bus.publish(PublishOptions::for_requests()).await?,
            export_statuses: bus.subscribe("volume-manager"),
            exports_published: BTreeMap::new(),
            exports_ended: BTreeMap::new(),
        };
        let began = std::time::Instant::now();
        manager.load_states().await?;
        tracing::info!(
            apps = manager.apps.len(),
            ms = began.elapsed().as_millis() as u64,
            "app states loaded"
        );
        Ok(manager)
    }

    /// Checks the directories under `<persist>/snapshots` that no app's state tracks (by their
    /// names; normally none), once the configs are known: a record that does not load, or a
    /// directory without records, is reported in the status of the app it belongs to (found
    /// from whichever of its files still names it), never dropped silently. A complete, sound
    /// snapshot the app's state does not track is imported (the machine decides whether the
    /// config wants it); an incomplete one is reported and kept. Returns the directories of
    /// tracked snapshots, whose records are checked for damage after the apps are started
    /// ([`Self::check_tracked`]): 1,000 apps × 10 snapshots are 20,000 records.
    async fn scan_snapshot_records(&mut self) -> Result<Vec<PathBuf>, AgentError> {
        let persist = self.persist.clone();
        let known = self.known_snapshots();
        let (result, tracked) = tokio::task::spawn_blocking(move || {
            let (untracked, tracked) = snapshot_dirs(&persist, &known);
            (scan(&untracked, &known, usize::MAX), tracked)
        })
        .await
        .unwrap_or_default();
        self.take_scan(result).await?;
        Ok(tracked)
    }

    /// Per app, the snapshots its state tracks.
    fn known_snapshots(&self) -> BTreeMap<Uuid, Vec<Uuid>> {
        self.apps
            .iter()
            .map(|(app, s)| (*app, s.snapshots.iter().map(|r| r.id()).collect()))
            .collect()
    }

    /// Checks the records of the tracked snapshots in `dirs` for damage, on one thread of the
    /// blocking pool, while the agent serves: what it finds comes back through
    /// [`Self::take_scan`] as at start, with the status of each app it concerns.
    fn check_tracked(&self, dirs: Vec<PathBuf>) -> tokio::task::JoinHandle<ScanResult> {
        let known = self.known_snapshots();
        tokio::task::spawn_blocking(move || scan(&dirs, &known, 1))
    }

    /// Reports the problems a scan found and imports the sound snapshots no state tracks.
    async fn take_scan(&mut self, (problems, found): ScanResult) -> Result<(), AgentError> {
        let mut concerned = BTreeSet::new();
        for (app, problem) in problems {
            match app {
                Some(app) => {
                    self.report(app, problem);
                    concerned.insert(app);
                }
                None => tracing::warn!("{problem} (no record names its app)"),
            }
        }
        for (app, snapshot) in found {
            if self.apps.contains_key(&app) {
                tracing::info!(app = %app, snapshot = %snapshot.desc.snapshot_id, "importing a snapshot found on disk");
                self.input(app, Input::Import(Box::new(snapshot))).await?;
            } else {
                let problem = format!(
                    "snapshot {} found on disk belongs to app {app}, which is not in the config: kept, not imported",
                    snapshot.desc.snapshot_id
                );
                self.report(app, problem);
                concerned.insert(app);
            }
        }
        // Before the apps are resumed their first status carries the problems; later the
        // status of each app concerned is published again.
        if self.coordinating {
            for app in concerned {
                self.carry_out(app, Action::Status).await?;
            }
        }
        Ok(())
    }

    /// Reads every persisted app state; an unreadable one is reported, never dropped silently.
    async fn load_states(&mut self) -> Result<(), AgentError> {
        let dir = self.persist.join("app-manager").join("apps");
        let listed = dir.clone();
        // The walk and every load on the blocking pool, in one trip.
        let states = tokio::task::spawn_blocking(move || load_state_files(&listed))
            .await
            .map_err(|e| AgentError::Io {
                what: "loading",
                path: dir.clone(),
                source: std::io::Error::other(e),
            })?;
        let states = match states {
            Ok(states) => states,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(AgentError::Io {
                    what: "reading",
                    path: dir,
                    source,
                });
            }
        };
        for (app, path, loaded) in states {
            match loaded {
                Ok(loaded) => {
                    if let Origin::Backup { primary_error } = &loaded.origin {
                        self.report(
                            app,
                            format!("{}: used its backup: {primary_error}", path.display()),
                        );
                    }
                    self.persisted.insert(app, loaded.record.clone());
                    self.apps.insert(app, loaded.record);
                }
                Err(e) => self.report(app, e.to_string()),
            }
        }
        Ok(())
    }

    fn report(&mut self, app: Uuid, problem: String) {
        tracing::warn!(app = %app, "{problem}");
        self.problems.entry(app).or_default().push(problem);
    }

    /// Runs until the bus fails.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let began = std::time::Instant::now();
        self.synchronize().await;
        let synchronized = began.elapsed();
        // The configs are in hand: the boot's start delays count from now.
        self.boot_ready_at().await;
        // Before the configs are applied: a snapshot listed in the config and found on disk
        // is the one the controller means, not a new request to take it again.
        let tracked = self.scan_snapshot_records().await?;
        let scanned = began.elapsed();
        // Hooks an earlier run left going end before any interrupted hook is judged.
        let owner = self.persist.clone();
        let orphans = tokio::task::spawn_blocking(move || crate::hooks::kill_orphans(&owner))
            .await
            .unwrap_or_default();
        if !orphans.is_empty() {
            tracing::warn!(pids = ?orphans, "killed quiesce hooks left running by the previous app-manager");
        }
        let apps: Vec<Uuid> = self.apps.keys().copied().collect();
        for app in apps {
            self.refresh_facts(app).await?;
            self.input(app, Input::Resume).await?;
            // The domain request in force is published again, so the restart barrier below
            // does not take it for a stale one and stop the app.
            let request = self
                .apps
                .get(&app)
                .and_then(|s| s.domain_request().map(|(on, c)| (on, c.clone())));
            if let Some((activate, config)) = request {
                self.carry_out(
                    app,
                    Action::Domain {
                        activate,
                        config: Box::new(config),
                    },
                )
                .await?;
            }
            if let Some(input) = self.follow_ups.remove(&app) {
                self.input(app, input).await?;
            }
        }
        // Every app is resumed: the groups in progress go on where they stood.
        self.coordinating = true;
        self.coordinate_groups().await?;
        self.domain_configs.signal_restarted().await?;
        self.volume_requests.signal_restarted().await?;
        self.volume_refs.signal_restarted().await?;
        self.live_requests.signal_restarted().await?;
        self.export_requests.signal_restarted().await?;
        self.statuses.signal_restarted().await?;
        // Where a start's time goes, for the figures at scale.
        tracing::info!(
            apps = self.apps.len(),
            synchronized_ms = synchronized.as_millis() as u64,
            scanned_ms = scanned.as_millis() as u64,
            resumed_ms = began.elapsed().as_millis() as u64,
            "apps resumed"
        );
        let mut checking = Some(self.check_tracked(tracked));
        loop {
            // Asleep until the earliest wake-up any app's machine asked for (schedule due,
            // snapshot expiry), or a bus event; no polling when nothing is scheduled.
            let sleep = self
                .wakeups
                .values()
                .min()
                .map(|at| self.clock.until(*at).min(MAX_SLEEP));
            tokio::select! {
                event = self.configs.recv() => self.on_config(event).await?,
                event = self.domains.recv() => self.on_domain(event).await?,
                event = self.volumes.recv() => self.on_volume(event).await?,
                event = self.results.recv() => self.on_result(event).await?,
                event = self.live_results.recv() => self.on_live_result(event).await?,
                event = self.export_statuses.recv() => self.on_export_status(event).await?,
                Some(done) = self.hook_results.recv() => {
                    if self.apps.contains_key(&done.app) {
                        self.input(done.app, done.input).await?;
                    }
                }
                _ = tokio::time::sleep(sleep.unwrap_or(MAX_SLEEP)), if sleep.is_some() => {
                    self.on_timer().await?;
                }
                _ = tokio::time::sleep(UNRECORDED_RETRY), if !self.unrecorded.is_empty() || !self.unwritten.is_empty() => {
                    self.retry_unrecorded().await?;
                    self.retry_unwritten().await?;
                }
                checked = async { checking.as_mut()?.await.ok() }, if checking.is_some() => {
                    checking = None;
                    tracing::info!(ms = began.elapsed().as_millis() as u64, "tracked snapshot records checked");
                    self.take_scan(checked.unwrap_or_default()).await?;
                    // A snapshot taken just before the agent died, or whose records could not
                    // be written then, gets them now: without its config it could not be
                    // rolled back to.
                    self.write_missing_snapshot_records().await?;
                    // The check's buffers were many and short-lived, on another thread.
                    cairn_startup::release_freed_memory();
                }
            }
        }
    }

    /// Steps again the inputs held for apps whose state could not be recorded; an app whose
    /// write fails again holds them again.
    async fn retry_unrecorded(&mut self) -> Result<(), AgentError> {
        let held = std::mem::take(&mut self.unrecorded);
        for (app, held) in held {
            for input in held.inputs {
                self.input(app, input).await?;
            }
            if !self.unrecorded.contains_key(&app) {
                tracing::info!(app = %app, since = %held.since, "the app's state is recorded again; its held inputs were carried out");
                self.carry_out(app, Action::Status).await?;
            }
        }
        Ok(())
    }

    /// Writes again the records of taken snapshots that could not be written.
    async fn retry_unwritten(&mut self) -> Result<(), AgentError> {
        let apps: Vec<(Uuid, Uuid)> = self.unwritten.iter().map(|(id, u)| (u.app, *id)).collect();
        for (app, id) in apps {
            self.carry_out(app, Action::WriteSnapshot(id)).await?;
            self.carry_out(app, Action::Status).await?;
        }
        Ok(())
    }

    /// Every taken snapshot the apps track has its records on disk; missing ones are written.
    async fn write_missing_snapshot_records(&mut self) -> Result<(), AgentError> {
        let persist = self.persist.clone();
        let taken: Vec<(Uuid, Uuid)> = self
            .apps
            .iter()
            .flat_map(|(app, state)| {
                state
                    .snapshots
                    .iter()
                    .filter(|r| r.time_created.is_some())
                    .filter(|r| {
                        matches!(
                            r.state,
                            machine::SnapshotState::Available
                                | machine::SnapshotState::PendingDeletion
                                | machine::SnapshotState::DeletionFailed
                        )
                    })
                    .map(move |r| (*app, r.id()))
            })
            .collect();
        let missing = tokio::task::spawn_blocking(move || {
            taken
                .into_iter()
                .filter(|(_, id)| !has_snapshot_records(&snapshot_dir(&persist, *id)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (app, id) in missing {
            tracing::warn!(app = %app, snapshot = %id, "a taken snapshot has no records: writing them");
            self.carry_out(app, Action::WriteSnapshot(id)).await?;
        }
        Ok(())
    }

    /// Ticks every app whose wake-up time has come, each with a fresh snapshot id.
    async fn on_timer(&mut self) -> Result<(), AgentError> {
        let now = self.clock.now();
        let due: Vec<Uuid> = self
            .wakeups
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(app, _)| *app)
            .collect();
        for app in due {
            let new_id = Uuid::new_v4();
            self.input(app, Input::Tick { new_id }).await?;
            if let Some(record) = self.apps.get(&app).and_then(|s| s.snapshot(new_id)) {
                tracing::info!(app = %app, snapshot = %new_id, name = %record.desc.name, "taking a scheduled snapshot");
            }
        }
        Ok(())
    }

    /// Gives the other agents a moment to deliver their tables, so that the first decisions
    /// after a restart are made on facts, not on an empty view.
    async fn synchronize(&mut self) {
        let wait = async {
            while !(self.configs.is_synchronized()
                && self.domains.is_synchronized()
                && self.volumes.is_synchronized()
                && self.results.is_synchronized())
            {
                tokio::select! {
                    _ = self.configs.recv(), if !self.configs.is_synchronized() => {}
                    _ = self.domains.recv(), if !self.domains.is_synchronized() => {}
                    _ = self.volumes.recv(), if !self.volumes.is_synchronized() => {}
                    _ = self.results.recv(), if !self.results.is_synchronized() => {}
                }
            }
        };
        if tokio::time::timeout(SYNC_WAIT, wait).await.is_err() {
            tracing::warn!(
                "not every agent answered within {SYNC_WAIT:?}; deciding on what is known"
            );
        }
        // Configs that arrived while synchronizing are applied now.
        let configs: Vec<AppInstanceConfig> = self.configs.values().cloned().collect();
        for config in configs {
            let app = config.app_uuid();
            self.apps
                .entry(app)
                .or_insert_with(|| AppState::new(config.clone()));
        }
    }

    /// Feeds the current domain and volume facts of `app` to its machine.
    async fn refresh_facts(&mut self, app: Uuid) -> Result<(), AgentError> {
        if let Some(config) = self.configs.get(&app.to_string()).cloned() {
            self.input(app, Input::Config(config)).await?;
        }
        if let Some(input) = self.domains.get(&app.to_string()).and_then(domain_input) {
            self.input(app, input).await?;
        }
        let ready = self.volumes_ready(app);
        self.input(app, Input::Volumes { ready }).await?;
        // An answer that arrived while this agent was down (or synchronizing) is in the
        // table: repeating the request would not bring it again, since an equal value is
        // not re-sent to a subscriber that reconnects.
        let awaited = self.apps.get(&app).and_then(|s| match s.phase {
            machine::Phase::Volume { step, counter } => Some((step, counter)),
            _ => None,
        });
        if let Some((step, counter)) = awaited {
            let id = match step {
                machine::Step::Create(id)
                | machine::Step::Delete(id)
                | machine::Step::Rollback(id) => id,
            };
            if let Some(answer) = self.results.get(&id.to_string()).cloned()
                && answer.request_counter == counter
                && !answer.is_in_progress()
            {
                self.input(app, Input::VolumesResult(answer)).await?;
            }
        }
        // Likewise a live operation's answer.
        let live = self.apps.get(&app).and_then(crate::live::live_request);
        if let Some(request) = live {
            self.sync_live_request(app).await?;
            if let Some(answer) = self
                .live_results
                .get(&request.request_id.to_string())
                .cloned()
                && answer.state != DomainLiveOpState::InProgress
            {
                self.input(app, Input::LiveOpResult(answer)).await?;
            }
        }
        Ok(())
    }

    async fn on_config(&mut self, event: Event<AppInstanceConfig>) -> Result<(), AgentError> {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                let app = value.app_uuid();
                let first = match self.apps.entry(app) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(AppState::new(value.clone()));
                        true
                    }
                    std::collections::btree_map::Entry::Occupied(_) => false,
                };
                self.input(app, Input::Config(value)).await?;
                if first {
                    let ready = self.volumes_ready(app);
                    self.input(app, Input::Volumes { ready }).await?;
                }
                Ok(())
            }
            Event::Delete { last, .. } => {
                // The app is gone from the config: stop it. Its snapshots are kept until a
                // later issue decides their fate (EVE deletes them with the app).
                let app = last.app_uuid();
                let mut stopped = last;
                stopped.activate = false;
                // Nor does its schedule go on taking snapshots of it.
                if let Some(policy) = stopped.snapshot.policy.as_mut() {
                    policy.schedule.clear();
                }
                // Nor its group's: the other members no longer count on it.
                stopped.group = None;
                self.input(app, Input::Config(stopped)).await
            }
            _ => Ok(()),
        }
    }

    async fn on_domain(&mut self, event: Event<DomainStatus>) -> Result<(), AgentError> {
        let (app, input) = match &event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                let app = value.uuid_and_version.uuid;
                let changed = self.domain_errors.get(&app) != Some(&value.error);
                if changed && self.apps.contains_key(&app) {
                    self.domain_errors.insert(app, value.error.clone());
                    self.carry_out(app, Action::Status).await?;
                }
                self.unpause_if_stranded(value).await?;
                (app, domain_input(value))
            }
            Event::Delete { last, .. } => (
                last.uuid_and_version.uuid,
                Some(Input::Domain { active: false }),
            ),
            _ => return Ok(()),
        };
        match input {
            Some(input) if self.apps.contains_key(&app) => self.input(app, input).await,
            _ => Ok(()),
        }
    }

    async fn on_volume(&mut self, event: Event<VolumeStatus>) -> Result<(), AgentError> {
        let key = match &event {
            Event::Create { key, .. } | Event::Modify { key, .. } | Event::Delete { key, .. } => {
                key.clone()
            }
            _ => return Ok(()),
        };
        // Only the apps naming this volume can change: an app's readiness is that of its own
        // volumes (at 1,000 apps, every app for every volume event was a million look-ups).
        let named = cairn_types::volume::parse_volume_key(&key);
        let names = |r: &cairn_types::VolumeRefConfig| match named {
            Some((id, generation, local)) => {
                r.volume_id == id
                    && r.generation_counter == generation
                    && r.local_generation_counter == local
            }
            None => machine::ref_key(r) == key,
        };
        let apps: Vec<Uuid> = self
            .apps
            .iter()
            .filter(|(_, s)| s.effective().volume_ref_config_list.iter().any(names))
            .map(|(app, _)| *app)
            .collect();
        for app in apps {
            let ready = self.volumes_ready(app);
            if self
                .apps
                .get(&app)
                .is_some_and(|s| s.volumes_ready != ready)
            {
                self.input(app, Input::Volumes { ready }).await?;
            } else if !ready {
                // Still waiting on this volume: the status says for what (its error may have come).
                self.carry_out(app, Action::Status).await?;
            }
        }
        Ok(())
    }

    async fn on_result(&mut self, event: Event<VolumesSnapshotStatus>) -> Result<(), AgentError> {
        if let Event::Create { value, .. } | Event::Modify { new: value, .. } = event
            && self.apps.contains_key(&value.app_uuid)
            && !value.is_in_progress()
        {
            tracing::info!(app = %value.app_uuid, snapshot = %value.snapshot_id, action = ?value.result_of_action, counter = value.request_counter, error = %value.error.error, "volume-manager answered");
            let app = value.app_uuid;
            return self.input(app, Input::VolumesResult(value)).await;
        }
        Ok(())
    }

    /// Publishes the live request the app's machine waits on (again, after a restart: the
    /// domain-manager runs a request id at most once and keeps its answer) and withdraws the
    /// one it no longer needs.
    async fn sync_live_request(&mut self, app: Uuid) -> Result<(), AgentError> {
        let wanted = self.apps.get(&app).and_then(crate::live::live_request);
        let wanted_id = wanted.as_ref().map(|r| r.request_id);
        if let Some(old) = self.live_published.get(&app).copied()
            && Some(old) != wanted_id
        {
            self.live_requests.unpublish(&old.to_string()).await?;
            self.live_published.remove(&app);
        }
        if let Some(request) = wanted
            && self.live_published.get(&app) != Some(&request.request_id)
        {
            tracing::info!(app = %app, op = ?request.op, tag = %request.tag, request = %request.request_id, "asking the domain-manager for a live operation");
            self.live_published.insert(app, request.request_id);
            self.live_requests.publish(request).await?;
        }
        Ok(())
    }

    /// Publishes the export requests `app`'s scheduled snapshots call for and withdraws those
    /// no longer wanted (the snapshot is gone) or whose job has ended.
    async fn sync_exports(&mut self, app: Uuid) -> Result<(), AgentError> {
        let mut wanted: Vec<ExportConfig> = self
            .apps
            .get(&app)
            .map(machine::scheduled_exports)
            .unwrap_or_default();
        let ended = self.exports_ended.entry(app).or_default();
        ended.retain(|job| wanted.iter().any(|c| c.job_id == *job));
        wanted.retain(|c| !ended.contains(&c.job_id));
        if ended.is_empty() {
            self.exports_ended.remove(&app);
        }
        let published = self.exports_published.entry(app).or_default();
        let gone: Vec<Uuid> = published
            .iter()
            .filter(|job| !wanted.iter().any(|c| c.job_id == **job))
            .copied()
            .collect();
        for job in gone {
            published.remove(&job);
            self.export_requests.unpublish(&job.to_string()).await?;
        }
        for config in wanted {
            if published.insert(config.job_id) {
                tracing::info!(app = %app, snapshot = %config.snapshot_id, remote = %config.remote, "export of a scheduled snapshot asked");
                self.export_requests.publish(config).await?;
            }
        }
        if published.is_empty() {
            self.exports_published.remove(&app);
        }
        Ok(())
    }

    /// An export job of this agent's ended: its request is withdrawn.
    async fn on_export_status(&mut self, event: Event<ExportStatus>) -> Result<(), AgentError> {
        let (Event::Create { value, .. } | Event::Modify { new: value, .. }) = event else {
            return Ok(());
        };
        if value.state == ExportState::Running {
            return Ok(());
        }
        let app = self
            .exports_published
            .iter()
            .find(|(_, jobs)| jobs.contains(&value.job_id))
            .map(|(app, _)| *app);
        if let Some(app) = app {
            tracing::info!(app = %app, job = %value.job_id, state = ?value.state, export = %value.remote_export, error = %value.error, "export of a scheduled snapshot ended");
            self.exports_ended
                .entry(app)
                .or_default()
                .insert(value.job_id);
            self.sync_exports(app).await?;
        }
        Ok(())
    }

    async fn on_live_result(&mut self, event: Event<DomainLiveOpStatus>) -> Result<(), AgentError> {
        let (Event::Create { value, .. } | Event::Modify { new: value, .. }) = event else {
            return Ok(());
        };
        if value.state == DomainLiveOpState::InProgress {
            return Ok(());
        }
        let app = value.app_uuid;
        if self.unpausing.get(&app) == Some(&value.request_id) {
            tracing::info!(app = %app, state = ?value.state, error = %value.error.error, "paused domain resumed");
            self.unpausing.remove(&app);
            self.live_requests
                .unpublish(&value.request_id.to_string())
                .await?;
            return Ok(());
        }
        if self.live_published.get(&app) == Some(&value.request_id) {
            tracing::info!(app = %app, op = ?value.op, state = ?value.state, pause_ms = value.pause_ms, ms = value.duration_ms, error = %value.error.error, "domain-manager answered a live operation");
            return self.input(app, Input::LiveOpResult(value)).await;
        }
        Ok(())
    }

    /// A VM left paused by a live step that did not finish (a crash in the middle) is resumed:
    /// no live step of this app is in progress, so nothing wants it paused.
    async fn unpause_if_stranded(&mut self, status: &DomainStatus) -> Result<(), AgentError> {
        let app = status.uuid_and_version.uuid;
        let idle = self.apps.get(&app).is_some_and(|s| s.live.is_none());
        if !(status.paused && status.state == DomainState::Running && idle)
            || self.unpausing.contains_key(&app)
        {
            return Ok(());
        }
        let request = DomainLiveOpConfig {
            request_id: Uuid::new_v4(),
            app_uuid: app,
            op: DomainLiveOp::Resume,
            tag: String::new(),
        };
        tracing::warn!(app = %app, "domain found paused with no live snapshot in progress: resuming it");
        self.unpausing.insert(app, request.request_id);
        self.live_requests.publish(request).await?;
        Ok(())
    }

    /// An app the config wants running that waits for its volumes says so: creating
    /// them, or Broken with the error of a volume that cannot be made.
    fn explain_waiting_volumes(&self, state: &AppState, status: &mut AppInstanceStatus) {
        let waiting = state.effective().activate
            && !state.domain_active
            && state.phase == machine::Phase::Idle
            && !state.volumes_ready;
        if !waiting || status.state != cairn_types::SwState::Halted {
            return;
        }
        status.state = cairn_types::SwState::CreatingVolume;
        let failed = state
            .effective()
            .volume_ref_config_list
            .iter()
            .find_map(|r| {
                let key = machine::ref_key(r);
                self.volumes
                    .get(&key)
                    .filter(|v| v.error.is_error())
                    .map(|v| (key, v.error.clone()))
            });
        if let Some((key, error)) = failed
            && !status.error.is_error()
        {
            status.state = cairn_types::SwState::Broken;
            // The volume-manager's errors already begin with `volume <key>: `.
            let prefix = format!("volume {key}: ");
            let why = error.error.strip_prefix(&prefix).unwrap_or(&error.error);
            status.error = cairn_types::ErrorDescription {
                error: format!("app {} cannot start: volume {key}: {why}", state.app),
                ..error
            };
        }
    }

    fn volumes_ready(&self, app: Uuid) -> bool {
        let Some(state) = self.apps.get(&app) else {
            return false;
        };
        state.effective().volume_ref_config_list.iter().all(|r| {
            self.volumes
                .get(&machine::ref_key(r))
                .is_some_and(|v| v.state == VolumeState::Ready)
        })
    }

    /// One machine step for `app` (see [`Self::input_one`]), then whatever it unblocks in the
    /// consistency groups.
    async fn input(&mut self, app: Uuid, input: Input) -> Result<(), AgentError> {
        self.input_one(app, input).await?;
        self.coordinate_groups().await
    }

    /// Tells the members of the consistency groups in progress what the others' states allow
    /// ([`machine::coordinate`]), until nothing more is unblocked.
    async fn coordinate_groups(&mut self) -> Result<(), AgentError> {
        if !self.coordinating {
            return Ok(());
        }
        // Each round moves some member on for good (a barrier passed, a snapshot failed);
        // the bound only guards against a bug turning this into a spin.
        for _ in 0..64 {
            let inputs = machine::coordinate(&self.apps, self.clock.now());
            if inputs.is_empty() {
                return Ok(());
            }
            for (app, input) in inputs {
                tracing::info!(app = %app, ?input, "consistency group");
                self.input_one(app, input).await?;
            }
        }
        tracing::warn!("consistency groups still moving after 64 rounds; going on later");
        Ok(())
    }

    /// One machine step for `app`, and its actions carried out in order. A step that changes
    /// the volumes of the config in force (a purge, a rollback) makes the machine forget their
    /// readiness; it is followed by the readiness of the new ones, from the volume table.
    async fn input_one(&mut self, app: Uuid, input: Input) -> Result<(), AgentError> {
        let mut next = Some(input);
        // An app that does not know this boot yet learns it first.
        // Only an app with a start delay needs it: the others are not written again for it.
        let ready_at = self.boot_ready_at().await;
        let delayed = |c: &AppInstanceConfig| c.start_delay_seconds > 0;
        let mut after_boot = None;
        if self.apps.get(&app).is_some_and(|s| {
            s.boot_ready_at != Some(ready_at)
                && (delayed(s.effective()) || matches!(&next, Some(Input::Config(c)) if delayed(c)))
        }) {
            after_boot = next.replace(Input::Boot { ready_at });
        }
        while let Some(input) = next.take() {
            // Held behind the one that could not be recorded, in arrival order.
            if let Some(held) = self.unrecorded.get_mut(&app) {
                held.inputs.push(input);
                held.inputs.extend(after_boot.take());
                // The status counts what waits.
                return self.carry_out(app, Action::Status).await;
            }
            let Some(state) = self.apps.remove(&app) else {
                return Ok(());
            };
            let unstepped = (state.clone(), input.clone());
            let before = state.phase.clone();
            let was_ready = state.volumes_ready;
            tracing::debug!(app = %app, ?input, "input");
            let now = self.clock.now();
            let (state, actions) = machine::step(state, input, now);
            if state.phase != before {
                tracing::info!(app = %app, from = ?before, to = ?state.phase, "app phase");
            }
            match machine::next_wakeup(&state, now) {
                Some(at) => self.wakeups.insert(app, at),
                None => self.wakeups.remove(&app),
            };
            self.apps.insert(app, state);
            for action in actions {
                match self.carry_out(app, action).await {
                    Err(AgentError::Unrecorded(e)) => {
                        self.hold(app, unstepped, e).await?;
                        if let (Some(held), Some(input)) =
                            (self.unrecorded.get_mut(&app), after_boot.take())
                        {
                            held.inputs.push(input);
                        }
                        return Ok(());
                    }
                    other => other?,
                }
            }
            self.sync_live_request(app).await?;
            self.sync_exports(app).await?;
            let forgotten = was_ready && self.apps.get(&app).is_some_and(|s| !s.volumes_ready);
            if forgotten && self.volumes_ready(app) {
                next = Some(Input::Volumes { ready: true });
            }
            if next.is_none() {
                next = after_boot.take();
            }
            if next.is_none() {
                next = self.follow_ups.remove(&app);
            }
        }
        Ok(())
    }

    /// When this boot's first config was in hand: the start delay's base (EVE's
    /// `delayBaseTime`). Kept in the run directory, so a restarted app-manager keeps the
    /// window and a reboot (a fresh run directory) opens a new one.
    async fn boot_ready_at(&mut self) -> DateTime<Utc> {
        if let Some(at) = self.boot_ready_at {
            return at;
        }
        let path = self.run.join(BOOT_FILE);
        let kept = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match DateTime::parse_from_rfc3339(text.trim()) {
                Ok(at) => Some(at.with_timezone(&Utc)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable boot time, counting from now: {e}");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the boot time, counting from now: {e}");
                None
            }
        };
        let at = match kept {
            Some(at) => at,
            None => {
                let now = self.clock.now();
                // A lost write only restarts the window at the next start-up of the agent.
                if let Err(e) = tokio::fs::write(&path, now.to_rfc3339()).await {
                    tracing::warn!(path = %path.display(), "cannot keep the boot time: {e}");
                }
                now
            }
        };
        self.boot_ready_at = Some(at);
        at
    }

    /// The step of `input` could not be recorded: the app goes back to its state before it,
    /// holds the input, and says why in its status; [`Self::retry_unrecorded`] tries again.
    async fn hold(
        &mut self,
        app: Uuid,
        (state, input): (AppState, Input),
        e: cairn_persist::PersistError,
    ) -> Result<(), AgentError> {
        tracing::error!(app = %app, "cannot record the app's state, nothing done for it until it can: {e}");
        // No ticks while held: a due time left in the past would wake the loop at once, again
        // and again; the held steps, once recorded, set the next one.
        self.wakeups.remove(&app);
        self.apps.insert(app, state);
        self.follow_ups.remove(&app);
        self.unrecorded.insert(
            app,
            Unrecorded {
                why: e.to_string(),
                since: self.clock.now(),
                inputs: vec![input],
            },
        );
        self.carry_out(app, Action::Status).await
    }

    async fn carry_out(&mut self, app: Uuid, action: Action) -> Result<(), AgentError> {
        let Some(state) = self.apps.get(&app).cloned() else {
            return Ok(());
        };
        match action {
            Action::Persist => {
                if self.persisted.get(&app) == Some(&state) {
                    return Ok(());
                }
                let path = state_file(&self.persist, app);
                let intent = state.phase != machine::Phase::Idle;
                let written = state.clone();
                tokio::task::spawn_blocking(move || store_state(&path, &written))
                    .await
                    .map_err(|e| AgentError::Io {
                        what: "persisting",
                        path: state_file(&self.persist, app),
                        source: std::io::Error::other(e),
                    })?
                    .map_err(AgentError::Unrecorded)?;
                self.persisted.insert(app, state);
                // Only states that carry work in progress are intents worth dying after.
                if intent {
                    crash_point("app-manager:after-persist-intent");
                }
            }
            Action::Domain { activate, config } => {
                match self.domain_config(&config, activate, state.restarts) {
                    Ok(mut domain) => {
                        // A rollback to a stateful snapshot starts from its memory state.
                        if activate {
                            domain.load_state_tag = crate::live::load_state_tag(&state);
                        }
                        self.domain_configs.publish(domain).await?
                    }
                    // The app is broken for this reason, not left starting.
                    Err(reason) if activate => {
                        tracing::warn!(app = %app, "{reason}");
                        self.follow_ups.insert(app, Input::CannotStart { reason });
                    }
                    Err(problem) => {
                        self.report(app, problem);
                    }
                }
            }
            Action::Volumes(mut request) => {
                // A running container's volumes agree only if it is frozen while they are
                // taken: the volume-manager freezes its cgroup.
                if request.live
                    && state
                        .running
                        .as_ref()
                        .is_some_and(|c| matches!(c.domain, Some(DomainSpec::Container(_))))
                {
                    request.freeze_cgroup = cairn_types::domain::container_cgroup(&self.run, app);
                }
                tracing::info!(app = %app, snapshot = %request.snapshot_id, action = ?request.action, counter = request.request_counter, "asking the volume-manager");
                self.volume_requests.republish(request).await?;
                crash_point("app-manager:after-volumes-request");
            }
            Action::WriteSnapshot(id) => match self.write_snapshot_files(&state, id).await {
                Ok(()) => {
                    if self.unwritten.remove(&id).is_some() {
                        tracing::info!(app = %app, snapshot = %id, "the snapshot's records are written now");
                    }
                }
                // The snapshot is taken: the agent goes on and tries again, rather than exit
                // and come back to the same full or failing disk.
                Err(e) => {
                    tracing::error!(app = %app, snapshot = %id, "cannot write the snapshot's records: {e}");
                    let since = self
                        .unwritten
                        .get(&id)
                        .map_or_else(|| self.clock.now(), |u| u.since);
                    self.unwritten.insert(
                        id,
                        Unwritten {
                            app,
                            why: e.to_string(),
                            since,
                        },
                    );
                }
            },
            Action::RunHook(request) => {
                // The hook sees the volumes it quiesces by their paths on the device.
                let volumes = request
                    .volume_keys
                    .iter()
                    .filter_map(|key| self.volumes.get(key))
                    .map(|v| v.file_location.clone())
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect();
                tracing::info!(app = %app, snapshot = %request.snapshot, hook = request.kind.name(), command = %crate::hooks::display_command(&request.argv), timeout_s = request.timeout_seconds, "running a quiesce hook");
                let guest_agent = crate::guest_agent::socket(&self.run, app);
                crate::hooks::spawn(
                    *request,
                    volumes,
                    self.persist.clone(),
                    guest_agent,
                    self.hook_sender.clone(),
                );
            }
            Action::RemoveSnapshot(id) => {
                let dir = snapshot_dir(&self.persist, id);
                let target = dir.clone();
                tokio::task::spawn_blocking(move || remove_snapshot_dir(&target))
                    .await
                    .map_err(|e| AgentError::Io {
                        what: "removing",
                        path: dir.clone(),
                        source: std::io::Error::other(e),
                    })?
                    .map_err(|source| AgentError::Io {
                        what: "removing",
                        path: dir,
                        source,
                    })?;
            }
            Action::Status => {
                let mut status = app_status(&state);
                if let Some(problems) = self.problems.get(&app) {
                    status.warnings.extend(problems.iter().cloned());
                }
                // The app's own error first; else why its domain does not run.
                if !status.error.is_error()
                    && let Some(domain) = self.domain_errors.get(&app)
                    && domain.is_error()
                {
                    status.error = domain.clone();
                }
                self.explain_waiting_volumes(&state, &mut status);
                for (id, unwritten) in self.unwritten.iter().filter(|(_, u)| u.app == app) {
                    let said = format!(
                        "snapshot {id} of app {app} is taken but its records cannot be written ({}); without them it cannot be rolled back to (tried again every {} s): make the persist file system writable or free space on it",
                        unwritten.why,
                        UNRECORDED_RETRY.as_secs()
                    );
                    if status.error.is_error() {
                        status.warnings.push(said);
                    } else {
                        status.error = cairn_types::ErrorDescription::new(
                            said,
                            cairn_types::ErrorSeverity::Error,
                            unwritten.since,
                        );
                    }
                }
                if let Some(held) = self.unrecorded.get(&app) {
                    status.error = cairn_types::ErrorDescription::new(
                        format!(
                            "app {app}: its state cannot be recorded ({}); nothing is done for it until it can (tried every {} s, {} request(s) held): make the persist file system writable or free space on it",
                            held.why,
                            UNRECORDED_RETRY.as_secs(),
                            held.inputs.len()
                        ),
                        cairn_types::ErrorSeverity::Error,
                        held.since,
                    );
                }
                self.statuses.publish(status).await?;
                // Equal values are not sent again, so this costs nothing when nothing changed.
                self.volume_refs
                    .publish(AppVolumeRefs {
                        app_uuid: app,
                        volume_keys: state.volumes_in_use(),
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// `appInstanceConfig.json` and `snapshotInstanceStatus.json` of an available snapshot, in
    /// EVE's names, written with `cairn-persist`.
    async fn write_snapshot_files(&self, state: &AppState, id: Uuid) -> Result<(), AgentError> {
        let Some(record) = state.snapshot(id) else {
            return Ok(());
        };
        let dir = snapshot_dir(&self.persist, id);
        let config = record
            .config
            .clone()
            .unwrap_or_else(|| state.effective_shared().clone());
        let status = snapshot_instance_status(state, record);
        tokio::task::spawn_blocking(move || store_snapshot_files(&dir, &config, &status))
            .await
            .map_err(|e| AgentError::Io {
                what: "writing snapshot files of",
                path: snapshot_dir(&self.persist, id),
                source: std::io::Error::other(e),
            })??;
        Ok(())
    }

    /// The domain-manager's view of the app: its spec and its volumes' paths.
    fn domain_config(
        &self,
        config: &AppInstanceConfig,
        activate: bool,
        restarts: u32,
    ) -> Result<DomainConfig, String> {
        if let Some(reason) = &config.unrunnable {
            return Err(reason.clone());
        }
        let spec = config.domain.clone().ok_or_else(|| {
            format!(
                "app {} has no domain spec (vm or process): nothing to run",
                config.app_uuid()
            )
        })?;
        let mut disks = Vec::new();
        for volume in &config.volume_ref_config_list {
            let key = machine::ref_key(volume);
            let status = self.volumes.get(&key);
            disks.push(DiskConfig {
                volume_key: key,
                file_location: status.map(|s| s.file_location.clone()).unwrap_or_default(),
                format: status.map(|s| s.format).unwrap_or_default(),
                read_only: false,
                mount_dir: volume.mount_dir.clone(),
            });
        }
        Ok(DomainConfig {
            uuid_and_version: config.uuid_and_version.clone(),
            display_name: config.display_name.clone(),
            activate,
            spec,
            disk_config_list: disks,
            restart_counter: machine::domain_restart_counter(config, restarts),
            purge_counter: config.purge_cmd.counter + config.local_purge_cmd.counter,
            load_state_tag: String::new(),
        })
    }
}

/// What the scan found: problems, each with the app it belongs to when a file names it, and
/// complete snapshots no app state tracks, with their app.
type ScanResult = (Vec<(Option<Uuid>, String)>, Vec<(Uuid, FoundSnapshot)>);

/// One app's state file and what loading it gave.
type StateFile = (Uuid, PathBuf, Result<Loaded<AppState>, PersistError>);

/// Every `<uuid>.json` in the app states' directory with what loading it gave. Blocking: runs
/// on the blocking pool.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn load_state_files(dir: &Path) -> std::io::Result<Vec<StateFile>> {
    let mut states = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let Some(app) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<Uuid>().ok())
        else {
            continue;
        };
        let loaded =
            machine::shared::sharing(|| cairn_persist::load_with_backup::<AppState>(&path));
        states.push((app, path, loaded));
    }
    Ok(states)
}

/// One app's state, durably, the previous one as `.bak`.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn store_state(path: &Path, state: &AppState) -> Result<(), PersistError> {
    cairn_persist::store_with_backup(path, state)
}

/// A snapshot's EVE files, durably.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn store_snapshot_files(
    dir: &Path,
    config: &AppInstanceConfig,
    status: &cairn_types::SnapshotInstanceStatus,
) -> Result<(), PersistError> {
    cairn_persist::store(&dir.join(APP_INSTANCE_CONFIG_FILE), config)?;
    cairn_persist::store(&dir.join(SNAPSHOT_INSTANCE_STATUS_FILE), status)
}

/// Whether a snapshot directory holds the app-manager's two records (blocking).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn has_snapshot_records(dir: &Path) -> bool {
    dir.join(APP_INSTANCE_CONFIG_FILE).exists() && dir.join(SNAPSHOT_INSTANCE_STATUS_FILE).exists()
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    cairn_persist::remove_dir_durable(dir)
}

/// The snapshot directories (blocking): those whose name is no snapshot an app's state
/// tracks, and those whose name is one.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn snapshot_dirs(
    persist: &Path,
    known: &BTreeMap<Uuid, Vec<Uuid>>,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(cairn_types::layout::snapshots_dir(persist)) else {
        return Default::default();
    };
    let tracked: std::collections::HashSet<Uuid> = known.values().flatten().copied().collect();
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| dir.is_dir())
        .partition(|dir| {
            !dir.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Uuid>().ok())
                .is_some_and(|id| tracked.contains(&id))
        })
}

/// Reads the snapshot directories `dirs` (blocking) on up to `threads` threads (at most the
/// cores).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn scan(dirs: &[PathBuf], known: &BTreeMap<Uuid, Vec<Uuid>>, threads: usize) -> ScanResult {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(8))
        .min(threads)
        .max(1);
    let per_thread = dirs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = dirs
            .chunks(per_thread)
            .map(|part| scope.spawn(move || scan_dirs(part, known)))
            .collect();
        let mut all = ScanResult::default();
        for part in parts {
            // A panic is a bug in the scan: it reaches the caller as before.
            let (problems, found) = part
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            all.0.extend(problems);
            all.1.extend(found);
        }
        all
    })
}

#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn scan_dirs(dirs: &[PathBuf], known: &BTreeMap<Uuid, Vec<Uuid>>) -> ScanResult {
    use cairn_types::layout::VOLUMES_SNAPSHOT_STATUS_FILE;
    use cairn_types::{SnapshotInstanceStatus, VolumesSnapshotStatus};
    let mut problems = Vec::new();
    let mut found = Vec::new();
    for dir in dirs {
        let status =
            cairn_persist::load::<SnapshotInstanceStatus>(&dir.join(SNAPSHOT_INSTANCE_STATUS_FILE));
        let config = cairn_persist::load::<AppInstanceConfig>(&dir.join(APP_INSTANCE_CONFIG_FILE));
        let named = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<Uuid>().ok());
        let missing =
            |e: &cairn_persist::PersistError| matches!(e.kind, cairn_persist::ErrorKind::NotFound);
        // A snapshot the app's state tracks needs no volume record here: only its own and
        // its config's damage is reported (a third of the reading at 10,000 snapshots).
        let app = status
            .as_ref()
            .ok()
            .map(|s| s.record.app_instance_id)
            .or_else(|| config.as_ref().ok().map(|c| c.record.app_uuid()));
        if named.is_some_and(|id| {
            app.is_some_and(|a| known.get(&a).is_some_and(|ids| ids.contains(&id)))
        }) {
            for err in [status.as_ref().err(), config.as_ref().err()]
                .into_iter()
                .flatten()
            {
                if !missing(err) {
                    problems.push((app, format!("corrupt snapshot record: {err}")));
                }
            }
            continue;
        }
        let volumes =
            cairn_persist::load::<VolumesSnapshotStatus>(&dir.join(VOLUMES_SNAPSHOT_STATUS_FILE));
        let app = status
            .as_ref()
            .ok()
            .map(|s| s.record.app_instance_id)
            .or_else(|| config.as_ref().ok().map(|c| c.record.app_uuid()))
            .or_else(|| volumes.as_ref().ok().map(|v| v.record.app_uuid));
        match (&status, &config, &volumes) {
            (Err(a), Err(b), Err(c)) if missing(a) && missing(b) && missing(c) => {
                problems.push((
                    app,
                    format!("snapshot directory {} holds no records", dir.display()),
                ));
                continue;
            }
            _ => {}
        }
        // Files missing for a snapshot the app's state still tracks are about to be written.
        let tracked = named.is_some_and(|id| {
            app.is_some_and(|a| known.get(&a).is_some_and(|ids| ids.contains(&id)))
        });
        let taking = volumes.as_ref().is_ok_and(|v| v.record.is_in_progress());
        for err in [status.as_ref().err(), config.as_ref().err()]
            .into_iter()
            .flatten()
        {
            if !missing(err) {
                problems.push((app, format!("corrupt snapshot record: {err}")));
            } else if !tracked && !taking {
                problems.push((app, format!("incomplete snapshot directory: {err}")));
            }
        }
        if tracked {
            continue;
        }
        let Ok(status) = status else {
            continue;
        };
        let status = status.record;
        // Importable: all three records sound, naming the same snapshot and app, and the
        // volumes' snapshot finished without error (a rollback can then use it).
        let why_not = match (&config, &volumes) {
            (Err(_), _) => Some("its appInstanceConfig.json is unusable".to_string()),
            (_, Err(e)) => Some(format!("its volume record is unusable: {e}")),
            (Ok(c), Ok(v)) => {
                let (c, v) = (&c.record, &v.record);
                let id = status.snapshot.snapshot_id;
                if named != Some(id) || v.snapshot_id != id {
                    Some(format!(
                        "its records name other snapshots ({id}, {}) than its directory",
                        v.snapshot_id
                    ))
                } else if c.app_uuid() != status.app_instance_id
                    || v.app_uuid != status.app_instance_id
                {
                    Some(format!(
                        "its records name different apps ({}, {}, {})",
                        status.app_instance_id,
                        c.app_uuid(),
                        v.app_uuid
                    ))
                } else if v.is_in_progress()
                    || v.error.is_error()
                    || v.volume_snapshot_meta.is_empty()
                {
                    Some("its volume snapshot is unfinished or failed".to_string())
                } else {
                    None
                }
            }
        };
        match (why_not, config, volumes) {
            (None, Ok(config), Ok(volumes)) => found.push((
                status.app_instance_id,
                FoundSnapshot {
                    desc: status.snapshot.clone(),
                    config: config.record,
                    time_triggered: status.time_triggered,
                    time_created: status.time_created.or(volumes.record.time_created),
                },
            )),
            (why_not, _, _) => problems.push((
                app,
                format!(
                    "snapshot records in {} are not tracked by this app-manager: kept, not imported ({})",
                    dir.display(),
                    why_not.unwrap_or_default()
                ),
            )),
        }
    }
    (problems, found)
}

/// What a settled domain status tells the machine: running, stopped, or ended on its own /
/// failed to start (with its generation, so the machine matches it to the start it made).
fn domain_input(status: &DomainStatus) -> Option<Input> {
    match status.state {
        DomainState::Running if status.activated => Some(Input::Domain { active: true }),
        DomainState::Halted if !status.activated => Some(Input::Domain { active: false }),
        DomainState::Broken => Some(Input::DomainBroken {
            version: status.uuid_and_version.version.clone(),
            restart_counter: status.restart_counter,
            reason: if status.error.error.is_empty() {
                format!("domain broken ({})", status.exit_status)
            } else {
                status.error.error.clone()
            },
            clean_exit: status.exit_status == "exit status 0",
        }),
        _ => None,
    }
}

//! The agent (EVE's baseosmgr + zboot's commit): reports both root slots on the bus
//! (`BaseOsStatus`), and after a trial boot commits the running slot once the other agents are
//! up with their topics synchronized and the config source was reached during this boot, all
//! within a deadline; otherwise it marks the trial failed, keeps the reason on `/persist` and
//! reboots into the committed slot. Booted in the old slot again, it reports the failed update
//! with that reason (or, when the new slot never got as far as this agent, the try counter's).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_pubsub::{Bus, PublishOptions};
use cairn_readout::readout::{Roots, device_view};
use cairn_types::{
    BaseOsConfig, BaseOsSlot, BaseOsStatus, BaseOsUpdateStatus, ConfigSource, ContentTreeStatus,
    DeviceStatus, ErrorDescription, ErrorEntityType, ErrorSeverity, UpdateOutcome,
};
use chrono::{DateTime, Utc};

use crate::bootstate::{BootState, Slot};
use crate::bundle::{self, PublicKey, Reading};
use crate::disk::BootDisk;
use crate::install;
use crate::update::{self, Action, BootView, Phase, UpdateRecord};

pub const AGENT: &str = "baseos-manager";

/// How the initramfs booted this device (its CAIRN_BOOT_* variables).
#[derive(Debug, Clone)]
pub struct Boot {
    pub disk: PathBuf,
    pub slot: Slot,
    /// `committed`, `trial` or `fallback`.
    pub mode: String,
}

/// How the agent asks for a reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reboot {
    /// Not on an A/B boot disk: never.
    Nothing,
    /// SIGTERM to PID 1: the image's init reboots on it.
    Init,
    /// A shell command (`sh -c`), e.g. for tests that observe the reboot.
    Command(String),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub persist: PathBuf,
    pub run: PathBuf,
    /// None outside an A/B boot disk (a bare root image, or agents on a development machine).
    pub boot: Option<Boot>,
    /// A trial boot that is not healthy by then is rolled back.
    pub trial_deadline: Duration,
    /// How to reboot: after a failed trial (into the committed slot) and after an install
    /// with `activate` (into the slot on trial).
    pub reboot: Reboot,
    /// The public key bundles must be signed with.
    pub update_key: PathBuf,
    /// The image's release file (`/etc/cairn/release`).
    pub release: PathBuf,
    /// The agents whose health a trial boot waits for.
    pub agents: Vec<String>,
    pub technicians_gid: Option<u32>,
}

/// `<persist>/baseos/last-update.json`
pub fn outcome_path(persist: &Path) -> PathBuf {
    persist.join("baseos").join("last-update.json")
}

/// Written by the image's init when its trial timer ran out before a commit.
pub fn trial_timeout_path(persist: &Path) -> PathBuf {
    persist.join("baseos").join("trial-timeout")
}

pub async fn run(
    bus: &Bus,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let access = settings
        .technicians_gid
        .map(cairn_pubsub::Access::with_group_readers)
        .unwrap_or_default();
    let statuses = bus
        .publish::<BaseOsStatus>(PublishOptions {
            access,
            ..Default::default()
        })
        .await?;
    let s = settings.clone();
    let status = tokio::task::spawn_blocking(move || start_status(&s)).await??;
    tracing::info!(mode = %status.boot_mode, slots = ?status.slots.iter().map(|s| (&s.partition_label, &s.partition_state)).collect::<Vec<_>>(), "base OS");
    statuses.publish(status.clone()).await?;
    statuses.signal_restarted().await?;
    let mut updater = Updater::start(&settings, status).await?;

    tokio::pin!(shutdown);
    let mut configs = bus.subscribe::<BaseOsConfig>("config-agent");
    let mut trees = bus.subscribe::<ContentTreeStatus>("downloader");
    let trial_boot = settings.boot.clone().filter(|b| b.mode == "trial");
    let mut trial: Option<std::pin::Pin<Box<dyn std::future::Future<Output = _>>>> = None;
    let mut retry: Option<tokio::time::Instant> = None;
    if let Some(boot) = trial_boot.clone() {
        // Restarted after the verdict (a kill between it and the reboot): keep it.
        let disk = BootDisk::partitions_of(&boot.disk);
        let state = tokio::task::spawn_blocking(move || BootState::read(&disk.state)).await??;
        let judged = if state.committed == boot.slot {
            Some(Ok(Duration::ZERO))
        } else if state.failed == Some(boot.slot) {
            Some(Err(updater
                .status
                .last_update
                .clone()
                .map(|o| o.reason)
                .unwrap_or_else(|| {
                    "the trial failed earlier in this boot".into()
                })))
        } else {
            None
        };
        let s = settings.clone();
        trial = Some(match judged {
            Some(verdict) => Box::pin(std::future::ready(verdict)),
            None => Box::pin(async move { judge_trial(&s).await }),
        });
    }
    loop {
        tokio::select! {
            verdict = async { trial.as_mut().expect("guarded").await }, if trial.is_some() => {
                trial = None;
                let boot = trial_boot.clone().expect("a trial boot");
                let (s, b, v) = (settings.clone(), boot.clone(), verdict.clone());
                let recorded = match v {
                    Ok(waited) => tokio::task::spawn_blocking(move || commit(&s, &b, waited)).await?,
                    Err(reason) => tokio::task::spawn_blocking(move || roll_back(&s, &b, &reason)).await?,
                };
                let status = match recorded {
                    Ok(status) => status,
                    Err(e) => {
                        // The verdict stands; recording it (the boot state, the outcome) is
                        // done again from what is on disk, as after a kill.
                        let what = if verdict.is_ok() { "committed" } else { "rolled back" };
                        let text = format!(
                            "the trial boot of slot {} cannot be {what}: {e:#}; tried again every {} s",
                            boot.slot.label(),
                            STEP_RETRY.as_secs()
                        );
                        tracing::error!(error = %text, "the trial's verdict cannot be recorded");
                        if let Some(slot) = updater
                            .status
                            .slots
                            .iter_mut()
                            .find(|s| s.partition_label == boot.slot.label())
                        {
                            slot.error = text;
                        }
                        statuses.publish(updater.status.clone()).await?;
                        trial = Some(Box::pin(async move {
                            tokio::time::sleep(STEP_RETRY).await;
                            verdict
                        }));
                        continue;
                    }
                };
                updater.status = BaseOsStatus { update: updater.status.update.clone(), ..status };
                statuses.publish(updater.status.clone()).await?;
                if verdict.is_err() {
                    tracing::warn!("rebooting into the committed slot");
                    reboot(&settings.reboot).await;
                    continue;
                }
            }
            _ = configs.recv() => {}
            _ = trees.recv() => {}
            () = async { tokio::time::sleep_until(retry.expect("guarded")).await }, if retry.is_some() => {
                retry = None;
            }
            () = &mut shutdown => return Ok(()),
        }
        let config = configs.values().next().cloned();
        let tree = config
            .as_ref()
            .and_then(|c| trees.get(&c.content_tree_uuid.to_string()).cloned());
        // A record or the boot state that cannot be read or written (a disk error, a full
        // /persist) is reported and the step taken again later: the decision is made afresh
        // from what is on disk, as after a kill at the same instruction.
        match updater
            .step(config.as_ref(), tree.as_ref(), &statuses)
            .await
        {
            Ok(()) => updater.fault_cleared(&statuses).await?,
            Err(e) => {
                updater.fault(config.as_ref(), &e, &statuses).await?;
                retry = Some(tokio::time::Instant::now() + STEP_RETRY);
            }
        }
    }
}

/// How long after a failed step (a record or the boot state unreadable or unwritable) the
/// update is looked at again.
const STEP_RETRY: Duration = Duration::from_secs(5);

/// Asks for a reboot: the configured command (tests observe it), else SIGTERM to PID 1 (the
/// image's init reboots on it).
async fn reboot(how: &Reboot) {
    match how {
        Reboot::Nothing => tracing::warn!("no reboot: not on an A/B boot disk"),
        Reboot::Init => {
            if let Err(e) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(1),
                nix::sys::signal::Signal::SIGTERM,
            ) {
                tracing::error!(error = %e, "cannot ask init for a reboot");
            }
        }
        Reboot::Command(command) => {
            let run = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(Duration::from_secs(60), run).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => tracing::error!(%command, %status, "the reboot command failed"),
                Ok(Err(e)) => {
                    tracing::error!(%command, error = %e, "cannot run the reboot command")
                }
                Err(_) => tracing::error!(%command, "the reboot command did not end within 60 s"),
            }
        }
    }
}

/// The configured update: its record, the status it is published in, and what was done for
/// it during this run (a verified bundle, a reboot asked).
struct Updater {
    settings: Settings,
    status: BaseOsStatus,
    /// Why the last step failed, shown until a step succeeds.
    fault: Option<ErrorDescription>,
    record: Option<UpdateRecord>,
    verified: Option<(uuid::Uuid, String)>,
    rebooted_for: Option<String>,
}

impl Updater {
    async fn start(settings: &Settings, status: BaseOsStatus) -> anyhow::Result<Self> {
        let persist = settings.persist.clone();
        let record = tokio::task::spawn_blocking(move || load_record(&persist)).await?;
        Ok(Self {
            settings: settings.clone(),
            status,
            fault: None,
            record,
            verified: None,
            rebooted_for: None,
        })
    }

    /// Decides and acts until nothing is left to do for now; publishes the status on each change.
    async fn step(
        &mut self,
        config: Option<&BaseOsConfig>,
        tree: Option<&ContentTreeStatus>,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        loop {
            let Some(config) = config else {
                if self.status.update.take().is_some() {
                    statuses.publish(self.status.clone()).await?;
                }
                return Ok(());
            };
            let view = self.boot_view().await?;
            let running_version = release_version(&self.settings.release);
            let trial_failure = self
                .status
                .last_update
                .as_ref()
                .filter(|o| o.result == "failed")
                .map(|o| (o.partition_label.as_str(), o.reason.as_str()));
            let (update, action) = update::decide(&update::Inputs {
                config,
                tree,
                record: self.record.as_ref(),
                boot: view.as_ref(),
                running_version: &running_version,
                trial_failure,
                verified: self.verified.as_ref().is_some_and(|(id, sha)| {
                    *id == config.content_tree_uuid
                        && tree.is_some_and(|t| &t.content_sha256 == sha)
                }),
            });
            self.show(update, statuses).await?;
            match action {
                Action::Nothing => return Ok(()),
                Action::Reboot { target } => {
                    let key = format!("{}/{}", config.content_tree_uuid, target.label());
                    if self.rebooted_for.as_deref() != Some(key.as_str()) {
                        tracing::warn!(slot = target.label(), version = %config.base_os_version, "rebooting into the updated slot for its trial boot");
                        reboot(&self.settings.reboot).await;
                        self.rebooted_for = Some(key);
                    }
                    return Ok(());
                }
                Action::Verify { bundle } => {
                    let tree = tree.expect("a bundle comes from a tree");
                    self.verify(config, tree, bundle, statuses).await?;
                }
                Action::Install { bundle, target } => {
                    let tree = tree.expect("a bundle comes from a tree");
                    let view = view.expect("an install needs the boot disk");
                    self.install(config, tree, bundle, target, &view, statuses)
                        .await?;
                }
                Action::FinishInstall { target } => {
                    tracing::info!(
                        slot = target.label(),
                        "the interrupted install had finished: recording it, writing nothing"
                    );
                    let mut record = self.record.clone().unwrap_or_default();
                    record.phase = Phase::Installed;
                    self.installed(record, target).await?;
                }
                Action::Retrial { target } => {
                    let view = view.expect("a retrial needs the boot disk");
                    self.retrial(config, target, &view).await?;
                }
            }
        }
    }

    /// A step failed: said in the update's status (the request's object and the fault) and
    /// in the log, once per new fault.
    async fn fault(
        &mut self,
        config: Option<&BaseOsConfig>,
        error: &anyhow::Error,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        let Some(config) = config else {
            tracing::error!(error = %format!("{error:#}"), "the base OS status cannot be read");
            return Ok(());
        };
        let message = format!(
            "base OS {} from content tree {}: {error:#}; tried again every {} s",
            config.base_os_version,
            config.content_tree_uuid,
            STEP_RETRY.as_secs()
        );
        if self.fault.as_ref().is_some_and(|f| f.error == message) {
            return Ok(());
        }
        tracing::error!(version = %config.base_os_version, error = %message, "the base OS update cannot go on now");
        let fault = ErrorDescription::new(message, ErrorSeverity::Error, Utc::now())
            .about(ErrorEntityType::BaseOs, config.content_tree_uuid);
        let update = self
            .status
            .update
            .get_or_insert_with(|| BaseOsUpdateStatus {
                content_tree_uuid: config.content_tree_uuid,
                base_os_version: config.base_os_version.clone(),
                activate: config.activate,
                ..Default::default()
            });
        update.error = fault.clone();
        self.fault = Some(fault);
        statuses.publish(self.status.clone()).await?;
        Ok(())
    }

    /// A step succeeded: a fault shown is taken back.
    async fn fault_cleared(
        &mut self,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        let Some(fault) = self.fault.take() else {
            return Ok(());
        };
        tracing::info!("the base OS update goes on");
        if let Some(update) = self.status.update.as_mut()
            && update.error.error == fault.error
        {
            update.error = ErrorDescription::default();
            statuses.publish(self.status.clone()).await?;
        }
        Ok(())
    }

    async fn show(
        &mut self,
        mut update: BaseOsUpdateStatus,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        // A fault being retried stays shown until a step gets past it.
        if !update.error.is_error()
            && let Some(fault) = &self.fault
        {
            update.error = fault.clone();
        }
        // The same error keeps the time it was first seen (no new report for nothing new).
        if let Some(old) = self.status.update.as_ref()
            && old.error.error == update.error.error
        {
            update.error.error_time = old.error.error_time;
        }
        let s = self.settings.clone();
        let fresh = tokio::task::spawn_blocking(move || current_status(&s)).await??;
        let status = BaseOsStatus {
            update: Some(update),
            ..fresh
        };
        if status != self.status {
            if let Some(u) = &status.update {
                tracing::info!(version = %u.base_os_version, state = ?u.state, slot = %u.partition_label, step = %u.step, error = %u.error.error, "base OS update");
            }
            self.status = status;
            statuses.publish(self.status.clone()).await?;
        }
        Ok(())
    }

    async fn boot_view(&self) -> anyhow::Result<Option<BootView>> {
        let Some(boot) = self.settings.boot.clone() else {
            return Ok(None);
        };
        let disk = BootDisk::partitions_of(&boot.disk);
        let state = tokio::task::spawn_blocking(move || BootState::read(&disk.state)).await??;
        Ok(Some(BootView {
            running: boot.slot,
            mode: boot.mode,
            state,
        }))
    }

    async fn store(&mut self, record: UpdateRecord) -> anyhow::Result<()> {
        let persist = self.settings.persist.clone();
        let r = record.clone();
        tokio::task::spawn_blocking(move || store_record(&persist, &r)).await??;
        self.record = Some(record);
        Ok(())
    }

    fn new_record(
        config: &BaseOsConfig,
        tree: &ContentTreeStatus,
        phase: Phase,
        target: Option<Slot>,
    ) -> UpdateRecord {
        UpdateRecord {
            content_tree_uuid: config.content_tree_uuid,
            content_sha256: tree.content_sha256.clone(),
            version: config.base_os_version.clone(),
            phase,
            partition_label: target.map(|t| t.label().to_string()).unwrap_or_default(),
            retry_update_counter: config.retry_update_counter,
            time: Some(Utc::now()),
            ..Default::default()
        }
    }

    async fn failed(
        &mut self,
        config: &BaseOsConfig,
        tree: &ContentTreeStatus,
        error: String,
    ) -> anyhow::Result<()> {
        let error = format!(
            "base OS {} from content tree {}: {error}",
            config.base_os_version, config.content_tree_uuid
        );
        tracing::error!(version = %config.base_os_version, %error, "the base OS update failed");
        let record = UpdateRecord {
            error: error.clone(),
            ..Self::new_record(config, tree, Phase::Failed, None)
        };
        self.store(record)
            .await
            .with_context(|| format!("{error}; recording that failed"))
    }

    async fn key(&self) -> Result<PublicKey, String> {
        let path = self.settings.update_key.clone();
        tokio::task::spawn_blocking(move || PublicKey::load(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e}: the device cannot check update bundles"))
    }

    async fn verify(
        &mut self,
        config: &BaseOsConfig,
        tree: &ContentTreeStatus,
        bundle: PathBuf,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        if let Some(update) = self.status.update.as_mut() {
            update.step = "verifying the bundle's signature and hashes".into();
            statuses.publish(self.status.clone()).await?;
        }
        let key = match self.key().await {
            Ok(key) => key,
            Err(e) => return self.failed(config, tree, e).await,
        };
        let version = config.base_os_version.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let verified =
                bundle::verify(&bundle, &key, Reading::File).map_err(|e| e.to_string())?;
            if verified.header.version != version {
                return Err(format!(
                    "bundle {} holds version {}, the update asks for {version}",
                    bundle.display(),
                    verified.header.version
                ));
            }
            Ok(())
        })
        .await?;
        match checked {
            Ok(()) => {
                tracing::info!(version = %config.base_os_version, "bundle verified; not installed (activate is false)");
                self.verified = Some((config.content_tree_uuid, tree.content_sha256.clone()));
                Ok(())
            }
            Err(e) => self.failed(config, tree, e).await,
        }
    }

    async fn install(
        &mut self,
        config: &BaseOsConfig,
        tree: &ContentTreeStatus,
        bundle: PathBuf,
        target: Slot,
        view: &BootView,
        statuses: &cairn_pubsub::Publication<BaseOsStatus>,
    ) -> anyhow::Result<()> {
        let key = match self.key().await {
            Ok(key) => key,
            Err(e) => return self.failed(config, tree, e).await,
        };
        let boot = self
            .settings
            .boot
            .clone()
            .expect("an install needs the boot disk");
        // The intent first: a kill from here on is found at the next start.
        let intent = UpdateRecord {
            boot_seq: view.state.seq,
            ..Self::new_record(config, tree, Phase::Installing, Some(target))
        };
        self.store(intent.clone()).await?;
        tracing::info!(slot = target.label(), version = %config.base_os_version, bundle = %bundle.display(), "installing the base OS update");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
        let version = config.base_os_version.clone();
        let running = view.running;
        let work = tokio::task::spawn_blocking(move || {
            install::install(
                &bundle,
                Reading::File,
                &key,
                &BootDisk::partitions_of(&boot.disk),
                running,
                Some(&version),
                &mut |step| {
                    let _ = tx.blocking_send(step.to_string());
                },
            )
        });
        tokio::pin!(work);
        let done = loop {
            tokio::select! {
                done = &mut work => break done?,
                Some(step) = rx.recv() => {
                    tracing::info!(%step, "install");
                    if let Some(update) = self.status.update.as_mut() {
                        update.step = step;
                        update.partition_label = target.label().into();
                        statuses.publish(self.status.clone()).await?;
                    }
                }
            }
        };
        match done {
            Ok(installed) => {
                tracing::info!(
                    slot = target.label(),
                    verify_ms = installed.verify_time.as_millis() as u64,
                    write_ms = installed.write_time.as_millis() as u64,
                    "written and marked for one trial boot"
                );
                cairn_persist::crash_point("baseos-manager:after-trial-mark");
                let record = UpdateRecord {
                    phase: Phase::Installed,
                    ..intent
                };
                self.installed(record, target).await
            }
            Err(e) => self.failed(config, tree, e.to_string()).await,
        }
    }

    /// Records a finished install (and the outcome the trial boot reports against).
    async fn installed(&mut self, record: UpdateRecord, target: Slot) -> anyhow::Result<()> {
        let outcome = UpdateOutcome {
            version: record.version.clone(),
            partition_label: target.label().into(),
            result: "installed".into(),
            reason: "marked for one trial boot".into(),
            time: Some(Utc::now()),
        };
        self.store(record).await?;
        let persist = self.settings.persist.clone();
        tokio::task::spawn_blocking(move || store_outcome(&persist, &outcome)).await??;
        Ok(())
    }

    /// `retry_update`: the slot still holds the verified image that failed its trial; mark it
    /// for one more trial boot (EVE sets the other partition `updating` again).
    async fn retrial(
        &mut self,
        config: &BaseOsConfig,
        target: Slot,
        view: &BootView,
    ) -> anyhow::Result<()> {
        let mut record = self.record.clone().unwrap_or_default();
        record.retry_update_counter = config.retry_update_counter;
        record.boot_seq = view.state.seq;
        record.time = Some(Utc::now());
        // The counter first: a kill after the mark must not mark it again for the same counter.
        self.store(record.clone()).await?;
        let boot = self
            .settings
            .boot
            .clone()
            .expect("a retrial needs the boot disk");
        let state = view.state.clone();
        tokio::task::spawn_blocking(move || {
            let disk = BootDisk::partitions_of(&boot.disk);
            state
                .mark_trial(target, 1)
                .write_next(&disk.state, state.seq)
        })
        .await??;
        tracing::warn!(
            slot = target.label(),
            counter = config.retry_update_counter,
            "retry_update: the slot is marked for one more trial boot"
        );
        self.rebooted_for = None;
        self.installed(record, target).await
    }
}

#[allow(clippy::disallowed_methods)] // blocking: runs on the blocking pool
fn store_record(persist: &Path, record: &UpdateRecord) -> anyhow::Result<()> {
    let path = update::record_path(persist);
    let context = || format!("cannot write the update record {}", path.display());
    cairn_persist::create_dir_durable(&persist.join("baseos")).with_context(context)?;
    cairn_persist::store(&path, record).with_context(context)?;
    Ok(())
}

#[allow(clippy::disallowed_methods)] // blocking: runs on the blocking pool
fn load_record(persist: &Path) -> Option<UpdateRecord> {
    match cairn_persist::load::<UpdateRecord>(&update::record_path(persist)) {
        Ok(loaded) => Some(loaded.record),
        Err(e) => {
            if !matches!(e.kind, cairn_persist::ErrorKind::NotFound) {
                tracing::warn!(error = %e, "the update record is unusable; starting the update afresh");
            }
            None
        }
    }
}

/// The slots as the boot state says now (no side effects, unlike `start_status`).
fn current_status(settings: &Settings) -> anyhow::Result<BaseOsStatus> {
    let version = release_version(&settings.release);
    let outcome = load_outcome(&settings.persist);
    let Some(boot) = &settings.boot else {
        return Ok(BaseOsStatus {
            boot_mode: String::new(),
            slots: vec![BaseOsSlot {
                partition_label: "IMGA".into(),
                partition_state: "active".into(),
                activated: true,
                version,
                ..Default::default()
            }],
            last_update: outcome,
            update: None,
        });
    };
    let disk = BootDisk::partitions_of(&boot.disk);
    let state = BootState::read(&disk.state)?;
    Ok(status_of(boot, &disk, &state, &version, outcome))
}

/// Polls the device's health until it is good (Ok: how long it took) or the deadline passed
/// (Err: what was still wrong, for the controller).
async fn judge_trial(settings: &Settings) -> Result<Duration, String> {
    let started = Instant::now();
    let boot_time = boot_time();
    let roots = Roots {
        run: settings.run.clone(),
        persist: settings.persist.clone(),
    };
    loop {
        let problem = match health(&roots, &settings.agents, boot_time).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(problem) => problem,
        };
        if started.elapsed() >= settings.trial_deadline {
            return Err(format!(
                "the trial boot was not healthy within {} s: {problem}",
                settings.trial_deadline.as_secs()
            ));
        }
        tracing::info!(%problem, "trial boot: not healthy yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// All `agents` answer with synchronized topics, and the config-agent reached its config
/// source during this boot (the controller answered, or the local file was applied).
async fn health(
    roots: &Roots,
    agents: &[String],
    boot_time: Option<DateTime<Utc>>,
) -> Result<(), String> {
    let view = device_view(roots, Duration::from_secs(2)).await;
    let down: Vec<String> = view
        .agents
        .iter()
        .filter(|a| agents.contains(&a.agent) && a.state != "up")
        .map(|a| format!("{} {}", a.agent, a.state))
        .collect();
    if !down.is_empty() {
        return Err(format!("agents not up: {}", down.join(", ")));
    }
    let Some(device) = view.device else {
        return Err("the config-agent publishes no device status".into());
    };
    config_reached(&device, boot_time)
}

fn config_reached(device: &DeviceStatus, boot_time: Option<DateTime<Utc>>) -> Result<(), String> {
    let this_boot = |t: Option<DateTime<Utc>>| match (t, boot_time) {
        (Some(t), Some(boot)) => t >= boot,
        (Some(_), None) => true,
        (None, _) => false,
    };
    match &device.config_source {
        ConfigSource::Controller { url } if !this_boot(device.last_contact) => Err(format!(
            "the controller {url} was not reached since the boot{}",
            error_note(device)
        )),
        ConfigSource::Controller { .. } => Ok(()),
        ConfigSource::LocalFile { path } if !this_boot(device.last_config_time) => Err(format!(
            "the local config {path} was not applied since the boot{}",
            error_note(device)
        )),
        ConfigSource::LocalFile { .. } => Ok(()),
        _ => Err("the config-agent has no config source yet".into()),
    }
}

fn error_note(device: &DeviceStatus) -> String {
    let error = &device.last_error.error;
    if error.is_empty() {
        String::new()
    } else {
        format!(" ({error})")
    }
}

/// The kernel's boot time (`btime` in /proc/stat).
fn boot_time() -> Option<DateTime<Utc>> {
    #[allow(clippy::disallowed_methods)] // a few bytes of procfs, once
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    DateTime::from_timestamp(secs, 0)
}

#[allow(clippy::disallowed_methods)] // blocking: runs on the blocking pool
fn load_outcome(persist: &Path) -> Option<UpdateOutcome> {
    match cairn_persist::load::<UpdateOutcome>(&outcome_path(persist)) {
        Ok(loaded) => Some(loaded.record),
        Err(e) => {
            if !matches!(e.kind, cairn_persist::ErrorKind::NotFound) {
                tracing::warn!(error = %e, "the last update's outcome is unreadable");
            }
            None
        }
    }
}

#[allow(clippy::disallowed_methods)] // blocking: runs on the blocking pool
fn store_outcome(persist: &Path, outcome: &UpdateOutcome) -> anyhow::Result<()> {
    let path = outcome_path(persist);
    let context = || format!("cannot write the update outcome {}", path.display());
    cairn_persist::create_dir_durable(&persist.join("baseos")).with_context(context)?;
    cairn_persist::store(&path, outcome).with_context(context)?;
    Ok(())
}

fn release_version(release: &Path) -> String {
    #[allow(clippy::disallowed_methods)] // a few bytes, once, on the blocking pool
    let text = std::fs::read_to_string(release).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// The status at start; a failed trial found on the way (the device came back to its committed
/// slot) is recorded with its reason first.
fn start_status(settings: &Settings) -> anyhow::Result<BaseOsStatus> {
    let version = release_version(&settings.release);
    let Some(boot) = &settings.boot else {
        // A bare root image: one "partition", as EVE reports a device without a second one.
        return Ok(BaseOsStatus {
            boot_mode: String::new(),
            slots: vec![BaseOsSlot {
                partition_label: "IMGA".into(),
                partition_state: "active".into(),
                activated: true,
                version,
                ..Default::default()
            }],
            last_update: load_outcome(&settings.persist),
            update: None,
        });
    };
    let disk = BootDisk::partitions_of(&boot.disk);
    let state = BootState::read(&disk.state)?;
    let mut outcome = load_outcome(&settings.persist);
    let other = boot.slot.other();
    let failed_here = state.committed == boot.slot && state.failed == Some(other);
    let already_told = outcome
        .as_ref()
        .is_some_and(|o| o.partition_label == other.label() && o.result == "failed");
    let timeout = trial_timeout_path(&settings.persist);
    #[allow(clippy::disallowed_methods)] // on the blocking pool
    let timed_out = std::fs::read_to_string(&timeout).ok();
    if failed_here && !already_told {
        let reason = timed_out
            .as_deref()
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|| {
                format!(
                    "the trial boot of slot {} did not commit before its tries ran out \
                     (no verdict was recorded: a power cut, a hang or a crash came first)",
                    other.label()
                )
            });
        let failed = UpdateOutcome {
            version: outcome
                .as_ref()
                .filter(|o| o.partition_label == other.label())
                .map(|o| o.version.clone())
                .unwrap_or_default(),
            partition_label: other.label().into(),
            result: "failed".into(),
            reason,
            time: Some(Utc::now()),
        };
        tracing::warn!(slot = other.label(), reason = %failed.reason, "the update failed; running the committed slot");
        store_outcome(&settings.persist, &failed)?;
        outcome = Some(failed);
    }
    // Used or not (the baseos-manager's own verdict came first), it belongs to the trial that
    // ended: a later failure must not inherit it.
    if timed_out.is_some() && boot.mode != "trial" {
        #[allow(clippy::disallowed_methods)] // on the blocking pool
        let _ = std::fs::remove_file(&timeout);
    }
    Ok(status_of(boot, &disk, &state, &version, outcome))
}

fn status_of(
    boot: &Boot,
    disk: &BootDisk,
    state: &BootState,
    version: &str,
    outcome: Option<UpdateOutcome>,
) -> BaseOsStatus {
    let slot = |slot: Slot| {
        let running = slot == boot.slot;
        let partition_state = if running && state.committed == slot {
            "active"
        } else if running {
            "inprogress"
        } else if state.trial == Some(slot) {
            "updating"
        } else {
            "unused"
        };
        let from_outcome = outcome
            .as_ref()
            .filter(|o| o.partition_label == slot.label());
        BaseOsSlot {
            partition_label: slot.label().into(),
            partition_device: disk.slot(slot).display().to_string(),
            partition_state: partition_state.into(),
            activated: running,
            version: if running {
                version.to_string()
            } else {
                from_outcome.map(|o| o.version.clone()).unwrap_or_default()
            },
            error: from_outcome
                .filter(|o| o.result == "failed")
                .map(|o| o.reason.clone())
                .unwrap_or_default(),
        }
    };
    BaseOsStatus {
        boot_mode: boot.mode.clone(),
        slots: vec![slot(Slot::A), slot(Slot::B)],
        last_update: outcome,
        update: None,
    }
}

fn commit(settings: &Settings, boot: &Boot, waited: Duration) -> anyhow::Result<BaseOsStatus> {
    let disk = BootDisk::partitions_of(&boot.disk);
    let state = BootState::read(&disk.state)?;
    let state = state.commit(boot.slot).write_next(&disk.state, state.seq)?;
    let version = release_version(&settings.release);
    let outcome = UpdateOutcome {
        version: version.clone(),
        partition_label: boot.slot.label().into(),
        result: "committed".into(),
        reason: format!("healthy {} ms after the agent started", waited.as_millis()),
        time: Some(Utc::now()),
    };
    store_outcome(&settings.persist, &outcome)?;
    tracing::info!(slot = boot.slot.label(), %version, waited_ms = waited.as_millis() as u64, "trial boot healthy: slot committed");
    println!(
        "CAIRN-COMMIT slot={} version={version} healthy-after-ms={}",
        boot.slot.letter(),
        waited.as_millis()
    );
    Ok(status_of(boot, &disk, &state, &version, Some(outcome)))
}

fn roll_back(settings: &Settings, boot: &Boot, reason: &str) -> anyhow::Result<BaseOsStatus> {
    let disk = BootDisk::partitions_of(&boot.disk);
    let state = BootState::read(&disk.state)?;
    let version = release_version(&settings.release);
    // The reason first: the reboot may come before anything else is written.
    let outcome = UpdateOutcome {
        version: version.clone(),
        partition_label: boot.slot.label().into(),
        result: "failed".into(),
        reason: reason.into(),
        time: Some(Utc::now()),
    };
    store_outcome(&settings.persist, &outcome)?;
    let state = state
        .fail_trial(boot.slot)
        .write_next(&disk.state, state.seq)?;
    tracing::error!(slot = boot.slot.label(), %reason, "trial boot failed: back to the committed slot");
    Ok(status_of(boot, &disk, &state, &version, Some(outcome)))
}

//! The domain-manager's main loop: routes `DomainConfig` and `DomainLiveOpConfig` to one task
//! per app, keeps the volume table, and passes the restart barrier once it has re-adopted.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_pubsub::{Bus, BusError, Event, Publication, PublishOptions, Subscription};
use cairn_types::domain::{DomainLiveOpConfig, DomainLiveOpState, DomainLiveOpStatus};
use cairn_types::{
    DomainConfig, DomainMetric, DomainStatus, ErrorDescription, ErrorSeverity, VolumeStatus,
};
use chrono::Utc;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::domain::{Command, Domain, Shared, Timeouts};
use crate::launch::{apps_dir, detect_accel};

/// The agent name on the bus.
pub const AGENT: &str = "domain-manager";
/// Who publishes our configs and the volumes.
pub const APP_MANAGER: &str = "app-manager";
pub const VOLUME_MANAGER: &str = "volume-manager";

#[derive(Debug, Clone)]
pub struct Settings {
    pub qemu: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    pub timeouts: Timeouts,
    /// A group whose members may read `DomainStatus` (technicians).
    pub technicians_gid: Option<u32>,
    /// How often each app's `DomainMetric` is gathered from `/proc`.
    pub metric_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("accelerator {0:?} is not one of auto, kvm, tcg")]
    BadAccel(String),
}

pub struct Supervisor {
    shared: Arc<Shared>,
    domains: HashMap<Uuid, mpsc::Sender<Command>>,
    configs: Subscription<DomainConfig>,
    live_op_requests: Subscription<DomainLiveOpConfig>,
    volumes: Subscription<VolumeStatus>,
    restarted_signalled: bool,
    metrics: Publication<DomainMetric>,
    metric_interval: Duration,
}

impl Supervisor {
    /// Opens the publications, detects the accelerator and re-adopts every domain a previous
    /// instance left (from its reloaded `DomainStatus` table, the app directories and the
    /// processes carrying its marker).
    pub async fn open(bus: &Bus, settings: Settings) -> Result<Self, SupervisorError> {
        let statuses = bus
            .publish::<DomainStatus>(PublishOptions {
                access: settings
                    .technicians_gid
                    .map(cairn_pubsub::Access::with_group_readers)
                    .unwrap_or_default(),
                ..PublishOptions::default()
            })
            .await?;
        // Persistent: "InProgress" is on disk before the operation starts, so a request is never
        // run twice, even across a crash in the middle of it.
        let live_ops = bus
            .publish::<DomainLiveOpStatus>(PublishOptions {
                persistent: true,
                ..PublishOptions::default()
            })
            .await?;
        let metrics = bus
            .publish::<DomainMetric>(PublishOptions::default())
            .await?;
        let accel = match settings.accel.as_str() {
            "auto" => auto_accel(bus, &settings).await,
            "kvm" | "tcg" => settings.accel.clone(),
            other => return Err(SupervisorError::BadAccel(other.to_string())),
        };
        tracing::info!(%accel, qemu = %settings.qemu.display(), "accelerator");
        let previous: HashMap<Uuid, DomainStatus> = statuses
            .values()
            .into_iter()
            .map(|s| (s.uuid_and_version.uuid, s))
            .collect();
        let shared = Arc::new(Shared {
            run_dir: bus.run_dir().to_path_buf(),
            qemu: settings.qemu,
            accel,
            timeouts: settings.timeouts,
            statuses,
            live_ops,
            volumes: Mutex::new(HashMap::new()),
            census: crate::procfs::Census::new(bus.run_dir()),
        });
        let mut apps: HashSet<Uuid> = previous.keys().copied().collect();
        if let Ok(mut entries) = tokio::fs::read_dir(apps_dir(bus.run_dir())).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                if let Some(app) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| Uuid::parse_str(n).ok())
                {
                    apps.insert(app);
                }
            }
        }
        // A process is marked from its first instruction, before any record of it: the apps
        // of marked processes are found even when nothing else was written.
        let run_dir = bus.run_dir().to_path_buf();
        let marked = tokio::task::spawn_blocking(move || crate::procfs::scan(&run_dir))
            .await
            .unwrap_or_default();
        apps.extend(
            marked
                .iter()
                .filter_map(|(app, _)| Uuid::parse_str(app).ok()),
        );
        let mut domains = HashMap::new();
        for app in apps {
            let tx = Domain::start(app, shared.clone(), previous.get(&app).cloned()).await;
            domains.insert(app, tx);
        }
        // A request that was in progress when the previous instance died has an unknown effect.
        for mut op in shared.live_ops.values() {
            if op.state == DomainLiveOpState::InProgress {
                op.state = DomainLiveOpState::Failed;
                op.error = ErrorDescription::new(
                    format!(
                        "{:?} {} interrupted by a domain-manager restart: its effect is unknown",
                        op.op, op.tag
                    ),
                    ErrorSeverity::Error,
                    Utc::now(),
                );
                shared.live_ops.publish(op).await?;
            }
        }
        Ok(Self {
            shared,
            domains,
            configs: bus.subscribe(APP_MANAGER),
            live_op_requests: bus.subscribe(APP_MANAGER),
            volumes: bus.subscribe(VOLUME_MANAGER),
            restarted_signalled: false,
            metrics,
            metric_interval: settings.metric_interval,
        })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> &str {
        &self.shared.accel
    }

    /// Runs until `shutdown` resolves. Domains keep running after it: stopping the agent does
    /// not stop the apps, and the next instance re-adopts them.
    /// With `stop_domains`, a shutdown is the device's: every domain is stopped (and its status
    /// unpublished) before returning.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        stop_domains: bool,
    ) -> Result<(), SupervisorError> {
        tokio::pin!(shutdown);
        let mut metrics_due = tokio::time::interval(self.metric_interval);
        metrics_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    if stop_domains {
                        self.stop_all().await;
                    }
                    return Ok(());
                }
                event = self.configs.recv() => self.on_config(event).await?,
                event = self.live_op_requests.recv() => self.on_live_op(event).await?,
                event = self.volumes.recv() => self.on_volume(event),
                _ = metrics_due.tick() => self.publish_metrics().await?,
            }
        }
    }

    /// One `DomainMetric` per app with a config or a marked process; the others are withdrawn.
    async fn publish_metrics(&mut self) -> Result<(), SupervisorError> {
        let run_dir = self.shared.run_dir.clone();
        let Ok((usage, available)) =
            tokio::task::spawn_blocking(move || crate::metrics::gather(&run_dir)).await
        else {
            return Ok(());
        };
        let now = Utc::now();
        let mut apps: HashSet<Uuid> = self.domains.keys().copied().collect();
        apps.extend(usage.keys().filter_map(|a| Uuid::parse_str(a).ok()));
        for app in &apps {
            let key = app.to_string();
            let metric = crate::metrics::metric(
                *app,
                self.configs.get(&key),
                usage.get(&key),
                self.metrics.get(&key).as_ref(),
                available,
                now,
            );
            self.metrics.publish(metric).await?;
        }
        for key in self.metrics.keys() {
            if Uuid::parse_str(&key).map_or(true, |app| !apps.contains(&app)) {
                self.metrics.unpublish(&key).await?;
            }
        }
        Ok(())
    }

    /// Stops every domain and waits for their tasks to end.
    async fn stop_all(&mut self) {
        let domains: Vec<(Uuid, mpsc::Sender<Command>)> = self.domains.drain().collect();
        for (app, tx) in &domains {
            tracing::info!(app = %app, "stopping the domain: the device is shutting down");
            let _ = tx.send(Command::Delete).await;
        }
        let wait =
            self.shared.timeouts.stop + self.shared.timeouts.quit + self.shared.timeouts.kill;
        for (app, tx) in domains {
            if tokio::time::timeout(wait, tx.closed()).await.is_err() {
                tracing::warn!(app = %app, "domain did not stop within {wait:?}");
            }
        }
    }

    fn domain(&mut self, app: Uuid) -> Option<&mpsc::Sender<Command>> {
        self.domains.get(&app)
    }

    async fn on_config(&mut self, event: Event<DomainConfig>) -> Result<(), SupervisorError> {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                let app = value.app_uuid();
                if !self.domains.contains_key(&app) {
                    let tx = Domain::start(app, self.shared.clone(), None).await;
                    self.domains.insert(app, tx);
                }
                if let Some(tx) = self.domain(app) {
                    let _ = tx.send(Command::Config(Box::new(value))).await;
                }
            }
            Event::Delete { last, .. } => {
                if let Some(tx) = self.domains.remove(&last.app_uuid()) {
                    let _ = tx.send(Command::Delete).await;
                }
            }
            Event::Synchronized => {
                // Domains whose config disappeared while we were down.
                let gone: Vec<Uuid> = self
                    .domains
                    .keys()
                    .filter(|app| self.configs.get(&app.to_string()).is_none())
                    .copied()
                    .collect();
                for app in gone {
                    if let Some(tx) = self.domains.remove(&app) {
                        tracing::info!(%app, "no DomainConfig after restart: stopping and deleting");
                        let _ = tx.send(Command::Delete).await;
                    }
                }
                if !self.restarted_signalled {
                    self.shared.statuses.signal_restarted().await?;
                    self.restarted_signalled = true;
                }
            }
            Event::Refused { reason } => {
                tracing::error!(%reason, "app-manager refused our DomainConfig subscription");
            }
            Event::Restarted | Event::PublisherRestarted { .. } => {}
        }
        Ok(())
    }

    async fn on_live_op(
        &mut self,
        event: Event<DomainLiveOpConfig>,
    ) -> Result<(), SupervisorError> {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                let key = value.request_id.to_string();
                // At most once per request id, also across restarts.
                if self.shared.live_ops.get(&key).is_some_and(|s| {
                    s.app_uuid == value.app_uuid && s.op == value.op && s.tag == value.tag
                }) {
                    return Ok(());
                }
                match self.domain(value.app_uuid) {
                    Some(tx) => {
                        let _ = tx.send(Command::LiveOp(value)).await;
                    }
                    None => {
                        let status = DomainLiveOpStatus {
                            request_id: value.request_id,
                            app_uuid: value.app_uuid,
                            op: value.op,
                            tag: value.tag.clone(),
                            state: DomainLiveOpState::Failed,
                            error: ErrorDescription::new(
                                format!("{:?}: app {} has no domain", value.op, value.app_uuid),
                                ErrorSeverity::Error,
                                Utc::now(),
                            ),
                            ..DomainLiveOpStatus::default()
                        };
                        self.shared.live_ops.publish(status).await?;
                    }
                }
            }
            Event::Delete { key, .. } => self.shared.live_ops.unpublish(&key).await?,
            Event::Synchronized => {
                let stale: Vec<String> = self
                    .shared
                    .live_ops
                    .keys()
                    .into_iter()
                    .filter(|k| self.live_op_requests.get(k).is_none())
                    .collect();
                for key in stale {
                    self.shared.live_ops.unpublish(&key).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_volume(&mut self, event: Event<VolumeStatus>) {
        let Ok(mut volumes) = self.shared.volumes.lock() else {
            return;
        };
        match event {
            Event::Create { key, value }
            | Event::Modify {
                key, new: value, ..
            } => {
                volumes.insert(key, value);
            }
            Event::Delete { key, .. } => {
                volumes.remove(&key);
            }
            _ => {}
        }
    }
}

/// Detected once per boot: the answer is kept in `<run>/domain-manager/accel` (the run root does
/// not survive a reboot), so a restarted domain-manager does not probe again.
async fn auto_accel(bus: &Bus, settings: &Settings) -> String {
    let dir = bus.run_dir().join(AGENT);
    let file = dir.join("accel");
    if let Ok(known) = tokio::fs::read_to_string(&file).await
        && matches!(known.trim(), "kvm" | "tcg")
    {
        return known.trim().to_string();
    }
    // The probe boots a guest (up to three times, ~1.6 s where /dev/kvm opens but stalls), so
    // its answer is also kept under /persist for the next boot, valid while the kernel, the
    // qemu binary and the presence of /dev/kvm are the same.
    let remembered = bus.persist_dir().join(AGENT).join("accel");
    let host = host_key(&settings.qemu);
    if let Ok(text) = tokio::fs::read_to_string(&remembered).await
        && let Some((accel, key)) = text.trim().split_once(' ')
        && matches!(accel, "kvm" | "tcg")
        && key == host
    {
        tracing::info!(
            accel,
            "accelerator as probed on an earlier boot of this host"
        );
        let _ = tokio::fs::write(&file, accel).await;
        return accel.to_string();
    }
    let accel = detect_accel(&settings.qemu, std::time::Duration::from_secs(2), &dir).await;
    if let Err(e) = tokio::fs::write(&file, &accel).await {
        tracing::warn!(error = %e, "cannot record the accelerator in {}", file.display());
    }
    let (target, line) = (remembered.clone(), format!("{accel} {host}\n"));
    let written = tokio::task::spawn_blocking(move || remember_accel(&target, &line))
        .await
        .unwrap_or_else(|e| Err(format!("its writer ended: {e}")));
    if let Err(e) = written {
        tracing::warn!(
            "cannot remember the accelerator in {}: {e}",
            remembered.display()
        );
    }
    accel
}

/// Writes the probe's answer durably under /persist.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn remember_accel(file: &std::path::Path, line: &str) -> Result<(), String> {
    cairn_persist::write_atomic(file, line.as_bytes(), false)
        .map_err(|(step, e)| format!("{step}: {e}"))
}

/// What the probe's answer depends on: the kernel, the qemu binary, whether /dev/kvm exists.
fn host_key(qemu: &std::path::Path) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let binary = which(qemu)
        .and_then(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            let mtime = meta
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Some(format!("{}:{}:{mtime}", path.display(), meta.len()))
        })
        .unwrap_or_else(|| qemu.display().to_string());
    let kvm = std::path::Path::new("/dev/kvm").exists();
    format!("kernel={} qemu={binary} kvm={kvm}", kernel.trim())
}

/// `qemu` itself if it names a file, else the first match on PATH.
fn which(qemu: &std::path::Path) -> Option<std::path::PathBuf> {
    if qemu.components().count() > 1 {
        return Some(qemu.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(qemu))
            .find(|candidate| candidate.is_file())
    })
}

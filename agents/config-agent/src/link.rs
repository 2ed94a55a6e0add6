//! The controller as the config source: poll the config on a jittered interval, put an accepted
//! one in force (checkpoint first, then the bus), refuse a bad one as a whole, fall back to the
//! checkpoint when the controller cannot be reached at boot, report every app, volume and
//! content tree status change through the per-object queue, and send a metrics report every metrics interval. One
//! task does all of it, one exchange at a time, so there is no shared link state to lock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cairn_pubsub::{Bus, BusError, Event};
use cairn_types::{
    AppInstanceStatus, ConfigSource, ContentTreeStatus, DeviceStatus, DomainMetric,
    ErrorDescription, ErrorSeverity, VolumeStatus,
};
use chrono::Utc;
use tokio::time::{Instant, sleep_until};

use crate::apply::Publications;
use crate::checkpoint;
use crate::controller::{Link, LinkError, Polled};
use crate::metrics;
use crate::model;
use crate::report::{self, Queue, Report};

/// EVE's config item for the poll interval, in seconds.
pub const CONFIG_INTERVAL_ITEM: &str = "timer.config.interval";

pub struct LinkOptions {
    pub persist: PathBuf,
    /// Between config polls (each one jittered down by up to a quarter, so that devices that
    /// booted together do not poll together). `timer.config.interval` overrides it.
    pub interval: Duration,
    /// Between metrics reports; `timer.metric.interval` overrides it.
    pub metric_interval: Duration,
    /// First wait after a failed exchange; doubles up to `interval` (polls) or `max_backoff`
    /// (reports).
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

enum Wake {
    Poll,
    Status(Box<Event<AppInstanceStatus>>),
    Volume(Box<Event<VolumeStatus>>),
    ContentTree(Box<Event<ContentTreeStatus>>),
    /// A `DomainMetric` came: the subscription's table is all the metrics report needs.
    DomainMetric,
    /// The baseos-manager's slots changed: the device report's software list with them.
    BaseOs,
    /// The edgeview agent's status: EVE's ZInfoEdgeview while a token is in force.
    Edgeview(Box<Event<cairn_types::EdgeviewStatus>>),
    /// An export job's status: its app's report goes again.
    Export(uuid::Uuid),
    Report,
    Metrics,
}

/// Runs the link until the process ends; returns only on a bus failure.
pub async fn run(
    publications: &Publications,
    bus: &Bus,
    mut link: Link,
    options: LinkOptions,
) -> Result<(), BusError> {
    let url = format!("https://{}", link.server());
    let mut statuses = bus.subscribe::<AppInstanceStatus>("app-manager");
    let mut volumes = bus.subscribe::<VolumeStatus>("volume-manager");
    let mut content_trees = bus.subscribe::<ContentTreeStatus>("downloader");
    let mut domain_metrics = bus.subscribe::<DomainMetric>("domain-manager");
    let mut baseos = bus.subscribe::<cairn_types::BaseOsStatus>("baseos-manager");
    let mut edgeview = bus.subscribe::<cairn_types::EdgeviewStatus>("edgeview");
    // Export jobs: each reported in its app's ZInfoApp.
    let mut exports = bus.subscribe::<cairn_types::ExportStatus>("volume-manager");
    let mut queue = Queue::new(options.first_backoff, options.max_backoff);
    let mut state = State {
        status: DeviceStatus {
            config_source: ConfigSource::None,
            ..crate::apply::agent_health(&options.persist).await
        },
        in_force: None,
        refused: None,
        restarted: false,
        interval: options.interval,
        metric_interval: options.metric_interval,
        checkpoint: None,
        volume_refs: BTreeMap::new(),
        shutdown: crate::ops::Shutdown::load(bus.run_dir()).await,
        shutdown_seen: None,
        edgeview_signer: String::new(),
        device_uuid: String::new(),
    };
    state.status.shutdown_cmd = state.shutdown.in_force();
    // Record I/O (read, checksum, decode of a possibly large config) off the runtime.
    let persist = options.persist.clone();
    let loaded = tokio::task::spawn_blocking(move || checkpoint::load(&persist))
        .await
        .unwrap_or_else(|e| Err(checkpoint::CheckpointError::ReaderEnded(e.to_string())));
    match loaded {
        Ok(restored) => {
            // The checkpointed config is the controller's until it says otherwise (a 304 says
            // nothing new), so its poll interval holds from the first poll on.
            state.interval = poll_interval(&restored.config, options.interval);
            state.metric_interval =
                metrics::interval(&restored.config.config_items, options.metric_interval);
            state.shutdown_seen = restored.config.shutdown_counter;
            state.checkpoint = Some(restored);
        }
        Err(checkpoint::CheckpointError::Persist(e))
            if matches!(e.kind, cairn_persist::ErrorKind::NotFound) => {}
        Err(e) => {
            tracing::warn!("the checkpointed config cannot be used: {e}");
            state.status.last_error =
                ErrorDescription::new(e.to_string(), ErrorSeverity::Warning, Utc::now());
        }
    }
    publications.status(state.status.clone()).await?;
    let mut published = state.status.clone();
    let mut next_poll = Instant::now();
    // The first report at start, as EVE's zedagent sends one before its ticker runs.
    let mut next_metrics = Instant::now();
    let mut poll_backoff = options.first_backoff;
    let mut device_facts: Option<crate::proto::ZInfoDevice> = None;
    loop {
        let wake = {
            let report_due = queue
                .due()
                .filter(|_| link.device().is_some() || !state.offline());
            tokio::select! {
                _ = sleep_until(next_poll) => Wake::Poll,
                event = statuses.recv() => Wake::Status(Box::new(event)),
                event = volumes.recv() => Wake::Volume(Box::new(event)),
                event = content_trees.recv() => Wake::ContentTree(Box::new(event)),
                _ = domain_metrics.recv() => Wake::DomainMetric,
                _ = baseos.recv() => Wake::BaseOs,
                event = edgeview.recv() => Wake::Edgeview(Box::new(event)),
                event = exports.recv() => match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => Wake::Export(value.app_uuid),
                    Event::Delete { last, .. } => Wake::Export(last.app_uuid),
                    _ => Wake::Export(uuid::Uuid::nil()),
                },
                _ = sleep_until(next_metrics) => Wake::Metrics,
                _ = sleep_until(report_due.unwrap_or_else(Instant::now)), if report_due.is_some() => Wake::Report,
            }
        };
        match wake {
            Wake::Poll => {
                let ok = state.poll(publications, &mut link, &url, &options).await?;
                // At start and whenever a fact changes (looked at with each poll).
                let persist = options.persist.clone();
                let facts = tokio::task::spawn_blocking(move || report::device_facts(&persist))
                    .await
                    .map(|facts| crate::proto::ZInfoDevice {
                        state: state.shutdown.device_state(statuses.values()) as i32,
                        shutdown_config_counter: state.shutdown_seen.unwrap_or(0),
                        ..facts
                    });
                if let Ok(mut facts) = facts {
                    // Both root slots once the baseos-manager tells them.
                    if let Some(slots) = baseos.values().next() {
                        facts.sw_list = report::software_list(slots, &facts.sw_list);
                    }
                    if device_facts.as_ref() != Some(&facts) {
                        queue.put(
                            report::DEVICE_KEY.to_string(),
                            Report::Device(Box::new(facts.clone())),
                        );
                        device_facts = Some(facts);
                    }
                }
                next_poll = if ok {
                    poll_backoff = options.first_backoff;
                    Instant::now() + jittered(state.interval)
                } else {
                    let wait = poll_backoff.min(state.interval);
                    poll_backoff = (poll_backoff * 2).min(state.interval);
                    Instant::now() + wait
                };
            }
            Wake::Status(event) => {
                match *event {
                    Event::Create { key, value }
                    | Event::Modify {
                        key, new: value, ..
                    } => queue.put(key, Report::App(Some(value))),
                    Event::Delete { key, .. } => queue.put(key, Report::App(None)),
                    _ => {}
                }
                // A shutdown ends when the last app has halted: the device says so.
                let device_state = state.shutdown.device_state(statuses.values()) as i32;
                if let Some(facts) = device_facts.as_mut()
                    && facts.state != device_state
                {
                    facts.state = device_state;
                    queue.put(
                        report::DEVICE_KEY.to_string(),
                        Report::Device(Box::new(facts.clone())),
                    );
                }
            }
            Wake::Volume(event) => match *event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => queue.put(
                    report::volume_key(&value.volume_id.to_string()),
                    Report::Volume(Some(Box::new(value))),
                ),
                Event::Delete { last, .. } => {
                    // EVE reports by volume UUID: another generation still there is the news.
                    let uuid = last.volume_id;
                    let other = volumes
                        .values()
                        .filter(|v| v.volume_id == uuid)
                        .max_by_key(|v| (v.generation_counter, v.local_generation_counter))
                        .cloned();
                    queue.put(
                        report::volume_key(&uuid.to_string()),
                        Report::Volume(other.map(Box::new)),
                    );
                }
                _ => {}
            },
            Wake::ContentTree(event) => match *event {
                Event::Create { key, value }
                | Event::Modify {
                    key, new: value, ..
                } => queue.put(
                    report::content_tree_key(&key),
                    Report::ContentTree(Some(Box::new(value))),
                ),
                Event::Delete { key, .. } => {
                    queue.put(report::content_tree_key(&key), Report::ContentTree(None))
                }
                _ => {}
            },
            Wake::DomainMetric => {}
            Wake::Export(app) => {
                let key = app.to_string();
                if let Some(status) = statuses.get(&key) {
                    queue.put(key, Report::App(Some(status.clone())));
                }
            }
            Wake::Edgeview(event) => {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } = *event
                    && value.active()
                {
                    queue.put(
                        report::EDGEVIEW_KEY.to_string(),
                        Report::Edgeview(Box::new(value)),
                    );
                }
            }
            Wake::BaseOs => {
                if let (Some(mut facts), Some(slots)) =
                    (device_facts.clone(), baseos.values().next())
                {
                    facts.sw_list = report::software_list(slots, &facts.sw_list);
                    if device_facts.as_ref() != Some(&facts) {
                        queue.put(
                            report::DEVICE_KEY.to_string(),
                            Report::Device(Box::new(facts.clone())),
                        );
                        device_facts = Some(facts);
                    }
                }
            }
            // Not before the device has a UUID while the controller is away: the next poll may
            // register it, and the report follows that poll.
            Wake::Metrics if link.device().is_none() && state.offline() => {
                next_metrics = next_poll.max(Instant::now() + options.first_backoff);
            }
            Wake::Metrics => {
                next_metrics = Instant::now() + jittered(state.metric_interval);
                let persist = options.persist.clone();
                let usage = tokio::task::spawn_blocking(move || metrics::device_usage(&persist))
                    .await
                    .unwrap_or_default();
                let apps: Vec<AppInstanceStatus> = statuses.values().cloned().collect();
                let domains: BTreeMap<String, DomainMetric> = domain_metrics
                    .values()
                    .map(|m| (m.uuid_and_version.uuid.to_string(), m.clone()))
                    .collect();
                let volume_list: Vec<VolumeStatus> = volumes.values().cloned().collect();
                let sent = match link.connect().await {
                    Ok(device) => {
                        let inputs = metrics::Inputs {
                            persist: &options.persist,
                            usage: &usage,
                            apps: &apps,
                            domains: &domains,
                            volumes: &volume_list,
                            volume_refs: &state.volume_refs,
                        };
                        let report = metrics::report(device, &inputs, Utc::now());
                        link.send_metrics(report).await
                    }
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => state.contact_ok(),
                    Err(e) => {
                        // As in EVE: dropped; the next interval's report replaces it.
                        tracing::debug!("metrics not sent: {e}");
                        state.contact_failed(&e);
                    }
                }
            }
            Wake::Report => {
                if let Some((app, report)) = queue.next() {
                    let sent = match link.connect().await {
                        Ok(device) => {
                            let info = match &report {
                                Report::App(status) => {
                                    let volumes =
                                        state.volume_refs.get(&app).map_or(&[][..], Vec::as_slice);
                                    let jobs = report::app_exports(exports.values(), &app);
                                    report::app_info(device, &app, status.as_ref(), volumes, &jobs)
                                }
                                Report::Device(facts) => {
                                    report::device_info(device, (**facts).clone())
                                }
                                Report::Volume(status) => {
                                    let uuid = report::volume_of_key(&app);
                                    report::volume_info(device, uuid, status.as_deref())
                                }
                                Report::ContentTree(status) => {
                                    let uuid = report::content_tree_of_key(&app);
                                    report::content_tree_info(device, uuid, status.as_deref())
                                }
                                Report::Edgeview(status) => report::edgeview_info(device, status),
                            };
                            link.send_info(info).await
                        }
                        Err(e) => Err(e),
                    };
                    match sent {
                        Ok(()) => {
                            queue.sent(&app, &report);
                            state.contact_ok();
                        }
                        Err(e) => {
                            let wait = queue.failed();
                            tracing::debug!(%app, "report not sent, next try in {wait:?}: {e}");
                            state.contact_failed(&e);
                        }
                    }
                }
            }
        }
        state.status.reports_pending = queue.len() as u32;
        state.status.app_manager_up = statuses.is_synchronized() && statuses.is_connected();
        if state.status != published {
            publications.status(state.status.clone()).await?;
            published = state.status.clone();
        }
    }
}

struct State {
    status: DeviceStatus,
    /// The hash of the config on the bus, if any.
    in_force: Option<String>,
    /// The last refused config's hash: the same config again is not looked at twice.
    refused: Option<String>,
    restarted: bool,
    interval: Duration,
    metric_interval: Duration,
    checkpoint: Option<checkpoint::Restored>,
    /// Each app's volume ids in the config in force, for `ZInfoApp.volumeRefs`.
    volume_refs: BTreeMap<String, Vec<String>>,
    /// The controller's shutdown command in force in this boot (see [`crate::ops`]).
    shutdown: crate::ops::Shutdown,
    /// The shutdown counter of the controller's config in force (or checkpointed).
    shutdown_seen: Option<u32>,
    /// The controller's signing certificate (PEM) and the device's UUID, which EdgeView's
    /// token is checked against (EVE: zedagent's `verifyJWT` and `addEvFiles`).
    edgeview_signer: String,
    device_uuid: String,
}

impl State {
    fn offline(&self) -> bool {
        !self.status.controller_reachable
    }

    /// One config poll; `false` if the controller could not be asked.
    async fn poll(
        &mut self,
        publications: &Publications,
        link: &mut Link,
        url: &str,
        options: &LinkOptions,
    ) -> Result<bool, BusError> {
        let sent_hash = self
            .in_force
            .clone()
            .or_else(|| self.checkpoint.as_ref().map(|c| c.hash.clone()))
            .unwrap_or_default();
        let polled = link.poll_config(&sent_hash).await;
        if let Some(device) = link.device() {
            self.status.device_uuid = device.to_string();
            self.device_uuid = device.to_string();
        }
        if let Some(signer) = link.signing_cert() {
            self.edgeview_signer = String::from_utf8_lossy(signer).into_owned();
        }
        match polled {
            Ok(Polled::Unchanged) => {
                self.contact_ok();
                self.status.last_error = ErrorDescription::default();
                if self.status.config_source == ConfigSource::Checkpoint {
                    // The checkpointed config is the controller's current one.
                    self.status.config_source = ConfigSource::Controller {
                        url: url.to_string(),
                    };
                }
                if self.in_force.is_none()
                    && let Some(restored) = self.checkpoint.take()
                {
                    // The controller's config is the checkpointed one.
                    let source = ConfigSource::Controller {
                        url: url.to_string(),
                    };
                    self.put_in_force(publications, &restored.hash, &restored.config, source)
                        .await?;
                }
                Ok(true)
            }
            Ok(Polled::Config { hash, config }) => {
                self.contact_ok();
                if self.refused.as_deref() == Some(hash.as_str()) {
                    return Ok(true);
                }
                match model::from_proto(&config) {
                    Err(e) => {
                        let message = format!(
                            "config {hash} from the controller refused at {e}; the config in force stays"
                        );
                        tracing::warn!("{message}");
                        self.status.last_error =
                            ErrorDescription::new(message, ErrorSeverity::Error, Utc::now());
                        self.refused = Some(hash);
                    }
                    Ok(model) => {
                        self.refused = None;
                        self.interval = poll_interval(&model, options.interval);
                        self.metric_interval =
                            metrics::interval(&model.config_items, options.metric_interval);
                        self.status.last_error = ErrorDescription::default();
                        // A new shutdown counter: in force (on disk) before the config that
                        // carries it is checkpointed, or a crash between would forget it.
                        if crate::ops::Shutdown::asked(self.shutdown_seen, model.shutdown_counter)
                            && let Some(counter) = model.shutdown_counter
                            && let Err(e) = self.shutdown.begin(counter).await
                        {
                            tracing::error!(
                                "the shutdown is not kept for a restart of this agent: {e}"
                            );
                        }
                        self.shutdown_seen = model.shutdown_counter;
                        self.status.shutdown_cmd = self.shutdown.in_force();
                        // Checkpoint first: a config on the bus is always one a reboot without
                        // the controller would bring back.
                        let (persist, saved_hash) = (options.persist.clone(), hash.clone());
                        let saved = tokio::task::spawn_blocking(move || {
                            checkpoint::save(&persist, &saved_hash, &config)
                                .map_err(|e| e.to_string())
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("the checkpoint writer ended: {e}")));
                        if let Err(e) = saved {
                            tracing::error!("the config is applied but not checkpointed: {e}");
                            self.status.last_error = ErrorDescription::new(
                                format!("config {hash} applied but not checkpointed: {e}"),
                                ErrorSeverity::Warning,
                                Utc::now(),
                            );
                        }
                        self.checkpoint = None;
                        let source = ConfigSource::Controller {
                            url: url.to_string(),
                        };
                        self.put_in_force(publications, &hash, &model, source)
                            .await?;
                    }
                }
                Ok(true)
            }
            Err(e) => {
                // Said once per distinct fault, not at every retry of a long outage.
                if self.status.last_error.error != e.to_string() {
                    tracing::warn!("controller: {e}");
                }
                self.contact_failed(&e);
                if self.in_force.is_none()
                    && let Some(restored) = self.checkpoint.take()
                {
                    if let Some(why) = &restored.from_backup {
                        tracing::warn!(
                            "the checkpoint's primary copy is damaged ({why}); using its backup"
                        );
                    }
                    tracing::info!(hash = %restored.hash, "the controller cannot be reached: the checkpointed config is applied");
                    self.put_in_force(
                        publications,
                        &restored.hash,
                        &restored.config,
                        ConfigSource::Checkpoint,
                    )
                    .await?;
                }
                Ok(false)
            }
        }
    }

    async fn put_in_force(
        &mut self,
        publications: &Publications,
        hash: &str,
        config: &model::DeviceConfig,
        source: ConfigSource,
    ) -> Result<(), BusError> {
        let mut config = self.shutdown.apply(config);
        if config.edgeview.is_some()
            && let Some(edgeview) = config.to_mut().edgeview.as_mut()
        {
            edgeview.signing_cert_pem = self.edgeview_signer.clone();
            edgeview.device_uuid = self.device_uuid.clone();
        }
        publications.apply(&config).await?;
        if !self.restarted {
            publications.restarted().await?;
            self.restarted = true;
        }
        tracing::info!(%hash, apps = config.apps.len(), volumes = config.volumes.len(), ?source, "config in force");
        self.in_force = Some(hash.to_string());
        self.status.config_source = source;
        self.status.last_config_hash = hash.to_string();
        self.status.last_config_time = Some(Utc::now());
        self.status.apps = config.apps.len() as u32;
        self.status.device_name = config.device_name.clone();
        self.volume_refs = config
            .apps
            .iter()
            .map(|app| {
                let volumes = app.volume_ref_config_list.iter();
                (
                    app.uuid_and_version.uuid.to_string(),
                    volumes.map(|v| v.volume_id.to_string()).collect(),
                )
            })
            .collect();
        self.status.volumes = config.volumes.len() as u32;
        Ok(())
    }

    fn contact_ok(&mut self) {
        self.status.controller_reachable = true;
        self.status.last_contact = Some(Utc::now());
    }

    fn contact_failed(&mut self, error: &LinkError) {
        if error.reached_controller() {
            self.status.last_contact = Some(Utc::now());
        }
        self.status.controller_reachable = error.reached_controller();
        self.status.last_error =
            ErrorDescription::new(error.to_string(), ErrorSeverity::Error, Utc::now());
    }
}

/// `timer.config.interval` of `config` (seconds), else `default`.
fn poll_interval(config: &model::DeviceConfig, default: Duration) -> Duration {
    config
        .config_items
        .get(CONFIG_INTERVAL_ITEM)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(default, Duration::from_secs)
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.75 + 0.25 * fastrand::f64())
}

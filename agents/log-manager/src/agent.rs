//! The agent: a collector cycle on a blocking thread (file reads, gzip, fsync) and an uploader
//! task, fed by the bus with the device's UUID (the config-agent's `DeviceStatus`) and the apps'
//! display names (its `AppInstanceConfig`s).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_controller_client::https::Https;
use cairn_controller_client::link::ControllerLink;
use cairn_pubsub::{Bus, Event, PublishOptions};
use cairn_types::{AppInstanceConfig, ConfigItemValueMap, DeviceStatus, LogManagerStatus};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::collect::{self, Collector, Headers};
use crate::levels::RemoteLevels;
use crate::queue::Queue;
use crate::upload::{self, Backoff, MAX_4XX_RETRIES, Outcome};

#[derive(Debug, Clone)]
pub struct Settings {
    pub persist: PathBuf,
    pub run: PathBuf,
    /// Where the agents' log files are (`<run>/logs` under `cairn up`).
    pub logs_dir: PathBuf,
    /// The queue's size cap in bytes.
    pub queue_bytes: u64,
    /// How often the sources are read.
    pub collect_every: Duration,
    /// Lines wait at most this long in memory before they are written into a file.
    pub batch_for: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// One upload's deadline (connect, TLS, request, answer).
    pub upload_timeout: Duration,
    pub technicians_gid: Option<u32>,
}

/// What the uploader did, for the status.
type Progress = Arc<Mutex<LogManagerStatus>>;
/// The remote log levels of the config in force, from the bus to the collector.
type Levels = Arc<Mutex<RemoteLevels>>;

pub async fn run(
    bus: &Bus,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let root = settings.persist.join("newlog");
    let queue = tokio::task::spawn_blocking(move || Queue::open(root)).await??;
    let cap = settings.queue_bytes;
    let collector = tokio::task::spawn_blocking(move || Collector::open(queue, cap)).await??;
    let stored = collector.stored().clone();
    tracing::info!(
        next_msgid = stored.next_msgid,
        dropped_files = stored.dropped_files,
        cap,
        "log-manager started"
    );
    let headers = Arc::new(Mutex::new(Headers::default()));
    headers_default(&headers, stored.device_uuid);
    let (device_tx, device_rx) = watch::channel(stored.device_uuid);
    let written = Arc::new(Notify::new());
    let levels = Levels::default();

    let collecting = collect_loop(
        collector,
        settings.clone(),
        headers.clone(),
        levels.clone(),
        written.clone(),
    );
    let progress = Progress::default();
    let uploading = upload_loop(settings.clone(), device_rx, written, progress.clone());
    let following = follow_bus(bus, headers, levels.clone(), device_tx);
    let reporting = report_loop(bus, settings.clone(), progress, levels);
    tokio::select! {
        result = collecting => result,
        result = uploading => result,
        result = following => result,
        result = reporting => result,
        () = shutdown => Ok(()),
    }
}

/// Publishes `LogManagerStatus` (queue usage from the disk, the uploader's counters) when it
/// changes, looked at every second.
async fn report_loop(
    bus: &Bus,
    settings: Settings,
    progress: Progress,
    levels: Levels,
) -> anyhow::Result<()> {
    let access = settings
        .technicians_gid
        .map(cairn_pubsub::Access::with_group_readers)
        .unwrap_or_default();
    let statuses = bus
        .publish::<LogManagerStatus>(PublishOptions {
            access,
            ..Default::default()
        })
        .await?;
    let root = settings.persist.join("newlog");
    let queue = Arc::new(tokio::task::spawn_blocking(move || Queue::open(root)).await??);
    let cursors = queue.root().join("cursors.json");
    let mut last = None;
    let mut restarted = false;
    loop {
        let (q, path) = (queue.clone(), cursors.clone());
        let (usage, dropped) =
            tokio::task::spawn_blocking(move || (q.usage(), collect::dropped_files(&path))).await?;
        let mut status = progress.lock().map(|p| p.clone()).unwrap_or_default();
        if let Ok((files, bytes)) = usage {
            status.queued_files = files as u64;
            status.queued_bytes = bytes;
        }
        status.dropped_files = dropped;
        status.remote_log_levels = levels.lock().map(|l| l.named().clone()).unwrap_or_default();
        if last.as_ref() != Some(&status) {
            statuses.publish(status.clone()).await?;
            last = Some(status);
        }
        if !restarted {
            statuses.signal_restarted().await?;
            restarted = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn headers_default(headers: &Mutex<Headers>, device: Option<Uuid>) {
    if let Ok(mut headers) = headers.lock() {
        headers.bundle.dev_id = device.map(|d| d.to_string()).unwrap_or_default();
        headers.bundle.image = "cairn".into();
        headers.bundle.eve_version = env!("CARGO_PKG_VERSION").into();
    }
}

async fn follow_bus(
    bus: &Bus,
    headers: Arc<Mutex<Headers>>,
    levels: Levels,
    device: watch::Sender<Option<Uuid>>,
) -> anyhow::Result<()> {
    let mut statuses = bus.subscribe::<DeviceStatus>("config-agent");
    let mut apps = bus.subscribe::<AppInstanceConfig>("config-agent");
    let mut items = bus.subscribe::<ConfigItemValueMap>("config-agent");
    loop {
        tokio::select! {
            event = items.recv() => {
                let now = match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                        RemoteLevels::from_items(&value)
                    }
                    Event::Delete { .. } => RemoteLevels::default(),
                    _ => continue,
                };
                tracing::info!(levels = ?now.named(), "remote log levels");
                if let Ok(mut levels) = levels.lock() {
                    *levels = now;
                }
            }
            event = statuses.recv() => {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } = event
                    && let Ok(uuid) = value.device_uuid.parse::<Uuid>()
                    && *device.borrow() != Some(uuid)
                {
                    tracing::info!(device = %uuid, "device UUID known: uploads can start");
                    if let Ok(mut headers) = headers.lock() {
                        headers.bundle.dev_id = uuid.to_string();
                    }
                    device.send_replace(Some(uuid));
                }
            }
            event = apps.recv() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    if let Ok(mut headers) = headers.lock() {
                        headers
                            .app_names
                            .insert(value.uuid_and_version.uuid, value.display_name.clone());
                    }
                }
                Event::Delete { last, .. } => {
                    if let Ok(mut headers) = headers.lock() {
                        headers.app_names.remove(&last.uuid_and_version.uuid);
                    }
                }
                _ => {}
            },
        }
    }
}

async fn collect_loop(
    mut collector: Collector,
    settings: Settings,
    headers: Arc<Mutex<Headers>>,
    levels: Levels,
    written: Arc<Notify>,
) -> anyhow::Result<()> {
    let apps_dir = settings.run.join("domain-manager").join("apps");
    let mut first_unflushed: Option<Instant> = None;
    loop {
        let headers_now = headers.lock().map(|h| h.clone()).unwrap_or_default();
        let levels_now = levels.lock().map(|l| l.clone()).unwrap_or_default();
        let (logs_dir, apps) = (settings.logs_dir.clone(), apps_dir.clone());
        let batch_for = settings.batch_for;
        let since = first_unflushed;
        let (back, result) = tokio::task::spawn_blocking(move || {
            let result = (|| {
                // Until the controller names the device, lines wait in their files: a device
                // file is stamped with its UUID (LogBundle.devID) and none could be sent anyway.
                let Ok(device) = headers_now.bundle.dev_id.parse::<Uuid>() else {
                    return Ok((false, None));
                };
                collector.set_device(device);
                collector.set_remote_levels(levels_now);
                let sources = collect::sources(&logs_dir, &apps);
                collector.collect(&sources, &headers_now)?;
                let (any, full) = collector.pending();
                let due = since.is_some_and(|t| t.elapsed() >= batch_for);
                if full || (any && due) {
                    return collector.flush().map(|f| (any, Some(f)));
                }
                Ok((any, None))
            })();
            (collector, result)
        })
        .await?;
        collector = back;
        match result {
            Ok((_, Some(flushed))) => {
                tracing::debug!(
                    files = flushed.files,
                    entries = flushed.entries,
                    gzip_bytes = flushed.gzip_bytes,
                    "logs queued"
                );
                first_unflushed = None;
                written.notify_one();
            }
            Ok((any, None)) => {
                if any && first_unflushed.is_none() {
                    first_unflushed = Some(Instant::now());
                }
            }
            // A full disk or an unreadable file: said, and tried again next cycle (the
            // cursors were not moved, so nothing is lost).
            Err(e) => tracing::warn!(error = %e, "collecting logs failed; retrying"),
        }
        tokio::time::sleep(settings.collect_every).await;
    }
}

async fn upload_loop(
    settings: Settings,
    mut device: watch::Receiver<Option<Uuid>>,
    written: Arc<Notify>,
    progress: Progress,
) -> anyhow::Result<()> {
    let note = |f: &dyn Fn(&mut LogManagerStatus)| {
        if let Ok(mut p) = progress.lock() {
            f(&mut p);
        }
    };
    let root = settings.persist.join("newlog");
    let queue = Arc::new(tokio::task::spawn_blocking(move || Queue::open(root)).await??);
    let mut backoff = Backoff::new(settings.retry_min, settings.retry_max);
    let mut refused: Option<(String, u32)> = None;
    let mut https: Option<Https> = None;
    let mut last_problem = String::new();
    loop {
        let Some(uuid) = *device.borrow_and_update() else {
            let _ = device.changed().await;
            continue;
        };
        let client = match https.clone() {
            Some(client) => client,
            None => {
                let persist = settings.persist.clone();
                let link = tokio::task::spawn_blocking(move || ControllerLink::read(&persist))
                    .await?
                    .map_err(anyhow::Error::from)
                    .and_then(|link| {
                        Https::new(
                            &link.server,
                            &link.root_pem,
                            &link.root_path,
                            settings.upload_timeout,
                        )
                        .map_err(anyhow::Error::from)
                    });
                match link {
                    Ok(client) => {
                        https = Some(client.clone());
                        client
                    }
                    Err(e) => {
                        let problem = format!("{e:#}");
                        if problem != last_problem {
                            note(&|p| p.last_error = problem.clone());
                            tracing::warn!(error = %problem, "logs cannot be uploaded");
                            last_problem = problem;
                        }
                        tokio::time::sleep(settings.retry_max).await;
                        continue;
                    }
                }
            }
        };
        let listing = queue.clone();
        let oldest = tokio::task::spawn_blocking(move || listing.pending())
            .await??
            .into_iter()
            .next();
        let Some(file) = oldest else {
            // Woken by the collector's next file, or a look every few seconds.
            let _ = tokio::time::timeout(Duration::from_secs(5), written.notified()).await;
            continue;
        };
        let outcome = match upload::send(&client, uuid, &file).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(file = %file.name(), error = %e, "log file unreadable; dropped");
                let listing = queue.clone();
                tokio::task::spawn_blocking(move || listing.remove(&file)).await??;
                continue;
            }
        };
        match outcome {
            Outcome::Sent => {
                let (listing, done) = (queue.clone(), file.clone());
                tokio::task::spawn_blocking(move || listing.remove(&done)).await??;
                if !last_problem.is_empty() {
                    tracing::info!(file = %file.name(), "log upload works again");
                    last_problem.clear();
                }
                backoff.reset();
                refused = None;
                note(&|p| {
                    p.sent_files += 1;
                    p.last_error.clear();
                    p.last_upload = Some(chrono::Utc::now());
                });
            }
            Outcome::Later(why) => {
                note(&|p| p.last_error = format!("{}: {why}", file.name()));
                if why != last_problem {
                    tracing::info!(file = %file.name(), why = %why, "log upload waits for the controller");
                    last_problem = why;
                }
                tokio::time::sleep(backoff.failed()).await;
            }
            Outcome::Refused(status) => {
                let name = file.name();
                note(&|p| p.last_error = format!("{name}: the controller refused it ({status})"));
                let count = match &refused {
                    Some((n, c)) if *n == name => c + 1,
                    _ => 1,
                };
                if count >= MAX_4XX_RETRIES {
                    let listing = queue.clone();
                    let to =
                        tokio::task::spawn_blocking(move || listing.set_aside(&file)).await??;
                    tracing::warn!(
                        file = %name, status, to = %to.display(),
                        "the controller refused this log file {MAX_4XX_RETRIES} times; set aside"
                    );
                    refused = None;
                    note(&|p| p.set_aside_files += 1);
                } else {
                    tracing::info!(file = %name, status, count, "log file refused; will retry");
                    refused = Some((name, count));
                    tokio::time::sleep(backoff.failed()).await;
                }
            }
        }
    }
}

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
use crate::queue::{Queue, Queued};
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

/// What the collector and the uploader did, for the status.
type Progress = Arc<Reported>;

#[derive(Default)]
struct Reported {
    status: Mutex<LogManagerStatus>,
    /// Wakes the report loop, so a fault shows in the status while it lasts.
    changed: Notify,
}

impl Reported {
    fn note(&self, f: impl FnOnce(&mut LogManagerStatus)) {
        if let Ok(mut status) = self.status.lock() {
            f(&mut status);
        }
        self.changed.notify_one();
    }
}

/// A write into the queue that failed is tried again after this long (the lines wait in their
/// files meanwhile).
const QUEUE_RETRY: Duration = Duration::from_secs(2);
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

    let progress = Progress::default();
    let collecting = collect_loop(
        collector,
        settings.clone(),
        headers.clone(),
        levels.clone(),
        written.clone(),
        progress.clone(),
    );
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
    let mut last_dropped = 0;
    let mut restarted = false;
    loop {
        let (q, path) = (queue.clone(), cursors.clone());
        let (usage, dropped) =
            tokio::task::spawn_blocking(move || (q.usage(), collect::dropped_files(&path))).await?;
        let mut status = progress
            .status
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        if let Ok((files, bytes)) = usage {
            status.queued_files = files as u64;
            status.queued_bytes = bytes;
        }
        // An unreadable record keeps the count last read.
        if let Some(dropped) = dropped {
            last_dropped = dropped;
        }
        status.dropped_files = last_dropped;
        status.remote_log_levels = levels.lock().map(|l| l.named().clone()).unwrap_or_default();
        if last.as_ref() != Some(&status) {
            statuses.publish(status.clone()).await?;
            last = Some(status);
        }
        if !restarted {
            statuses.signal_restarted().await?;
            restarted = true;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), progress.changed.notified()).await;
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
    progress: Progress,
) -> anyhow::Result<()> {
    let apps_dir = settings.run.join("domain-manager").join("apps");
    let mut first_unflushed: Option<Instant> = None;
    let mut queue_error = String::new();
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
            // A full disk or an unreadable file: said, and tried again from the stored
            // cursors (the collector went back to them), so nothing is lost.
            Err(e) => {
                let error = format!(
                    "{e}; the lines wait in their files, tried again every {} s",
                    QUEUE_RETRY.as_secs()
                );
                if error != queue_error {
                    tracing::warn!(error = %e, "collecting logs failed; retrying");
                    progress.note(|p| p.queue_error = error.clone());
                    queue_error = error;
                }
                tokio::time::sleep(QUEUE_RETRY).await;
                continue;
            }
        }
        if !queue_error.is_empty() {
            tracing::info!("log lines are read and queued again");
            progress.note(|p| {
                if p.queue_error == queue_error {
                    p.queue_error.clear();
                }
            });
            queue_error.clear();
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
    let note = |f: &dyn Fn(&mut LogManagerStatus)| progress.note(f);
    let root = settings.persist.join("newlog");
    let queue = Arc::new(tokio::task::spawn_blocking(move || Queue::open(root)).await??);
    let mut backoff = Backoff::new(settings.retry_min, settings.retry_max);
    let mut refused: Option<(String, u32)> = None;
    let mut https: Option<Https> = None;
    let mut last_problem = String::new();
    let mut unreadable: Option<(String, u32)> = None;
    let mut sent_not_removed: Option<PathBuf> = None;
    // A fault of the queue on disk: in the status and the log (once per new text).
    let last_queue_problem = Mutex::new(String::new());
    let problem = |text: &str| {
        note(&|p| p.queue_error = text.to_string());
        if let Ok(mut last) = last_queue_problem.lock()
            && *last != text
        {
            tracing::warn!(error = %text, "log queue");
            *last = text.to_string();
        }
    };
    let clear_problem = || {
        if let Ok(mut last) = last_queue_problem.lock()
            && !last.is_empty()
        {
            tracing::info!("the log queue works again");
            note(&|p| {
                if p.queue_error == *last {
                    p.queue_error.clear();
                }
            });
            last.clear();
        }
    };
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
        let oldest = match tokio::task::spawn_blocking(move || listing.pending()).await? {
            Ok(queued) => queued.into_iter().next(),
            Err(e) => {
                problem(&format!("{e}; tried again in {} s", QUEUE_RETRY.as_secs()));
                tokio::time::sleep(QUEUE_RETRY).await;
                continue;
            }
        };
        let Some(file) = oldest else {
            // Woken by the collector's next file, or a look every few seconds.
            let _ = tokio::time::timeout(Duration::from_secs(5), written.notified()).await;
            continue;
        };
        if sent_not_removed.as_ref() == Some(&file.path) {
            // The controller has it: sending it again would only make a duplicate.
            if remove_sent(&queue, &file, &problem).await? {
                sent_not_removed = None;
                clear_problem();
            } else {
                tokio::time::sleep(QUEUE_RETRY).await;
            }
            continue;
        }
        let outcome = match upload::send(&client, uuid, &file).await {
            Ok(outcome) => outcome,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                // A disk error is not the file's fault: it stays queued and is read again.
                // One that never reads is set aside as a refused one is, kept on the device.
                let name = file.name();
                let count = match &unreadable {
                    Some((n, c)) if *n == name => c + 1,
                    _ => 1,
                };
                let error = format!("log file {}: cannot read it: {e}", file.path.display());
                if count >= MAX_4XX_RETRIES {
                    let listing = queue.clone();
                    match tokio::task::spawn_blocking(move || listing.set_aside(&file)).await? {
                        Ok(to) => {
                            problem(&format!(
                                "{error}; set aside as {} after {count} tries",
                                to.display()
                            ));
                            note(&|p| p.set_aside_files += 1);
                            unreadable = None;
                        }
                        Err(e) => problem(&format!("{error}; setting it aside failed too: {e}")),
                    }
                } else {
                    problem(&format!(
                        "{error}; kept in the queue, tried again ({count} of {MAX_4XX_RETRIES})"
                    ));
                    unreadable = Some((name, count));
                }
                tokio::time::sleep(QUEUE_RETRY).await;
                continue;
            }
        };
        unreadable = None;
        clear_problem();
        match outcome {
            Outcome::Sent => {
                let removed = remove_sent(&queue, &file, &problem).await?;
                if !removed {
                    sent_not_removed = Some(file.path.clone());
                }
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
                if !removed {
                    // Tried again after a while, as every queue fault is: the fault stays
                    // in the status meanwhile rather than being cleared a moment later.
                    tokio::time::sleep(QUEUE_RETRY).await;
                }
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
                    match tokio::task::spawn_blocking(move || listing.set_aside(&file)).await? {
                        Ok(to) => {
                            tracing::warn!(
                                file = %name, status, to = %to.display(),
                                "the controller refused this log file {MAX_4XX_RETRIES} times; set aside"
                            );
                            refused = None;
                            note(&|p| p.set_aside_files += 1);
                        }
                        // Kept in the queue and refused once more: set aside at the next try.
                        Err(e) => {
                            problem(&format!("{e}; tried again later"));
                            tokio::time::sleep(QUEUE_RETRY).await;
                        }
                    }
                } else {
                    tracing::info!(file = %name, status, count, "log file refused; will retry");
                    refused = Some((name, count));
                    tokio::time::sleep(backoff.failed()).await;
                }
            }
        }
    }
}

/// Removes a file the controller took; false (and said) when it cannot be removed now.
async fn remove_sent(
    queue: &Arc<Queue>,
    file: &Queued,
    problem: &impl Fn(&str),
) -> anyhow::Result<bool> {
    let (listing, done) = (queue.clone(), file.clone());
    match tokio::task::spawn_blocking(move || listing.remove(&done)).await? {
        Ok(()) => Ok(true),
        Err(e) => {
            problem(&format!(
                "{e}; the controller has it, so it is not sent again; removed later"
            ));
            Ok(false)
        }
    }
}

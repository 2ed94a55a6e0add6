//! `cairn watch [TOPIC…]`: live changes on the bus, one line each, until Ctrl-C. Like every
//! read-out it only subscribes: a subscriber cannot write into a publisher's topic.

use std::collections::BTreeSet;
use std::io::Write;

use cairn_pubsub::{Bus, Event, Topic, socket_path};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, ContentTreeConfig, ContentTreeStatus, DeviceStatus,
    DomainConfig, DomainLiveOpConfig, DomainLiveOpStatus, DomainStatus, ExportStatus, VolumeConfig,
    VolumeStatus, VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use chrono::{DateTime, Local, Utc};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::readout::{Roots, socket_refusal};

/// A topic on the bus and the agent that publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KnownTopic {
    pub publisher: &'static str,
    pub topic: &'static str,
}

const fn known<T: Topic>(publisher: &'static str) -> KnownTopic {
    KnownTopic {
        publisher,
        topic: T::NAME,
    }
}

/// Every publication the agents make, in data-flow order.
pub const KNOWN_TOPICS: [KnownTopic; 14] = [
    known::<DeviceStatus>("config-agent"),
    known::<AppInstanceConfig>("config-agent"),
    known::<ContentTreeConfig>("config-agent"),
    known::<ContentTreeStatus>("downloader"),
    known::<VolumeConfig>("config-agent"),
    known::<AppInstanceStatus>("app-manager"),
    known::<DomainConfig>("app-manager"),
    known::<DomainLiveOpConfig>("app-manager"),
    known::<VolumesSnapshotConfig>("app-manager"),
    known::<VolumeStatus>("volume-manager"),
    known::<VolumesSnapshotStatus>("volume-manager"),
    known::<ExportStatus>("volume-manager"),
    known::<DomainStatus>("domain-manager"),
    known::<DomainLiveOpStatus>("domain-manager"),
];

/// The topics named on the command line (all when none), or an error listing the known ones.
pub fn select(names: &[String]) -> anyhow::Result<Vec<KnownTopic>> {
    if names.is_empty() {
        return Ok(KNOWN_TOPICS.to_vec());
    }
    let mut chosen = BTreeSet::new();
    let mut unknown = Vec::new();
    for name in names {
        match KNOWN_TOPICS
            .iter()
            .find(|t| t.topic.eq_ignore_ascii_case(name))
        {
            Some(t) => {
                chosen.insert(*t);
            }
            None => unknown.push(name.as_str()),
        }
    }
    anyhow::ensure!(
        unknown.is_empty(),
        "unknown topic {}: the known topics are {}",
        unknown.join(", "),
        KNOWN_TOPICS
            .iter()
            .map(|t| t.topic)
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Keep the data-flow order of the table.
    Ok(KNOWN_TOPICS
        .iter()
        .filter(|t| chosen.contains(t))
        .copied()
        .collect())
}

/// One change seen on the bus; `--json` prints it as one object per line.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub time: DateTime<Utc>,
    pub publisher: &'static str,
    pub topic: &'static str,
    /// `create`, `modify`, `delete`, or `restart` (the publisher is a new process).
    pub change: &'static str,
    pub key: String,
    pub summary: String,
    /// The new value (create, modify) or the last one (delete); null for a restart.
    pub value: serde_json::Value,
}

enum Report {
    Change(Change),
    /// The first table of a topic whose publisher was there at the start has been received.
    Ready(KnownTopic),
    Refused(KnownTopic, String),
}

/// Watches `topics` and prints each change until Ctrl-C or SIGTERM.
pub async fn watch(
    roots: &Roots,
    topics: &[KnownTopic],
    json: bool,
    initial: bool,
) -> anyhow::Result<()> {
    let bus = Bus::new("cli", &roots.run, &roots.persist);
    let (tx, mut rx) = mpsc::channel(1024);
    let mut waiting = BTreeSet::new();
    let mut absent = Vec::new();
    for &topic in topics {
        let socket = socket_path(&roots.run, topic.publisher, topic.topic);
        let present = socket.exists();
        if let Some(reason) = socket_refusal(&socket) {
            eprintln!(
                "cairn watch: {}/{} refused: {reason}",
                topic.publisher, topic.topic
            );
            continue;
        }
        if present {
            waiting.insert(topic);
        } else {
            absent.push(topic.topic);
        }
        // The first table of a publisher that is already there is the present, not a change.
        let quiet = present && !initial;
        let tx = tx.clone();
        let bus = bus.clone();
        macro_rules! spawn {
            ($($ty:ty),*) => {
                match topic.topic {
                    $(name if name == <$ty as Topic>::NAME => {
                        tokio::spawn(follow::<$ty>(bus, topic, quiet, tx));
                    })*
                    _ => {}
                }
            };
        }
        spawn!(
            DeviceStatus,
            AppInstanceConfig,
            ContentTreeConfig,
            ContentTreeStatus,
            VolumeConfig,
            AppInstanceStatus,
            DomainConfig,
            DomainLiveOpConfig,
            VolumesSnapshotConfig,
            VolumeStatus,
            VolumesSnapshotStatus,
            ExportStatus,
            DomainStatus,
            DomainLiveOpStatus
        );
    }
    drop(tx);
    anyhow::ensure!(
        !waiting.is_empty() || !absent.is_empty(),
        "none of the topics can be read: see the refusals above"
    );

    // Streams made once: a signal that arrives while a line is being printed is kept for the
    // next poll (a fresh `ctrl_c()` future per turn would miss it).
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let ready_by = tokio::time::Instant::now() + crate::WAIT;
    let mut announced = false;
    let mut stdout = std::io::stdout().lock();
    loop {
        if !announced && waiting.is_empty() {
            announced = true;
            announce(topics.len(), &absent);
        }
        let report = tokio::select! {
            report = rx.recv() => report,
            _ = tokio::time::sleep_until(ready_by), if !announced => {
                // Publishers with a socket but no answer: watched anyway.
                absent.extend(waiting.iter().map(|t| t.topic));
                waiting.clear();
                continue;
            }
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        match report {
            None => return Ok(()),
            Some(Report::Ready(topic)) => {
                waiting.remove(&topic);
            }
            Some(Report::Refused(topic, reason)) => {
                waiting.remove(&topic);
                eprintln!(
                    "cairn watch: {}/{} refused: {reason}",
                    topic.publisher, topic.topic
                );
            }
            Some(Report::Change(change)) => {
                let line = if json {
                    serde_json::to_string(&change)?
                } else {
                    human(&change)
                };
                // A closed pipe (`| head`) ends the watch quietly.
                if writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
    }
}

fn announce(watched: usize, absent: &[&str]) {
    if absent.is_empty() {
        eprintln!("cairn watch: watching {watched} topics; Ctrl-C to stop");
    } else {
        eprintln!(
            "cairn watch: watching {watched} topics ({} not published yet: {}); Ctrl-C to stop",
            absent.len(),
            absent.join(", ")
        );
    }
}

fn human(c: &Change) -> String {
    let time: DateTime<Local> = c.time.into();
    format!(
        "{}  {:<14} {:<21} {:<7} {}  {}",
        time.format("%H:%M:%S%.3f"),
        c.publisher,
        c.topic,
        c.change,
        if c.key.is_empty() { "-" } else { &c.key },
        c.summary
    )
}

/// Follows one topic, turning its events into [`Report`]s.
async fn follow<T: Topic + Summary>(
    bus: Bus,
    topic: KnownTopic,
    mut quiet: bool,
    tx: mpsc::Sender<Report>,
) {
    let mut sub = bus.subscribe::<T>(topic.publisher);
    let mut first_sync = true;
    let mut refused = false;
    loop {
        let event = sub.recv().await;
        let (change, key, value, summary) = match event {
            Event::Synchronized => {
                quiet = false;
                if std::mem::take(&mut first_sync) && tx.send(Report::Ready(topic)).await.is_err() {
                    return;
                }
                continue;
            }
            Event::Refused { reason } => {
                // Retried by the subscription at its backoff cap; said once.
                if !std::mem::replace(&mut refused, true)
                    && tx.send(Report::Refused(topic, reason)).await.is_err()
                {
                    return;
                }
                continue;
            }
            Event::Restarted => continue,
            Event::PublisherRestarted { epoch } => (
                "restart",
                String::new(),
                None,
                format!("publisher restarted (epoch {epoch})"),
            ),
            Event::Create { key, value } => {
                let summary = value.summary();
                ("create", key, Some(value), summary)
            }
            Event::Modify {
                key, new, skipped, ..
            } => {
                let mut summary = new.summary();
                if skipped > 0 {
                    summary.push_str(&format!(" ({skipped} intermediate values skipped)"));
                }
                ("modify", key, Some(new), summary)
            }
            Event::Delete { key, last } => {
                let summary = last.summary();
                ("delete", key, Some(last), summary)
            }
        };
        if quiet {
            continue;
        }
        let value = value
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or(serde_json::Value::Null);
        let change = Change {
            time: Utc::now(),
            publisher: topic.publisher,
            topic: topic.topic,
            change,
            key,
            summary,
            value,
        };
        if tx.send(Report::Change(change)).await.is_err() {
            return;
        }
    }
}

/// A one-line description of a value for the human output.
trait Summary {
    fn summary(&self) -> String;
}

fn error_suffix(error: &cairn_types::ErrorDescription) -> String {
    if error.is_error() {
        format!(" error: {}", error.error)
    } else {
        String::new()
    }
}

fn short(id: &uuid::Uuid) -> String {
    id.to_string().chars().take(8).collect()
}

impl Summary for DeviceStatus {
    fn summary(&self) -> String {
        let source = match &self.config_source {
            cairn_types::ConfigSource::None => "none".to_string(),
            cairn_types::ConfigSource::LocalFile { path } => format!("file {path}"),
            cairn_types::ConfigSource::Controller { url } => format!("controller {url}"),
            cairn_types::ConfigSource::Checkpoint => "checkpoint".to_string(),
        };
        format!(
            "config {source} hash {} apps {} volumes {} controller {}{}",
            self.last_config_hash
                .get(..12)
                .unwrap_or(&self.last_config_hash),
            self.apps,
            self.volumes,
            if self.controller_reachable {
                "reachable"
            } else {
                "unreachable"
            },
            error_suffix(&self.last_error)
        )
    }
}

impl Summary for AppInstanceConfig {
    fn summary(&self) -> String {
        format!(
            "{} v{} activate {} volumes {} snapshots {} (max {}) rollback #{}",
            self.display_name,
            self.uuid_and_version.version,
            self.activate,
            self.volume_ref_config_list.len(),
            self.snapshot.snapshots.len(),
            self.snapshot.max_snapshots,
            self.snapshot.rollback_cmd.counter
        )
    }
}

impl Summary for ContentTreeConfig {
    fn summary(&self) -> String {
        format!(
            "{} {} sha256 {} max {} B",
            self.display_name,
            self.format.eve_name(),
            self.content_sha256.chars().take(12).collect::<String>(),
            self.max_download_size
        )
    }
}

impl Summary for ContentTreeStatus {
    fn summary(&self) -> String {
        format!(
            "{} {:?} {}/{} B {}%{}",
            self.display_name,
            self.state,
            self.current_size,
            self.total_size,
            self.progress,
            error_suffix(&self.error)
        )
    }
}

impl Summary for VolumeConfig {
    fn summary(&self) -> String {
        format!(
            "{} {:?} max {} B{}",
            self.display_name,
            self.format,
            self.max_vol_size,
            if self.purgeable { " purgeable" } else { "" }
        )
    }
}

impl Summary for AppInstanceStatus {
    fn summary(&self) -> String {
        let s = &self.snap_status;
        format!(
            "{} v{} {:?} snapshots available {} requested {} to delete {}{}",
            self.display_name,
            self.uuid_and_version.version,
            self.state,
            s.available_snapshots.len(),
            s.requested_snapshots.len(),
            s.snapshots_to_be_deleted.len(),
            error_suffix(&self.error)
        )
    }
}

impl Summary for DomainConfig {
    fn summary(&self) -> String {
        format!(
            "{} v{} activate {} disks {} restart #{} purge #{}",
            self.display_name,
            self.uuid_and_version.version,
            self.activate,
            self.disk_config_list.len(),
            self.restart_counter,
            self.purge_counter
        )
    }
}

impl Summary for DomainStatus {
    fn summary(&self) -> String {
        let mut s = format!("{} {:?}", self.display_name, self.state);
        if let Some(pid) = self.pid {
            s.push_str(&format!(" pid {pid}"));
        }
        if self.paused {
            s.push_str(" paused");
        }
        if !self.exit_status.is_empty() {
            s.push_str(&format!(" ({})", self.exit_status));
        }
        s + &error_suffix(&self.error)
    }
}

impl Summary for DomainLiveOpConfig {
    fn summary(&self) -> String {
        format!("{:?} {} app {}", self.op, self.tag, short(&self.app_uuid))
    }
}

impl Summary for ExportStatus {
    fn summary(&self) -> String {
        let error = if self.error.is_empty() {
            String::new()
        } else {
            format!(" error: {}", self.error)
        };
        format!(
            "{:?} {:?} {}/{} bytes {}{error}",
            self.action,
            self.state,
            self.bytes_done,
            self.bytes_total,
            self.export_dir.display()
        )
    }
}

impl Summary for DomainLiveOpStatus {
    fn summary(&self) -> String {
        format!(
            "{:?} {} app {} {:?} {} ms{}",
            self.op,
            self.tag,
            short(&self.app_uuid),
            self.state,
            self.duration_ms,
            error_suffix(&self.error)
        )
    }
}

impl Summary for VolumesSnapshotConfig {
    fn summary(&self) -> String {
        format!(
            "{:?} app {} volumes {} request #{}",
            self.action,
            short(&self.app_uuid),
            self.volume_ids.len(),
            self.request_counter
        )
    }
}

impl Summary for VolumesSnapshotStatus {
    fn summary(&self) -> String {
        let mut s = format!(
            "{:?} app {} volumes {} request #{}",
            self.result_of_action,
            short(&self.app_uuid),
            self.volume_snapshot_meta.len(),
            self.request_counter
        );
        if self.is_in_progress() {
            s.push_str(&format!(" ({:?} in progress)", self.in_progress));
        }
        s + &error_suffix(&self.error)
    }
}

impl Summary for VolumeStatus {
    fn summary(&self) -> String {
        format!(
            "{} {:?} {:?} backend {:?} {} B{}{}",
            self.display_name,
            self.format,
            self.state,
            self.backend,
            self.current_size,
            self.pending_deletion
                .as_ref()
                .and_then(|p| p.delete_at)
                .map(|t| format!(" pending deletion at {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_default(),
            error_suffix(&self.error)
        )
    }
}

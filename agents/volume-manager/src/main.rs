//! cairn-volume-manager: the binary. Wires the core to the bus: `VolumeConfig` from the
//! config-agent, `VolumesSnapshotConfig` and `AppVolumeRefs` from the app-manager in,
//! `VolumeStatus` and `VolumesSnapshotStatus` out.

use std::collections::{BTreeSet, VecDeque};

use anyhow::Context;
use cairn_pubsub::{Event, Publication, PublishOptions};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use cairn_types::ConfigItemValueMap;
use cairn_types::export::{ExportConfig, ExportStatus};
use cairn_types::snapshot::{VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{AppVolumeRefs, VolumeConfig, VolumeStatus};
use cairn_volume_manager::disk_scan::{self, DiskScan};
use cairn_volume_manager::export::{ExportJobs, JobSource};
use cairn_volume_manager::manager::{AGENT, default_parallel_operations};
use cairn_volume_manager::{Publish, SnapshotEvent, Tools, VolumeManager};
use clap::Parser;

/// How often the volumes' sizes on disk are measured again.
const SIZE_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// How soon a publication that failed (its key file could not be written: a full or
/// read-only disk) is tried again; until then its subscribers wait for that answer.
const PUBLISH_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(about = "Cairn volume-manager: volumes and their snapshots")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Snapshot operations (on different volumes) run at once at most; default: the CPUs, at
    /// least 8.
    #[arg(long, env = "CAIRN_VOLUME_PARALLEL_OPERATIONS")]
    parallel_operations: Option<usize>,
}

struct Outputs {
    volumes: Publication<VolumeStatus>,
    snapshots: Publication<VolumesSnapshotStatus>,
    /// Whether the snapshot statuses passed their restart barrier (once per run).
    snapshots_restarted: bool,
    /// Publications that failed, in order, the newest per key: tried again after
    /// [`PUBLISH_RETRY`], so an answer is never lost to a passing disk fault.
    unsent: Vec<Publish>,
}

/// What a publication replaces: a later one of the same key makes an unsent one moot.
fn publish_key(action: &Publish) -> (u8, String) {
    match action {
        Publish::Volume(status) => (0, status.key()),
        Publish::UnpublishVolume(key) => (0, key.clone()),
        Publish::Snapshot(status) => (1, status.snapshot_id.to_string()),
        Publish::UnpublishSnapshot(key) => (1, key.clone()),
        Publish::SnapshotsReconciled => (2, String::new()),
    }
}

impl Outputs {
    async fn apply(&mut self, actions: Vec<Publish>) {
        self.publish(actions, false).await
    }

    /// Publishes `actions` in order; a failure is logged as an error the first time, then
    /// (`retrying`) at debug, so a read-only disk does not write a line every retry.
    async fn publish(&mut self, actions: Vec<Publish>, retrying: bool) {
        for action in actions {
            let key = publish_key(&action);
            self.unsent.retain(|unsent| publish_key(unsent) != key);
            let result = match action.clone() {
                Publish::Volume(status) => self.volumes.publish(status).await,
                Publish::UnpublishVolume(key) => self.volumes.unpublish(&key).await,
                // Republish: a repeated request must see its answer even if equal.
                Publish::Snapshot(status) => self.snapshots.republish(status).await,
                Publish::UnpublishSnapshot(key) => self.snapshots.unpublish(&key).await,
                Publish::SnapshotsReconciled if !self.snapshots_restarted => {
                    let signalled = self.snapshots.signal_restarted().await;
                    self.snapshots_restarted = signalled.is_ok();
                    signalled
                }
                Publish::SnapshotsReconciled => Ok(()),
            };
            if let Err(e) = result {
                if retrying {
                    tracing::debug!("publishing failed again: {e}");
                } else {
                    tracing::error!(
                        retry_s = PUBLISH_RETRY.as_secs(),
                        "publishing failed, tried again: {e}"
                    );
                }
                self.unsent.push(action);
            }
        }
    }

    /// Publishes again what failed; what fails again stays for the next try.
    async fn retry(&mut self) {
        let unsent = std::mem::take(&mut self.unsent);
        self.publish(unsent, true).await;
    }
}

fn main() -> anyhow::Result<()> {
    // One thread: the slow work runs on the blocking pool and in child processes; the
    // manager's task only plans and records.
    start(Threads::One, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Before the records are loaded and the volumes swept: a stop asked meanwhile is kept.
    let mut signals = StopSignals::install()?;
    let persist_dir = args.common.persist_dir.clone();
    let bus = args.common.bus(AGENT);
    // Technicians read the volumes and the export jobs.
    let status_access = args
        .common
        .technicians_gid
        .map(cairn_pubsub::Access::with_group_readers)
        .unwrap_or_default();
    let mut outputs = Outputs {
        // Persistent: a restarted agent must know which volumes it had, so that a volume file
        // deleted while it was down is reported, not silently recreated empty.
        volumes: bus
            .publish::<VolumeStatus>(PublishOptions {
                persistent: true,
                access: status_access.clone(),
                ..Default::default()
            })
            .await
            .context("publishing VolumeStatus")?,
        snapshots: bus
            .publish::<VolumesSnapshotStatus>(PublishOptions::for_requests())
            .await
            .context("publishing VolumesSnapshotStatus")?,
        snapshots_restarted: false,
        unsent: Vec::new(),
    };
    let tools = Tools::detect().await;
    let parallel = args
        .parallel_operations
        .unwrap_or_else(default_parallel_operations);
    let mut manager = VolumeManager::open(&persist_dir, tools, outputs.volumes.values())
        .await
        .with_parallel_operations(parallel)
        .with_volume_tasks();
    let mut volume_configs = bus.subscribe::<VolumeConfig>("config-agent");
    let mut snapshot_configs = bus.subscribe::<VolumesSnapshotConfig>("app-manager");
    let mut app_holds = bus.subscribe::<AppVolumeRefs>("app-manager");
    // The config items: the deletion grace of a volume that left the config.
    let mut config_items = bus.subscribe::<ConfigItemValueMap>("config-agent");
    // Volumes made from content trees wait for the downloader's verified blobs.
    let mut content_trees = bus.subscribe::<cairn_types::ContentTreeStatus>("downloader");
    // Export jobs: requested by `cairn`, run in tasks of their own.
    let export_statuses = bus
        .publish::<ExportStatus>(PublishOptions {
            access: status_access,
            ..Default::default()
        })
        .await
        .context("publishing ExportStatus")?;
    let mut export_configs = bus.subscribe::<ExportConfig>("cli");
    // Export requests in force: the config's (local file or controller) and the schedule's.
    let mut config_exports = bus.subscribe::<ExportConfig>("config-agent");
    let mut scheduled_exports = bus.subscribe::<ExportConfig>("app-manager");
    // Those whose remote's config has not arrived yet (both come from the same config, on
    // two topics), or whose snapshot is not taken yet: started when it is there.
    let mut waiting_for_remote: Vec<ExportConfig> = Vec::new();
    // The object-store remotes exports may go to.
    let mut remotes = bus.subscribe::<cairn_types::RemoteConfig>("config-agent");
    let (mut exports, mut export_updates) = ExportJobs::open(&persist_dir).await;
    exports.remember(export_statuses.values());
    tracing::info!(persist = %persist_dir.display(), records = manager.records().count(), parallel, "volume-manager started");

    // Snapshot requests wait until the volumes are known.
    let mut volumes_synced = false;
    let mut volumes_restarted = false;
    let mut queued: VecDeque<Event<VolumesSnapshotConfig>> = VecDeque::new();
    let mut size_refresh = tokio::time::interval(SIZE_REFRESH);
    size_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disk_scan = DiskScan::new();

    loop {
        // Woken at the next deletion deadline; at least each minute, against clock jumps.
        let deletion_due = manager.next_deletion().map(|at| {
            ((at - chrono::Utc::now()).to_std().unwrap_or_default()
                + std::time::Duration::from_millis(10))
            .min(std::time::Duration::from_secs(60))
        });
        tokio::select! {
            event = config_items.recv() => {
                let actions = match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                        disk_scan.set_period(disk_scan::interval(Some(&value)));
                        manager.handle_config_items(Some(&value)).await
                    }
                    Event::Delete { .. } => {
                        disk_scan.set_period(disk_scan::interval(None));
                        manager.handle_config_items(None).await
                    }
                    _ => Vec::new(),
                };
                outputs.apply(actions).await;
            }
            event = content_trees.recv() => {
                let actions = match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                        let id = value.content_id;
                        manager.handle_content_tree(Some(value), id).await
                    }
                    Event::Delete { last, .. } => {
                        manager.handle_content_tree(None, last.content_id).await
                    }
                    _ => Vec::new(),
                };
                outputs.apply(actions).await;
            }
            _ = tokio::time::sleep(deletion_due.unwrap_or_default()), if deletion_due.is_some() => {
                outputs.apply(manager.handle_deletion_due().await).await;
            }
            event = volume_configs.recv() => {
                let actions = match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                        manager.handle_volume_config(value).await
                    }
                    Event::Delete { key, .. } => manager.handle_volume_config_delete(&key).await,
                    Event::Synchronized => {
                        volumes_synced = true;
                        if !volumes_restarted {
                            volumes_restarted = true;
                            // Volumes of a previous run no longer configured (and not kept by a
                            // snapshot) go now.
                            let unconfigured: Vec<VolumeStatus> = outputs
                                .volumes
                                .values()
                                .into_iter()
                                .filter(|s| volume_configs.get(&s.key()).is_none())
                                .collect();
                            let actions = manager.adopt_unconfigured(unconfigured).await;
                            outputs.apply(actions).await;
                            if let Err(e) = outputs.volumes.signal_restarted().await {
                                tracing::error!("{e}");
                            }
                        }
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                outputs.apply(actions).await;
                while volumes_synced && let Some(event) = queued.pop_front() {
                    let actions = submit_snapshot_event(&mut manager, &snapshot_configs, event).await;
                    outputs.apply(actions).await;
                }
            }
            event = snapshot_configs.recv() => {
                if !volumes_synced {
                    queued.push_back(event);
                    continue;
                }
                let actions = submit_snapshot_event(&mut manager, &snapshot_configs, event).await;
                outputs.apply(actions).await;
            }
            done = manager.operation_done(), if manager.operations_running() => {
                let actions = manager.complete(done).await;
                outputs.apply(actions).await;
                // A snapshot taken: the standing exports that waited for it start.
                for config in std::mem::take(&mut waiting_for_remote) {
                    let event = Event::Create {
                        key: config.job_id.to_string(),
                        value: config,
                    };
                    standing_export(event, &manager, &remotes, &mut exports, &mut waiting_for_remote);
                }
            }
            event = app_holds.recv() => {
                let actions = match event {
                    Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                        manager.handle_app_volume_refs(value).await
                    }
                    Event::Delete { last, .. } => {
                        manager.handle_app_volume_refs_delete(last.app_uuid).await
                    }
                    Event::Restarted => manager.handle_app_volume_refs_complete().await,
                    Event::PublisherRestarted { .. } => {
                        manager.handle_app_volume_refs_restarting();
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                outputs.apply(actions).await;
            }
            event = export_configs.recv() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    let mut source = export_source(&manager, &value);
                    source.remote = remotes.get(&value.remote).cloned();
                    exports.handle_config(value, source);
                }
                Event::Delete { key, .. } => exports.handle_config_delete(&key),
                _ => {}
            },
            event = config_exports.recv() => {
                standing_export(event, &manager, &remotes, &mut exports, &mut waiting_for_remote);
            }
            event = scheduled_exports.recv() => {
                standing_export(event, &manager, &remotes, &mut exports, &mut waiting_for_remote);
            }
            event = remotes.recv() => {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } = event {
                    exports.handle_remote(&value);
                    let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting_for_remote)
                        .into_iter()
                        .partition(|c| c.remote == value.id);
                    waiting_for_remote = still;
                    for config in ready {
                        let mut source = export_source(&manager, &config);
                        source.remote = Some(value.clone());
                        exports.handle_config(config, source);
                    }
                    let actions = manager.handle_remote(value).await;
                    outputs.apply(actions).await;
                }
            }
            Some(mut status) = export_updates.recv() => {
                exports.note(&mut status);
                if let Err(e) = export_statuses.publish(status).await {
                    tracing::error!("publishing ExportStatus: {e}");
                }
            }
            _ = tokio::time::sleep(PUBLISH_RETRY), if !outputs.unsent.is_empty() => {
                outputs.retry().await;
            }
            _ = size_refresh.tick() => {
                outputs.apply(manager.refresh_sizes().await).await;
            }
            _ = tokio::time::sleep_until(disk_scan.due().unwrap_or_else(tokio::time::Instant::now)), if disk_scan.due().is_some() => {
                disk_scan.start(manager.directory_volumes());
            }
            sizes = disk_scan.finished(), if disk_scan.due().is_none() => {
                outputs.apply(manager.apply_sizes(sizes)).await;
            }
            _ = signals.recv() => break,
        }
    }
    if manager.operations_running() {
        // Their intent records are on disk: the next start resumes them, as after a crash.
        tracing::info!("snapshot operations still running are resumed at the next start");
    }
    tracing::info!("volume-manager stopping");
    Ok(())
}

/// An export request that stays in force (the config's or the schedule's): started once its
/// remote is known; withdrawn, cancelled if it runs.
fn standing_export(
    event: Event<ExportConfig>,
    manager: &VolumeManager,
    remotes: &cairn_pubsub::Subscription<cairn_types::RemoteConfig>,
    exports: &mut ExportJobs,
    waiting: &mut Vec<ExportConfig>,
) {
    match event {
        Event::Create { value, .. } | Event::Modify { new: value, .. } => {
            waiting.retain(|c| c.job_id != value.job_id);
            let remote = remotes.get(&value.remote).cloned();
            if remote.is_none() && !value.remote.is_empty() && !value.cancel {
                tracing::info!(job = %value.job_id, remote = %value.remote, "export waits for its remote's config");
                waiting.push(value);
                return;
            }
            // The config asks before the app-manager has taken the snapshot: wait for it.
            let taken = manager
                .record(value.snapshot_id)
                .is_some_and(|r| !r.is_in_progress());
            if !taken && !value.cancel {
                tracing::info!(job = %value.job_id, snapshot = %value.snapshot_id, "export waits for its snapshot");
                waiting.push(value);
                return;
            }
            let mut source = export_source(manager, &value);
            source.remote = remote;
            exports.handle_config(value, source);
        }
        Event::Delete { key, .. } => {
            waiting.retain(|c| c.job_id.to_string() != key);
            exports.handle_config_delete(&key);
        }
        _ => {}
    }
}

/// The snapshot record and volume names an export job needs, from the manager's state.
fn export_source(manager: &VolumeManager, config: &ExportConfig) -> JobSource {
    let record = manager.record(config.snapshot_id).cloned();
    let volume_names = record
        .iter()
        .flat_map(|r| r.volume_snapshot_meta.keys())
        .filter_map(|id| {
            let meta = record.as_ref()?.meta_of(*id)?;
            let status = manager.volume_status(&meta.volume_key)?;
            Some((*id, status.display_name.clone()))
        })
        .collect();
    JobSource {
        record,
        volume_names,
        remote: None,
    }
}

/// Queues a snapshot event in the manager, in arrival order.
async fn submit_snapshot_event(
    manager: &mut VolumeManager,
    subscription: &cairn_pubsub::Subscription<VolumesSnapshotConfig>,
    event: Event<VolumesSnapshotConfig>,
) -> Vec<Publish> {
    let event = match event {
        Event::Create { value, .. } | Event::Modify { new: value, .. } => {
            SnapshotEvent::Request(value)
        }
        Event::Delete { last, .. } => SnapshotEvent::Withdrawn(last.snapshot_id),
        Event::Synchronized => {
            let requested: BTreeSet<_> = subscription.values().map(|c| c.snapshot_id).collect();
            SnapshotEvent::Synchronized(requested)
        }
        _ => return Vec::new(),
    };
    manager.submit(event).await
}

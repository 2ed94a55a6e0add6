//! cairn-volume-manager: the binary. Wires the core to the bus: `VolumeConfig` from the
//! config-agent, `VolumesSnapshotConfig` and `AppVolumeRefs` from the app-manager in,
//! `VolumeStatus` and `VolumesSnapshotStatus` out.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;

use anyhow::Context;
use cairn_pubsub::{Bus, Event, Publication, PublishOptions};
use cairn_types::ConfigItemValueMap;
use cairn_types::export::{ExportConfig, ExportStatus};
use cairn_types::snapshot::{VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{AppVolumeRefs, VolumeConfig, VolumeStatus};
use cairn_volume_manager::export::{ExportJobs, JobSource};
use cairn_volume_manager::manager::AGENT;
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use clap::Parser;
use uuid::Uuid;

/// How often the volumes' sizes on disk are measured again.
const SIZE_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(about = "Cairn volume-manager: volumes and their snapshots")]
struct Args {
    /// Persistent root (volumes, snapshot records).
    #[arg(long, env = "CAIRN_PERSIST_DIR", default_value = "/persist")]
    persist_dir: PathBuf,
    /// Run root (bus sockets).
    #[arg(long, env = "CAIRN_RUN_DIR", default_value = "/run/cairn")]
    run_dir: PathBuf,
    /// A group whose members may read the volumes' status (technicians).
    #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
    technicians_gid: Option<u32>,
}

struct Outputs {
    volumes: Publication<VolumeStatus>,
    snapshots: Publication<VolumesSnapshotStatus>,
}

impl Outputs {
    async fn apply(&self, actions: Vec<Publish>) {
        for action in actions {
            let result = match action {
                Publish::Volume(status) => self.volumes.publish(status).await,
                Publish::UnpublishVolume(key) => self.volumes.unpublish(&key).await,
                // Republish: a repeated request must see its answer even if equal.
                Publish::Snapshot(status) => self.snapshots.republish(status).await,
                Publish::UnpublishSnapshot(key) => self.snapshots.unpublish(&key).await,
            };
            if let Err(e) = result {
                tracing::error!("publishing failed: {e}");
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let bus = Bus::new(AGENT, &args.run_dir, &args.persist_dir);
    // Technicians read the volumes and the export jobs.
    let status_access = args
        .technicians_gid
        .map(cairn_pubsub::Access::with_group_readers)
        .unwrap_or_default();
    let outputs = Outputs {
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
    };
    let tools = Tools::detect().await;
    let mut manager = VolumeManager::open(&args.persist_dir, tools, outputs.volumes.values()).await;
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
    let (mut exports, mut export_updates) = ExportJobs::open(&args.persist_dir).await;
    tracing::info!(persist = %args.persist_dir.display(), records = manager.records().count(), "volume-manager started");

    // Snapshot requests wait until the volumes are known.
    let mut volumes_synced = false;
    let mut volumes_restarted = false;
    let mut snapshots_restarted = false;
    let mut queued: VecDeque<Event<VolumesSnapshotConfig>> = VecDeque::new();
    let mut size_refresh = tokio::time::interval(SIZE_REFRESH);
    size_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

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
                        manager.handle_config_items(Some(&value)).await
                    }
                    Event::Delete { .. } => manager.handle_config_items(None).await,
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
                    let was = snapshots_restarted;
                    let actions = handle_snapshot_event(&mut manager, &snapshot_configs, event, &mut snapshots_restarted).await;
                    outputs.apply(actions).await;
                    if !was && snapshots_restarted && let Err(e) = outputs.snapshots.signal_restarted().await {
                        tracing::error!("{e}");
                    }
                }
            }
            event = snapshot_configs.recv() => {
                if !volumes_synced {
                    queued.push_back(event);
                    continue;
                }
                let was = snapshots_restarted;
                let actions = handle_snapshot_event(&mut manager, &snapshot_configs, event, &mut snapshots_restarted).await;
                outputs.apply(actions).await;
                if !was && snapshots_restarted && let Err(e) = outputs.snapshots.signal_restarted().await {
                    tracing::error!("{e}");
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
                    let source = export_source(&manager, &value);
                    exports.handle_config(value, source);
                }
                Event::Delete { key, .. } => exports.handle_config_delete(&key),
                _ => {}
            },
            Some(status) = export_updates.recv() => {
                exports.note(&status);
                if let Err(e) = export_statuses.publish(status).await {
                    tracing::error!("publishing ExportStatus: {e}");
                }
            }
            _ = size_refresh.tick() => {
                outputs.apply(manager.refresh_sizes().await).await;
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("volume-manager stopping");
    Ok(())
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
    }
}

async fn handle_snapshot_event(
    manager: &mut VolumeManager,
    subscription: &cairn_pubsub::Subscription<VolumesSnapshotConfig>,
    event: Event<VolumesSnapshotConfig>,
    restarted: &mut bool,
) -> Vec<Publish> {
    match event {
        Event::Create { value, .. } | Event::Modify { new: value, .. } => {
            manager.handle_snapshot_config(value).await
        }
        Event::Delete { last, .. } => {
            manager
                .handle_snapshot_config_delete(last.snapshot_id)
                .await
        }
        Event::Synchronized => {
            let requested: BTreeSet<Uuid> = subscription.values().map(|c| c.snapshot_id).collect();
            let actions = manager.reconcile(&requested).await;
            *restarted = true;
            actions
        }
        _ => Vec::new(),
    }
}

//! Putting a config in force: the config-agent's three publications and the local file source.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cairn_pubsub::{Access, Bus, BusError, Publication, PublishOptions, Topic};
use cairn_types::{
    AppInstanceConfig, BaseOsConfig, ConfigItemValueMap, ConfigSource, ContentTreeConfig,
    DeviceStatus, EdgeviewConfig, ErrorDescription, ErrorSeverity, ExportConfig, RemoteConfig,
    VolumeConfig,
};
use chrono::Utc;

use cairn_persist::digest::sha256_hex;

use crate::model::{self, DeviceConfig};
use crate::watch::FileWatch;

/// What the config-agent publishes.
pub struct Publications {
    pub apps: Publication<AppInstanceConfig>,
    pub volumes: Publication<VolumeConfig>,
    /// Content trees to download, each with its datastores (EVE `contentInfo`, `datastores`).
    pub content_trees: Publication<ContentTreeConfig>,
    /// The config items in force (EVE's `ConfigItemValueMap`), e.g. the volume deletion grace.
    pub items: Publication<ConfigItemValueMap>,
    /// Object-store remotes (issue 22), for the volume-manager's exports.
    pub remotes: Publication<RemoteConfig>,
    /// Exports of snapshots the config asks for, for the volume-manager.
    pub exports: Publication<ExportConfig>,
    /// EdgeView's token and policies, for the edgeview agent (absent: EdgeView off).
    pub edgeview: Publication<EdgeviewConfig>,
    /// The base OS to run (EVE's `baseos`), for the baseos-manager.
    pub baseos: Publication<BaseOsConfig>,
    pub device: Publication<DeviceStatus>,
}

impl Publications {
    /// `technicians`: a group allowed to read the device status (the config topics stay
    /// between agents). `tenant_readers`: `(tenant, gid)` groups whose members may read it too,
    /// as tenant technicians (the device status belongs to no tenant, so they all read it).
    pub async fn open(
        bus: &Bus,
        technicians: Option<u32>,
        tenant_readers: &[(String, u32)],
    ) -> Result<Self, BusError> {
        let status_access = technicians
            .map(Access::with_group_readers)
            .unwrap_or_default()
            .with_tenant_readers(tenant_readers.iter().cloned());
        Ok(Self {
            apps: bus.publish(PublishOptions::for_requests()).await?,
            volumes: bus.publish(PublishOptions::for_requests()).await?,
            content_trees: bus.publish(PublishOptions::for_requests()).await?,
            items: bus.publish(PublishOptions::for_requests()).await?,
            remotes: bus.publish(PublishOptions::for_requests()).await?,
            exports: bus.publish(PublishOptions::for_requests()).await?,
            edgeview: bus.publish(PublishOptions::for_requests()).await?,
            baseos: bus.publish(PublishOptions::for_requests()).await?,
            device: bus
                .publish(PublishOptions {
                    access: status_access,
                    ..Default::default()
                })
                .await?,
        })
    }

    /// Publishes `config` as a whole: its items first (a grace period that comes with a volume's
    /// removal applies to it), content trees (volumes are made from them), volumes (apps refer
    /// to them), then apps; keys no longer in the config are removed.
    pub async fn apply(&self, config: &DeviceConfig) -> Result<(), BusError> {
        self.items
            .publish(ConfigItemValueMap {
                items: config.config_items.clone(),
            })
            .await?;
        replace(&self.remotes, &config.remotes).await?;
        replace(&self.content_trees, &config.content_trees).await?;
        replace(&self.volumes, &config.volumes).await?;
        replace(&self.apps, &config.apps).await?;
        // After the remotes they name and the apps whose snapshots they export.
        replace(&self.exports, &config.exports).await?;
        replace(&self.edgeview, config.edgeview.as_slice()).await?;
        // After the content trees: the bundle's tree is asked for before the request needs it.
        replace(&self.baseos, config.baseos.as_slice()).await?;
        Ok(())
    }

    pub async fn status(&self, status: DeviceStatus) -> Result<(), BusError> {
        self.device.publish(status).await
    }

    /// After the first config is in force: keys reloaded from before a restart and not
    /// published again are removed.
    pub async fn restarted(&self) -> Result<(), BusError> {
        self.items.signal_restarted().await?;
        self.remotes.signal_restarted().await?;
        self.content_trees.signal_restarted().await?;
        self.volumes.signal_restarted().await?;
        self.apps.signal_restarted().await?;
        self.exports.signal_restarted().await?;
        self.edgeview.signal_restarted().await?;
        self.baseos.signal_restarted().await?;
        self.device.signal_restarted().await
    }
}

async fn replace<T: Topic>(publication: &Publication<T>, values: &[T]) -> Result<(), BusError> {
    let keep: BTreeSet<String> = values.iter().map(Topic::key).collect();
    for value in values {
        publication.publish(value.clone()).await?;
    }
    for key in publication.keys() {
        if !keep.contains(&key) {
            publication.unpublish(&key).await?;
        }
    }
    Ok(())
}

/// How soon a config that could not be put on the bus is applied again.
const APPLY_RETRY: Duration = Duration::from_secs(2);

/// Follows the local config file: applies it at start and whenever its content changes. An
/// unreadable or invalid file changes nothing but the device status, which says why.
///
/// The kernel says when the file changed (an inotify watch on its directory); `safety_net` is
/// a slow re-read besides, for what inotify cannot see (a symlink's target changed, a
/// network file system, a watch that could not be set up).
pub async fn follow_local_file(
    publications: &Publications,
    path: &Path,
    safety_net: Duration,
    persist: &Path,
) -> Result<(), BusError> {
    let source = ConfigSource::LocalFile {
        path: path.display().to_string(),
    };
    let mut status = DeviceStatus {
        config_source: source,
        ..agent_health(persist).await
    };
    let mut applied_hash: Option<String> = None;
    let mut first = true;
    let mut watch = start_watch(path);
    loop {
        let outcome = read_local(path).await;
        match outcome {
            Ok((hash, _)) if applied_hash.as_deref() == Some(hash.as_str()) => {}
            Ok((hash, config)) => {
                if let Err(e) = publications.apply(&config).await {
                    // The bus's files could not be written (a full or failing run file
                    // system): said in the status, the whole config applied again shortly.
                    let message = format!(
                        "config {hash} from {} could not be put on the bus: {e}; the previous config may stay in force for some apps (applied again every {} s)",
                        path.display(),
                        APPLY_RETRY.as_secs()
                    );
                    if status.last_error.error != message {
                        tracing::error!("{message}");
                        status.last_error =
                            ErrorDescription::new(message, ErrorSeverity::Error, Utc::now());
                        if let Err(e) = publications.status(status.clone()).await {
                            tracing::warn!("the device status could not be published: {e}");
                        }
                    }
                    tokio::time::sleep(APPLY_RETRY).await;
                    continue;
                }
                if first {
                    publications.restarted().await?;
                    first = false;
                }
                tracing::info!(file = %path.display(), apps = config.apps.len(), volumes = config.volumes.len(), "config applied");
                status.last_config_hash = hash.clone();
                status.last_config_time = Some(Utc::now());
                status.apps = config.apps.len() as u32;
                status.volumes = config.volumes.len() as u32;
                status.device_name = config.device_name.clone();
                status.last_error = ErrorDescription::default();
                publications.status(status.clone()).await?;
                applied_hash = Some(hash);
            }
            Err((hash, message)) => {
                if status.last_error.error != message {
                    tracing::warn!(file = %path.display(), "config refused, the previous one stays in force: {message}");
                    status.last_error =
                        ErrorDescription::new(message, ErrorSeverity::Error, Utc::now());
                    publications.status(status.clone()).await?;
                }
                // Remember the refused content: going back to the content in force is then a
                // change, which clears the error.
                applied_hash = hash.or(applied_hash);
            }
        }
        watch = wait_for_change(watch, path, safety_net).await;
    }
}

fn start_watch(path: &Path) -> Option<FileWatch> {
    match FileWatch::new(path) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(file = %path.display(), "{e}; re-reading the file on the safety-net interval only");
            None
        }
    }
}

/// Waits until the watch names the file or the safety net is due; returns the watch to use
/// next (a new one after the old one ended, or after a safety-net pass without one).
async fn wait_for_change(
    watch: Option<FileWatch>,
    path: &Path,
    safety_net: Duration,
) -> Option<FileWatch> {
    let Some(mut watch) = watch else {
        tokio::time::sleep(safety_net).await;
        return start_watch(path);
    };
    tokio::select! {
        changed = watch.changed() => match changed {
            Ok(()) => Some(watch),
            Err(e) => {
                tracing::warn!(file = %path.display(), "{e}; watching again");
                // Re-armed before the caller re-reads, so nothing between the two is missed.
                start_watch(path)
            }
        },
        _ = tokio::time::sleep(safety_net) => Some(watch),
    }
}

/// The file's hash and config, or (its hash if it could be read, why it was refused).
async fn read_local(path: &Path) -> Result<(String, DeviceConfig), (Option<String>, String)> {
    let bytes = tokio::fs::read(path).await.map_err(|e| {
        (
            None,
            format!("config file {}: cannot read it: {e}", path.display()),
        )
    })?;
    let hash = sha256_hex(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| {
        (
            Some(hash.clone()),
            format!("config file {}: not UTF-8", path.display()),
        )
    })?;
    let config = model::from_local_json(&text).map_err(|e| {
        let at = if e.path.is_empty() { ":" } else { " at" };
        (
            Some(hash.clone()),
            format!("config file {} refused{at} {e}", path.display()),
        )
    })?;
    Ok((hash, config))
}

/// A `DeviceStatus` carrying the config-agent's own health and the device's identity.
pub async fn agent_health(persist: &Path) -> DeviceStatus {
    let persist = persist.to_path_buf();
    let identity = tokio::task::spawn_blocking(move || device_identity(&persist))
        .await
        .unwrap_or_default();
    DeviceStatus {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        agent_pid: std::process::id(),
        agent_started: Some(Utc::now()),
        ..identity
    }
}

/// The machine's serial number from its firmware, readable by root only.
pub const PRODUCT_SERIAL: &str = "/sys/class/dmi/id/product_serial";

/// What names this device to a technician: the serial given at onboarding (else the
/// machine's, as EVE registers with it), the machine's own serial, the host name. What cannot
/// be read stays empty. Blocking (small file reads).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn device_identity(persist: &Path) -> DeviceStatus {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let product_serial = read(Path::new(PRODUCT_SERIAL));
    let onboarded = read(&crate::identity::dir(persist).join(crate::identity::SERIAL));
    DeviceStatus {
        serial: if onboarded.is_empty() {
            product_serial.clone()
        } else {
            onboarded
        },
        product_serial,
        host_name: read(Path::new("/proc/sys/kernel/hostname")),
        ..Default::default()
    }
}

/// The default safety-net interval of the local file: inotify says when it changes, this
/// re-read only catches what inotify cannot see.
pub const LOCAL_SAFETY_NET: Duration = Duration::from_secs(30);

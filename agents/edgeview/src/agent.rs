//! The edgeview agent: follows the config-agent's `EdgeviewConfig`, checks its token
//! (`token::check`), runs one session per instance the token allows (`session`), answers their
//! commands from its bus tables (`query`) and publishes `EdgeviewStatus` (EVE's counts, plus
//! the connections up and the fault, if any, by name). A new config, a new `generation_id` or
//! the token's expiry ends the sessions (EVE's edge-view-init kills and restarts edge-view
//! then); the agent itself keeps nothing on disk, so after a kill it comes back to the same
//! config and connects again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_pubsub::{Access, Bus, BusError, PublishOptions};
use cairn_types::{
    AppInstanceStatus, ConfigItemValueMap, ContentTreeStatus, DeviceStatus, EdgeviewConfig,
    EdgeviewStatus, LogManagerStatus, VolumeStatus,
};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::query::{self, View};
use crate::session::{self, SessionEvent, SessionSettings};
use crate::token;

pub struct Settings {
    pub persist: PathBuf,
    pub run: PathBuf,
    pub hostname: String,
    pub technicians_gid: Option<u32>,
    /// The first reconnect delay (doubling up to `max_backoff`).
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

/// Runs until `shutdown` resolves; returns only on a bus failure.
pub async fn run(
    bus: &Bus,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BusError> {
    let access = settings
        .technicians_gid
        .map(Access::with_group_readers)
        .unwrap_or_default();
    let status_pub = bus
        .publish::<EdgeviewStatus>(PublishOptions {
            access,
            ..Default::default()
        })
        .await?;
    let mut configs = bus.subscribe::<EdgeviewConfig>("config-agent");
    let mut device = bus.subscribe::<DeviceStatus>("config-agent");
    let mut items = bus.subscribe::<ConfigItemValueMap>("config-agent");
    let mut apps = bus.subscribe::<AppInstanceStatus>("app-manager");
    let mut volumes = bus.subscribe::<VolumeStatus>("volume-manager");
    let mut trees = bus.subscribe::<ContentTreeStatus>("downloader");
    let mut logs = bus.subscribe::<LogManagerStatus>("log-manager");
    let (events_tx, mut events) = mpsc::channel::<SessionEvent>(16);
    let mut running: Option<Running> = None;
    let mut applied: Option<EdgeviewConfig> = None;
    let mut status = EdgeviewStatus::default();
    let mut published: Option<EdgeviewStatus> = None;
    let mut restarted = false;
    tokio::pin!(shutdown);
    loop {
        let expiry = running.as_ref().map(|r| r.expires);
        tokio::select! {
            _ = &mut shutdown => break,
            _ = configs.recv() => {}
            _ = device.recv() => {}
            _ = items.recv() => {}
            _ = apps.recv() => {}
            _ = volumes.recv() => {}
            _ = trees.recv() => {}
            _ = logs.recv() => {}
            _ = sleep_until_unix(expiry.unwrap_or(u64::MAX)), if expiry.is_some() => {
                if let Some(r) = running.take() {
                    r.stop();
                }
                let e = token::TokenError::Expired { exp: status.expire_on, ago: 0 };
                tracing::warn!("{e}: the edgeview sessions end");
                status = EdgeviewStatus { last_error: e.to_string(), ..Default::default() };
            }
            Some(event) = events.recv() => match event {
                SessionEvent::Connected { instance } => {
                    if let Some(r) = running.as_mut() {
                        r.up.insert(instance);
                        status.connected = r.up.len() as u32;
                        status.last_error.clear();
                    }
                }
                SessionEvent::Disconnected { instance, reason } => {
                    if let Some(r) = running.as_mut() {
                        r.up.remove(&instance);
                        status.connected = r.up.len() as u32;
                        status.last_error = format!("dispatcher {}: {reason}", r.dispatcher);
                    }
                }
                SessionEvent::Command { cmd, reply, .. } => {
                    status.cmd_count_dev += 1;
                    let view = View {
                        device: device.values().next().cloned(),
                        items: items.values().next().cloned(),
                        apps: apps.values().cloned().collect(),
                        volumes: volumes.values().cloned().collect(),
                        content_trees: trees.values().cloned().collect(),
                        logs: logs.values().next().cloned(),
                        edgeview: Some(status.clone()),
                        logs_dir: settings.run.join("logs"),
                    };
                    // Log search reads files: off the runtime.
                    tokio::spawn(async move {
                        let answer = tokio::task::spawn_blocking(move || query::answer(&cmd, &view))
                            .await
                            .unwrap_or_else(|e| format!("the command failed: {e}\n"));
                        let _ = reply.send(answer);
                    });
                }
            },
        }
        if configs.is_synchronized() {
            // Acted on once per config: a refused or expired token is not checked again at
            // every bus event, and a new one (or a new generation) replaces it.
            let wanted = configs.values().next().cloned();
            if wanted != applied {
                if let Some(r) = running.take() {
                    r.stop();
                }
                status = match &wanted {
                    None => EdgeviewStatus::default(),
                    Some(config) => match start(config, &settings, &events_tx).await {
                        Ok(r) => {
                            let s = EdgeviewStatus {
                                expire_on: r.expires,
                                started_on: Some(Utc::now()),
                                instances: r.handles.len() as u32,
                                ..Default::default()
                            };
                            running = Some(r);
                            s
                        }
                        Err(e) => {
                            tracing::error!("edgeview config refused: {e}");
                            EdgeviewStatus {
                                last_error: e,
                                ..Default::default()
                            }
                        }
                    },
                };
                applied = wanted;
            }
        }
        if published.as_ref() != Some(&status) {
            status_pub.publish(status.clone()).await?;
            published = Some(status.clone());
        }
        if !restarted && configs.is_synchronized() {
            status_pub.signal_restarted().await?;
            restarted = true;
        }
    }
    if let Some(r) = running.take() {
        r.stop();
    }
    Ok(())
}

struct Running {
    dispatcher: String,
    expires: u64,
    handles: Vec<JoinHandle<()>>,
    up: BTreeSet<u8>,
}

impl Running {
    fn stop(self) {
        for handle in self.handles {
            handle.abort();
        }
    }
}

async fn start(
    config: &EdgeviewConfig,
    settings: &Settings,
    events: &mpsc::Sender<SessionEvent>,
) -> Result<Running, String> {
    let now = Utc::now().timestamp().max(0) as u64;
    let token = token::check(
        &config.jw_token,
        &config.signing_cert_pem,
        &config.device_uuid,
        now,
    )
    .map_err(|e| e.to_string())?;
    let persist = settings.persist.clone();
    // The device's root, as the controller link trusts it; none on a device without one.
    let root = tokio::task::spawn_blocking(move || {
        cairn_controller_client::link::ControllerLink::read(&persist)
            .map(|link| link.root_pem)
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    let tls = Arc::new(session::tls_config(&root, &config.disp_cert_pem)?);
    let token = Arc::new(token);
    tracing::info!(
        dispatcher = %token.host_port,
        instances = token.instances().len(),
        expires = token.claims.exp,
        "edgeview token in force"
    );
    let handles = token
        .instances()
        .into_iter()
        .map(|instance| {
            let session = SessionSettings {
                token: token.clone(),
                instance,
                tls: tls.clone(),
                hostname: settings.hostname.clone(),
                dev_allowed: config.dev_policy.enabled,
                first_backoff: settings.first_backoff,
                max_backoff: settings.max_backoff,
            };
            tokio::spawn(session::run(session, events.clone()))
        })
        .collect();
    Ok(Running {
        dispatcher: token.host_port.clone(),
        expires: token.claims.exp,
        handles,
        up: BTreeSet::new(),
    })
}

async fn sleep_until_unix(at: u64) {
    let now = Utc::now().timestamp().max(0) as u64;
    tokio::time::sleep(Duration::from_secs(at.saturating_sub(now)) + Duration::from_millis(500))
        .await;
}

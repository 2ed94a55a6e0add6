//! The agent (EVE's baseosmgr + zboot's commit): reports both root slots on the bus
//! (`BaseOsStatus`), and after a trial boot commits the running slot once the other agents are
//! up with their topics synchronized and the config source was reached during this boot, all
//! within a deadline; otherwise it marks the trial failed, keeps the reason on `/persist` and
//! reboots into the committed slot. Booted in the old slot again, it reports the failed update
//! with that reason (or, when the new slot never got as far as this agent, the try counter's).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, PublishOptions};
use cairn_readout::readout::{Roots, device_view};
use cairn_types::{BaseOsSlot, BaseOsStatus, ConfigSource, DeviceStatus, UpdateOutcome};
use chrono::{DateTime, Utc};

use crate::bootstate::{BootState, Slot};
use crate::disk::BootDisk;

pub const AGENT: &str = "baseos-manager";

/// How the initramfs booted this device (its CAIRN_BOOT_* variables).
#[derive(Debug, Clone)]
pub struct Boot {
    pub disk: PathBuf,
    pub slot: Slot,
    /// `committed`, `trial` or `fallback`.
    pub mode: String,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub persist: PathBuf,
    pub run: PathBuf,
    /// None outside an A/B boot disk (a bare root image, or agents on a development machine).
    pub boot: Option<Boot>,
    /// A trial boot that is not healthy by then is rolled back.
    pub trial_deadline: Duration,
    /// Ask PID 1 (the image's init) for a reboot after a failed trial.
    pub reboot: bool,
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

    tokio::pin!(shutdown);
    if let Some(boot) = settings.boot.clone().filter(|b| b.mode == "trial") {
        // Restarted after the verdict (a kill between it and the reboot): keep it.
        let disk = BootDisk::partitions_of(&boot.disk);
        let state = tokio::task::spawn_blocking(move || BootState::read(&disk.state)).await??;
        let judged = if state.committed == boot.slot {
            Some(Ok(Duration::ZERO))
        } else if state.failed == Some(boot.slot) {
            Some(Err(status
                .last_update
                .clone()
                .map(|o| o.reason)
                .unwrap_or_else(|| {
                    "the trial failed earlier in this boot".into()
                })))
        } else {
            tokio::select! {
                verdict = judge_trial(&settings) => Some(verdict),
                () = &mut shutdown => None,
            }
        };
        match judged {
            Some(Ok(waited)) => {
                let s = settings.clone();
                let status =
                    tokio::task::spawn_blocking(move || commit(&s, &boot, waited)).await??;
                statuses.publish(status).await?;
            }
            Some(Err(reason)) => {
                let s = settings.clone();
                let status =
                    tokio::task::spawn_blocking(move || roll_back(&s, &boot, &reason)).await??;
                statuses.publish(status).await?;
                if settings.reboot {
                    tracing::warn!("rebooting into the committed slot");
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(1),
                        nix::sys::signal::Signal::SIGTERM,
                    )?;
                }
            }
            None => return Ok(()),
        }
    }
    shutdown.await;
    Ok(())
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
    cairn_persist::create_dir_durable(&persist.join("baseos"))?;
    cairn_persist::store(&outcome_path(persist), outcome)?;
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

//! cairn-app-manager: application lifecycle and the snapshot state machine.
//!
//! `machine` holds the decisions, pure and unit-tested; `agent` is the executor that carries its
//! actions out over the bus and on disk.

pub mod agent;
pub mod clock;
pub mod guest_agent;
pub mod hooks;
pub mod live;
pub mod machine;

use cairn_types::{
    AppInstanceStatus, ErrorDescription, ErrorSeverity, SnapshotInstanceStatus, SnapshottingStatus,
    SwState,
};
use chrono::{DateTime, Utc};
use machine::{AppState, Phase, SnapshotRecord, SnapshotState};

/// The record of one snapshot as EVE writes it (`snapshotInstanceStatus.json`).
pub fn snapshot_instance_status(
    state: &AppState,
    record: &SnapshotRecord,
) -> SnapshotInstanceStatus {
    let config_version = record
        .config
        .as_ref()
        .map(|c| c.uuid_and_version.clone())
        .unwrap_or_else(|| state.version().clone());
    SnapshotInstanceStatus {
        snapshot: record.desc.clone(),
        reported: false,
        time_triggered: record.time_triggered,
        time_created: record.time_created,
        app_instance_id: state.app,
        config_version,
        error: record
            .error
            .as_ref()
            .map(|e| {
                ErrorDescription::new(
                    e.clone(),
                    ErrorSeverity::Error,
                    record.time_triggered.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                )
            })
            .unwrap_or_default(),
        tenant: state.controller.tenant.clone(),
        pause_ms: live::pause_ms(state, record.id()),
    }
}

/// What the app-manager publishes about the app.
pub fn app_status(state: &AppState) -> AppInstanceStatus {
    let mut snap = SnapshottingStatus {
        max_snapshots: state.controller.snapshot.max_snapshots,
        active_snapshot: state.controller.snapshot.active_snapshot.clone(),
        rollback_in_progress: state.local.is_some() && state.phase != Phase::Idle,
        ..Default::default()
    };
    let mut warnings = state.warnings.clone();
    for record in &state.snapshots {
        let status = snapshot_instance_status(state, record);
        match record.state {
            // A failed snapshot stays listed with its error, so the controller and the
            // technician see why it is missing.
            SnapshotState::Requested | SnapshotState::Triggered | SnapshotState::Failed => {
                snap.requested_snapshots.push(status)
            }
            SnapshotState::Available => snap.available_snapshots.push(status),
            SnapshotState::PendingDeletion => {
                snap.snapshots_to_be_deleted.push(record.desc.clone())
            }
            // Still to be deleted, and why the last attempt failed (EVE's gap 2 lost this).
            SnapshotState::DeletionFailed => {
                snap.snapshots_to_be_deleted.push(record.desc.clone());
                warnings.push(format!(
                    "deleting snapshot {} failed: {}; it is tried again at the next deactivation of the app",
                    record.id(),
                    record.error.as_deref().unwrap_or("no reason given")
                ));
            }
            SnapshotState::Dropped => {}
        }
    }
    let state_now = match (&state.phase, state.domain_active) {
        (Phase::Starting, _) => SwState::Booting,
        (Phase::Stopping, _) => SwState::Halting,
        // A live snapshot is taken while the app runs.
        (Phase::Volume { .. }, true) if state.live.is_some() => SwState::Running,
        (Phase::Volume { .. } | Phase::Group { .. }, _) => SwState::Halted,
        (Phase::Idle | Phase::Hook { .. }, true) => SwState::Running,
        (Phase::Hook { .. }, false) => SwState::Halted,
        (Phase::Idle, false) => SwState::Halted,
    };
    // An app held by a failure is broken, and says why and what comes next.
    let held = machine::restart::retry_condition(state);
    let state_now = match &held {
        Some(_) if !state.domain_active && state.phase == Phase::Idle => SwState::Broken,
        _ if state.start_delayed_until.is_some()
            && !state.domain_active
            && state.phase == Phase::Idle =>
        {
            SwState::StartDelayed
        }
        _ => state_now,
    };
    let failure_error =
        |f: &machine::Failure| ErrorDescription::new(f.reason.clone(), ErrorSeverity::Error, f.at);
    let error = match (&state.error, &state.failure, held) {
        (Some(e), _, _) => {
            ErrorDescription::new(e.clone(), ErrorSeverity::Error, DateTime::<Utc>::UNIX_EPOCH)
        }
        (None, Some(failure), Some(retry)) => ErrorDescription {
            error_retry_condition: retry,
            ..failure_error(failure)
        },
        _ => ErrorDescription::default(),
    };
    AppInstanceStatus {
        uuid_and_version: state.version().clone(),
        display_name: state.effective().display_name.clone(),
        state: state_now,
        activated: state.domain_active,
        snap_status: snap,
        error,
        warnings,
        tenant: state.controller.tenant.clone(),
        restarts: state.restarts,
        // When the domain was last seen running after a start (EVE: `bootTime`).
        boot_time: state.started_at.filter(|_| state.domain_active),
        last_failure: state
            .failure
            .as_ref()
            .map(failure_error)
            .unwrap_or_default(),
        domain_kind: domain_kind(state.effective()).into(),
        virtualization_mode: virtualization_mode(state.effective()),
        volume_refs: state.effective().volume_ref_config_list.clone(),
    }
}

/// How the app runs, in the read-outs' words; empty when it cannot run as configured.
fn domain_kind(config: &cairn_types::AppInstanceConfig) -> &'static str {
    use cairn_types::DomainSpec;
    match config.domain {
        Some(DomainSpec::Vm(_)) => "vm",
        Some(DomainSpec::Container(_)) => "container",
        Some(DomainSpec::Process(_)) => "process",
        None => "",
    }
}

/// EVE's name of the app's virtualization mode: the controller's, else what the local kind
/// is in EVE's terms (a KVM VM with virtio devices is HVM, a container NOHYPER); a process has
/// none.
fn virtualization_mode(config: &cairn_types::AppInstanceConfig) -> String {
    use cairn_types::DomainSpec;
    match &config.domain {
        Some(DomainSpec::Vm(_)) | Some(DomainSpec::Container(_))
            if !config.virtualization_mode.is_empty() =>
        {
            config.virtualization_mode.clone()
        }
        Some(DomainSpec::Vm(_)) => "HVM".into(),
        Some(DomainSpec::Container(_)) => "NOHYPER".into(),
        Some(DomainSpec::Process(_)) | None => String::new(),
    }
}

//! The app-manager's decisions for one app, as a pure function:
//! `step(state, input, now) → (state', actions)`. No I/O: the executor carries the actions out in
//! order, and the first action is always [`Action::Persist`], so every intent is on disk before
//! anything acts on it. After a restart the executor loads the state and feeds [`Input::Resume`],
//! which re-issues whatever the current phase is waiting for.
//!
//! Rules, in EVE's terms:
//! - a snapshot is Requested when it appears in the config; an IMMEDIATE one is triggered at once
//!   (stop, take, start), an APP_UPDATE one at the next upgrade or purge, with the config that
//!   was in use before the change;
//! - volume snapshot operations run only while the domain is inactive; deletions are deferred to
//!   the next deactivation and are never a reason to stop the app;
//! - `max_snapshots` deletes the oldest available snapshots first, then drops the newest requests,
//!   with a warning;
//! - a rollback (rollback counter increased) replaces the controller's config by the snapshot's,
//!   fixed up with the current snapshot list and counters, until the controller sends a new
//!   version; a repeated rollback to the same snapshot is a new request (new request counter);
//! - a purge is a purge counter increase or a new generation of a volume the app runs on: the
//!   app's APP_UPDATE snapshots are taken of the old generation, then the app restarts on the new
//!   one. The old generation is held ([`AppState::volumes_in_use`]) until nothing of the app
//!   needs it, then released to the volume-manager, which keeps it only for a snapshot that
//!   lives in it (qcow2 internal, purgeable: the whole volume) and rolls the app back onto it by
//!   the restored config;
//! - a bare purge (purge counter up, the controller's generation of a volume unchanged) gives
//!   each volume a new *local generation* ([`AppState::local_generations`], EVE's
//!   `LocalGenerationCounter`): its key becomes `<uuid>#<gen>.<local>`, a volume the controller
//!   never configured. The new local generation is in the state persisted before anything acts
//!   on it; the executor's holds (`AppVolumeRefs`) name the new key, which is how the
//!   volume-manager learns to make it (from the config of `<uuid>#<gen>`); from then on it is a
//!   generation change like the controller's: snapshots of the old keys, restart on the new,
//!   old released. Local generations only grow, so a key once left is never reused fresh;
//! - a sound snapshot found on disk that the state does not track (EVE's records, or a lost state
//!   file) is imported as available when the config lists it, under the same `max_snapshots`.
//!
//! Beyond EVE, the policy in the snapshot config runs here (`machine/policy.rs`; the consistency
//! groups' barriers are `machine/groups.rs`), at [`Input::Tick`]s the executor feeds at
//! [`next_wakeup`]:
//! - a due schedule takes a *scheduled* (device-originated) snapshot like an IMMEDIATE one
//!   (stop, take, start; no stop when the app is inactive), with the executor's fresh id and a
//!   name from the policy's pattern. The controller's list does not decide its fate: its
//!   expiry and the retention do (and `max_snapshots`, as for any snapshot);
//! - due times are counted from [`ScheduleState::last_due`], persisted: due times that passed
//!   while the device was off give one snapshot at the next tick, not one each; a new schedule
//!   (or a state from before schedules) starts counting when it is first seen. A due time is
//!   skipped while the app is deactivated (unless `schedule_when_stopped`) or while a
//!   scheduled snapshot is still being taken; it waits while the app's volumes are not ready;
//! - before a scheduled snapshot is taken, expired snapshots and scheduled ones the retention
//!   does not keep (over the scheduled available ones plus the new one) become pending
//!   deletions; deletions run first in the stop window, so a full disk does not block the
//!   schedule. Expiry also applies at any tick (a snapshot's own `expiry_seconds`, else the
//!   policy's for scheduled ones); like every deletion it waits for the next deactivation.

use std::collections::{BTreeMap, BTreeSet};

use cairn_types::{
    AppInstanceConfig, SnapshotDesc, SnapshotType, VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

mod delay;
mod groups;
mod policy;
mod quiesce;
pub mod restart;
pub use groups::{coordinate, group_of};
use groups::{group_abort, group_done, group_go};
use policy::{Which, on_tick, sync_schedule};
pub use policy::{next_wakeup, scheduled_exports};
pub use quiesce::{HookKind, HookRequest, QuiesceStage, SnapshotOutcome};
pub use restart::{Failure, domain_restart_counter};

pub mod shared;
mod state;
pub use shared::SharedConfig;
pub use state::*;

/// One decision: the new state and what to do, `Persist` first and `Status` last.
pub fn step(mut state: AppState, input: Input, now: DateTime<Utc>) -> (AppState, Vec<Action>) {
    let mut actions = Vec::new();
    let volumes_before = volume_keys(state.effective());
    sync_schedule(&mut state, now);
    match input {
        Input::Config(config) => on_config(&mut state, config, now),
        Input::Domain { active } => on_domain(&mut state, active, now),
        Input::DomainBroken {
            version,
            restart_counter,
            reason,
            clean_exit,
        } => restart::on_broken(
            &mut state,
            restart_counter,
            &version,
            reason,
            clean_exit,
            now,
        ),
        Input::CannotStart { reason } => restart::cannot_start(&mut state, reason, now),
        Input::Volumes { ready } => state.volumes_ready = ready,
        Input::VolumesResult(result) => on_volumes_result(&mut state, result, now, &mut actions),
        Input::Resume => {
            quiesce::on_resume(&mut state);
            resume(&state, &mut actions)
        }
        Input::Import(found) => import(&mut state, *found),
        Input::Boot { ready_at } => delay::on_boot(&mut state, ready_at, now),
        Input::Tick { new_id } => {
            restart::on_tick(&mut state, now);
            on_tick(&mut state, new_id, now)
        }
        Input::GroupGo { at } => group_go(&mut state, at, &mut actions),
        Input::GroupDone => group_done(&mut state, &mut actions),
        Input::GroupAbort { snapshot, reason } => group_abort(&mut state, snapshot, reason),
        Input::LiveOpResult(result) => crate::live::on_result(&mut state, result),
        Input::Hook {
            snapshot,
            kind,
            counter,
            failure,
            note,
        } => quiesce::on_hook_result(&mut state, snapshot, kind, counter, failure, note),
    }
    crate::live::settle(&mut state);
    // A policy that came with a config starts counting now.
    sync_schedule(&mut state, now);
    // Other volumes (a purge's new generation, a rollback's old one): not ready until the
    // executor says they are, so the app never starts on a volume that is not there yet.
    if volume_keys(state.effective()) != volumes_before {
        state.volumes_ready = false;
    }
    advance(&mut state, now, &mut actions);
    actions.insert(0, Action::Persist);
    actions.push(Action::Status);
    (state, actions)
}

fn on_config(state: &mut AppState, config: AppInstanceConfig, now: DateTime<Utc>) {
    let before_version = state.controller.uuid_and_version.version.clone();
    let before_domain = state.effective().domain.clone();
    // The controller names its generations; the local ones are this app-manager's.
    let mut config = config;
    stamp(&mut config, &state.local_generations);
    // The same config again (every config at a restart) stays the one the running domain and
    // the snapshots share.
    if *state.controller != config {
        state.controller = SharedConfig::new(config);
    }
    // A new version from the controller ends a rollback's override.
    if state.local.is_some()
        && state.local_over.as_deref() != Some(&state.controller.uuid_and_version.version)
    {
        state.local = None;
        state.local_over = None;
    }
    if let Some(local) = &mut state.local {
        fix_up(local.make_mut(), &state.controller);
    }
    // A new generation of a volume the app runs on is a purge too (the controller's way of
    // asking for fresh volumes). Decided before a rollback below changes the config in force.
    let regenerated = state
        .running
        .as_ref()
        .is_some_and(|running| volume_keys(running) != volume_keys(state.effective()));

    let wanted: Vec<SnapshotDesc> = state.controller.snapshot.snapshots.clone();
    let wanted_ids: BTreeSet<Uuid> = wanted.iter().map(|d| d.snapshot_id).collect();
    // An id the snapshot's own expiry deleted is not taken again while the config lists it.
    state.expired.retain(|id| wanted_ids.contains(id));
    for desc in wanted {
        if state.snapshot(desc.snapshot_id).is_some() || state.expired.contains(&desc.snapshot_id) {
            continue;
        }
        state.snapshots.push(SnapshotRecord {
            desc: desc.clone(),
            state: SnapshotState::Requested,
            time_triggered: None,
            time_created: None,
            config: None,
            error: None,
            scheduled: false,
            due: None,
        });
        if desc.snapshot_type == SnapshotType::Immediate {
            trigger(state, desc.snapshot_id, now);
        }
    }
    // Snapshots gone from the config: never taken ones are forgotten, taken ones deleted at
    // the next deactivation. Scheduled ones were never in it: their policy decides.
    state.snapshots.retain(|s| {
        wanted_ids.contains(&s.id())
            || s.scheduled
            || !matches!(
                s.state,
                SnapshotState::Requested | SnapshotState::Dropped | SnapshotState::Failed
            )
    });
    for record in &mut state.snapshots {
        if !wanted_ids.contains(&record.id())
            && !record.scheduled
            && record.state == SnapshotState::Available
        {
            record.state = SnapshotState::PendingDeletion;
        }
    }
    // The rollback refers to the snapshots the controller saw: decide it before the limit
    // pushes any out (a snapshot being rolled back to is deleted only after its rollback).
    let rollback = state.controller.snapshot.rollback_cmd.counter;
    let rolled_back = rollback > state.handled_rollback;
    if rolled_back {
        state.handled_rollback = rollback;
        request_rollback(state);
    }
    enforce_max(state);

    let counted = state.controller.purge_cmd.counter > state.handled_purge;
    let purge = counted || regenerated;
    if counted {
        // Fresh volumes: the new keys are in the state persisted before any action, and the
        // holds published after it ask the volume-manager for them.
        next_local_generations(state);
    }
    let restart = state.controller.restart_cmd.counter > state.handled_restart;
    state.handled_purge = state.controller.purge_cmd.counter;
    state.handled_restart = state.controller.restart_cmd.counter;
    // An upgrade is a new version from the controller (a rollback's version is not one).
    let upgrade =
        state.running.is_some() && state.controller.uuid_and_version.version != before_version;
    if upgrade || purge {
        // APP_UPDATE snapshots capture the config in use before the change.
        let waiting: Vec<Uuid> = state
            .snapshots
            .iter()
            .filter(|s| {
                s.state == SnapshotState::Requested
                    && s.desc.snapshot_type == SnapshotType::AppUpdate
            })
            .map(SnapshotRecord::id)
            .collect();
        for id in waiting {
            trigger(state, id, now);
        }
    }
    if (upgrade || purge || restart) && state.running.is_some() {
        state.restart_wanted = true;
    }
    // The controller asked for a new start (a new version, a purge, a restart, a rollback):
    // a failed app tries again at once; one no longer activated forgets its failure.
    let respecified = state.effective().domain != before_domain;
    if upgrade || purge || restart || rolled_back || respecified {
        restart::release(state);
    }
    restart::on_deactivated(state);
}

/// A purge by the counter: each volume of the config in force gets its next local generation,
/// unless the controller gives it a new generation in the same change (that one is fresh
/// already). When the app runs on nothing, every volume does. Local generations only grow: the
/// next one is above both the recorded one and the one the config in force names (a rollback's
/// config may name an older one).
fn next_local_generations(state: &mut AppState) {
    let running: Option<BTreeMap<Uuid, i64>> = state.running.as_ref().map(|c| {
        c.volume_ref_config_list
            .iter()
            .map(|r| (r.volume_id, r.generation_counter))
            .collect()
    });
    let refs: Vec<(Uuid, i64, i64)> = state
        .effective()
        .volume_ref_config_list
        .iter()
        .map(|r| {
            (
                r.volume_id,
                r.generation_counter,
                r.local_generation_counter,
            )
        })
        .collect();
    for (volume, generation, local) in refs {
        if running
            .as_ref()
            .is_some_and(|running| running.get(&volume) != Some(&generation))
        {
            continue;
        }
        let recorded = state
            .local_generations
            .get(&volume)
            .filter(|l| l.generation == generation)
            .map_or(0, |l| l.local);
        state.local_generations.insert(
            volume,
            LocalGeneration {
                generation,
                local: recorded.max(local) + 1,
            },
        );
    }
    stamp(state.controller.make_mut(), &state.local_generations);
    if let Some(local) = &mut state.local {
        stamp(local.make_mut(), &state.local_generations);
    }
}

/// Puts the recorded local generations on a config's volume refs of the same controller
/// generation (never lowering one the config already names).
fn stamp(config: &mut AppInstanceConfig, locals: &BTreeMap<Uuid, LocalGeneration>) {
    for r in &mut config.volume_ref_config_list {
        if let Some(l) = locals.get(&r.volume_id)
            && l.generation == r.generation_counter
        {
            r.local_generation_counter = r.local_generation_counter.max(l.local);
        }
    }
}

/// Adopts a snapshot found on disk. Only one the config lists: the controller's list decides
/// which snapshots exist, and one it does not list would be deleted at once; such records are
/// left on disk, with a warning, for a technician to look at. The limit applies as to any new
/// available snapshot: the oldest available go first.
fn import(state: &mut AppState, found: FoundSnapshot) {
    let id = found.desc.snapshot_id;
    if state.snapshot(id).is_some() || state.expired.contains(&id) {
        return;
    }
    let listed = state
        .controller
        .snapshot
        .snapshots
        .iter()
        .find(|d| d.snapshot_id == id)
        .cloned();
    let Some(desc) = listed else {
        let note = format!(
            "snapshot {id} found on disk is not in the app's snapshot list: kept on disk, not imported"
        );
        if !state.warnings.contains(&note) {
            state.warnings.push(note);
        }
        return;
    };
    state.snapshots.insert(
        0,
        SnapshotRecord {
            desc,
            state: SnapshotState::Available,
            time_triggered: found.time_triggered,
            time_created: found.time_created,
            config: Some(SharedConfig::new(found.config)),
            error: None,
            scheduled: false,
            due: None,
        },
    );
    enforce_max(state);
}

/// A domain found running that this state never started (its state file was lost) is adopted as
/// running the config in force, so its request is published again and it is not stopped as a
/// stale one at the restart barrier.
fn on_domain(state: &mut AppState, active: bool, now: DateTime<Utc>) {
    state.domain_active = active;
    if active && state.running.is_none() && state.phase == Phase::Idle {
        state.running = Some(state.effective_shared().clone());
    }
    restart::on_domain(state, active, now);
}

/// Queues the taking of a snapshot with the config in use now.
fn trigger(state: &mut AppState, id: Uuid, now: DateTime<Utc>) {
    let config = state
        .running
        .clone()
        .unwrap_or_else(|| state.effective_shared().clone());
    if let Some(record) = state.snapshot_mut(id) {
        record.state = SnapshotState::Triggered;
        record.time_triggered = Some(now);
        record.config = Some(config);
    }
    state.steps.push_back(Step::Create(id));
}

fn request_rollback(state: &mut AppState) {
    let target = state.controller.snapshot.active_snapshot.clone();
    let found = target.parse::<Uuid>().ok().and_then(|id| {
        state
            .snapshot(id)
            .filter(|s| s.state == SnapshotState::Available)
            .and_then(|s| s.config.clone().map(|c| (id, c)))
    });
    let Some((id, mut config)) = found else {
        state.warnings.push(format!(
            "rollback to {target:?} refused: it is not an available snapshot of this app"
        ));
        return;
    };
    fix_up(config.make_mut(), &state.controller);
    state.local_over = Some(state.controller.uuid_and_version.version.clone());
    state.local = Some(config);
    state.steps.push_back(Step::Rollback(id));
    state.restart_wanted = true;
}

/// A snapshot's config in force now keeps the controller's current snapshot list, counters
/// and activation (EVE's fixupAppInstanceConfig).
fn fix_up(local: &mut AppInstanceConfig, controller: &AppInstanceConfig) {
    local.snapshot = controller.snapshot.clone();
    local.restart_cmd = controller.restart_cmd.clone();
    local.purge_cmd = controller.purge_cmd.clone();
    local.local_restart_cmd = controller.local_restart_cmd.clone();
    local.local_purge_cmd = controller.local_purge_cmd.clone();
    local.activate = controller.activate;
}

/// Oldest available snapshots are deleted first, then the newest requests dropped. As in EVE,
/// `max_snapshots` 0 keeps no snapshot at all (not "no limit"): each one goes, with a warning
/// that says so.
fn enforce_max(state: &mut AppState) {
    let max = state.controller.snapshot.max_snapshots as usize;
    let why = if max == 0 {
        "max_snapshots is 0, which keeps no snapshot (EVE's meaning); raise it to keep snapshots"
            .to_string()
    } else {
        format!("at most {max} snapshots are kept")
    };
    loop {
        let counted = state.snapshots.iter().filter(|s| s.counts()).count();
        if counted <= max {
            return;
        }
        let oldest_available = state
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == SnapshotState::Available)
            .min_by_key(|(_, s)| s.time_created)
            .map(|(i, _)| i);
        if let Some(i) = oldest_available {
            let record = &mut state.snapshots[i];
            record.state = SnapshotState::PendingDeletion;
            let note = format!("snapshot {} will be deleted: {why}", record.id());
            state.warnings.push(note);
            continue;
        }
        let newest_request = state
            .snapshots
            .iter()
            .rposition(|s| s.state == SnapshotState::Requested);
        match newest_request {
            Some(i) => {
                let record = &mut state.snapshots[i];
                record.state = SnapshotState::Dropped;
                let note = format!("snapshot {} dropped: {why}", record.id());
                state.warnings.push(note);
            }
            // Only snapshots being taken remain: they finish, the limit applies after.
            None => return,
        }
    }
}

fn on_volumes_result(
    state: &mut AppState,
    result: VolumesSnapshotStatus,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
) {
    let Phase::Volume { step, counter } = state.phase.clone() else {
        return; // not waiting for anything: a stale or repeated answer
    };
    if result.snapshot_id != step.snapshot() || result.request_counter != counter {
        return;
    }
    let failed = result.error.is_error() || !result.volume_errors.is_empty();
    // The summary and each volume's cause (the file, the errno), so the status says what to fix.
    let reason = result
        .error
        .is_error()
        .then(|| result.error.error.clone())
        .into_iter()
        .chain(
            result
                .volume_errors
                .iter()
                .map(|(volume, e)| format!("volume {volume}: {e}")),
        )
        .collect::<Vec<_>>()
        .join("; ");
    let id = step.snapshot();
    let in_config = wanted(state, id);
    if let Some(group) = group_of(state, step) {
        let app = state.app;
        state.steps.retain(|s| *s != step);
        state.phase = Phase::Idle;
        match (step, failed) {
            // Taken: wait at the second barrier, domain down, not available yet.
            (_, false) => {
                if let Step::Rollback(_) = step {
                    state.error = None;
                }
                if let Some(record) = state.snapshot_mut(id)
                    && record.time_created.is_none()
                {
                    record.time_created = Some(result.time_created.unwrap_or(now));
                }
                state.phase = Phase::Group { step, done: true };
            }
            (Step::Create(_), true) => {
                if let Some(record) = state.snapshot_mut(id) {
                    record.state = SnapshotState::Failed;
                    record.time_created = None;
                    record.error = Some(format!("group {group} failed at member {app}: {reason}"));
                }
            }
            (_, true) => {
                state.error = Some(format!(
                    "rollback to snapshot {id} (group {group}) failed: {reason}"
                ));
                state.local = None;
                state.local_over = None;
            }
        }
        return;
    }
    match step {
        Step::Create(_) => {
            if let Some(record) = state.snapshot_mut(id) {
                if failed {
                    record.state = SnapshotState::Failed;
                    record.error = Some(reason);
                } else {
                    record.state = if in_config {
                        SnapshotState::Available
                    } else {
                        SnapshotState::PendingDeletion
                    };
                    record.time_created = Some(result.time_created.unwrap_or(now));
                    actions.push(Action::WriteSnapshot(id));
                }
            }
            if !failed {
                crate::live::volumes_taken(state, step, &result);
            }
            enforce_max(state);
        }
        Step::Delete(_) => {
            if failed {
                if let Some(record) = state.snapshot_mut(id) {
                    record.state = SnapshotState::DeletionFailed;
                    record.error = Some(reason);
                }
            } else {
                // A group snapshot undone because another member failed stays listed as
                // Failed, with the reason; its volumes and records are gone.
                state
                    .snapshots
                    .retain(|s| s.id() != id || s.state == SnapshotState::Failed);
                actions.push(Action::RemoveSnapshot(id));
            }
        }
        Step::Rollback(_) => {
            if failed {
                state.error = Some(format!("rollback to snapshot {id} failed: {reason}"));
                state.local = None;
                state.local_over = None;
            } else {
                state.error = None;
                crate::live::rolled_back(state, id);
            }
        }
    }
    state.phase = Phase::Idle;
    state.steps.retain(|s| *s != step);
}

/// After a restart: ask again for what the phase waits on. The domain and volume answers that
/// may have been lost come back; answers that did arrive are matched by request counter.
fn resume(state: &AppState, actions: &mut Vec<Action>) {
    match &state.phase {
        Phase::Idle => {}
        Phase::Stopping => actions.push(domain_action(state, false)),
        Phase::Starting => actions.push(domain_action(state, true)),
        Phase::Volume { step, counter } => actions.push(volumes_action(state, *step, *counter)),
        // The executor coordinates the group again once every app has resumed.
        Phase::Group { .. } => {}
        // Only a `post` is left here ([`quiesce::on_resume`] failed an interrupted `pre`).
        Phase::Hook { .. } => {
            if let Some(request) = quiesce::hook_request(state) {
                actions.push(Action::RunHook(Box::new(request)));
            }
        }
    }
}

/// Whether snapshot `id`, just taken, is still wanted: listed by the controller's config, or
/// scheduled (never listed: its policy decides its fate). An unwanted one becomes a pending
/// deletion.
fn wanted(state: &AppState, id: Uuid) -> bool {
    state
        .controller
        .snapshot
        .snapshots
        .iter()
        .any(|d| d.snapshot_id == id)
        || state.snapshot(id).is_some_and(|s| s.scheduled)
}

/// Drives the work forward as far as it can go without waiting.
fn advance(state: &mut AppState, now: DateTime<Utc>, actions: &mut Vec<Action>) {
    // The domain request in force still asks it to run (it broke while running).
    let asked_to_run = matches!(state.domain_request(), Some((true, _)));
    match state.phase {
        Phase::Volume { .. } | Phase::Group { .. } | Phase::Hook { .. } => return,
        Phase::Stopping if state.domain_active => return,
        Phase::Starting if !state.domain_active => return,
        Phase::Stopping => {
            // A new deactivation: deletions that failed at an earlier one are tried again
            // (never twice in one inactive window, so a lasting fault cannot loop).
            for record in &mut state.snapshots {
                if record.state == SnapshotState::DeletionFailed {
                    record.state = SnapshotState::PendingDeletion;
                }
            }
        }
        Phase::Starting | Phase::Idle => {}
    }
    state.phase = Phase::Idle;
    // A settled snapshot's `post` hook (a thaw) comes before anything else.
    if quiesce::thaw(state, actions) {
        return;
    }
    // A live or stateful create in progress goes on while the domain runs.
    match crate::live::go_on(state) {
        crate::live::Next::Usual => {}
        crate::live::Next::Wait => return,
        crate::live::Next::Volume(step) => return start_step(state, step, actions),
    }

    let has_work = !state.steps.is_empty() || state.restart_wanted;
    if state.domain_active {
        // A snapshot's `pre` hook runs while the app still runs, so it can flush.
        if quiesce::freeze_before_stop(state, actions) {
            return;
        }
        // A live or stateful create at the head of the queue needs no stop.
        match crate::live::take(state) {
            crate::live::Next::Usual => {}
            crate::live::Next::Wait => return,
            crate::live::Next::Volume(step) => return start_step(state, step, actions),
        }
        // Steps need the domain inactive; so does a config that no longer wants it running.
        if has_work || !state.effective().activate {
            state.phase = Phase::Stopping;
            actions.push(domain_action(state, false));
        }
        return;
    }
    // Inactive: the moment for deferred deletions, then the queued steps, then the start.
    state.start_delayed_until = None;
    queue_deletions(state);
    if let Some(step) = state.steps.front().copied() {
        if quiesce::freeze_before_step(state, step, actions) {
            return;
        }
        if group_of(state, step).is_some() {
            // The other members must be stopped too before anything is taken or rolled back.
            state.phase = Phase::Group { step, done: false };
            return;
        }
        start_step(state, step, actions);
        return;
    }
    state.restart_wanted = false;
    if state.effective().activate && state.volumes_ready {
        // A failure holds the start until its backoff passed, or the controller asks.
        if !restart::may_start(state) {
            return;
        }
        // The first starts of a boot wait out the app's start delay.
        if let Some(until) = delay::holds(state, now) {
            state.start_delayed_until = Some(until);
            return;
        }
        restart::starting(state);
        state.running = Some(state.effective_shared().clone());
        state.phase = Phase::Starting;
        actions.push(domain_action(state, true));
    } else if !state.effective().activate {
        // A domain that broke is inactive already, but its request must say stopped too, or
        // a restarted domain-manager would start what the config stops.
        if asked_to_run && !state.domain_active {
            actions.push(domain_action(state, false));
        }
        state.running = None;
    }
}

/// Asks the volume-manager for `step`, with a new request counter.
fn start_step(state: &mut AppState, step: Step, actions: &mut Vec<Action>) {
    state.request_counter += 1;
    state.phase = Phase::Volume {
        step,
        counter: state.request_counter,
    };
    actions.push(volumes_action(state, step, state.request_counter));
}

/// Deletions go first in an inactive window (they free space for what follows), except that a
/// snapshot still to be rolled back to is kept until its rollback has run.
fn queue_deletions(state: &mut AppState) {
    let due: Vec<Uuid> = state
        .snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::PendingDeletion)
        .map(SnapshotRecord::id)
        .filter(|id| !state.steps.contains(&Step::Rollback(*id)))
        .collect();
    for id in due.into_iter().rev() {
        if !state.steps.contains(&Step::Delete(id)) {
            state.steps.push_front(Step::Delete(id));
        }
    }
}

fn domain_action(state: &AppState, activate: bool) -> Action {
    Action::Domain {
        activate,
        config: Box::new(AppInstanceConfig::clone(
            state
                .running
                .as_deref()
                .unwrap_or_else(|| state.effective()),
        )),
    }
}

fn volumes_action(state: &AppState, step: Step, counter: u64) -> Action {
    let config = match step {
        // A snapshot covers the volumes of the config it belongs to.
        Step::Create(id) | Step::Rollback(id) | Step::Delete(id) => state
            .snapshot(id)
            .and_then(|s| s.config.clone())
            .unwrap_or_else(|| state.effective_shared().clone()),
    };
    let refs = &config.volume_ref_config_list;
    Action::Volumes(VolumesSnapshotConfig {
        snapshot_id: step.snapshot(),
        action: step.action(),
        volume_ids: refs.iter().map(|v| v.volume_id).collect(),
        app_uuid: state.app,
        request_counter: counter,
        // The generation the snapshot's config uses: after a purge, the pre-purge one.
        volume_keys: refs.iter().map(|v| (v.volume_id, ref_key(v))).collect(),
        live: crate::live::is_live_step(state, step),
        // Named by the executor, which knows the run directory the container's name comes from.
        freeze_cgroup: String::new(),
    })
}

/// The volume key a ref names: its id at its controller and local generations.
pub fn ref_key(volume: &cairn_types::VolumeRefConfig) -> String {
    cairn_types::volume::volume_key_local(
        volume.volume_id,
        volume.generation_counter,
        volume.local_generation_counter,
    )
}

/// The volume keys a config names.
pub fn volume_keys(config: &AppInstanceConfig) -> BTreeSet<String> {
    config.volume_ref_config_list.iter().map(ref_key).collect()
}

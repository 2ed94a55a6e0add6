//! Consistency groups: the barriers that make one snapshot of several apps.
//!
//! A group snapshot is one snapshot per member app, each listing the same `group_id`. Each
//! member's machine stops its app as for an IMMEDIATE snapshot, then waits in [`Phase::Group`]
//! before its create (first barrier) and after it (second barrier); [`coordinate`], over every
//! app's state, tells the members when to go on. A rollback to a grouped snapshot waits at the
//! same barriers, so no member starts on the restored config before every member is restored.
//! Everything a barrier decides on is in the persisted states, so a restart resumes the group
//! where it stood (a create in flight is asked again, like any other).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::policy::{Which, schedule_key};
use super::{Action, AppState, Input, Phase, SnapshotState, Step, enforce_max, start_step, wanted};

/// The consistency group of a step's snapshot: creates and rollbacks of grouped snapshots wait
/// for the other members; deletions never do.
pub fn group_of(state: &AppState, step: Step) -> Option<Uuid> {
    match step {
        Step::Create(id) | Step::Rollback(id) => state
            .snapshot(id)
            .map(|s| s.desc.group_id)
            .filter(|g| !g.is_nil()),
        Step::Delete(_) => None,
    }
}

pub(super) fn group_go(state: &mut AppState, at: DateTime<Utc>, actions: &mut Vec<Action>) {
    let Phase::Group { step, done: false } = state.phase else {
        return;
    };
    if let Step::Create(id) = step
        && let Some(record) = state.snapshot_mut(id)
    {
        record.time_created = Some(at);
    }
    start_step(state, step, actions);
}

pub(super) fn group_done(state: &mut AppState, actions: &mut Vec<Action>) {
    let Phase::Group { step, done: true } = state.phase else {
        return;
    };
    state.phase = Phase::Idle;
    if let Step::Create(id) = step {
        let in_config = wanted(state, id);
        if let Some(record) = state.snapshot_mut(id)
            && record.state == SnapshotState::Triggered
        {
            record.state = if in_config {
                SnapshotState::Available
            } else {
                SnapshotState::PendingDeletion
            };
            actions.push(Action::WriteSnapshot(id));
        }
        enforce_max(state);
    }
}

pub(super) fn group_abort(state: &mut AppState, snapshot: Uuid, reason: String) {
    let create = Step::Create(snapshot);
    // A create in flight is answered first; the executor aborts it after.
    if matches!(state.phase, Phase::Volume { step, .. } if step == create) {
        return;
    }
    let Some(record) = state.snapshot_mut(snapshot) else {
        return;
    };
    if record.state != SnapshotState::Triggered {
        return;
    }
    record.state = SnapshotState::Failed;
    record.time_created = None;
    record.error = Some(reason);
    let taken = state.phase
        == (Phase::Group {
            step: create,
            done: true,
        });
    if matches!(state.phase, Phase::Group { step, .. } if step == create) {
        state.phase = Phase::Idle;
    }
    state.steps.retain(|s| *s != create);
    if taken {
        // Undo it before the app starts again: all or nothing.
        state.steps.push_front(Step::Delete(snapshot));
    }
}

/// Where a member stands in a group step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stand {
    /// Not at the first barrier yet (stopping, other steps first).
    Before,
    Waiting,
    /// Asked the volume-manager.
    Acting,
    /// At the second barrier.
    Done,
}

fn stand(state: &AppState, wanted: Step) -> Stand {
    match state.phase {
        Phase::Group { step, done: false } if step == wanted => Stand::Waiting,
        Phase::Group { step, done: true } if step == wanted => Stand::Done,
        Phase::Volume { step, .. } if step == wanted => Stand::Acting,
        _ => Stand::Before,
    }
}

/// One group step over its members: `(app, snapshot, stand, time already recorded)`.
type Members = Vec<(Uuid, Uuid, Stand, Option<DateTime<Utc>>)>;

/// What the members of the consistency groups in progress are told, given every app's state:
/// - a group in which a member's snapshot failed (or was dropped by `max_snapshots`) is
///   aborted on every other member (each deletes what it took, then starts again);
/// - once no member is before the first barrier, the waiting ones go, all with one time (the
///   one already recorded by a member that went before a restart, else `now`);
/// - once every member is at the second barrier, all are done.
///
/// Rollbacks to a group's snapshots follow the same barriers among the members asked to roll
/// back. The executor feeds these inputs and calls this again until it returns nothing.
pub fn coordinate(apps: &BTreeMap<Uuid, AppState>, now: DateTime<Utc>) -> Vec<(Uuid, Input)> {
    let mut creates: BTreeMap<Uuid, Members> = BTreeMap::new();
    let mut rollbacks: BTreeMap<Uuid, Members> = BTreeMap::new();
    let mut failures: BTreeMap<Uuid, String> = BTreeMap::new();
    for (app, state) in apps {
        for record in &state.snapshots {
            let group = record.desc.group_id;
            if group.is_nil() {
                continue;
            }
            let id = record.id();
            match record.state {
                SnapshotState::Triggered => {
                    creates.entry(group).or_default().push((
                        *app,
                        id,
                        stand(state, Step::Create(id)),
                        record.time_created,
                    ));
                }
                SnapshotState::Failed => {
                    failures.entry(group).or_insert_with(|| {
                        record
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("group {group} failed at member {app}"))
                    });
                }
                SnapshotState::Dropped => {
                    failures.entry(group).or_insert_with(|| {
                        format!(
                            "group {group} failed at member {app}: its snapshot {id} was dropped (max_snapshots)"
                        )
                    });
                }
                _ => {}
            }
            let rollback = Step::Rollback(id);
            let position = stand(state, rollback);
            if position != Stand::Before || state.steps.contains(&rollback) {
                rollbacks
                    .entry(group)
                    .or_default()
                    .push((*app, id, position, None));
            }
        }
    }
    // A declared group waits for every member, and fails for one that cannot come.
    for (group, members) in creates.iter_mut() {
        if failures.contains_key(group) {
            continue;
        }
        match absent_members(apps, *group, members) {
            Ok(waiting) => members.extend(
                waiting
                    .into_iter()
                    .map(|app| (app, Uuid::nil(), Stand::Before, None)),
            ),
            Err(reason) => {
                failures.insert(*group, reason);
            }
        }
    }
    let mut out = Vec::new();
    for (group, members) in creates {
        if let Some(reason) = failures.get(&group) {
            for (app, snapshot, position, _) in members {
                // A member that never listed it has nothing to abort.
                if position != Stand::Acting && !snapshot.is_nil() {
                    out.push((
                        app,
                        Input::GroupAbort {
                            snapshot,
                            reason: reason.clone(),
                        },
                    ));
                }
            }
            continue;
        }
        barriers(&members, now, &mut out);
    }
    for members in rollbacks.values() {
        barriers(members, now, &mut out);
    }
    out
}

/// The members of group snapshot `snapshot`'s declared group (the group of the apps taking it)
/// that have not listed it yet: they are waited for. `Err`: one of them cannot come — it is
/// not on this device, or its group schedule passed the snapshot's due time without taking it
/// (its schedule started counting after it, or it skipped it). An undeclared group (apps
/// without a group config) is whoever lists it.
fn absent_members(
    apps: &BTreeMap<Uuid, AppState>,
    snapshot: Uuid,
    members: &Members,
) -> Result<Vec<Uuid>, String> {
    let Some(group) = members
        .iter()
        .find_map(|m| apps.get(&m.0).and_then(AppState::group))
    else {
        return Ok(Vec::new());
    };
    let due = members
        .iter()
        .find_map(|m| apps.get(&m.0)?.snapshot(m.1)?.due);
    let label = if group.name.is_empty() {
        group.id.to_string()
    } else {
        format!("{} ({})", group.name, group.id)
    };
    let mut waiting = Vec::new();
    for app in &group.members {
        if members.iter().any(|m| m.0 == *app) {
            continue;
        }
        let Some(state) = apps.get(app) else {
            return Err(format!(
                "group {label} snapshot {snapshot} failed at member {app}: the app is not on this device"
            ));
        };
        // Listed already: failed (its failure aborts the group) or past the barriers.
        if state.snapshots.iter().any(|s| s.desc.group_id == snapshot) {
            continue;
        }
        if let Some(due) = due {
            let counted = &state.group_schedule;
            let joins = !counted.key.is_empty()
                && counted.key == schedule_key(state, Which::Group)
                && counted.last_due.is_some_and(|last| last < due);
            if !joins {
                return Err(format!(
                    "group {label} snapshot {snapshot} failed at member {app}: it did not take the snapshot due at {due} (its group schedule started after that time or skipped it)"
                ));
            }
        }
        waiting.push(*app);
    }
    Ok(waiting)
}

fn barriers(members: &Members, now: DateTime<Utc>, out: &mut Vec<(Uuid, Input)>) {
    if members.iter().any(|m| m.2 == Stand::Before) {
        return;
    }
    if members.iter().all(|m| m.2 == Stand::Done) {
        out.extend(members.iter().map(|m| (m.0, Input::GroupDone)));
        return;
    }
    let at = members.iter().filter_map(|m| m.3).min().unwrap_or(now);
    out.extend(
        members
            .iter()
            .filter(|m| m.2 == Stand::Waiting)
            .map(|m| (m.0, Input::GroupGo { at })),
    );
}

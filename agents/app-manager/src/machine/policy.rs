//! The snapshot policy, run by the machine: schedule, expiry, retention.
//!
//! Two schedules run side by side: the app's own policy, and its consistency group's. A group's
//! schedule runs on every member alike: each member's machine counts the same due times and
//! takes, at each, its own snapshot under one group snapshot id derived from the group and the
//! due time, so the members meet at the group's barriers without asking each other (see
//! [`super::coordinate`] for a member that cannot).

use cairn_types::policy::{ConsistencyGroup, Schedule, retained, snapshot_name};
use cairn_types::{SnapshotDesc, SnapshotType};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{AppState, SnapshotRecord, SnapshotState, enforce_max, restart, trigger};

/// Which of an app's two schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    /// The app's own policy (`SnapshotConfig.policy`).
    Own,
    /// Its consistency group's policy.
    Group,
}

const SCHEDULES: [Which; 2] = [Which::Own, Which::Group];

/// Whether `record` was taken by schedule `which`.
fn taken_by(record: &SnapshotRecord, which: Which) -> bool {
    record.scheduled && record.desc.group_id.is_nil() == (which == Which::Own)
}

/// The key a schedule is counted under; empty when there is none. A group's names the group,
/// so that moving to another group starts counting afresh.
pub(super) fn schedule_key(state: &AppState, which: Which) -> String {
    match state.policy_of(which) {
        Some(p) if !p.schedule.trim().is_empty() => {
            let text = format!("{} @ {}", p.schedule.trim(), p.time_zone.trim());
            match (which, state.group()) {
                (Which::Group, Some(g)) => format!("group {}: {text}", g.id),
                _ => text,
            }
        }
        _ => String::new(),
    }
}

/// A schedule first seen (a new policy, a changed one, a state from before schedules) starts
/// counting at `now`: it does not take a snapshot for due times before it arrived.
pub(super) fn sync_schedule(state: &mut AppState, now: DateTime<Utc>) {
    for which in SCHEDULES {
        let key = schedule_key(state, which);
        if key == state.schedule_of(which).key {
            continue;
        }
        state.schedule_of_mut(which).last_due = (!key.is_empty()).then_some(now);
        if let Some(p) = state.policy_of(which)
            && !key.is_empty()
            && let Err(e) = Schedule::parse(&p.schedule, &p.time_zone)
        {
            let note = match which {
                Which::Own => format!("snapshot schedule not run: {e}"),
                Which::Group => format!("group snapshot schedule not run: {e}"),
            };
            if !state.warnings.contains(&note) {
                state.warnings.push(note);
            }
        }
        state.schedule_of_mut(which).key = key;
    }
}

/// What a due schedule does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Take a scheduled snapshot.
    Take,
    /// Mark it handled without a snapshot: the app is deactivated (and the policy does not
    /// say `schedule_when_stopped`), or a scheduled snapshot is still being taken.
    Skip,
    /// Wait: the app's volumes are not ready. An input (their readiness) changes that.
    Wait,
}

/// The parsed schedule and its first due time not handled yet, if the state counts one.
fn pending_due(state: &AppState, which: Which) -> Option<(Schedule, DateTime<Utc>)> {
    let policy = state.policy_of(which)?;
    let counted = state.schedule_of(which);
    let last = counted.last_due?;
    if counted.key != schedule_key(state, which) {
        return None;
    }
    let schedule = Schedule::parse(&policy.schedule, &policy.time_zone).ok()?;
    let next = schedule.next_after(last)?;
    Some((schedule, next))
}

fn due_decision(state: &AppState, which: Which) -> Due {
    // A group takes every member, running or not: the others wait for it at the barrier.
    let when_stopped =
        which == Which::Group || state.policy().is_some_and(|p| p.schedule_when_stopped);
    if !state.effective().activate && !when_stopped {
        return Due::Skip;
    }
    let taking = state.snapshots.iter().any(|s| {
        taken_by(s, which) && matches!(s.state, SnapshotState::Requested | SnapshotState::Triggered)
    });
    if taking {
        return Due::Skip;
    }
    // Nothing may be kept: taking it only to delete it would stop the app for nothing.
    if state.controller.snapshot.max_snapshots == 0 {
        return Due::Skip;
    }
    if !state.volumes_ready {
        return Due::Wait;
    }
    Due::Take
}

/// When the executor should feed the next [`Input::Tick`]: the schedules' next due times, or
/// the first expiry of an available snapshot, whichever comes first. A due time that waits for
/// an input (volumes not ready) is no reason to wake. After a tick at `now`, this is `None` or
/// later than `now`, so the executor never spins.
pub fn next_wakeup(state: &AppState, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut times = Vec::new();
    for which in SCHEDULES {
        times.extend(
            pending_due(state, which)
                .map(|(_, at)| at)
                .filter(|at| *at > now || due_decision(state, which) != Due::Wait),
        );
        // A schedule not counted yet (no step since its config) is synchronized by any tick.
        if schedule_key(state, which) != state.schedule_of(which).key {
            times.push(now);
        }
    }
    times.extend(
        state
            .snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Available)
            .filter_map(|s| s.expires_at(state.policy_for(s))),
    );
    times.extend(restart::wakeup(state));
    times.extend(super::delay::wakeup(state));
    times.into_iter().min()
}

/// Expiry, then the app's schedule, then its group's.
pub(super) fn on_tick(state: &mut AppState, new_id: Uuid, now: DateTime<Utc>) {
    expire(state, now);
    for which in SCHEDULES {
        let Some((schedule, next)) = pending_due(state, which) else {
            continue;
        };
        if next > now {
            continue;
        }
        let decision = due_decision(state, which);
        if decision == Due::Wait {
            continue;
        }
        // Every due time up to now is handled by this one decision: one snapshot, not a burst.
        let due = latest_due(&schedule, next, now);
        state.schedule_of_mut(which).last_due = Some(due);
        if decision == Due::Skip {
            if state.controller.snapshot.max_snapshots == 0 {
                let note = "scheduled snapshots are not taken: max_snapshots is 0, which keeps no \
                            snapshot (EVE's meaning)"
                    .to_string();
                if !state.warnings.contains(&note) {
                    state.warnings.push(note);
                }
            }
            continue;
        }
        let id = match (which, state.group()) {
            (Which::Own, _) => new_id,
            (Which::Group, Some(group)) => {
                ConsistencyGroup::member_snapshot(group.scheduled_snapshot(due), state.app)
            }
            (Which::Group, None) => continue,
        };
        if state.snapshot(id).is_some() {
            continue;
        }
        take_scheduled(state, which, &schedule, id, due, now);
    }
}

/// The last due time of `schedule` at or before `now`, starting from `first` (itself due at or
/// before `now`). Past a long downtime of a frequent schedule, `now` stands for it.
fn latest_due(schedule: &Schedule, first: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    let mut at = first;
    for _ in 0..10_000 {
        match schedule.next_after(at) {
            Some(next) if next <= now => at = next,
            _ => return at,
        }
    }
    now
}

/// Available snapshots past their expiry become pending deletions (deleted at the next
/// deactivation, never a reason to stop the app).
fn expire(state: &mut AppState, now: DateTime<Utc>) {
    let due: Vec<Uuid> = state
        .snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Available)
        .filter(|s| {
            s.expires_at(state.policy_for(s))
                .is_some_and(|at| at <= now)
        })
        .map(SnapshotRecord::id)
        .collect();
    for id in due {
        let Some(record) = state.snapshot_mut(id) else {
            continue;
        };
        record.state = SnapshotState::PendingDeletion;
        if !record.scheduled {
            state.expired.insert(id);
        }
    }
}

/// Retention first (over the available snapshots of the same schedule plus the new one), then
/// the new snapshot, triggered like an IMMEDIATE one; `max_snapshots` as for any new snapshot.
/// The deletions this marks run before the new create in the same stop window. A group's
/// snapshot belongs to the group snapshot of `due`: the same on every member.
fn take_scheduled(
    state: &mut AppState,
    which: Which,
    schedule: &Schedule,
    id: Uuid,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) {
    let Some(policy) = state.policy_of(which).cloned() else {
        return;
    };
    if policy.retention.is_set() {
        let mut candidates: Vec<(Uuid, DateTime<Utc>)> = state
            .snapshots
            .iter()
            .filter(|s| taken_by(s, which) && s.state == SnapshotState::Available)
            // The due time the schedule took it for (this machine's clock), not the
            // volume-manager's stamp: periods are about which due time a snapshot stands for,
            // and the two clocks need not agree (a test's injected clock, a clock stepped in
            // between).
            .map(|s| {
                let at = s.due.or(s.time_triggered).or(s.time_created);
                (s.id(), at.unwrap_or(now))
            })
            .collect();
        candidates.push((id, due));
        let keep = retained(&candidates, &policy.retention, schedule.zone());
        for record in &mut state.snapshots {
            if taken_by(record, which)
                && record.state == SnapshotState::Available
                && !keep.contains(&record.id())
            {
                record.state = SnapshotState::PendingDeletion;
            }
        }
    }
    // An earlier scheduled snapshot that failed was reported; nothing of it is on the volumes.
    state
        .snapshots
        .retain(|s| !(taken_by(s, which) && s.state == SnapshotState::Failed));
    let counter = {
        let counted = state.schedule_of_mut(which);
        counted.counter += 1;
        counted.counter
    };
    let app_name = state.effective().display_name.clone();
    let (group_id, named_at, description) = match (which, state.group()) {
        (Which::Group, Some(group)) => (
            group.scheduled_snapshot(due),
            due,
            format!(
                "scheduled for group {} ({} in {})",
                if group.name.is_empty() {
                    group.id.to_string()
                } else {
                    group.name.clone()
                },
                policy.schedule.trim(),
                schedule.zone()
            ),
        ),
        _ => (
            Uuid::nil(),
            now,
            format!(
                "scheduled ({} in {})",
                policy.schedule.trim(),
                schedule.zone()
            ),
        ),
    };
    let name = snapshot_name(
        &policy.pattern,
        named_at,
        schedule.zone(),
        counter,
        &app_name,
    );
    state.snapshots.push(SnapshotRecord {
        desc: SnapshotDesc {
            snapshot_id: id,
            snapshot_type: SnapshotType::Immediate,
            scheduled: true,
            name,
            description,
            expiry_seconds: 0,
            group_id,
            // A group's snapshots are taken stopped: its members meet at stop barriers.
            mode: if which == Which::Own {
                policy.mode
            } else {
                cairn_types::SnapshotMode::Stopped
            },
        },
        state: SnapshotState::Requested,
        time_triggered: None,
        time_created: None,
        config: None,
        error: None,
        scheduled: true,
        due: Some(due),
    });
    trigger(state, id, now);
    enforce_max(state);
}

/// The export requests the app's policy asks for: one per available scheduled snapshot when the
/// policy names a remote (incremental over the previous export, a full one every
/// `full_every`, the bucket's retention with it). `once`: a request published again after a
/// restart finds its export done and writes nothing.
pub fn scheduled_exports(state: &AppState) -> Vec<cairn_types::ExportConfig> {
    state
        .snapshots
        .iter()
        .filter(|r| r.scheduled && r.state == SnapshotState::Available)
        .filter_map(|r| {
            let export = state.policy_for(r)?.export.as_ref()?;
            Some(cairn_types::ExportConfig {
                job_id: cairn_types::ScheduledExport::job_id(r.id()),
                snapshot_id: r.id(),
                app_uuid: state.app,
                remote: export.remote.clone(),
                remote_prefix: export.prefix.clone(),
                incremental: export.full_every != 1,
                full_every: export.full_every,
                keep_exports: export.keep_exports,
                once: true,
                ..Default::default()
            })
        })
        .collect()
}

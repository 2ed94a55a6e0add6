//! The restart policy: what the machine does when the app's domain ends without
//! being asked to, or cannot be started.
//!
//! EVE parks a crashed domain in BROKEN until the controller sends a restart command, and
//! retries a failed boot every `timer.boot.retry` (600 s) without limit. An unattended edge
//! device should heal itself sooner, so Cairn restarts by the app's [`RestartPolicy`] with a
//! backoff: 1 s, doubling per failure in a row, at most EVE's 600 s; a run of
//! [`STABLE_SECONDS`] ends the row. `never` keeps EVE's crash handling.
//!
//! - A failure is a [`Failure`] in the state, persisted with it: why, when, how many in a row,
//!   and the domain's restart counter of the start that failed, so a repeated status of the same
//!   end (after a restart of either agent) is not counted twice.
//! - While a failure holds the start, the app is Broken and says why and when it starts again;
//!   the rest of the machine goes on (a snapshot of a broken app is taken with its domain down).
//! - Each start after a failure raises [`AppState::restarts`], which is part of the domain's
//!   restart counter: the domain-manager never starts a generation that broke again, so a new
//!   start must be a new generation.
//! - A restart command, a new version, a purge or a rollback releases the hold at once; a
//!   config that no longer activates the app forgets the failure.

use cairn_persist::Persist;
use cairn_types::{AppInstanceConfig, RestartPolicy};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::{AppState, Phase};

/// The first restart waits this long.
pub const FIRST_BACKOFF_SECONDS: i64 = 1;
/// The longest wait between restarts: EVE's `timer.boot.retry` default.
pub const MAX_BACKOFF_SECONDS: i64 = 600;
/// A domain that ran this long before it ended starts a new row of failures.
pub const STABLE_SECONDS: i64 = 10;

/// The app's last unasked end or failed start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub struct Failure {
    pub reason: String,
    pub at: DateTime<Utc>,
    /// Failures in a row with no stable run between them.
    pub consecutive: u32,
    /// The domain restart counter of the start that failed.
    pub counter: u32,
    /// Whether the next start waits: until `retry_at`, or (`None`) for the controller.
    pub held: bool,
    pub retry_at: Option<DateTime<Utc>>,
    /// The start after this failure was made (as a new generation).
    #[serde(default)]
    pub restarted: bool,
}

/// The restart counter the domain-manager is given: the controller's and the local restart
/// commands, plus the restarts the policy made.
pub fn domain_restart_counter(config: &AppInstanceConfig, restarts: u32) -> u32 {
    config
        .restart_cmd
        .counter
        .wrapping_add(config.local_restart_cmd.counter)
        .wrapping_add(restarts)
}

/// The wait before the `consecutive`-th restart in a row.
pub fn backoff(consecutive: u32) -> TimeDelta {
    let doublings = consecutive.saturating_sub(1).min(20);
    let seconds = (FIRST_BACKOFF_SECONDS << doublings).min(MAX_BACKOFF_SECONDS);
    TimeDelta::seconds(seconds)
}

/// The domain reports it ended on its own or failed to start (`counter`, `version`: the
/// generation it had), and how (`clean`: exit status 0).
pub(super) fn on_broken(
    state: &mut AppState,
    counter: u32,
    version: &str,
    reason: String,
    clean: bool,
    now: DateTime<Utc>,
) {
    let Some(running) = &state.running else {
        state.domain_active = false;
        return; // not started by this state: nothing to restart
    };
    if running.uuid_and_version.version != version
        || domain_restart_counter(running, state.restarts) != counter
    {
        return; // an older generation's end, already superseded
    }
    state.domain_active = false;
    if state.failure.as_ref().is_some_and(|f| f.counter == counter) {
        return; // the same end, seen again after a restart
    }
    // A stop that was asked for ends Halted; the rest of the machine goes on.
    if state.phase == Phase::Stopping {
        return;
    }
    if state.phase == Phase::Starting {
        state.phase = Phase::Idle;
    }
    let stable = state
        .started_at
        .is_some_and(|t| now - t >= TimeDelta::seconds(STABLE_SECONDS));
    let consecutive = match &state.failure {
        Some(previous) if !stable => previous.consecutive.saturating_add(1),
        _ => 1,
    };
    let policy = running.restart_policy;
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Never => false,
    };
    record(
        state,
        reason,
        counter,
        consecutive,
        restart.then(|| now + backoff(consecutive)),
        now,
    );
}

/// Nothing can be asked of the domain-manager (the config names nothing to run): the app is
/// broken for that reason until a config changes it, never left starting.
pub(super) fn cannot_start(state: &mut AppState, reason: String, now: DateTime<Utc>) {
    if state.phase == Phase::Starting {
        state.phase = Phase::Idle;
    }
    let counter = state
        .running
        .as_ref()
        .map_or(0, |c| domain_restart_counter(c, state.restarts));
    let consecutive = state.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
    record(state, reason, counter, consecutive, None, now);
}

/// The failure that holds the next start: until `retry_at`, or (`None`) for the controller.
fn record(
    state: &mut AppState,
    reason: String,
    counter: u32,
    consecutive: u32,
    retry_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    state.started_at = None;
    state.failure = Some(Failure {
        reason,
        at: now,
        consecutive,
        counter,
        held: true,
        retry_at,
        restarted: false,
    });
}

/// At a tick: a hold whose time has come is released.
pub(super) fn on_tick(state: &mut AppState, now: DateTime<Utc>) {
    if let Some(failure) = &mut state.failure
        && failure.held
        && failure.retry_at.is_some_and(|at| at <= now)
    {
        failure.held = false;
    }
}

/// The controller asked for a new start (restart, new version, purge, rollback): no waiting.
pub(super) fn release(state: &mut AppState) {
    if let Some(failure) = &mut state.failure {
        failure.held = false;
    }
}

/// Whether a start may go ahead now.
pub(super) fn may_start(state: &AppState) -> bool {
    !state.failure.as_ref().is_some_and(|f| f.held)
}

/// The machine starts the domain: the first start after a failure is a new generation.
pub(super) fn starting(state: &mut AppState) {
    if let Some(failure) = &mut state.failure
        && !failure.restarted
    {
        failure.restarted = true;
        state.restarts = state.restarts.wrapping_add(1);
    }
}

/// The domain runs, or stopped as asked: a run's start is what the stability rule measures
/// from, and the app's boot time.
pub(super) fn on_domain(state: &mut AppState, active: bool, now: DateTime<Utc>) {
    if !active {
        state.started_at = None;
    } else if state.started_at.is_none() {
        state.started_at = Some(now);
    }
}

/// A config that does not activate the app: a past failure holds nothing any more (it stays
/// the last failure, and the next start is a new generation).
pub(super) fn on_deactivated(state: &mut AppState) {
    if !state.effective().activate
        && let Some(failure) = &mut state.failure
    {
        failure.held = false;
    }
}

/// When the machine wants a tick for a held restart.
pub(super) fn wakeup(state: &AppState) -> Option<DateTime<Utc>> {
    state
        .failure
        .as_ref()
        .filter(|f| f.held)
        .and_then(|f| f.retry_at)
}

/// What the app's status says while a failure holds its start: the retry condition.
pub fn retry_condition(state: &AppState) -> Option<String> {
    let failure = state.failure.as_ref().filter(|f| f.held)?;
    let policy = state
        .running
        .as_deref()
        .unwrap_or_else(|| state.effective())
        .restart_policy;
    Some(match failure.retry_at {
        Some(at) => format!(
            "restarting at {} (failure {} in a row, restart policy {})",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            failure.consecutive,
            policy.name()
        ),
        None => format!(
            "restart policy {}: not restarted by the device; raise the app's restart counter, \
             or send a new version",
            policy.name()
        ),
    })
}

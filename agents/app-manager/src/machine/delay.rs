//! EVE's start delay (`start_delay_in_seconds`): after the device comes up, an app is started
//! no sooner than its delay after the first config of the boot was in hand (EVE's
//! `delayBaseTime`), and is START_DELAYED meanwhile. The window belongs to the boot: a start
//! after it has passed (a restart, a purge, a rollback) goes at once, and one inside it waits
//! like the first, as EVE's zedmanager does.
//!
//! The executor gives the boot's moment ([`super::Input::Boot`]) at every start-up and to every
//! new app, from a file in the run directory, so a restarted app-manager keeps the window and
//! a reboot opens a new one.

use chrono::{DateTime, TimeDelta, Utc};

use super::AppState;

/// The executor says when this boot's first config was in hand. At a new boot the domain
/// of the last one is gone, and bringing it back is a start of the boot like any: it waits
/// (the domain request says stopped meanwhile, see [`AppState::domain_request`]).
pub(super) fn on_boot(state: &mut AppState, ready_at: DateTime<Utc>, now: DateTime<Utc>) {
    let new_boot = state.boot_ready_at != Some(ready_at);
    state.boot_ready_at = Some(ready_at);
    if new_boot {
        state.start_delayed_until = holds(state, now);
    }
}

/// Until when the start of the app waits, if it waits now.
pub(super) fn holds(state: &AppState, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let delay = state.effective().start_delay_seconds;
    if delay == 0 {
        return None;
    }
    let until = state.boot_ready_at? + TimeDelta::seconds(i64::from(delay));
    (now < until).then_some(until)
}

/// The moment a delayed start may go ahead.
pub(super) fn wakeup(state: &AppState) -> Option<DateTime<Utc>> {
    state.start_delayed_until
}

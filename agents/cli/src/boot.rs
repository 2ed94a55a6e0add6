//! Why the device started: `cairn up` judges it at its start from what the run before left
//! (EVE's nodeagent `handleLastRebootReason`), and leaves a stop reason when it stops cleanly
//! (EVE writes `/persist/reboot-reason` before a reboot it asks for). A power cut or a kill
//! leaves none, so the next start says Unknown, as EVE does without SMART counters.
#![allow(clippy::disallowed_methods)] // pure file work: `up.rs` calls it on the blocking pool

use std::path::Path;

use cairn_persist::ErrorKind;
use cairn_types::layout;
use cairn_types::{BootReason, LastBoot, StopReason};
use chrono::{DateTime, SecondsFormat, Utc};

/// The judgement, from the previous start's record (`None` on a fresh `<persist>`) and the
/// stop reason found (`None` when the last run left none).
pub fn judge(
    previous: Option<&LastBoot>,
    stop: Option<&StopReason>,
    now: DateTime<Utc>,
) -> LastBoot {
    let at = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    let restart_counter = previous.map_or(0, |p| p.restart_counter.saturating_add(1));
    // A stop reason counts only for the run it names: one left by an older run, whose record
    // was replaced but whose marker was not removed, explains nothing about the last run.
    let stop = stop
        .filter(|s| previous.is_some_and(|p| p.started.is_some() && p.started == s.run_started));
    let (reason, boot_reason, reboot_time) = match (previous, stop) {
        (None, _) => (
            format!("NORMAL: First boot of device - at {at}"),
            BootReason::First,
            Some(now),
        ),
        (Some(_), Some(stop)) => (
            stop.reason.clone(),
            stop.boot_reason,
            stop.time.or(Some(now)),
        ),
        (Some(_), None) => (
            format!("Unknown reboot reason - power failure or crash - at {at}"),
            BootReason::Unknown,
            Some(now),
        ),
    };
    LastBoot {
        reason,
        boot_reason,
        reboot_time,
        started: Some(now),
        restart_counter,
    }
}

/// The stop reason `cairn up` leaves when it stopped its agents on `signal`.
pub fn clean_stop(
    signal: &str,
    run_started: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> StopReason {
    let at = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    StopReason {
        reason: format!(
            "NORMAL: cairn up stopped the device on {signal} (shutdown or operator) at {at}"
        ),
        boot_reason: BootReason::PoweroffCmd,
        time: Some(now),
        run_started,
    }
}

/// At start: judges this boot, stores it durably, then drops the stop reason it used.
/// Blocking. A record that cannot be read is reported and treated as absent: the device
/// still starts, and says Unknown rather than a reason it cannot vouch for. One that cannot be
/// written (a read-only or full `<persist>`) is reported too, and the device starts anyway:
/// the boot reason is not worth a device that does not come up.
pub fn record_start(persist: &Path, now: DateTime<Utc>) -> LastBoot {
    let previous = read::<LastBoot>(&layout::last_boot(persist));
    let stop = read::<StopReason>(&layout::stop_reason(persist));
    let boot = judge(previous.as_ref(), stop.as_ref(), now);
    if let Err(e) = cairn_persist::store_with_backup(&layout::last_boot(persist), &boot) {
        eprintln!(
            "cairn up: this start's reason is not recorded ({e}); the controller is not told it"
        );
        return boot;
    }
    // After the store: a kill between the two leaves a marker that names the run before, which
    // the next judgement ignores.
    if let Err(e) = cairn_persist::remove(&layout::stop_reason(persist)) {
        eprintln!("cairn up: the last stop's marker stays ({e}); the next start ignores it");
    }
    boot
}

/// At a clean stop, once the agents are down. Blocking.
pub fn record_stop(persist: &Path, stop: &StopReason) -> anyhow::Result<()> {
    cairn_persist::store(&layout::stop_reason(persist), stop)?;
    Ok(())
}

fn read<T: cairn_persist::Record>(path: &Path) -> Option<T> {
    match cairn_persist::load_with_backup::<T>(path) {
        Ok(loaded) => Some(loaded.record),
        Err(e) if matches!(e.kind, ErrorKind::NotFound) => None,
        Err(e) => {
            eprintln!("cairn up: {e}; taken as absent");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap_or_default()
    }

    #[test]
    fn a_fresh_device_is_a_first_boot_a_clean_stop_is_named_and_a_silent_end_is_unknown() {
        let first = judge(None, None, at(100));
        assert_eq!(first.boot_reason, BootReason::First);
        assert_eq!(first.restart_counter, 0);
        assert!(
            first.reason.starts_with("NORMAL: First boot"),
            "{}",
            first.reason
        );

        let stop = clean_stop("SIGTERM", first.started, at(150));
        let second = judge(Some(&first), Some(&stop), at(200));
        assert_eq!(second.boot_reason, BootReason::PoweroffCmd);
        assert_eq!(second.reboot_time, Some(at(150)), "when the stop happened");
        assert_eq!(second.restart_counter, 1);
        assert!(second.reason.contains("SIGTERM"), "{}", second.reason);

        let third = judge(Some(&second), None, at(300));
        assert_eq!(third.boot_reason, BootReason::Unknown);
        assert_eq!(third.reboot_time, Some(at(300)));
        assert_eq!(third.restart_counter, 2);
    }

    #[test]
    fn a_stop_reason_left_by_an_older_run_explains_nothing() {
        let first = judge(None, None, at(100));
        let stale = clean_stop("SIGTERM", first.started, at(150));
        let second = judge(Some(&first), Some(&stale), at(200));
        // The second run is killed; its start removed nothing (a kill right after the store).
        let third = judge(Some(&second), Some(&stale), at(300));
        assert_eq!(third.boot_reason, BootReason::Unknown);
    }
}

//! Issue 10, scheduled snapshots across the real agents: the app-manager takes device-originated
//! snapshots on the policy's schedule, named by its pattern, keeps due times across its own
//! restart, and applies the retention before the new snapshot in the same stop window.
//!
//! Real time, no injected clock: the finest schedule is every minute (`* * * * *`; 5 fields
//! only), so this test runs over two minute boundaries, ~65–130 s. The app is a shell process on
//! a `dir` volume; it appends a line to `runs` in its volume at each start.
//!
//! 1. A fresh app counts from when its policy arrives: the first snapshot comes at the next
//!    minute boundary, named `e2e-1-HHMM` (pattern `e2e-%n-%H%M`), reported available.
//! 2. The app-manager is SIGKILLed and stays down over the next due time; restarted, it takes
//!    exactly one snapshot at once for the missed due time (the due time and the name counter
//!    were persisted: a fresh state would wait for the following minute), not a burst.
//! 3. Retention keep_last 1: the first snapshot is deleted in the same stop window as the
//!    second is taken (one more start of the app), and the records under
//!    `<persist>/snapshots` and the volume's snapshot directory agree.
//!
//! Several missed due times giving one snapshot, DST and expiry are unit-tested on the machine
//! (agents/app-manager/tests/machine.rs), where the clock is the test's.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_e2e::Device;
use cairn_types::{AppInstanceStatus, SnapshotInstanceStatus};
use uuid::Uuid;

const APP: &str = "e2e0ea90-0000-4000-8000-00000000a010";
const VOLUME: &str = "e2e0ea90-0000-4000-8000-00000000b010";

/// Generous: CI runs this next to the VM tests on two cores.
const SETTLE: Duration = Duration::from_secs(60);

fn config(device: &Device) -> String {
    let marker = device.root.path().display();
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "1", "display_name": "scheduled",
    "volume_refs": [{{"uuid": "{VOLUME}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 8, "schedule": "* * * * *", "time_zone": "UTC", "expiry": "10m",
                  "retention": {{"keep_last": 1}}, "pattern": "e2e-%n-%H%M"}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "echo run >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "generation_count": 0, "format": "dir"}}]
}}"#
    )
}

fn volume_id() -> Uuid {
    VOLUME.parse().unwrap()
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Running, with exactly one available snapshot and nothing in flight.
fn one_available(s: &AppInstanceStatus) -> Option<&SnapshotInstanceStatus> {
    let snap = &s.snap_status;
    (s.activated
        && snap.requested_snapshots.is_empty()
        && snap.snapshots_to_be_deleted.is_empty()
        && snap.available_snapshots.len() == 1)
        .then(|| &snap.available_snapshots[0])
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The name the pattern gives the `n`-th scheduled snapshot triggered at `s`'s time.
fn expected_name(s: &SnapshotInstanceStatus, n: u32) -> String {
    format!("e2e-{n}-{}", s.time_triggered.unwrap().format("%H%M"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_snapshots_are_named_survive_a_restart_without_a_burst_and_keep_the_retention() {
    let mut device = Device::new();
    device.write_config(&config(&device));
    // Not in the last 15 s of a minute: the app must be running before the first due time,
    // or a loaded machine could start and restart it (for the snapshot) between two looks.
    let second = unix_now() % 60;
    if second >= 45 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
    device.start_all();
    let volume = device.dir_volume(volume_id(), 0);
    device
        .until(SETTLE, "the app ran", || runs(&volume) == 1)
        .await;

    // 1. The first due time (the next minute boundary, at most a minute away).
    let status = device
        .app_status(Duration::from_secs(80), |s| one_available(s).is_some())
        .await
        .unwrap();
    let first = one_available(&status).unwrap().clone();
    let s1 = first.snapshot.snapshot_id;
    assert_eq!(first.snapshot.name, expected_name(&first, 1));
    assert!(first.snapshot.description.starts_with("scheduled"));
    assert!(
        first.snapshot.scheduled,
        "marked as the policy's, not the controller's"
    );
    let triggered = first.time_triggered.unwrap().timestamp();
    assert_eq!(triggered % 60 / 10, 0, "taken at the minute boundary");
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s1]));
    assert_eq!(
        device.dir_volume_snapshots(volume_id(), 0),
        BTreeSet::from([s1])
    );
    device
        .until(SETTLE, "the app started again after the snapshot", || {
            runs(&volume) == 2
        })
        .await;

    // 2. The app-manager dies and stays down over the next due time.
    device.kill("app-manager");
    let next_due = triggered - triggered % 60 + 60;
    let back_at = next_due + 3;
    tokio::time::sleep(Duration::from_secs((back_at - unix_now()).max(0) as u64)).await;
    assert_eq!(runs(&volume), 2, "the app ran on meanwhile");
    device.start("app-manager", None);

    let status = device
        .app_status(SETTLE, |s| {
            one_available(s).is_some_and(|a| a.snapshot.snapshot_id != s1)
        })
        .await
        .unwrap();
    let second = one_available(&status).unwrap().clone();
    let s2 = second.snapshot.snapshot_id;
    let taken = second.time_triggered.unwrap().timestamp();
    assert!(
        taken >= back_at && taken < next_due + 60,
        "taken at the restart for the missed due time, not at the next one ({taken}, due {next_due})"
    );
    assert_eq!(
        second.snapshot.name,
        expected_name(&second, 2),
        "the second scheduled snapshot: the counter was persisted, no burst"
    );

    // 3. Retention keep_last 1: the first is gone, records and volume snapshots agree, and
    //    the deletion and the creation shared one stop window (one more start).
    device
        .until(SETTLE, "the app started again", || runs(&volume) == 3)
        .await;
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s2]));
    assert_eq!(
        device.dir_volume_snapshots(volume_id(), 0),
        BTreeSet::from([s2])
    );

    // No burst: a few seconds on, still the one snapshot (the next due time is a minute away).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = device
        .app_status(SETTLE, |s| one_available(s).is_some())
        .await
        .unwrap();
    assert_eq!(one_available(&status).unwrap().snapshot.snapshot_id, s2);
    assert_eq!(runs(&volume), 3);
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s2]));
}

/// Issue 10's check: a device with `@hourly` and keep-last 3, under an injected clock (the
/// app-manager's `CAIRN_TEST_CLOCK`: device time starts at 20:00 UTC on 28 March 2026, the eve
/// of Europe's spring-forward, and runs 1,800 times faster, an hour every 2 s), ends with exactly
/// the 3 newest scheduled snapshots. The hours cross 02:00 Europe/Berlin, which does not exist
/// that night: names are read in that zone, one per hour, none doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hourly_schedule_with_keep_last_3_ends_with_the_3_newest() {
    let mut device = Device::new();
    device.set_agent_env(
        "app-manager",
        "CAIRN_TEST_CLOCK",
        "2026-03-28T20:00:00Zx1800",
    );
    let marker = device.root.path().display().to_string();
    device.write_config(&format!(
        r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "1", "display_name": "hourly",
    "volume_refs": [{{"uuid": "{VOLUME}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 8, "schedule": "@hourly", "time_zone": "Europe/Berlin",
                  "retention": {{"keep_last": 3}}, "pattern": "h-%n-%d%H%M"}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "while :; do sleep 1; done", "{marker}"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "generation_count": 0, "format": "dir"}}]
}}"#
    ));
    device.start_all();

    // Until the eighth scheduled snapshot (about 16 s of real time) is available.
    let counter = |name: &str| -> u64 { name.split('-').nth(1).unwrap().parse().unwrap() };
    let status = device
        .app_status(Duration::from_secs(90), |s| {
            s.activated
                && s.snap_status.requested_snapshots.is_empty()
                && s.snap_status.snapshots_to_be_deleted.is_empty()
                && s.snap_status
                    .available_snapshots
                    .iter()
                    .any(|a| counter(&a.snapshot.name) >= 8)
        })
        .await
        .unwrap();
    // Stop the clock's effects before reading the disk: no further snapshot may start.
    device.kill("app-manager");
    let available = &status.snap_status.available_snapshots;
    let mut counters: Vec<u64> = available
        .iter()
        .map(|a| counter(&a.snapshot.name))
        .collect();
    counters.sort();
    let newest = *counters.last().unwrap();
    assert_eq!(
        counters,
        [newest - 2, newest - 1, newest],
        "exactly the 3 newest: {:?}",
        available
            .iter()
            .map(|a| &a.snapshot.name)
            .collect::<Vec<_>>()
    );
    // Each was taken in its own hour: three distinct Berlin wall-clock hours, in order.
    let hours: BTreeSet<String> = available
        .iter()
        .map(|a| a.snapshot.name.rsplit('-').next().unwrap().to_string())
        .collect();
    assert_eq!(hours.len(), 3, "{hours:?}");
    // The records and the volume's snapshot copies agree with the status.
    let ids: BTreeSet<Uuid> = available.iter().map(|a| a.snapshot.snapshot_id).collect();
    assert_eq!(device.snapshot_dirs(), ids);
}

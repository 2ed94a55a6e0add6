//! EVE's snapshot gaps (docs/design.md, 1–4), each shown closed across the real agents, and the
//! purge and record-import paths of the app-manager (issue 6) end to end. Each test runs the four
//! agents as processes on a temporary device root; the app is a shell process on a directory
//! volume (copy backend, or purgeable), which starts in milliseconds where a VM would take
//! seconds. The app appends a line to `runs` in its volume at each start, so a test can tell
//! where, and how often, it ran.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::layout::{
    SNAPSHOT_INSTANCE_STATUS_FILE, VOLUMES_SNAPSHOT_STATUS_FILE, snapshot_dir,
};
use cairn_types::{AppInstanceStatus, SnapshotInstanceStatus, VolumesSnapshotStatus};
use uuid::Uuid;

const APP: &str = "e2e0ea90-0000-4000-8000-00000000a001";
const VOLUME: &str = "e2e0ea90-0000-4000-8000-00000000b001";
const S1: &str = "e2e0ea90-0000-4000-8000-00000000c001";

const SETTLE: Duration = Duration::from_secs(20);

/// One app on one directory volume, as the local config file says it.
#[derive(Clone)]
struct App {
    version: &'static str,
    generation: i64,
    purgeable: bool,
    /// The snapshot S1, and its type, when the config lists it.
    snapshot: Option<&'static str>,
    rollback: u32,
    restart: u32,
}

impl Default for App {
    fn default() -> Self {
        Self {
            version: "1",
            generation: 0,
            purgeable: false,
            snapshot: None,
            rollback: 0,
            restart: 0,
        }
    }
}

impl App {
    fn json(&self, device: &Device) -> String {
        let snapshots = self
            .snapshot
            .map(|kind| format!(r#"{{"id": "{S1}", "type": "{kind}"}}"#))
            .unwrap_or_default();
        // The device root in the command line lets the harness find and stop the app.
        let marker = device.root.path().display();
        format!(
            r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "{version}", "display_name": "gaps", "restart": {restart},
    "volume_refs": [{{"uuid": "{VOLUME}", "generation_count": {generation}}}],
    "snapshot": {{"max_snapshots": 2, "active_snapshot": "{S1}", "rollback_counter": {rollback},
                  "snapshots": [{snapshots}]}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "echo run >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "generation_count": {generation}, "format": "dir",
                "purgeable": {purgeable}}}]
}}"#,
            version = self.version,
            restart = self.restart,
            generation = self.generation,
            rollback = self.rollback,
            purgeable = self.purgeable,
        )
    }
}

fn s1() -> Uuid {
    S1.parse().unwrap()
}

fn volume_id() -> Uuid {
    VOLUME.parse().unwrap()
}

fn available(s: &AppInstanceStatus) -> BTreeSet<Uuid> {
    s.snap_status
        .available_snapshots
        .iter()
        .map(|a| a.snapshot.snapshot_id)
        .collect()
}

/// Running, on `version`, with exactly `snapshots` available and nothing in flight.
fn settled(s: &AppInstanceStatus, version: &str, snapshots: &[Uuid]) -> bool {
    s.activated
        && s.uuid_and_version.version == version
        && s.snap_status.requested_snapshots.is_empty()
        && s.snap_status.snapshots_to_be_deleted.is_empty()
        && available(s) == snapshots.iter().copied().collect()
}

/// How many times the app started on the volume directory `dir`.
fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until the app has started `n` times on `dir` (its status says Running a moment before
/// its script has written its start), then says whether it is exactly `n`.
async fn started_times(dir: &Path, n: usize) -> usize {
    let deadline = std::time::Instant::now() + SETTLE;
    while runs(dir) < n && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runs(dir)
}

/// Where the copy backend keeps snapshot S1 of the volume at `generation`.
fn copy_of_s1(device: &Device, generation: i64) -> PathBuf {
    cairn_types::layout::volumes_dir(&device.persist_dir())
        .join(".snapshots")
        .join(cairn_types::volume_key(volume_id(), generation))
        .join(S1)
}

/// A device running the app with snapshot S1 taken (IMMEDIATE) and available.
async fn device_with_s1(app: &App) -> Device {
    let mut device = Device::new();
    device.write_config(&app.json(&device));
    device.start_all();
    device
        .app_status(SETTLE, |s| settled(s, app.version, &[s1()]))
        .await
        .unwrap();
    device
}

/// Gap 1. EVE keeps an in-progress snapshot in `/run` only: when the app-manager dies in the
/// middle of one and the device reboots, nothing remembers it — the IMMEDIATE snapshot stalls
/// (never reported available) and whatever the volume side made is leaked. Here the app-manager
/// SIGKILLs itself right after asking the volume-manager for the snapshot, then the whole device
/// loses power (run root wiped, every process killed) and boots: the snapshot must complete,
/// exactly one copy and one record directory must exist, and the app must run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap1_an_interrupted_snapshot_completes_after_a_crash_and_a_reboot_nothing_leaked() {
    let mut device = Device::new();
    let app = App::default();
    device.write_config(&app.json(&device));
    device.start_all();
    device
        .app_status(SETTLE, |s| settled(s, "1", &[]))
        .await
        .unwrap();

    device.kill("app-manager");
    device.start("app-manager", Some("app-manager:after-volumes-request"));
    device.write_config(
        &App {
            snapshot: Some("immediate"),
            ..app.clone()
        }
        .json(&device),
    );
    assert!(
        device.died_within("app-manager", SETTLE),
        "the app-manager never reached its crash point mid-snapshot"
    );
    device.power_cycle();

    let status = device
        .app_status(SETTLE, |s| settled(s, "1", &[s1()]))
        .await
        .unwrap();
    assert!(
        status.snap_status.available_snapshots[0]
            .time_created
            .is_some()
    );
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s1()]));
    let copies: Vec<_> = std::fs::read_dir(copy_of_s1(&device, 0).parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        copies,
        vec![std::ffi::OsString::from(S1)],
        "one copy, no partial left"
    );
}

/// Gap 2. EVE reports a deletion before it happens and publishes nothing when it fails: the
/// snapshot just vanishes from the status while its data stays on the disk. Here the copy
/// backend's delete is made to fail (the snapshot copy's directory is immutable, so even root
/// cannot remove it): the snapshot must stay listed as to be deleted, with the error in the
/// app's status, and once the fault is gone the next deactivation deletes it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap2_a_failed_deletion_stays_visible_with_its_error_and_is_retried() {
    let with = App {
        snapshot: Some("immediate"),
        ..App::default()
    };
    let device = device_with_s1(&with).await;
    let copy = copy_of_s1(&device, 0);
    let pinned = copy.clone();
    let chattr = |flag: &str| {
        let ok = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&pinned)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "chattr {flag} {} (e2fsprogs, root, ext4)",
            pinned.display()
        );
    };
    chattr("+i");

    // Dropped from the config; the restart is the deactivation the deletion waits for.
    device.write_config(
        &App {
            restart: 1,
            ..App::default()
        }
        .json(&device),
    );
    let failed = device
        .app_status(SETTLE, |s| {
            s.activated && s.warnings.iter().any(|w| w.contains("deleting snapshot"))
        })
        .await;
    chattr("-i");
    let failed = failed.unwrap();
    assert_eq!(
        failed
            .snap_status
            .snapshots_to_be_deleted
            .iter()
            .map(|d| d.snapshot_id)
            .collect::<Vec<_>>(),
        vec![s1()],
        "still listed as to be deleted"
    );
    let warning = failed
        .warnings
        .iter()
        .find(|w| w.contains("deleting snapshot"))
        .unwrap();
    assert!(
        warning.contains(S1) && warning.contains(&copy.display().to_string()),
        "the error names the snapshot and the file: {warning}"
    );
    assert!(copy.exists() && device.snapshot_dirs().contains(&s1()));

    // The fault is gone; the next deactivation retries and succeeds.
    device.write_config(
        &App {
            restart: 2,
            ..App::default()
        }
        .json(&device),
    );
    device
        .app_status(SETTLE, |s| settled(s, "1", &[]) && s.warnings.is_empty())
        .await
        .unwrap();
    assert!(!copy.exists(), "the snapshot copy is deleted");
    assert!(device.snapshot_dirs().is_empty(), "its records are deleted");
}

/// Gap 3. In EVE the second rollback to the same snapshot publishes a `VolumesSnapshotConfig`
/// equal to the first one; pubsub suppresses it and the rollback hangs with the app stopped.
/// Here the volume is changed after the first rollback and rolled back again to the same
/// snapshot: the second rollback must complete, restore the snapshot's content, and the app
/// must run on the snapshot's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap3_a_second_rollback_to_the_same_snapshot_works() {
    let with = App {
        snapshot: Some("immediate"),
        ..App::default()
    };
    let device = device_with_s1(&with).await;
    let volume = device.dir_volume(volume_id(), 0);
    let upgraded = App {
        version: "2",
        ..with.clone()
    };
    device.write_config(&upgraded.json(&device));
    device
        .app_status(SETTLE, |s| settled(s, "2", &[s1()]))
        .await
        .unwrap();

    for rollback in 1..=2 {
        std::fs::write(volume.join("after-snapshot"), b"changed").unwrap();
        device.write_config(
            &App {
                rollback,
                ..upgraded.clone()
            }
            .json(&device),
        );
        // The snapshot was taken before the app's first start: its content is an empty
        // directory, so the change vanishes, and the app's next start writes one run.
        let deadline = std::time::Instant::now() + SETTLE;
        while volume.join("after-snapshot").exists() || runs(&volume) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "rollback {rollback} did not restore the snapshot's content and start the app"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        device
            .app_status(SETTLE, |s| {
                settled(s, "1", &[s1()]) && !s.snap_status.rollback_in_progress
            })
            .await
            .unwrap_or_else(|e| panic!("rollback {rollback} did not complete: {e}"));
    }
}

/// Gap 4. EVE sets the time a snapshot was triggered on a copy of its status, so the record
/// and the report carry the zero time. Here an APP_UPDATE snapshot is requested, and triggered
/// by an upgrade a moment later: its time triggered (the upgrade, not the request) and its
/// time created must be in the app's status and in both records on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap4_time_triggered_and_time_created_are_recorded() {
    let mut device = Device::new();
    let waiting = App {
        snapshot: Some("app_update"),
        ..App::default()
    };
    device.write_config(&waiting.json(&device));
    device.start_all();
    device
        .app_status(SETTLE, |s| {
            s.activated && s.snap_status.requested_snapshots.len() == 1
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upgrade_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    device.write_config(
        &App {
            version: "2",
            ..waiting
        }
        .json(&device),
    );
    let status = device
        .app_status(SETTLE, |s| settled(s, "2", &[s1()]))
        .await
        .unwrap();
    let reported = &status.snap_status.available_snapshots[0];
    let triggered = reported.time_triggered.expect("time triggered reported");
    let created = reported.time_created.expect("time created reported");
    assert!(
        triggered.timestamp_millis() >= upgrade_at,
        "triggered at the upgrade (ms {upgrade_at}), not at the request: {triggered}"
    );
    assert!(created >= triggered, "{created} < {triggered}");

    let dir = snapshot_dir(&device.persist_dir(), s1());
    let record: SnapshotInstanceStatus =
        cairn_persist::load(&dir.join(SNAPSHOT_INSTANCE_STATUS_FILE))
            .unwrap()
            .record;
    assert_eq!(record.time_triggered, Some(triggered));
    assert_eq!(record.time_created, Some(created));
    let volumes: VolumesSnapshotStatus =
        cairn_persist::load(&dir.join(VOLUMES_SNAPSHOT_STATUS_FILE))
            .unwrap()
            .record;
    let made = volumes.time_created.expect("the volume record's time");
    assert!(made >= triggered && made <= created, "{made}");
}

/// Issue 6, purge by a new volume generation, with a purgeable volume: the snapshot keeps the
/// whole pre-purge volume. The purge takes the APP_UPDATE snapshot of generation 0 and starts
/// the app on a fresh generation 1; generation 0 stays (its config is gone, the snapshot keeps
/// it). A rollback points the app back at generation 0 itself; when the snapshot is dropped and
/// the controller moves on to a new version, generation 0 is released and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_keeps_the_purgeable_volume_for_its_snapshot_and_a_rollback_returns_to_it() {
    let mut device = Device::new();
    let first = App {
        purgeable: true,
        snapshot: Some("app_update"),
        ..App::default()
    };
    device.write_config(&first.json(&device));
    device.start_all();
    device
        .app_status(SETTLE, |s| s.activated && s.uuid_and_version.version == "1")
        .await
        .unwrap();
    let gen0 = device.dir_volume(volume_id(), 0);
    let gen1 = device.dir_volume(volume_id(), 1);
    std::fs::write(gen0.join("pre-purge"), b"data").unwrap();

    // The controller purges: version 2 on generation 1, and only generation 1 configured.
    let purged = App {
        version: "2",
        generation: 1,
        ..first.clone()
    };
    device.write_config(&purged.json(&device));
    device
        .app_status(SETTLE, |s| settled(s, "2", &[s1()]))
        .await
        .unwrap();
    assert_eq!(
        started_times(&gen1, 1).await,
        1,
        "the app runs on the fresh generation"
    );
    assert!(!gen1.join("pre-purge").exists());
    assert!(
        gen0.join("pre-purge").exists(),
        "the pre-purge volume is kept for the snapshot"
    );
    let record: VolumesSnapshotStatus = cairn_persist::load(
        &snapshot_dir(&device.persist_dir(), s1()).join(VOLUMES_SNAPSHOT_STATUS_FILE),
    )
    .unwrap()
    .record;
    let meta = record.meta_of(volume_id()).unwrap();
    assert_eq!(meta.snapshot_location, gen0, "the snapshot is generation 0");

    // Rollback: the app runs the snapshot's config on generation 0 again.
    device.write_config(
        &App {
            rollback: 1,
            ..purged.clone()
        }
        .json(&device),
    );
    device
        .app_status(SETTLE, |s| settled(s, "1", &[s1()]))
        .await
        .unwrap();
    assert_eq!(
        started_times(&gen0, 2).await,
        2,
        "started again on the pre-purge volume"
    );
    assert_eq!(runs(&gen1), 1);

    // The snapshot goes and the controller sends version 3 (on generation 1): nothing refers
    // to generation 0 any more.
    device.write_config(
        &App {
            version: "3",
            snapshot: None,
            rollback: 1,
            ..purged
        }
        .json(&device),
    );
    device
        .app_status(SETTLE, |s| settled(s, "3", &[]))
        .await
        .unwrap();
    assert_eq!(started_times(&gen1, 2).await, 2);
    let deadline = std::time::Instant::now() + SETTLE;
    while gen0.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "generation 0 was not released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(device.snapshot_dirs().is_empty());
}

/// Issue 6, records found at start: the app-manager's state file is lost (EVE never had one;
/// its records are all that is left after an upgrade from EVE). The snapshot's three records
/// are sound and the config lists it, so the restarted app-manager imports it as available,
/// with its original times, without stopping the app to take it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sound_records_left_by_a_lost_state_file_are_imported_not_taken_again() {
    let with = App {
        snapshot: Some("immediate"),
        ..App::default()
    };
    let mut device = device_with_s1(&with).await;
    let before = device
        .app_status(SETTLE, |s| settled(s, "1", &[s1()]))
        .await
        .unwrap();
    let created = before.snap_status.available_snapshots[0].time_created;
    let volume = device.dir_volume(volume_id(), 0);
    let starts = runs(&volume);

    device.kill("app-manager");
    let state_dir = device.persist_dir().join("app-manager").join("apps");
    std::fs::remove_dir_all(&state_dir).unwrap();
    device.start("app-manager", None);

    let after = device
        .app_status(SETTLE, |s| settled(s, "1", &[s1()]))
        .await
        .unwrap();
    assert_eq!(
        after.snap_status.available_snapshots[0].time_created,
        created
    );
    assert!(
        !after.warnings.iter().any(|w| w.contains("not imported")),
        "{:?}",
        after.warnings
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        runs(&volume),
        starts,
        "the app was not stopped to take the snapshot again"
    );
    assert!(
        state_dir.join(format!("{APP}.json")).exists(),
        "tracked again"
    );
}

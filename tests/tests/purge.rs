//! Issue 6, purge by the purge counter alone (the controller's volume generation unchanged),
//! across the real agents: the app-manager gives the app's volumes a new local generation
//! (`<uuid>#<gen>.<local>`, EVE's LocalGenerationCounter), persisted before it acts; its holds
//! (`AppVolumeRefs`) ask the volume-manager for the fresh volumes; the APP_UPDATE snapshot is
//! taken of the old ones; the app restarts on the new ones; the old ones are released (kept
//! only when the snapshot lives in them: purgeable). The app is a shell process on a directory
//! volume; it appends a line to `runs` in its volume at each start.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::AppInstanceStatus;
use uuid::Uuid;

const APP: &str = "e2e0ea90-0000-4000-8000-00000000a002";
const VOLUME: &str = "e2e0ea90-0000-4000-8000-00000000b002";
const S1: &str = "e2e0ea90-0000-4000-8000-00000000c002";

const SETTLE: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct App {
    purgeable: bool,
    purge: u32,
    rollback: u32,
}

impl App {
    fn json(&self, device: &Device) -> String {
        let marker = device.root.path().display();
        format!(
            r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "1", "display_name": "purge", "purge": {purge},
    "volume_refs": [{{"uuid": "{VOLUME}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 1, "active_snapshot": "{S1}", "rollback_counter": {rollback},
                  "snapshots": [{{"id": "{S1}", "type": "app_update"}}]}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "echo run >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "generation_count": 0, "format": "dir",
                "purgeable": {purgeable}}}]
}}"#,
            purge = self.purge,
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

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Running with S1 available and nothing in flight.
fn settled(s: &AppInstanceStatus) -> bool {
    s.activated
        && s.snap_status.requested_snapshots.is_empty()
        && s.snap_status.snapshots_to_be_deleted.is_empty()
        && s.snap_status
            .available_snapshots
            .iter()
            .map(|a| a.snapshot.snapshot_id)
            .collect::<BTreeSet<_>>()
            == BTreeSet::from([s1()])
}

/// Where the copy backend keeps S1 of the volume at local generation 0.
fn copy_of_s1(device: &Device) -> PathBuf {
    cairn_types::layout::volumes_dir(&device.persist_dir())
        .join(".snapshots")
        .join(cairn_types::volume_key(volume_id(), 0))
        .join(S1)
}

/// A device running the app on generation 0 with a file written into its volume; S1 waits.
async fn running_device(app: &App) -> (Device, PathBuf) {
    let mut device = Device::new();
    device.write_config(&app.json(&device));
    device.start_all();
    device
        .app_status(SETTLE, |s| {
            s.activated && s.snap_status.requested_snapshots.len() == 1
        })
        .await
        .unwrap();
    let gen0 = device.dir_volume(volume_id(), 0);
    device
        .until(SETTLE, "the app ran on generation 0", || runs(&gen0) == 1)
        .await;
    std::fs::write(gen0.join("pre-purge"), b"data").unwrap();
    (device, gen0)
}

/// After the purge: the app runs once on an empty `#0.1`, S1 is available.
async fn purged(device: &Device) -> PathBuf {
    device.app_status(SETTLE, settled).await.unwrap();
    let fresh = device.dir_volume_local(volume_id(), 0, 1);
    device
        .until(SETTLE, "the app started on the fresh volume", || {
            runs(&fresh) == 1
        })
        .await;
    assert!(!fresh.join("pre-purge").exists(), "the new volume is empty");
    fresh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_counter_increase_runs_the_app_on_a_fresh_volume_and_releases_the_old_one() {
    let app = App::default();
    let (device, gen0) = running_device(&app).await;

    let purge = App { purge: 1, ..app };
    device.write_config(&purge.json(&device));
    let fresh = purged(&device).await;
    let copy = copy_of_s1(&device);
    assert_eq!(
        std::fs::read(copy.join("pre-purge")).unwrap(),
        b"data",
        "the APP_UPDATE snapshot holds the old content"
    );
    device
        .until(SETTLE, "the old volume is released", || !gen0.exists())
        .await;
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s1()]));

    // Rollback to S1: the old volume is made again from the snapshot, the app runs on it.
    device.write_config(
        &App {
            rollback: 1,
            ..purge
        }
        .json(&device),
    );
    device
        .until(SETTLE, "the app runs on the restored old volume", || {
            gen0.join("pre-purge").exists() && runs(&gen0) == 2
        })
        .await;
    device
        .app_status(SETTLE, |s| {
            settled(s) && !s.snap_status.rollback_in_progress
        })
        .await
        .unwrap();
    assert_eq!(runs(&fresh), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_counter_increase_keeps_the_purgeable_volume_for_its_snapshot() {
    let app = App {
        purgeable: true,
        ..App::default()
    };
    let (device, gen0) = running_device(&app).await;
    device.write_config(&App { purge: 1, ..app }.json(&device));
    purged(&device).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gen0.join("pre-purge").exists(),
        "the purgeable snapshot is the old volume itself"
    );
}

/// The app-manager SIGKILLs itself right after persisting the purge intent (new local
/// generation, stop asked): restarted, it converges on the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_interrupted_right_after_its_intent_was_persisted_converges() {
    let app = App::default();
    let (mut device, gen0) = running_device(&app).await;
    device.kill("app-manager");
    device.start("app-manager", Some("app-manager:after-persist-intent"));
    // Let it come up and adopt the running app before the purge arrives.
    device
        .app_status(SETTLE, |s| {
            s.activated && s.snap_status.requested_snapshots.len() == 1
        })
        .await
        .unwrap();
    device.write_config(&App { purge: 1, ..app }.json(&device));
    assert!(
        device.died_within("app-manager", SETTLE),
        "the app-manager never reached its crash point at the purge"
    );
    device.start("app-manager", None);
    purged(&device).await;
    assert_eq!(
        std::fs::read(copy_of_s1(&device).join("pre-purge")).unwrap(),
        b"data"
    );
    device
        .until(SETTLE, "the old volume is released", || !gen0.exists())
        .await;
    assert_eq!(device.snapshot_dirs(), BTreeSet::from([s1()]));
    let fresh = device.dir_volume_local(volume_id(), 0, 1);
    assert_eq!(runs(&fresh), 1, "started once on the fresh volume");
}

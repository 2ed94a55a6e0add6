//! Issue 10 item 5, clone, across the real agents: app A (a shell process on a `dir` volume)
//! writes a file; snapshot S (immediate) is taken; A's volume changes afterwards; then a config
//! adds app B as a clone of (A, S) on a volume of its own: B runs with A's file as of S, under
//! its own UUID. Deleting S afterwards leaves B and its volume alone.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::AppInstanceStatus;
use uuid::Uuid;

const A: &str = "c10e0e2e-0000-4000-8000-00000000a001";
const B: &str = "c10e0e2e-0000-4000-8000-00000000a002";
const VOL_A: &str = "c10e0e2e-0000-4000-8000-00000000b001";
const VOL_B: &str = "c10e0e2e-0000-4000-8000-00000000b002";
const S: &str = "c10e0e2e-0000-4000-8000-00000000c001";

const SETTLE: Duration = Duration::from_secs(30);

/// The config: A with S listed (or not) and its restart counter; B cloned from (A, S) if asked.
fn config(device: &Device, with_s: bool, restart: u32, clone: Option<bool>) -> String {
    let marker = device.root.path().display();
    let snapshots = if with_s {
        format!(r#"{{"id": "{S}", "type": "immediate"}}"#)
    } else {
        String::new()
    };
    let b = match clone {
        None => String::new(),
        Some(spec) => {
            let clone_of = if spec {
                format!(r#""clone_of": {{"app": "{A}", "snapshot": "{S}"}},"#)
            } else {
                String::new()
            };
            format!(
                r#",{{
    "uuid": "{B}", "version": "1", "display_name": "b", {clone_of}
    "volume_refs": [{{"uuid": "{VOL_B}"}}],
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "cat data > seen-by-b; echo b >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}"#
            )
        }
    };
    let vol_b = if clone.is_some() {
        format!(r#",{{"uuid": "{VOL_B}", "format": "dir"}}"#)
    } else {
        String::new()
    };
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{A}", "version": "1", "display_name": "a", "restart": {restart},
    "volume_refs": [{{"uuid": "{VOL_A}"}}],
    "snapshot": {{"max_snapshots": 2, "snapshots": [{snapshots}]}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "[ -e data ] || echo as-of-s > data; while :; do sleep 1; done", "{marker}"]}}
  }}{b}],
  "volumes": [{{"uuid": "{VOL_A}", "format": "dir"}}{vol_b}]
}}"#
    )
}

fn id(text: &str) -> Uuid {
    text.parse().unwrap()
}

fn s_available(s: &AppInstanceStatus) -> bool {
    s.uuid_and_version.uuid == id(A)
        && s.activated
        && s.snap_status.requested_snapshots.is_empty()
        && s.snap_status
            .available_snapshots
            .iter()
            .any(|a| a.snapshot.snapshot_id == id(S))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_runs_on_a_copy_of_the_snapshot_under_its_own_uuid_and_outlives_the_snapshot() {
    let mut device = Device::new();
    device.write_config(&config(&device, false, 0, None));
    device.start_all();
    let vol_a = device.dir_volume(id(VOL_A), 0);
    device
        .until(SETTLE, "app A wrote its file", || {
            vol_a.join("data").exists()
        })
        .await;

    // S, immediate: A stops, S is taken, A starts again.
    device.write_config(&config(&device, true, 0, None));
    device.app_status(SETTLE, s_available).await.unwrap();
    // A's volume moves on after S.
    std::fs::write(vol_a.join("data"), b"after-s\n").unwrap();
    std::fs::write(vol_a.join("later"), b"x").unwrap();

    // B, a clone of (A, S).
    device.write_config(&config(&device, true, 0, Some(true)));
    let b = device
        .app_status(SETTLE, |s| s.uuid_and_version.uuid == id(B) && s.activated)
        .await
        .unwrap();
    assert_eq!(b.uuid_and_version.uuid, id(B), "B has its own UUID");
    let vol_b = device.dir_volume(id(VOL_B), 0);
    device
        .until(SETTLE, "B ran on its volume", || {
            vol_b.join("runs").exists()
        })
        .await;
    assert_eq!(
        std::fs::read_to_string(vol_b.join("seen-by-b")).unwrap(),
        "as-of-s\n",
        "B started with A's file as of S"
    );
    assert!(!vol_b.join("later").exists(), "nothing A wrote after S");
    assert_eq!(
        std::fs::read_to_string(vol_a.join("data")).unwrap(),
        "after-s\n",
        "A's volume is its own"
    );

    // S leaves A's list (and B's clone spec goes with it; B stays); A restarts, so the
    // deferred deletion runs.
    device.write_config(&config(&device, false, 1, Some(false)));
    device
        .until(SETTLE, "S is deleted", || {
            !device.snapshot_dirs().contains(&id(S))
                && !device.dir_volume_snapshots(id(VOL_A), 0).contains(&id(S))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(vol_b.join("seen-by-b")).unwrap(),
        "as-of-s\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol_b.join("data")).unwrap(),
        "as-of-s\n",
        "B's volume is untouched by the deletion of S"
    );
    assert_eq!(
        std::fs::read_to_string(vol_b.join("runs")).unwrap(),
        "b\n",
        "B was not restarted"
    );
    device
        .app_status(SETTLE, |s| s.uuid_and_version.uuid == id(B) && s.activated)
        .await
        .unwrap();
}

//! Consistency groups (issue 10, item 3) across the real agents: two process apps on `dir`
//! volumes, each listing its own snapshot of one group. The group is taken all or nothing, at
//! one logical time, and rolled back together.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::AppInstanceStatus;
use uuid::Uuid;

const APPS: [&str; 2] = [
    "e2e06a00-0000-4000-8000-00000000a001",
    "e2e06a00-0000-4000-8000-00000000a002",
];
const VOLUMES: [&str; 2] = [
    "e2e06a00-0000-4000-8000-00000000b001",
    "e2e06a00-0000-4000-8000-00000000b002",
];
/// Each member's own snapshot of the group.
const SNAPS: [&str; 2] = [
    "e2e06a00-0000-4000-8000-00000000c001",
    "e2e06a00-0000-4000-8000-00000000c002",
];
/// The group snapshot both members list.
const GROUP: &str = "e2e06a00-0000-4000-8000-00000000d001";
/// The consistency group the device's config declares with both apps as members.
const PAIR: &str = "e2e06a00-0000-4000-8000-00000000e001";

const SETTLE: Duration = Duration::from_secs(30);

fn uuid(s: &str) -> Uuid {
    s.parse().unwrap()
}

/// Both apps at `version`, members of the group `PAIR`; with `group`, each lists its snapshot
/// of the group snapshot `GROUP`.
fn config(device: &Device, version: &str, group: bool, rollback: u32) -> String {
    config_with_policy(device, version, group, rollback, "")
}

/// [`config`] with `policy` (JSON members, e.g. `"schedule": "@hourly"`) in the group.
fn config_with_policy(
    device: &Device,
    version: &str,
    group: bool,
    rollback: u32,
    policy: &str,
) -> String {
    let marker = device.root.path().display();
    let apps: Vec<String> = (0..2)
        .map(|i| {
            let snapshots = if group {
                format!(
                    r#"{{"id": "{}", "type": "immediate", "group": "{GROUP}"}}"#,
                    SNAPS[i]
                )
            } else {
                String::new()
            };
            format!(
                r#"{{
    "uuid": "{app}", "version": "{version}", "display_name": "member-{i}",
    "volume_refs": [{{"uuid": "{volume}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 2, "active_snapshot": "{snap}", "rollback_counter": {rollback},
                  "snapshots": [{snapshots}]}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "echo {version} >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}"#,
                app = APPS[i],
                volume = VOLUMES[i],
                snap = SNAPS[i],
            )
        })
        .collect();
    let volumes: Vec<String> = VOLUMES
        .iter()
        .map(|v| format!(r#"{{"uuid": "{v}", "generation_count": 0, "format": "dir"}}"#))
        .collect();
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!(", {policy}")
    };
    format!(
        r#"{{"apps": [{}], "volumes": [{}],
            "groups": [{{"id": "{PAIR}", "name": "pair", "members": ["{}", "{}"]{policy}}}]}}"#,
        apps.join(", "),
        volumes.join(", "),
        APPS[0],
        APPS[1]
    )
}

/// Waits until every member's latest status satisfies `done`; returns them by app.
async fn members(
    device: &Device,
    done: impl Fn(usize, &AppInstanceStatus) -> bool,
) -> BTreeMap<usize, AppInstanceStatus> {
    settled(device, |latest| latest.iter().all(|(i, s)| done(*i, s))).await
}

/// Waits until the members' latest statuses, together, satisfy `done`; returns them by app.
async fn settled(
    device: &Device,
    done: impl Fn(&BTreeMap<usize, AppInstanceStatus>) -> bool,
) -> BTreeMap<usize, AppInstanceStatus> {
    let mut sub = device.app_statuses();
    let mut latest: BTreeMap<usize, AppInstanceStatus> = BTreeMap::new();
    let found = tokio::time::timeout(SETTLE, async {
        loop {
            if let cairn_pubsub::Event::Create { value, .. }
            | cairn_pubsub::Event::Modify { new: value, .. } = sub.recv().await
                && let Some(i) = APPS
                    .iter()
                    .position(|a| uuid(a) == value.uuid_and_version.uuid)
            {
                latest.insert(i, value);
                if latest.len() == 2 && done(&latest) {
                    return;
                }
            }
        }
    })
    .await;
    assert!(found.is_ok(), "members not settled: {latest:#?}");
    latest
}

fn running(s: &AppInstanceStatus, version: &str) -> bool {
    s.activated
        && s.uuid_and_version.version == version
        && s.snap_status
            .requested_snapshots
            .iter()
            .all(|r| r.error.is_error())
        && s.snap_status.snapshots_to_be_deleted.is_empty()
}

fn available(i: usize, s: &AppInstanceStatus) -> bool {
    s.snap_status
        .available_snapshots
        .iter()
        .any(|a| a.snapshot.snapshot_id == uuid(SNAPS[i]))
}

async fn device_running(version: &str) -> Device {
    let mut device = Device::new();
    device.write_config(&config(&device, version, false, 0));
    device.start_all();
    members(&device, |_, s| running(s, version)).await;
    device
}

fn runs(device: &Device, i: usize) -> Vec<String> {
    std::fs::read_to_string(device.dir_volume(uuid(VOLUMES[i]), 0).join("runs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn take_group(device: &Device) -> BTreeMap<usize, AppInstanceStatus> {
    device.write_config(&config(device, "1", true, 0));
    members(device, |i, s| running(s, "1") && available(i, s)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_stops_takes_and_restarts_every_member_at_one_time() {
    let device = device_running("1").await;
    let statuses = take_group(&device).await;
    let records: Vec<_> = (0..2)
        .map(|i| {
            statuses[&i]
                .snap_status
                .available_snapshots
                .iter()
                .find(|a| a.snapshot.snapshot_id == uuid(SNAPS[i]))
                .unwrap()
                .clone()
        })
        .collect();
    for record in &records {
        assert_eq!(record.snapshot.group_id, uuid(GROUP));
        assert!(record.time_created.is_some());
    }
    assert_eq!(
        records[0].time_created, records[1].time_created,
        "one logical time for the group"
    );
    for i in 0..2 {
        assert_eq!(
            device.dir_volume_snapshots(uuid(VOLUMES[i]), 0),
            [uuid(SNAPS[i])].into(),
            "member {i}'s volume snapshot"
        );
        // Stopped for the snapshot and started again.
        assert_eq!(runs(&device, i).len(), 2, "member {i} ran twice");
    }
    assert_eq!(
        device.snapshot_dirs(),
        SNAPS.iter().map(|s| uuid(s)).collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_failing_at_one_member_leaves_no_snapshot_on_any() {
    let device = device_running("1").await;
    // Member 2's volume snapshot cannot be made: where the backend keeps its snapshots is a
    // file, not a directory.
    let blocker = cairn_types::layout::volumes_dir(&device.persist_dir())
        .join(".snapshots")
        .join(cairn_types::volume_key(uuid(VOLUMES[1]), 0));
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();

    device.write_config(&config(&device, "1", true, 0));
    let failed = |i: usize, s: &AppInstanceStatus| {
        s.snap_status.requested_snapshots.iter().any(|r| {
            r.snapshot.snapshot_id == uuid(SNAPS[i])
                && r.error.error.contains(GROUP)
                && r.error.error.contains(APPS[1])
        })
    };
    let statuses = members(&device, |i, s| {
        running(s, "1") && failed(i, s) && s.snap_status.available_snapshots.is_empty()
    })
    .await;
    for (i, s) in &statuses {
        assert!(
            s.snap_status.available_snapshots.is_empty(),
            "member {i}: {s:#?}"
        );
    }
    // Member 1's snapshot was taken and removed again: nothing of it on its volume, no records.
    assert!(device.dir_volume_snapshots(uuid(VOLUMES[0]), 0).is_empty());
    // Member 1's records are gone; member 2 has at most the volume-manager's record of its
    // failed attempt, never a snapshot's (`snapshotInstanceStatus.json`).
    device
        .until(SETTLE, "member 1's snapshot records removed", || {
            !device.snapshot_dirs().contains(&uuid(SNAPS[0]))
        })
        .await;
    let failed_dir = cairn_types::layout::snapshot_dir(&device.persist_dir(), uuid(SNAPS[1]));
    assert!(
        !failed_dir
            .join(cairn_types::layout::SNAPSHOT_INSTANCE_STATUS_FILE)
            .exists(),
        "{}",
        failed_dir.display()
    );
    // Running in the status can come a moment before the app's shell writes its run line.
    for i in 0..2 {
        device
            .until(SETTLE, &format!("member {i} ran again"), || {
                runs(&device, i).len() >= 2
            })
            .await;
        assert_eq!(
            runs(&device, i).len(),
            2,
            "member {i} ran more than once again"
        );
    }
    std::fs::remove_file(&blocker).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rollback_returns_every_member_to_the_snapshot() {
    let device = device_running("1").await;
    take_group(&device).await;
    // Both upgraded, then both rolled back to their snapshot of the group.
    device.write_config(&config(&device, "2", true, 0));
    members(&device, |i, s| running(s, "2") && available(i, s)).await;
    device.write_config(&config(&device, "2", true, 1));
    let statuses = members(&device, |i, s| {
        running(s, "1") && available(i, s) && !s.snap_status.rollback_in_progress
    })
    .await;
    for (i, s) in &statuses {
        assert!(!s.error.is_error(), "member {i}: {s:#?}");
        // The volume is the snapshot's again: the runs of version 2 are gone.
        let runs = runs(&device, *i);
        assert_eq!(runs, vec!["1", "1"], "member {i}");
    }
}

/// Scheduled group snapshots under an injected clock (the app-manager's `CAIRN_TEST_CLOCK`:
/// an hour every 2 s): at each due time both members take their snapshot of one group
/// snapshot, at one time, and the group's keep-last 2 leaves the two newest on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_schedule_snapshots_every_member_together_and_keeps_its_retention() {
    let mut device = Device::new();
    device.set_agent_env(
        "app-manager",
        "CAIRN_TEST_CLOCK",
        "2026-05-04T10:00:00Zx1800",
    );
    device.write_config(&config_with_policy(
        &device,
        "1",
        false,
        0,
        r#""schedule": "@hourly", "retention": {"keep_last": 2}, "pattern": "pair-%n-%a""#,
    ));
    device.start_all();
    let counter = |name: &str| -> u64 { name.split('-').nth(1).unwrap().parse().unwrap() };
    let groups_of = |s: &AppInstanceStatus| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = s
            .snap_status
            .available_snapshots
            .iter()
            .map(|a| a.snapshot.group_id)
            .collect();
        ids.sort();
        ids
    };
    // Both members past their fourth scheduled snapshot, seen at the same point.
    let statuses = settled(&device, |latest| {
        latest.values().all(|s| {
            running(s, "1")
                && s.snap_status.requested_snapshots.is_empty()
                && s.snap_status
                    .available_snapshots
                    .iter()
                    .any(|a| counter(&a.snapshot.name) >= 4)
        }) && groups_of(&latest[&0]) == groups_of(&latest[&1])
    })
    .await;
    device.kill("app-manager");
    // Per group snapshot: the members' (counter, time created).
    let mut taken: BTreeMap<Uuid, Vec<(usize, u64, _)>> = BTreeMap::new();
    for (i, s) in &statuses {
        let available = &s.snap_status.available_snapshots;
        assert_eq!(
            available.len(),
            2,
            "member {i} keeps the 2 newest: {available:#?}"
        );
        for a in available {
            assert!(!a.snapshot.group_id.is_nil(), "a group snapshot");
            assert!(
                a.snapshot.name.ends_with(&format!("-member-{i}")),
                "{}",
                a.snapshot.name
            );
            taken.entry(a.snapshot.group_id).or_default().push((
                *i,
                counter(&a.snapshot.name),
                a.time_created,
            ));
        }
    }
    assert_eq!(
        taken.len(),
        2,
        "the same two group snapshots on both members: {taken:#?}"
    );
    for (group_snapshot, members) in &taken {
        assert_eq!(members.len(), 2, "{group_snapshot}: both members");
        assert_eq!(members[0].1, members[1].1, "{group_snapshot}: one due time");
        assert_eq!(
            members[0].2, members[1].2,
            "{group_snapshot}: one logical time"
        );
    }
    // On the volumes: exactly the kept ones.
    for (i, s) in &statuses {
        let kept: std::collections::BTreeSet<Uuid> = s
            .snap_status
            .available_snapshots
            .iter()
            .map(|a| a.snapshot.snapshot_id)
            .collect();
        device
            .until(
                SETTLE,
                "older group snapshots deleted from the volume",
                || device.dir_volume_snapshots(uuid(VOLUMES[*i]), 0) == kept,
            )
            .await;
    }
}

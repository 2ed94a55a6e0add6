//! The app-manager as a process, against stand-ins for the other agents that follow their bus
//! contracts: a domain-manager that runs or halts what it is told, a volume-manager that keeps a
//! set of snapshots and answers each request with its counter.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cairn_pubsub::PublishOptions;
use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, snapshot_dir};
use cairn_types::{AppInstanceConfig, SnapshotType, VolumeConfig, VolumesSnapshotAction};
use uuid::Uuid;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_snapshot_goes_through_the_other_agents_and_lands_on_disk() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend.clone()).await;
    let config_agent = roots.bus("config-agent");
    let configs = config_agent
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    let _volumes = config_agent
        .publish::<VolumeConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs.publish(app_config(&[])).await.unwrap();
    let _manager = AppManagerProcess::start(&roots, None);

    until_status(&roots, |s| s.activated).await;
    configs
        .publish(app_config(&[(SNAP, SnapshotType::Immediate)]))
        .await
        .unwrap();
    let status = until_status(&roots, |s| {
        s.activated && !s.snap_status.available_snapshots.is_empty()
    })
    .await;
    let snapshot = &status.snap_status.available_snapshots[0];
    assert_eq!(snapshot.snapshot.snapshot_id, Uuid::from_u128(SNAP));
    assert!(snapshot.time_triggered.is_some() && snapshot.time_created.is_some());
    let (config, record) = snapshot_files(&roots.persist(), SNAP);
    assert_eq!(config.uuid_and_version.version, "1");
    assert_eq!(record.snapshot.snapshot_id, Uuid::from_u128(SNAP));
    assert!(
        backend
            .lock()
            .unwrap()
            .snapshots
            .contains(&Uuid::from_u128(SNAP))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_right_after_asking_for_the_snapshot_it_asks_again_and_converges() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend.clone()).await;
    let config_agent = roots.bus("config-agent");
    let configs = config_agent
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs
        .publish(app_config(&[(SNAP, SnapshotType::Immediate)]))
        .await
        .unwrap();

    let mut first = AppManagerProcess::start(&roots, Some("app-manager:after-volumes-request"));
    first.wait_crash();
    let _second = AppManagerProcess::start(&roots, None);
    let status = until_status(&roots, |s| {
        s.activated && !s.snap_status.available_snapshots.is_empty()
    })
    .await;
    assert_eq!(status.snap_status.available_snapshots.len(), 1);
    let b = backend.lock().unwrap();
    assert_eq!(b.snapshots, BTreeSet::from([Uuid::from_u128(SNAP)]));
    // The restarted agent repeats the request it had persisted (same counter): the volume
    // operation is asked for again, never a second, different one.
    let creates: Vec<u64> = b
        .requests
        .iter()
        .filter(|(a, _)| *a == VolumesSnapshotAction::Create)
        .map(|(_, c)| *c)
        .collect();
    assert!(!creates.is_empty());
    assert!(creates.iter().all(|c| *c == creates[0]), "{creates:?}");
    drop(b);
    snapshot_files(&roots.persist(), SNAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_found_damaged_or_untracked_at_startup_are_reported_in_the_app_status() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let persist = roots.persist();
    let app = Uuid::from_u128(APP);
    // A damaged record whose config file still names the app.
    let damaged = snapshot_dir(&persist, Uuid::from_u128(0xdead));
    std::fs::create_dir_all(&damaged).unwrap();
    cairn_persist::store(&damaged.join(APP_INSTANCE_CONFIG_FILE), &app_config(&[])).unwrap();
    std::fs::write(
        damaged.join(SNAPSHOT_INSTANCE_STATUS_FILE),
        format!(r#"{{"Snapshot": {{}}, "AppInstanceID": "{app}", "ConfigVersion": {{"UUID": "{app}"}}}}"#),
    )
    .unwrap();
    // A sound record (as EVE writes it) that this app-manager never made.
    let foreign = snapshot_dir(&persist, Uuid::from_u128(0xf0e));
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(
        foreign.join(SNAPSHOT_INSTANCE_STATUS_FILE),
        format!(
            r#"{{"Snapshot": {{"SnapshotID": "{}"}}, "AppInstanceID": "{app}", "ConfigVersion": {{"UUID": "{app}", "Version": "1"}}}}"#,
            Uuid::from_u128(0xf0e)
        ),
    )
    .unwrap();
    // A directory with nothing in it: logged, and it must not disturb anything.
    std::fs::create_dir_all(snapshot_dir(&persist, Uuid::from_u128(0xe11))).unwrap();

    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend).await;
    let configs = roots
        .bus("config-agent")
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs.publish(app_config(&[])).await.unwrap();
    let _manager = AppManagerProcess::start(&roots, None);
    let status = until_status(&roots, |s| s.activated && s.warnings.len() >= 2).await;
    let warnings = status.warnings.join("\n");
    assert!(
        warnings.contains("corrupt snapshot record") && warnings.contains("Snapshot.SnapshotID"),
        "{warnings}"
    );
    assert!(
        warnings.contains(&damaged.display().to_string()),
        "{warnings}"
    );
    assert!(
        warnings.contains("not tracked") && warnings.contains(&foreign.display().to_string()),
        "{warnings}"
    );
    // Reported, never removed.
    assert!(damaged.join(SNAPSHOT_INSTANCE_STATUS_FILE).exists());
    assert!(foreign.join(SNAPSHOT_INSTANCE_STATUS_FILE).exists());
}

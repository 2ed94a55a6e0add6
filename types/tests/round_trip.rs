//! Any snapshot record or app config survives store → load unchanged, through real files.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use cairn_persist::{load, store};
use cairn_types::{
    AppInstanceConfig, AppInstanceOpsCmd, DomainSpec, ErrorDescription, ErrorEntityType,
    ErrorSeverity, ProcessSpec, SnapshotConfig, SnapshotDesc, SnapshotInstanceStatus, SnapshotType,
    UUIDandVersion, VolumeRefConfig, VolumesSnapshotAction, VolumesSnapshotStatus,
};
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

fn any_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn any_time() -> impl Strategy<Value = Option<DateTime<Utc>>> {
    prop::option::of(
        (0i64..4_000_000_000, 0u32..1_000_000_000)
            .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).single().expect("in range")),
    )
}

fn any_snapshot_type() -> impl Strategy<Value = SnapshotType> {
    prop_oneof![
        Just(SnapshotType::Unspecified),
        Just(SnapshotType::AppUpdate),
        Just(SnapshotType::Immediate)
    ]
}

fn any_error() -> impl Strategy<Value = ErrorDescription> {
    prop_oneof![
        Just(ErrorDescription::default()),
        ("\\PC{1,40}", any_time(), any_uuid()).prop_map(|(text, time, id)| {
            let at = time.unwrap_or_else(|| Utc.timestamp_opt(1, 0).single().expect("valid"));
            ErrorDescription::new(text, ErrorSeverity::Error, at).about(ErrorEntityType::Volume, id)
        }),
    ]
}

fn any_desc() -> impl Strategy<Value = SnapshotDesc> {
    (any_uuid(), any_snapshot_type()).prop_map(|(snapshot_id, snapshot_type)| SnapshotDesc {
        snapshot_id,
        snapshot_type,
        ..Default::default()
    })
}

prop_compose! {
    fn any_snapshot_status()(
        snapshot in any_desc(), reported in any::<bool>(), time_triggered in any_time(),
        time_created in any_time(), app in any_uuid(), version in "[0-9]{0,4}", error in any_error(),
    ) -> SnapshotInstanceStatus {
        SnapshotInstanceStatus {
            snapshot, reported, time_triggered, time_created, app_instance_id: app,
            config_version: UUIDandVersion { uuid: app, version }, error,
            ..Default::default()
        }
    }
}

prop_compose! {
    fn any_volumes_status()(
        id in any_uuid(), app in any_uuid(),
        meta in prop::collection::btree_map(any_uuid(), "[a-z0-9-]{1,20}", 0..4),
        time_created in any_time(), counter in any::<u64>(), error in any_error(),
    ) -> VolumesSnapshotStatus {
        VolumesSnapshotStatus {
            snapshot_id: id,
            volume_snapshot_meta: meta.into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect(),
            time_created, app_uuid: app, ref_count: 1,
            result_of_action: VolumesSnapshotAction::Create, request_counter: counter,
            volume_errors: BTreeMap::new(), error_source_type: String::new(), error,
            ..Default::default()
        }
    }
}

prop_compose! {
    fn any_app_config()(
        app in any_uuid(), version in "[0-9]{1,3}", name in "\\PC{0,20}", activate in any::<bool>(),
        volumes in prop::collection::vec((any_uuid(), 0i64..5), 0..4),
        snapshots in prop::collection::vec(any_desc(), 0..5), max in 0u32..8, rollback in 0u32..9,
        args in prop::collection::vec("\\PC{0,8}", 0..3),
    ) -> AppInstanceConfig {
        AppInstanceConfig {
            uuid_and_version: UUIDandVersion { uuid: app, version },
            display_name: name,
            activate,
            volume_ref_config_list: volumes.into_iter().map(|(volume_id, generation_counter)| {
                VolumeRefConfig { volume_id, generation_counter, ..Default::default() }
            }).collect(),
            purge_cmd: AppInstanceOpsCmd { counter: rollback, apply_time: String::new() },
            snapshot: SnapshotConfig {
                max_snapshots: max,
                rollback_cmd: AppInstanceOpsCmd { counter: rollback, apply_time: String::new() },
                snapshots, ..Default::default()
            },
            domain: Some(DomainSpec::Process(ProcessSpec { command: "/bin/sh".into(), args, ..Default::default() })),
            ..Default::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn snapshot_instance_status_round_trips(value in any_snapshot_status()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        store(&path, &value).unwrap();
        prop_assert_eq!(load::<SnapshotInstanceStatus>(&path).unwrap().record, value);
    }

    #[test]
    fn volumes_snapshot_status_round_trips(value in any_volumes_status()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.json");
        store(&path, &value).unwrap();
        prop_assert_eq!(load::<VolumesSnapshotStatus>(&path).unwrap().record, value);
    }

    #[test]
    fn app_instance_config_round_trips(value in any_app_config()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        store(&path, &value).unwrap();
        prop_assert_eq!(load::<AppInstanceConfig>(&path).unwrap().record, value);
    }
}

#[test]
fn an_app_state_is_written_as_eves_number_and_read_as_number_or_name() {
    use cairn_types::SwState;
    assert_eq!(serde_json::to_string(&SwState::Running).unwrap(), "115");
    assert_eq!(
        serde_json::from_str::<SwState>("115").unwrap(),
        SwState::Running
    );
    assert_eq!(
        serde_json::from_str::<SwState>("\"HALTED\"").unwrap(),
        SwState::Halted
    );
    assert_eq!(
        serde_json::from_str::<SwState>("113").unwrap(),
        SwState::StartDelayed
    );
    let number = serde_json::from_str::<SwState>("200")
        .unwrap_err()
        .to_string();
    assert!(
        number.contains("200") && number.contains("SwState"),
        "{number}"
    );
    let name = serde_json::from_str::<SwState>("\"Running\"")
        .unwrap_err()
        .to_string();
    assert!(
        name.contains("Running") && name.contains("SwState"),
        "{name}"
    );
}

//! Snapshot records as EVE writes them load as they are (import), every one of EVE's mandatory
//! fields is enforced, and Cairn's nested checks (which EVE lacks) name the missing field's path.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};

use cairn_persist::{DecodeError, ErrorKind, Format, Record, load, store};
use cairn_types::layout::{
    APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, VOLUMES_SNAPSHOT_STATUS_FILE,
};
use cairn_types::{
    AppInstanceConfig, ErrorSeverity, SnapshotInstanceStatus, SnapshotType, VolumesSnapshotAction,
    VolumesSnapshotStatus,
};
use uuid::Uuid;

const SNAPSHOT: &str = "4d1c3b0e-8a51-4c9e-9f3e-2b7f0d6a1c11";
const APP: &str = "9a3e5c1d-2f4b-4d8e-a6c7-0b1d2e3f4a5b";
const VOLUME: &str = "c3d2e1f0-1111-4222-8333-944455556666";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eve")
        .join(name)
}

fn uuid(text: &str) -> Uuid {
    text.parse().unwrap()
}

#[test]
fn eve_snapshot_instance_status_loads() {
    let loaded = load::<SnapshotInstanceStatus>(&fixture(SNAPSHOT_INSTANCE_STATUS_FILE)).unwrap();
    assert_eq!(loaded.format, Format::Plain);
    let r = loaded.record;
    assert_eq!(r.snapshot.snapshot_id, uuid(SNAPSHOT));
    assert_eq!(r.snapshot.snapshot_type, SnapshotType::AppUpdate);
    assert_eq!(r.app_instance_id, uuid(APP));
    assert_eq!(r.config_version.version, "3");
    assert!(r.reported);
    assert_eq!(
        r.time_created.unwrap().to_rfc3339(),
        "2024-05-02T08:11:14.500+00:00"
    );
    assert_eq!(
        r.time_triggered.unwrap().timestamp_subsec_nanos(),
        123_456_789
    );
    assert!(!r.error.is_error());
    assert_eq!(r.error.error_time, None);
}

#[test]
fn eve_volumes_snapshot_status_loads_with_its_flattened_error() {
    let loaded = load::<VolumesSnapshotStatus>(&fixture(VOLUMES_SNAPSHOT_STATUS_FILE)).unwrap();
    let r = loaded.record;
    assert_eq!(r.snapshot_id, uuid(SNAPSHOT));
    assert_eq!(r.app_uuid, uuid(APP));
    assert_eq!(r.result_of_action, VolumesSnapshotAction::Create);
    assert_eq!(r.volume_snapshot_meta[&uuid(VOLUME)], SNAPSHOT);
    assert_eq!(r.error.error_severity, ErrorSeverity::Unspecified);
    assert!(r.error.error_entities.is_empty());
}

#[test]
fn eve_app_instance_config_loads_ignoring_what_cairn_does_not_use() {
    let loaded = load::<AppInstanceConfig>(&fixture(APP_INSTANCE_CONFIG_FILE)).unwrap();
    let r = loaded.record;
    assert_eq!(r.app_uuid(), uuid(APP));
    assert_eq!(r.display_name, "sensor-gateway");
    assert!(r.activate);
    assert_eq!(r.purge_cmd.counter, 1);
    assert_eq!(r.volume_ref_config_list[0].volume_id, uuid(VOLUME));
    assert_eq!(r.volume_ref_config_list[0].generation_counter, 2);
    assert_eq!(r.snapshot.max_snapshots, 1);
    assert_eq!(r.snapshot.snapshots[0].snapshot_id, uuid(SNAPSHOT));
    assert_eq!(r.domain, None);
}

/// The fixture with the value at a JSON pointer removed, written to a temp file.
fn eve_without(dir: &Path, file: &str, pointer: &str) -> PathBuf {
    let mut value: serde_json::Value =
        serde_json::from_slice(&fs::read(fixture(file)).unwrap()).unwrap();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let removed = match value.pointer_mut(parent).unwrap() {
        serde_json::Value::Object(map) => map.remove(key),
        serde_json::Value::Array(items) => Some(items.remove(key.parse().unwrap())),
        _ => None,
    };
    assert!(removed.is_some(), "{pointer} is not in {file}");
    let path = dir.join(file);
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    path
}

fn missing<T: Record + std::fmt::Debug>(path: &Path) -> Vec<String> {
    match load::<T>(path).unwrap_err().kind {
        ErrorKind::Decode(DecodeError::MissingFields(fields)) => fields,
        other => panic!("expected missing fields, got {other:?}"),
    }
}

#[test]
fn each_of_eves_six_mandatory_fields_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for field in ["Snapshot", "AppInstanceID", "ConfigVersion"] {
        let path = eve_without(d, SNAPSHOT_INSTANCE_STATUS_FILE, &format!("/{field}"));
        assert_eq!(missing::<SnapshotInstanceStatus>(&path), vec![field]);
    }
    for field in ["SnapshotID", "VolumeSnapshotMeta", "AppUUID"] {
        let path = eve_without(d, VOLUMES_SNAPSHOT_STATUS_FILE, &format!("/{field}"));
        assert_eq!(missing::<VolumesSnapshotStatus>(&path), vec![field]);
    }
}

#[test]
fn nested_snapshot_id_removed_fails_with_its_path() {
    // EVE checks only top-level keys, so this record would pass there.
    let dir = tempfile::tempdir().unwrap();
    let path = eve_without(
        dir.path(),
        SNAPSHOT_INSTANCE_STATUS_FILE,
        "/Snapshot/SnapshotID",
    );
    let err = load::<SnapshotInstanceStatus>(&path).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("missing mandatory field: Snapshot.SnapshotID"),
        "{err}"
    );
}

#[test]
fn nested_config_version_uuid_removed_fails_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = eve_without(
        dir.path(),
        SNAPSHOT_INSTANCE_STATUS_FILE,
        "/ConfigVersion/UUID",
    );
    assert_eq!(
        missing::<SnapshotInstanceStatus>(&path),
        vec!["ConfigVersion.UUID"]
    );
}

#[test]
fn volume_ref_without_volume_id_fails_with_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = eve_without(
        dir.path(),
        APP_INSTANCE_CONFIG_FILE,
        "/VolumeRefConfigList/0/VolumeID",
    );
    assert_eq!(
        missing::<AppInstanceConfig>(&path),
        vec!["VolumeRefConfigList[0].VolumeID"]
    );
}

#[test]
fn snapshot_desc_without_id_in_the_config_list_fails_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = eve_without(
        dir.path(),
        APP_INSTANCE_CONFIG_FILE,
        "/Snapshot/Snapshots/0/SnapshotID",
    );
    assert_eq!(
        missing::<AppInstanceConfig>(&path),
        vec!["Snapshot.Snapshots[0].SnapshotID"]
    );
}

#[test]
fn malformed_uuid_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(fixture(SNAPSHOT_INSTANCE_STATUS_FILE))
        .unwrap()
        .replace(
            &format!("\"AppInstanceID\":\"{APP}\""),
            "\"AppInstanceID\":\"not-a-uuid\"",
        );
    let path = dir.path().join("s.json");
    fs::write(&path, text).unwrap();
    match load::<SnapshotInstanceStatus>(&path).unwrap_err().kind {
        ErrorKind::Decode(DecodeError::Invalid { path, .. }) => assert_eq!(path, "AppInstanceID"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn cairn_keeps_eves_key_names_inside_its_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let eve = load::<VolumesSnapshotStatus>(&fixture(VOLUMES_SNAPSHOT_STATUS_FILE))
        .unwrap()
        .record;
    let path = dir.path().join(VOLUMES_SNAPSHOT_STATUS_FILE);
    store(&path, &eve).unwrap();
    let file: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(file["schema"], "VolumesSnapshotStatus");
    assert_eq!(file["version"], 1);
    let record = &file["record"];
    for key in [
        "SnapshotID",
        "VolumeSnapshotMeta",
        "AppUUID",
        "TimeCreated",
        "Error",
        "ErrorTime",
    ] {
        assert!(record.get(key).is_some(), "{key} missing from {record}");
    }
    let again = load::<VolumesSnapshotStatus>(&path).unwrap();
    assert_eq!(again.format, Format::Envelope);
    assert_eq!(again.record, eve);
}

//! The loading rules of ARCHITECTURE.md ("How a record is stored and read"): EVE's deserialization cases, then what EVE does not check
//! (nested, in-`Vec`, flattened and map-value mandatory fields), versions, damage and backups.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use cairn_persist::{
    DecodeError, ErrorKind, Format, Migration, Origin, Persist, Record, backup_path, load,
    load_with_backup, store, store_with_backup,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "TestStruct", version = 1, plain_import)]
struct TestStruct {
    #[persist(mandatory)]
    field1: String,
    field2: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
struct Inner {
    #[serde(rename = "UUID")]
    #[persist(mandatory)]
    uuid: String,
    size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
struct Embedded {
    #[persist(mandatory)]
    error_source: String,
    error_time: String,
}

/// Every shape a mandatory field can hide in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "Deep", version = 1)]
struct Deep {
    #[persist(mandatory)]
    name: String,
    #[persist(mandatory)]
    snapshot: Inner,
    volume_refs: Vec<Inner>,
    by_key: BTreeMap<String, Inner>,
    maybe: Option<Inner>,
    #[serde(flatten)]
    embedded: Embedded,
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn decode_err<T: Record + std::fmt::Debug>(path: &Path) -> DecodeError {
    match load::<T>(path).unwrap_err().kind {
        ErrorKind::Decode(err) => err,
        other => panic!("expected a decode error, got {other:?}"),
    }
}

fn missing_of<T: Record + std::fmt::Debug>(path: &Path) -> Vec<String> {
    match decode_err::<T>(path) {
        DecodeError::MissingFields(fields) => fields,
        other => panic!("expected missing fields, got {other:?}"),
    }
}

fn deep_value() -> Deep {
    let inner = |n: u64| Inner {
        uuid: format!("u{n}"),
        size: n,
    };
    Deep {
        name: "app".into(),
        snapshot: inner(0),
        volume_refs: vec![inner(1), inner(2), inner(3)],
        by_key: BTreeMap::from([("a".into(), inner(4))]),
        maybe: Some(inner(5)),
        embedded: Embedded {
            error_source: "volume".into(),
            error_time: "now".into(),
        },
    }
}

// ---- EVE's cases (pkg/pillar/utils/deserialize_test.go), as Cairn records ----

#[test]
fn simple_struct_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("simple.json");
    let value = TestStruct {
        field1: "test".into(),
        field2: 123,
    };
    store(&path, &value).unwrap();
    let loaded = load::<TestStruct>(&path).unwrap();
    assert_eq!(loaded.record, value);
    assert_eq!(loaded.stored_version, 1);
    assert_eq!(loaded.format, Format::Envelope);
    assert!(matches!(loaded.origin, Origin::Primary));
}

#[test]
fn missing_file_is_not_found_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nonexistentfile");
    let err = load::<TestStruct>(&path).unwrap_err();
    assert!(matches!(err.kind, ErrorKind::NotFound));
    let text = err.to_string();
    assert!(
        text.contains("TestStruct") && text.contains("nonexistentfile"),
        "{text}"
    );
}

#[test]
fn missing_mandatory_field_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "r.json", r#"{"Field2": 123}"#);
    assert_eq!(missing_of::<TestStruct>(&path), vec!["Field1"]);
}

#[test]
fn explicit_null_does_not_satisfy_a_mandatory_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "r.json", r#"{"Field1": null, "Field2": 1}"#);
    assert_eq!(missing_of::<TestStruct>(&path), vec!["Field1"]);
}

#[test]
fn extra_field_in_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "r.json",
        r#"{"Field1": "a", "Field2": 2, "Field3": {"x": [1, 2]}}"#,
    );
    let loaded = load::<TestStruct>(&path).unwrap();
    assert_eq!(loaded.record.field1, "a");
    assert_eq!(loaded.format, Format::Plain);
}

#[test]
fn missing_optional_field_takes_its_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "r.json", r#"{"Field1": "a"}"#);
    assert_eq!(load::<TestStruct>(&path).unwrap().record.field2, 0);
}

#[test]
fn embedded_struct_round_trips_flattened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.json");
    store(&path, &deep_value()).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    // Flattened like Go's embedded structs: the keys sit in the parent object.
    let record: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["record"].clone();
    assert_eq!(record["ErrorSource"], "volume");
    assert_eq!(load::<Deep>(&path).unwrap().record, deep_value());
}

#[test]
fn nested_struct_round_trips() {
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
    #[serde(default, rename_all = "PascalCase")]
    #[persist(record = "TestStructWithNested", version = 1)]
    struct TestStructWithNested {
        #[persist(mandatory)]
        field1: String,
        field2: TestStruct,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.json");
    let value = TestStructWithNested {
        field1: "outer".into(),
        field2: TestStruct {
            field1: "inner".into(),
            field2: 7,
        },
    };
    store(&path, &value).unwrap();
    assert_eq!(load::<TestStructWithNested>(&path).unwrap().record, value);
}

#[test]
fn slice_of_structs_round_trips() {
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
    #[serde(default, rename_all = "PascalCase")]
    #[persist(record = "TestStructWithArray", version = 1)]
    struct TestStructWithArray {
        #[persist(mandatory)]
        field1: String,
        field2: Vec<TestStruct>,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    let value = TestStructWithArray {
        field1: "outer".into(),
        field2: vec![
            TestStruct {
                field1: "a".into(),
                field2: 1,
            },
            TestStruct {
                field1: "b".into(),
                field2: 2,
            },
        ],
    };
    store(&path, &value).unwrap();
    assert_eq!(load::<TestStructWithArray>(&path).unwrap().record, value);
}

#[test]
fn anonymous_struct_round_trips() {
    // Go's anonymous struct literal; in Rust, a type local to the function.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
    #[serde(default)]
    #[persist(record = "Anonymous", version = 1)]
    struct Anonymous {
        #[persist(mandatory)]
        field1: String,
        field2: i32,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anon.json");
    let value = Anonymous {
        field1: "x".into(),
        field2: -3,
    };
    store(&path, &value).unwrap();
    assert_eq!(load::<Anonymous>(&path).unwrap().record, value);
}

// ---- What EVE does not check: mandatory fields at depth ----

fn deep_json_without(pointer: &str) -> String {
    let mut value = serde_json::to_value(deep_value()).unwrap();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    value
        .pointer_mut(parent)
        .and_then(|v| v.as_object_mut())
        .unwrap()
        .remove(key)
        .unwrap();
    // A plain record is enough here; Deep refuses plain import, so wrap it in a valid envelope.
    envelope("Deep", 1, &serde_json::to_string_pretty(&value).unwrap())
}

/// A valid envelope around arbitrary record text, as a newer or older writer would produce.
fn envelope(schema: &str, version: u32, record: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(schema.as_bytes());
    h.update([0]);
    h.update(version.to_string().as_bytes());
    h.update([0]);
    h.update(record.as_bytes());
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{{\"schema\": \"{schema}\", \"version\": {version}, \"sha256\": \"{digest}\", \"record\": {record}}}"
    )
}

#[test]
fn nested_mandatory_field_missing_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.json", &deep_json_without("/Snapshot/UUID"));
    assert_eq!(missing_of::<Deep>(&path), vec!["Snapshot.UUID"]);
}

#[test]
fn mandatory_field_missing_in_a_vec_element_names_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.json",
        &deep_json_without("/VolumeRefs/2/UUID"),
    );
    assert_eq!(missing_of::<Deep>(&path), vec!["VolumeRefs[2].UUID"]);
}

#[test]
fn mandatory_field_missing_in_a_map_value_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.json", &deep_json_without("/ByKey/a/UUID"));
    assert_eq!(missing_of::<Deep>(&path), vec![r#"ByKey["a"].UUID"#]);
}

#[test]
fn mandatory_field_missing_in_a_flattened_struct_names_it_at_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.json", &deep_json_without("/ErrorSource"));
    assert_eq!(missing_of::<Deep>(&path), vec!["ErrorSource"]);
}

#[test]
fn mandatory_field_missing_in_a_present_option_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.json", &deep_json_without("/Maybe/UUID"));
    assert_eq!(missing_of::<Deep>(&path), vec!["Maybe.UUID"]);
}

#[test]
fn every_missing_mandatory_field_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.json",
        &envelope(
            "Deep",
            1,
            r#"{"Snapshot": {}, "VolumeRefs": [{"UUID": "a"}, {}]}"#,
        ),
    );
    let err = load::<Deep>(&path).unwrap_err().to_string();
    assert!(
        err.contains(
            "missing mandatory fields: Name, Snapshot.UUID, VolumeRefs[1].UUID, ErrorSource"
        ),
        "{err}"
    );
}

#[test]
fn mistyped_field_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut value = serde_json::to_value(deep_value()).unwrap();
    value["VolumeRefs"][1]["Size"] = serde_json::json!("big");
    let path = write(
        dir.path(),
        "d.json",
        &envelope("Deep", 1, &value.to_string()),
    );
    match decode_err::<Deep>(&path) {
        DecodeError::Invalid { path, .. } => assert_eq!(path, "VolumeRefs[1].Size"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// ---- Versions ----

/// Version 3 of a record whose version 1 called `name` `title` and had no `tags`, and whose
/// version 2 stored `size` in KiB instead of bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "Evolving", version = 3, migrations = evolving_migrations)]
struct Evolving {
    #[persist(mandatory)]
    name: String,
    size_bytes: u64,
    tags: Vec<String>,
}

fn evolving_migrations() -> &'static [Migration] {
    &[
        Migration {
            from: 1,
            note: "rename title to name",
            apply: |v| {
                let obj = v.as_object_mut().ok_or("not an object")?;
                if let Some(title) = obj.remove("title") {
                    obj.insert("name".into(), title);
                }
                Ok(())
            },
        },
        Migration {
            from: 2,
            note: "size in KiB becomes size_bytes",
            apply: |v| {
                let obj = v.as_object_mut().ok_or("not an object")?;
                let kib = obj
                    .remove("size_kib")
                    .and_then(|s| s.as_u64())
                    .ok_or("size_kib is missing or not a number")?;
                obj.insert("size_bytes".into(), (kib * 1024).into());
                Ok(())
            },
        },
    ]
}

#[test]
fn version_1_record_is_migrated_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "e.json",
        &envelope("Evolving", 1, r#"{"title": "db", "size_kib": 4}"#),
    );
    let loaded = load::<Evolving>(&path).unwrap();
    assert_eq!(loaded.stored_version, 1);
    assert_eq!(
        loaded.record,
        Evolving {
            name: "db".into(),
            size_bytes: 4096,
            tags: vec![]
        }
    );
}

#[test]
fn failing_migration_is_reported_with_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "e.json",
        &envelope("Evolving", 2, r#"{"name": "db"}"#),
    );
    match decode_err::<Evolving>(&path) {
        DecodeError::MigrationFailed { from: 2, message } => {
            assert!(message.contains("size_kib"), "{message}")
        }
        other => panic!("expected MigrationFailed, got {other:?}"),
    }
}

#[test]
fn version_without_a_migration_step_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
    #[serde(default)]
    #[persist(record = "Gappy", version = 2)]
    struct Gappy {
        #[persist(mandatory)]
        name: String,
    }
    let path = write(
        dir.path(),
        "g.json",
        &envelope("Gappy", 1, r#"{"name": "x"}"#),
    );
    assert!(matches!(
        decode_err::<Gappy>(&path),
        DecodeError::NoMigration {
            from: 1,
            current: 2
        }
    ));
}

#[test]
fn newer_version_with_extra_fields_loads_when_mandatory_fields_are_present() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "e.json",
        &envelope(
            "Evolving",
            7,
            r#"{"name": "db", "size_bytes": 1, "quota": {"hard": 3}, "labels": ["x"]}"#,
        ),
    );
    let loaded = load::<Evolving>(&path).unwrap();
    assert_eq!(loaded.stored_version, 7);
    assert_eq!(loaded.record.name, "db");
}

#[test]
fn newer_version_without_a_mandatory_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "e.json",
        &envelope("Evolving", 7, r#"{"display_name": "db"}"#),
    );
    assert_eq!(missing_of::<Evolving>(&path), vec!["name"]);
}

/// `Evolving` as a newer build writes it. Version 4 only adds `labels`: older builds read it and
/// ignore them. Version 5 counts `size_bytes` in 4 KiB blocks (same key, same type, another
/// meaning): an older build would read 2 blocks as 2 bytes, so it declares `readable_from = 5`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "Evolving", version = 4)]
struct EvolvingAddsLabels {
    #[persist(mandatory)]
    name: String,
    size_bytes: u64,
    tags: Vec<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "Evolving", version = 5, readable_from = 5)]
struct EvolvingCountsBlocks {
    #[persist(mandatory)]
    name: String,
    /// In 4 KiB blocks.
    size_bytes: u64,
    tags: Vec<String>,
}

#[test]
fn newer_version_that_only_adds_fields_is_read_by_an_older_build_ignoring_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.json");
    let newer = EvolvingAddsLabels {
        name: "db".into(),
        size_bytes: 8192,
        tags: vec!["a".into()],
        labels: BTreeMap::from([("tier".into(), "gold".into())]),
    };
    store(&path, &newer).unwrap();
    // What every build reads: no `readable_from` in the envelope, the checksum as before it.
    assert!(!fs::read_to_string(&path).unwrap().contains("readable_from"));
    let loaded = load::<Evolving>(&path).unwrap();
    assert_eq!(loaded.stored_version, 4);
    assert_eq!(
        loaded.record,
        Evolving {
            name: "db".into(),
            size_bytes: 8192,
            tags: vec!["a".into()],
        }
    );
}

#[test]
fn newer_version_that_changed_a_fields_meaning_is_refused_by_name_never_misread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.json");
    let newer = EvolvingCountsBlocks {
        name: "db".into(),
        size_bytes: 2,
        tags: vec![],
    };
    store(&path, &newer).unwrap();
    let err = load::<Evolving>(&path).unwrap_err();
    let text = err.to_string();
    match &err.kind {
        ErrorKind::Decode(DecodeError::TooNew {
            version: 5,
            readable_from: 5,
            current: 3,
        }) => {}
        other => panic!("expected TooNew, got {other:?} ({text})"),
    }
    assert!(
        text.starts_with(&format!("Evolving record {}: ", path.display())),
        "{text}"
    );
    assert!(text.contains("version 5"), "{text}");
    // Not damage: nothing may treat the newer build's record as garbage to replace.
    assert!(!err.kind.is_corrupt(), "{text}");
    // The build that wrote it reads it.
    assert_eq!(load::<EvolvingCountsBlocks>(&path).unwrap().record, newer);
}

#[test]
fn an_altered_or_stripped_readable_from_is_corrupt_not_a_way_past_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.json");
    store(
        &path,
        &EvolvingCountsBlocks {
            name: "db".into(),
            size_bytes: 2,
            tags: vec![],
        },
    )
    .unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"readable_from\": 5"), "{text}");
    // Lowered to what this build reads; removed, as a build that predates the key sees it.
    for altered in [
        text.replace("\"readable_from\": 5", "\"readable_from\": 3"),
        text.replace(",\n  \"readable_from\": 5", ""),
    ] {
        fs::write(&path, &altered).unwrap();
        let err = load::<Evolving>(&path).unwrap_err();
        assert!(
            matches!(err.kind, ErrorKind::Decode(DecodeError::Corrupt { .. })),
            "{err}"
        );
    }
    // Above the record's own version: the envelope itself is wrong.
    fs::write(
        &path,
        text.replace("\"readable_from\": 5", "\"readable_from\": 6"),
    )
    .unwrap();
    assert!(
        matches!(decode_err::<Evolving>(&path), DecodeError::BadEnvelope(m) if m.contains("readable_from")),
    );
}

// ---- Damage ----

#[test]
fn wrong_schema_is_refused_with_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.json");
    store(&path, &TestStruct::default()).unwrap();
    let err = load::<Deep>(&path).unwrap_err().to_string();
    assert!(
        err.contains("holds a TestStruct record, expected Deep"),
        "{err}"
    );
}

#[test]
fn plain_json_is_refused_for_a_type_without_plain_import() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "p.json",
        r#"{"Name": "x", "Snapshot": {"UUID": "u"}}"#,
    );
    assert!(matches!(
        decode_err::<Deep>(&path),
        DecodeError::NotARecord { schema: "Deep" }
    ));
}

#[test]
fn empty_non_json_and_non_object_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.json", "");
    assert!(matches!(
        decode_err::<TestStruct>(&empty),
        DecodeError::Empty
    ));
    let blank = write(dir.path(), "blank.json", " \n\t");
    assert!(matches!(
        decode_err::<TestStruct>(&blank),
        DecodeError::Empty
    ));
    let garbage = write(dir.path(), "garbage.json", "Field1=abc\n");
    assert!(matches!(
        decode_err::<TestStruct>(&garbage),
        DecodeError::Malformed { line: 1, .. }
    ));
    let array = write(dir.path(), "array.json", "[1, 2]");
    assert!(matches!(
        decode_err::<TestStruct>(&array),
        DecodeError::BadEnvelope(_)
    ));
    let binary = dir.path().join("binary.json");
    fs::write(&binary, [0xff, 0xfe, 0x00, 0x7b]).unwrap();
    assert!(matches!(
        decode_err::<TestStruct>(&binary),
        DecodeError::Malformed { .. }
    ));
}

#[test]
fn incomplete_envelope_is_damage_not_a_plain_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.json");
    store(&path, &TestStruct::default()).unwrap();
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"sha256\"", "\"sha255\"");
    fs::write(&path, text).unwrap();
    let err = load::<TestStruct>(&path).unwrap_err();
    assert!(err.kind.is_corrupt(), "{err}");
    assert!(err.to_string().contains("`sha256` is missing"), "{err}");
}

#[test]
fn every_single_byte_flip_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.json");
    store(&path, &deep_value()).unwrap();
    let original = fs::read(&path).unwrap();
    let mut corrupt = 0;
    for at in 0..original.len() {
        for mask in [0x01u8, 0x20, 0x80] {
            let mut bytes = original.clone();
            bytes[at] ^= mask;
            fs::write(&path, &bytes).unwrap();
            let err = load::<Deep>(&path)
                .err()
                .unwrap_or_else(|| panic!("flip {mask:#x} at byte {at} went unnoticed"));
            if matches!(err.kind, ErrorKind::Decode(DecodeError::Corrupt { .. })) {
                corrupt += 1;
            }
        }
    }
    // Flips inside the record itself that keep it valid JSON are caught by the checksum.
    assert!(
        corrupt > original.len() / 2,
        "only {corrupt} checksum failures"
    );
}

#[test]
fn truncation_at_every_length_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.json");
    store(&path, &deep_value()).unwrap();
    let original = fs::read(&path).unwrap();
    let content_end = original.len() - 1; // the file ends with one newline
    assert_eq!(original[content_end], b'\n');
    for len in 0..content_end {
        fs::write(&path, &original[..len]).unwrap();
        let err = load::<Deep>(&path)
            .err()
            .unwrap_or_else(|| panic!("a record truncated to {len} bytes loaded"));
        assert!(err.kind.is_corrupt(), "truncated to {len}: {err}");
    }
    fs::write(&path, &original[..content_end]).unwrap();
    assert_eq!(load::<Deep>(&path).unwrap().record, deep_value());
}

// ---- Backups ----

#[test]
fn backup_holds_the_previous_version_and_is_used_when_the_primary_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("critical.json");
    let v = |n: i64| TestStruct {
        field1: format!("v{n}"),
        field2: n,
    };
    store_with_backup(&path, &v(1)).unwrap();
    assert!(
        !backup_path(&path).exists(),
        "no backup before a second write"
    );
    store_with_backup(&path, &v(2)).unwrap();
    assert_eq!(
        load::<TestStruct>(&backup_path(&path)).unwrap().record,
        v(1)
    );

    let loaded = load_with_backup::<TestStruct>(&path).unwrap();
    assert_eq!(loaded.record, v(2));
    assert!(matches!(loaded.origin, Origin::Primary));

    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let loaded = load_with_backup::<TestStruct>(&path).unwrap();
    assert_eq!(loaded.record, v(1));
    match loaded.origin {
        Origin::Backup { primary_error } => assert!(primary_error.is_corrupt(), "{primary_error}"),
        Origin::Primary => panic!("the corrupt primary was used"),
    }
}

#[test]
fn backup_is_used_when_the_primary_is_missing_and_both_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("critical.json");
    let v = |n: i64| TestStruct {
        field1: format!("v{n}"),
        field2: n,
    };
    store_with_backup(&path, &v(1)).unwrap();
    store_with_backup(&path, &v(2)).unwrap();
    fs::remove_file(&path).unwrap();
    let loaded = load_with_backup::<TestStruct>(&path).unwrap();
    assert_eq!(loaded.record, v(1));
    assert!(matches!(
        loaded.origin,
        Origin::Backup {
            primary_error: ErrorKind::NotFound
        }
    ));

    fs::write(&path, "{").unwrap();
    fs::write(backup_path(&path), "").unwrap();
    let err = load_with_backup::<TestStruct>(&path).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("is unreadable (the record is truncated")
            && text.contains("its backup (the file is empty)"),
        "{text}"
    );
}

#[test]
fn store_leaves_no_temporary_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/r.json");
    store(&path, &TestStruct::default()).unwrap();
    store_with_backup(&path, &TestStruct::default()).unwrap();
    store_with_backup(&path, &TestStruct::default()).unwrap();
    let names: Vec<String> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["r.json", "r.json.bak"]);
}

#[test]
fn remove_deletes_record_and_backup_and_tolerates_absence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    store_with_backup(&path, &TestStruct::default()).unwrap();
    store_with_backup(&path, &TestStruct::default()).unwrap();
    cairn_persist::remove(&path).unwrap();
    assert!(!path.exists() && !backup_path(&path).exists());
    cairn_persist::remove(&path).unwrap();
}

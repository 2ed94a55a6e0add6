//! `cairn record check` on what a running device really writes: every record under `/persist`,
//! including one private to an agent (the app-manager's state, checked by the app-manager's
//! binary), is checked field by field, and a damaged private record is refused naming the field.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use sha2::Digest;

/// Every file under `dir` that is a Cairn record envelope, with its schema.
fn records(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = path.symlink_metadata().unwrap();
            if meta.is_dir() {
                todo.push(path);
                continue;
            }
            // Volume contents and downloaded blobs are data, not records.
            if !meta.is_file() || meta.len() > 16 << 20 {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let (Some(schema), Some(_)) = (doc["schema"].as_str(), doc.get("sha256")) {
                found.push((path, schema.to_string()));
            }
        }
    }
    found
}

#[test]
fn every_record_a_running_device_writes_passes_record_check_and_a_damaged_private_one_fails() {
    let mut up = Up::start(&[]);
    up.wait_status(Duration::from_secs(120), demo_ready);
    // A clean stop: every agent has written its state and nothing is half-way.
    up.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(60));
    let persist = up.path().join("persist");

    let found = records(&persist);
    let schemas: std::collections::BTreeSet<&str> = found.iter().map(|(_, s)| s.as_str()).collect();
    // The demo device has no content trees and no controller to send logs to: of the private
    // records it writes the app-manager's.
    assert!(
        schemas.contains("AppManagerState"),
        "the device wrote no AppManagerState record; found {schemas:?}"
    );
    for (file, schema) in &found {
        let (code, out, err) = up.cairn(&["record", "check", "--json", file.to_str().unwrap()]);
        let verdict: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {out} {err}", file.display()));
        assert!(
            code == 0 && verdict["ok"] == true,
            "{} ({schema}) does not pass: {verdict}",
            file.display()
        );
        assert_eq!(verdict["schema"], schema.as_str());
    }

    // The app-manager's own state with its mandatory app id gone: only the app-manager's
    // build knows that field, and the check names it.
    let (state, _) = found
        .iter()
        .find(|(_, schema)| schema == "AppManagerState")
        .unwrap();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    let record = doc["record"].as_object_mut().unwrap();
    let key = record
        .keys()
        .find(|k| k.eq_ignore_ascii_case("app"))
        .cloned()
        .unwrap_or_else(|| panic!("no app field in {record:?}"));
    record.remove(&key);
    // Sealed again with a right checksum, so the damage is found by the fields, not the seal.
    let bytes = serde_json::to_string(&doc["record"]).unwrap();
    let version = doc["version"].as_u64().unwrap();
    let mut hasher = sha2::Sha256::new();
    hasher.update(format!("AppManagerState\0{version}\0{bytes}").as_bytes());
    let sum: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let damaged = up.path().join("damaged-state.json");
    std::fs::write(
        &damaged,
        format!(
            r#"{{"schema": "AppManagerState", "version": {version}, "sha256": "{sum}", "record": {bytes}}}"#
        ),
    )
    .unwrap();
    let (code, out, _) = up.cairn(&["record", "check", damaged.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("INVALID") && out.contains(&key), "{out}");
}

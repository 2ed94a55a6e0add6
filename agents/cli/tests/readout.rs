//! The technician's read-outs as a process: `cairn status/snapshots --json` against publishers
//! on a real bus, a corrupt record planted on disk, and the message when nothing runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::path::Path;
use std::process::Command;

use cairn_pubsub::{Bus, PublishOptions};
use cairn_types::layout::{
    SNAPSHOT_INSTANCE_STATUS_FILE, VOLUMES_SNAPSHOT_STATUS_FILE, snapshot_dir,
};
use cairn_types::{
    AppInstanceStatus, DeviceStatus, SnapshotDesc, SnapshotInstanceStatus, SnapshottingStatus,
    SwState, UUIDandVersion,
};
use uuid::Uuid;

fn cairn(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_snapshots_read_the_bus_and_show_corrupt_records() {
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    let app = Uuid::from_u128(0xa11);
    let snapshot = |n: u128| SnapshotInstanceStatus {
        snapshot: SnapshotDesc {
            snapshot_id: Uuid::from_u128(n),
            ..Default::default()
        },
        app_instance_id: app,
        config_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        ..Default::default()
    };
    let device = Bus::new("config-agent", &run, &persist)
        .publish::<DeviceStatus>(PublishOptions::default())
        .await
        .unwrap();
    device
        .publish(DeviceStatus {
            apps: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let apps = Bus::new("app-manager", &run, &persist)
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    apps.publish(AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "sensor".into(),
        state: SwState::Running,
        activated: true,
        snap_status: SnapshottingStatus {
            available_snapshots: vec![snapshot(1)],
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    // A planted record that lost its mandatory nested id.
    let dir = snapshot_dir(&persist, Uuid::from_u128(2));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(SNAPSHOT_INSTANCE_STATUS_FILE),
        format!(r#"{{"Snapshot": {{}}, "AppInstanceID": "{app}", "ConfigVersion": {{"UUID": "{app}"}}}}"#),
    )
    .unwrap();

    let root_path = root.path().to_path_buf();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cairn(&root_path, &["status", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["apps"][0]["DisplayName"], "sensor");
    // Names, not EVE's numbers (115), and no Go zero time for a boot that never happened.
    assert_eq!(view["apps"][0]["State"], "RUNNING");
    assert_eq!(view["apps"][0]["BootTime"], serde_json::Value::Null);
    let root_path = root.path().to_path_buf();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cairn(&root_path, &["apps", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let apps: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(apps[0]["State"], "RUNNING", "{apps}");
    assert_eq!(apps[0]["BootTime"], serde_json::Value::Null, "{apps}");
    let agents = view["agents"].as_array().unwrap();
    assert!(
        agents
            .iter()
            .any(|a| a["agent"] == "app-manager" && a["state"] == "up")
    );
    assert!(
        agents
            .iter()
            .any(|a| a["agent"] == "domain-manager" && a["state"] == "down")
    );

    let root_path = root.path().to_path_buf();
    let (code, out, _) =
        tokio::task::spawn_blocking(move || cairn(&root_path, &["snapshots", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["state"] == "available" && r["id"] == Uuid::from_u128(1).to_string())
    );
    let corrupt = rows
        .iter()
        .find(|r| r["state"] == "corrupt")
        .expect("the planted record is shown");
    assert!(
        corrupt["error"]
            .as_str()
            .unwrap()
            .contains("Snapshot.SnapshotID"),
        "{corrupt}"
    );
    drop((device, apps));
}

/// `cairn snapshots` subscribes to the app-manager's topic alone: at 1,000 apps the other
/// status topics are thousands of values it prints nothing of. Listening sockets stand in for
/// the other agents' topics and count who connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_reads_only_the_app_managers_topic() {
    use cairn_types::{Topic, VolumeStatus};
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    let app = Uuid::from_u128(0xa14);
    let apps = Bus::new("app-manager", &run, &persist)
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    apps.publish(AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "sensor".into(),
        snap_status: SnapshottingStatus {
            available_snapshots: vec![SnapshotInstanceStatus {
                snapshot: SnapshotDesc {
                    snapshot_id: Uuid::from_u128(1),
                    ..Default::default()
                },
                app_instance_id: app,
                ..Default::default()
            }],
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let others: Vec<std::os::unix::net::UnixListener> = [
        ("config-agent", DeviceStatus::NAME),
        ("domain-manager", cairn_types::DomainStatus::NAME),
        ("volume-manager", VolumeStatus::NAME),
    ]
    .into_iter()
    .map(|(agent, topic)| {
        let socket = cairn_pubsub::socket_path(&run, agent, topic);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    })
    .collect();

    let root_path = root.path().to_path_buf();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cairn(&root_path, &["snapshots", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["app_name"], "sensor", "{rows:#}");
    assert_eq!(rows[0]["state"], "available", "{rows:#}");
    for listener in &others {
        // A connection made and closed meanwhile is still queued to be accepted.
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "cairn snapshots connected to {:?}: {other:?}",
                listener.local_addr().unwrap()
            ),
        }
    }
    drop(apps);
}

#[test]
fn with_no_agents_it_says_how_to_start_them() {
    let root = tempfile::tempdir().unwrap();
    let (code, _, err) = cairn(root.path(), &["status"]);
    assert_eq!(code, 3);
    assert!(
        err.contains("agents not running") && err.contains("cairn up"),
        "{err}"
    );
}

#[test]
fn record_check_reports_a_missing_nested_field() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join(SNAPSHOT_INSTANCE_STATUS_FILE);
    std::fs::write(&file, r#"{"Snapshot": {}, "AppInstanceID": "00000000-0000-0000-0000-000000000001", "ConfigVersion": {"UUID": "00000000-0000-0000-0000-000000000001"}}"#).unwrap();
    let (code, out, _) = cairn(root.path(), &["record", "check", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("INVALID") && out.contains("Snapshot.SnapshotID"),
        "{out}"
    );
}

/// Every file under `dir`: path → (length, mtime, mode).
fn tree(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, (u64, i64, i64, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.path().symlink_metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            }
            files.insert(
                entry.path(),
                (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.mode()),
            );
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_out_changes_a_file_of_the_device() {
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    let app = Uuid::from_u128(0xa12);
    let apps = Bus::new("app-manager", &run, &persist)
        .publish::<AppInstanceStatus>(PublishOptions {
            persistent: true,
            ..PublishOptions::default()
        })
        .await
        .unwrap();
    apps.publish(AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "sensor".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = snapshot_dir(&persist, Uuid::from_u128(3));
    std::fs::create_dir_all(&dir).unwrap();
    let record = dir.join(SNAPSHOT_INSTANCE_STATUS_FILE);
    std::fs::write(&record, "{}").unwrap();
    apps.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let before = tree(root.path());

    let root_path = root.path().to_path_buf();
    let record = record.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        for json in [false, true] {
            let mut runs: Vec<Vec<&str>> = vec![
                vec!["status"],
                vec!["apps"],
                vec!["snapshots"],
                vec!["snapshots", "sensor"],
                vec!["topics"],
                vec!["record", "check", &record],
            ];
            if json {
                runs.iter_mut().for_each(|args| args.push("--json"));
            }
            for args in runs {
                let (code, _, err) = cairn(&root_path, &args);
                assert!(code == 0 || code == 1, "cairn {args:?}: {err}");
            }
            let mut watch = Command::new(env!("CARGO_BIN_EXE_cairn"))
                .arg("--root")
                .arg(&root_path)
                .args(if json {
                    &["watch", "--json"][..]
                } else {
                    &["watch"]
                })
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut err = std::io::BufReader::new(watch.stderr.take().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut err, &mut line).unwrap();
            assert!(line.contains("watching"), "{line}");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(watch.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let status = loop {
                if let Some(status) = watch.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = watch.kill();
                    panic!("cairn watch did not end on SIGINT");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            assert!(status.success(), "{status:?}");
        }
    })
    .await
    .unwrap();
    assert_eq!(
        tree(root.path()),
        before,
        "a read-out created, changed or removed a file"
    );
    drop(apps);
}

/// One row per snapshot: a snapshot the app-manager reports available whose record on disk is
/// corrupt is listed `corrupt` (with its app), not also `available`; a snapshot directory with
/// no record yet (the volume-manager writes its files first) is a snapshot being taken, not a
/// corrupt one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_listed_once_and_a_snapshot_being_taken_is_not_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    let app = Uuid::from_u128(0xa13);
    let snapshot = |n: u128| SnapshotInstanceStatus {
        snapshot: SnapshotDesc {
            snapshot_id: Uuid::from_u128(n),
            ..Default::default()
        },
        app_instance_id: app,
        config_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        ..Default::default()
    };
    let apps = Bus::new("app-manager", &run, &persist)
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    apps.publish(AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "sensor".into(),
        snap_status: SnapshottingStatus {
            available_snapshots: vec![snapshot(1)],
            requested_snapshots: vec![snapshot(5)],
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    // Snapshot 1: reported available, its record damaged on disk.
    let dir = snapshot_dir(&persist, Uuid::from_u128(1));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(SNAPSHOT_INSTANCE_STATUS_FILE), "{\"schema\": ").unwrap();
    // Snapshot 5: requested, being taken: the volume-manager's file is there, no record yet.
    let dir = snapshot_dir(&persist, Uuid::from_u128(5));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(VOLUMES_SNAPSHOT_STATUS_FILE), "{}").unwrap();
    // Snapshot 6: a directory no app reports yet (the create just began).
    std::fs::create_dir_all(snapshot_dir(&persist, Uuid::from_u128(6))).unwrap();

    let root_path = root.path().to_path_buf();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cairn(&root_path, &["snapshots", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows_of = |n: u128| -> Vec<serde_json::Value> {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["id"] == Uuid::from_u128(n).to_string())
            .cloned()
            .collect()
    };
    let one = rows_of(1);
    assert_eq!(one.len(), 1, "one row for snapshot 1: {one:#?}");
    assert_eq!(one[0]["state"], "corrupt", "{one:#?}");
    assert_eq!(one[0]["app_name"], "sensor", "{one:#?}");
    assert!(
        one[0]["error"]
            .as_str()
            .unwrap()
            .contains(SNAPSHOT_INSTANCE_STATUS_FILE),
        "{one:#?}"
    );
    let five = rows_of(5);
    assert_eq!(five.len(), 1, "one row for snapshot 5: {five:#?}");
    assert_eq!(five[0]["state"], "requested", "{five:#?}");
    let six = rows_of(6);
    assert_eq!(six.len(), 1, "{six:#?}");
    assert_eq!(six[0]["state"], "being taken", "{six:#?}");
    drop(apps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_content_tree_with_its_progress_and_error() {
    use cairn_types::{ContentTreeState, ContentTreeStatus, ErrorDescription, ErrorSeverity};
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    let trees = Bus::new("downloader", &run, &persist)
        .publish::<ContentTreeStatus>(PublishOptions::default())
        .await
        .unwrap();
    let (going, failing) = (Uuid::from_u128(0xc1), Uuid::from_u128(0xc2));
    trees
        .publish(ContentTreeStatus {
            content_id: going,
            display_name: "guest-disk".into(),
            state: ContentTreeState::Downloading,
            current_size: 400,
            total_size: 1000,
            progress: 40,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut error = ErrorDescription::new(
        format!("content tree {failing} (data): http://ds/data.raw: HTTP 404 Not Found"),
        ErrorSeverity::Error,
        chrono::Utc::now(),
    );
    error.error_retry_condition = "will retry in 10s".into();
    trees
        .publish(ContentTreeStatus {
            content_id: failing,
            display_name: "data".into(),
            error,
            ..Default::default()
        })
        .await
        .unwrap();
    trees.signal_restarted().await.unwrap();
    let (code, out, err) = cairn(root.path(), &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "content  guest-disk {going} Downloading  400/1000 bytes 40%"
        )),
        "{out}"
    );
    assert!(
        out.contains("HTTP 404 Not Found (will retry in 10s)"),
        "{out}"
    );
    assert!(out.contains("downloader up"), "{out}");
    let (_, json, _) = cairn(root.path(), &["status", "--json"]);
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(view["content_trees"].as_array().map(Vec::len), Some(2));
}

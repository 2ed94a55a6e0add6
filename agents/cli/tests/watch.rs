//! `cairn watch` as a process against a device run by `cairn up`: only live changes are
//! printed, one JSON object per line, until Ctrl-C.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const APP: &str = "0000000a-0000-4000-8000-0000000000d1";
const SNAPSHOT: &str = "0000000c-0000-4000-8000-0000000000d1";

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
}

#[test]
fn watch_prints_live_changes_as_json_lines_until_ctrl_c() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("device.json");
    write_atomically(&config, &process_app_config(APP, "watched", "1", &[]));
    let mut up = Up::start_in(root, &cairn_bin(), &["--config", config.to_str().unwrap()]);
    up.wait_status(Duration::from_secs(30), |v| {
        app(v, "watched").is_some_and(|a| a["State"] == RUNNING)
    });

    let mut watch = Command::new(cairn_bin())
        .arg("--root")
        .arg(up.path())
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(watch.stdout.take().unwrap());
    let err = lines(watch.stderr.take().unwrap());
    let ready = wait_line(&err, Duration::from_secs(10), |l| l.contains("watching"));
    assert!(ready.is_ok(), "watch never announced itself: {ready:?}");
    // The present state is not a change: nothing is printed while the device is steady.
    let early = wait_line(&out, Duration::from_millis(700), |_| true);
    assert!(early.is_err(), "printed without a change: {early:?}");

    // A new immediate snapshot in the config: the config, the request and the result appear.
    write_atomically(
        &config,
        &process_app_config(APP, "watched", "1", &[SNAPSHOT]),
    );
    let (line, _) = wait_line(&out, Duration::from_secs(10), |l| {
        let v = json(l);
        v["topic"] == "AppInstanceConfig"
            && v["change"] == "modify"
            && v["value"]["Snapshot"]["Snapshots"][0]["SnapshotID"] == SNAPSHOT
    })
    .unwrap_or_else(|seen| panic!("no AppInstanceConfig change; saw {seen:#?}"));
    let change = json(&line);
    assert_eq!(change["publisher"], "config-agent");
    assert_eq!(change["key"], APP);
    assert!(
        change["summary"].as_str().unwrap().contains("snapshots 1"),
        "{change}"
    );
    assert!(
        change["time"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .is_ok()
    );
    wait_line(&out, Duration::from_secs(15), |l| {
        let v = json(l);
        v["topic"] == "VolumesSnapshotStatus"
            && v["publisher"] == "volume-manager"
            && v["key"] == SNAPSHOT
    })
    .unwrap_or_else(|seen| panic!("no VolumesSnapshotStatus; saw {seen:#?}"));
    wait_line(&out, Duration::from_secs(15), |l| {
        let v = json(l);
        v["topic"] == "AppInstanceStatus"
            && v["value"]["SnapStatus"]["AvailableSnapshots"][0]["Snapshot"]["SnapshotID"]
                == SNAPSHOT
    })
    .unwrap_or_else(|seen| panic!("the snapshot never became available; saw {seen:#?}"));

    // Removing the app: deletions are lines too.
    write_atomically(&config, r#"{"apps": [], "volumes": []}"#);
    wait_line(&out, Duration::from_secs(15), |l| {
        let v = json(l);
        v["topic"] == "AppInstanceConfig" && v["change"] == "delete" && v["key"] == APP
    })
    .unwrap_or_else(|seen| panic!("no delete line; saw {seen:#?}"));

    kill(Pid::from_raw(watch.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_exit(&mut watch, Duration::from_secs(5));
    assert!(
        status.success(),
        "Ctrl-C ends the watch cleanly: {status:?}"
    );
    up.stop(Signal::SIGTERM, Duration::from_secs(60));
}

#[test]
fn watch_of_an_unknown_topic_lists_the_known_ones() {
    let root = tempfile::tempdir().unwrap();
    let (code, _, err) = cairn(root.path(), &["watch", "AppInstanceStatus", "Nonsense"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown topic Nonsense"), "{err}");
    for topic in ["AppInstanceStatus", "DomainStatus", "VolumesSnapshotStatus"] {
        assert!(err.contains(topic), "{topic} not listed: {err}");
    }
}

#[test]
fn watch_started_before_the_device_waits_for_it_and_prints_its_changes() {
    let root = tempfile::tempdir().unwrap();
    let mut watch = Command::new(cairn_bin())
        .arg("--root")
        .arg(root.path())
        .args(["watch", "--json", "AppInstanceStatus"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(watch.stdout.take().unwrap());
    let err = lines(watch.stderr.take().unwrap());
    let (waiting, _) = wait_line(&err, Duration::from_secs(10), |l| l.contains("waiting"))
        .unwrap_or_else(|seen| panic!("watch did not say it waits: {seen:?}"));
    assert!(
        waiting.contains("agents not running") && waiting.contains("start them with `cairn up`"),
        "{waiting}"
    );

    // The device comes up: its apps appear on the watch that was already there.
    let mut up = Up::start_in(root, &cairn_bin(), &[]);
    wait_line(&out, Duration::from_secs(90), |l| {
        let v = json(l);
        v["topic"] == "AppInstanceStatus" && v["value"]["DisplayName"] == "demo-logger"
    })
    .unwrap_or_else(|seen| panic!("no demo app on the watch; saw {seen:#?}\n{}", up.log()));
    kill(Pid::from_raw(watch.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_exit(&mut watch, Duration::from_secs(10));
    assert!(
        status.success(),
        "Ctrl-C ends the watch cleanly: {status:?}"
    );
    up.stop(Signal::SIGTERM, Duration::from_secs(60));
}

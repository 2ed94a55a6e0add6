//! The config-agent as a process, on a local config file: applied at start, applied again when
//! it changes, and an invalid file refused as a whole with the field named in DeviceStatus
//! while the previous config stays in force.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_pubsub::{Bus, Event, Subscription, Topic};
use cairn_types::{AppInstanceConfig, DeviceStatus, VolumeConfig};

const APP: &str = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const VOLUME: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn config(version: &str, max_snapshots: &str) -> String {
    format!(
        r#"{{"apps": [{{"uuid": "{APP}", "version": "{version}", "display_name": "sensor",
            "volume_refs": [{{"uuid": "{VOLUME}"}}],
            "snapshot": {{"max_snapshots": {max_snapshots}}},
            "domain": {{"kind": "process", "command": "/bin/sleep", "args": ["1000"]}}}}],
           "volumes": [{{"uuid": "{VOLUME}", "format": "qcow2", "max_size_bytes": 1048576}}]}}"#
    )
}

/// The safety-net re-read far beyond every wait below: a change must be seen through inotify.
const SAFETY_NET_MS: &str = "600000";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn next<T: Topic>(sub: &mut Subscription<T>) -> Event<T> {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("an event within 10 s")
}

async fn first_value<T: Topic + std::fmt::Debug>(sub: &mut Subscription<T>) -> T {
    loop {
        match next(sub).await {
            Event::Create { value, .. } => return value,
            Event::Synchronized | Event::PublisherRestarted { .. } => {}
            other => panic!("expected the first value, got {other:?}"),
        }
    }
}

async fn until_status(
    sub: &mut Subscription<DeviceStatus>,
    done: impl Fn(&DeviceStatus) -> bool,
) -> DeviceStatus {
    loop {
        if let Event::Create { value, .. } | Event::Modify { new: value, .. } = next(sub).await
            && done(&value)
        {
            return value;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_file_is_applied_followed_and_refused_when_invalid() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("config.json");
    std::fs::write(&file, config("1", "2")).unwrap();
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_cairn-config-agent"))
            .args([
                "--config",
                file.to_str().unwrap(),
                "--poll-ms",
                SAFETY_NET_MS,
            ])
            .env("CAIRN_RUN_DIR", root.path().join("run"))
            .env("CAIRN_PERSIST_DIR", root.path().join("persist"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let reader = Bus::new(
        "app-manager",
        root.path().join("run"),
        root.path().join("persist"),
    );
    let mut apps = reader.subscribe::<AppInstanceConfig>("config-agent");
    let mut volumes = reader.subscribe::<VolumeConfig>("config-agent");
    let mut device = reader.subscribe::<DeviceStatus>("config-agent");

    // The subscriber may connect before the first publish: an empty table is synchronized first.
    let app = first_value(&mut apps).await;
    assert_eq!(app.uuid_and_version.version, "1");
    assert_eq!(app.snapshot.max_snapshots, 2);
    first_value(&mut volumes).await;
    let status = until_status(&mut device, |s| s.apps == 1).await;
    assert!(!status.last_error.is_error());
    assert_eq!(status.volumes, 1);

    // A change is applied again.
    std::fs::write(&file, config("2", "2")).unwrap();
    loop {
        if let Event::Modify { new, .. } = next(&mut apps).await {
            assert_eq!(new.uuid_and_version.version, "2");
            break;
        }
    }

    // A file replaced by rename (a new inode, as editors and tooling write it) is seen too.
    let tmp = root.path().join(".config.json.tmp");
    std::fs::write(&tmp, config("2b", "2")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    loop {
        if let Event::Modify { new, .. } = next(&mut apps).await {
            assert_eq!(new.uuid_and_version.version, "2b");
            break;
        }
    }

    // An invalid file changes nothing but the status, which names the field.
    std::fs::write(&file, config("3", "\"two\"")).unwrap();
    let status = until_status(&mut device, |s| s.last_error.is_error()).await;
    assert!(
        status
            .last_error
            .error
            .contains("apps[0].snapshot.max_snapshots"),
        "{}",
        status.last_error.error
    );
    assert_eq!(apps.get(APP).unwrap().uuid_and_version.version, "2b");
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), apps.recv()).await {
        panic!("the refused config reached the bus: {event:?}");
    }

    // Fixing the file applies it and clears the error.
    std::fs::write(&file, config("3", "3")).unwrap();
    let status = until_status(&mut device, |s| !s.last_error.is_error()).await;
    assert_eq!(status.apps, 1);
    loop {
        if let Event::Modify { new, .. } = next(&mut apps).await
            && new.uuid_and_version.version == "3"
        {
            break;
        }
    }
}

/// Issue 17: `[]` (read by serde as a config of nothing) deleted the device's volumes. Each
/// top level that is not a device config is refused in DeviceStatus, naming the file and what
/// the top level is; the volume and app stay published; `{"apps": [], "volumes": []}` on
/// purpose empties the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_device_config_is_refused_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("config.json");
    std::fs::write(&file, config("1", "2")).unwrap();
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_cairn-config-agent"))
            .args([
                "--config",
                file.to_str().unwrap(),
                "--poll-ms",
                SAFETY_NET_MS,
            ])
            .env("CAIRN_RUN_DIR", root.path().join("run"))
            .env("CAIRN_PERSIST_DIR", root.path().join("persist"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let reader = Bus::new(
        "volume-manager",
        root.path().join("run"),
        root.path().join("persist"),
    );
    let mut apps = reader.subscribe::<AppInstanceConfig>("config-agent");
    let mut volumes = reader.subscribe::<VolumeConfig>("config-agent");
    let mut items = reader.subscribe::<cairn_types::ConfigItemValueMap>("config-agent");
    let mut device = reader.subscribe::<DeviceStatus>("config-agent");
    first_value(&mut apps).await;
    first_value(&mut volumes).await;
    first_value(&mut items).await;
    until_status(&mut device, |s| s.volumes == 1).await;

    for (text, kind) in [
        ("[]", "a JSON array"),
        ("{}", "an empty object"),
        ("null", "null"),
        ("42", "a number"),
        ("\"config\"", "a string"),
        (r#"{"config_items": {}}"#, "an object naming neither"),
    ] {
        std::fs::write(&file, text).unwrap();
        let want = format!(
            "config file {} refused: the top level is {kind}",
            file.display()
        );
        let status = until_status(&mut device, |s| s.last_error.error.starts_with(&want)).await;
        assert!(
            status
                .last_error
                .error
                .contains("a device config is an object with `apps` and `volumes`"),
            "{}",
            status.last_error.error
        );
        assert_eq!(
            status.volumes, 1,
            "{text}: the config in force is unchanged"
        );
    }
    assert!(volumes.get(&format!("{VOLUME}#0")).is_some());
    assert!(apps.get(APP).is_some());
    for _ in 0..3 {
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(200), volumes.recv()).await {
            assert!(
                !matches!(event, Event::Delete { .. }),
                "a refused config removed a volume: {event:?}"
            );
        }
    }

    // Said on purpose, an empty device is applied.
    std::fs::write(&file, r#"{"apps": [], "volumes": []}"#).unwrap();
    let status = until_status(&mut device, |s| s.volumes == 0).await;
    assert!(!status.last_error.is_error(), "{:?}", status.last_error);
    loop {
        if let Event::Delete { .. } = next(&mut volumes).await {
            break;
        }
    }
}

//! Logs to EVE's log endpoints: the log-manager follows the agents' log files and an app's
//! output, and the test controller decodes what arrives with EVE's `LogEntry` definition. The
//! controller unreachable: files queue on disk under the cap, then drain in order. The
//! log-manager killed at its crash points: no line is lost.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cairn_config_agent::proto::{
    AppInstanceConfig as ProtoApp, CairnDomain, EdgeDevConfig, InstanceOpsCmd, UuidAndVersion,
};
use cairn_e2e::Device;
use cairn_log_manager::collect::LogCursors;
use cairn_log_manager::queue::{APP_DIR, DEV_DIR};
use cairn_test_controller::logs::{LogFile, decode};
use cairn_test_controller::{Fault, TestController};
use cairn_types::LogManagerStatus;

const SERIAL: &str = "CAIRN-LOGS-0001";
const APP: &str = "7a1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const WITHIN: Duration = Duration::from_secs(60);

/// An app (a process) whose output is numbered lines, `every` seconds apart.
fn counting_app(line: &str, every: &str) -> EdgeDevConfig {
    EdgeDevConfig {
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: "1".into(),
            }),
            displayname: "counter".into(),
            activate: true,
            restart: Some(InstanceOpsCmd::default()),
            purge: Some(InstanceOpsCmd::default()),
            cairn_domain: Some(CairnDomain {
                kind: "process".into(),
                command: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    format!("i=0; while :; do i=$((i+1)); echo \"{line} $i\"; sleep {every}; done"),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A device following the controller, all agents and the log-manager running.
fn device_with_logs(controller: &TestController, queue_bytes: u64) -> Device {
    let mut device = Device::new();
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(
        [
            "--config-interval-ms",
            "300",
            "--controller-timeout-ms",
            "700",
            "--retry-ms",
            "50",
            "--max-retry-ms",
            "400",
        ]
        .map(String::from),
    );
    device.follow_controller(args);
    // The harness writes each agent's stderr where `cairn up` would write it under <run>/logs.
    let agent_logs = device.root.path().join("agent-logs");
    for (key, value) in [
        ("CAIRN_LOG_DIR", agent_logs.to_str().unwrap().to_string()),
        ("CAIRN_LOG_COLLECT_MS", "100".into()),
        ("CAIRN_LOG_BATCH_MS", "300".into()),
        ("CAIRN_LOG_RETRY_MIN_MS", "100".into()),
        ("CAIRN_LOG_RETRY_MAX_MS", "500".into()),
        ("CAIRN_LOG_QUEUE_BYTES", queue_bytes.to_string()),
    ] {
        device.set_agent_env("log-manager", key, &value);
    }
    device.start_all();
    device.start("log-manager", None);
    device
}

/// Every file the controller received so far, decoded, with the app it was for.
fn received(controller: &TestController) -> Vec<(Option<String>, LogFile)> {
    let Some(device) = controller.device(SERIAL) else {
        return Vec::new();
    };
    device
        .logs
        .iter()
        .map(|upload| {
            let file = decode(&upload.gzip)
                .unwrap_or_else(|e| panic!("a log file does not decode as EVE's: {e:#}"));
            (upload.app.map(|a| a.to_string()), file)
        })
        .collect()
}

/// The numbers of the app's `<line> N` lines the controller received, in arrival order.
fn app_counters(controller: &TestController, line: &str) -> Vec<u64> {
    received(controller)
        .iter()
        .filter(|(app, _)| app.as_deref() == Some(APP))
        .flat_map(|(_, file)| file.entries.iter())
        .filter_map(|e| {
            let rest = e.content.strip_prefix(line)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queued(persist: &Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    for dir in [DEV_DIR, APP_DIR] {
        if let Ok(entries) = std::fs::read_dir(persist.join("newlog").join(dir)) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".gz") {
                    files += 1;
                    bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
    }
    (files, bytes)
}

fn cursors(persist: &Path) -> LogCursors {
    cairn_persist::load_with_backup::<LogCursors>(&persist.join("newlog").join("cursors.json"))
        .map(|l| l.record)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_logs_and_app_output_reach_eves_log_endpoints_as_log_entries() {
    let controller = TestController::start().await.unwrap();
    controller.set_config(SERIAL, counting_app("tick", "0.2"));
    let device = device_with_logs(&controller, 64 << 20);
    let uuid = controller.device_uuid(SERIAL).to_string();

    until(
        "the config-agent's log lines reach the device endpoint",
        || {
            received(&controller).iter().any(|(app, file)| {
                app.is_none() && file.entries.iter().any(|e| e.source == "config-agent")
            })
        },
    )
    .await;
    until("the app's fifth line reaches the app endpoint", || {
        app_counters(&controller, "tick").contains(&5)
    })
    .await;

    let files = received(&controller);
    for (app, file) in &files {
        match app {
            None => {
                // The device's files carry LogBundle's metadata in the gzip Comment.
                let meta: serde_json::Value =
                    serde_json::from_str(file.comment.as_deref().unwrap()).unwrap();
                assert_eq!(meta["devID"], uuid.as_str(), "{meta}");
                assert!(meta.get("eveVersion").is_some(), "{meta}");
            }
            // An app's files carry its display name in the gzip Name, as newlogd's.
            Some(_) => assert_eq!(file.name.as_deref(), Some("counter")),
        }
        for entry in &file.entries {
            assert!(
                !entry.severity.is_empty() && !entry.source.is_empty(),
                "{entry:?}"
            );
            assert!(entry.timestamp.is_some(), "{entry:?}");
        }
    }
    // A config-agent line keeps its level and module from tracing's format.
    let agent_entry = files
        .iter()
        .filter(|(app, _)| app.is_none())
        .flat_map(|(_, f)| f.entries.iter())
        .find(|e| e.source == "config-agent" && !e.filename.is_empty())
        .expect("a config-agent tracing line");
    assert!(
        agent_entry.filename.starts_with("cairn_config_agent"),
        "{agent_entry:?}"
    );
    assert!(
        ["info", "warning", "error", "debug"].contains(&agent_entry.severity.as_str()),
        "{agent_entry:?}"
    );
    // msgids increase within each stream, in the order the files were sent (one counter feeds
    // both streams, so each has gaps where the other's lines took numbers).
    for stream in [None, Some(APP.to_string())] {
        let msgids: Vec<u64> = files
            .iter()
            .filter(|(app, _)| *app == stream)
            .flat_map(|(_, f)| f.entries.iter().map(|e| e.msgid))
            .collect();
        assert!(
            msgids.windows(2).all(|w| w[0] < w[1]),
            "msgids of {stream:?} out of order: {msgids:?}"
        );
    }
    let app_entry = files
        .iter()
        .filter(|(app, _)| app.as_deref() == Some(APP))
        .flat_map(|(_, f)| f.entries.iter())
        .next()
        .unwrap();
    assert_eq!(app_entry.source, "app");
    drop(device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_controller_is_unreachable_logs_queue_under_the_cap_and_then_drain_in_order() {
    const CAP: u64 = 120_000;
    let controller = TestController::start().await.unwrap();
    // 2 KB of base64 noise a line, 20 lines a second: ~25 KB/s of gzip, the cap in ~5 s.
    let mut config = counting_app("noise", "0.05");
    if let Some(domain) = config.apps[0].cairn_domain.as_mut() {
        domain.args[1] = "i=0; while :; do i=$((i+1)); echo \"noise $i $(head -c 1500 /dev/urandom | base64 -w0)\"; sleep 0.05; done".into();
    }
    controller.set_config(SERIAL, config);
    let device = device_with_logs(&controller, CAP);
    let persist = device.persist_dir();
    until("the first app lines arrive", || {
        !app_counters(&controller, "noise").is_empty()
    })
    .await;

    controller.set_fault(Some(Fault::Close));
    let sent_before = controller.device(SERIAL).unwrap().logs.len();
    until("the queue drops its oldest files at the cap", || {
        let (_, bytes) = queued(&persist);
        assert!(
            bytes <= CAP,
            "the queue holds {bytes} bytes, over its cap of {CAP}"
        );
        cursors(&persist).dropped_files > 0
    })
    .await;
    let (files, bytes) = queued(&persist);
    assert!(files > 1 && bytes <= CAP, "{files} files, {bytes} bytes");
    // The technician sees the drop and why nothing goes out (`cairn status`).
    let status = device
        .wait_for::<LogManagerStatus>("log-manager", WITHIN, |s| {
            s.dropped_files > 0 && !s.last_error.is_empty()
        })
        .await
        .unwrap();
    assert!(status.queued_bytes <= CAP, "{status:?}");

    controller.set_fault(None);
    until("the queue drains", || {
        let (files, _) = queued(&persist);
        files == 0 && controller.device(SERIAL).unwrap().logs.len() > sent_before + 1
    })
    .await;
    // In order: the app's numbers only grow, with one gap where the dropped files were.
    let counters = app_counters(&controller, "noise");
    assert!(
        counters.windows(2).all(|w| w[0] < w[1]),
        "out of order: {counters:?}"
    );
    let gaps = counters.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(gaps >= 1, "the dropped files left no gap: {counters:?}");
    drop(device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_manager_killed_at_any_step_of_a_flush_loses_no_line() {
    let controller = TestController::start().await.unwrap();
    controller.set_config(SERIAL, counting_app("count", "0.05"));
    let mut device = device_with_logs(&controller, 64 << 20);
    until("the first app lines arrive", || {
        !app_counters(&controller, "count").is_empty()
    })
    .await;
    // Killed after the gzip file is written but before it is renamed into the queue, and after
    // it is queued but before the cursors are kept; then by an outside SIGKILL.
    for point in ["log-manager:gzip-written", "log-manager:before-cursors"] {
        device.start("log-manager", Some(point));
        assert!(
            device.died_within("log-manager", WITHIN),
            "the log-manager did not reach {point}"
        );
        device.start("log-manager", None);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    device.kill("log-manager");
    tokio::time::sleep(Duration::from_millis(700)).await;
    device.start("log-manager", None);

    let now = app_counters(&controller, "count")
        .into_iter()
        .max()
        .unwrap_or(0);
    let target = now + 40;
    until("the app's lines after the kills arrive", || {
        app_counters(&controller, "count").contains(&target)
    })
    .await;
    let seen: BTreeSet<u64> = app_counters(&controller, "count").into_iter().collect();
    let first = *seen.first().unwrap();
    let missing: Vec<u64> = (first..=target).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "lines lost: {missing:?}");
    drop(device);
}

/// EVE's remote log levels (newlogd `shouldSendToRemote`): with `debug.default.remote.loglevel`
/// at `warning`, an agent's INFO and DEBUG lines are not uploaded and its WARN line is; an
/// agent given `agent.<name>.debug.remote.loglevel` `debug` has its DEBUG line uploaded; an
/// app's output is never filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lines_below_their_remote_log_level_are_not_uploaded() {
    use cairn_config_agent::proto::ConfigItem;
    let controller = TestController::start().await.unwrap();
    let mut config = counting_app("tick", "0.2");
    for (key, value) in [
        ("debug.default.remote.loglevel", "warning"),
        ("agent.chatty.debug.remote.loglevel", "debug"),
    ] {
        config.config_items.push(ConfigItem {
            key: key.into(),
            value: value.into(),
        });
    }
    controller.set_config(SERIAL, config);
    let device = device_with_logs(&controller, 64 << 20);
    device
        .wait_for::<LogManagerStatus>("log-manager", WITHIN, |s| {
            s.remote_log_levels.get("default").map(String::as_str) == Some("warning")
                && s.remote_log_levels.get("chatty").map(String::as_str) == Some("debug")
        })
        .await
        .unwrap();

    // Two more "agents" of the device, in tracing's format as `cairn up` writes their stderr.
    let at = "2026-12-07T06:33:32.123456Z";
    std::fs::write(
        device.agent_log("probe"),
        format!(
            "{at}  INFO probe::t: probe-info\n{at}  WARN probe::t: probe-warn\n{at} DEBUG probe::t: probe-debug\n"
        ),
    )
    .unwrap();
    std::fs::write(
        device.agent_log("chatty"),
        format!("{at} DEBUG chatty::t: chatty-debug\n"),
    )
    .unwrap();
    let sent = |content: &str| {
        received(&controller)
            .iter()
            .filter(|(app, _)| app.is_none())
            .flat_map(|(_, f)| f.entries.iter())
            .any(|e| e.content == content)
    };
    until("the lines at or above their level arrive", || {
        sent("probe-warn") && sent("chatty-debug")
    })
    .await;
    assert!(
        !sent("probe-info"),
        "INFO is below the default remote level"
    );
    assert!(
        !sent("probe-debug"),
        "DEBUG is below the default remote level"
    );
    until("the app's output still arrives", || {
        app_counters(&controller, "tick").contains(&3)
    })
    .await;
    drop(device);
}

//! Issue 17, the app lifecycle across the real agents: an app whose process dies is started
//! again by its restart policy, with the failure and the restart count reported; a version that
//! cannot run is reported Broken with the reason, and a good version after it runs at once,
//! with no agent restarted.
//!
//! The app is a shell process on a `dir` volume that appends its pid to `pids` at each start.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::{DeviceStatus, SwState};
use uuid::Uuid;

const APP: &str = "e2e0ea90-0000-4000-8000-00000000a017";
const VOLUME: &str = "e2e0ea90-0000-4000-8000-00000000b017";

/// Generous: CI runs this next to the VM tests on two cores.
const SETTLE: Duration = Duration::from_secs(60);

fn config(device: &Device, version: &str, command: &str, policy: &str) -> String {
    let marker = device.root.path().display();
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "{version}", "display_name": "lifecycle",
    "restart_policy": "{policy}",
    "volume_refs": [{{"uuid": "{VOLUME}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 2}},
    "domain": {{"kind": "process", "command": "{command}",
                "args": ["-c", "echo $$ >> pids; while :; do sleep 1; done", "{marker}"]}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "generation_count": 0, "format": "dir"}}]
}}"#
    )
}

fn pids(volume: &Path) -> Vec<i32> {
    std::fs::read_to_string(volume.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The live processes whose command line carries this device's root: its app processes.
fn app_processes(device: &Device) -> Vec<i32> {
    let marker = device.root.path().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            String::from_utf8_lossy(&cmdline).contains(&marker)
                && String::from_utf8_lossy(&cmdline).starts_with("/bin/sh")
                && !zombie
        })
        .collect()
}

fn volume(device: &Device) -> std::path::PathBuf {
    device.dir_volume(VOLUME.parse::<Uuid>().unwrap(), 0)
}

/// A device running the app under `policy`, once the app has started: the device and its volume.
async fn running_device(policy: &str) -> (Device, std::path::PathBuf) {
    let mut device = Device::new();
    device.write_config(&config(&device, "1", "/bin/sh", policy));
    device.start_all();
    let volume = volume(&device);
    device
        .until(SETTLE, "the app ran", || pids(&volume).len() == 1)
        .await;
    (device, volume)
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_app_process_is_restarted_by_its_policy_with_the_failure_reported() {
    let (mut device, volume) = running_device("always").await;
    let first = pids(&volume)[0];

    sigkill(first);

    let status = device
        .app_status(SETTLE, |s| s.restarts == 1 && s.state == SwState::Running)
        .await
        .unwrap_or_else(|last| panic!("not restarted: {last}\n{}", device.log_tails(30)));
    assert!(
        status.last_failure.error.contains("signal 9"),
        "{:?}",
        status.last_failure
    );
    assert!(status.error.error.is_empty(), "{:?}", status.error);
    device
        .until(SETTLE, "the app started again", || pids(&volume).len() == 2)
        .await;
    assert_eq!(app_processes(&device).len(), 1, "exactly one copy runs");
    for agent in cairn_e2e::AGENTS {
        assert!(!device.has_died(agent), "{agent} died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_app_under_policy_never_stays_broken_until_the_restart_counter() {
    let (device, volume) = running_device("never").await;
    sigkill(pids(&volume)[0]);
    let status = device
        .app_status(SETTLE, |s| s.state == SwState::Broken)
        .await
        .unwrap();
    assert!(
        status.error.error.contains("signal 9"),
        "{:?}",
        status.error
    );
    assert!(
        status
            .error
            .error_retry_condition
            .contains("restart counter"),
        "{:?}",
        status.error
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pids(&volume).len(), 1, "not restarted by the device");

    let restarted = config(&device, "1", "/bin/sh", "never")
        .replace(r#""restart_policy""#, r#""restart": 1, "restart_policy""#);
    device.write_config(&restarted);
    device
        .app_status(SETTLE, |s| {
            s.state == SwState::Running && s.error.error.is_empty()
        })
        .await
        .unwrap();
    device
        .until(SETTLE, "the restart command started it", || {
            pids(&volume).len() == 2
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_is_reported_broken_and_a_good_one_after_it_recovers_without_restarts() {
    let (mut device, volume) = running_device("always").await;

    // A typo in the command: version 2 cannot start.
    device.write_config(&config(&device, "2", "/bin/shh", "always"));
    let status = device
        .app_status(SETTLE, |s| {
            s.state == SwState::Broken && s.uuid_and_version.version == "2"
        })
        .await
        .unwrap_or_else(|last| panic!("not broken: {last}\n{}", device.log_tails(30)));
    assert!(
        status.error.error.contains("/bin/shh"),
        "{:?}",
        status.error
    );
    assert!(!status.error.error_retry_condition.is_empty());

    // The fix: version 3 runs at once, reported as such.
    device.write_config(&config(&device, "3", "/bin/sh", "always"));
    let status = device
        .app_status(SETTLE, |s| {
            s.state == SwState::Running && s.uuid_and_version.version == "3"
        })
        .await
        .unwrap_or_else(|last| panic!("not recovered: {last}\n{}", device.log_tails(30)));
    assert!(status.error.error.is_empty(), "{:?}", status.error);
    device
        .until(SETTLE, "version 3 started", || pids(&volume).len() == 2)
        .await;
    assert_eq!(app_processes(&device).len(), 1);
    for agent in cairn_e2e::AGENTS {
        assert!(
            !device.has_died(agent),
            "{agent} died: nothing was restarted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_died_while_every_agent_was_down_is_restarted_when_they_come_back() {
    let (mut device, volume) = running_device("always").await;
    device
        .app_status(SETTLE, |s| s.state == SwState::Running)
        .await
        .unwrap();
    // The domain-manager's key files are written behind: once its file says Running, a
    // restarted domain-manager knows the app ran (else it would just start it, unreported).
    let key_file = device
        .run_dir()
        .join("domain-manager/DomainStatus")
        .join(format!("{APP}.json"));
    device
        .until(SETTLE, "the domain-manager's key file says Running", || {
            std::fs::read_to_string(&key_file).is_ok_and(|t| t.contains("\"Running\""))
        })
        .await;
    // Every agent SIGKILLed, `/run` kept (not a reboot); then the app dies too.
    for agent in cairn_e2e::AGENTS {
        device.kill(agent);
    }
    sigkill(pids(&volume)[0]);
    device.start_all();

    let status = device
        .app_status(SETTLE, |s| s.restarts == 1 && s.state == SwState::Running)
        .await
        .unwrap_or_else(|last| panic!("not restarted: {last}\n{}", device.log_tails(30)));
    assert!(
        status
            .last_failure
            .error
            .contains("domain-manager was down"),
        "{:?}",
        status.last_failure
    );
    device
        .until(SETTLE, "the app started again", || pids(&volume).len() == 2)
        .await;
    assert_eq!(app_processes(&device).len(), 1, "exactly one copy runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_holding_an_array_or_an_empty_object_is_refused_and_deletes_nothing() {
    let (device, volume) = running_device("always").await;

    for bad in ["[]", "{}", "null"] {
        device.write_config(bad);
        let file = device.config_file().display().to_string();
        let status = device
            .wait_for::<DeviceStatus>("config-agent", SETTLE, |d| {
                d.last_error.error.contains(&file) && d.last_error.error.contains("refused")
            })
            .await
            .unwrap_or_else(|last| panic!("{bad} not refused: {last}"));
        assert_eq!(status.apps, 1, "{bad}: the config in force stays");
        // The old config-agent applied "0 apps, 0 volumes" and the volume went within 0.5 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            pids(&volume).len(),
            1,
            "{bad}: the volume and its data are kept"
        );
        assert_eq!(app_processes(&device).len(), 1, "{bad}: the app still runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_delay_holds_the_app_start_delayed_and_a_restarted_app_manager_keeps_the_window() {
    const DELAY: i64 = 12;
    let mut device = Device::new();
    let delayed = config(&device, "1", "/bin/sh", "always").replace(
        r#""restart_policy": "always","#,
        &format!(r#""restart_policy": "always", "start_delay_in_seconds": {DELAY},"#),
    );
    device.write_config(&delayed);
    device.start_all();
    let volume = volume(&device);
    device
        .app_status(SETTLE, |s| s.state == SwState::StartDelayed)
        .await
        .unwrap_or_else(|last| panic!("not START_DELAYED: {last}\n{}", device.log_tails(30)));
    let boot_file = device.run_dir().join("app-manager.boot");
    let ready_at =
        chrono::DateTime::parse_from_rfc3339(std::fs::read_to_string(&boot_file).unwrap().trim())
            .unwrap();
    assert!(pids(&volume).is_empty(), "the app ran inside its delay");

    // The app-manager dies half-way through the window and comes back: the window is the
    // boot's (kept in the run directory), so the start is not pushed back by the restart.
    tokio::time::sleep(Duration::from_secs(5)).await;
    device.kill("app-manager");
    device.start("app-manager", None);
    let status = device
        .app_status(SETTLE, |s| s.state == SwState::Running)
        .await
        .unwrap_or_else(|last| panic!("never ran: {last}\n{}", device.log_tails(30)));
    let started = status.boot_time.expect("a running app has a boot time");
    let after = (started - ready_at.with_timezone(&chrono::Utc)).num_milliseconds();
    assert!(
        after >= DELAY * 1000,
        "started {after} ms after the boot's config, inside its {DELAY} s delay"
    );
    // A window counted again from the app-manager's restart (5 s in) would end at 17 s.
    assert!(
        after < (DELAY + 4) * 1000,
        "started {after} ms after the boot's config: the restart reopened the window"
    );
    assert_eq!(pids(&volume).len(), 1);

    // A reboot (a fresh run directory) opens a new window.
    device.power_cycle();
    device
        .app_status(SETTLE, |s| s.state == SwState::StartDelayed)
        .await
        .unwrap_or_else(|last| {
            panic!(
                "not delayed after a reboot: {last}\n{}",
                device.log_tails(30)
            )
        });
    assert_eq!(
        pids(&volume).len(),
        1,
        "the app ran again inside the new window"
    );
    device
        .app_status(SETTLE, |s| s.state == SwState::Running)
        .await
        .unwrap_or_else(|last| {
            panic!(
                "never ran after the reboot: {last}\n{}",
                device.log_tails(30)
            )
        });
    device
        .until(SETTLE, "the app started again", || pids(&volume).len() == 2)
        .await;
}

/// Issue 20: a snapshot is taken but its records (config, status) cannot be written: the
/// app-manager says so in the app's status and writes them once it can, without exiting; and
/// records lost with a crash are written again at its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_records_cannot_be_written_is_reported_and_written_later_without_exiting()
{
    use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE};
    const SNAPSHOT: &str = "e2e0ea90-0000-4000-8000-00000000c017";
    let (mut device, _volume) = running_device("always").await;
    let dir = device.persist_dir().join("snapshots").join(SNAPSHOT);
    let config_record = dir.join(APP_INSTANCE_CONFIG_FILE);
    // A directory where the record goes: its write fails (EISDIR), nothing else does.
    std::fs::create_dir_all(&config_record).unwrap();
    let with_snapshot = config(&device, "1", "/bin/sh", "always").replace(
        r#""snapshot": {"max_snapshots": 2}"#,
        &format!(r#""snapshot": {{"max_snapshots": 2, "snapshots": [{{"id": "{SNAPSHOT}", "type": "immediate"}}]}}"#),
    );
    device.write_config(&with_snapshot);
    let status = device
        .app_status(SETTLE, |s| {
            s.error.error.contains("records cannot be written")
        })
        .await
        .unwrap_or_else(|last| panic!("not reported: {last}\n{}", device.log_tails(30)));
    assert!(status.error.error.contains(SNAPSHOT), "{:?}", status.error);
    assert!(!device.has_died("app-manager"), "the app-manager exited");

    // Mended: written at the next try, the error goes.
    std::fs::remove_dir(&config_record).unwrap();
    device
        .app_status(SETTLE, |s| {
            !s.error.is_error() && s.state == SwState::Running
        })
        .await
        .unwrap_or_else(|last| panic!("not written: {last}\n{}", device.log_tails(30)));
    let written = cairn_persist::load::<cairn_types::AppInstanceConfig>(&config_record).unwrap();
    assert_eq!(written.record.uuid_and_version.uuid.to_string(), APP);
    assert!(!device.has_died("app-manager"), "the app-manager exited");

    // Lost with a crash: written again when the app-manager starts.
    device.kill("app-manager");
    std::fs::remove_file(&config_record).unwrap();
    std::fs::remove_file(dir.join(SNAPSHOT_INSTANCE_STATUS_FILE)).unwrap();
    device.start("app-manager", None);
    device
        .until(SETTLE, "the snapshot's records written again", || {
            cairn_persist::load::<cairn_types::AppInstanceConfig>(&config_record).is_ok()
                && cairn_persist::load::<cairn_types::SnapshotInstanceStatus>(
                    &dir.join(SNAPSHOT_INSTANCE_STATUS_FILE),
                )
                .is_ok()
        })
        .await;
}

//! The last reboot reason in `ZInfoDevice` (issue 18, item 4), as EVE's nodeagent gives it:
//! the first start on a fresh `/persist` is FIRST; a start after `cairn up` stopped cleanly is
//! the stop it recorded; a start after `cairn up` and every agent were SIGKILLed (what a power
//! cut leaves) is UNKNOWN. `cairn up` runs the real agents against the test controller.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cairn_config_agent::proto::{BootReason, EdgeDevConfig, InfoContent, ZInfoDevice};
use cairn_e2e::{Device, cairn_bin, processes_of};
use cairn_test_controller::TestController;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const SERIAL: &str = "CAIRN-E2E-BOOT";
const SETTLE: Duration = Duration::from_secs(90);

fn cairn_up(root: &Path, controller: &TestController) -> Child {
    let args = controller.device_args(&root.join("setup"), SERIAL).unwrap();
    Command::new(cairn_bin())
        .args(["up", "--root"])
        .arg(root)
        .args(args)
        .env("CAIRN_CONFIG_INTERVAL_MS", "200")
        .env("CAIRN_RETRY_MS", "100")
        .env(
            "RUST_LOG",
            std::env::var("CAIRN_E2E_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `up` to end.
async fn reaped(up: &mut Child, what: &str) {
    let deadline = Instant::now() + SETTLE;
    while up.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = up.kill();
            panic!("{what}: cairn up did not end within {SETTLE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first `ZInfoDevice` that arrives after the `seen`-th info message.
async fn device_info_after(controller: &TestController, seen: usize, what: &str) -> ZInfoDevice {
    let device = controller
        .wait_for(SERIAL, SETTLE, what, |d| {
            d.infos
                .iter()
                .skip(seen)
                .any(|i| matches!(i.info_content, Some(InfoContent::Dinfo(_))))
        })
        .await
        .unwrap();
    device
        .infos
        .iter()
        .skip(seen)
        .find_map(|i| match &i.info_content {
            Some(InfoContent::Dinfo(d)) => Some(d.clone()),
            _ => None,
        })
        .unwrap()
}

fn infos_so_far(controller: &TestController) -> usize {
    controller.device(SERIAL).map_or(0, |d| d.infos.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_reboot_reason_is_first_then_the_clean_stop_then_unknown_after_a_kill() {
    let controller = TestController::start().await.unwrap();
    controller.set_config(SERIAL, EdgeDevConfig::default());
    // The harness's device only lends its root: `cairn up` runs the agents.
    let device = Device::new();
    let root = device.root.path().to_path_buf();

    let mut up = cairn_up(&root, &controller);
    let first = device_info_after(&controller, 0, "the first ZInfoDevice").await;
    assert_eq!(first.last_boot_reason(), BootReason::First, "{first:?}");
    assert_eq!(first.restart_counter, 0);
    assert!(
        first.last_reboot_reason.starts_with("NORMAL: First boot"),
        "{}",
        first.last_reboot_reason
    );

    // A clean stop: cairn up stops its agents and says why.
    let stopped_at = unix_now();
    kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM).unwrap();
    reaped(&mut up, "a SIGTERM").await;
    let seen = infos_so_far(&controller);
    let mut up = cairn_up(&root, &controller);
    let second = device_info_after(&controller, seen, "the ZInfoDevice after a clean stop").await;
    assert_eq!(
        second.last_boot_reason(),
        BootReason::PoweroffCmd,
        "{second:?}"
    );
    assert_eq!(second.restart_counter, 1);
    assert!(
        second.last_reboot_reason.contains("SIGTERM"),
        "{}",
        second.last_reboot_reason
    );
    let when = second.last_reboot_time.unwrap().seconds;
    assert!(
        (stopped_at..=unix_now()).contains(&when),
        "the time of the stop: {when}, asked at {stopped_at}"
    );

    // What a power cut leaves: cairn up and every agent SIGKILLed, nothing said.
    let mut killed = processes_of(&root);
    killed.push(up.id() as i32);
    for pid in &killed {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    reaped(&mut up, "a SIGKILL").await;
    assert!(killed.len() >= 7, "cairn up and six agents: {killed:?}");
    let deadline = Instant::now() + SETTLE;
    while !processes_of(&root).is_empty() {
        assert!(Instant::now() < deadline, "the killed agents are gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = infos_so_far(&controller);
    let mut up = cairn_up(&root, &controller);
    let third = device_info_after(&controller, seen, "the ZInfoDevice after a kill").await;
    assert_eq!(third.last_boot_reason(), BootReason::Unknown, "{third:?}");
    assert_eq!(third.restart_counter, 2);
    assert!(
        third
            .last_reboot_reason
            .starts_with("Unknown reboot reason"),
        "{}",
        third.last_reboot_reason
    );

    kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM).unwrap();
    reaped(&mut up, "the last SIGTERM").await;
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

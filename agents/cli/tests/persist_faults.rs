//! A device that boots with its persist file system read-only (a real read-only bind mount) or
//! full (a real tmpfs with `size=`, filled): every agent comes up and stays up, `cairn status`
//! keeps answering and says why an app does nothing, and no action is taken that cannot be
//! recorded: a snapshot asked meanwhile neither stops the app nor leaves a trace, and is taken
//! once the file system takes writes again. Needs root (mount), as the other loop-device tests.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const APP: &str = "0000000a-0000-4000-8000-0000000000f1";
const SNAPSHOT: &str = "0000000c-0000-4000-8000-0000000000f1";
const WAIT: Duration = Duration::from_secs(60);

fn mount(args: &[&str]) {
    let status = Command::new("mount").args(args).status().unwrap();
    assert!(status.success(), "mount {args:?} (this test needs root)");
}

/// A mount at `<root>/persist`, lazily unmounted on drop, after which the root goes too (its
/// `TempDir`, dropped earlier, could not remove a mount point or a read-only tree).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        if let Some(root) = self.0.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// What breaks the persist file system, and how it is mended.
enum Fault {
    ReadOnly,
    Full,
}

impl Fault {
    fn apply(&self, persist: &Path) {
        match self {
            Fault::ReadOnly => mount(&["-o", "remount,bind,ro", persist.to_str().unwrap()]),
            Fault::Full => {
                for (name, bs) in [("fill", "64k"), ("fill-tail", "1k")] {
                    let _ = Command::new("dd")
                        .args([
                            "if=/dev/zero",
                            &format!("of={}", persist.join(name).display()),
                            &format!("bs={bs}"),
                        ])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
                let probe = std::fs::write(persist.join("probe"), [0u8; 4096]);
                assert!(probe.is_err(), "the persist file system is not full");
            }
        }
    }

    fn mend(&self, persist: &Path) {
        match self {
            Fault::ReadOnly => mount(&["-o", "remount,bind,rw", persist.to_str().unwrap()]),
            Fault::Full => {
                std::fs::remove_file(persist.join("fill")).unwrap();
                std::fs::remove_file(persist.join("fill-tail")).unwrap();
            }
        }
    }

    /// How `cairn status` begins to say it.
    fn said(&self) -> &'static str {
        match self {
            Fault::ReadOnly => "read-only",
            Fault::Full => "full",
        }
    }

    /// The persist directory as its own mount, so the fault touches nothing else.
    fn mount(&self, persist: &Path) -> Mounted {
        std::fs::create_dir_all(persist).unwrap();
        let path = persist.to_str().unwrap();
        match self {
            Fault::ReadOnly => mount(&["--bind", path, path]),
            Fault::Full => mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs", path]),
        }
        Mounted(persist.to_path_buf())
    }
}

fn app_error(view: &serde_json::Value) -> String {
    app(view, "sensor")
        .and_then(|a| a["Error"]["Error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// How many requests the app-manager holds for the app, as its error says (0: none).
fn held(view: &serde_json::Value) -> usize {
    let error = app_error(view);
    let Some((before, _)) = error.split_once(" request(s) held") else {
        return 0;
    };
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn boots_and_records_nothing_it_cannot(fault: Fault) {
    let root = tempfile::tempdir().unwrap();
    let persist = root.path().join("persist");
    let _mounted = fault.mount(&persist);
    let config = root.path().join("mine.json");
    let config_arg = ["--config", config.to_str().unwrap()];
    std::fs::write(&config, process_app_config(APP, "sensor", "1", &[])).unwrap();

    // First boot, healthy: the app runs and its state is recorded.
    let mut up = Up::start_in(root, &cairn_bin(), &config_arg);
    up.wait_status(WAIT, |v| {
        app(v, "sensor").is_some_and(|a| a["State"] == RUNNING)
    });
    assert!(up.stop(Signal::SIGTERM, WAIT).success());
    let root = std::mem::replace(&mut up.root, tempfile::tempdir().unwrap());
    drop(up);

    // Second boot with the fault, the web page served too.
    fault.apply(&persist);
    let port = free_port("127.0.0.1");
    let http_arg = format!("127.0.0.1:{port}");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &[config_arg[0], config_arg[1], "--http", &http_arg],
    );
    // The app runs, or, when its start must be recorded first (a new restart generation, as
    // the first boot's stop may leave it), is held and says so.
    let view = up.wait_status(WAIT, |v| {
        app(v, "sensor").is_some_and(|a| a["State"] == RUNNING || held(v) > 0)
            && AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let (held_at_boot, state_at_boot) =
        (held(&view), app(&view, "sensor").unwrap()["State"].clone());
    let booted = up.agent_pids();
    assert_eq!(booted.len(), AGENTS.len(), "{view}");
    // The device says so, in JSON and to the technician.
    let said = view["persist_fault"].as_str().unwrap_or_default();
    assert!(said.starts_with(fault.said()), "{view}");
    let (_, text, _) = up.cairn(&["status"]);
    assert!(text.contains(&format!("persist  {said}")), "{text}");
    let (code, _, page) = get(port, "/");
    assert_eq!(code, 200, "{page}");
    let shown = page
        .split("id=\"persist-fault\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no fault badge on the page: {page}"));
    assert!(shown.contains(fault.said()), "{shown}");

    // A snapshot asked now cannot be recorded: held, said, nothing done.
    write_atomically(
        &config,
        &process_app_config(APP, "sensor", "1", &[SNAPSHOT]),
    );
    let view = up.wait_status(WAIT, |v| held(v) > held_at_boot);
    let error = app_error(&view);
    assert!(
        error.contains(APP) && error.contains("cannot be recorded"),
        "the app and the cause are named: {error}"
    );
    assert_eq!(
        app(&view, "sensor").unwrap()["State"],
        state_at_boot,
        "the app was stopped for a snapshot that could not be recorded: {view}"
    );
    assert!(
        !persist.join("snapshots").join(SNAPSHOT).exists(),
        "a trace of the held snapshot"
    );
    // Still up, the same processes: nothing crash-looped meanwhile.
    let view = up.wait_status(WAIT, |v| AGENTS.iter().all(|a| agent_state(v, a) == "up"));
    assert_eq!(
        up.agent_pids(),
        booted,
        "an agent restarted: {view}\n{}",
        up.log()
    );

    // Mended: the held snapshot is taken, the error goes.
    fault.mend(&persist);
    up.wait_status(WAIT, |v| {
        app_error(v).is_empty()
            && app(v, "sensor").is_some_and(|a| {
                a["State"] == RUNNING
                    && a["SnapStatus"]["AvailableSnapshots"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["Snapshot"]["SnapshotID"] == SNAPSHOT))
            })
    });
    assert!(persist.join("snapshots").join(SNAPSHOT).exists());
    let view = up.wait_status(WAIT, |_| true);
    assert!(view.get("persist_fault").is_none(), "{view}");
}

#[test]
fn a_device_booted_on_a_read_only_persist_serves_status_and_holds_what_it_cannot_record() {
    boots_and_records_nothing_it_cannot(Fault::ReadOnly);
}

#[test]
fn a_device_booted_on_a_full_persist_serves_status_and_holds_what_it_cannot_record() {
    boots_and_records_nothing_it_cannot(Fault::Full);
}

/// An app on a schedule, held on a read-only `/persist` (device clock 60x: a due time every
/// second): its due tick is held once, not again and again. Before, the held app kept its due
/// time in the past, so the app-manager woke at once, forever, holding a tick each time.
#[test]
fn a_scheduled_app_held_on_a_read_only_persist_holds_its_due_tick_once() {
    let fault = Fault::ReadOnly;
    let root = tempfile::tempdir().unwrap();
    let persist = root.path().join("persist");
    let _mounted = fault.mount(&persist);
    let config = root.path().join("mine.json");
    let config_arg = ["--config", config.to_str().unwrap()];
    std::fs::write(
        &config,
        process_app_config(APP, "sensor", "1", &[]).replace(
            r#""snapshot": { "max_snapshots": 4,"#,
            r#""snapshot": { "max_snapshots": 4, "schedule": "* * * * *", "time_zone": "UTC","#,
        ),
    )
    .unwrap();
    let clock = [("CAIRN_TEST_CLOCK", "2026-12-07T10:00:30Zx60")];
    let mut up = Up::start_with_env(root, &cairn_bin(), &config_arg, &clock);
    up.wait_status(WAIT, |v| {
        app(v, "sensor").is_some_and(|a| a["State"] == RUNNING)
    });
    assert!(up.stop(Signal::SIGTERM, WAIT).success());
    let root = std::mem::replace(&mut up.root, tempfile::tempdir().unwrap());
    drop(up);

    fault.apply(&persist);
    let up = Up::start_with_env(root, &cairn_bin(), &config_arg, &clock);
    up.wait_status(WAIT, |v| held(v) > 0);
    // Three device minutes later: their due times pass while the app is held.
    std::thread::sleep(Duration::from_secs(3));
    let view = up.wait_status(WAIT, |_| true);
    assert!(
        held(&view) <= 2,
        "held again and again: {}",
        app_error(&view)
    );
    fault.mend(&persist);
}

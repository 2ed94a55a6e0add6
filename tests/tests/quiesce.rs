//! Quiesce hooks (issue 11, item 2) across the real agents: process apps on `dir` volumes with
//! pre and post hooks run by the app-manager on the device. A pre hook runs while the app
//! still runs and before its volume is snapshotted; a failing or hanging one aborts the
//! snapshot before anything is taken, the app keeps running, and the post hook still runs.
//! A VM declared to run a guest agent (the test guest has none) gets its virtio-serial port;
//! the freeze for a live snapshot fails with "no guest agent answered within Ns", which fails
//! the snapshot, or, with `proceed_without_guest_agent`, is a warning and the snapshot is taken.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_e2e::Device;
use cairn_types::AppInstanceStatus;
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(30);

/// One app of the test: its ids and its hooks (JSON values of `pre`/`post`).
struct App {
    app: &'static str,
    volume: &'static str,
    snapshot: &'static str,
    pre: String,
    timeout_seconds: u32,
}

const FLUSHING: usize = 0;
const FAILING: usize = 1;
const HANGING: usize = 2;

fn uuid(s: &str) -> Uuid {
    s.parse().unwrap()
}

/// Where app `i`'s post hook leaves its mark (outside the volume: after the snapshot).
fn post_marker(device: &Device, i: usize) -> PathBuf {
    device.root.path().join(format!("post-ran-{i}"))
}

fn hang_pid_file(device: &Device) -> PathBuf {
    device.root.path().join("hang.pid")
}

fn apps(device: &Device) -> [App; 3] {
    apps_hanging_for(device, 1)
}

/// The apps, the hanging one's hook timing out after `hang_timeout` seconds.
fn apps_hanging_for(device: &Device, hang_timeout: u32) -> [App; 3] {
    [
        App {
            app: "e2e11a00-0000-4000-8000-00000000a001",
            volume: "e2e11a00-0000-4000-8000-00000000b001",
            snapshot: "e2e11a00-0000-4000-8000-00000000c001",
            // Writes into the app's volume whether the app was still running, so the
            // snapshot holds it only if the hook ran before the volume was snapshotted.
            pre: json_string(
                "if kill -0 $(cat \"$CAIRN_APP_VOLUMES/app.pid\"); then state=running; else state=stopped; fi; \
                 echo \"$CAIRN_HOOK_PHASE $CAIRN_SNAPSHOT_ID $CAIRN_APP_NAME $state\" > \"$CAIRN_APP_VOLUMES/flushed\"",
            ),
            timeout_seconds: 10,
        },
        App {
            app: "e2e11a00-0000-4000-8000-00000000a002",
            volume: "e2e11a00-0000-4000-8000-00000000b002",
            snapshot: "e2e11a00-0000-4000-8000-00000000c002",
            pre: r#"["/bin/sh", "-c", "echo flushing; echo cannot flush >&2; exit 3"]"#.into(),
            timeout_seconds: 10,
        },
        App {
            app: "e2e11a00-0000-4000-8000-00000000a003",
            volume: "e2e11a00-0000-4000-8000-00000000b003",
            snapshot: "e2e11a00-0000-4000-8000-00000000c003",
            // A background child in the hook's process group, which must die with it.
            pre: json_string(&format!(
                "sleep 600 & echo $! > {}; echo still flushing >&2; wait",
                hang_pid_file(device).display()
            )),
            timeout_seconds: hang_timeout,
        },
    ]
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Every app running; with `snapshots`, each lists its immediate snapshot.
fn config(device: &Device, snapshots: bool) -> String {
    config_hanging_for(device, snapshots, 1)
}

fn config_hanging_for(device: &Device, snapshots: bool, hang_timeout: u32) -> String {
    let marker = device.root.path().display();
    let entries: Vec<String> = apps_hanging_for(device, hang_timeout)
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let snapshot = if snapshots {
                format!(r#"{{"id": "{}", "type": "immediate"}}"#, a.snapshot)
            } else {
                String::new()
            };
            let post = json_string(&format!(
                "echo \"$CAIRN_HOOK_PHASE $CAIRN_SNAPSHOT_OUTCOME\" >> {}",
                post_marker(device, i).display()
            ));
            format!(
                r#"{{
    "uuid": "{app}", "version": "1", "display_name": "app-{i}",
    "volume_refs": [{{"uuid": "{volume}", "generation_count": 0}}],
    "snapshot": {{"max_snapshots": 2, "snapshots": [{snapshot}]}},
    "quiesce": {{"pre": {pre}, "post": {post}, "timeout_seconds": {timeout}}},
    "domain": {{"kind": "process", "command": "/bin/sh",
                "args": ["-c", "echo $$ > app.pid; echo run >> runs; while :; do sleep 1; done", "{marker}"]}}
  }}"#,
                app = a.app,
                volume = a.volume,
                pre = a.pre,
                timeout = a.timeout_seconds,
            )
        })
        .collect();
    let volumes: Vec<String> = apps(device)
        .iter()
        .map(|a| {
            format!(
                r#"{{"uuid": "{}", "generation_count": 0, "format": "dir"}}"#,
                a.volume
            )
        })
        .collect();
    format!(
        r#"{{"apps": [{}], "volumes": [{}]}}"#,
        entries.join(", "),
        volumes.join(", ")
    )
}

/// Waits until every app's latest status satisfies `done`.
async fn settled(
    device: &Device,
    done: impl Fn(usize, &AppInstanceStatus) -> bool,
) -> Vec<AppInstanceStatus> {
    let ids: Vec<Uuid> = apps(device).iter().map(|a| uuid(a.app)).collect();
    let mut sub = device.app_statuses();
    let mut latest: Vec<Option<AppInstanceStatus>> = vec![None; ids.len()];
    let found = tokio::time::timeout(SETTLE, async {
        loop {
            if let cairn_pubsub::Event::Create { value, .. }
            | cairn_pubsub::Event::Modify { new: value, .. } = sub.recv().await
                && let Some(i) = ids.iter().position(|a| *a == value.uuid_and_version.uuid)
            {
                latest[i] = Some(value);
                if latest
                    .iter()
                    .enumerate()
                    .all(|(i, s)| s.as_ref().is_some_and(|s| done(i, s)))
                {
                    return;
                }
            }
        }
    })
    .await;
    assert!(found.is_ok(), "apps not settled: {latest:#?}");
    latest.into_iter().map(Option::unwrap).collect()
}

fn running(s: &AppInstanceStatus) -> bool {
    s.activated && s.state == cairn_types::SwState::Running
}

fn runs(device: &Device, volume: &str) -> usize {
    std::fs::read_to_string(device.dir_volume(uuid(volume), 0).join("runs"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn failure<'a>(s: &'a AppInstanceStatus, snapshot: &str) -> Option<&'a str> {
    s.snap_status
        .requested_snapshots
        .iter()
        .find(|r| r.snapshot.snapshot_id == uuid(snapshot) && r.error.is_error())
        .map(|r| r.error.error.as_str())
}

/// Whether `pid` is a live process (a zombie nobody reaped is not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// Whether a hook or the app has written its line to `path` (a shell creates the file first).
fn written(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| !t.trim().is_empty())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_quiesce_a_snapshot_and_a_failing_or_hanging_pre_hook_aborts_it_cleanly() {
    let mut device = Device::new();
    device.write_config(&config(&device, false));
    device.start_all();
    settled(&device, |_, s| running(s)).await;
    let apps = apps(&device);
    // The apps have written their pids (a pre hook checks that its app still runs).
    for a in &apps {
        let pid = device.dir_volume(uuid(a.volume), 0).join("app.pid");
        device
            .until(SETTLE, "the app wrote its pid", || written(&pid))
            .await;
    }

    device.write_config(&config(&device, true));
    let statuses = settled(&device, |i, s| {
        let snapshot = apps[i].snapshot;
        let done = match i {
            FLUSHING => s
                .snap_status
                .available_snapshots
                .iter()
                .any(|a| a.snapshot.snapshot_id == uuid(snapshot)),
            _ => failure(s, snapshot).is_some(),
        };
        done && running(s)
    })
    .await;

    // The flushing app: its pre hook ran while the app ran, before the volume snapshot, so the
    // snapshot holds what it wrote; its post hook ran after, told the snapshot was taken.
    let flushing = &apps[FLUSHING];
    let taken = cairn_types::layout::volumes_dir(&device.persist_dir())
        .join(".snapshots")
        .join(cairn_types::volume_key(uuid(flushing.volume), 0))
        .join(flushing.snapshot)
        .join("flushed");
    assert_eq!(
        read(&taken),
        format!("pre {} app-0 running", flushing.snapshot)
    );
    device
        .until(SETTLE, "the flushing app's post hook ran", || {
            written(&post_marker(&device, FLUSHING))
        })
        .await;
    assert_eq!(read(&post_marker(&device, FLUSHING)), "post taken");
    assert_eq!(
        runs(&device, flushing.volume),
        2,
        "stopped once, started again"
    );

    // The failing app: the snapshot is Failed naming the hook, its exit code and its last
    // stderr line; nothing was asked of the volume-manager; the app never stopped; the post
    // hook ran, told the snapshot failed.
    let failing = &apps[FAILING];
    assert_eq!(
        failure(&statuses[FAILING], failing.snapshot),
        Some(
            "pre hook /bin/sh -c 'echo flushing; echo cannot flush >&2; exit 3' failed: exit 3: cannot flush"
        )
    );
    // The hanging app: killed at its timeout with its process group.
    let hanging = &apps[HANGING];
    let reason = failure(&statuses[HANGING], hanging.snapshot).unwrap();
    assert!(
        reason.contains("timed out after 1s") && reason.ends_with("still flushing"),
        "{reason}"
    );
    let sleeper: i32 = read(&hang_pid_file(&device)).parse().unwrap();
    device
        .until(SETTLE, "the hanging hook's child is killed", || {
            !alive(sleeper)
        })
        .await;
    for (i, a) in [(FAILING, failing), (HANGING, hanging)] {
        assert!(
            statuses[i].snap_status.available_snapshots.is_empty(),
            "{:#?}",
            statuses[i]
        );
        assert!(
            device.dir_volume_snapshots(uuid(a.volume), 0).is_empty(),
            "app {i}: a snapshot on its volume"
        );
        // No record at the volume-manager (it was never asked), none of the app-manager's.
        assert!(
            !device.snapshot_dirs().contains(&uuid(a.snapshot)),
            "app {i}: snapshot records exist"
        );
        assert_eq!(runs(&device, a.volume), 1, "app {i} was stopped");
        device
            // The hook's shell creates the file before it writes its line: wait for the line.
            .until(SETTLE, "the post hook ran", || {
                std::fs::read_to_string(post_marker(&device, i)).is_ok_and(|t| !t.trim().is_empty())
            })
            .await;
        assert_eq!(read(&post_marker(&device, i)), "post failed", "app {i}");
    }

    // The snapshot that was taken survives a restart of the app-manager, hooks not run again.
    device.kill("app-manager");
    device.start("app-manager", None);
    settled(&device, |i, s| {
        running(s)
            && (i != FLUSHING
                || s.snap_status
                    .available_snapshots
                    .iter()
                    .any(|a| a.snapshot.snapshot_id == uuid(flushing.snapshot)))
    })
    .await;
    assert_eq!(read(&post_marker(&device, FLUSHING)), "post taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_manager_killed_during_a_pre_hook_fails_the_snapshot_kills_the_hook_and_thaws() {
    let mut device = Device::new();
    device.write_config(&config_hanging_for(&device, false, 600));
    device.start_all();
    settled(&device, |_, s| running(s)).await;
    let apps = apps(&device);
    let hanging = &apps[HANGING];
    device.write_config(&config_hanging_for(&device, true, 600));
    // The hanging app's pre hook is running (it wrote its child's pid) when the app-manager
    // dies.
    device
        .until(SETTLE, "the hanging pre hook started", || {
            written(&hang_pid_file(&device))
        })
        .await;
    let sleeper: i32 = read(&hang_pid_file(&device)).parse().unwrap();
    device.kill("app-manager");
    assert!(alive(sleeper), "the hook outlives its app-manager");
    device.start("app-manager", None);

    let statuses = settled(&device, |i, s| {
        running(s) && (i != HANGING || failure(s, hanging.snapshot).is_some())
    })
    .await;
    let reason = failure(&statuses[HANGING], hanging.snapshot).unwrap();
    assert!(
        reason.contains("interrupted by a restart of the app-manager"),
        "{reason}"
    );
    device
        .until(SETTLE, "the interrupted hook's child is killed", || {
            !alive(sleeper)
        })
        .await;
    device
        .until(SETTLE, "the post hook ran", || {
            written(&post_marker(&device, HANGING))
        })
        .await;
    assert_eq!(read(&post_marker(&device, HANGING)), "post failed");
    assert!(
        device
            .dir_volume_snapshots(uuid(hanging.volume), 0)
            .is_empty()
    );
    assert!(!device.snapshot_dirs().contains(&uuid(hanging.snapshot)));
    assert_eq!(runs(&device, hanging.volume), 1, "the app was stopped");
}

const VM: &str = "e2e11a00-0000-4000-8000-00000000a0f1";
const VM_DISK: &str = "e2e11a00-0000-4000-8000-00000000b0f1";
const VM_LIVE: &str = "e2e11a00-0000-4000-8000-00000000c0f1";
const VM_PROCEED: &str = "e2e11a00-0000-4000-8000-00000000c0f2";

/// The test guest (no qemu-guest-agent inside) declared as running one, with live snapshots
/// `snapshots`; `proceed`: a freeze that fails does not fail a snapshot.
fn vm_config(device: &Device, snapshots: &[&str], proceed: bool) -> String {
    let guest = cairn_e2e::guest_dir();
    let snapshots: Vec<String> = snapshots
        .iter()
        .map(|s| format!(r#"{{"id": "{s}", "type": "immediate", "mode": "live"}}"#))
        .collect();
    let snapshots = snapshots.join(", ");
    let post = json_string(&format!(
        "echo \"$CAIRN_HOOK_PHASE $CAIRN_SNAPSHOT_OUTCOME\" >> {}",
        post_marker(device, 9).display()
    ));
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{VM}", "version": "1", "display_name": "counter",
    "volume_refs": [{{"uuid": "{VM_DISK}"}}],
    "snapshot": {{"max_snapshots": 2, "snapshots": [{snapshots}]}},
    "quiesce": {{"post": {post}, "timeout_seconds": 2, "proceed_without_guest_agent": {proceed}}},
    "domain": {{"kind": "vm", "kernel": "{}", "initrd": "{}",
                "append": "console=ttyS0 cryptomgr.notests panic=-1 cairn.workload=counter",
                "memory_mib": 128, "guest_agent": true}}
  }}],
  "volumes": [{{"uuid": "{VM_DISK}", "format": "qcow2", "max_size_bytes": 1048576}}]
}}"#,
        guest.join("vmlinuz").display(),
        guest.join("initramfs.cpio.gz").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_guest_agent_does_not_answer_fails_a_live_snapshot_or_proceeds_as_configured() {
    let mut device = Device::new();
    device.write_config(&vm_config(&device, &[], false));
    device.start_all();
    let domain = device
        .wait_for::<cairn_types::DomainStatus>("domain-manager", SETTLE, |d| d.pid.is_some())
        .await
        .unwrap();
    let pid = domain.pid;
    device.app_status(SETTLE, running).await.unwrap();
    // The domain-manager gave the VM its guest agent port.
    let port = device
        .run_dir()
        .join("domain-manager/apps")
        .join(VM)
        .join("qga.sock");
    assert!(port.exists(), "{}", port.display());

    device.write_config(&vm_config(&device, &[VM_LIVE], false));
    let status = device
        .app_status(SETTLE, |s| failure(s, VM_LIVE).is_some())
        .await
        .unwrap();
    assert_eq!(
        failure(&status, VM_LIVE),
        Some(
            format!(
                "guest fsfreeze failed: no guest agent answered within 2s on {}",
                port.display()
            )
            .as_str()
        )
    );
    // Nothing taken, the VM never stopped (same qemu), the post hook ran.
    let file = device.volume(SETTLE).await.file_location;
    assert!(cairn_e2e::qcow2_snapshots(&file).is_empty());
    device
        .until(SETTLE, "the post hook ran", || {
            written(&post_marker(&device, 9))
        })
        .await;
    assert_eq!(read(&post_marker(&device, 9)), "post failed");
    let status = device.app_status(SETTLE, running).await.unwrap();
    assert!(status.snap_status.available_snapshots.is_empty());
    let domain = device
        .wait_for::<cairn_types::DomainStatus>("domain-manager", SETTLE, |d| d.pid.is_some())
        .await
        .unwrap();
    assert_eq!(domain.pid, pid, "the VM was restarted");

    // Configured to proceed: the live snapshot is taken without the freeze, with a warning.
    device.write_config(&vm_config(&device, &[VM_LIVE, VM_PROCEED], true));
    let status = device
        .app_status(SETTLE, |s| {
            s.snap_status
                .available_snapshots
                .iter()
                .any(|a| a.snapshot.snapshot_id == uuid(VM_PROCEED))
        })
        .await
        .unwrap();
    assert!(
        status.warnings.iter().any(|w| w.contains(&format!(
            "snapshot {VM_PROCEED}: guest fsfreeze failed: no guest agent answered within 2s"
        ))),
        "{:#?}",
        status.warnings
    );
    assert!(cairn_e2e::qcow2_snapshots(&file).contains(VM_PROCEED));
}

//! The device end to end (issue 8): the four agents as real processes, the test controller over
//! HTTPS, and a VM app on the test guest (TCG) with a qcow2 volume whose sector 0 holds the
//! guest's counter. Each test drives the device only through the controller's config and
//! checks what a technician and the controller would see, plus the disk itself.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, CairnDomain, EdgeDevConfig, InstanceOpsCmd,
    SnapshotConfig, SnapshotDesc, UuidAndVersion, Volume, VolumeRef,
};
use cairn_e2e::{
    Device, cairn_bin, console_counters, guest_dir, processes_of, qcow2_snapshots, sector_counter,
};
use cairn_test_controller::TestController;
use cairn_types::{AppInstanceStatus, DomainStatus};
use uuid::Uuid;

const SERIAL: &str = "CAIRN-E2E-0001";
const APP: &str = "e2e5a17e-0000-4000-8000-00000000a001";
const VOLUME: &str = "e2e5a17e-0000-4000-8000-00000000b001";
const S1: &str = "e2e5a17e-0000-4000-8000-00000000c001";
const S2: &str = "e2e5a17e-0000-4000-8000-00000000c002";
const S3: &str = "e2e5a17e-0000-4000-8000-00000000c003";
const SETTLE: Duration = Duration::from_secs(90);

/// What the controller asks of the app.
#[derive(Clone)]
struct Want {
    version: &'static str,
    snapshots: Vec<(&'static str, proto::SnapshotType)>,
    max: u32,
    restart: u32,
    rollback: u32,
    active: &'static str,
}

impl Want {
    fn v(version: &'static str) -> Self {
        Self {
            version,
            snapshots: Vec::new(),
            max: 2,
            restart: 0,
            rollback: 0,
            active: "",
        }
    }

    fn snap(mut self, id: &'static str, kind: proto::SnapshotType) -> Self {
        self.snapshots.push((id, kind));
        self
    }
}

fn edge_config(want: &Want) -> EdgeDevConfig {
    let guest = guest_dir();
    EdgeDevConfig {
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: want.version.into(),
            }),
            displayname: "counter".into(),
            activate: true,
            restart: Some(InstanceOpsCmd {
                counter: want.restart,
                ops_time: String::new(),
            }),
            purge: Some(InstanceOpsCmd::default()),
            volume_ref_list: vec![VolumeRef {
                uuid: VOLUME.into(),
                ..Default::default()
            }],
            snapshot: Some(SnapshotConfig {
                active_snapshot: want.active.into(),
                rollback_cmd: Some(InstanceOpsCmd {
                    counter: want.rollback,
                    ops_time: String::new(),
                }),
                max_snapshots: want.max,
                snapshots: want
                    .snapshots
                    .iter()
                    .map(|(id, kind)| SnapshotDesc {
                        id: id.to_string(),
                        r#type: *kind as i32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            cairn_domain: Some(CairnDomain {
                kind: "vm".into(),
                kernel: guest.join("vmlinuz").display().to_string(),
                initrd: guest.join("initramfs.cpio.gz").display().to_string(),
                append: "console=ttyS0 cryptomgr.notests panic=-1 cairn.workload=counter".into(),
                memory_mib: 128,
                cpus: 1,
                ..Default::default()
            }),
            ..Default::default()
        }],
        volumes: vec![Volume {
            uuid: VOLUME.into(),
            maxsizebytes: 1 << 20,
            display_name: "counter-disk".into(),
            cairn_format: "qcow2".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct Rig {
    controller: TestController,
    device: Device,
}

impl Rig {
    async fn start(first: &Want) -> Self {
        let controller = TestController::start().await.unwrap();
        let mut device = Device::new();
        let mut args = controller
            .device_args(&device.root.path().join("setup"), SERIAL)
            .unwrap();
        args.extend(["--config-interval-ms", "200", "--retry-ms", "100"].map(String::from));
        device.follow_controller(args);
        controller.set_config(SERIAL, edge_config(first));
        device.start_all();
        Self { controller, device }
    }

    fn push(&self, want: &Want) {
        self.controller.set_config(SERIAL, edge_config(want));
    }

    async fn status(
        &self,
        what: &str,
        done: impl Fn(&AppInstanceStatus) -> bool,
    ) -> AppInstanceStatus {
        self.device
            .app_status(SETTLE, done)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    async fn volume_file(&self) -> PathBuf {
        self.device.volume(SETTLE).await.file_location
    }

    async fn console_log(&self) -> PathBuf {
        self.device
            .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
                !d.log_path.as_os_str().is_empty()
            })
            .await
            .unwrap()
            .log_path
    }
}

fn ids(list: &[cairn_types::SnapshotInstanceStatus]) -> BTreeSet<String> {
    list.iter()
        .map(|s| s.snapshot.snapshot_id.to_string())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn running(s: &AppInstanceStatus) -> bool {
    s.activated && s.state == cairn_types::SwState::Running
}

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Snapshot on upgrade, rollback (the disk returns to the snapshot and the app runs the
/// snapshot's version), an immediate snapshot, then a third snapshot with `max_snapshots = 2`.
/// One device through all of it, as a technician would see it happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_snapshot_rollback_immediate_and_max_snapshots() {
    use proto::SnapshotType::{AppUpdate, Immediate};
    let v1 = Want::v("1").snap(S1, AppUpdate);
    let rig = Rig::start(&v1).await;
    let status = rig
        .status("v1 running, S1 waiting for the upgrade", |s| {
            running(s) && ids(&s.snap_status.requested_snapshots) == set(&[S1])
        })
        .await;
    assert_eq!(status.uuid_and_version.version, "1");

    // Snapshot on upgrade: taken with the config in use before it (v1), then v2 runs.
    let v2 = Want::v("2").snap(S1, AppUpdate);
    rig.push(&v2);
    let status = rig
        .status("v2 running with S1 available", |s| {
            running(s)
                && s.uuid_and_version.version == "2"
                && ids(&s.snap_status.available_snapshots) == set(&[S1])
        })
        .await;
    let s1 = &status.snap_status.available_snapshots[0];
    assert_eq!(
        s1.config_version.version, "1",
        "an upgrade snapshot keeps the old config"
    );
    assert!(s1.time_created.is_some() && s1.time_triggered.is_some());
    let file = rig.volume_file().await;
    assert_eq!(qcow2_snapshots(&file), set(&[S1]));
    let at_snapshot = sector_counter(&file, Some(S1));

    // The guest keeps counting on v2, well past the snapshot.
    until("the counter moves past the snapshot", SETTLE, || {
        sector_counter(&file, None) > at_snapshot + 4
    })
    .await;
    let before_rollback = sector_counter(&file, None);

    // Rollback to S1: v1 again, and the disk as it was.
    let rollback = Want {
        rollback: 1,
        active: S1,
        ..v2.clone()
    };
    rig.push(&rollback);
    let status = rig
        .status("rolled back to S1", |s| {
            running(s) && s.uuid_and_version.version == "1" && !s.snap_status.rollback_in_progress
        })
        .await;
    assert_eq!(ids(&status.snap_status.available_snapshots), set(&[S1]));
    let log = rig.console_log().await;
    until("the guest counts after the rollback", SETTLE, || {
        !console_counters(&log).is_empty()
    })
    .await;
    let first_after = console_counters(&log)[0];
    assert_eq!(
        first_after,
        at_snapshot + 1,
        "the guest resumed from the snapshot's sector ({at_snapshot}), not from {before_rollback}"
    );

    // Immediate snapshot: stop, take, start.
    let with_s2 = Want {
        snapshots: vec![(S1, AppUpdate), (S2, Immediate)],
        ..rollback.clone()
    };
    rig.push(&with_s2);
    rig.status("S2 available and the app running again", |s| {
        running(s) && ids(&s.snap_status.available_snapshots) == set(&[S1, S2])
    })
    .await;
    assert_eq!(qcow2_snapshots(&file), set(&[S1, S2]));

    // A third with max_snapshots = 2: the oldest available goes, the new one is taken.
    let with_s3 = Want {
        snapshots: vec![(S1, AppUpdate), (S2, Immediate), (S3, Immediate)],
        ..with_s2
    };
    rig.push(&with_s3);
    let status = rig
        .status("S2 and S3 kept, S1 deleted", |s| {
            running(s)
                && ids(&s.snap_status.available_snapshots) == set(&[S2, S3])
                && s.snap_status.snapshots_to_be_deleted.is_empty()
        })
        .await;
    assert!(status.snap_status.available_snapshots.len() <= 2);
    assert_eq!(qcow2_snapshots(&file), set(&[S2, S3]));
    let dirs: BTreeSet<String> = rig
        .device
        .snapshot_dirs()
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_eq!(dirs, set(&[S2, S3]));

    // The controller was told: its latest report lists exactly what the device keeps.
    let reported = rig
        .controller
        .wait_for(SERIAL, SETTLE, "the report of S2 and S3", |d| {
            d.apps().get(APP).is_some_and(|a| {
                a.snapshots
                    .iter()
                    .map(|s| s.id.clone())
                    .collect::<BTreeSet<_>>()
                    == set(&[S2, S3])
            })
        })
        .await
        .unwrap();
    assert!(
        reported.apps()[APP]
            .snapshots
            .iter()
            .all(|s| s.create_time.is_some())
    );
}

/// A snapshot removed from the config is deleted at the next deactivation of the app, never by
/// stopping it; meanwhile it is reported as pending deletion and is still on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_waits_for_the_next_deactivation_and_is_reported_pending() {
    use proto::SnapshotType::Immediate;
    let rig = Rig::start(&Want::v("1").snap(S1, Immediate)).await;
    let status = rig
        .status("S1 available", |s| {
            running(s) && ids(&s.snap_status.available_snapshots) == set(&[S1])
        })
        .await;
    let boot = status.boot_time;
    let file = rig.volume_file().await;

    rig.push(&Want::v("1"));
    let status = rig
        .status("S1 pending deletion", |s| {
            s.snap_status
                .snapshots_to_be_deleted
                .iter()
                .any(|d| d.snapshot_id.to_string() == S1)
        })
        .await;
    assert!(
        running(&status),
        "a deletion is never a reason to stop the app"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = rig.status("still pending", |_| true).await;
    assert!(
        running(&status) && status.boot_time == boot,
        "the app was not restarted"
    );
    assert_eq!(status.snap_status.snapshots_to_be_deleted.len(), 1);
    assert_eq!(
        qcow2_snapshots(&file),
        set(&[S1]),
        "not deleted while the app runs"
    );
    assert!(rig.device.snapshot_dirs().contains(&S1.parse().unwrap()));

    // The next deactivation (a restart) deletes it.
    rig.push(&Want {
        restart: 1,
        ..Want::v("1")
    });
    rig.status("deleted at the restart", |s| {
        running(s)
            && s.snap_status.snapshots_to_be_deleted.is_empty()
            && s.snap_status.available_snapshots.is_empty()
    })
    .await;
    assert!(qcow2_snapshots(&file).is_empty());
    assert!(rig.device.snapshot_dirs().is_empty());
}

/// `cairn up` for the device under `root`, following `controller` (the config-agent's set-up
/// flags are `cairn up`'s too).
fn cairn_up(root: &Path, controller: &TestController) -> std::process::Child {
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

/// Every agent (and `cairn up` itself) SIGKILLed in the middle of a rollback, then `cairn up`
/// again: the device finishes the rollback. Then a corrupt record planted in /persist shows in
/// `cairn snapshots` with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_killed_mid_rollback_then_cairn_up_converges() {
    use proto::SnapshotType::Immediate;
    let controller = TestController::start().await.unwrap();
    // The harness's device only lends its root and read-outs here: `cairn up` runs the agents.
    let device = Device::new();
    let root = device.root.path().to_path_buf();
    let v1 = Want::v("1").snap(S1, Immediate);
    controller.set_config(SERIAL, edge_config(&v1));
    let mut up = cairn_up(&root, &controller);
    let wait = |what: &'static str, done: fn(&AppInstanceStatus) -> bool| {
        let device = &device;
        async move {
            device
                .app_status(SETTLE, done)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        }
    };
    wait("S1 available", |s| {
        running(s) && ids(&s.snap_status.available_snapshots) == set(&[S1])
    })
    .await;
    let v2 = Want { version: "2", ..v1 };
    controller.set_config(SERIAL, edge_config(&v2));
    wait("v2 running", |s| {
        running(s) && s.uuid_and_version.version == "2"
    })
    .await;
    let file = device.volume(SETTLE).await.file_location;
    let at_snapshot = sector_counter(&file, Some(S1));

    controller.set_config(
        SERIAL,
        edge_config(&Want {
            rollback: 1,
            active: S1,
            ..v2
        }),
    );
    let mid = wait("the rollback under way", |s| {
        s.snap_status.rollback_in_progress
    })
    .await;
    let mut killed = processes_of(&root);
    killed.push(up.id() as i32);
    for pid in &killed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = up.wait();
    eprintln!(
        "killed {} processes mid-rollback (app state {:?}, activated {})",
        killed.len(),
        mid.state,
        mid.activated
    );
    assert!(killed.len() >= 5, "cairn up and four agents: {killed:?}");

    let mut up = cairn_up(&root, &controller);
    let status = wait("the rollback completed after the restart", |s| {
        running(s)
            && s.uuid_and_version.version == "1"
            && !s.snap_status.rollback_in_progress
            && s.snap_status.requested_snapshots.is_empty()
            && s.snap_status.snapshots_to_be_deleted.is_empty()
    })
    .await;
    assert_eq!(ids(&status.snap_status.available_snapshots), set(&[S1]));
    assert_eq!(
        qcow2_snapshots(&file),
        set(&[S1]),
        "no snapshot leaked or lost on disk"
    );
    let dirs: BTreeSet<String> = device.snapshot_dirs().iter().map(Uuid::to_string).collect();
    assert_eq!(dirs, set(&[S1]));
    assert!(
        sector_counter(&file, None) >= at_snapshot,
        "the disk carries on from the snapshot"
    );

    // A corrupt record: a copy of S1's with one byte changed, under a new id.
    let planted = "e2e5a17e-0000-4000-8000-0000000dead1";
    let snapshots = cairn_types::layout::snapshots_dir(&device.persist_dir());
    let record = std::fs::read(snapshots.join(S1).join("snapshotInstanceStatus.json")).unwrap();
    let mut damaged = record.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x20;
    std::fs::create_dir_all(snapshots.join(planted)).unwrap();
    std::fs::write(
        snapshots.join(planted).join("snapshotInstanceStatus.json"),
        damaged,
    )
    .unwrap();
    let out = Command::new(cairn_bin())
        .args(["snapshots", "--json", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == planted)
        .unwrap_or_else(|| panic!("the planted record is listed: {rows:#}"));
    assert_eq!(row["state"], "corrupt", "{row:#}");
    let reason = row["error"].as_str().unwrap();
    assert!(
        reason.contains("snapshotInstanceStatus.json")
            && (reason.contains("checksum") || reason.contains("JSON")),
        "the reason names the file and the fault: {reason}"
    );
    // The sound snapshot is still listed as available next to it.
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == S1 && r["state"] == "available")
    );

    // A clean stop: cairn up stops the app and the agents.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = up.wait();
}

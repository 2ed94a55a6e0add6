//! The app-manager as a process, against stand-ins for the other agents that follow their bus
//! contracts: a domain-manager that runs or halts what it is told, a volume-manager that keeps a
//! set of snapshots and answers each request with its counter.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_pubsub::{Bus, Event, PublishOptions};
use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, snapshot_dir};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, DomainConfig, DomainSpec, DomainState, DomainStatus,
    ProcessSpec, SnapshotConfig, SnapshotDesc, SnapshotInstanceStatus, SnapshotType,
    UUIDandVersion, VolumeConfig, VolumeRefConfig, VolumeState, VolumeStatus,
    VolumesSnapshotAction, VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use uuid::Uuid;

const APP: u128 = 0xa11;
const VOLUME: u128 = 0xb0b;
const SNAP: u128 = 0x5a5;

struct Roots {
    dir: tempfile::TempDir,
}

impl Roots {
    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn persist(&self) -> PathBuf {
        self.dir.path().join("persist")
    }
    fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, self.run(), self.persist())
    }
}

struct AppManagerProcess(Child);

impl AppManagerProcess {
    fn start(roots: &Roots, crash_at: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn-app-manager"));
        command
            .env("CAIRN_RUN_DIR", roots.run())
            .env("CAIRN_PERSIST_DIR", roots.persist())
            .stderr(Stdio::inherit());
        if let Some(point) = crash_at {
            command.env("CAIRN_CRASH_AT", point);
        }
        Self(command.spawn().unwrap())
    }

    /// Waits for the process to die at its crash point.
    fn wait_crash(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "died by its own SIGKILL: {status:?}"
                );
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached its crash point"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AppManagerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn app_config(snapshots: &[(u128, SnapshotType)]) -> AppInstanceConfig {
    AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: Uuid::from_u128(APP),
            version: "1".into(),
        },
        display_name: "sensor".into(),
        activate: true,
        volume_ref_config_list: vec![VolumeRefConfig {
            volume_id: Uuid::from_u128(VOLUME),
            ..Default::default()
        }],
        snapshot: SnapshotConfig {
            max_snapshots: 3,
            snapshots: snapshots
                .iter()
                .map(|(id, kind)| SnapshotDesc {
                    snapshot_id: Uuid::from_u128(*id),
                    snapshot_type: *kind,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        domain: Some(DomainSpec::Process(ProcessSpec {
            command: "/bin/sleep".into(),
            args: vec!["1000".into()],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// What the stand-in volume-manager holds, shared with the test.
#[derive(Default)]
struct Backend {
    snapshots: BTreeSet<Uuid>,
    requests: Vec<(VolumesSnapshotAction, u64)>,
}

/// The stand-in domain-manager and volume-manager, as tasks of the test.
async fn stand_ins(
    roots: &Roots,
    backend: Arc<Mutex<Backend>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let dm = roots.bus("domain-manager");
    let domains = dm
        .publish::<DomainStatus>(PublishOptions::default())
        .await
        .unwrap();
    let mut configs = dm.subscribe::<DomainConfig>("app-manager");
    let domain_task = tokio::spawn(async move {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                configs.recv().await
            {
                domains
                    .publish(DomainStatus {
                        uuid_and_version: value.uuid_and_version.clone(),
                        state: if value.activate {
                            DomainState::Running
                        } else {
                            DomainState::Halted
                        },
                        activated: value.activate,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }
    });

    let vm = roots.bus("volume-manager");
    let volumes = vm
        .publish::<VolumeStatus>(PublishOptions::default())
        .await
        .unwrap();
    volumes
        .publish(VolumeStatus {
            volume_id: Uuid::from_u128(VOLUME),
            state: VolumeState::Ready,
            file_location: roots.persist().join("volumes/v.qcow2"),
            ..Default::default()
        })
        .await
        .unwrap();
    let results = vm
        .publish::<VolumesSnapshotStatus>(PublishOptions::default())
        .await
        .unwrap();
    let mut requests = vm.subscribe::<VolumesSnapshotConfig>("app-manager");
    let volume_task = tokio::spawn(async move {
        let _volumes = volumes;
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                requests.recv().await
            {
                {
                    let mut b = backend.lock().unwrap();
                    b.requests.push((value.action, value.request_counter));
                    match value.action {
                        VolumesSnapshotAction::Create => {
                            b.snapshots.insert(value.snapshot_id);
                        }
                        VolumesSnapshotAction::Delete => {
                            b.snapshots.remove(&value.snapshot_id);
                        }
                        _ => {}
                    }
                }
                results
                    .publish(VolumesSnapshotStatus {
                        snapshot_id: value.snapshot_id,
                        app_uuid: value.app_uuid,
                        request_counter: value.request_counter,
                        result_of_action: value.action,
                        time_created: Some(chrono::Utc::now()),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }
    });
    vec![domain_task, volume_task]
}

/// Waits for an AppInstanceStatus that satisfies `done`.
async fn until_status(
    roots: &Roots,
    done: impl Fn(&AppInstanceStatus) -> bool,
) -> AppInstanceStatus {
    let mut sub = roots
        .bus("cli")
        .subscribe::<AppInstanceStatus>("app-manager");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } = sub.recv().await
                && done(&value)
            {
                return value;
            }
        }
    })
    .await
    .expect("the app status within 20 s")
}

fn snapshot_files(persist: &Path, id: u128) -> (AppInstanceConfig, SnapshotInstanceStatus) {
    let dir = snapshot_dir(persist, Uuid::from_u128(id));
    (
        cairn_persist::load(&dir.join(APP_INSTANCE_CONFIG_FILE))
            .unwrap()
            .record,
        cairn_persist::load(&dir.join(SNAPSHOT_INSTANCE_STATUS_FILE))
            .unwrap()
            .record,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_snapshot_goes_through_the_other_agents_and_lands_on_disk() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend.clone()).await;
    let config_agent = roots.bus("config-agent");
    let configs = config_agent
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    let _volumes = config_agent
        .publish::<VolumeConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs.publish(app_config(&[])).await.unwrap();
    let _manager = AppManagerProcess::start(&roots, None);

    until_status(&roots, |s| s.activated).await;
    configs
        .publish(app_config(&[(SNAP, SnapshotType::Immediate)]))
        .await
        .unwrap();
    let status = until_status(&roots, |s| {
        s.activated && !s.snap_status.available_snapshots.is_empty()
    })
    .await;
    let snapshot = &status.snap_status.available_snapshots[0];
    assert_eq!(snapshot.snapshot.snapshot_id, Uuid::from_u128(SNAP));
    assert!(snapshot.time_triggered.is_some() && snapshot.time_created.is_some());
    let (config, record) = snapshot_files(&roots.persist(), SNAP);
    assert_eq!(config.uuid_and_version.version, "1");
    assert_eq!(record.snapshot.snapshot_id, Uuid::from_u128(SNAP));
    assert!(
        backend
            .lock()
            .unwrap()
            .snapshots
            .contains(&Uuid::from_u128(SNAP))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_right_after_asking_for_the_snapshot_it_asks_again_and_converges() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend.clone()).await;
    let config_agent = roots.bus("config-agent");
    let configs = config_agent
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs
        .publish(app_config(&[(SNAP, SnapshotType::Immediate)]))
        .await
        .unwrap();

    let mut first = AppManagerProcess::start(&roots, Some("app-manager:after-volumes-request"));
    first.wait_crash();
    let _second = AppManagerProcess::start(&roots, None);
    let status = until_status(&roots, |s| {
        s.activated && !s.snap_status.available_snapshots.is_empty()
    })
    .await;
    assert_eq!(status.snap_status.available_snapshots.len(), 1);
    let b = backend.lock().unwrap();
    assert_eq!(b.snapshots, BTreeSet::from([Uuid::from_u128(SNAP)]));
    // The restarted agent repeats the request it had persisted (same counter): the volume
    // operation is asked for again, never a second, different one.
    let creates: Vec<u64> = b
        .requests
        .iter()
        .filter(|(a, _)| *a == VolumesSnapshotAction::Create)
        .map(|(_, c)| *c)
        .collect();
    assert!(!creates.is_empty());
    assert!(creates.iter().all(|c| *c == creates[0]), "{creates:?}");
    drop(b);
    snapshot_files(&roots.persist(), SNAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_found_damaged_or_untracked_at_startup_are_reported_in_the_app_status() {
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let persist = roots.persist();
    let app = Uuid::from_u128(APP);
    // A damaged record whose config file still names the app.
    let damaged = snapshot_dir(&persist, Uuid::from_u128(0xdead));
    std::fs::create_dir_all(&damaged).unwrap();
    cairn_persist::store(&damaged.join(APP_INSTANCE_CONFIG_FILE), &app_config(&[])).unwrap();
    std::fs::write(
        damaged.join(SNAPSHOT_INSTANCE_STATUS_FILE),
        format!(r#"{{"Snapshot": {{}}, "AppInstanceID": "{app}", "ConfigVersion": {{"UUID": "{app}"}}}}"#),
    )
    .unwrap();
    // A sound record (as EVE writes it) that this app-manager never made.
    let foreign = snapshot_dir(&persist, Uuid::from_u128(0xf0e));
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(
        foreign.join(SNAPSHOT_INSTANCE_STATUS_FILE),
        format!(
            r#"{{"Snapshot": {{"SnapshotID": "{}"}}, "AppInstanceID": "{app}", "ConfigVersion": {{"UUID": "{app}", "Version": "1"}}}}"#,
            Uuid::from_u128(0xf0e)
        ),
    )
    .unwrap();
    // A directory with nothing in it: logged, and it must not disturb anything.
    std::fs::create_dir_all(snapshot_dir(&persist, Uuid::from_u128(0xe11))).unwrap();

    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend).await;
    let configs = roots
        .bus("config-agent")
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs.publish(app_config(&[])).await.unwrap();
    let _manager = AppManagerProcess::start(&roots, None);
    let status = until_status(&roots, |s| s.activated && s.warnings.len() >= 2).await;
    let warnings = status.warnings.join("\n");
    assert!(
        warnings.contains("corrupt snapshot record") && warnings.contains("Snapshot.SnapshotID"),
        "{warnings}"
    );
    assert!(
        warnings.contains(&damaged.display().to_string()),
        "{warnings}"
    );
    assert!(
        warnings.contains("not tracked") && warnings.contains(&foreign.display().to_string()),
        "{warnings}"
    );
    // Reported, never removed.
    assert!(damaged.join(SNAPSHOT_INSTANCE_STATUS_FILE).exists());
    assert!(foreign.join(SNAPSHOT_INSTANCE_STATUS_FILE).exists());
}

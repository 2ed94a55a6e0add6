//! The app-manager as a process, against stand-ins for the other agents that follow their bus
//! contracts: a domain-manager that runs or halts what it is told, a volume-manager that keeps a
//! set of snapshots and answers each request with its counter. Shared by the process tests.
#![allow(dead_code)] // each test file uses its part
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_pubsub::{Bus, Event, PublishOptions};
use cairn_types::layout::{APP_INSTANCE_CONFIG_FILE, SNAPSHOT_INSTANCE_STATUS_FILE, snapshot_dir};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, DomainConfig, DomainSpec, DomainState, DomainStatus,
    ProcessSpec, SnapshotConfig, SnapshotDesc, SnapshotInstanceStatus, SnapshotType,
    UUIDandVersion, VolumeRefConfig, VolumeState, VolumeStatus, VolumesSnapshotAction,
    VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use uuid::Uuid;

pub const APP: u128 = 0xa11;
pub const VOLUME: u128 = 0xb0b;
pub const SNAP: u128 = 0x5a5;

pub struct Roots {
    pub dir: tempfile::TempDir,
}

impl Roots {
    pub fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn persist(&self) -> PathBuf {
        self.dir.path().join("persist")
    }
    pub fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, self.run(), self.persist())
    }
}

pub struct AppManagerProcess(pub Child);

impl AppManagerProcess {
    pub fn start(roots: &Roots, crash_at: Option<&str>) -> Self {
        Self::start_via(&[], roots, crash_at)
    }

    /// Started through `launcher` (`fiu-run -x …`), which runs the binary given after it.
    pub fn start_via(launcher: &[&str], roots: &Roots, crash_at: Option<&str>) -> Self {
        let mut command = cairn_fiu::command_via(launcher, env!("CARGO_BIN_EXE_cairn-app-manager"));
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
    pub fn wait_crash(&mut self) {
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

pub fn app_config(snapshots: &[(u128, SnapshotType)]) -> AppInstanceConfig {
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
pub struct Backend {
    pub snapshots: BTreeSet<Uuid>,
    pub requests: Vec<(VolumesSnapshotAction, u64)>,
}

/// The stand-in domain-manager and volume-manager, as tasks of the test.
pub async fn stand_ins(
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
pub async fn until_status(
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

pub fn snapshot_files(persist: &Path, id: u128) -> (AppInstanceConfig, SnapshotInstanceStatus) {
    try_snapshot_files(persist, id)
        .unwrap_or_else(|e| panic!("the records of snapshot {id:x}: {e}"))
}

/// Both records of snapshot `id`, loaded and checked, or why not.
pub fn try_snapshot_files(
    persist: &Path,
    id: u128,
) -> Result<(AppInstanceConfig, SnapshotInstanceStatus), cairn_persist::PersistError> {
    let dir = snapshot_dir(persist, Uuid::from_u128(id));
    Ok((
        cairn_persist::load(&dir.join(APP_INSTANCE_CONFIG_FILE))?.record,
        cairn_persist::load(&dir.join(SNAPSHOT_INSTANCE_STATUS_FILE))?.record,
    ))
}

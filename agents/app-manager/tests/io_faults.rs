//! The app-manager's own file calls failing: the real agent runs under libfiu's POSIX preload
//! (`fiu-run -x`, Debian `fiu-utils`), and `fiu-ctrl` makes its next call of one kind (open,
//! fsync, rename) fail once with EIO or ENOSPC, just before an immediate snapshot is
//! asked for: the first such call is the recording of the app's new state. The agent stays up, the app's status names the fault while it lasts, and the snapshot ends
//! available with both its records written and loadable, its volume snapshot taken exactly
//! once. Prints one line per fault for the README's figures.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
use cairn_pubsub::{Event, PublishOptions};
use cairn_types::{AppInstanceConfig, AppInstanceStatus, SnapshotType, VolumesSnapshotAction};
use common::*;
use uuid::Uuid;

/// The app-manager under libfiu.
struct FiuAppManager {
    process: AppManagerProcess,
    fiu: Fiu,
}

impl FiuAppManager {
    fn start(roots: &Roots) -> Self {
        let fiu = Fiu::new(roots.dir.path());
        let launcher = fiu.launcher();
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        let process = AppManagerProcess::start_via(&launcher, roots, None);
        Self { process, fiu }
    }

    fn alive(&mut self) -> bool {
        self.process.0.try_wait().unwrap().is_none()
    }
}

/// Every error and warning text the app's status carried, as they come.
fn collect_texts(roots: &Roots) -> Arc<Mutex<Vec<String>>> {
    let texts = Arc::new(Mutex::new(Vec::new()));
    let mut sub = roots
        .bus("test-observer")
        .subscribe::<AppInstanceStatus>("app-manager");
    let kept = texts.clone();
    tokio::spawn(async move {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } = sub.recv().await
            {
                let mut texts = kept.lock().unwrap();
                if value.error.is_error() {
                    texts.push(value.error.error.clone());
                }
                texts.extend(value.warnings.iter().cloned());
            }
        }
    });
    texts
}

/// One fault on one call as one snapshot is asked for, checked; returns the figure line.
async fn fault_case(point: &str, errno: i32) -> String {
    let case = format!("{point} errno={errno}");
    let roots = Roots {
        dir: tempfile::tempdir().unwrap(),
    };
    let backend = Arc::new(Mutex::new(Backend::default()));
    let _tasks = stand_ins(&roots, backend.clone()).await;
    let configs = roots
        .bus("config-agent")
        .publish::<AppInstanceConfig>(PublishOptions::default())
        .await
        .unwrap();
    configs.publish(app_config(&[])).await.unwrap();
    let mut manager = FiuAppManager::start(&roots);
    until_status(&roots, |s| s.activated).await;
    let texts = collect_texts(&roots);
    // Idle: the status key files written behind (20 ms) are written, so the fault lands in the
    // work the snapshot request starts (the app's state first).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Once: the agent's next such call fails, wherever it is (the agent is idle now).
    manager.fiu.fail_once(manager.process.0.id(), point, errno);
    configs
        .publish(app_config(&[(SNAP, SnapshotType::Immediate)]))
        .await
        .unwrap();

    let snap = Uuid::from_u128(SNAP);
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        assert!(manager.alive(), "{case}: the agent died");
        if let Ok(records) = try_snapshot_files(&roots.persist(), SNAP) {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the snapshot's records were never written; status texts: {:?}",
            texts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = until_status(&roots, |s| {
        s.activated
            && s.snap_status
                .available_snapshots
                .iter()
                .any(|a| a.snapshot.snapshot_id == snap)
            && !s.error.is_error()
    })
    .await;
    assert!(manager.alive(), "{case}: the agent died");
    assert_eq!(records.0.uuid_and_version.version, "1", "{case}");
    assert_eq!(records.1.snapshot.snapshot_id, snap, "{case}");
    let b = backend.lock().unwrap();
    assert_eq!(b.snapshots, BTreeSet::from([snap]), "{case}");
    let creates: BTreeSet<u64> = b
        .requests
        .iter()
        .filter(|(a, _)| *a == VolumesSnapshotAction::Create)
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(
        creates.len(),
        1,
        "{case}: one volume snapshot asked for: {creates:?}"
    );
    drop(b);

    let texts = texts.lock().unwrap();
    let said = texts
        .iter()
        .find(|t| t.to_lowercase().contains(fault_words(errno)))
        .cloned();
    let said = said.unwrap_or_else(|| {
        panic!("{case}: the fault was never named in the app's status: {texts:?}")
    });
    assert!(
        said.contains(&Uuid::from_u128(APP).to_string()) || said.contains(&snap.to_string()),
        "{case}: neither the app nor the snapshot is named: {said}"
    );
    assert_eq!(status.snap_status.available_snapshots.len(), 1, "{case}");
    format!("{case}: {}", said.chars().take(160).collect::<String>())
}

async fn run(cases: &[(&str, i32)]) {
    for (point, errno) in cases {
        println!("fiu app-manager {}", fault_case(point, *errno).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fsync_or_rename_as_a_snapshot_is_recorded_is_reported_and_retried() {
    run(&[
        ("posix/io/sync/fsync", EIO),
        ("posix/io/dir/rename", ENOSPC),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_open_or_fsync_as_a_snapshot_is_recorded_is_reported_and_retried() {
    // Not `write`: the agent's next write(2) is a log line on stderr, whose failure loses
    // nothing.
    run(&[
        ("posix/io/oc/open", ENOSPC),
        ("posix/io/sync/fsync", ENOSPC),
    ])
    .await;
}

//! The agent's own file calls failing: the real volume-manager runs under libfiu's POSIX
//! preload (`fiu-run -x`, Debian `fiu-utils`), and `fiu-ctrl` makes the agent's next call of
//! one kind (open, fsync, rename, unlink) fail once with EIO or ENOSPC as one snapshot request
//! runs, on a directory volume (the copy backend: every byte goes through the agent's own
//! calls). After each fault the agent still runs, the status names the snapshot or its volume
//! and the fault, and the snapshot's record and its copy on the volume agree; asked again, the
//! request succeeds. Prints one line per fault for the README's figures. Also: an answer whose
//! key file cannot be written (a real read-only mount) is published once it can.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
use cairn_types::snapshot::VolumesSnapshotAction::{self, Create, Delete, Rollback};
use cairn_types::snapshot::VolumesSnapshotStatus;
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use common::*;
use uuid::Uuid;

/// The agent under libfiu.
struct FiuAgent {
    agent: Agent,
    fiu: Fiu,
}

impl FiuAgent {
    fn start(h: &Harness) -> Self {
        let fiu = Fiu::new(h.root.path());
        let launcher = fiu.launcher();
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        let agent = Agent::start_via(&launcher, &h.persist, &h.run);
        Self { agent, fiu }
    }

    fn alive(&mut self) -> bool {
        self.agent.child.try_wait().unwrap().is_none()
    }
}

/// The snapshots on the copy backend's side of volume `a`.
fn on_volume(h: &Harness, a: &VolumeConfig) -> Vec<String> {
    let dir = cairn_types::layout::volumes_dir(&h.persist)
        .join(".snapshots")
        .join(a.key());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Whether the record and the volume agree on snapshot `id` of `a`: both there, or neither.
fn agree(h: &Harness, a: &VolumeConfig, id: Uuid) -> Result<bool, String> {
    let recorded = h
        .record(id)
        .filter(|r: &VolumesSnapshotStatus| !r.is_in_progress())
        .is_some_and(|r| r.volume_snapshot_meta.contains_key(&a.volume_id));
    let there = on_volume(h, a).contains(&id.to_string());
    if recorded == there {
        Ok(there)
    } else {
        Err(format!(
            "record says {recorded}, volume has {:?} (record {:?})",
            on_volume(h, a),
            h.record(id)
        ))
    }
}

async fn ask(
    h: &mut Harness,
    id: Uuid,
    action: VolumesSnapshotAction,
    a: &VolumeConfig,
    counter: u64,
) -> VolumesSnapshotStatus {
    h.snapshot_configs
        .publish(request(id, action, &[a], counter))
        .await
        .unwrap();
    h.answer(id, action, counter).await
}

/// One fault on one call during one operation, checked; returns the figure line.
async fn fault_case(action: VolumesSnapshotAction, point: &str, errno: i32) -> String {
    let mut h = Harness::new().await;
    let mut agent = FiuAgent::start(&h);
    let a = volume(VolumeFormat::Dir, MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let dir = h.ready(&a).await.file_location;
    std::fs::write(dir.join("file"), b"before").unwrap();
    let kept = Uuid::new_v4();
    let s = ask(&mut h, kept, Create, &a, 1).await;
    assert!(!s.error.is_error(), "{s:?}");
    std::fs::write(dir.join("file"), b"after").unwrap();
    let id = if action == Create {
        Uuid::new_v4()
    } else {
        kept
    };
    let case = format!("{action:?} {point} errno={errno}");

    // Once: the agent's next such call fails, wherever it is (the agent is idle now).
    agent.fiu.fail_once(agent.agent.child.id(), point, errno);
    let s = ask(&mut h, id, action, &a, 2).await;
    assert!(agent.alive(), "{case}: the agent died");
    let text = format!("{} {:?}", s.error.error, s.volume_errors);
    assert!(
        s.error.is_error(),
        "{case}: the fault failed nothing: {s:?}"
    );
    assert!(
        text.to_lowercase().contains(fault_words(errno)),
        "{case}: the fault is not named: {text}"
    );
    assert!(
        text.contains(&id.to_string()) || text.contains(&a.volume_id.to_string()),
        "{case}: neither the snapshot nor the volume is named: {text}"
    );
    agree(&h, &a, id).unwrap_or_else(|e| panic!("{case}: {e}"));

    let again = ask(&mut h, id, action, &a, 3).await;
    assert!(!again.error.is_error(), "{case}: asked again: {again:?}");
    let there = agree(&h, &a, id).unwrap_or_else(|e| panic!("{case}: after the retry: {e}"));
    assert_eq!(there, action != Delete, "{case}: after the retry");
    if action == Rollback {
        let content = std::fs::read(h.volume_file(&a).join("file")).unwrap();
        assert_eq!(content, b"before", "{case}: rolled back");
    }
    let first = s
        .error
        .error
        .split(": ")
        .take(3)
        .collect::<Vec<_>>()
        .join(": ");
    format!("{case}: {first}")
}

async fn run(action: VolumesSnapshotAction, cases: &[(&str, i32)]) {
    for (point, errno) in cases {
        println!("fiu {}", fault_case(action, point, *errno).await);
    }
}

#[tokio::test]
async fn a_failing_open_fsync_or_rename_during_create_is_reported_and_leaves_no_half_snapshot() {
    run(
        Create,
        &[
            ("posix/io/sync/fsync", EIO),
            ("posix/io/dir/rename", ENOSPC),
            ("posix/io/oc/open", ENOSPC),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failing_fsync_or_rename_during_rollback_is_reported_and_the_snapshot_stays() {
    run(
        Rollback,
        &[
            ("posix/io/sync/fsync", EIO),
            ("posix/io/dir/rename", ENOSPC),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failing_fsync_or_unlink_during_delete_keeps_the_record_and_the_snapshot_agreeing() {
    run(
        Delete,
        &[("posix/io/sync/fsync", EIO), ("posix/io/dir/unlink", EIO)],
    )
    .await;
}

/// A real read-only mount over the snapshot answers' key files (`<run>/volume-manager/
/// VolumesSnapshotStatus/`): the request is carried out and recorded, its answer cannot be
/// published; made writable again, the answer arrives. Before, it was logged and lost, and
/// the app-manager waited for it until a restart.
#[tokio::test]
async fn an_answer_that_could_not_be_published_is_published_once_it_can() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let a = volume(VolumeFormat::Dir, MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    h.ready(&a).await;
    let answers = h.run.join("volume-manager").join("VolumesSnapshotStatus");
    let path = answers.to_str().unwrap();
    std::fs::create_dir_all(&answers).unwrap();
    sh("mount", &["--bind", path, path]);
    let _mounted = Unmount(answers.clone());
    sh("mount", &["-o", "remount,bind,ro", path]);

    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(id, Create, &[&a], 1))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while h.record(id).is_none_or(|r| r.is_in_progress()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot was not recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sh("mount", &["-o", "remount,bind,rw", path]);
    let s = h.answer(id, Create, 1).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(agree(&h, &a, id), Ok(true));
}

/// Lazily unmounts on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

//! Live creates (issue 11): a VM's qcow2 snapshot taken by the domain-manager is recorded
//! without writing the image; a directory on btrfs is snapshotted while a process writes to
//! it; a directory on the plain copy backend is refused, naming the volume and the backend.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "common/mod.rs"]
mod common;

use std::path::Path;

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete};
use cairn_types::snapshot::{VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeStatus};
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use common::*;
use uuid::Uuid;

async fn manager(persist: &Path) -> VolumeManager {
    let mut m = VolumeManager::open(persist, Tools::detect().await, Vec::new()).await;
    immediate_deletion(&mut m).await;
    m.handle_app_volume_refs_complete().await;
    m
}

async fn add(m: &mut VolumeManager, config: &VolumeConfig) -> VolumeStatus {
    m.handle_volume_config(config.clone())
        .await
        .into_iter()
        .find_map(|p| match p {
            Publish::Volume(s) => Some(s),
            _ => None,
        })
        .unwrap()
}

async fn ask(m: &mut VolumeManager, request: VolumesSnapshotConfig) -> VolumesSnapshotStatus {
    m.handle_snapshot_config(request)
        .await
        .into_iter()
        .find_map(|p| match p {
            Publish::Snapshot(s) => Some(s),
            _ => None,
        })
        .unwrap()
}

fn live(mut request: VolumesSnapshotConfig) -> VolumesSnapshotConfig {
    request.live = true;
    request
}

#[tokio::test]
async fn a_live_qcow2_snapshot_is_recorded_not_made() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 1 << 20);
    let file = add(&mut m, &a).await.file_location;
    let id = Uuid::new_v4();

    // Not taken by the domain-manager: nothing to record, and nothing is made instead.
    let refused = ask(&mut m, live(request(id, Create, &[&a], 1))).await;
    assert!(refused.error.is_error());
    let text = format!("{} {:?}", refused.error.error, refused.volume_errors);
    assert!(text.contains(&a.key()) && text.contains("live"), "{text}");
    assert!(
        qcow2_tags(&file).is_empty(),
        "no snapshot made in its place"
    );

    // As the domain-manager leaves it: the tag of the snapshot id in the image.
    sh(
        "qemu-img",
        &["snapshot", "-c", &id.to_string(), file.to_str().unwrap()],
    );
    let recorded = ask(&mut m, live(request(id, Create, &[&a], 2))).await;
    assert!(!recorded.error.is_error(), "{recorded:?}");
    let meta = recorded.meta_of(a.volume_id).unwrap();
    assert_eq!(meta.backend, SnapshotBackendKind::Qcow2);
    assert_eq!(meta.name, id.to_string());
    assert_eq!(qcow2_tags(&file), vec![id.to_string()], "one tag, adopted");

    // Deleted like any other once the VM is down.
    let deleted = ask(&mut m, request(id, Delete, &[&a], 3)).await;
    assert!(!deleted.error.is_error(), "{deleted:?}");
    assert!(qcow2_tags(&file).is_empty());
}

#[tokio::test]
async fn a_live_snapshot_of_a_copy_backend_directory_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Copy);
    let id = Uuid::new_v4();
    let s = ask(&mut m, live(request(id, Create, &[&a], 1))).await;
    assert!(s.error.is_error());
    let text = format!("{} {:?}", s.error.error, s.volume_errors);
    assert!(text.contains(&a.key()), "names the volume: {text}");
    assert!(
        text.contains("backend is copy"),
        "names the backend: {text}"
    );
    assert!(s.volume_snapshot_meta.is_empty(), "nothing copied: {s:?}");
}

#[tokio::test]
async fn a_btrfs_directory_is_snapshotted_live_while_a_process_writes() {
    if Tools::detect()
        .await
        .usable(SnapshotBackendKind::Btrfs)
        .is_err()
    {
        panic!("btrfs is required (Debian btrfs-progs)");
    }
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("btrfs", &volumes, 300);
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Btrfs, "{status:?}");
    let path = status.file_location;
    // A writer that keeps appending while the snapshot is taken.
    let mut writer = std::process::Command::new("/bin/sh")
        .args(["-c", "while :; do echo line >> log; done"])
        .current_dir(&path)
        .spawn()
        .unwrap();
    while !path.join("log").exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let id = Uuid::new_v4();
    let s = ask(&mut m, live(request(id, Create, &[&a], 1))).await;
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(!s.error.is_error(), "{s:?}");
    let meta = s.meta_of(a.volume_id).unwrap();
    let frozen = std::fs::read(meta.snapshot_location.join("log")).unwrap();
    assert!(!frozen.is_empty());
    assert!(
        frozen.len() <= std::fs::read(path.join("log")).unwrap().len(),
        "the snapshot holds the tree as of its instant"
    );
}

/// Issue 21: a container's live create names its cgroup. Two btrfs volumes are taken with the
/// cgroup frozen (a writer in it stops; the pause is reported) and thawed after (the writer
/// goes on); a cgroup that cannot be frozen fails the snapshot naming it, nothing made.
#[tokio::test]
async fn a_live_create_freezes_the_named_cgroup_around_its_volumes_and_refuses_one_it_cannot_freeze()
 {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("btrfs", &volumes, 300);
    let mut m = manager(&persist).await;
    let (a, b) = (volume(VolumeFormat::Dir, 0), volume(VolumeFormat::Dir, 0));
    let path = add(&mut m, &a).await.file_location;
    add(&mut m, &b).await;
    // A writer in a cgroup of its own.
    let cgroup = FreezerCgroup::with_writer(&path);
    let mut frozen = live(request(Uuid::new_v4(), Create, &[&a, &b], 1));
    frozen.freeze_cgroup = cgroup.name.clone();
    let s = ask(&mut m, frozen).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(s.pause_ms > 0, "the pause is reported: {s:?}");
    assert_eq!(cgroup.state(), "THAWED");
    let len = || std::fs::metadata(path.join("log")).unwrap().len();
    let at = len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while len() == at {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer runs again"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let id = Uuid::new_v4();
    let mut unfreezable = live(request(id, Create, &[&a, &b], 1));
    unfreezable.freeze_cgroup = "/cairn-test-no-such-cgroup".into();
    let refused = ask(&mut m, unfreezable).await;
    assert!(refused.error.is_error());
    assert!(
        refused.error.error.contains("/cairn-test-no-such-cgroup"),
        "{}",
        refused.error.error
    );
    assert!(refused.volume_snapshot_meta.is_empty(), "{refused:?}");
    for v in [&a, &b] {
        let snapshot = volumes
            .join(".snapshots")
            .join(v.key())
            .join(id.to_string());
        assert!(!snapshot.exists(), "nothing made: {}", snapshot.display());
    }
}

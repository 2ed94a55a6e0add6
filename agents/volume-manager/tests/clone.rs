//! Clones (issue 10 item 5): a volume whose origin is another volume's state in a snapshot,
//! against real qemu-img, a real btrfs on a loop device, the copy and the purgeable backends.
//! The clone holds the snapshot-time content, is independent of its source (deleting or rolling
//! back the source afterwards leaves it alone), and a clone of a snapshot that is not available
//! fails with the reason and is made once the snapshot is taken.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::snapshot::VolumesSnapshotStatus;
use cairn_types::volume::{
    SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeState, VolumeStatus,
};
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use common::*;
use uuid::Uuid;

async fn manager(persist: &Path) -> VolumeManager {
    let tools = Tools::detect().await;
    assert!(
        tools.usable(SnapshotBackendKind::Qcow2).is_ok(),
        "qemu-img is required (Debian qemu-utils)"
    );
    let mut m = VolumeManager::open(persist, tools, Vec::new()).await;
    immediate_deletion(&mut m).await;
    m.handle_app_volume_refs_complete().await;
    m
}

fn volume_of(out: &[Publish], key: &str) -> VolumeStatus {
    out.iter()
        .rev()
        .find_map(|p| match p {
            Publish::Volume(s) if s.key() == key => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no status of {key} in {out:?}"))
}

fn snapshot_of(out: &[Publish]) -> VolumesSnapshotStatus {
    out.iter()
        .find_map(|p| match p {
            Publish::Snapshot(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap()
}

async fn add(m: &mut VolumeManager, config: &VolumeConfig) -> VolumeStatus {
    volume_of(&m.handle_volume_config(config.clone()).await, &config.key())
}

async fn snapshot(m: &mut VolumeManager, id: Uuid, v: &VolumeConfig, counter: u64) {
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[v], counter))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
}

async fn act(
    m: &mut VolumeManager,
    id: Uuid,
    action: cairn_types::snapshot::VolumesSnapshotAction,
    v: &VolumeConfig,
    counter: u64,
) {
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, action, &[v], counter))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
}

/// A volume like `source` made from `source`'s state in `snapshot`.
fn clone_of(source: &VolumeConfig, snapshot: Uuid) -> VolumeConfig {
    VolumeConfig {
        volume_id: Uuid::new_v4(),
        display_name: "clone".into(),
        origin: VolumeOrigin::Snapshot {
            snapshot,
            volume: source.volume_id,
        },
        ..source.clone()
    }
}

#[tokio::test]
async fn a_qcow2_clone_has_the_snapshot_content_and_outlives_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let src = add(&mut m, &a).await;
    qcow2_write(&src.file_location, 0xaa, MIB);
    let s = Uuid::new_v4();
    snapshot(&mut m, s, &a, 1).await;
    qcow2_write(&src.file_location, 0xbb, MIB);

    let c = clone_of(&a, s);
    let clone = add(&mut m, &c).await;
    assert_eq!(clone.state, VolumeState::Ready, "{clone:?}");
    assert_eq!(clone.backend, SnapshotBackendKind::Qcow2);
    assert_ne!(clone.file_location, src.file_location);
    assert!(
        qcow2_reads(&clone.file_location, 0xaa, MIB),
        "the clone holds the snapshot-time data"
    );
    assert!(
        qcow2_reads(&src.file_location, 0xbb, MIB),
        "source as it was"
    );
    assert!(
        qcow2_tags(&clone.file_location).is_empty(),
        "the clone has none of the source's snapshots"
    );
    // The same content as qemu-img's own export of the snapshot.
    let export = dir.path().join("export.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "qcow2",
            "-l",
            &format!("snapshot.name={s}"),
            src.file_location.to_str().unwrap(),
            export.to_str().unwrap(),
        ],
    );
    sh(
        "qemu-img",
        &[
            "compare",
            "-U",
            export.to_str().unwrap(),
            clone.file_location.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_dir(m.volumes_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".creating"))
            .count(),
        0,
        "no temporary left"
    );

    // The clone diverges; the source's rollback, snapshot delete and removal leave it alone.
    qcow2_write(&clone.file_location, 0xcc, MIB);
    act(&mut m, s, Rollback, &a, 2).await;
    assert!(qcow2_reads(&src.file_location, 0xaa, MIB));
    assert!(qcow2_reads(&clone.file_location, 0xcc, MIB));
    act(&mut m, s, Delete, &a, 3).await;
    let out = m.handle_volume_config_delete(&a.key()).await;
    assert!(out.contains(&Publish::UnpublishVolume(a.key())), "{out:?}");
    assert!(!src.file_location.exists());
    assert!(qcow2_reads(&clone.file_location, 0xcc, MIB));
    assert_eq!(m.volume_status(&c.key()).unwrap().state, VolumeState::Ready);
    // Its config coming again (e.g. the clone spec dropped from the config) keeps it.
    let mut again = c.clone();
    again.origin = VolumeOrigin::Blank;
    let kept = add(&mut m, &again).await;
    assert_eq!(kept.state, VolumeState::Ready);
    assert!(qcow2_reads(&clone.file_location, 0xcc, MIB));
}

async fn dir_clone_cycle(m: &mut VolumeManager, backend: SnapshotBackendKind) {
    let a = volume(VolumeFormat::Dir, 0);
    let src = add(m, &a).await;
    assert_eq!(src.backend, backend, "{src:?}");
    std::fs::create_dir(src.file_location.join("sub")).unwrap();
    std::fs::write(src.file_location.join("sub/data"), b"snapshot time").unwrap();
    let s = Uuid::new_v4();
    snapshot(m, s, &a, 1).await;
    std::fs::write(src.file_location.join("sub/data"), b"later").unwrap();
    std::fs::write(src.file_location.join("new"), b"later").unwrap();

    let c = clone_of(&a, s);
    let clone = add(m, &c).await;
    assert_eq!(clone.state, VolumeState::Ready, "{clone:?}");
    assert_eq!(clone.backend, backend);
    let data = clone.file_location.join("sub/data");
    assert_eq!(std::fs::read(&data).unwrap(), b"snapshot time");
    assert!(!clone.file_location.join("new").exists());
    // The clone is a volume that snapshots like any other.
    let cs = Uuid::new_v4();
    snapshot(m, cs, &c, 1).await;
    std::fs::write(&data, b"clone's own").unwrap();
    if backend == SnapshotBackendKind::Btrfs {
        assert_eq!(
            std::fs::metadata(&clone.file_location).unwrap().ino(),
            256,
            "a subvolume of its own"
        );
    }

    act(m, s, Rollback, &a, 2).await;
    assert_eq!(
        std::fs::read(src.file_location.join("sub/data")).unwrap(),
        b"snapshot time"
    );
    act(m, s, Delete, &a, 3).await;
    let out = m.handle_volume_config_delete(&a.key()).await;
    assert!(out.contains(&Publish::UnpublishVolume(a.key())), "{out:?}");
    assert!(!src.file_location.exists());
    assert_eq!(std::fs::read(&data).unwrap(), b"clone's own");
    act(m, cs, Rollback, &c, 2).await;
    assert_eq!(std::fs::read(&data).unwrap(), b"snapshot time");
}

#[tokio::test]
async fn a_btrfs_clone_is_a_writable_snapshot_that_outlives_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("btrfs", &volumes, 300);
    let mut m = manager(&persist).await;
    dir_clone_cycle(&mut m, SnapshotBackendKind::Btrfs).await;
}

#[tokio::test]
async fn a_copy_backend_clone_is_a_copy_that_outlives_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    dir_clone_cycle(&mut m, SnapshotBackendKind::Copy).await;
}

#[tokio::test]
async fn a_purgeable_clone_is_a_copy_of_the_kept_volume() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let mut a = volume(VolumeFormat::Qcow2, 16 * MIB);
    a.purgeable = true;
    let src = add(&mut m, &a).await;
    assert_eq!(src.backend, SnapshotBackendKind::Purgeable);
    qcow2_write(&src.file_location, 0x21, MIB);
    let s = Uuid::new_v4();
    snapshot(&mut m, s, &a, 1).await;
    let c = clone_of(&a, s);
    let clone = add(&mut m, &c).await;
    assert_eq!(clone.state, VolumeState::Ready, "{clone:?}");
    assert!(qcow2_reads(&clone.file_location, 0x21, MIB));
    qcow2_write(&clone.file_location, 0x22, MIB);
    assert!(
        qcow2_reads(&src.file_location, 0x21, MIB),
        "a copy, not the same file"
    );
}

#[tokio::test]
async fn a_clone_of_an_unavailable_snapshot_fails_with_the_reason_and_is_made_once_it_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let src = add(&mut m, &a).await;
    qcow2_write(&src.file_location, 0x31, MIB);
    let s = Uuid::new_v4();

    // Not taken yet.
    let c = clone_of(&a, s);
    let waiting = add(&mut m, &c).await;
    assert_eq!(waiting.state, VolumeState::Failed, "{waiting:?}");
    let text = &waiting.error.error;
    assert!(
        text.contains(&s.to_string())
            && text.contains("not on this device")
            && text.contains("made when that snapshot is available"),
        "{text}"
    );
    assert!(!m.volumes_dir().join(format!("{}.qcow2", c.key())).exists());
    // Its config coming again tries again, and still says why.
    let again = add(&mut m, &c).await;
    assert_eq!(again.state, VolumeState::Failed);
    assert!(again.error.error.contains("not on this device"));

    // Taken: the waiting clone is made at once.
    let out = m.handle_snapshot_config(request(s, Create, &[&a], 1)).await;
    assert!(!snapshot_of(&out).error.is_error());
    let made = volume_of(&out, &c.key());
    assert_eq!(made.state, VolumeState::Ready, "{made:?}");
    assert!(qcow2_reads(&made.file_location, 0x31, MIB));

    // Deleted: a new clone of it is refused with the reason.
    act(&mut m, s, Delete, &a, 2).await;
    let late = clone_of(&a, s);
    let refused = add(&mut m, &late).await;
    assert_eq!(refused.state, VolumeState::Failed);
    assert!(
        refused.error.error.contains("not on this device"),
        "{refused:?}"
    );

    // A snapshot of another volume does not hold this one.
    let b = volume(VolumeFormat::Qcow2, 16 * MIB);
    add(&mut m, &b).await;
    let t = Uuid::new_v4();
    snapshot(&mut m, t, &b, 1).await;
    let wrong = add(&mut m, &clone_of(&a, t)).await;
    assert_eq!(wrong.state, VolumeState::Failed);
    assert!(
        wrong.error.error.contains("does not include that volume"),
        "{wrong:?}"
    );

    // A directory volume cannot be a clone of a qcow2 image.
    let mut as_dir = clone_of(&b, t);
    as_dir.format = VolumeFormat::Dir;
    let mismatch = add(&mut m, &as_dir).await;
    assert_eq!(mismatch.state, VolumeState::Failed);
    assert!(
        mismatch
            .error
            .error
            .contains("cannot be cloned from a Qcow2 snapshot"),
        "{mismatch:?}"
    );
}

//! The core against real tools and real files: each bad input and fault of issue 4, and the
//! btrfs, copy and purgeable backends. Tests needing root or tools fail (not skip) without them.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::snapshot::VolumesSnapshotStatus;
use cairn_types::volume::{
    AppVolumeRefs, SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeState,
    VolumeStatus,
};
use cairn_volume_manager::tools::Tool;
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use common::*;
use uuid::Uuid;

async fn tools() -> Tools {
    let tools = Tools::detect().await;
    assert!(
        tools.usable(SnapshotBackendKind::Qcow2).is_ok(),
        "qemu-img is required (Debian qemu-utils)"
    );
    assert!(
        tools.usable(SnapshotBackendKind::Btrfs).is_ok(),
        "btrfs is required (Debian btrfs-progs)"
    );
    tools
}

/// A manager whose app-manager holds nothing (its table known): unused volumes go at once.
async fn manager(persist: &Path) -> VolumeManager {
    let mut m = VolumeManager::open(persist, tools().await, Vec::new()).await;
    immediate_deletion(&mut m).await;
    m.handle_app_volume_refs_complete().await;
    m
}

fn volume_of(out: &[Publish]) -> VolumeStatus {
    out.iter()
        .find_map(|p| match p {
            Publish::Volume(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap()
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
    volume_of(&m.handle_volume_config(config.clone()).await)
}

fn corrupt_header(file: &Path) {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.write_all(b"NOPE").unwrap();
}

#[tokio::test]
async fn an_unknown_volume_id_is_refused_and_nothing_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let a_status = add(&mut m, &a).await;
    let ghost = volume(VolumeFormat::Qcow2, 16 * MIB);
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a, &ghost], 1))
            .await,
    );
    assert!(
        s.error.error.contains(&ghost.volume_id.to_string()),
        "{}",
        s.error.error
    );
    assert!(
        s.error.error.contains("no volume with this id"),
        "{}",
        s.error.error
    );
    assert!(qcow2_tags(&a_status.file_location).is_empty());
    assert!(m.record(id).is_none());
}

#[tokio::test]
async fn a_raw_image_has_no_internal_snapshots_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let raw = volume(VolumeFormat::Raw, 16 * MIB);
    let status = add(&mut m, &raw).await;
    assert_eq!(status.state, VolumeState::Ready);
    assert_eq!(status.backend, SnapshotBackendKind::None);
    assert!(
        status.warnings.iter().any(|w| w.contains("raw image")),
        "{status:?}"
    );
    let s = snapshot_of(
        &m.handle_snapshot_config(request(Uuid::new_v4(), Create, &[&raw], 1))
            .await,
    );
    assert!(
        s.error
            .error
            .contains("raw image has no internal snapshots"),
        "{}",
        s.error.error
    );
}

#[tokio::test]
async fn a_corrupt_qcow2_header_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let status = add(&mut m, &a).await;
    corrupt_header(&status.file_location);
    let s = snapshot_of(
        &m.handle_snapshot_config(request(Uuid::new_v4(), Create, &[&a], 1))
            .await,
    );
    assert!(s.error.error.contains("is corrupt"), "{}", s.error.error);
    // A restarted agent adopting the file sees it too.
    let mut m2 = manager(dir.path()).await;
    let again = add(&mut m2, &a).await;
    assert_eq!(again.state, VolumeState::Failed);
    assert!(again.error.error.contains("no qcow2 header"), "{again:?}");
}

#[tokio::test]
async fn a_base_image_is_used_only_when_its_sha256_matches() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"],
    );
    qcow2_write(&base, 0x5a, MIB);
    let sha = cairn_volume_manager::volumes::sha256_file(&base).unwrap();
    let mut m = manager(&dir.path().join("persist")).await;
    let mut good = volume(VolumeFormat::Qcow2, 16 * MIB);
    good.origin = VolumeOrigin::BaseImage {
        path: base.clone(),
        sha256: sha.clone(),
    };
    let s = add(&mut m, &good).await;
    assert_eq!(s.state, VolumeState::Ready, "{s:?}");
    assert!(qcow2_reads(&s.file_location, 0x5a, MIB));

    let mut bad = volume(VolumeFormat::Qcow2, 16 * MIB);
    bad.origin = VolumeOrigin::BaseImage {
        path: base,
        sha256: "00".repeat(32),
    };
    let s = add(&mut m, &bad).await;
    assert_eq!(s.state, VolumeState::Failed);
    assert!(
        s.error.error.contains(&format!("has sha256 {sha}")),
        "{}",
        s.error.error
    );
    assert!(
        !s.file_location.exists(),
        "nothing made from an unverified image"
    );
}

#[tokio::test]
async fn a_failure_on_volume_k_removes_the_snapshots_made_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let vols: Vec<VolumeConfig> = (0..3)
        .map(|_| volume(VolumeFormat::Qcow2, 16 * MIB))
        .collect();
    let mut files = Vec::new();
    for v in &vols {
        files.push(add(&mut m, v).await.file_location);
    }
    corrupt_header(&files[2]);
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &vols.iter().collect::<Vec<_>>(), 1))
            .await,
    );
    let third = vols[2].volume_id.to_string();
    assert!(
        s.error
            .error
            .contains(&format!("on volume {third} (number 3 of 3) failed")),
        "{}",
        s.error.error
    );
    assert_eq!(
        s.volume_errors.keys().collect::<Vec<_>>(),
        vec![&vols[2].volume_id]
    );
    assert!(s.volume_snapshot_meta.is_empty());
    for f in &files[..2] {
        assert!(
            qcow2_tags(f).is_empty(),
            "snapshot on an earlier volume was not removed"
        );
    }
}

/// Holds qemu's write lock on `file` as a running VM would, until dropped.
struct Holder(std::process::Child);

impl Holder {
    fn new(file: &Path) -> Self {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2", file.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        Self(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_image_held_by_a_vm_is_reported_and_a_failed_delete_stays_visible() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let file = add(&mut m, &a).await.file_location;
    let id = Uuid::new_v4();
    {
        let _vm = Holder::new(&file);
        let s = snapshot_of(
            &m.handle_snapshot_config(request(id, Create, &[&a], 1))
                .await,
        );
        assert!(
            s.error.error.contains("in use by a running VM"),
            "{}",
            s.error.error
        );
    }
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 2))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    {
        let _vm = Holder::new(&file);
        let s = snapshot_of(
            &m.handle_snapshot_config(request(id, Delete, &[&a], 3))
                .await,
        );
        assert!(s.error.error.contains("delete failed"), "{}", s.error.error);
        assert!(s.volume_errors[&a.volume_id].contains("in use by a running VM"));
        assert_eq!(
            s.volume_snapshot_meta.len(),
            1,
            "what is left stays recorded"
        );
        assert!(m.record(id).is_some());
    }
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Delete, &[&a], 4))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert!(qcow2_tags(&file).is_empty());
}

#[tokio::test]
async fn a_full_disk_fails_the_snapshot_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("ext4", &volumes, 8);
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    let file = add(&mut m, &a).await.file_location;
    // Fill it up to the last block (the root-reserved ones too: the tests run as root).
    for (name, bs) in [("fill", "64k"), ("fill-tail", "1k")] {
        let _ = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}", volumes.join(name).display()),
                &format!("bs={bs}"),
            ])
            .stderr(Stdio::null())
            .status();
    }
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 1))
            .await,
    );
    assert!(s.error.error.contains("no space left"), "{}", s.error.error);
    assert!(qcow2_tags(&file).is_empty());
    assert!(m.record(id).unwrap().volume_snapshot_meta.is_empty());
    // A full disk is no corruption: the volume stays usable.
    let volume = m.volume_status(&a.key()).unwrap();
    assert_eq!(volume.state, VolumeState::Ready, "{volume:?}");
    println!("full disk: {}", s.error.error);
    std::fs::remove_file(volumes.join("fill")).unwrap();
    std::fs::remove_file(volumes.join("fill-tail")).unwrap();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 2))
            .await,
    );
    assert!(!s.error.is_error(), "retry after freeing space: {s:?}");
}

#[tokio::test]
async fn btrfs_directory_volumes_snapshot_roll_back_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("btrfs", &volumes, 300);
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Btrfs, "{status:?}");
    let path = status.file_location;
    std::fs::write(path.join("data"), b"before").unwrap();
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let meta = s.meta_of(a.volume_id).unwrap();
    assert!(
        std::fs::write(meta.snapshot_location.join("x"), b"").is_err(),
        "read-only snapshot"
    );
    std::fs::write(path.join("data"), b"after").unwrap();
    // What a rollback cut short leaves beside the volume: its scratch subvolume.
    let scratch = cairn_volume_manager::backend::rollback_scratch(&path);
    sh("btrfs", &["subvolume", "create", scratch.to_str().unwrap()]);
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Rollback, &[&a], 2))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(std::fs::read(path.join("data")).unwrap(), b"before");
    assert!(
        !scratch.exists(),
        "neither the stale scratch nor the old content is left"
    );
    let list = sh("btrfs", &["subvolume", "list", volumes.to_str().unwrap()]);
    assert_eq!(
        list.lines().count(),
        2,
        "the volume and its snapshot, nothing else: {list}"
    );
    std::fs::write(path.join("data"), b"writable again").unwrap();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Delete, &[&a], 3))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert!(!meta.snapshot_location.exists());
    let out = m.handle_volume_config_delete(&a.key()).await;
    assert!(out.contains(&Publish::UnpublishVolume(a.key())));
    assert!(!path.exists());
}

/// The ioctl a live snapshot's pause makes (no `btrfs` process): a read-only subvolume with the
/// tree of its source at that moment, which the kernel and the CLI both see as read-only.
#[test]
fn the_snapshot_ioctl_makes_a_read_only_subvolume_of_the_tree() {
    use cairn_volume_manager::backend::btrfs_ioctl::snapshot_read_only;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new("btrfs", &dir.path().join("fs"), 300);
    let source = fs.mount.join("volume");
    sh("btrfs", &["subvolume", "create", source.to_str().unwrap()]);
    std::fs::write(source.join("data"), b"taken").unwrap();
    snapshot_read_only(
        &std::fs::File::open(&source).unwrap(),
        &std::fs::File::open(&fs.mount).unwrap(),
        std::ffi::OsStr::new("snap"),
    )
    .unwrap();
    std::fs::write(source.join("data"), b"after").unwrap();
    let snap = fs.mount.join("snap");
    assert_eq!(std::fs::metadata(&snap).unwrap().ino(), 256, "a subvolume");
    assert_eq!(std::fs::read(snap.join("data")).unwrap(), b"taken");
    let e = std::fs::write(snap.join("x"), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");
    let ro = sh(
        "btrfs",
        &["property", "get", "-ts", snap.to_str().unwrap(), "ro"],
    );
    assert_eq!(ro.trim(), "ro=true");
    let again = snapshot_read_only(
        &std::fs::File::open(&source).unwrap(),
        &std::fs::File::open(&fs.mount).unwrap(),
        std::ffi::OsStr::new("snap"),
    );
    assert_eq!(
        again,
        Err(nix::errno::Errno::EEXIST),
        "an existing name is the snapshot's error"
    );
}

/// The ioctls a rollback and a delete make (no `btrfs` process): a writable snapshot of a
/// read-only one, and the subvolume deletion, which also deletes a read-only snapshot and
/// refuses a plain directory as the CLI does.
#[test]
fn the_rollback_and_delete_ioctls_make_a_writable_snapshot_and_delete_subvolumes() {
    use cairn_volume_manager::backend::btrfs_ioctl::{
        destroy, snapshot_read_only, snapshot_writable,
    };
    use std::ffi::OsStr;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new("btrfs", &dir.path().join("fs"), 300);
    let open = |p: &std::path::Path| std::fs::File::open(p).unwrap();
    let source = fs.mount.join("volume");
    sh("btrfs", &["subvolume", "create", source.to_str().unwrap()]);
    std::fs::write(source.join("data"), b"taken").unwrap();
    snapshot_read_only(&open(&source), &open(&fs.mount), OsStr::new("snap")).unwrap();
    let snap = fs.mount.join("snap");
    snapshot_writable(&open(&snap), &open(&fs.mount), OsStr::new("back")).unwrap();
    let back = fs.mount.join("back");
    assert_eq!(std::fs::metadata(&back).unwrap().ino(), 256, "a subvolume");
    assert_eq!(std::fs::read(back.join("data")).unwrap(), b"taken");
    std::fs::write(back.join("data"), b"writable").unwrap();
    assert_eq!(std::fs::read(snap.join("data")).unwrap(), b"taken");
    let ro = sh(
        "btrfs",
        &["property", "get", "-ts", back.to_str().unwrap(), "ro"],
    );
    assert_eq!(ro.trim(), "ro=false");
    for name in ["back", "snap"] {
        destroy(&open(&fs.mount), OsStr::new(name)).unwrap();
        assert!(!fs.mount.join(name).exists(), "{name} deleted");
    }
    let list = sh("btrfs", &["subvolume", "list", fs.mount.to_str().unwrap()]);
    assert!(
        !list.contains(" back\n") && !list.contains(" snap\n"),
        "gone from the subvolume list: {list}"
    );
    std::fs::create_dir(fs.mount.join("plain")).unwrap();
    assert_eq!(
        destroy(&open(&fs.mount), OsStr::new("plain")),
        Err(nix::errno::Errno::EINVAL),
        "a plain directory is no subvolume"
    );
    assert!(fs.mount.join("plain").is_dir());
    assert_eq!(
        destroy(&open(&fs.mount), OsStr::new("none")),
        Err(nix::errno::Errno::ENOENT)
    );
}

/// A fresh device root on btrfs: `<persist>/volumes` does not exist yet when the first volume's
/// backend is chosen; the filesystem it will be made on decides, and the status says why.
#[tokio::test]
async fn a_fresh_root_on_btrfs_gives_directory_volumes_the_btrfs_backend_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let _fs = LoopFs::new("btrfs", &persist, 300);
    let volumes = cairn_types::layout::volumes_dir(&persist);
    assert!(!volumes.exists());
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.state, VolumeState::Ready, "{status:?}");
    assert_eq!(status.backend, SnapshotBackendKind::Btrfs, "{status:?}");
    assert!(
        status.backend_reason.starts_with("btrfs: ")
            && status.backend_reason.contains("is on btrfs"),
        "{}",
        status.backend_reason
    );
    let q = volume(VolumeFormat::Qcow2, 16 * MIB);
    let status = add(&mut m, &q).await;
    assert_eq!(status.backend_reason, "qcow2: format", "{status:?}");
    let s = snapshot_of(
        &m.handle_snapshot_config(request(Uuid::new_v4(), Create, &[&a], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let meta = s.meta_of(a.volume_id).unwrap();
    assert!(
        std::fs::write(meta.snapshot_location.join("x"), b"").is_err(),
        "a read-only btrfs snapshot, not a copy"
    );
}

/// A directory volume found on btrfs as a plain directory (made by the copy backend, as on a
/// fresh root before the fix) cannot be snapshotted by btrfs: it stays with the copy backend,
/// and says why, instead of failing at its first snapshot.
#[tokio::test]
async fn a_plain_directory_volume_on_btrfs_stays_with_the_copy_backend_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let _fs = LoopFs::new("btrfs", &volumes, 300);
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Dir, 0);
    std::fs::create_dir(volumes.join(a.key())).unwrap();
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Copy, "{status:?}");
    assert!(
        status.backend_reason.contains("not a subvolume"),
        "{}",
        status.backend_reason
    );
    let s = snapshot_of(
        &m.handle_snapshot_config(request(Uuid::new_v4(), Create, &[&a], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
}

/// A directory volume on a filesystem without snapshots is copied, and its status names the
/// filesystem.
#[tokio::test]
async fn a_directory_volume_off_btrfs_says_it_is_copied_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let _fs = LoopFs::new("ext4", &persist, 64);
    let mut m = manager(&persist).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Copy, "{status:?}");
    assert!(
        status.backend_reason.starts_with("copy: ")
            && status.backend_reason.contains("is on ext2/3/4"),
        "{}",
        status.backend_reason
    );
}

#[tokio::test]
async fn plain_directory_volumes_are_snapshotted_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Dir, 0);
    let status = add(&mut m, &a).await;
    assert_eq!(status.backend, SnapshotBackendKind::Copy);
    std::fs::write(status.file_location.join("f"), b"one").unwrap();
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 1))
            .await,
    );
    assert_eq!(s.meta_of(a.volume_id).unwrap().size, 3);
    std::fs::write(status.file_location.join("f"), b"two").unwrap();
    snapshot_of(
        &m.handle_snapshot_config(request(id, Rollback, &[&a], 2))
            .await,
    );
    assert_eq!(
        std::fs::read(status.file_location.join("f")).unwrap(),
        b"one"
    );
}

#[tokio::test]
async fn a_purged_volume_is_kept_while_a_snapshot_refers_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let mut gen0 = volume(VolumeFormat::Qcow2, 16 * MIB);
    gen0.purgeable = true;
    let old = add(&mut m, &gen0).await;
    assert_eq!(old.backend, SnapshotBackendKind::Purgeable);
    qcow2_write(&old.file_location, 0x11, MIB);
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&gen0], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    // Purge: a new generation replaces the old one.
    let mut gen1 = gen0.clone();
    gen1.generation_counter = 1;
    let new = add(&mut m, &gen1).await;
    assert_ne!(new.file_location, old.file_location);
    let out = m.handle_volume_config_delete(&gen0.key()).await;
    let kept = volume_of(&out);
    assert!(
        kept.warnings.iter().any(|w| w.contains(&id.to_string())),
        "{kept:?}"
    );
    assert!(old.file_location.exists(), "kept for the snapshot");
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Rollback, &[&gen0], 2))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(
        s.meta_of(gen0.volume_id).unwrap().snapshot_location,
        old.file_location
    );
    // Rolled back: the app asks for generation 0 again and gets the kept volume.
    let back = add(&mut m, &gen0).await;
    assert!(qcow2_reads(&back.file_location, 0x11, MIB));
    m.handle_volume_config_delete(&gen0.key()).await;
    let out = m
        .handle_snapshot_config(request(id, Delete, &[&gen0], 3))
        .await;
    assert!(
        out.contains(&Publish::UnpublishVolume(gen0.key())),
        "{out:?}"
    );
    assert!(
        !old.file_location.exists(),
        "released with its last snapshot"
    );
    assert!(new.file_location.exists());
}

#[tokio::test]
async fn a_missing_tool_disables_its_backend_with_the_package_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut tools = tools().await;
    tools.set(
        SnapshotBackendKind::Qcow2,
        Tool::missing("qemu-img", "qemu-utils"),
    );
    let mut m = VolumeManager::open(dir.path(), tools, Vec::new()).await;
    immediate_deletion(&mut m).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let s = add(&mut m, &a).await;
    assert_eq!(s.state, VolumeState::Failed);
    assert!(
        s.error
            .error
            .contains("install the Debian package qemu-utils"),
        "{s:?}"
    );
    let d = add(&mut m, &volume(VolumeFormat::Dir, 0)).await;
    assert_eq!(d.state, VolumeState::Ready, "other backends keep working");
}

#[test]
fn an_eve_record_with_a_bare_snapshot_name_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volumesSnapshotStatus.json");
    let vol = Uuid::new_v4();
    std::fs::write(
        &path,
        format!(r#"{{"SnapshotID":"{}","VolumeSnapshotMeta":{{"{vol}":"snap-1"}},"AppUUID":"{}","TimeCreated":"0001-01-01T00:00:00Z","RefCount":0,"ResultOfAction":1}}"#, Uuid::new_v4(), Uuid::new_v4()),
    )
    .unwrap();
    let r = cairn_persist::load::<VolumesSnapshotStatus>(&path)
        .unwrap()
        .record;
    let meta = r.meta_of(vol).unwrap();
    assert_eq!(
        (meta.backend, meta.name.as_str()),
        (SnapshotBackendKind::Qcow2, "snap-1")
    );
    assert!(!r.is_in_progress());
}

#[tokio::test]
async fn a_repeated_create_is_answered_again_without_remaking_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let file = add(&mut m, &a).await.file_location;
    let id = Uuid::new_v4();
    let first = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 1))
            .await,
    );
    let again = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 2))
            .await,
    );
    assert!(!again.error.is_error(), "{again:?}");
    assert_eq!(again.request_counter, 2);
    assert_eq!(again.time_created, first.time_created);
    assert_eq!(qcow2_tags(&file), vec![id.to_string()], "no duplicate tag");
    assert_eq!(m.record(id).unwrap().request_counter, 2);
    // Removed behind the agent's back: a repeat says so, and a rollback refuses.
    sh(
        "qemu-img",
        &["snapshot", "-d", &id.to_string(), file.to_str().unwrap()],
    );
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&a], 3))
            .await,
    );
    assert!(
        s.volume_errors[&a.volume_id].contains("has vanished"),
        "{s:?}"
    );
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Rollback, &[&a], 4))
            .await,
    );
    assert!(
        s.volume_errors[&a.volume_id].contains("does not exist on the backend"),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_purge_snapshot_is_taken_of_the_generation_the_request_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let gen0 = volume(VolumeFormat::Qcow2, 16 * MIB);
    let old = add(&mut m, &gen0).await;
    let mut gen1 = gen0.clone();
    gen1.generation_counter = 1;
    let new = add(&mut m, &gen1).await;
    // The new generation exists already; the APP_UPDATE snapshot of the purge is of the old one.
    let id = Uuid::new_v4();
    let mut create = request(id, Create, &[&gen0], 1);
    create.volume_keys = [(gen0.volume_id, gen0.key())].into();
    let s = snapshot_of(&m.handle_snapshot_config(create).await);
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(s.meta_of(gen0.volume_id).unwrap().volume_key, gen0.key());
    assert_eq!(qcow2_tags(&old.file_location), vec![id.to_string()]);
    assert!(qcow2_tags(&new.file_location).is_empty());
    // A generation that is not on the device is refused by name, nothing made.
    let mut gone = request(Uuid::new_v4(), Create, &[&gen0], 1);
    gone.volume_keys = [(gen0.volume_id, format!("{}#7", gen0.volume_id))].into();
    let s = snapshot_of(&m.handle_snapshot_config(gone).await);
    assert!(s.error.error.contains("#7 is not on this device"), "{s:?}");
}

#[tokio::test]
async fn an_unconfigured_volume_stays_while_an_app_holds_it_or_its_holds_are_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = VolumeManager::open(dir.path(), tools().await, Vec::new()).await;
    immediate_deletion(&mut m).await;
    let gen0 = volume(VolumeFormat::Dir, 0);
    let old = add(&mut m, &gen0).await;
    let app = Uuid::new_v4();
    // The app-manager has not said what its apps hold yet (it may have just rebooted).
    m.handle_volume_config_delete(&gen0.key()).await;
    assert!(
        old.file_location.exists(),
        "released before the holds are known"
    );
    let out = m
        .handle_app_volume_refs(AppVolumeRefs {
            app_uuid: app,
            volume_keys: [gen0.key()].into(),
        })
        .await;
    m.handle_app_volume_refs_complete().await;
    let kept = volume_of(&out);
    assert!(
        kept.warnings.iter().any(|w| w.contains(&app.to_string())),
        "{kept:?}"
    );
    assert!(
        old.file_location.exists(),
        "released while the app holds it"
    );
    // The app lets go (it restarted on the new generation): the volume goes.
    let out = m
        .handle_app_volume_refs(AppVolumeRefs {
            app_uuid: app,
            volume_keys: Default::default(),
        })
        .await;
    assert!(
        out.contains(&Publish::UnpublishVolume(gen0.key())),
        "{out:?}"
    );
    assert!(!old.file_location.exists());
}

fn holds(keys: &[&str]) -> AppVolumeRefs {
    AppVolumeRefs {
        app_uuid: Uuid::from_u128(0xa99),
        volume_keys: keys.iter().map(|k| k.to_string()).collect(),
    }
}

fn volume_in(out: &[Publish], key: &str) -> Option<VolumeStatus> {
    out.iter().find_map(|p| match p {
        Publish::Volume(s) if s.key() == key => Some(s.clone()),
        _ => None,
    })
}

/// A bare purge: the app-manager holds `<uuid>#0.1`, a key no config names. The volume-manager
/// makes it fresh from the config of `<uuid>#0`, releases `#0` once the app lets go (its copy
/// snapshot does not live in it), does not make `#0` again after a restart, and a rollback to
/// the snapshot makes `#0` again with the snapshot's content.
#[tokio::test]
async fn a_held_local_generation_is_made_fresh_and_supersedes_the_configured_volume() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let gen0 = volume(VolumeFormat::Dir, 0);
    let key0 = gen0.key();
    let mut local1 = gen0.clone();
    local1.local_generation_counter = 1;
    let key1 = local1.key();
    assert_eq!(key1, format!("{}#0.1", gen0.volume_id));
    let old = add(&mut m, &gen0).await;
    assert!(matches!(
        old.backend,
        SnapshotBackendKind::Copy | SnapshotBackendKind::Btrfs
    ));
    std::fs::write(old.file_location.join("data"), b"old").unwrap();
    m.handle_app_volume_refs(holds(&[&key0])).await;
    let id = Uuid::new_v4();
    let mut create = request(id, Create, &[&gen0], 1);
    create.volume_keys = [(gen0.volume_id, key0.clone())].into();
    let s = snapshot_of(&m.handle_snapshot_config(create).await);
    assert!(!s.error.is_error(), "{s:?}");

    // The purge: both held while the app moves.
    let out = m.handle_app_volume_refs(holds(&[&key0, &key1])).await;
    let new = volume_in(&out, &key1).expect("the new local generation is made");
    assert_eq!(new.state, VolumeState::Ready);
    assert_eq!(new.local_generation_counter, 1);
    assert!(new.file_location.is_dir() && !new.file_location.join("data").exists());
    assert!(old.file_location.join("data").exists(), "held: kept");

    // The app runs on the new one: the old one goes, its snapshot stays.
    let out = m.handle_app_volume_refs(holds(&[&key1])).await;
    assert!(
        out.contains(&Publish::UnpublishVolume(key0.clone())),
        "{out:?}"
    );
    assert!(!old.file_location.exists());
    assert!(
        m.record(id)
            .unwrap()
            .meta_of(gen0.volume_id)
            .unwrap()
            .snapshot_location
            .is_dir()
    );

    // Restart: the config of #0 comes again; #0 is not made again, #0.1 is kept even unheld
    // (the configured line's newest volume: a deactivated app keeps its data).
    let previous = vec![m.volume_status(&key1).unwrap().clone()];
    let mut m = VolumeManager::open(dir.path(), tools().await, previous.clone()).await;
    immediate_deletion(&mut m).await;
    let out = m.handle_volume_config(gen0.clone()).await;
    assert!(volume_in(&out, &key0).is_none(), "{out:?}");
    assert!(!old.file_location.exists());
    m.adopt_unconfigured(previous).await;
    let out = m.handle_app_volume_refs_complete().await;
    assert!(out.is_empty(), "{out:?}");
    assert!(new.file_location.is_dir());

    // Rollback to the snapshot: the app holds #0 again; it is made and gets the old content.
    let out = m.handle_app_volume_refs(holds(&[&key0])).await;
    assert!(volume_in(&out, &key0).is_some(), "{out:?}");
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Rollback, &[&gen0], 2))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(
        std::fs::read(old.file_location.join("data")).unwrap(),
        b"old"
    );
    assert!(
        new.file_location.is_dir(),
        "the newest volume of the line stays"
    );
}

/// After a purge by the controller's generation, a copy snapshot's volume is released with its
/// config; a rollback makes it again at its old place and reports it Ready.
#[tokio::test]
async fn a_rollback_makes_a_released_volume_again_from_its_copy_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path()).await;
    let gen0 = volume(VolumeFormat::Dir, 0);
    let old = add(&mut m, &gen0).await;
    std::fs::write(old.file_location.join("data"), b"old").unwrap();
    let id = Uuid::new_v4();
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, Create, &[&gen0], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let mut gen1 = gen0.clone();
    gen1.generation_counter = 1;
    add(&mut m, &gen1).await;
    let out = m.handle_volume_config_delete(&gen0.key()).await;
    assert!(
        out.contains(&Publish::UnpublishVolume(gen0.key())),
        "{out:?}"
    );
    assert!(!old.file_location.exists());

    m.handle_app_volume_refs(holds(&[&gen0.key()])).await;
    let mut rollback = request(id, Rollback, &[&gen0], 2);
    rollback.volume_keys = [(gen0.volume_id, gen0.key())].into();
    let out = m.handle_snapshot_config(rollback).await;
    assert!(!snapshot_of(&out).error.is_error(), "{out:?}");
    let back = volume_in(&out, &gen0.key()).expect("reported again");
    assert_eq!(back.state, VolumeState::Ready);
    assert_eq!(back.file_location, old.file_location);
    assert_eq!(
        std::fs::read(old.file_location.join("data")).unwrap(),
        b"old"
    );
    // Held by the app that rolled back onto it; released when it lets go.
    let out = m.handle_app_volume_refs(holds(&[&gen1.key()])).await;
    assert!(
        out.contains(&Publish::UnpublishVolume(gen0.key())),
        "{out:?}"
    );
}

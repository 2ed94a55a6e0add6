//! Fast restore modes for directory volumes (issue 11 item 4), against real tools: btrfs swap on
//! a btrfs loop device, squashfs images under overlayfs (real mounts and loop devices), rsync.
//! Each mode: snapshot, change, restore gives the snapshot's tree back (content, modes, links),
//! also across a restart; delete leaves no mount and no loop device; a mode whose tool is
//! missing fails when the volume is made, naming the Debian package. Needs root.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::snapshot::VolumesSnapshotStatus;
use cairn_types::volume::{
    DirRestoreMode, SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeState, VolumeStatus,
};
use cairn_volume_manager::backend::squashfs;
use cairn_volume_manager::tools::Tool;
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use common::*;
use uuid::Uuid;

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

fn dir_volume(mode: DirRestoreMode) -> VolumeConfig {
    VolumeConfig {
        restore_mode: mode,
        ..volume(VolumeFormat::Dir, 0)
    }
}

async fn open(persist: &Path, tools: Tools, previous: Vec<VolumeStatus>) -> VolumeManager {
    let mut m = VolumeManager::open(persist, tools, previous).await;
    immediate_deletion(&mut m).await;
    m.handle_app_volume_refs_complete().await;
    m
}

async fn act(
    m: &mut VolumeManager,
    id: Uuid,
    action: cairn_types::snapshot::VolumesSnapshotAction,
    v: &VolumeConfig,
    counter: u64,
) -> VolumesSnapshotStatus {
    let s = snapshot_of(
        &m.handle_snapshot_config(request(id, action, &[v], counter))
            .await,
    );
    assert!(!s.error.is_error(), "{action:?}: {s:?}");
    s
}

/// What a tree holds: per relative path, its type, permission bits, owner and content (a
/// file's sha256, a link's target).
fn manifest(root: &Path) -> BTreeMap<PathBuf, String> {
    manifest_with(root, true)
}

/// As [`manifest`], with or without owners (the copy backend does not keep them).
fn manifest_with(root: &Path, owners: bool) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, owners: bool, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.is_dir() {
                walk(root, &path, owners, out);
                "dir".to_string()
            } else if meta.is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else {
                format!(
                    "file {}",
                    cairn_volume_manager::volumes::sha256_file(&path).unwrap()
                )
            };
            let owner = if owners {
                format!("{}:{}", meta.uid(), meta.gid())
            } else {
                String::new()
            };
            out.insert(rel, format!("{what} {mode:o} {owner}"));
        }
    }
    let mut out = BTreeMap::new();
    let mode = std::fs::metadata(root).unwrap().permissions().mode() & 0o7777;
    out.insert(PathBuf::from("."), format!("root {mode:o}"));
    walk(root, root, owners, &mut out);
    out
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A small tree with nested directories, modes, a symlink, an empty directory and an owner.
fn populate(root: &Path) {
    std::fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    std::fs::create_dir_all(root.join("var/empty")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("etc/app.conf"), b"mode = fast\n").unwrap();
    std::fs::write(root.join("etc/conf.d/extra"), b"x = 1\n").unwrap();
    chmod(&root.join("etc/conf.d/extra"), 0o600);
    for i in 0..20u8 {
        std::fs::write(
            root.join(format!("data/f{i}")),
            vec![i; 4096 + usize::from(i)],
        )
        .unwrap();
    }
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    chmod(&root.join("run.sh"), 0o755);
    std::os::unix::fs::symlink("etc/app.conf", root.join("config")).unwrap();
    std::os::unix::fs::chown(root.join("data/f3"), Some(1234), Some(4321)).unwrap();
}

/// Modifies, adds, deletes and chmods, so a restore has every kind of change to undo.
fn change(root: &Path) {
    std::fs::write(root.join("etc/app.conf"), b"mode = changed!\n").unwrap();
    std::fs::write(root.join("data/f1"), vec![0xee; 4097]).unwrap(); // same size
    std::fs::write(root.join("new-file"), b"added").unwrap();
    std::fs::create_dir_all(root.join("new-dir/deep")).unwrap();
    std::fs::write(root.join("new-dir/deep/x"), b"added too").unwrap();
    std::fs::remove_file(root.join("data/f2")).unwrap();
    std::fs::remove_dir_all(root.join("etc/conf.d")).unwrap();
    std::fs::remove_dir(root.join("var/empty")).unwrap();
    chmod(&root.join("run.sh"), 0o644);
    std::fs::remove_file(root.join("config")).unwrap();
    std::os::unix::fs::symlink("elsewhere", root.join("config")).unwrap();
}

/// Loop devices whose backing file lies under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    sh("losetup", &["-a"])
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(dir.to_str().unwrap()) && Path::new(p) != dir)
        .collect()
}

/// The whole cycle for one mode, on the volumes directory of `persist` (already on the right
/// filesystem): snapshot, change, restore; restart; restore again and a snapshot made after the
/// restart; delete everything.
async fn cycle(persist: &Path, mode: DirRestoreMode, kind: SnapshotBackendKind) {
    // The copy backend copies contents and modes, not owners.
    let manifest = |p: &Path| manifest_with(p, mode != DirRestoreMode::Copy);
    let tools = Tools::detect().await;
    let mut m = open(persist, tools.clone(), Vec::new()).await;
    let a = dir_volume(mode);
    let status = volume_of(&m.handle_volume_config(a.clone()).await);
    assert_eq!(status.state, VolumeState::Ready, "{status:?}");
    assert_eq!(status.backend, kind, "the mode chooses the backend");
    let path = status.file_location.clone();
    populate(&path);
    let before = manifest(&path);

    let s1 = Uuid::new_v4();
    act(&mut m, s1, Create, &a, 1).await;
    change(&path);
    assert_ne!(manifest(&path), before);
    act(&mut m, s1, Rollback, &a, 2).await;
    assert_eq!(manifest(&path), before, "restored to the snapshot");
    // Changes after a restore start from the snapshot's content again.
    change(&path);

    // Restart: the volume is adopted as it is (mounts included), the records reloaded.
    let previous = vec![m.volume_status(&a.key()).unwrap().clone()];
    drop(m);
    let mut m = open(persist, tools.clone(), previous).await;
    let status = volume_of(&m.handle_volume_config(a.clone()).await);
    assert_eq!(status.state, VolumeState::Ready, "{status:?}");
    assert_ne!(manifest(&path), before, "the changes survived the restart");
    act(&mut m, s1, Rollback, &a, 3).await;
    assert_eq!(manifest(&path), before, "restored after a restart");

    // A snapshot of a restored volume is of what the app sees (for squashfs: the merged view).
    std::fs::write(path.join("second"), b"in snapshot 2").unwrap();
    let after_s2 = manifest(&path);
    let s2 = Uuid::new_v4();
    act(&mut m, s2, Create, &a, 1).await;
    change(&path);
    std::fs::remove_file(path.join("second")).unwrap();
    act(&mut m, s2, Rollback, &a, 2).await;
    assert_eq!(manifest(&path), after_s2, "restored to snapshot 2");
    act(&mut m, s1, Rollback, &a, 4).await;
    assert_eq!(manifest(&path), before, "and back to snapshot 1");

    // Deleting the snapshot the volume was restored from leaves the volume whole.
    act(&mut m, s1, Delete, &a, 5).await;
    act(&mut m, s2, Delete, &a, 3).await;
    assert_eq!(manifest(&path), before);
    let out = m.handle_volume_config_delete(&a.key()).await;
    assert!(out.contains(&Publish::UnpublishVolume(a.key())), "{out:?}");
    assert!(!path.exists(), "volume removed");
}

#[tokio::test]
async fn squashfs_overlay_snapshot_restore_restart_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    cycle(
        &persist,
        DirRestoreMode::SquashfsOverlay,
        SnapshotBackendKind::Squashfs,
    )
    .await;
    assert!(mounts_under(dir.path()).is_empty(), "no mount left");
    assert!(
        loop_devices_under(dir.path()).is_empty(),
        "no loop device left"
    );
    // Dropped upper layers are removed after each restore, in the background.
    let volumes = cairn_types::layout::volumes_dir(&persist);
    let leftovers = || {
        std::fs::read_dir(&volumes)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".rollback"))
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while leftovers() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(leftovers(), 0, "dropped upper layers removed");
}

#[tokio::test]
async fn rsync_snapshot_restore_restart_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    cycle(
        &dir.path().join("persist"),
        DirRestoreMode::Rsync,
        SnapshotBackendKind::Rsync,
    )
    .await;
}

#[tokio::test]
async fn btrfs_swap_snapshot_restore_restart_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let _fs = LoopFs::new("btrfs", &cairn_types::layout::volumes_dir(&persist), 300);
    cycle(
        &persist,
        DirRestoreMode::BtrfsSwap,
        SnapshotBackendKind::Btrfs,
    )
    .await;
}

#[tokio::test]
async fn copy_mode_on_btrfs_is_honoured_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let _fs = LoopFs::new("btrfs", &cairn_types::layout::volumes_dir(&persist), 300);
    cycle(&persist, DirRestoreMode::Copy, SnapshotBackendKind::Copy).await;
}

#[tokio::test]
async fn rsync_snapshots_hard_link_unchanged_files_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), Tools::detect().await, Vec::new()).await;
    let a = dir_volume(DirRestoreMode::Rsync);
    let path = volume_of(&m.handle_volume_config(a.clone()).await).file_location;
    populate(&path);
    let (s1, s2) = (Uuid::new_v4(), Uuid::new_v4());
    let one = act(&mut m, s1, Create, &a, 1)
        .await
        .meta_of(a.volume_id)
        .unwrap();
    std::fs::write(path.join("data/f5"), b"changed").unwrap();
    let two = act(&mut m, s2, Create, &a, 1)
        .await
        .meta_of(a.volume_id)
        .unwrap();
    let ino = |snap: &Path, f: &str| std::fs::metadata(snap.join(f)).unwrap().ino();
    assert_eq!(
        ino(&one.snapshot_location, "data/f6"),
        ino(&two.snapshot_location, "data/f6"),
        "unchanged file shared"
    );
    assert_ne!(
        ino(&one.snapshot_location, "data/f5"),
        ino(&two.snapshot_location, "data/f5"),
        "changed file copied"
    );
    // A restore writes into the live tree, never through the links into a snapshot.
    act(&mut m, s1, Rollback, &a, 2).await;
    std::fs::write(path.join("data/f6"), b"live write").unwrap();
    assert_eq!(
        std::fs::read(two.snapshot_location.join("data/f6")).unwrap(),
        vec![6u8; 4102]
    );
}

/// The overlay's mounts outlive the agent (adopted at start) and, when they are gone (a
/// reboot), are made again at start; the real binary over the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squashfs_mounts_are_adopted_or_remade_when_the_agent_restarts() {
    let mut h = Harness::new().await;
    let mut agent = h.agent(None);
    let a = dir_volume(DirRestoreMode::SquashfsOverlay);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let s = h.ready(&a).await;
    assert_eq!(
        (s.state, s.backend),
        (VolumeState::Ready, SnapshotBackendKind::Squashfs),
        "{s:?}"
    );
    let path = s.file_location.clone();
    assert_eq!(squashfs::mounted_type(&path).as_deref(), Some("overlay"));
    populate(&path);
    let before = manifest(&path);
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(id, Create, &[&a], 1))
        .await
        .unwrap();
    assert!(!h.answer(id, Create, 1).await.error.is_error());
    h.snapshot_configs
        .publish(request(id, Rollback, &[&a], 2))
        .await
        .unwrap();
    assert!(!h.answer(id, Rollback, 2).await.error.is_error());
    let lower = squashfs::layout(&path).lower;
    assert_eq!(squashfs::mounted_type(&lower).as_deref(), Some("squashfs"));
    change(&path);
    let changed = manifest(&path);

    // SIGKILL and restart: the mounts are still there and adopted, nothing mounted twice.
    drop(agent);
    agent = h.agent(None);
    drain(&mut h.volume_statuses).await;
    h.volume_configs.publish(a.clone()).await.unwrap();
    let s = h.ready(&a).await;
    assert_eq!(s.state, VolumeState::Ready, "{s:?}");
    assert_eq!(manifest(&path), changed);
    let count = |p: &Path| {
        mounts_under(h.root.path())
            .iter()
            .filter(|m| Path::new(m) == p)
            .count()
    };
    assert_eq!(
        (count(&path), count(&lower)),
        (1, 1),
        "adopted, not mounted again"
    );

    // A "reboot": agent down, mounts gone. At start they are made again, upper layer kept.
    drop(agent);
    sh("umount", &[path.to_str().unwrap()]);
    sh("umount", &[lower.to_str().unwrap()]);
    assert!(
        loop_devices_under(h.root.path()).is_empty(),
        "autoclear freed the device"
    );
    let _agent = h.agent(None);
    let s = h
        .volume_where(&a.key(), |s| {
            s.state == VolumeState::Ready && squashfs::mounted_type(&s.file_location).is_some()
        })
        .await;
    assert_eq!(
        squashfs::mounted_type(&s.file_location).as_deref(),
        Some("overlay")
    );
    assert_eq!(manifest(&path), changed, "remounted with its upper layer");
    h.snapshot_configs
        .publish(request(id, Rollback, &[&a], 3))
        .await
        .unwrap();
    assert!(!h.answer(id, Rollback, 3).await.error.is_error());
    assert_eq!(manifest(&path), before);

    h.snapshot_configs
        .publish(request(id, Delete, &[&a], 4))
        .await
        .unwrap();
    assert!(!h.answer(id, Delete, 4).await.error.is_error());
    h.set_delete_grace(0).await;
    h.volume_configs.unpublish(&a.key()).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while path.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!path.exists(), "volume removed");
    assert!(mounts_under(h.root.path()).is_empty(), "no mount left");
    assert!(
        loop_devices_under(h.root.path()).is_empty(),
        "no loop device left"
    );
}

/// SIGKILL in the middle of a squashfs restore (upper layer dropped, new base not in place):
/// at restart the volume is mounted again, the rollback (still requested, its intent recorded)
/// runs again and gives the snapshot's tree; the dropped layer is swept, nothing is mounted
/// twice, and delete leaves no mount and no loop device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squashfs_restore_killed_half_way_is_finished_after_restart() {
    let mut h = Harness::new().await;
    let a = dir_volume(DirRestoreMode::SquashfsOverlay);
    let id = Uuid::new_v4();
    let path = {
        let _agent = h.agent(None);
        h.volume_configs.publish(a.clone()).await.unwrap();
        let s = h.ready(&a).await;
        assert_eq!(s.state, VolumeState::Ready, "{s:?}");
        s.file_location
    };
    // Snapshot 1 of one tree, then a restore to it (so the base is an image), then snapshot 2.
    populate(&path);
    let first = manifest(&path);
    let s2 = Uuid::new_v4();
    {
        let _agent = h.agent(None);
        h.snapshot_configs
            .publish(request(id, Create, &[&a], 1))
            .await
            .unwrap();
        assert!(!h.answer(id, Create, 1).await.error.is_error());
        change(&path);
        h.snapshot_configs
            .publish(request(s2, Create, &[&a], 1))
            .await
            .unwrap();
        assert!(!h.answer(s2, Create, 1).await.error.is_error());
        h.snapshot_configs
            .publish(request(s2, Rollback, &[&a], 2))
            .await
            .unwrap();
        assert!(!h.answer(s2, Rollback, 2).await.error.is_error());
    }
    std::fs::write(path.join("after-restore"), b"in the upper layer").unwrap();

    let mut agent = h.agent(Some(squashfs::CRASH_AFTER_UPPER_DROPPED));
    h.snapshot_configs
        .publish(request(id, Rollback, &[&a], 2))
        .await
        .unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    assert!(
        squashfs::mounted_type(&path).is_none(),
        "killed while unmounted"
    );
    let _agent = h.agent(None);
    let s = h.answer(id, Rollback, 2).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(manifest(&path), first, "the restore was finished");
    let lower = squashfs::layout(&path).lower;
    let count = |p: &Path| {
        mounts_under(h.root.path())
            .iter()
            .filter(|m| Path::new(m) == p)
            .count()
    };
    assert_eq!((count(&path), count(&lower)), (1, 1), "mounted once");

    for (snap, counter) in [(id, 3), (s2, 3)] {
        h.snapshot_configs
            .publish(request(snap, Delete, &[&a], counter))
            .await
            .unwrap();
        assert!(!h.answer(snap, Delete, counter).await.error.is_error());
    }
    h.set_delete_grace(0).await;
    h.volume_configs.unpublish(&a.key()).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while path.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!path.exists(), "volume removed");
    assert!(mounts_under(h.root.path()).is_empty(), "no mount left");
    assert!(
        loop_devices_under(h.root.path()).is_empty(),
        "no loop device left"
    );
    let volumes = cairn_types::layout::volumes_dir(&h.persist);
    let leftovers: Vec<_> = std::fs::read_dir(&volumes)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".rollback"))
        .collect();
    assert!(leftovers.is_empty(), "dropped layer swept: {leftovers:?}");
}

/// A directory of links to every command on the usual PATH except `without`.
fn path_without(dir: &Path, without: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for from in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        let Ok(entries) = std::fs::read_dir(from) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if without.contains(&name.to_str().unwrap_or_default()) || bin.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), bin.join(&name));
        }
    }
    bin
}

/// The real binary started with a PATH lacking rsync and mksquashfs: volumes asking for those
/// modes fail when they are made, naming the mode, the command and the Debian package; the
/// others are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_whose_tool_is_missing_fails_at_volume_creation_naming_the_package() {
    let mut h = Harness::new().await;
    let bin = path_without(h.root.path(), &["rsync", "mksquashfs", "unsquashfs"]);
    let child = Command::new(env!("CARGO_BIN_EXE_cairn-volume-manager"))
        .env("CAIRN_PERSIST_DIR", &h.persist)
        .env("CAIRN_RUN_DIR", &h.run)
        .env("PATH", &bin)
        .env_remove("CAIRN_CRASH_AT")
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    let _agent = Agent { child };
    let (sq, rs, plain) = (
        dir_volume(DirRestoreMode::SquashfsOverlay),
        dir_volume(DirRestoreMode::Rsync),
        dir_volume(DirRestoreMode::Auto),
    );
    for v in [&sq, &rs, &plain] {
        h.volume_configs.publish(v.clone()).await.unwrap();
    }
    let s = h.ready(&sq).await;
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    for part in [
        sq.key().as_str(),
        "restore mode squashfs_overlay",
        "mksquashfs",
        "install the Debian package squashfs-tools",
    ] {
        assert!(
            s.error.error.contains(part),
            "{part:?} in {:?}",
            s.error.error
        );
    }
    assert!(!h.volume_file(&sq).exists(), "nothing made");
    let s = h.ready(&rs).await;
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    for part in [
        rs.key().as_str(),
        "restore mode rsync",
        "rsync is not usable",
        "install the Debian package rsync",
    ] {
        assert!(
            s.error.error.contains(part),
            "{part:?} in {:?}",
            s.error.error
        );
    }
    let s = h.ready(&plain).await;
    assert_eq!(
        s.state,
        VolumeState::Ready,
        "other modes keep working: {s:?}"
    );
}

#[tokio::test]
async fn btrfs_swap_without_btrfs_progs_or_off_btrfs_fails_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let mut tools = Tools::detect().await;
    let mut m = open(dir.path(), tools.clone(), Vec::new()).await;
    let a = dir_volume(DirRestoreMode::BtrfsSwap);
    let s = volume_of(&m.handle_volume_config(a.clone()).await);
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    assert!(
        s.error.error.contains("restore mode btrfs_swap")
            && s.error.error.contains("on btrfs, and it is on ext2/3/4"),
        "{s:?}"
    );

    tools.set(
        SnapshotBackendKind::Btrfs,
        Tool::missing("btrfs", "btrfs-progs"),
    );
    let mut m = open(&dir.path().join("other"), tools, Vec::new()).await;
    let b = dir_volume(DirRestoreMode::BtrfsSwap);
    let s = volume_of(&m.handle_volume_config(b.clone()).await);
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    assert!(
        s.error.error.contains(&b.key())
            && s.error.error.contains("restore mode btrfs_swap")
            && s.error
                .error
                .contains("install the Debian package btrfs-progs"),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_restore_mode_on_an_image_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), Tools::detect().await, Vec::new()).await;
    let a = VolumeConfig {
        restore_mode: DirRestoreMode::Rsync,
        ..volume(VolumeFormat::Qcow2, 16 * MIB)
    };
    let s = volume_of(&m.handle_volume_config(a).await);
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    assert!(
        s.error.error.contains("applies to directory volumes only"),
        "{s:?}"
    );
}

fn clone_of(source: &VolumeConfig, snapshot: Uuid, mode: DirRestoreMode) -> VolumeConfig {
    VolumeConfig {
        volume_id: Uuid::new_v4(),
        origin: cairn_types::volume::VolumeOrigin::Snapshot {
            snapshot,
            volume: source.volume_id,
        },
        restore_mode: mode,
        ..source.clone()
    }
}

/// A clone of a squashfs snapshot (unpacked) in rsync mode, and a clone of that one's rsync
/// snapshot in squashfs mode (its content becomes the overlay's upper layer).
#[tokio::test]
async fn clones_across_modes_hold_the_snapshot_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = open(dir.path(), Tools::detect().await, Vec::new()).await;
    let a = dir_volume(DirRestoreMode::SquashfsOverlay);
    let path = volume_of(&m.handle_volume_config(a.clone()).await).file_location;
    populate(&path);
    let tree = manifest(&path);
    let tree_without_owners = manifest_with(&path, false);
    let s = Uuid::new_v4();
    act(&mut m, s, Create, &a, 1).await;
    change(&path);

    let b = clone_of(&a, s, DirRestoreMode::Rsync);
    let status = volume_of(&m.handle_volume_config(b.clone()).await);
    assert_eq!(
        (status.state, status.backend),
        (VolumeState::Ready, SnapshotBackendKind::Rsync),
        "{status:?}"
    );
    assert_eq!(
        manifest(&status.file_location),
        tree,
        "unpacked from the image"
    );

    let t = Uuid::new_v4();
    act(&mut m, t, Create, &b, 1).await;
    let c = clone_of(&b, t, DirRestoreMode::SquashfsOverlay);
    let status = volume_of(&m.handle_volume_config(c.clone()).await);
    assert_eq!(
        (status.state, status.backend),
        (VolumeState::Ready, SnapshotBackendKind::Squashfs),
        "{status:?}"
    );
    let c_path = status.file_location;
    assert_eq!(squashfs::mounted_type(&c_path).as_deref(), Some("overlay"));
    // The clone copies trees without owners (copy::copy_contents).
    assert_eq!(manifest_with(&c_path, false), tree_without_owners);

    for (snap, v) in [(s, &a), (t, &b)] {
        act(&mut m, snap, Delete, v, 9).await;
    }
    for v in [&a, &b, &c] {
        m.handle_volume_config_delete(&v.key()).await;
    }
    assert!(mounts_under(dir.path()).is_empty(), "no mount left");
    assert!(
        loop_devices_under(dir.path()).is_empty(),
        "no loop device left"
    );
}

/// A snapshot does not keep its volume (the image or copy is a tree of its own): the volume is
/// released when its config goes, and a rollback makes it again at its old place, Ready.
#[tokio::test]
async fn a_rollback_remakes_a_released_squashfs_or_rsync_volume() {
    for (mode, kind) in [
        (
            DirRestoreMode::SquashfsOverlay,
            SnapshotBackendKind::Squashfs,
        ),
        (DirRestoreMode::Rsync, SnapshotBackendKind::Rsync),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut m = open(dir.path(), Tools::detect().await, Vec::new()).await;
        let a = dir_volume(mode);
        let path = volume_of(&m.handle_volume_config(a.clone()).await).file_location;
        populate(&path);
        let tree = manifest(&path);
        let s = Uuid::new_v4();
        act(&mut m, s, Create, &a, 1).await;
        let out = m.handle_volume_config_delete(&a.key()).await;
        assert!(
            out.contains(&Publish::UnpublishVolume(a.key())),
            "{mode:?}: {out:?}"
        );
        assert!(!path.exists(), "{mode:?}: released");
        let out = m
            .handle_snapshot_config(request(s, Rollback, &[&a], 2))
            .await;
        let status = volume_of(&out);
        assert_eq!(
            (status.state, status.backend),
            (VolumeState::Ready, kind),
            "{status:?}"
        );
        assert!(!snapshot_of(&out).error.is_error(), "{out:?}");
        assert_eq!(manifest(&path), tree, "{mode:?}: made again");
        act(&mut m, s, Delete, &a, 3).await;
        m.handle_volume_config_delete(&a.key()).await;
        assert!(
            mounts_under(dir.path()).is_empty(),
            "{mode:?}: no mount left"
        );
        assert!(loop_devices_under(dir.path()).is_empty());
    }
}

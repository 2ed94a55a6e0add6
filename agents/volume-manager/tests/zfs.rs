//! The ZFS backend against zfs-fuse (userspace ZFS; kernel ZFS cannot load here), through the zfs
//! CLI driver: zfs-fuse has no /dev/zfs, so the libzetta driver is not chosen (its choice and
//! its failure without /dev/zfs are unit-tested in `backend::zfs`). Built only with
//! `--features zfs` (which needs libzfslinux-dev: `agents/volume-manager/install-zfs-deps`);
//! needs root, /dev/fuse and the zfs-fuse package.
#![cfg(feature = "zfs")]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::volume::{SnapshotBackendKind, VolumeFormat, VolumeState};
use cairn_volume_manager::backend::zfs;
use cairn_volume_manager::{Publish, Tools, VolumeManager};
use common::*;
use uuid::Uuid;

/// A zfs-fuse daemon of our own (unless one already runs) and a file-backed pool.
struct Pool {
    name: String,
    daemon: Option<std::process::Child>,
}

impl Pool {
    fn new(image: &std::path::Path, mount: &std::path::Path) -> Self {
        let running = Command::new("zpool")
            .arg("list")
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let daemon = (!running).then(|| {
            let child = Command::new("zfs-fuse")
                .arg("--no-daemon")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("zfs-fuse is required (Debian package zfs-fuse)");
            let start = Instant::now();
            while !Command::new("zpool")
                .arg("list")
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "zfs-fuse did not come up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            child
        });
        let name = format!("cairn{}", &Uuid::new_v4().simple().to_string()[..8]);
        sh("truncate", &["-s", "128M", image.to_str().unwrap()]);
        sh(
            "zpool",
            &[
                "create",
                "-m",
                mount.to_str().unwrap(),
                &name,
                image.to_str().unwrap(),
            ],
        );
        Self { name, daemon }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = Command::new("zpool")
            .args(["destroy", "-f", &self.name])
            .status();
        if let Some(child) = &mut self.daemon {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn zfs_dataset_volumes_snapshot_roll_back_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("persist");
    let volumes = cairn_types::layout::volumes_dir(&persist);
    std::fs::create_dir_all(&volumes).unwrap();
    let pool = Pool::new(&dir.path().join("pool.img"), &dir.path().join("pool"));
    let tools = Tools::detect().await;
    assert!(
        tools.usable(SnapshotBackendKind::Zfs).is_ok(),
        "{:?}",
        tools.usable(SnapshotBackendKind::Zfs)
    );
    let mut m = VolumeManager::open(&persist, tools, Vec::new()).await;
    immediate_deletion(&mut m).await;
    let a = volume(VolumeFormat::Dir, 0);
    let path = cairn_volume_manager::volumes::volume_path(&volumes, &a);
    // The dataset serving the volume, mounted where the volume lives.
    sh(
        "zfs",
        &[
            "create",
            "-o",
            &format!("mountpoint={}", path.display()),
            &format!("{}/v1", pool.name),
        ],
    );
    let out = m.handle_volume_config(a.clone()).await;
    let Some(Publish::Volume(status)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(
        (status.state, status.backend),
        (VolumeState::Ready, SnapshotBackendKind::Zfs),
        "{status:?}"
    );
    std::fs::write(path.join("f"), b"before").unwrap();
    let id = Uuid::new_v4();
    let snapshot = |out: Vec<Publish>| match out.into_iter().next() {
        Some(Publish::Snapshot(s)) => s,
        other => panic!("{other:?}"),
    };
    let s = snapshot(
        m.handle_snapshot_config(request(id, Create, &[&a], 1))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let listed = sh("zfs", &["list", "-H", "-t", "snapshot", "-o", "name"]);
    assert!(
        listed.contains(&format!("{}/v1@{id}", pool.name)),
        "{listed}"
    );
    std::fs::write(path.join("f"), b"after").unwrap();
    let s = snapshot(
        m.handle_snapshot_config(request(id, Rollback, &[&a], 2))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    assert_eq!(std::fs::read(path.join("f")).unwrap(), b"before");
    let s = snapshot(
        m.handle_snapshot_config(request(id, Delete, &[&a], 3))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let listed = sh("zfs", &["list", "-H", "-t", "snapshot", "-o", "name"]);
    assert!(!listed.contains(&id.to_string()), "{listed}");

    // Without /dev/zfs (zfs-fuse), the process's driver is the CLI, and says why.
    if std::env::var_os(zfs::DRIVER_ENV).is_none() {
        let driver = zfs::driver().as_ref().unwrap();
        assert_eq!(
            (driver.label(), zfs::driver_label()),
            ("zfs (cli)", "zfs (cli)")
        );
        assert!(
            driver.reason().contains(zfs::DEV_ZFS),
            "{}",
            driver.reason()
        );
    }

    // Rolling back past a later snapshot removes it (`zfs rollback -r`; the libzetta driver
    // does the same by destroying the snapshots listed after the target). libzetta lists with
    // `zfs list -t snapshot -o name -Hr`, which must give creation order, not name order.
    let (older, newer) = (Uuid::new_v4(), Uuid::new_v4());
    let (first, second) = if older < newer {
        (newer, older)
    } else {
        (older, newer)
    };
    for (i, sid) in [first, second].into_iter().enumerate() {
        let s = snapshot(
            m.handle_snapshot_config(request(sid, Create, &[&a], 10 + i as u64))
                .await,
        );
        assert!(!s.error.is_error(), "{s:?}");
    }
    let dataset = format!("{}/v1", pool.name);
    let listed = sh(
        "zfs",
        &["list", "-t", "snapshot", "-o", "name", "-Hr", &dataset],
    );
    assert_eq!(
        zfs::libzetta_later_snapshots(&listed, &dataset, &format!("{dataset}@{first}")),
        [format!("{dataset}@{second}")],
        "{listed}"
    );
    let s = snapshot(
        m.handle_snapshot_config(request(first, Rollback, &[&a], 12))
            .await,
    );
    assert!(!s.error.is_error(), "{s:?}");
    let listed = sh("zfs", &["list", "-H", "-t", "snapshot", "-o", "name"]);
    assert!(listed.contains(&first.to_string()), "{listed}");
    assert!(!listed.contains(&second.to_string()), "{listed}");
}

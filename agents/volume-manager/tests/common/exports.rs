//! Export fixtures shared by the export tests: `cairn`'s side of the bus, volumes with data,
//! snapshots.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_types::export::{ExportAction, ExportConfig, ExportState, ExportStatus};
use cairn_types::snapshot::VolumesSnapshotAction;
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use uuid::Uuid;

use super::*;

/// Plays `cairn`: publishes export requests, follows their statuses.
pub struct Cli {
    pub configs: Publication<ExportConfig>,
    pub statuses: Subscription<ExportStatus>,
}

impl Cli {
    pub async fn new(h: &Harness) -> Self {
        let bus = Bus::new("cli", &h.run, &h.persist);
        let configs = bus.publish(PublishOptions::default()).await.unwrap();
        configs.signal_restarted().await.unwrap();
        Self {
            configs,
            statuses: Bus::new("test-cli", &h.run, &h.persist).subscribe("volume-manager"),
        }
    }

    pub async fn start(
        &mut self,
        action: ExportAction,
        snapshot: Uuid,
        target: &Path,
        incremental: bool,
    ) -> ExportConfig {
        let config = ExportConfig {
            job_id: Uuid::new_v4(),
            action,
            snapshot_id: snapshot,
            target_dir: target.to_path_buf(),
            incremental,
            ..ExportConfig::default()
        };
        self.configs.publish(config.clone()).await.unwrap();
        config
    }

    /// An export of `snapshot` to `remote` under `prefix`.
    pub async fn start_remote(
        &mut self,
        snapshot: Uuid,
        remote: &str,
        prefix: &str,
        incremental: bool,
    ) -> ExportConfig {
        let config = ExportConfig {
            job_id: Uuid::new_v4(),
            action: ExportAction::Export,
            snapshot_id: snapshot,
            remote: remote.into(),
            remote_prefix: prefix.into(),
            incremental,
            ..ExportConfig::default()
        };
        self.configs.publish(config.clone()).await.unwrap();
        config
    }

    pub async fn wait(&mut self, job: Uuid, pred: impl Fn(&ExportStatus) -> bool) -> ExportStatus {
        let key = job.to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.statuses.get(&key)
                && pred(s)
            {
                return s.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "job {job}: no matching status; last {:?}",
                self.statuses.get(&key)
            );
            let _ = tokio::time::timeout(left, self.statuses.recv()).await;
        }
    }

    pub async fn run(
        &mut self,
        action: ExportAction,
        snapshot: Uuid,
        target: &Path,
        incremental: bool,
    ) -> ExportStatus {
        let config = self.start(action, snapshot, target, incremental).await;
        self.wait(config.job_id, |s| s.state != ExportState::Running)
            .await
    }
}

/// A qcow2 volume of `virtual_mib` holding `data_mib` of random data at offset 0.
pub async fn volume_with_data(
    h: &mut Harness,
    virtual_mib: u64,
    data_mib: u64,
) -> (VolumeConfig, PathBuf) {
    let config = volume(VolumeFormat::Qcow2, virtual_mib * MIB);
    h.volume_configs.publish(config.clone()).await.unwrap();
    h.ready(&config).await;
    let file = h.volume_file(&config);
    let random = h.root.path().join("random.bin");
    sh(
        "sh",
        &[
            "-c",
            &format!("head -c {}M /dev/urandom > {}", data_mib, random.display()),
        ],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} 0 {}M", random.display(), data_mib),
            file.to_str().unwrap(),
        ],
    );
    (config, file)
}

pub async fn snapshot(h: &mut Harness, config: &VolumeConfig, counter: u64) -> Uuid {
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(
            id,
            VolumesSnapshotAction::Create,
            &[config],
            counter,
        ))
        .await
        .unwrap();
    let status = h.answer(id, VolumesSnapshotAction::Create, counter).await;
    assert!(!status.error.is_error(), "{:?}", status.error);
    id
}

/// Asserts that `image` holds exactly what snapshot `tag` of the qcow2 `file` held: the
/// snapshot converted to a plain image, then `qemu-img compare`.
pub fn assert_same_as_snapshot(h: &Harness, image: &Path, file: &Path, tag: Uuid) {
    let expected = h.root.path().join("expected.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "qcow2",
            "-l",
            &format!("snapshot.name={tag}"),
            file.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    let compare = sh(
        "qemu-img",
        &[
            "compare",
            image.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");
}

/// Fills the directory `root` with what a tree export must carry: owners, modes (setuid, a
/// 0700 directory), nanosecond mtimes, a relative and a dangling symlink, a hard link, xattrs on
/// a file, a directory and the root, a 120-character name, a FIFO, an empty file.
pub fn populate_tree(root: &Path) {
    use std::os::unix::fs::{PermissionsExt, chown, lchown, symlink};
    let deep = root.join("etc/deep/er");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(root.join("etc/app.conf"), b"key=value\n").unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("data.bin"), &data).unwrap();
    std::fs::write(deep.join("a".repeat(120)), b"long name").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::hard_link(root.join("data.bin"), deep.join("hard")).unwrap();
    symlink("../data.bin", root.join("etc/link")).unwrap();
    symlink("/nowhere/dangling", root.join("dangling")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    mode(&root.join("etc/app.conf"), 0o640);
    mode(&root.join("data.bin"), 0o4755);
    mode(&root.join("etc/deep"), 0o700);
    mode(root, 0o751);
    chown(root.join("etc/app.conf"), Some(1234), Some(5678)).unwrap();
    chown(root.join("etc/deep"), Some(42), Some(43)).unwrap();
    lchown(root.join("etc/link"), Some(4321), Some(8765)).unwrap();
    xattr::set(root.join("etc/app.conf"), "user.cairn.origin", b"device-a").unwrap();
    xattr::set(root.join("etc"), "user.cairn.dir", b"\x00binary\xff").unwrap();
    xattr::set(root, "user.cairn.root", b"r").unwrap();
    // Nanosecond mtimes, children before their directories.
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths);
    for (i, rel) in paths.iter().rev().enumerate() {
        let time = nix::sys::time::TimeSpec::new(1_600_000_000 + i as i64, 123_456_789);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join(rel),
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

/// Every path under `root` (relative, the root as ""), parents first, sorted.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    out.push(rel.to_path_buf());
    let path = root.join(rel);
    if std::fs::symlink_metadata(&path).unwrap().is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            walk(root, &rel.join(name), out);
        }
    }
}

/// The tree comparison: per path, its type, mode, owner, mtime (ns), content (sha256),
/// symlink target, xattrs and hard-link group (the first path of its inode).
pub fn tree_listing(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths);
    let mut first_of_inode: std::collections::HashMap<u64, String> = Default::default();
    let mut out = std::collections::BTreeMap::new();
    for rel in paths {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let kind = meta.file_type();
        let name = rel.display().to_string();
        let what = if kind.is_dir() {
            "dir".to_string()
        } else if kind.is_symlink() {
            format!(
                "symlink -> {}",
                std::fs::read_link(&path).unwrap().display()
            )
        } else if kind.is_fifo() {
            "fifo".to_string()
        } else {
            let sha = sha2::Sha256::digest(std::fs::read(&path).unwrap());
            format!("file {} bytes sha256 {sha:x}", meta.len())
        };
        let link = if !kind.is_dir() && meta.nlink() > 1 {
            let first = first_of_inode
                .entry(meta.ino())
                .or_insert_with(|| name.clone());
            format!(" hardlink-of {first}")
        } else {
            String::new()
        };
        let mut xattrs: Vec<String> = xattr::list(&path)
            .unwrap()
            .map(|n| {
                let value = xattr::get(&path, &n).unwrap().unwrap_or_default();
                format!("{}={value:?}", n.to_string_lossy())
            })
            .collect();
        xattrs.sort();
        out.insert(
            name,
            format!(
                "{what} mode {:o} owner {}:{} mtime {}.{:09} xattrs {xattrs:?}{link}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec()
            ),
        );
    }
    out
}

/// A directory volume holding [`populate_tree`]'s tree, and its snapshot. Restore mode rsync:
/// its snapshots (`rsync -aHX --numeric-ids`) keep owners, hard links, xattrs and FIFOs, which
/// the copy backend's do not.
pub async fn tree_volume_snapshot(h: &mut Harness) -> (VolumeConfig, Uuid) {
    let mut config = volume(VolumeFormat::Dir, 64 * MIB);
    config.restore_mode = cairn_types::volume::DirRestoreMode::Rsync;
    h.volume_configs.publish(config.clone()).await.unwrap();
    let status = h.ready(&config).await;
    assert_eq!(
        status.state,
        cairn_types::volume::VolumeState::Ready,
        "{:?}",
        status.error
    );
    populate_tree(&h.volume_file(&config));
    let id = snapshot(h, &config, 1).await;
    (config, id)
}

/// Asserts the tree at `restored` is the tree of snapshot `id` of `config` (its snapshot
/// directory, as exported), and that it carries what [`populate_tree`] put there.
pub fn assert_same_tree(h: &Harness, config: &VolumeConfig, id: Uuid, restored: &Path) {
    let record = h.record(id).unwrap();
    let meta = record.meta_of(config.volume_id).unwrap();
    let expected = tree_listing(&meta.snapshot_location);
    let got = tree_listing(restored);
    for (path, line) in &expected {
        assert_eq!(got.get(path), Some(line), "{path}");
    }
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    // The snapshot itself kept what was made (else the comparison proves little).
    assert!(
        expected["etc/deep/er/hard"].contains("hardlink-of data.bin"),
        "{expected:#?}"
    );
    assert!(
        expected["etc/app.conf"].contains("user.cairn.origin"),
        "{expected:#?}"
    );
    assert!(
        expected["etc/app.conf"].contains("owner 1234:5678"),
        "{expected:#?}"
    );
    assert!(
        expected["data.bin"].contains("mode 104755"),
        "{expected:#?}"
    );
    assert!(expected[""].contains("user.cairn.root"), "{expected:#?}");
}

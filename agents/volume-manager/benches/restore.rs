//! Fast restore modes for directory volumes on the same 1 GiB tree (4096 files of 256 KiB of
//! random content in 16 directories, generated once): btrfs swap (on a btrfs loop device),
//! squashfs + overlayfs, rsync, and the copy backend as the baseline. For each: snapshot, then
//! rewrite 10% of the files, then restore; prints snapshot and restore times (the restore also
//! with the volume's filesystem synced after it) and the ratio against copy, measured in this
//! run. Page cache is warm (the tree was just written). Never fails on timing.
//! Run: `cargo bench -p cairn-volume-manager --bench restore` (as root).
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_types::volume::VolumeSnapshotMeta;
use cairn_volume_manager::backend::{
    SnapshotBackend, VolumeRef, btrfs::BtrfsBackend, copy::CopyBackend, rsync::RsyncBackend,
    squashfs::SquashfsBackend,
};
use common::*;

const FILES: usize = 4096;
const FILE_SIZE: usize = 256 << 10;
const DIRS: usize = 16;
/// Every tenth file is rewritten before the restore.
const CHANGE_EVERY: usize = 10;

/// xorshift64*: fast, deterministic, incompressible enough for squashfs and zstd.
fn fill(buf: &mut [u8], seed: u64) {
    // Distinct seeds give distinct files (squashfs would store duplicates once).
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn file_path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("d{:02}", i % DIRS))
        .join(format!("f{i:04}.bin"))
}

fn generate(root: &Path) {
    let mut buf = vec![0u8; FILE_SIZE];
    for d in 0..DIRS {
        std::fs::create_dir_all(root.join(format!("d{d:02}"))).unwrap();
    }
    std::fs::create_dir_all(root.join("d00/nested/deeper")).unwrap();
    std::fs::write(root.join("d00/nested/deeper/config"), b"k = v\n").unwrap();
    for i in 0..FILES {
        fill(&mut buf, i as u64 + 1);
        std::fs::write(file_path(root, i), &buf).unwrap();
    }
}

/// Rewrites 10% of the files with other random content (`round` makes it differ each time).
fn change(root: &Path, round: u64) -> usize {
    let mut buf = vec![0u8; FILE_SIZE];
    let mut n = 0;
    for i in (0..FILES).step_by(CHANGE_EVERY) {
        fill(&mut buf, (round << 32) + i as u64);
        std::fs::write(file_path(root, i), &buf).unwrap();
        n += 1;
    }
    n
}

/// The changed files read back as the original content.
fn verify(root: &Path) {
    let mut want = vec![0u8; FILE_SIZE];
    for i in (0..FILES).step_by(CHANGE_EVERY) {
        fill(&mut want, i as u64 + 1);
        assert!(
            std::fs::read(file_path(root, i)).unwrap() == want,
            "file {i} not restored"
        );
    }
    assert!(root.join("d00/nested/deeper/config").exists());
}

fn syncfs(path: &Path) {
    sh("sync", &["-f", path.to_str().unwrap()]);
}

struct Figures {
    mode: &'static str,
    populate: Duration,
    snapshot: Duration,
    /// First restore after the snapshot (for squashfs the upper layer still holds the whole
    /// tree written before the snapshot).
    first: Duration,
    first_synced: Duration,
    /// A second restore, after another 10% changed (the steady state).
    again: Duration,
    again_synced: Duration,
    snapshot_bytes: u64,
}

/// Fills the volume from `source`, snapshots it, changes 10%, restores; cleans up after.
async fn measure<B: SnapshotBackend>(
    mode: &'static str,
    backend: B,
    volume: VolumeRef,
    source: &Path,
) -> Figures {
    let start = Instant::now();
    sh(
        "cp",
        &[
            "-a",
            &format!("{}/.", source.display()),
            volume.path.to_str().unwrap(),
        ],
    );
    syncfs(&volume.path);
    let populate = start.elapsed();

    let start = Instant::now();
    let meta: VolumeSnapshotMeta = backend.create(&volume, "s1", true).await.unwrap();
    syncfs(&volume.path);
    let snapshot = start.elapsed();
    let snapshot_bytes = if meta.snapshot_location.is_file() {
        std::fs::metadata(&meta.snapshot_location).unwrap().len()
    } else {
        cairn_volume_manager::volumes::allocated_size(&meta.snapshot_location)
    };

    let mut times = Vec::new();
    for round in 1..=2 {
        let changed = change(&volume.path, round);
        assert_eq!(changed, FILES.div_ceil(CHANGE_EVERY));
        syncfs(&volume.path);
        let start = Instant::now();
        backend.rollback(&meta).await.unwrap();
        let restore = start.elapsed();
        syncfs(&volume.path);
        times.push((restore, start.elapsed()));
        verify(&volume.path);
    }

    backend.delete(&meta).await.unwrap();
    cairn_volume_manager::volumes::remove(&volume.key, &volume.path)
        .await
        .unwrap();
    Figures {
        mode,
        populate,
        snapshot,
        first: times[0].0,
        first_synced: times[0].1,
        again: times[1].0,
        again_synced: times[1].1,
        snapshot_bytes,
    }
}

fn vref(volumes: &Path, key: &str) -> VolumeRef {
    VolumeRef {
        key: key.to_string(),
        path: volumes.join(key),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("source");
    let t = Instant::now();
    generate(&source);
    syncfs(&source);
    println!(
        "tree: {FILES} files x {} KiB in {DIRS} directories = {} MiB, generated in {:.1} s; {}% of the files rewritten before each restore",
        FILE_SIZE >> 10,
        (FILES * FILE_SIZE) >> 20,
        t.elapsed().as_secs_f64(),
        100 / CHANGE_EVERY
    );
    let mut all = Vec::new();

    // Baseline first: the existing copy backend on ext4 (no reflink there).
    let plain = root.path().join("volumes");
    std::fs::create_dir_all(&plain).unwrap();
    let v = vref(&plain, "copy#0");
    std::fs::create_dir(&v.path).unwrap();
    all.push(measure("copy (baseline)", CopyBackend, v, &source).await);

    let v = vref(&plain, "rsync#0");
    std::fs::create_dir(&v.path).unwrap();
    all.push(measure("rsync", RsyncBackend, v, &source).await);

    let v = vref(&plain, "squashfs#0");
    cairn_volume_manager::backend::squashfs::activate(&v.key, &v.path)
        .await
        .unwrap();
    all.push(measure("squashfs+overlay", SquashfsBackend, v, &source).await);

    let btrfs_root = root.path().join("btrfs");
    {
        let _fs = LoopFs::new("btrfs", &btrfs_root, 4096);
        let v = vref(&btrfs_root, "btrfs#0");
        cairn_volume_manager::backend::btrfs::create_subvolume(&v.key, &v.path)
            .await
            .unwrap();
        all.push(measure("btrfs swap", BtrfsBackend, v, &source).await);
    }

    let (base1, base2) = (
        all[0].first_synced.as_secs_f64(),
        all[0].again_synced.as_secs_f64(),
    );
    println!(
        "{:<17} {:>8} {:>9} {:>9} | {:>9} {:>10} {:>8} | {:>9} {:>10} {:>8}",
        "mode",
        "fill ms",
        "snap ms",
        "snap MiB",
        "1st rest",
        "1st +sync",
        "vs copy",
        "2nd rest",
        "2nd +sync",
        "vs copy"
    );
    for f in &all {
        println!(
            "{:<17} {:>8.0} {:>9.1} {:>9.0} | {:>9.1} {:>10.1} {:>7.3}x | {:>9.1} {:>10.1} {:>7.3}x",
            f.mode,
            ms(f.populate),
            ms(f.snapshot),
            f.snapshot_bytes as f64 / (1 << 20) as f64,
            ms(f.first),
            ms(f.first_synced),
            f.first_synced.as_secs_f64() / base1,
            ms(f.again),
            ms(f.again_synced),
            f.again_synced.as_secs_f64() / base2,
        );
    }
    println!(
        "times in ms; 1st = first restore after the snapshot, 2nd = restore after another 10% changed; \
         +sync = until the volume's filesystem is synced; vs copy = +sync time / copy's in this run"
    );
}

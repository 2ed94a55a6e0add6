//! Operations on different apps, through the real volume-manager binary over the bus. Prints, in
//! one run:
//! (a) head-of-line: an immediate snapshot of a small app (one qcow2 volume) while another app's
//!     1 GiB directory volume (4,096 files of 256 KiB) is being snapshotted or restored, in copy
//!     and rsync modes, against the same small snapshot alone; beside each, a raw `qemu-img
//!     snapshot -c` on the same file right after it (what the disk allows at that moment);
//! (b) parallel apps: 8 apps with one qcow2 volume each (256 MiB written) snapshotted at one
//!     moment, against the same eight one after another through the agent, and against eight raw
//!     `qemu-img snapshot -c` run in parallel by a shell (and one after another).
//!
//! Medians; never fails on timing. Disk: about 3 GiB under a temporary directory in /tmp,
//! removed at the end. Run (as root; debug build, like the tests):
//! `cargo bench -p cairn-volume-manager --bench concurrency --profile dev`
//! (`CAIRN_BENCH_ONLY=hol` or `=parallel` runs one part; `CAIRN_BENCH_VOLUME_MANAGER=<binary>`
//! measures another build of the agent).
#![allow(clippy::disallowed_methods)] // bench code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::volume::{DirRestoreMode, SnapshotBackendKind, VolumeConfig, VolumeFormat};
use common::*;
use uuid::Uuid;

/// The large app's tree: 1 GiB.
const FILES: usize = 4096;
const FILE_SIZE: usize = 256 << 10;
const DIRS: usize = 16;
/// Small snapshots measured alone, and at most per large operation (one after another while
/// it runs).
const QUICK_RUNS: usize = 5;
/// Large operations per mode (each one is seconds of copying).
const SLOW_RUNS: usize = 3;
const APPS: usize = 8;
const WRITTEN: u64 = 256 * MIB;
const PARALLEL_ROUNDS: usize = 9;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// xorshift64*: distinct incompressible files (as the restore bench's tree).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn generate(root: &Path) {
    let mut buf = vec![0u8; FILE_SIZE];
    for d in 0..DIRS {
        std::fs::create_dir_all(root.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..FILES {
        fill(&mut buf, i as u64 + 1);
        std::fs::write(root.join(format!("d{:02}/f{i:04}.bin", i % DIRS)), &buf).unwrap();
    }
}

/// The agent measured: this build's, or the binary `CAIRN_BENCH_VOLUME_MANAGER` names.
fn start_agent(h: &Harness) -> Agent {
    match std::env::var_os("CAIRN_BENCH_VOLUME_MANAGER") {
        None => h.agent(None),
        Some(binary) => Agent {
            child: std::process::Command::new(binary)
                .env("CAIRN_PERSIST_DIR", &h.persist)
                .env("CAIRN_RUN_DIR", &h.run)
                .env_remove("CAIRN_CRASH_AT")
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap(),
        },
    }
}

fn settle() {
    sh("sync", &[]);
}

/// Publishes `action` of `id` on `vols` and waits for its answer; the time it took.
async fn op(
    h: &mut Harness,
    id: Uuid,
    action: cairn_types::snapshot::VolumesSnapshotAction,
    vols: &[&VolumeConfig],
    counter: u64,
) -> Duration {
    let start = Instant::now();
    h.snapshot_configs
        .publish(request(id, action, vols, counter))
        .await
        .unwrap();
    let s = h.answer(id, action, counter).await;
    assert!(!s.error.is_error(), "{s:?}");
    start.elapsed()
}

/// Waits until the intent record of `id` is on disk: the agent is working on it.
async fn in_flight(h: &Harness, id: Uuid) {
    let deadline = Instant::now() + WAIT;
    while !h.record(id).is_some_and(|r| r.is_in_progress()) {
        assert!(Instant::now() < deadline, "snapshot {id}: no intent record");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A snapshot of the small app through the agent, made and deleted, then one by raw
/// `qemu-img snapshot -c` on the same file: the two creates' latencies (the raw one says what
/// the disk itself allows at that moment).
async fn quick_snapshot(h: &mut Harness, small: &VolumeConfig) -> (Duration, Duration) {
    let id = Uuid::new_v4();
    let took = op(h, id, Create, &[small], 1).await;
    op(h, id, Delete, &[small], 2).await;
    h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
    let file = h.volume_file(small);
    let qemu_img = |op: &str| {
        sh(
            "qemu-img",
            &["snapshot", "-f", "qcow2", op, "raw", file.to_str().unwrap()],
        )
    };
    let start = Instant::now();
    qemu_img("-c");
    let raw = start.elapsed();
    qemu_img("-d");
    (took, raw)
}

/// Medians of the agent's and the raw latencies.
fn medians(samples: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    let (agent, raw) = samples.into_iter().unzip();
    (median(agent), median(raw))
}

/// Small snapshots one after another while the large operation `slow` runs (at least one).
async fn during(
    h: &mut Harness,
    small: &VolumeConfig,
    slow: Uuid,
    action: cairn_types::snapshot::VolumesSnapshotAction,
    counter: u64,
) -> Vec<(Duration, Duration)> {
    let mut took = Vec::new();
    loop {
        took.push(quick_snapshot(h, small).await);
        let done = h.snapshot_statuses.get(&slow.to_string()).is_some_and(|s| {
            s.result_of_action == action && s.request_counter == counter && !s.is_in_progress()
        });
        if done || took.len() >= QUICK_RUNS {
            return took;
        }
    }
}

/// Small snapshots through the agent and raw, and the large operation itself.
type Under = ((Duration, Duration), Duration);

struct HeadOfLine {
    alone: (Duration, Duration),
    /// Per mode: during its snapshot, during its restore.
    modes: Vec<(&'static str, Under, Under)>,
}

async fn head_of_line(tree: &Path) -> HeadOfLine {
    let mut h = Harness::new().await;
    // A large volume leaves the config at the end of its mode: removed at once.
    h.set_delete_grace(0).await;
    let _agent = start_agent(&h);
    let small = volume(VolumeFormat::Qcow2, 64 * MIB);
    h.volume_configs.publish(small.clone()).await.unwrap();
    let s = h.ready(&small).await;
    qcow2_write(&s.file_location, 0xaa, 16 * MIB);

    let mut alone = Vec::new();
    for _ in 0..QUICK_RUNS {
        settle();
        alone.push(quick_snapshot(&mut h, &small).await);
    }

    let mut modes = Vec::new();
    for (name, mode, kind) in [
        ("copy", DirRestoreMode::Copy, SnapshotBackendKind::Copy),
        ("rsync", DirRestoreMode::Rsync, SnapshotBackendKind::Rsync),
    ] {
        let large = VolumeConfig {
            restore_mode: mode,
            ..volume(VolumeFormat::Dir, 0)
        };
        h.volume_configs.publish(large.clone()).await.unwrap();
        let s = h.ready(&large).await;
        assert_eq!(s.backend, kind, "{s:?}");
        sh(
            "cp",
            &[
                "-a",
                &format!("{}/.", tree.display()),
                s.file_location.to_str().unwrap(),
            ],
        );
        let (mut during_snapshot, mut slow_snapshot) = (Vec::new(), Vec::new());
        let (mut during_restore, mut slow_restore) = (Vec::new(), Vec::new());
        for _ in 0..SLOW_RUNS {
            // The large app's snapshot, and the small one's as soon as it is under way.
            settle();
            let slow = Uuid::new_v4();
            let start = Instant::now();
            h.snapshot_configs
                .publish(request(slow, Create, &[&large], 1))
                .await
                .unwrap();
            in_flight(&h, slow).await;
            during_snapshot.extend(during(&mut h, &small, slow, Create, 1).await);
            let s = h.answer(slow, Create, 1).await;
            slow_snapshot.push(start.elapsed());
            assert!(!s.error.is_error(), "{s:?}");

            // Its restore: 10 % of the files changed first.
            for i in (0..FILES).step_by(10) {
                let path = s
                    .volume_snapshot_meta
                    .values()
                    .next()
                    .map(|m| cairn_types::volume::VolumeSnapshotMeta::from_value(m).file_location)
                    .unwrap()
                    .join(format!("d{:02}/f{i:04}.bin", i % DIRS));
                std::fs::write(path, b"changed").unwrap();
            }
            settle();
            let start = Instant::now();
            h.snapshot_configs
                .publish(request(slow, Rollback, &[&large], 2))
                .await
                .unwrap();
            in_flight(&h, slow).await;
            during_restore.extend(during(&mut h, &small, slow, Rollback, 2).await);
            let s = h.answer(slow, Rollback, 2).await;
            slow_restore.push(start.elapsed());
            assert!(!s.error.is_error(), "{s:?}");
            op(&mut h, slow, Delete, &[&large], 3).await;
            h.snapshot_configs
                .unpublish(&slow.to_string())
                .await
                .unwrap();
        }
        h.volume_configs.unpublish(&large.key()).await.unwrap();
        modes.push((
            name,
            (medians(during_snapshot), median(slow_snapshot)),
            (medians(during_restore), median(slow_restore)),
        ));
    }
    HeadOfLine {
        alone: medians(alone),
        modes,
    }
}

struct Parallel {
    agent_parallel: Duration,
    agent_serial: Duration,
    raw_parallel: Duration,
    raw_serial: Duration,
}

/// Eight raw `qemu-img snapshot -c`, by one shell: all at once, or one after another.
fn raw(files: &[PathBuf], parallel: bool) -> Duration {
    let name = Uuid::new_v4().to_string();
    let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let script = |op: &str| {
        let sep = if parallel { "&" } else { ";" };
        format!(
            "for f in {}; do qemu-img snapshot -f qcow2 {op} {name} \"$f\" {sep} done; wait",
            list.join(" ")
        )
    };
    settle();
    let start = Instant::now();
    sh("sh", &["-c", &script("-c")]);
    let took = start.elapsed();
    sh("sh", &["-c", &script("-d")]);
    took
}

async fn parallel_apps() -> Parallel {
    let mut h = Harness::new().await;
    let _agent = start_agent(&h);
    let vols: Vec<VolumeConfig> = (0..APPS)
        .map(|_| volume(VolumeFormat::Qcow2, 512 * MIB))
        .collect();
    let mut files = Vec::new();
    for v in &vols {
        h.volume_configs.publish(v.clone()).await.unwrap();
        let s = h.ready(v).await;
        qcow2_write(&s.file_location, 0xaa, WRITTEN);
        files.push(s.file_location);
    }
    let (mut ap, mut aser, mut rp, mut rser) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PARALLEL_ROUNDS {
        // At one moment: eight requests published back to back, then every answer awaited.
        let ids: Vec<Uuid> = vols.iter().map(|_| Uuid::new_v4()).collect();
        settle();
        let start = Instant::now();
        for (id, v) in ids.iter().zip(&vols) {
            let mut r = request(*id, Create, &[v], 1);
            r.app_uuid = v.volume_id;
            h.snapshot_configs.publish(r).await.unwrap();
        }
        for id in &ids {
            let s = h.answer(*id, Create, 1).await;
            assert!(!s.error.is_error(), "{s:?}");
        }
        ap.push(start.elapsed());
        for (id, v) in ids.iter().zip(&vols) {
            op(&mut h, *id, Delete, &[v], 2).await;
            h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
        }

        let ids: Vec<Uuid> = vols.iter().map(|_| Uuid::new_v4()).collect();
        settle();
        let start = Instant::now();
        for (id, v) in ids.iter().zip(&vols) {
            op(&mut h, *id, Create, &[v], 1).await;
        }
        aser.push(start.elapsed());
        for (id, v) in ids.iter().zip(&vols) {
            op(&mut h, *id, Delete, &[v], 2).await;
            h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
        }

        rp.push(raw(&files, true));
        rser.push(raw(&files, false));
    }
    Parallel {
        agent_parallel: median(ap),
        agent_serial: median(aser),
        raw_parallel: median(rp),
        raw_serial: median(rser),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::var("CAIRN_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "hol" {
        let scratch = tempfile::tempdir().unwrap();
        let tree = scratch.path().join("tree");
        eprintln!("(a) generating the 1 GiB tree…");
        generate(&tree);
        settle();
        let hol = head_of_line(&tree).await;
        drop(scratch);
        println!(
            "(a) head-of-line: small app's snapshot (1 qcow2 volume), median of {QUICK_RUNS} alone / of up to {QUICK_RUNS} during each of {SLOW_RUNS} large operations"
        );
        println!(
            "| situation | small snapshot, agent | ratio to alone | raw qemu-img -c, same moment | ratio to alone | the large operation |"
        );
        println!("|---|---|---|---|---|---|");
        let (alone, alone_raw) = hol.alone;
        let row = |what: String, ((agent, raw), large): Under| {
            println!(
                "| {what} | {} | {:.2}x | {} | {:.2}x | {} |",
                ms(agent),
                agent.as_secs_f64() / alone.as_secs_f64(),
                ms(raw),
                raw.as_secs_f64() / alone_raw.as_secs_f64(),
                if large.is_zero() {
                    String::new()
                } else {
                    ms(large)
                }
            )
        };
        row("alone".into(), (hol.alone, Duration::ZERO));
        for (mode, snapshot, restore) in hol.modes {
            row(format!("during a 1 GiB {mode} snapshot"), snapshot);
            row(format!("during a 1 GiB {mode} restore"), restore);
        }
    }
    if only.is_empty() || only == "parallel" {
        let p = parallel_apps().await;
        println!(
            "(b) {APPS} apps, one qcow2 volume each ({} MiB written), median of {PARALLEL_ROUNDS}",
            WRITTEN / MIB
        );
        println!("| how | wall time | ratio to raw parallel |");
        println!("|---|---|---|");
        let ratio = |d: Duration| d.as_secs_f64() / p.raw_parallel.as_secs_f64();
        for (what, d) in [
            ("agent, at one moment", p.agent_parallel),
            ("agent, one after another", p.agent_serial),
            ("raw qemu-img, parallel shell", p.raw_parallel),
            ("raw qemu-img, one after another", p.raw_serial),
        ] {
            println!("| {what} | {} | {:.2}x |", ms(d), ratio(d));
        }
    }
}

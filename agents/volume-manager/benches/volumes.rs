//! Agent overhead: snapshot create / rollback / delete through the real volume-manager binary
//! over the bus (request published → answer received), against the raw tool calls on the same
//! volumes, for an app with 1 and 4 volumes of 512 MiB written each; qcow2 and btrfs.
//! Prints medians; never fails on timing. Run: `cargo bench -p cairn-volume-manager`.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_types::snapshot::VolumesSnapshotAction::{self, Create, Delete, Rollback};
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use common::*;
use uuid::Uuid;

const ROUNDS: usize = 11;
const WRITTEN: u64 = 512 * MIB;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[derive(Default)]
struct Times {
    agent: [Vec<Duration>; 3],
    raw: [Vec<Duration>; 3],
}

impl Times {
    fn print(&self, label: &str) {
        for (i, op) in ["create", "rollback", "delete"].iter().enumerate() {
            let (a, r) = (median(self.agent[i].clone()), median(self.raw[i].clone()));
            let overhead = a.as_secs_f64() - r.as_secs_f64();
            let allowed = r.as_secs_f64() * 0.10 + 0.002;
            println!(
                "{label:<22} {op:<9} agent {:>8.2} ms   raw {:>8.2} ms   overhead {:>+7.2} ms (budget {:>5.2} ms) {}",
                a.as_secs_f64() * 1e3,
                r.as_secs_f64() * 1e3,
                overhead * 1e3,
                allowed * 1e3,
                if overhead <= allowed {
                    "within"
                } else {
                    "OVER"
                }
            );
        }
    }
}

async fn through_agent(h: &mut Harness, vols: &[&VolumeConfig], times: &mut Times) {
    let id = Uuid::new_v4();
    let steps: [(VolumesSnapshotAction, u64); 3] = [(Create, 1), (Rollback, 2), (Delete, 3)];
    for (i, (action, counter)) in steps.into_iter().enumerate() {
        settle();
        let start = Instant::now();
        h.snapshot_configs
            .publish(request(id, action, vols, counter))
            .await
            .unwrap();
        let s = h.answer(id, action, counter).await;
        times.agent[i].push(start.elapsed());
        assert!(!s.error.is_error(), "{s:?}");
    }
    h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
}

/// Flushes dirty data before each timed step, so neither column pays for the other's writeback
/// (the loop device and the records share the host's disk).
fn settle() {
    sh("sync", &[]);
}

fn qemu_img(op: &str, name: &str, file: &Path) {
    sh(
        "qemu-img",
        &["snapshot", "-f", "qcow2", op, name, file.to_str().unwrap()],
    );
}

fn raw_qcow2(files: &[PathBuf], times: &mut Times) {
    let name = Uuid::new_v4().to_string();
    for (i, op) in ["-c", "-a", "-d"].iter().enumerate() {
        settle();
        let start = Instant::now();
        for f in files {
            qemu_img(op, &name, f);
        }
        times.raw[i].push(start.elapsed());
    }
}

fn raw_btrfs(dirs: &[PathBuf], times: &mut Times) {
    let name = Uuid::new_v4().to_string();
    let leaf = |d: &Path| d.file_name().unwrap().to_string_lossy().into_owned();
    let snap = |d: &Path| d.with_file_name(format!(".raw-{}-{name}", leaf(d)));
    let scratch = |d: &Path| d.with_file_name(format!(".raw-scratch-{}-{name}", leaf(d)));
    let start = Instant::now();
    for d in dirs {
        sh(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                d.to_str().unwrap(),
                snap(d).to_str().unwrap(),
            ],
        );
    }
    times.raw[0].push(start.elapsed());
    settle();
    let start = Instant::now();
    for d in dirs {
        sh(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                snap(d).to_str().unwrap(),
                scratch(d).to_str().unwrap(),
            ],
        );
        cairn_volume_manager::backend::exchange(&scratch(d), d).unwrap();
        sh(
            "btrfs",
            &["subvolume", "delete", scratch(d).to_str().unwrap()],
        );
    }
    times.raw[1].push(start.elapsed());
    settle();
    let start = Instant::now();
    for d in dirs {
        sh("btrfs", &["subvolume", "delete", snap(d).to_str().unwrap()]);
    }
    times.raw[2].push(start.elapsed());
}

async fn bench(format: VolumeFormat, count: usize) {
    let mut h = Harness::new().await;
    let _fs = (format == VolumeFormat::Dir).then(|| {
        LoopFs::new(
            "btrfs",
            &cairn_types::layout::volumes_dir(&h.persist),
            3 * 1024,
        )
    });
    let _agent = h.agent(None);
    let vols: Vec<VolumeConfig> = (0..count).map(|_| volume(format, 1024 * MIB)).collect();
    let mut paths = Vec::new();
    for v in &vols {
        h.volume_configs.publish(v.clone()).await.unwrap();
        let s = h.ready(v).await;
        if format == VolumeFormat::Qcow2 {
            qcow2_write(&s.file_location, 0xaa, WRITTEN);
        } else {
            assert_eq!(s.backend, cairn_types::volume::SnapshotBackendKind::Btrfs);
            let data = vec![0xaau8; (WRITTEN) as usize];
            std::fs::write(s.file_location.join("data"), &data).unwrap();
            sh("sync", &[]);
        }
        paths.push(s.file_location);
    }
    let refs: Vec<&VolumeConfig> = vols.iter().collect();
    let mut times = Times::default();
    for round in 0..ROUNDS {
        // Alternate which column goes first.
        if round % 2 == 0 {
            through_agent(&mut h, &refs, &mut times).await;
        }
        if format == VolumeFormat::Qcow2 {
            raw_qcow2(&paths, &mut times);
        } else {
            raw_btrfs(&paths, &mut times);
        }
        if round % 2 == 1 {
            through_agent(&mut h, &refs, &mut times).await;
        }
    }
    let kind = if format == VolumeFormat::Qcow2 {
        "qcow2"
    } else {
        "btrfs"
    };
    times.print(&format!("{kind} x{count} (512 MiB)"));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "volume-manager: median of {ROUNDS} rounds, agent (bus request → answer) vs raw tool calls"
    );
    for format in [VolumeFormat::Qcow2, VolumeFormat::Dir] {
        for count in [1, 4] {
            bench(format, count).await;
        }
    }
}

//! Exports through the real volume-manager binary over the bus (request published → Done
//! received) against raw `qemu-img convert -c -O qcow2 -o compression_type=zstd` of the same
//! snapshot in the same run; incremental export size against the bytes changed; verify speed.
//! Prints figures; never fails on timing. Run: `cargo bench -p cairn-volume-manager --bench export`.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_types::export::{
    ExportAction, ExportConfig, ExportKind, ExportManifest, ExportState, ExportStatus,
    MANIFEST_FILE,
};
use cairn_types::snapshot::VolumesSnapshotAction;
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use common::*;
use uuid::Uuid;

const ROUNDS: usize = 3;
const VIRTUAL: u64 = 1024 * MIB;
/// Random (incompressible) data, then as much repeated text (compressible).
const RANDOM: u64 = 256 * MIB;
const TEXT: u64 = 256 * MIB;

struct Cli {
    configs: Publication<ExportConfig>,
    statuses: Subscription<ExportStatus>,
}

impl Cli {
    async fn run(
        &mut self,
        action: ExportAction,
        snapshot: Uuid,
        target: &Path,
        incremental: bool,
    ) -> ExportStatus {
        let config = ExportConfig {
            job_id: Uuid::new_v4(),
            action,
            snapshot_id: snapshot,
            target_dir: target.to_path_buf(),
            incremental,
            ..ExportConfig::default()
        };
        self.configs.publish(config.clone()).await.unwrap();
        let key = config.job_id.to_string();
        loop {
            if let Some(s) = self.statuses.get(&key)
                && s.state != ExportState::Running
            {
                assert_eq!(s.state, ExportState::Done, "{}", s.error);
                return s.clone();
            }
            let _ = tokio::time::timeout(Duration::from_secs(600), self.statuses.recv()).await;
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn snapshot(h: &mut Harness, config: &VolumeConfig, counter: u64) -> Uuid {
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
    h.answer(id, VolumesSnapshotAction::Create, counter).await;
    id
}

fn exported_file(dir: &Path) -> std::path::PathBuf {
    let m: ExportManifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    dir.join(&m.volumes[0].file)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let bus = Bus::new("cli", &h.run, &h.persist);
    let mut cli = Cli {
        configs: bus.publish(PublishOptions::default()).await.unwrap(),
        statuses: Bus::new("bench", &h.run, &h.persist).subscribe("volume-manager"),
    };
    cli.configs.signal_restarted().await.unwrap();

    let config = volume(VolumeFormat::Qcow2, VIRTUAL);
    h.volume_configs.publish(config.clone()).await.unwrap();
    h.ready(&config).await;
    let file = h.volume_file(&config);
    let data = h.root.path().join("data.bin");
    sh(
        "sh",
        &[
            "-c",
            &format!(
                "head -c {RANDOM} /dev/urandom > {0}; yes 'cairn export benchmark line of text' | head -c {TEXT} >> {0}",
                data.display()
            ),
        ],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} 0 {}", data.display(), RANDOM + TEXT),
            file.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&data).unwrap();
    let first = snapshot(&mut h, &config, 1).await;
    let written = RANDOM + TEXT;

    let mut agent = Vec::new();
    let mut raw = Vec::new();
    let mut raw_synced = Vec::new();
    let mut verify = Vec::new();
    let mut sizes = (0, 0);
    for round in 0..ROUNDS {
        let target = h.root.path().join(format!("agent-{round}"));
        std::fs::create_dir(&target).unwrap();
        sh("sync", &[]);
        let start = Instant::now();
        let done = cli.run(ExportAction::Export, first, &target, false).await;
        agent.push(start.elapsed());
        sizes.0 = std::fs::metadata(exported_file(&done.export_dir))
            .unwrap()
            .len();
        let start = Instant::now();
        cli.run(ExportAction::Verify, Uuid::nil(), &done.export_dir, false)
            .await;
        verify.push(start.elapsed());
        std::fs::remove_dir_all(&target).unwrap();

        let out = h.root.path().join(format!("raw-{round}.qcow2"));
        sh("sync", &[]);
        let start = Instant::now();
        sh(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-f",
                "qcow2",
                "-l",
                &format!("snapshot.name={first}"),
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                file.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        );
        raw.push(start.elapsed());
        sh("sync", &[out.to_str().unwrap()]);
        raw_synced.push(start.elapsed());
        sizes.1 = std::fs::metadata(&out).unwrap().len();
        std::fs::remove_file(&out).unwrap();
    }
    let (a, r, v) = (median(agent), median(raw), median(verify));
    println!(
        "full export of {} MiB written ({} MiB random, {} MiB text) in a {} MiB qcow2 volume, median of {ROUNDS}:",
        written >> 20,
        RANDOM >> 20,
        TEXT >> 20,
        VIRTUAL >> 20
    );
    println!(
        "  agent (bus request → Done, incl. sha256 + fsync)  {:>7.2} s  {:>7.1} MB/s of data written  ({:>7.1} MB/s of virtual size)  file {} MiB",
        a.as_secs_f64(),
        mb_per_s(written, a),
        mb_per_s(VIRTUAL, a),
        sizes.0 >> 20
    );
    println!(
        "  raw qemu-img convert -c zstd                      {:>7.2} s  {:>7.1} MB/s of data written  ({:>7.1} MB/s of virtual size)  file {} MiB",
        r.as_secs_f64(),
        mb_per_s(written, r),
        mb_per_s(VIRTUAL, r),
        sizes.1 >> 20
    );
    let rs = median(raw_synced);
    println!(
        "  raw qemu-img convert -c zstd + fsync of the file  {:>7.2} s  {:>7.1} MB/s of data written",
        rs.as_secs_f64(),
        mb_per_s(written, rs)
    );
    println!(
        "  agent / raw time: {:.2}x (agent / raw+fsync: {:.2}x);  verify of the export: {:.2} s ({:.1} MB/s of file)",
        a.as_secs_f64() / r.as_secs_f64(),
        a.as_secs_f64() / rs.as_secs_f64(),
        v.as_secs_f64(),
        mb_per_s(sizes.0, v)
    );

    // Incremental: changed bytes (random, so the size is not flattered by compression).
    let target = h.root.path().join("chain");
    std::fs::create_dir(&target).unwrap();
    cli.run(ExportAction::Export, first, &target, false).await;
    println!("incremental exports (random data changed after the previous export's snapshot):");
    for (counter, changed_mib) in (2..).zip([8u64, 32, 128]) {
        let changes = h.root.path().join("changes.bin");
        sh(
            "sh",
            &[
                "-c",
                &format!(
                    "head -c {}M /dev/urandom > {}",
                    changed_mib,
                    changes.display()
                ),
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -s {} 64M {changed_mib}M", changes.display()),
                file.to_str().unwrap(),
            ],
        );
        let id = snapshot(&mut h, &config, counter).await;
        let start = Instant::now();
        let done = cli.run(ExportAction::Export, id, &target, true).await;
        let took = start.elapsed();
        let v = &done.volumes[0];
        assert_eq!(v.kind, ExportKind::Incremental, "{}", v.fallback_reason);
        println!(
            "  {changed_mib:>4} MiB changed: carried {:>4} MiB, file {:>7.2} MiB ({:.2}x the changed bytes), {:.2} s",
            v.data_bytes >> 20,
            v.size as f64 / MIB as f64,
            v.size as f64 / (changed_mib * MIB) as f64,
            took.as_secs_f64()
        );
    }
}

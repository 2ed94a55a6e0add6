//! Figures (README) of exports to an S3-compatible remote, measured in one run against plain
//! tools in the same run: a full export against `qemu-img convert` plus one upload, incremental
//! exports' bytes in the bucket against the bytes changed, a restore on a second device against
//! a plain download plus `qemu-img convert`, and the exporting agent's peak RSS. Real SeaweedFS
//! on loopback, the real volume-manager binary. Prints figures, asserts nothing timed.
//!
//! `cargo nextest run -p cairn-volume-manager --test s3_figures --run-ignored only --no-capture`
//! (`CAIRN_FIGURES_MIB`: MiB of random data in a qcow2 of twice that, default 512;
//! `CAIRN_FIGURES_ROUNDS`: rounds of the timed pairs, median reported, default 3).
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_objstore::seaweedfs::{ACCESS_KEY, SECRET_KEY, SeaweedFs};
use cairn_pubsub::{Bus, Publication, PublishOptions};
use cairn_types::RemoteConfig;
use cairn_types::export::{ExportKind, ExportState, ExportStatus};
use cairn_types::volume::{VolumeConfig, VolumeFormat, VolumeOrigin, VolumeState};
use common::exports::*;
use common::*;

const BUCKET: &str = "exports";
const PREFIX: &str = "fleet/dev-1";
/// Changes between incremental exports (random data, so compression flatters nothing).
const CHANGED_MIB: [u64; 3] = [8, 32, 128];
/// Where the changes are written in the volume.
const CHANGES_AT_MIB: u64 = 64;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A device with its own agent, the server's credentials and the remote `backups`.
struct Device {
    h: Harness,
    _remotes: Publication<RemoteConfig>,
    agent: Agent,
}

impl Device {
    async fn start(server: &SeaweedFs) -> Self {
        let h = Harness::new().await;
        server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
        let remotes: Publication<RemoteConfig> = Bus::new("config-agent", &h.run, &h.persist)
            .publish(PublishOptions::default())
            .await
            .unwrap();
        remotes
            .publish(RemoteConfig {
                id: "backups".into(),
                endpoint: server.endpoint(),
                bucket: BUCKET.into(),
                prefix: PREFIX.into(),
                credentials_file: "s3.json".into(),
                ..RemoteConfig::default()
            })
            .await
            .unwrap();
        let agent = h.agent(None);
        Self {
            h,
            _remotes: remotes,
            agent,
        }
    }

    /// The agent's peak resident set so far (`VmHWM`, KiB).
    fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.agent.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Makes a qcow2 volume from volume `volume` of the export at `key`; returns the time from
    /// the config's publication to the volume's Ready status.
    async fn restore(&mut self, key: &str, volume: uuid::Uuid, size: u64) -> Duration {
        let mut config = common::volume(VolumeFormat::Qcow2, size);
        config.origin = VolumeOrigin::RemoteExport {
            remote: "backups".into(),
            key: key.into(),
            volume,
        };
        let began = Instant::now();
        self.h.volume_configs.publish(config.clone()).await.unwrap();
        let deadline = began + Duration::from_secs(1800);
        loop {
            if let Some(s) = self.h.volume_statuses.get(&config.key())
                && matches!(s.state, VolumeState::Ready | VolumeState::Failed)
            {
                assert_eq!(s.state, VolumeState::Ready, "{:?}", s.error);
                return began.elapsed();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "volume {}: not made in time", config.key());
            let _ = tokio::time::timeout(left, self.h.volume_statuses.recv()).await;
        }
    }
}

/// The export's key under the remote's prefix (`REMOTE:PREFIX/KEY` in the status).
fn export_key(status: &ExportStatus) -> String {
    let full = status.remote_export.strip_prefix("backups:").unwrap();
    full.strip_prefix(&format!("{PREFIX}/"))
        .unwrap()
        .to_string()
}

async fn export(
    cli: &mut Cli,
    snapshot: uuid::Uuid,
    prefix: &str,
    incremental: bool,
) -> ExportStatus {
    let job = cli
        .start_remote(snapshot, "backups", prefix, incremental)
        .await;
    let done = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    done
}

/// Runs `program` and returns how long it took (it must succeed).
fn timed(program: &str, args: &[&str]) -> Duration {
    let began = Instant::now();
    sh(program, args);
    began.elapsed()
}

/// The baseline of a full export: `qemu-img convert -c` (zstd) of the snapshot to a file, then
/// that one file uploaded by curl (one signed PUT) and, when installed, by the aws CLI (its
/// default multipart upload); (convert, curl, aws) times.
fn raw_export(
    server: &SeaweedFs,
    file: &Path,
    snapshot: uuid::Uuid,
    out: &Path,
) -> (Duration, Duration, Option<Duration>) {
    sh("sync", &[]);
    let convert = timed(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "-l",
            &format!("snapshot.name={snapshot}"),
            file.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let began = Instant::now();
    let (code, body) = server.curl(
        "PUT",
        &format!("{BUCKET}/baseline/curl.qcow2"),
        &["-T", out.to_str().unwrap()],
    );
    let curl = began.elapsed();
    assert_eq!(code, 200, "{body}");
    let aws = aws_upload(server, out);
    std::fs::remove_file(out).unwrap();
    (convert, curl, aws)
}

/// `aws s3 cp` of `file` into the bucket, timed; `None` when the aws CLI is not installed.
fn aws_upload(server: &SeaweedFs, file: &Path) -> Option<Duration> {
    let began = Instant::now();
    let out = std::process::Command::new("aws")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .args(["--endpoint-url", &server.endpoint(), "s3", "cp", "--quiet"])
        .arg(file)
        .arg(format!("s3://{BUCKET}/baseline/aws.qcow2"))
        .output()
        .ok()?;
    let took = began.elapsed();
    assert!(
        out.status.success(),
        "aws s3 cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(took)
}

/// The baseline of a restore: the volume file downloaded by curl, then `qemu-img convert` into
/// a new qcow2; (download, convert) times.
fn raw_restore(server: &SeaweedFs, object: &str, dir: &Path) -> (Duration, Duration) {
    let downloaded = dir.join("downloaded.qcow2");
    let converted = dir.join("converted.qcow2");
    sh("sync", &[]);
    let began = Instant::now();
    let (code, body) = server.curl(
        "GET",
        &format!("{BUCKET}/{object}"),
        &["-o", downloaded.to_str().unwrap()],
    );
    let download = began.elapsed();
    assert_eq!(code, 200, "{body}");
    let convert = timed(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            downloaded.to_str().unwrap(),
            converted.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&downloaded).unwrap();
    std::fs::remove_file(&converted).unwrap();
    (download, convert)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: run by hand"]
async fn figures_s3_full_export_incremental_restore_and_agent_rss() {
    let mib = env_number("CAIRN_FIGURES_MIB", 512);
    let rounds = env_number("CAIRN_FIGURES_ROUNDS", 3).max(1) as usize;
    let server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let mut a = Device::start(&server).await;
    let mut b = Device::start(&server).await;
    let mut cli = Cli::new(&a.h).await;
    let (config, file): (VolumeConfig, _) = volume_with_data(&mut a.h, 2 * mib, mib).await;
    let first = snapshot(&mut a.h, &config, 1).await;
    let scratch = a.h.root.path().join("figures");
    std::fs::create_dir(&scratch).unwrap();
    println!(
        "figures: {mib} MiB of random data in a {} MiB qcow2, SeaweedFS on loopback, {rounds} rounds",
        2 * mib
    );

    let (mut agent_export, mut raw_curl, mut raw_aws) = (Vec::new(), Vec::new(), Vec::new());
    let (mut agent_restore, mut raw_download) = (Vec::new(), Vec::new());
    let mut last_key = String::new();
    for round in 0..rounds {
        sh("sync", &[]);
        let began = Instant::now();
        let done = export(&mut cli, first, &format!("figures-{round}"), false).await;
        let exported = began.elapsed();
        let (convert, curl, aws) =
            raw_export(&server, &file, first, &scratch.join("baseline.qcow2"));
        agent_export.push(secs(exported));
        raw_curl.push(secs(convert + curl));
        if let Some(aws) = aws {
            raw_aws.push(secs(convert + aws));
        }
        println!(
            "  round {round}: export {:.2} s ({} MiB uploaded) vs convert {:.2} s + curl PUT {:.2} s{} ({:.2}x)",
            secs(exported),
            done.bytes_uploaded >> 20,
            secs(convert),
            secs(curl),
            aws.map(|d| format!(" (aws s3 cp {:.2} s)", secs(d)))
                .unwrap_or_default(),
            secs(exported) / secs(convert + curl)
        );

        let key = export_key(&done);
        sh("sync", &[]);
        let restored = b.restore(&key, config.volume_id, 2 * mib * MIB).await;
        let object = format!("{PREFIX}/{key}/{}.qcow2", config.volume_id);
        let (download, convert) = raw_restore(&server, &object, &scratch);
        agent_restore.push(secs(restored));
        raw_download.push(secs(download + convert));
        println!(
            "  round {round}: restore {:.2} s vs curl GET {:.2} s + convert {:.2} s ({:.2}x)",
            secs(restored),
            secs(download),
            secs(convert),
            secs(restored) / secs(download + convert)
        );
        last_key = format!("figures-{round}");
    }
    let export_peak = a.peak_rss_kib();

    // Incremental exports over the last full one, each after random changes; what went up is
    // read from the bucket's own listing, not from the agent's status.
    let mut incremental = Vec::new();
    for (counter, changed_mib) in (2..).zip(CHANGED_MIB) {
        if CHANGES_AT_MIB + changed_mib > 2 * mib {
            println!(
                "  incremental after {changed_mib} MiB changed: skipped, the volume is too small"
            );
            continue;
        }
        let changes = scratch.join("changes.bin");
        sh(
            "sh",
            &[
                "-c",
                &format!(
                    "head -c {changed_mib}M /dev/urandom > {}",
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
                &format!(
                    "write -s {} {CHANGES_AT_MIB}M {changed_mib}M",
                    changes.display()
                ),
                file.to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&changes).unwrap();
        let id = snapshot(&mut a.h, &config, counter).await;
        let began = Instant::now();
        let done = export(&mut cli, id, &last_key, true).await;
        let took = began.elapsed();
        assert_eq!(
            done.volumes[0].kind,
            ExportKind::Incremental,
            "{}",
            done.volumes[0].fallback_reason
        );
        let in_bucket: u64 = server
            .objects(BUCKET, &format!("{PREFIX}/{}/", export_key(&done)))
            .iter()
            .map(|(_, size)| size)
            .sum();
        let ratio = in_bucket as f64 / (changed_mib * MIB) as f64;
        println!(
            "  incremental after {changed_mib} MiB changed: {:.2} MiB in the bucket (volume file and manifest; the agent reports {:.2} MiB uploaded), {ratio:.3}x the changed bytes, {:.2} s",
            in_bucket as f64 / MIB as f64,
            done.bytes_uploaded as f64 / MIB as f64,
            secs(took)
        );
        incremental.push((changed_mib, ratio));
    }

    let (e, c, r, d) = (
        median(agent_export),
        median(raw_curl),
        median(agent_restore),
        median(raw_download),
    );
    println!("figures (median of {rounds}):");
    println!(
        "  full export {e:.2} s vs convert + curl PUT {c:.2} s: {:.2}x (target <= 1.2x){}",
        e / c,
        if raw_aws.is_empty() {
            String::new()
        } else {
            let a = median(raw_aws);
            format!("; vs convert + aws s3 cp {a:.2} s: {:.2}x", e / a)
        }
    );
    println!(
        "  incremental bytes in the bucket / bytes changed: {} (target <= 1.05)",
        incremental
            .iter()
            .map(|(m, r)| format!("{m} MiB {r:.3}x"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  restore {r:.2} s vs curl GET + convert {d:.2} s: {:.2}x (target <= 1.2x)",
        r / d
    );
    println!(
        "  exporting agent's peak RSS (VmHWM): {:.1} MiB after the full exports, {:.1} MiB after the incrementals (target < 64 MiB); restoring agent's {:.1} MiB",
        export_peak as f64 / 1024.0,
        a.peak_rss_kib() as f64 / 1024.0,
        b.peak_rss_kib() as f64 / 1024.0
    );
}

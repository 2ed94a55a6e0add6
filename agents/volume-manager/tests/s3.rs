//! Exports to an S3-compatible remote (issue 22) through the real volume-manager binary, against
//! a real SeaweedFS server: the export lands whole with its manifest last, a killed agent's
//! half export is removed after the restart, bad credentials and buckets are refused by name.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_objstore::seaweedfs::{SECRET_KEY, SeaweedFs};
use cairn_pubsub::{Bus, Publication, PublishOptions};
use cairn_types::RemoteConfig;
use cairn_types::export::{ExportKind, ExportState, MANIFEST_FILE};
use cairn_types::volume::{VolumeFormat, VolumeOrigin, VolumeState};
use common::exports::*;
use common::*;

const BUCKET: &str = "exports";
const PREFIX: &str = "fleet/dev-1";

/// Plays the config-agent's remotes.
async fn remotes(h: &Harness) -> Publication<RemoteConfig> {
    Bus::new("config-agent", &h.run, &h.persist)
        .publish(PublishOptions::default())
        .await
        .unwrap()
}

fn remote_config(server: &SeaweedFs, id: &str, bucket: &str, credentials: &str) -> RemoteConfig {
    RemoteConfig {
        id: id.into(),
        endpoint: server.endpoint(),
        bucket: bucket.into(),
        prefix: PREFIX.into(),
        credentials_file: credentials.into(),
        ..RemoteConfig::default()
    }
}

/// A SeaweedFS server with the bucket, a device harness with its credentials, and the remote
/// `backups` published (the publication is returned: dropped, the remote goes).
async fn device_with_backups() -> (SeaweedFs, Harness, Publication<RemoteConfig>) {
    let server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let h = Harness::new().await;
    server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
    let remotes = remotes(&h).await;
    remotes
        .publish(remote_config(&server, "backups", BUCKET, "s3.json"))
        .await
        .unwrap();
    (server, h, remotes)
}

/// Nothing of a job left on the device: no job record, nothing spooled.
fn nothing_left_locally(persist: &Path) {
    let jobs = persist.join("volume-manager/exports");
    let records: Vec<PathBuf> = std::fs::read_dir(&jobs)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(
        records
            .iter()
            .all(|p| p.extension().is_none_or(|e| e != "json")),
        "{records:?}"
    );
    let spool: Vec<PathBuf> = std::fs::read_dir(jobs.join("spool"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(spool.is_empty(), "spool not empty: {spool:?}");
}

/// Downloads every object under `key` into `dir` (as a plain client would).
fn download(server: &SeaweedFs, key: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for object in server.keys(BUCKET) {
        let Some(name) = object.strip_prefix(&format!("{key}/")) else {
            continue;
        };
        let out = dir.join(name);
        let (code, body) = server.curl(
            "GET",
            &format!("{BUCKET}/{object}"),
            &["-o", out.to_str().unwrap()],
        );
        assert_eq!(code, 200, "{object}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_to_a_remote_lands_whole_with_its_manifest_and_restores_bit_for_bit() {
    let (server, mut h, _remotes) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    // Random data: it does not compress, so the volume file takes more than one part.
    let (config, file) = volume_with_data(&mut h, 64, 20).await;
    let id = snapshot(&mut h, &config, 1).await;

    let job = cli.start_remote(id, "backups", "site-a", false).await;
    let done = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let key = done
        .remote_export
        .strip_prefix("backups:")
        .unwrap_or_else(|| panic!("{:?}", done.remote_export))
        .to_string();
    assert!(key.starts_with(&format!("{PREFIX}/site-a/")), "{key}");
    let keys = server.keys(BUCKET);
    let volume_key = format!("{key}/{}.qcow2", config.volume_id);
    assert!(keys.contains(&volume_key), "{keys:?}");
    assert!(keys.contains(&format!("{key}/{MANIFEST_FILE}")), "{keys:?}");
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        done.bytes_uploaded > 2 * cairn_objstore::PART_SIZE as u64,
        "{done:?}"
    );
    assert!(server.multipart_uploads(BUCKET).is_empty());
    nothing_left_locally(&h.persist);

    // Downloaded by a plain client: the export verifies and restores the snapshot exactly.
    let local = h.root.path().join("downloaded");
    download(&server, &key, &local);
    let (manifest, _) =
        cairn_volume_manager::export::verify_export(&local, &mut |_, _| true).unwrap();
    assert_eq!(manifest.snapshot_id, id);
    let mut restored = common::volume(VolumeFormat::Qcow2, 64 * MIB);
    restored.origin = VolumeOrigin::Export {
        dir: local.clone(),
        volume: config.volume_id,
    };
    h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = h.ready(&restored).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_as_snapshot(&h, &h.volume_file(&restored), &file, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_upload_leaves_no_complete_export_and_its_restart_removes_it() {
    let (server, mut h, _remotes) = device_with_backups().await;
    let mut agent = h.agent(Some(cairn_volume_manager::export::CRASH_MID_UPLOAD));
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 20).await;
    let id = snapshot(&mut h, &config, 1).await;
    let job = cli.start_remote(id, "backups", "", false).await;
    agent.wait_killed(Duration::from_secs(120));

    // Killed with a multipart upload open: nothing in the bucket looks complete.
    let uploads = server.multipart_uploads(BUCKET);
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert!(uploads[0].ends_with(&format!("{}.qcow2", config.volume_id)));
    let keys = server.keys(BUCKET);
    assert!(keys.iter().all(|k| !k.ends_with(MANIFEST_FILE)), "{keys:?}");

    drop(agent);
    let _agent = h.agent(None);
    let end = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Failed, "{end:?}");
    assert!(
        end.error.contains("interrupted")
            && end.error.contains("was removed")
            && end.error.contains("1 multipart uploads aborted"),
        "{}",
        end.error
    );
    assert!(
        server.multipart_uploads(BUCKET).is_empty(),
        "{:?}",
        server.multipart_uploads(BUCKET)
    );
    assert!(server.keys(BUCKET).is_empty(), "{:?}", server.keys(BUCKET));
    nothing_left_locally(&h.persist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_a_missing_bucket_and_an_unknown_remote_are_refused_by_name() {
    let server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let mut h = Harness::new().await;
    server.write_credentials(&h.persist, "wrong.json", "not-the-secret-4242");
    server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
    let remotes = remotes(&h).await;
    remotes
        .publish(remote_config(&server, "badkey", BUCKET, "wrong.json"))
        .await
        .unwrap();
    remotes
        .publish(remote_config(
            &server,
            "nobucket",
            "missing-bucket",
            "s3.json",
        ))
        .await
        .unwrap();
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 16, 1).await;
    let id = snapshot(&mut h, &config, 1).await;

    for (remote, wanted) in [
        ("badkey", "access denied"),
        ("nobucket", "does not exist"),
        ("elsewhere", "remote elsewhere is not configured"),
    ] {
        let job = cli.start_remote(id, remote, "", false).await;
        let end = cli
            .wait(job.job_id, |s| s.state != ExportState::Running)
            .await;
        assert_eq!(end.state, ExportState::Failed, "{remote}: {end:?}");
        assert!(
            end.error.contains(remote) && end.error.contains(wanted),
            "{remote}: {}",
            end.error
        );
        assert!(
            !end.error.contains("not-the-secret-4242")
                && !end.error.contains(SECRET_KEY)
                && !end.error.contains(cairn_objstore::seaweedfs::ACCESS_KEY),
            "{}",
            end.error
        );
    }
    assert!(server.keys(BUCKET).is_empty(), "{:?}", server.keys(BUCKET));
    nothing_left_locally(&h.persist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_export_to_a_remote_uploads_only_the_changes_and_its_chain_restores_exactly()
{
    let (server, mut h, _remotes) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 128, 48).await;
    let first = snapshot(&mut h, &config, 1).await;
    let job = cli.start_remote(first, "backups", "site-a", false).await;
    let full = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);

    // 8 MiB changed after the first snapshot.
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 16M 8M",
            file.to_str().unwrap(),
        ],
    );
    let second = snapshot(&mut h, &config, 2).await;
    let job = cli.start_remote(second, "backups", "site-a", true).await;
    let inc = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(inc.state, ExportState::Done, "{}", inc.error);
    assert!(!inc.fell_back_to_full, "{:?}", inc.volumes);
    assert_eq!(
        inc.volumes[0].kind,
        cairn_types::export::ExportKind::Incremental
    );
    assert_eq!(inc.volumes[0].data_bytes, 8 * MIB);
    assert!(
        inc.bytes_uploaded * 4 < full.bytes_uploaded,
        "incremental {} bytes uploaded, full {}",
        inc.bytes_uploaded,
        full.bytes_uploaded
    );
    nothing_left_locally(&h.persist);

    // Both exports downloaded side by side: the chain verifies and gives the second snapshot.
    let full_key = full.remote_export.strip_prefix("backups:").unwrap();
    let inc_key = inc.remote_export.strip_prefix("backups:").unwrap();
    let local = h.root.path().join("downloaded");
    let name = |key: &str| key.rsplit('/').next().unwrap().to_string();
    download(&server, full_key, &local.join(name(full_key)));
    download(&server, inc_key, &local.join(name(inc_key)));
    let inc_dir = local.join(name(inc_key));
    cairn_volume_manager::export::verify_export(&inc_dir, &mut |_, _| true).unwrap();
    let mut restored = common::volume(VolumeFormat::Qcow2, 128 * MIB);
    restored.origin = VolumeOrigin::Export {
        dir: inc_dir,
        volume: config.volume_id,
    };
    h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = h.ready(&restored).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_as_snapshot(&h, &h.volume_file(&restored), &file, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_killed_mid_upload_and_started_again_gets_the_export_finished() {
    let mut server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let mut h = Harness::new().await;
    server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
    let remotes = remotes(&h).await;
    // 4 MiB/s: the upload of ~24 MiB takes some seconds, time to kill the server under it.
    let mut remote = remote_config(&server, "backups", BUCKET, "s3.json");
    remote.bandwidth_limit = 4 << 20;
    remotes.publish(remote).await.unwrap();
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 24).await;
    let id = snapshot(&mut h, &config, 1).await;
    let job = cli.start_remote(id, "backups", "", false).await;
    let running = cli
        .wait(job.job_id, |s| {
            s.state != ExportState::Running || s.bytes_uploaded > 0
        })
        .await;
    assert_eq!(running.state, ExportState::Running, "{running:?}");
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    let end = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Done, "{}", end.error);
    let key = end.remote_export.strip_prefix("backups:").unwrap();
    let local = h.root.path().join("downloaded");
    download(&server, key, &local);
    cairn_volume_manager::export::verify_export(&local, &mut |_, _| true).unwrap();
    assert!(server.multipart_uploads(BUCKET).is_empty());
    nothing_left_locally(&h.persist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_upload_leaves_no_object_and_no_open_upload() {
    let server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let mut h = Harness::new().await;
    server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
    let remotes = remotes(&h).await;
    // 4 MiB/s: the upload of ~24 MiB is still under way when the cancel comes.
    let mut remote = remote_config(&server, "backups", BUCKET, "s3.json");
    remote.bandwidth_limit = 4 << 20;
    remotes.publish(remote).await.unwrap();
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 24).await;
    let id = snapshot(&mut h, &config, 1).await;
    let mut job = cli.start_remote(id, "backups", "", false).await;
    let running = cli
        .wait(job.job_id, |s| {
            s.state != ExportState::Running || s.bytes_uploaded > 0
        })
        .await;
    assert_eq!(running.state, ExportState::Running, "{running:?}");
    job.cancel = true;
    cli.configs.publish(job.clone()).await.unwrap();
    let end = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Cancelled, "{end:?}");
    assert!(
        server.multipart_uploads(BUCKET).is_empty(),
        "{:?}",
        server.multipart_uploads(BUCKET)
    );
    assert!(server.keys(BUCKET).is_empty(), "{:?}", server.keys(BUCKET));
    nothing_left_locally(&h.persist);
}

/// Plays the requests that stay in force (the config-agent's export requests; the
/// app-manager's for scheduled snapshots are the same message): published as `config-agent`.
async fn standing_requests(h: &Harness) -> Publication<cairn_types::ExportConfig> {
    Bus::new("config-agent", &h.run, &h.persist)
        .publish(PublishOptions::for_requests())
        .await
        .unwrap()
}

/// A standing export request of `snapshot` as a schedule asks it: incremental, a full export
/// every `full_every`, the newest `keep` kept, once per snapshot.
fn standing(snapshot: uuid::Uuid, full_every: u32, keep: u32) -> cairn_types::ExportConfig {
    cairn_types::ExportConfig {
        job_id: uuid::Uuid::new_v4(),
        snapshot_id: snapshot,
        remote: "backups".into(),
        remote_prefix: "site-a".into(),
        incremental: true,
        full_every,
        keep_exports: keep,
        once: true,
        ..cairn_types::ExportConfig::default()
    }
}

/// The export directories (names) with a manifest under `site-a`, and those without.
fn exports_in_bucket(server: &SeaweedFs) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut dirs = BTreeSet::new();
    let mut complete = BTreeSet::new();
    for key in server.keys(BUCKET) {
        let Some(rest) = key.strip_prefix(&format!("{PREFIX}/site-a/")) else {
            continue;
        };
        let (dir, file) = rest.split_once('/').unwrap();
        dirs.insert(dir.to_string());
        if file == MANIFEST_FILE {
            complete.insert(dir.to_string());
        }
    }
    let partial = dirs.difference(&complete).cloned().collect();
    (complete, partial)
}

fn dir_of(status: &cairn_types::export::ExportStatus) -> String {
    status.remote_export.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_exports_go_full_then_incremental_and_retention_keeps_every_base_a_kept_export_needs()
 {
    let (server, mut h, _remotes) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let requests = standing_requests(&h).await;
    let (config, file) = volume_with_data(&mut h, 64, 8).await;
    // A full export every 2, keep 1: e1 full, e2 over e1, e3 full, e4 over e3.
    let mut done = Vec::new();
    for n in 1..=4u64 {
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {n} {}M 1M", 16 + n),
                file.to_str().unwrap(),
            ],
        );
        let id = snapshot(&mut h, &config, n).await;
        let request = standing(id, 2, 1);
        requests.publish(request.clone()).await.unwrap();
        let end = cli
            .wait(request.job_id, |s| s.state != ExportState::Running)
            .await;
        assert_eq!(end.state, ExportState::Done, "export {n}: {}", end.error);
        assert!(end.error.is_empty(), "export {n}: {}", end.error);
        assert!(end.finished.is_some(), "export {n}: no end time");
        done.push(end);
    }
    let kinds: Vec<ExportKind> = done.iter().map(|d| d.volumes[0].kind).collect();
    assert_eq!(
        kinds,
        [
            ExportKind::Full,
            ExportKind::Incremental,
            ExportKind::Full,
            ExportKind::Incremental
        ],
        "{:?}",
        done.iter().map(|d| &d.volumes).collect::<Vec<_>>()
    );
    assert!(
        done[2].volumes[0]
            .fallback_reason
            .contains("a full export every 2"),
        "{:?}",
        done[2].volumes[0]
    );
    let dirs: Vec<String> = done.iter().map(dir_of).collect();
    // After e2 (keep 1): e2 is kept and its base e1 with it.
    assert!(done[1].removed_exports.is_empty(), "{:?}", done[1]);
    // After e3: e3 is a chain of its own; e1 ← e2 is needed by no kept export and goes, the
    // incremental before its base.
    let removed: Vec<String> = done[2]
        .removed_exports
        .iter()
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(removed, [dirs[1].clone(), dirs[0].clone()]);
    // After e4: e4 kept with its base e3.
    assert!(done[3].removed_exports.is_empty(), "{:?}", done[3]);
    let (complete, partial) = exports_in_bucket(&server);
    assert_eq!(complete, BTreeSet::from([dirs[2].clone(), dirs[3].clone()]));
    assert!(partial.is_empty(), "{partial:?}");

    // The request stays in force: published again (as after a restart) it writes nothing.
    let before = server.keys(BUCKET);
    let mut again = standing(done[3].snapshot_id, 2, 1);
    again.job_id = uuid::Uuid::new_v4();
    requests.publish(again.clone()).await.unwrap();
    let end = cli
        .wait(again.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Done, "{}", end.error);
    assert_eq!(end.remote_export, done[3].remote_export);
    assert_eq!(end.bytes_uploaded, 0);
    assert_eq!(server.keys(BUCKET), before);

    // The kept chain restores the newest snapshot exactly.
    let local = h.root.path().join("downloaded");
    for dir in [&dirs[2], &dirs[3]] {
        download(&server, &format!("{PREFIX}/site-a/{dir}"), &local.join(dir));
    }
    cairn_volume_manager::export::verify_export(&local.join(&dirs[3]), &mut |_, _| true).unwrap();
    nothing_left_locally(&h.persist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_killed_between_manifest_and_files_leaves_no_complete_looking_export_and_finishes_after_restart()
 {
    let (server, mut h, _remotes) = device_with_backups().await;
    let mut agent = h.agent(Some(cairn_volume_manager::export::CRASH_MID_RETENTION));
    let mut cli = Cli::new(&h).await;
    let requests = standing_requests(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 8).await;
    // Every export full, keep 1: the second export's retention deletes the first.
    let first = snapshot(&mut h, &config, 1).await;
    let request = standing(first, 1, 1);
    requests.publish(request.clone()).await.unwrap();
    let e1 = cli
        .wait(request.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(e1.state, ExportState::Done, "{}", e1.error);
    let second = snapshot(&mut h, &config, 2).await;
    let request = standing(second, 1, 1);
    requests.publish(request.clone()).await.unwrap();
    agent.wait_killed(Duration::from_secs(120));

    // Killed after the first export's manifest went, before its files: it no longer looks
    // complete; the second is whole.
    let (complete, partial) = exports_in_bucket(&server);
    assert_eq!(complete.len(), 1, "{complete:?}");
    assert_eq!(partial, BTreeSet::from([dir_of(&e1)]), "{partial:?}");
    assert!(!complete.contains(&dir_of(&e1)));

    // Restarted, the request (still in force) finds its export done and the retention ends.
    drop(agent);
    let _agent = h.agent(None);
    let end = cli
        .wait(request.job_id, |s| {
            s.state != ExportState::Running && !s.remote_export.is_empty()
        })
        .await;
    assert_eq!(end.state, ExportState::Done, "{}", end.error);
    let removed: Vec<String> = end
        .removed_exports
        .iter()
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(removed, [dir_of(&e1)]);
    let (complete, partial) = exports_in_bucket(&server);
    assert_eq!(complete, BTreeSet::from([dir_of(&end)]));
    assert!(partial.is_empty(), "{partial:?}");
    assert!(server.multipart_uploads(BUCKET).is_empty());
    nothing_left_locally(&h.persist);
}

/// A second device root on this machine (its own persist, bus and volume-manager) with the
/// same remote configured: plays the replacement device.
struct SecondDevice {
    h: Harness,
    remotes: Publication<RemoteConfig>,
    _agent: Agent,
}

impl SecondDevice {
    async fn start(server: &SeaweedFs) -> Self {
        let h = Harness::new().await;
        server.write_credentials(&h.persist, "s3.json", SECRET_KEY);
        let remotes = remotes(&h).await;
        let agent = h.agent(None);
        Self {
            h,
            remotes,
            _agent: agent,
        }
    }

    /// A qcow2 volume restored from volume `volume` of the export at `key` of remote "backups".
    fn restored(key: &str, volume: uuid::Uuid, size: u64) -> cairn_types::VolumeConfig {
        let mut config = common::volume(VolumeFormat::Qcow2, size);
        config.origin = VolumeOrigin::RemoteExport {
            remote: "backups".into(),
            key: key.into(),
            volume,
        };
        config
    }

    /// Waits until volume `config` is made or refused for another reason than its remote not
    /// being configured yet (the remote and the volume may arrive in either order).
    async fn made(&mut self, config: &cairn_types::VolumeConfig) -> cairn_types::VolumeStatus {
        self.h
            .volume_where(&config.key(), |s| {
                s.state == VolumeState::Ready
                    || (s.state == VolumeState::Failed && !s.error.error.contains("not configured"))
            })
            .await
    }

    /// The volumes directory holds nothing but `keep` (no half-made volume, no download).
    fn volumes_left(&self) -> Vec<String> {
        std::fs::read_dir(cairn_types::layout::volumes_dir(&self.h.persist))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The export key of a finished job (`REMOTE:KEY`), under the remote's prefix.
fn export_key(status: &cairn_types::export::ExportStatus) -> String {
    let full = status.remote_export.strip_prefix("backups:").unwrap();
    full.strip_prefix(&format!("{PREFIX}/"))
        .unwrap_or_else(|| panic!("{full}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_restores_a_volume_from_the_remote_export_and_its_chain_with_identical_data()
 {
    let (server, mut h, _remotes_a) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 64, 20).await;
    let first = snapshot(&mut h, &config, 1).await;
    let job = cli.start_remote(first, "backups", "site-a", false).await;
    let full = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);
    qcow2_write(&file, 0xcd, 4 * MIB);
    let second = snapshot(&mut h, &config, 2).await;
    let job = cli.start_remote(second, "backups", "site-a", true).await;
    let inc = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(inc.state, ExportState::Done, "{}", inc.error);
    assert!(!inc.fell_back_to_full, "{:?}", inc.volumes);

    // Device B: the volume is declared before the remote: it waits for it, then is made.
    let mut b = SecondDevice::start(&server).await;
    let from_chain = SecondDevice::restored(&export_key(&inc), config.volume_id, 64 * MIB);
    b.h.volume_configs
        .publish(from_chain.clone())
        .await
        .unwrap();
    let waiting = b.h.ready(&from_chain).await;
    assert_eq!(waiting.state, VolumeState::Failed, "{waiting:?}");
    assert!(
        waiting.error.error.contains("remote backups")
            && waiting.error.error.contains("not configured"),
        "{:?}",
        waiting.error
    );
    b.remotes
        .publish(remote_config(&server, "backups", BUCKET, "s3.json"))
        .await
        .unwrap();
    let status = b.made(&from_chain).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_as_snapshot(&h, &b.h.volume_file(&from_chain), &file, second);
    let from_full = SecondDevice::restored(&export_key(&full), config.volume_id, 64 * MIB);
    b.h.volume_configs.publish(from_full.clone()).await.unwrap();
    let status = b.made(&from_full).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_as_snapshot(&h, &b.h.volume_file(&from_full), &file, first);
    // Only the two volumes: the downloads are gone.
    assert_eq!(b.volumes_left().len(), 2, "{:?}", b.volumes_left());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_truncated_or_missing_object_is_refused_by_name_and_nothing_is_made() {
    let (server, mut h, _remotes_a) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 32, 8).await;
    let id = snapshot(&mut h, &config, 1).await;
    let job = cli.start_remote(id, "backups", "", false).await;
    let done = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let key = export_key(&done);
    let object = format!("{PREFIX}/{key}/{}.qcow2", config.volume_id);
    let original = h.root.path().join("original.qcow2");
    let (code, body) = server.curl(
        "GET",
        &format!("{BUCKET}/{object}"),
        &["-o", original.to_str().unwrap()],
    );
    assert_eq!(code, 200, "{body}");
    let bytes = std::fs::read(&original).unwrap();
    let mut tampered = bytes.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    let truncated = bytes[..bytes.len() - 4096].to_vec();

    let mut b = SecondDevice::start(&server).await;
    b.remotes
        .publish(remote_config(&server, "backups", BUCKET, "s3.json"))
        .await
        .unwrap();
    let put = |content: Option<&[u8]>| {
        let path = format!("{BUCKET}/{object}");
        let (code, body) = match content {
            Some(content) => {
                let local = h.root.path().join("upload.bin");
                std::fs::write(&local, content).unwrap();
                server.curl("PUT", &path, &["-T", local.to_str().unwrap()])
            }
            None => server.curl("DELETE", &path, &[]),
        };
        assert!(code == 200 || code == 204, "{code}: {body}");
    };
    for (case, content, wanted) in [
        ("tampered", Some(&tampered[..]), "checksum mismatch"),
        ("truncated", Some(&truncated[..]), "checksum mismatch"),
        ("missing", None, "is missing"),
    ] {
        put(content);
        let restored = SecondDevice::restored(&key, config.volume_id, 32 * MIB);
        b.h.volume_configs.publish(restored.clone()).await.unwrap();
        let status = b.made(&restored).await;
        assert_eq!(status.state, VolumeState::Failed, "{case}: {status:?}");
        assert!(
            status.error.error.contains(&object) && status.error.error.contains(wanted),
            "{case}: {}",
            status.error.error
        );
        assert!(!b.h.volume_file(&restored).exists(), "{case}");
        assert!(
            b.volumes_left().is_empty(),
            "{case}: {:?}",
            b.volumes_left()
        );
    }
    // A missing manifest: refused by name too.
    put(Some(&bytes));
    let manifest = format!("{PREFIX}/{key}/{MANIFEST_FILE}");
    let (code, body) = server.curl("DELETE", &format!("{BUCKET}/{manifest}"), &[]);
    assert!(code == 204 || code == 200, "{body}");
    let restored = SecondDevice::restored(&key, config.volume_id, 32 * MIB);
    b.h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = b.made(&restored).await;
    assert_eq!(status.state, VolumeState::Failed, "{status:?}");
    assert!(
        status.error.error.contains(&manifest) && status.error.error.contains("is missing"),
        "{}",
        status.error.error
    );
    assert!(b.volumes_left().is_empty(), "{:?}", b.volumes_left());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_volume_goes_to_the_remote_as_a_tree_and_a_second_device_restores_it_exactly() {
    let (server, mut h, _remotes_a) = device_with_backups().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, id) = tree_volume_snapshot(&mut h).await;
    let job = cli.start_remote(id, "backups", "site-a", false).await;
    let done = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let key = export_key(&done);
    let keys = server.keys(BUCKET);
    assert!(
        keys.contains(&format!("{PREFIX}/{key}/{}.tar.zst", config.volume_id)),
        "{keys:?}"
    );
    nothing_left_locally(&h.persist);

    let mut b = SecondDevice::start(&server).await;
    b.remotes
        .publish(remote_config(&server, "backups", BUCKET, "s3.json"))
        .await
        .unwrap();
    let mut restored = SecondDevice::restored(&key, config.volume_id, 64 * MIB);
    restored.format = VolumeFormat::Dir;
    b.h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = b.made(&restored).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_tree(&h, &config, id, &b.h.volume_file(&restored));
}

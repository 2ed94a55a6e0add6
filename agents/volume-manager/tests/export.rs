//! Exports through the real volume-manager binary over the bus, on real qcow2 volumes: verify,
//! damage detection, incremental exports from dirty bitmaps, fallback, cancel, crash.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_types::export::{ExportAction, ExportKind, ExportManifest, ExportState, MANIFEST_FILE};
use cairn_types::snapshot::VolumesSnapshotAction;
use cairn_types::volume::{VolumeFormat, VolumeOrigin, VolumeState};
use common::exports::*;
use common::*;
use uuid::Uuid;

fn manifest(dir: &Path) -> ExportManifest {
    serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_verifies_and_a_flipped_byte_fails_naming_the_volume() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 16).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();

    let done = cli.run(ExportAction::Export, id, &target, false).await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    assert_eq!(done.bytes_done, done.bytes_total);
    let m = manifest(&done.export_dir);
    assert_eq!(m.snapshot_id, id);
    assert_eq!(m.volumes.len(), 1);
    assert_eq!(m.volumes[0].volume_id, config.volume_id);
    assert_eq!(m.volumes[0].kind, ExportKind::Full);
    let compressed = sh(
        "qemu-img",
        &[
            "info",
            done.export_dir.join(&m.volumes[0].file).to_str().unwrap(),
        ],
    );
    assert!(
        compressed.contains("compression type: zstd"),
        "{compressed}"
    );

    let ok = cli
        .run(ExportAction::Verify, Uuid::nil(), &done.export_dir, false)
        .await;
    assert_eq!(ok.state, ExportState::Done, "{}", ok.error);

    // One byte flipped in the middle of the exported file.
    let file = done.export_dir.join(&m.volumes[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let bad = cli
        .run(ExportAction::Verify, Uuid::nil(), &done.export_dir, false)
        .await;
    assert_eq!(bad.state, ExportState::Failed);
    assert!(
        bad.error.contains(&config.volume_id.to_string())
            && bad.error.contains(&m.volumes[0].file)
            && bad.error.contains("checksum mismatch"),
        "{}",
        bad.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_export_carries_only_changes_and_the_chain_gives_the_disk_bit_for_bit() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 128, 64).await;
    let first = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let full = cli.run(ExportAction::Export, first, &target, false).await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);

    // 8 MiB changed after the first snapshot, at an offset inside the data.
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
    let inc = cli.run(ExportAction::Export, second, &target, true).await;
    assert_eq!(inc.state, ExportState::Done, "{}", inc.error);
    assert!(!inc.fell_back_to_full, "{:?}", inc.volumes);
    let m = manifest(&inc.export_dir);
    let volume = &m.volumes[0];
    assert_eq!(volume.kind, ExportKind::Incremental);
    let base = volume.base.clone().unwrap();
    assert_eq!(target.join(&base.dir), full.export_dir);
    let full_size = file_size(
        &full
            .export_dir
            .join(&manifest(&full.export_dir).volumes[0].file),
    );
    let inc_size = file_size(&inc.export_dir.join(&volume.file));
    assert!(
        inc_size * 4 < full_size,
        "incremental {inc_size} bytes, full {full_size} bytes"
    );
    assert_eq!(inc.volumes[0].data_bytes, 8 * MIB);

    // The chain verifies, and its last link is the second snapshot's disk, bit for bit.
    let ok = cli
        .run(ExportAction::Verify, Uuid::nil(), &inc.export_dir, false)
        .await;
    assert_eq!(ok.state, ExportState::Done, "{}", ok.error);
    // Import: a new volume made from the chain's last link by the volume-manager.
    let mut restored = common::volume(VolumeFormat::Qcow2, 128 * MIB);
    restored.origin = VolumeOrigin::Export {
        dir: inc.export_dir.clone(),
        volume: config.volume_id,
    };
    h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = h.ready(&restored).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    let imported = h.volume_file(&restored);
    let info = sh("qemu-img", &["info", "-U", imported.to_str().unwrap()]);
    assert!(
        !info.contains("backing file"),
        "the restored volume stands alone: {info}"
    );
    assert_same_as_snapshot(&h, &imported, &file, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_bitmap_gives_a_full_export_that_says_so() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 32, 8).await;
    let first = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let full = cli.run(ExportAction::Export, first, &target, false).await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);
    // As after a crash that lost the bitmap.
    sh(
        "qemu-img",
        &[
            "bitmap",
            "--remove",
            "-f",
            "qcow2",
            file.to_str().unwrap(),
            &format!("cairn-{first}"),
        ],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            file.to_str().unwrap(),
        ],
    );
    let second = snapshot(&mut h, &config, 2).await;
    let again = cli.run(ExportAction::Export, second, &target, true).await;
    assert_eq!(again.state, ExportState::Done, "{}", again.error);
    assert!(again.fell_back_to_full);
    assert_eq!(again.volumes[0].kind, ExportKind::Full);
    assert!(
        again.volumes[0]
            .fallback_reason
            .contains("no change-tracking bitmap"),
        "{}",
        again.volumes[0].fallback_reason
    );
    let m = manifest(&again.export_dir);
    assert_eq!(m.volumes[0].kind, ExportKind::Full);
    assert!(m.volumes[0].base.is_none());
    assert!(
        m.volumes[0]
            .fallback_reason
            .contains("no change-tracking bitmap")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_export_leaves_no_export_and_no_partial_directory() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 512, 384).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let mut job = cli.start(ExportAction::Export, id, &target, false).await;
    // Mid-export: some bytes written, not all.
    cli.wait(job.job_id, |s| {
        s.state == ExportState::Running && s.bytes_done > 0
    })
    .await;
    job.cancel = true;
    cli.configs.publish(job.clone()).await.unwrap();
    let end = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Cancelled, "{end:?}");
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_killed_mid_way_leaves_nothing_that_looks_complete() {
    let mut h = Harness::new().await;
    let mut agent = h.agent(Some(cairn_volume_manager::export::CRASH_MID_EXPORT));
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 32, 8).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let job = cli.start(ExportAction::Export, id, &target, false).await;
    agent.wait_killed(Duration::from_secs(60));
    let left = entries(&target);
    assert!(left.iter().all(|n| n.ends_with(".partial")), "{left:?}");
    drop(agent);
    let _agent = h.agent(None);
    let end = cli
        .wait(job.job_id, |s| s.state != ExportState::Running)
        .await;
    assert_eq!(end.state, ExportState::Failed);
    assert!(end.error.contains("interrupted"), "{}", end.error);
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_snapshot_and_a_file_as_target_are_refused_clearly() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 16, 1).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let missing = Uuid::new_v4();
    let unknown = cli.run(ExportAction::Export, missing, &target, false).await;
    assert_eq!(unknown.state, ExportState::Failed);
    assert!(
        unknown.error.contains(&missing.to_string()) && unknown.error.contains("not available"),
        "{}",
        unknown.error
    );
    let not_dir = h.root.path().join("file");
    std::fs::write(&not_dir, b"x").unwrap();
    let refused = cli.run(ExportAction::Export, id, &not_dir, false).await;
    assert_eq!(refused.state, ExportState::Failed);
    assert!(
        refused.error.contains("not a directory"),
        "{}",
        refused.error
    );
    assert!(entries(&target).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_not_restored_from_a_damaged_export() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 16, 4).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let done = cli.run(ExportAction::Export, id, &target, false).await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let file = done
        .export_dir
        .join(&manifest(&done.export_dir).volumes[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let mut restored = volume(VolumeFormat::Qcow2, 16 * MIB);
    restored.origin = VolumeOrigin::Export {
        dir: done.export_dir.clone(),
        volume: config.volume_id,
    };
    h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = h.ready(&restored).await;
    assert_eq!(status.state, VolumeState::Failed);
    assert!(
        status.error.error.contains("checksum mismatch")
            && status.error.error.contains(&config.volume_id.to_string()),
        "{}",
        status.error.error
    );
    assert!(!h.volume_file(&restored).exists());
}

fn bitmaps(file: &Path) -> Vec<String> {
    let info: serde_json::Value = serde_json::from_str(&sh(
        "qemu-img",
        &["info", "-U", "--output=json", file.to_str().unwrap()],
    ))
    .unwrap();
    let mut names: Vec<String> = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|b| b.get("name")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_volume_rolls_back_and_its_next_incremental_export_is_exact() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 32, 16).await;
    let first = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let full = cli.run(ExportAction::Export, first, &target, false).await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);
    assert_eq!(bitmaps(&file), vec![format!("cairn-{first}")]);
    // Tracked: the next snapshot gets its own bitmap.
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x01 0 2M",
            file.to_str().unwrap(),
        ],
    );
    snapshot(&mut h, &config, 2).await;
    assert_eq!(bitmaps(&file).len(), 2, "{:?}", bitmaps(&file));

    // qemu refuses to apply a snapshot while bitmaps exist: the rollback must still work.
    h.snapshot_configs
        .publish(request(
            first,
            VolumesSnapshotAction::Rollback,
            &[&config],
            3,
        ))
        .await
        .unwrap();
    let rolled = h.answer(first, VolumesSnapshotAction::Rollback, 3).await;
    assert!(!rolled.error.is_error(), "{:?}", rolled.error);
    assert!(
        !qcow2_reads(&file, 0x01, 2 * MIB),
        "the rollback took the first snapshot's data back"
    );
    assert_eq!(bitmaps(&file), vec![format!("cairn-{first}")]);

    // Changes after the rollback, a third snapshot, an incremental export over the first.
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x02 4M 1M",
            file.to_str().unwrap(),
        ],
    );
    let third = snapshot(&mut h, &config, 4).await;
    let inc = cli.run(ExportAction::Export, third, &target, true).await;
    assert_eq!(inc.state, ExportState::Done, "{}", inc.error);
    assert_eq!(
        inc.volumes[0].kind,
        ExportKind::Incremental,
        "{:?}",
        inc.volumes
    );
    let m = manifest(&inc.export_dir);
    assert_eq!(
        target.join(&m.volumes[0].base.clone().unwrap().dir),
        full.export_dir
    );
    assert_same_as_snapshot(&h, &inc.export_dir.join(&m.volumes[0].file), &file, third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bitmap_left_in_use_by_a_crashed_vm_gives_a_full_export_that_says_so() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 32, 8).await;
    let first = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let full = cli.run(ExportAction::Export, first, &target, false).await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);
    // qemu opens the volume (its bitmaps marked in-use on disk) and dies without storing them.
    let mut qemu = std::process::Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={},node-name=f", file.display()),
            "--blockdev",
            "driver=qcow2,file=f,node-name=q",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh("qemu-img", &["info", "-U", file.to_str().unwrap()]).contains("in-use") {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not open the volume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            file.to_str().unwrap(),
        ],
    );
    let second = snapshot(&mut h, &config, 2).await;
    let again = cli.run(ExportAction::Export, second, &target, true).await;
    assert_eq!(again.state, ExportState::Done, "{}", again.error);
    assert!(again.fell_back_to_full);
    assert_eq!(again.volumes[0].kind, ExportKind::Full);
    assert!(
        again.volumes[0].fallback_reason.contains("in-use"),
        "{}",
        again.volumes[0].fallback_reason
    );
    assert!(
        manifest(&again.export_dir).volumes[0]
            .fallback_reason
            .contains("in-use")
    );
}

/// The agent with a test-only `qemu-nbd` first on its PATH whose socket file is there a
/// second and a half before anything listens on it.
fn agent_with_slow_nbd(h: &Harness) -> Agent {
    Agent::start_with_tools(&h.persist, &h.run, "slow-nbd", &[])
}

/// A loaded machine shows qemu-nbd's socket file before the server listens on it: change
/// tracking must still start after a full export (it compares the volume with the snapshot
/// through that server), so the next export is incremental, not a full one "for no bitmap".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbd_server_slow_to_listen_still_starts_change_tracking() {
    let mut h = Harness::new().await;
    let _agent = agent_with_slow_nbd(&h);
    let mut cli = Cli::new(&h).await;
    let (config, file) = volume_with_data(&mut h, 32, 8).await;
    let first = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let full = cli.run(ExportAction::Export, first, &target, false).await;
    assert_eq!(full.state, ExportState::Done, "{}", full.error);
    let tracking = format!("cairn-{first}");
    assert!(
        bitmaps(&file).contains(&tracking),
        "no bitmap {tracking} after the full export: {:?}",
        bitmaps(&file)
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 1M",
            file.to_str().unwrap(),
        ],
    );
    let second = snapshot(&mut h, &config, 2).await;
    let inc = cli.run(ExportAction::Export, second, &target, true).await;
    assert_eq!(inc.state, ExportState::Done, "{}", inc.error);
    assert!(!inc.fell_back_to_full, "{:?}", inc.volumes);
    assert_eq!(inc.volumes[0].kind, ExportKind::Incremental);
    assert_eq!(inc.volumes[0].data_bytes, MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_target_is_refused_and_one_that_fills_up_leaves_no_partial_export() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 64, 48).await;
    let id = snapshot(&mut h, &config, 1).await;

    let tiny = Tmpfs::new(&h.root.path().join("tiny"), "4M");
    let refused = cli.run(ExportAction::Export, id, &tiny.0, false).await;
    assert_eq!(refused.state, ExportState::Failed);
    assert!(refused.error.contains("is full"), "{}", refused.error);
    assert!(entries(&tiny.0).is_empty());

    // Room to start, not to finish: 48 MiB of random data do not fit in 24 MiB.
    let small = Tmpfs::new(&h.root.path().join("small"), "24M");
    let failed = cli.run(ExportAction::Export, id, &small.0, false).await;
    assert_eq!(failed.state, ExportState::Failed);
    assert!(
        failed.error.contains("the target is full")
            && failed.error.contains(&config.volume_id.to_string()),
        "{}",
        failed.error
    );
    assert!(entries(&small.0).is_empty(), "{:?}", entries(&small.0));
}

/// The app config saved with the snapshot is read with the record loader: one that fails its
/// checks (here a mandatory field missing) fails the export naming the file, instead of being
/// copied into the manifest as it is; a sound one gives the manifest its name and content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_config_is_read_as_a_record_and_a_bad_one_fails_the_export_naming_it() {
    use cairn_types::app::AppInstanceConfig;
    use cairn_types::snapshot::SnapshotDesc;
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, _) = volume_with_data(&mut h, 16, 1).await;
    let id = snapshot(&mut h, &config, 1).await;
    let target = h.root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let file = cairn_types::layout::snapshot_dir(&h.persist, id)
        .join(cairn_types::layout::APP_INSTANCE_CONFIG_FILE);

    std::fs::write(&file, br#"{"DisplayName": "web"}"#).unwrap();
    let bad = cli.run(ExportAction::Export, id, &target, false).await;
    assert_eq!(bad.state, ExportState::Failed, "{bad:?}");
    assert!(
        bad.error.contains(&file.display().to_string()) && bad.error.contains("UUIDandVersion"),
        "{}",
        bad.error
    );
    assert!(entries(&target).is_empty());

    let mut app = AppInstanceConfig {
        display_name: "web".into(),
        ..AppInstanceConfig::default()
    };
    app.uuid_and_version.uuid = Uuid::new_v4();
    app.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: id,
        name: "before-upgrade".into(),
        ..SnapshotDesc::default()
    });
    cairn_persist::store(&file, &app).unwrap();
    let done = cli.run(ExportAction::Export, id, &target, false).await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let m = manifest(&done.export_dir);
    assert_eq!(
        (m.app_name.as_str(), m.snapshot_name.as_str()),
        ("web", "before-upgrade")
    );
    assert_eq!(m.app_config["DisplayName"], "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_volume_exports_as_a_tree_and_imports_with_owners_modes_times_links_and_xattrs()
{
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let mut cli = Cli::new(&h).await;
    let (config, id) = tree_volume_snapshot(&mut h).await;
    let target = h.root.path().join("exports");
    std::fs::create_dir(&target).unwrap();
    let done = cli.run(ExportAction::Export, id, &target, false).await;
    assert_eq!(done.state, ExportState::Done, "{}", done.error);
    let m = manifest(&done.export_dir);
    assert_eq!(
        m.volumes[0].content,
        cairn_types::export::ExportContent::Tree
    );
    assert_eq!(m.volumes[0].file, format!("{}.tar.zst", config.volume_id));
    let ok = cli
        .run(ExportAction::Verify, Uuid::nil(), &done.export_dir, false)
        .await;
    assert_eq!(ok.state, ExportState::Done, "{}", ok.error);

    let mut restored = common::volume(VolumeFormat::Dir, 64 * MIB);
    restored.origin = VolumeOrigin::Export {
        dir: done.export_dir.clone(),
        volume: config.volume_id,
    };
    h.volume_configs.publish(restored.clone()).await.unwrap();
    let status = h.ready(&restored).await;
    assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
    assert_same_tree(&h, &config, id, &h.volume_file(&restored));

    // The tree asked for as an image: refused, saying what the export holds.
    let mut wrong = common::volume(VolumeFormat::Qcow2, 64 * MIB);
    wrong.origin = restored.origin.clone();
    h.volume_configs.publish(wrong.clone()).await.unwrap();
    let status = h.ready(&wrong).await;
    assert_eq!(status.state, VolumeState::Failed, "{status:?}");
    assert!(
        status.error.error.contains("directory tree"),
        "{}",
        status.error.error
    );
}

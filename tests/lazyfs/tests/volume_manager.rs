//! Power cuts at every write of the volume-manager's snapshot work, with the real manager on a
//! directory volume in the copy and rsync restore modes: a snapshot's record (intent, then
//! final) and its copy, a rollback, a delete, a new volume. See `power_cut.rs` for the cuts.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_types::volume::DirRestoreMode;
use common::*;

/// What the volume held when the snapshot was taken.
const VOLUME_CONTENT: &[u8] = b"the volume's content at snapshot time";

/// The restore modes of a directory volume on a plain file system: the copy backend (what
/// `auto` chooses off btrfs) and rsync.
const RESTORE_MODES: [DirRestoreMode; 2] = [DirRestoreMode::Auto, DirRestoreMode::Rsync];

const VOLUME_ID: uuid::Uuid = uuid::Uuid::from_u128(0x501);

fn dir_volume(mode: DirRestoreMode) -> cairn_types::volume::VolumeConfig {
    cairn_types::volume::VolumeConfig {
        restore_mode: mode,
        volume_id: VOLUME_ID,
        display_name: "data".into(),
        max_vol_size: 1 << 20,
        format: cairn_types::volume::VolumeFormat::Dir,
        origin: cairn_types::volume::VolumeOrigin::Blank,
        ..Default::default()
    }
}

fn snapshot_request() -> cairn_types::snapshot::VolumesSnapshotConfig {
    cairn_types::snapshot::VolumesSnapshotConfig {
        snapshot_id: uuid::Uuid::from_u128(0x5a0),
        action: cairn_types::snapshot::VolumesSnapshotAction::Create,
        volume_ids: vec![VOLUME_ID],
        app_uuid: uuid::Uuid::from_u128(0xa99),
        request_counter: 1,
        ..Default::default()
    }
}

/// The same snapshot, asked `action` as the request numbered `counter`.
fn snapshot_request_to(
    action: cairn_types::snapshot::VolumesSnapshotAction,
    counter: u64,
) -> cairn_types::snapshot::VolumesSnapshotConfig {
    cairn_types::snapshot::VolumesSnapshotConfig {
        action,
        request_counter: counter,
        ..snapshot_request()
    }
}

/// What a check finds for a value that is there and right.
const RIGHT: Found = Found::Value {
    seq: 1,
    from_backup: false,
};

/// Whether the manager answered with a finished snapshot status free of error.
fn succeeded(out: &[cairn_volume_manager::Publish]) -> bool {
    out.iter().any(|p| {
        matches!(p, cairn_volume_manager::Publish::Snapshot(s) if !s.error.is_error() && !s.is_in_progress())
    })
}

/// The findings of a restarted manager: every record it could not read.
fn unreadable(m: &cairn_volume_manager::VolumeManager) -> BTreeMap<String, Found> {
    m.unreadable_records
        .iter()
        .map(|(path, why)| (path.display().to_string(), Found::Unreadable(why.clone())))
        .collect()
}

/// A finished record's snapshot: right, failed with its reason, or not what it says.
fn finished_record(record: &cairn_types::snapshot::VolumesSnapshotStatus) -> Found {
    if record.error.is_error() {
        return Found::Failed(record.error.error.clone());
    }
    match snapshot_content(record) {
        Ok(()) => RIGHT,
        Err(why) => Found::Unreadable(why),
    }
}

/// Notes in `out` that the request asked again after the cut did not end as it should.
fn converged(
    out: &mut BTreeMap<String, Found>,
    what: &str,
    ok: bool,
    detail: impl std::fmt::Debug,
) {
    if !ok {
        out.insert(
            format!("after the {what} again"),
            Found::Unreadable(format!("does not converge: {detail:?}")),
        );
    }
}

/// A manager on `root`, as the agent opens it at start. The tools are detected once per test
/// process: they do not change between runs, and detecting them runs each one.
async fn volume_manager(root: &Path) -> cairn_volume_manager::VolumeManager {
    static TOOLS: tokio::sync::OnceCell<cairn_volume_manager::Tools> =
        tokio::sync::OnceCell::const_new();
    let tools = TOOLS
        .get_or_init(cairn_volume_manager::Tools::detect)
        .await
        .clone();
    cairn_volume_manager::VolumeManager::open(root, tools, Vec::new()).await
}

/// The snapshot a finished record describes holds what the volume held when it was taken.
fn snapshot_content(record: &cairn_types::snapshot::VolumesSnapshotStatus) -> Result<(), String> {
    for value in record.volume_snapshot_meta.values() {
        let meta = cairn_types::volume::VolumeSnapshotMeta::from_value(value);
        let file = meta.snapshot_location.join("file");
        match std::fs::read(&file) {
            Ok(bytes) if bytes == VOLUME_CONTENT => {}
            Ok(bytes) => {
                return Err(format!(
                    "the record says made, the snapshot's {} holds {:?}",
                    file.display(),
                    String::from_utf8_lossy(&bytes)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the record says made, the snapshot's {} cannot be read: {e}",
                    file.display()
                ));
            }
        }
    }
    Ok(())
}

/// Snapshot record lifecycle (intent, then final) with the real manager on a directory volume.
/// The volume and its content are made durable before the snapshot, as a volume made and
/// written long before would be; the crash points are the snapshot's requests.
#[test]
fn a_snapshot_record_and_its_snapshot_survive_a_cut_at_every_request() {
    for mode in RESTORE_MODES {
        snapshot_create_in(mode);
    }
}

fn snapshot_create_in(mode: DirRestoreMode) {
    use cairn_volume_manager::Publish;
    let rt = runtime();
    let key = "snapshot 5a0";
    both_modes(
        &format!("volume-manager snapshot create, restore mode {mode:?}"),
        &mut |root| {
            rt.block_on(async {
                // Not counted: the volume and its content exist before the snapshot.
                let mut m = volume_manager(root).await;
                m.handle_app_volume_refs_complete().await;
                let out = m.handle_volume_config(dir_volume(mode)).await;
                let Some(Publish::Volume(volume)) = out.first() else {
                    panic!("no volume made: {out:?}");
                };
                std::fs::write(volume.file_location.join("file"), VOLUME_CONTENT).unwrap();
            });
        },
        &mut |root, ledger| {
            rt.block_on(async {
                // A restarted manager, as after the reboot that made the volume durable.
                let mut m = volume_manager(root).await;
                m.handle_app_volume_refs_complete().await;
                m.handle_volume_config(dir_volume(mode)).await;
                ledger.begin(key, Some(1));
                if succeeded(&m.handle_snapshot_config(snapshot_request()).await) {
                    ledger.ack(key);
                }
            });
        },
        &mut |root, cut| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let mut out = unreadable(&m);
                let state = match m.record(snapshot_request().snapshot_id) {
                    None => Found::Absent,
                    Some(r) if r.is_in_progress() => Found::Absent,
                    Some(r) => finished_record(r),
                };
                out.insert(key.to_string(), state);
                if matches!(cut, Cut::FailThenEnd(_)) {
                    // A failed create stays failed until the controller asks anew.
                    return out;
                }
                // And the device converges: the request asked again ends made, and right.
                m.handle_app_volume_refs_complete().await;
                m.handle_volume_config(dir_volume(mode)).await;
                let again = m.handle_snapshot_config(snapshot_request()).await;
                let answer = again.iter().find_map(|p| match p {
                    Publish::Snapshot(s) => Some(s.clone()),
                    _ => None,
                });
                match answer {
                    Some(s) if !s.error.is_error() && !s.is_in_progress() => {
                        if let Err(why) = snapshot_content(&s) {
                            out.insert("after the request again".into(), Found::Unreadable(why));
                        }
                    }
                    other => converged(&mut out, "request", false, other),
                }
                out
            })
        },
    );
}

/// What the volume holds after the snapshot, until a rollback.
const LATER_CONTENT: &[u8] = b"written after the snapshot";

/// The volume's file, as a manager restarted on `root` finds the volume.
async fn volume_file(m: &mut cairn_volume_manager::VolumeManager, mode: DirRestoreMode) -> PathBuf {
    use cairn_volume_manager::Publish;
    m.handle_app_volume_refs_complete().await;
    let out = m.handle_volume_config(dir_volume(mode)).await;
    match out.first() {
        Some(Publish::Volume(volume)) => volume.file_location.join("file"),
        other => panic!("no volume: {other:?}"),
    }
}

/// A rollback of a directory volume to a snapshot: after any cut the volume holds its content
/// from before the rollback or the snapshot's, never a mix or empty files; after an
/// acknowledged rollback, the snapshot's.
#[test]
fn a_rollback_survives_a_cut_at_every_request() {
    for mode in RESTORE_MODES {
        rollback_in(mode);
    }
}

fn rollback_in(mode: DirRestoreMode) {
    use cairn_types::snapshot::VolumesSnapshotAction;
    let rt = runtime();
    let key = "volume after rollback";
    let rollback = || snapshot_request_to(VolumesSnapshotAction::Rollback, 2);
    let content = |file: &Path| match std::fs::read(file) {
        Ok(bytes) if bytes == VOLUME_CONTENT => RIGHT,
        Ok(bytes) if bytes == LATER_CONTENT => Found::Absent,
        Ok(bytes) => Found::Unreadable(format!(
            "the volume's {} holds {:?}",
            file.display(),
            String::from_utf8_lossy(&bytes)
        )),
        Err(e) => Found::Unreadable(format!("the volume's {} : {e}", file.display())),
    };
    both_modes(
        &format!("volume-manager rollback, restore mode {mode:?}"),
        &mut |root| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let file = volume_file(&mut m, mode).await;
                std::fs::write(&file, VOLUME_CONTENT).unwrap();
                let out = m.handle_snapshot_config(snapshot_request()).await;
                assert!(succeeded(&out), "the snapshot before the rollback: {out:?}");
                std::fs::write(&file, LATER_CONTENT).unwrap();
            });
        },
        &mut |root, ledger| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                volume_file(&mut m, mode).await;
                ledger.begin(key, Some(1));
                let out = m.handle_snapshot_config(rollback()).await;
                if succeeded(&out) {
                    ledger.ack(key);
                }
            });
        },
        &mut |root, cut| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let mut out = unreadable(&m);
                let file = volume_file(&mut m, mode).await;
                out.insert(key.to_string(), content(&file));
                if matches!(cut, Cut::FailThenEnd(_)) {
                    return out;
                }
                // Converges: the rollback asked again ends done, the volume as the snapshot.
                let again = m.handle_snapshot_config(rollback()).await;
                let after = content(&file);
                let ok = succeeded(&again) && matches!(after, Found::Value { .. });
                converged(&mut out, "rollback", ok, (after, again));
                out
            })
        },
    );
}

/// Where the copy backend keeps the snapshot of `dir_volume` taken by `snapshot_request`.
fn snapshot_location(root: &Path) -> PathBuf {
    root.join("volumes/.snapshots")
        .join(format!("{VOLUME_ID}#0"))
        .join(snapshot_request().snapshot_id.to_string())
}

/// A snapshot delete: after any cut the record and the snapshot are both there (the record
/// finished or marked being deleted) or both gone; a snapshot without its record is a leak
/// nobody will delete. After an acknowledged delete, both are gone.
#[test]
fn a_snapshot_delete_survives_a_cut_at_every_request() {
    for mode in RESTORE_MODES {
        snapshot_delete_in(mode);
    }
}

fn snapshot_delete_in(mode: DirRestoreMode) {
    use cairn_types::snapshot::VolumesSnapshotAction;
    let rt = runtime();
    let key = "snapshot 5a0";
    let delete = || snapshot_request_to(VolumesSnapshotAction::Delete, 2);
    let state = |m: &cairn_volume_manager::VolumeManager, root: &Path| {
        let there = snapshot_location(root).exists();
        match m.record(snapshot_request().snapshot_id) {
            None if there => Found::Unreadable(format!(
                "leak: the snapshot {} is there without its record",
                snapshot_location(root).display()
            )),
            None => Found::Absent,
            Some(r) if r.is_in_progress() => RIGHT,
            Some(r) => finished_record(r),
        }
    };
    both_modes(
        &format!("volume-manager snapshot delete, restore mode {mode:?}"),
        &mut |root| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let file = volume_file(&mut m, mode).await;
                std::fs::write(&file, VOLUME_CONTENT).unwrap();
                let out = m.handle_snapshot_config(snapshot_request()).await;
                assert!(succeeded(&out), "the snapshot to delete: {out:?}");
            });
        },
        &mut |root, ledger| {
            rt.block_on(async {
                ledger.known(key, Some(1));
                let mut m = volume_manager(root).await;
                volume_file(&mut m, mode).await;
                ledger.begin(key, None);
                if succeeded(&m.handle_snapshot_config(delete()).await) {
                    ledger.ack(key);
                }
            });
        },
        &mut |root, cut| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let mut out = unreadable(&m);
                volume_file(&mut m, mode).await;
                out.insert(key.to_string(), state(&m, root));
                if matches!(cut, Cut::FailThenEnd(_)) {
                    return out;
                }
                // Converges: the delete asked again ends with both gone.
                let again = m.handle_snapshot_config(delete()).await;
                let after = state(&m, root);
                let ok = succeeded(&again) && matches!(after, Found::Absent);
                converged(&mut out, "delete", ok, (after, again));
                out
            })
        },
    );
}

/// A directory volume made: once the manager said Ready (and published it), the volume is
/// there after a cut; a restarted manager would otherwise report it missing.
/// The workload of a new volume: a manager opened on `root` makes `config`; `key` is
/// acknowledged once it answers Ready.
fn make_volume(
    rt: &tokio::runtime::Runtime,
    root: &Path,
    ledger: &mut Ledger<'_>,
    key: &str,
    config: cairn_types::volume::VolumeConfig,
) {
    use cairn_types::volume::VolumeState;
    use cairn_volume_manager::Publish;
    rt.block_on(async {
        let mut m = volume_manager(root).await;
        m.handle_app_volume_refs_complete().await;
        ledger.begin(key, Some(1));
        let out = m.handle_volume_config(config).await;
        if matches!(out.first(), Some(Publish::Volume(v)) if v.state == VolumeState::Ready) {
            ledger.ack(key);
        }
    });
}

#[test]
fn a_new_volume_survives_a_cut_at_every_request() {
    let mode = DirRestoreMode::Auto;
    let rt = runtime();
    let key = "volume 501";
    both_modes(
        "volume-manager volume create",
        &mut |_| {},
        &mut |root, ledger| make_volume(&rt, root, ledger, key, dir_volume(mode)),
        &mut |root, _| {
            let dir = root.join("volumes").join(format!("{VOLUME_ID}#0"));
            let got = if dir.is_dir() { RIGHT } else { Found::Absent };
            BTreeMap::from([(key.to_string(), got)])
        },
    );
}

/// A qcow2 volume made from a base image by `qemu-img convert`, which leaves what it writes in
/// the page cache: once the manager says Ready, a cut must find the image whole.
#[test]
fn a_volume_made_from_a_base_image_survives_a_cut_at_every_request() {
    use cairn_types::volume::{VolumeFormat, VolumeOrigin};
    const IMAGE_VOLUME_ID: uuid::Uuid = uuid::Uuid::from_u128(0x502);
    const MIB: u64 = 1 << 20;
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.qcow2");
    let qemu = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        out
    };
    let base_str = base.to_str().unwrap();
    qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base_str, "16M"],
    );
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 90 0 {MIB}"),
            base_str,
        ],
    );
    let config = cairn_types::volume::VolumeConfig {
        volume_id: IMAGE_VOLUME_ID,
        display_name: "disk".into(),
        max_vol_size: 16 * MIB,
        format: VolumeFormat::Qcow2,
        origin: VolumeOrigin::BaseImage {
            path: base.clone(),
            sha256: cairn_persist::digest::sha256_file(&base).unwrap(),
        },
        ..Default::default()
    };
    let rt = runtime();
    let key = "volume 502";
    both_modes(
        "volume-manager volume from a base image",
        &mut |_| {},
        &mut |root, ledger| make_volume(&rt, root, ledger, key, config.clone()),
        &mut |root, _| {
            let file = root
                .join("volumes")
                .join(format!("{IMAGE_VOLUME_ID}#0.qcow2"));
            let got = if !file.exists() {
                Found::Absent
            } else {
                let read = std::process::Command::new("qemu-io")
                    .args(["-f", "qcow2", "-r", "-c", &format!("read -P 90 0 {MIB}")])
                    .arg(&file)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&read.stdout).into_owned();
                if read.status.success() && !text.contains("Pattern verification failed") {
                    RIGHT
                } else {
                    Found::Unreadable(format!("{text}{}", String::from_utf8_lossy(&read.stderr)))
                }
            };
            BTreeMap::from([(key.to_string(), got)])
        },
    );
}

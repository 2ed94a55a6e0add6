//! Power cuts at every write: each workload runs the real persistence code on a lazy file system,
//! once to count its requests, then once per crash point n (the power is cut right after the
//! n-th request), in both crash modes. After each cut: every record loads, or its `.bak` loads
//! and says so; and no acknowledged update is lost (acknowledged = the call that makes it
//! durable returned before the cut).
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_lazyfs::{CrashMode, LazyFs, fuse_unusable};
use cairn_persist::{Origin, Persist};
use serde::{Deserialize, Serialize};

/// A mounted lazy file system over a backing directory; both temporary.
struct Rig {
    fs: LazyFs,
    mnt: tempfile::TempDir,
    _disk: tempfile::TempDir,
}

impl Rig {
    fn new() -> Option<Self> {
        if let Some(why) = fuse_unusable() {
            eprintln!("SKIPPED: power-cut tests need FUSE: {why}");
            return None;
        }
        let disk = tempfile::Builder::new()
            .prefix("cairn-lazyfs-disk")
            .tempdir()
            .unwrap();
        let mnt = tempfile::Builder::new()
            .prefix("cairn-lazyfs-mnt")
            .tempdir()
            .unwrap();
        let fs = LazyFs::mount(disk.path(), mnt.path()).expect("mounting the lazy file system");
        Some(Self {
            fs,
            mnt,
            _disk: disk,
        })
    }

    fn root(&self) -> PathBuf {
        self.mnt.path().join("persist")
    }

    /// Empties the file system and makes that durable: each run starts from the same disk.
    fn wipe(&self) {
        let root = self.root();
        if root.exists() {
            std::fs::remove_dir_all(&root).unwrap();
        }
        std::fs::create_dir(&root).unwrap();
        self.fs.sync();
    }
}

/// What a workload did to one record: its value acknowledged last, and the one in flight.
/// Values are sequence numbers; `None` is "no record".
#[derive(Debug, Default, Clone)]
struct Track {
    acked: Option<u64>,
    in_flight: Option<Option<u64>>,
}

#[derive(Debug, Default)]
struct Ledger {
    records: BTreeMap<String, Track>,
}

impl Ledger {
    /// Before the call that writes `value` (or removes, `None`) for `key`.
    fn begin(&mut self, key: &str, value: Option<u64>) {
        self.records.entry(key.to_string()).or_default().in_flight = Some(value);
    }

    /// The call returned success: the update is acknowledged.
    fn ack(&mut self, key: &str) {
        let track = self.records.entry(key.to_string()).or_default();
        if let Some(value) = track.in_flight.take() {
            track.acked = value;
        }
    }
}

/// What reading a record back after the cut gave.
#[derive(Debug)]
enum Found {
    Value { seq: u64, from_backup: bool },
    Absent,
    Unreadable(String),
}

#[derive(Debug, Default)]
struct Figures {
    points: u64,
    unreadable: Vec<String>,
    from_backup: u64,
    lost: Vec<String>,
}

impl Figures {
    fn judge(&mut self, n: u64, ledger: &Ledger, found: &BTreeMap<String, Found>, log: &str) {
        for (key, track) in &ledger.records {
            let got = found.get(key).unwrap_or(&Found::Absent);
            let value = match got {
                Found::Value { seq, from_backup } => {
                    if *from_backup {
                        self.from_backup += 1;
                    }
                    Some(*seq)
                }
                Found::Absent => None,
                Found::Unreadable(why) => {
                    self.unreadable
                        .push(format!("crash after request {n}: {key}: {why}\n{log}"));
                    continue;
                }
            };
            let allowed = value == track.acked || track.in_flight == Some(value);
            if !allowed {
                self.lost.push(format!(
                    "crash after request {n}: {key} reads {value:?}, acknowledged {:?}, in flight {:?}\n{log}",
                    track.acked, track.in_flight
                ));
            }
        }
        for (key, got) in found {
            if let (false, Found::Unreadable(why)) = (ledger.records.contains_key(key), got) {
                self.unreadable
                    .push(format!("crash after request {n}: {key}: {why}\n{log}"));
            }
        }
    }
}

/// Counts the workload's requests, then cuts the power after each of them in turn.
fn crash_everywhere(
    rig: &Rig,
    name: &str,
    mode: CrashMode,
    setup: &mut dyn FnMut(&Path),
    workload: &mut dyn FnMut(&Path, &mut Ledger),
    check: &mut dyn FnMut(&Path) -> BTreeMap<String, Found>,
) -> Figures {
    rig.fs.set_mode(mode);
    rig.wipe();
    setup(&rig.root());
    rig.fs.sync();
    rig.fs.reset_ops();
    let mut ledger = Ledger::default();
    workload(&rig.root(), &mut ledger);
    let total = rig.fs.ops();
    assert!(!rig.fs.crashed(), "{name}: the counting run crashed");
    for (key, track) in &ledger.records {
        assert!(
            track.in_flight.is_none(),
            "{name}: {key} not acknowledged without a crash"
        );
    }

    let mut figures = Figures::default();
    for n in 0..=total {
        rig.fs.reboot().unwrap();
        rig.wipe();
        setup(&rig.root());
        rig.fs.sync();
        rig.fs.crash_after(n);
        let mut ledger = Ledger::default();
        workload(&rig.root(), &mut ledger);
        let log = rig.fs.op_log();
        let log = format!(
            "  requests up to the cut:\n{}",
            log.iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        rig.fs.reboot().unwrap();
        let found = check(&rig.root());
        figures.points += 1;
        figures.judge(n, &ledger, &found, &log);
    }
    rig.fs.reboot().unwrap();
    println!(
        "power cuts: {name} ({mode:?}): {} crash points, {} records unreadable, {} loaded from .bak, {} acknowledged updates lost",
        figures.points,
        figures.unreadable.len(),
        figures.from_backup,
        figures.lost.len()
    );
    figures
}

fn assert_clean(name: &str, figures: &Figures) {
    assert!(figures.points > 1, "{name}: no crash points");
    assert!(
        figures.unreadable.is_empty(),
        "{name}: unreadable records after a power cut:\n{}",
        figures.unreadable.join("\n")
    );
    assert!(
        figures.lost.is_empty(),
        "{name}: acknowledged updates lost at a power cut:\n{}",
        figures.lost.join("\n")
    );
}

fn both_modes(
    name: &str,
    setup: &mut dyn FnMut(&Path),
    workload: &mut dyn FnMut(&Path, &mut Ledger),
    check: &mut dyn FnMut(&Path) -> BTreeMap<String, Found>,
) {
    let Some(rig) = Rig::new() else { return };
    for mode in [CrashMode::DropAll, CrashMode::KeepEntries] {
        let figures = crash_everywhere(&rig, name, mode, setup, workload, check);
        assert_clean(name, &figures);
    }
}

// ---- cairn-persist -----------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Persist)]
#[persist(record = "PowerCutProbe", version = 1)]
struct Probe {
    #[persist(mandatory)]
    seq: u64,
    /// Enough bytes that a record is more than one small write.
    padding: String,
}

fn probe(seq: u64) -> Probe {
    Probe {
        seq,
        padding: "x".repeat(3000),
    }
}

fn found<E: std::fmt::Display>(result: Result<cairn_persist::Loaded<Probe>, E>) -> Found {
    match result {
        Ok(loaded) => Found::Value {
            seq: loaded.record.seq,
            from_backup: matches!(loaded.origin, Origin::Backup { .. }),
        },
        Err(e) if e.to_string().contains("does not exist") => Found::Absent,
        Err(e) => Found::Unreadable(e.to_string()),
    }
}

#[test]
fn persist_store_and_remove_survive_a_cut_at_every_request() {
    let path = |root: &Path, name: &str| root.join("records").join("deep").join(name);
    both_modes(
        "cairn_persist::store/remove",
        &mut |_| {},
        &mut |root, ledger| {
            for seq in 1..=3 {
                for name in ["a.json", "b.json"] {
                    ledger.begin(name, Some(seq));
                    if cairn_persist::store(&path(root, name), &probe(seq)).is_err() {
                        return;
                    }
                    ledger.ack(name);
                }
            }
            ledger.begin("b.json", None);
            if cairn_persist::remove(&path(root, "b.json")).is_err() {
                return;
            }
            ledger.ack("b.json");
        },
        &mut |root| {
            ["a.json", "b.json"]
                .into_iter()
                .map(|name| {
                    let result = cairn_persist::load::<Probe>(&path(root, name));
                    (name.to_string(), found(result))
                })
                .collect()
        },
    );
}

#[test]
fn persist_store_with_backup_survives_a_cut_at_every_request() {
    let path = |root: &Path| root.join("checkpoint").join("record");
    both_modes(
        "cairn_persist::store_with_backup",
        &mut |_| {},
        &mut |root, ledger| {
            for seq in 1..=4 {
                ledger.begin("record", Some(seq));
                if cairn_persist::store_with_backup(&path(root), &probe(seq)).is_err() {
                    return;
                }
                ledger.ack("record");
            }
        },
        &mut |root| {
            let mut out = BTreeMap::new();
            out.insert(
                "record".to_string(),
                found(cairn_persist::load_with_backup::<Probe>(&path(root))),
            );
            // The backup itself, when there is one, must be a whole record too.
            let bak = cairn_persist::backup_path(&path(root));
            if bak.exists()
                && let Err(e) = cairn_persist::load::<Probe>(&bak)
            {
                out.insert("record.bak".to_string(), Found::Unreadable(e.to_string()));
            }
            out
        },
    );
}

// ---- the config-agent's checkpoint -------------------------------------------------------

fn edge_config(seq: u64) -> cairn_config_agent::proto::EdgeDevConfig {
    use cairn_config_agent::proto;
    proto::EdgeDevConfig {
        apps: vec![proto::AppInstanceConfig {
            uuidandversion: Some(proto::UuidAndVersion {
                uuid: "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into(),
                version: seq.to_string(),
            }),
            activate: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn the_config_checkpoint_survives_a_cut_at_every_request() {
    use cairn_config_agent::checkpoint;
    both_modes(
        "config-agent checkpoint",
        &mut |_| {},
        &mut |root, ledger| {
            for seq in 1..=3 {
                ledger.begin("lastconfig", Some(seq));
                if checkpoint::save(root, &format!("hash-{seq}"), &edge_config(seq)).is_err() {
                    return;
                }
                ledger.ack("lastconfig");
            }
        },
        &mut |root| {
            let got = match checkpoint::load(root) {
                Ok(restored) => {
                    let seq = restored.config.apps[0]
                        .uuid_and_version
                        .version
                        .parse::<u64>();
                    match (
                        seq,
                        restored.hash.strip_prefix("hash-").map(str::parse::<u64>),
                    ) {
                        (Ok(seq), Some(Ok(hash))) if seq == hash => Found::Value {
                            seq,
                            from_backup: restored.from_backup.is_some(),
                        },
                        _ => Found::Unreadable(format!(
                            "hash {} does not match config version {}",
                            restored.hash, restored.config.apps[0].uuid_and_version.version
                        )),
                    }
                }
                Err(e) if e.to_string().contains("does not exist") => Found::Absent,
                Err(e) => Found::Unreadable(e.to_string()),
            };
            BTreeMap::from([("lastconfig".to_string(), got)])
        },
    );
}

// ---- the bus's persistent topics ---------------------------------------------------------

fn volume_status(id: u128, seq: u64) -> cairn_types::volume::VolumeStatus {
    cairn_types::volume::VolumeStatus {
        volume_id: uuid::Uuid::from_u128(id),
        display_name: format!("seq-{seq}"),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_persistent_topic_survives_a_cut_at_every_request() {
    use cairn_pubsub::{Bus, PublishOptions};
    use cairn_types::volume::VolumeStatus;
    let rt = runtime();
    let run = tempfile::Builder::new()
        .prefix("cairn-lazyfs-run")
        .tempdir()
        .unwrap();
    let options = || PublishOptions {
        persistent: true,
        ..Default::default()
    };
    let keys = [volume_status(1, 0).key(), volume_status(2, 0).key()];
    both_modes(
        "bus persistent topic",
        &mut |_| {},
        &mut |root, ledger| {
            rt.block_on(async {
                let bus = Bus::new("volume-manager", run.path(), root);
                let Ok(publication) = bus.publish::<VolumeStatus>(options()).await else {
                    return;
                };
                for seq in 1..=2 {
                    for (i, key) in keys.iter().enumerate() {
                        ledger.begin(key, Some(seq));
                        let value = volume_status(i as u128 + 1, seq);
                        if publication.publish(value).await.is_err() {
                            return;
                        }
                        ledger.ack(key);
                    }
                }
                ledger.begin(&keys[1], None);
                if publication.unpublish(&keys[1]).await.is_err() {
                    return;
                }
                ledger.ack(&keys[1]);
            });
        },
        &mut |root| {
            rt.block_on(async {
                // The restarted publisher's own reload of its key files.
                let bus = Bus::new("volume-manager", run.path(), root);
                let publication = bus
                    .publish::<VolumeStatus>(options())
                    .await
                    .expect("the publication reopens after a power cut");
                let mut out: BTreeMap<String, Found> = keys
                    .iter()
                    .map(|key| {
                        let got = match publication.get(key) {
                            Some(v) => match v.display_name.strip_prefix("seq-").map(str::parse) {
                                Some(Ok(seq)) => Found::Value {
                                    seq,
                                    from_backup: false,
                                },
                                _ => Found::Unreadable(format!("wrong value {v:?}")),
                            },
                            None => Found::Absent,
                        };
                        (key.clone(), got)
                    })
                    .collect();
                for (path, why) in publication.load_problems() {
                    out.insert(path.display().to_string(), Found::Unreadable(why));
                }
                out
            })
        },
    );
}

// ---- the volume-manager's intent records ---------------------------------------------------

/// What the volume held when the snapshot was taken.
const VOLUME_CONTENT: &[u8] = b"the volume's content at snapshot time";

fn dir_volume() -> cairn_types::volume::VolumeConfig {
    cairn_types::volume::VolumeConfig {
        volume_id: uuid::Uuid::from_u128(0x501),
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
        volume_ids: vec![dir_volume().volume_id],
        app_uuid: uuid::Uuid::from_u128(0xa99),
        request_counter: 1,
        ..Default::default()
    }
}

async fn volume_manager(root: &Path) -> cairn_volume_manager::VolumeManager {
    let tools = cairn_volume_manager::Tools::detect().await;
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
    use cairn_volume_manager::Publish;
    let rt = runtime();
    let key = "snapshot 5a0";
    both_modes(
        "volume-manager snapshot create",
        &mut |root| {
            rt.block_on(async {
                // Not counted: the volume and its content exist before the snapshot.
                let mut m = volume_manager(root).await;
                m.handle_app_volume_refs_complete().await;
                let out = m.handle_volume_config(dir_volume()).await;
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
                m.handle_volume_config(dir_volume()).await;
                ledger.begin(key, Some(1));
                let out = m.handle_snapshot_config(snapshot_request()).await;
                let made = out.iter().any(|p| {
                    matches!(p, Publish::Snapshot(s) if !s.error.is_error() && !s.is_in_progress())
                });
                if made {
                    ledger.ack(key);
                }
            });
        },
        &mut |root| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let mut out = BTreeMap::new();
                for (path, why) in &m.unreadable_records {
                    out.insert(path.display().to_string(), Found::Unreadable(why.clone()));
                }
                let id = snapshot_request().snapshot_id;
                let state = match m.record(id) {
                    None => Found::Absent,
                    Some(r) if r.is_in_progress() => Found::Absent,
                    Some(r) if r.error.is_error() => {
                        Found::Unreadable(format!("failed record: {}", r.error.error))
                    }
                    Some(r) => match snapshot_content(r) {
                        Ok(()) => Found::Value {
                            seq: 1,
                            from_backup: false,
                        },
                        Err(why) => Found::Unreadable(why),
                    },
                };
                out.insert(key.to_string(), state);
                // And the device converges: the request asked again ends made, and right.
                m.handle_app_volume_refs_complete().await;
                m.handle_volume_config(dir_volume()).await;
                let again = m.handle_snapshot_config(snapshot_request()).await;
                let converged = again.iter().find_map(|p| match p {
                    Publish::Snapshot(s) => Some(s.clone()),
                    _ => None,
                });
                match converged {
                    Some(s) if !s.error.is_error() && !s.is_in_progress() => {
                        if let Err(why) = snapshot_content(&s) {
                            out.insert("after the request again".into(), Found::Unreadable(why));
                        }
                    }
                    other => {
                        out.insert(
                            "after the request again".into(),
                            Found::Unreadable(format!("does not converge: {other:?}")),
                        );
                    }
                }
                out
            })
        },
    );
}

/// What the volume holds after the snapshot, until a rollback.
const LATER_CONTENT: &[u8] = b"written after the snapshot";

/// The volume's file, as a manager restarted on `root` finds the volume.
async fn volume_file(m: &mut cairn_volume_manager::VolumeManager) -> PathBuf {
    use cairn_volume_manager::Publish;
    m.handle_app_volume_refs_complete().await;
    let out = m.handle_volume_config(dir_volume()).await;
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
    use cairn_types::snapshot::VolumesSnapshotAction;
    use cairn_volume_manager::Publish;
    let rt = runtime();
    let key = "volume after rollback";
    let rollback = || cairn_types::snapshot::VolumesSnapshotConfig {
        action: VolumesSnapshotAction::Rollback,
        request_counter: 2,
        ..snapshot_request()
    };
    let succeeded = |out: &[Publish]| {
        out.iter().any(
            |p| matches!(p, Publish::Snapshot(s) if !s.error.is_error() && !s.is_in_progress()),
        )
    };
    let content = |file: &Path| match std::fs::read(file) {
        Ok(bytes) if bytes == VOLUME_CONTENT => Found::Value {
            seq: 1,
            from_backup: false,
        },
        Ok(bytes) if bytes == LATER_CONTENT => Found::Absent,
        Ok(bytes) => Found::Unreadable(format!(
            "the volume's {} holds {:?}",
            file.display(),
            String::from_utf8_lossy(&bytes)
        )),
        Err(e) => Found::Unreadable(format!("the volume's {} : {e}", file.display())),
    };
    both_modes(
        "volume-manager rollback",
        &mut |root| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let file = volume_file(&mut m).await;
                std::fs::write(&file, VOLUME_CONTENT).unwrap();
                let out = m.handle_snapshot_config(snapshot_request()).await;
                assert!(succeeded(&out), "the snapshot before the rollback: {out:?}");
                std::fs::write(&file, LATER_CONTENT).unwrap();
            });
        },
        &mut |root, ledger| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                volume_file(&mut m).await;
                ledger.begin(key, Some(1));
                let out = m.handle_snapshot_config(rollback()).await;
                if succeeded(&out) {
                    ledger.ack(key);
                }
            });
        },
        &mut |root| {
            rt.block_on(async {
                let mut m = volume_manager(root).await;
                let mut out = BTreeMap::new();
                for (path, why) in &m.unreadable_records {
                    out.insert(path.display().to_string(), Found::Unreadable(why.clone()));
                }
                let file = volume_file(&mut m).await;
                out.insert(key.to_string(), content(&file));
                // Converges: the rollback asked again ends done, the volume as the snapshot.
                let again = m.handle_snapshot_config(rollback()).await;
                let after = content(&file);
                if !succeeded(&again) || !matches!(after, Found::Value { .. }) {
                    out.insert(
                        "after the rollback again".into(),
                        Found::Unreadable(format!("does not converge: {after:?}, {again:?}")),
                    );
                }
                out
            })
        },
    );
}

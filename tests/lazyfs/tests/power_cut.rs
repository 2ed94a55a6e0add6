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
    workload: &mut dyn FnMut(&Path, &mut Ledger),
    check: &mut dyn FnMut(&Path) -> BTreeMap<String, Found>,
) -> Figures {
    rig.fs.set_mode(mode);
    rig.wipe();
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
    workload: &mut dyn FnMut(&Path, &mut Ledger),
    check: &mut dyn FnMut(&Path) -> BTreeMap<String, Found>,
) {
    let Some(rig) = Rig::new() else { return };
    for mode in [CrashMode::DropAll, CrashMode::KeepEntries] {
        let figures = crash_everywhere(&rig, name, mode, workload, check);
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

//! The power-cut harness: a lazy file system per test, a workload run once to count its
//! requests and then once per cut, a ledger of what the workload had acknowledged, and the
//! judgement of what a check read back after the cut.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_lazyfs::{CrashMode, LazyFs, fuse_unusable};

/// A mounted lazy file system over a backing directory; both temporary.
pub struct Rig {
    pub fs: LazyFs,
    pub mnt: tempfile::TempDir,
    /// The disk: after a reboot it holds the durable state.
    pub disk: tempfile::TempDir,
}

impl Rig {
    pub fn new() -> Option<Self> {
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
        Some(Self { fs, mnt, disk })
    }

    pub fn root(&self) -> PathBuf {
        self.mnt.path().join("persist")
    }

    /// Empties the file system and makes that durable: each run starts from the same disk.
    pub fn wipe(&self) {
        let root = self.root();
        if root.exists() {
            std::fs::remove_dir_all(&root).unwrap();
        }
        std::fs::create_dir(&root).unwrap();
        self.fs.sync();
    }
}

/// What a workload did to one record: its value acknowledged last, and the ones attempted
/// since (in flight at the cut, or failed: either may have reached the disk). Values are
/// sequence numbers; `None` is "no record".
#[derive(Debug, Default, Clone)]
pub struct Track {
    pub acked: Option<u64>,
    pub attempted: Vec<Option<u64>>,
}

pub struct Ledger<'a> {
    pub records: BTreeMap<String, Track>,
    /// Nothing starts or returns after the power cut: the process died with it. (Here it goes
    /// on, every request failing, and must not count as acknowledged what it does then.)
    fs: &'a LazyFs,
}

impl<'a> Ledger<'a> {
    pub fn new(fs: &'a LazyFs) -> Self {
        Self {
            records: BTreeMap::new(),
            fs,
        }
    }

    /// Before the call that writes `value` (or removes, `None`) for `key`.
    pub fn begin(&mut self, key: &str, value: Option<u64>) {
        if self.fs.crashed() {
            return;
        }
        self.records
            .entry(key.to_string())
            .or_default()
            .attempted
            .push(value);
    }

    /// What `key` held before the workload, acknowledged long ago.
    pub fn known(&mut self, key: &str, value: Option<u64>) {
        self.records.entry(key.to_string()).or_default().acked = value;
    }

    /// The call returned success: the update is acknowledged.
    pub fn ack(&mut self, key: &str) {
        if self.fs.crashed() {
            return;
        }
        let track = self.records.entry(key.to_string()).or_default();
        if let Some(value) = track.attempted.pop() {
            track.acked = value;
        }
        track.attempted.clear();
    }
}

/// What reading a record back after the cut gave.
#[derive(Debug)]
pub enum Found {
    Value {
        seq: u64,
        from_backup: bool,
    },
    Absent,
    Unreadable(String),
    /// A record that says its action failed, with the reason: a possible outcome of a call
    /// that failed, never of one acknowledged as done.
    Failed(String),
}

#[derive(Debug, Default)]
pub struct Figures {
    pub points: u64,
    pub faults: u64,
    unreadable: Vec<String>,
    from_backup: u64,
    lost: Vec<String>,
}

impl Figures {
    fn judge(&mut self, cut: &str, ledger: &Ledger, found: &BTreeMap<String, Found>, log: &str) {
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
                Found::Failed(why) => {
                    if track.attempted.is_empty() {
                        self.lost.push(format!(
                            "{cut}: {key} acknowledged, reads failed: {why}\n{log}"
                        ));
                    }
                    continue;
                }
                Found::Unreadable(why) => {
                    self.unreadable.push(format!("{cut}: {key}: {why}\n{log}"));
                    continue;
                }
            };
            let allowed = value == track.acked || track.attempted.contains(&value);
            if !allowed {
                self.lost.push(format!(
                    "{cut}: {key} reads {value:?}, acknowledged {:?}, attempted since {:?}\n{log}",
                    track.acked, track.attempted
                ));
            }
        }
        for (key, got) in found {
            if let (false, Found::Unreadable(why)) = (ledger.records.contains_key(key), got) {
                self.unreadable.push(format!("{cut}: {key}: {why}\n{log}"));
            }
        }
    }
}

/// Where the power is cut in one run.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// Right after the n-th counted request (0: before the first).
    After(u64),
    /// The n-th request fails with EIO (a disk error), the workload goes on, and the power
    /// is cut when it is done: a failure acknowledged as a success shows as a lost update.
    FailThenEnd(u64),
}

/// Workloads go on after a failed call, as an agent retries: a later success must not stand
/// on what the failed call left undone.
///
/// Counts the workload's requests, then cuts the power after each of them in turn, and then
/// fails each of them in turn with the cut at the end.
pub fn crash_everywhere(
    rig: &Rig,
    name: &str,
    mode: CrashMode,
    setup: &mut dyn FnMut(&Path),
    workload: &mut dyn FnMut(&Path, &mut Ledger<'_>),
    check: &mut dyn FnMut(&Path, Cut) -> BTreeMap<String, Found>,
) -> Figures {
    rig.fs.set_mode(mode);
    rig.wipe();
    setup(&rig.root());
    rig.fs.sync();
    rig.fs.reset_ops();
    let mut ledger = Ledger::new(&rig.fs);
    workload(&rig.root(), &mut ledger);
    let total = rig.fs.ops();
    assert!(!rig.fs.crashed(), "{name}: the counting run crashed");
    for (key, track) in &ledger.records {
        assert!(
            track.attempted.is_empty(),
            "{name}: {key} not acknowledged without a crash"
        );
    }

    let mut figures = Figures::default();
    let cuts = (0..=total)
        .map(Cut::After)
        .chain((1..=total).map(Cut::FailThenEnd));
    for cut in cuts {
        rig.fs.reboot().unwrap();
        rig.wipe();
        setup(&rig.root());
        rig.fs.sync();
        match cut {
            Cut::After(n) => rig.fs.crash_after(n),
            Cut::FailThenEnd(n) => rig.fs.fail_at(n),
        }
        let mut ledger = Ledger::new(&rig.fs);
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
        let found = check(&rig.root(), cut);
        match cut {
            Cut::After(_) => figures.points += 1,
            Cut::FailThenEnd(_) => figures.faults += 1,
        }
        figures.judge(&format!("{cut:?}"), &ledger, &found, &log);
    }
    rig.fs.reboot().unwrap();
    println!(
        "power cuts: {name} ({mode:?}): {} crash points, {} injected EIO + cut, {} records unreadable, {} loaded from .bak, {} acknowledged updates lost",
        figures.points,
        figures.faults,
        figures.unreadable.len(),
        figures.from_backup,
        figures.lost.len()
    );
    figures
}

pub fn assert_clean(name: &str, figures: &Figures) {
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

/// Power cuts at every request in both crash modes, and EIO at every request followed by a
/// cut at the end.
pub fn both_modes(
    name: &str,
    setup: &mut dyn FnMut(&Path),
    workload: &mut dyn FnMut(&Path, &mut Ledger<'_>),
    check: &mut dyn FnMut(&Path, Cut) -> BTreeMap<String, Found>,
) {
    let Some(rig) = Rig::new() else { return };
    for mode in [CrashMode::DropAll, CrashMode::KeepEntries] {
        let figures = crash_everywhere(&rig, name, mode, setup, workload, check);
        assert_clean(name, &figures);
    }
}

/// A runtime for the async workloads (the bus, the volume-manager).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

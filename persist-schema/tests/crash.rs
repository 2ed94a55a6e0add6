//! Crash safety with real processes and real signals: a child rewrites a record in a loop and is
//! SIGKILLed at random moments; after each kill the record must load as a whole value the child
//! wrote — the one before the interrupted write or the one after it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_persist::{ErrorKind, Persist, load, load_with_backup, store, store_with_backup};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "CAIRN_PERSIST_CRASH_CHILD";
const MODE_ENV: &str = "CAIRN_PERSIST_CRASH_MODE";
const KILLS: usize = 240;

/// A record whose parts must agree: a torn or mixed write would break `checksum_of`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "CrashCounter", version = 1)]
struct CrashCounter {
    #[persist(mandatory)]
    value: u64,
    /// Its length varies with `value` so that consecutive records differ in size.
    padding: String,
    #[persist(mandatory)]
    check: u64,
}

impl CrashCounter {
    fn new(value: u64) -> Self {
        let padding = "x".repeat((value as usize * 37) % 5000);
        Self {
            value,
            check: checksum_of(value, &padding),
            padding,
        }
    }
}

fn checksum_of(value: u64, padding: &str) -> u64 {
    value.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ padding.len() as u64
}

/// Runs as the child when `CHILD_ENV` names the record: rewrite it forever.
fn child_loop(path: &Path, with_backup: bool) -> ! {
    let mut value = match load::<CrashCounter>(path) {
        Ok(loaded) => loaded.record.value,
        Err(_) => 0,
    };
    loop {
        value += 1;
        let record = CrashCounter::new(value);
        let result = if with_backup {
            store_with_backup(path, &record)
        } else {
            store(path, &record)
        };
        if let Err(err) = result {
            eprintln!("child: {err}");
            std::process::exit(3);
        }
    }
}

/// A small deterministic generator for kill delays (no dependency needed for this).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn kill_loop(test_name: &str, with_backup: bool) {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        child_loop(Path::new(&path), std::env::var_os(MODE_ENV).is_some());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.json");
    let exe = std::env::current_exe().unwrap();
    let mut rng = XorShift(0x5eed_1234_abcd_0001 ^ with_backup as u64);
    let mut last_seen = 0u64;
    let mut writes_interrupted = 0usize;
    let started = Instant::now();

    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .envs(with_backup.then_some((MODE_ENV, "backup")))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Between 0 and 25 ms: some kills land before the first write, most mid-loop.
        std::thread::sleep(Duration::from_micros(rng.next() % 25_000));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            status.code() != Some(3),
            "the child failed to write (kill {kill})"
        );

        let loaded = if with_backup {
            load_with_backup::<CrashCounter>(&path)
        } else {
            load::<CrashCounter>(&path)
        };
        match loaded {
            Ok(loaded) => {
                let r = loaded.record;
                assert_eq!(
                    r.check,
                    checksum_of(r.value, &r.padding),
                    "kill {kill}: a mixed record loaded"
                );
                assert!(
                    r.value >= last_seen,
                    "kill {kill}: the record went back from {last_seen} to {}",
                    r.value
                );
                if r.value > last_seen {
                    writes_interrupted += 1;
                }
                last_seen = r.value;
            }
            Err(err) if matches!(err.kind, ErrorKind::NotFound) && last_seen == 0 => {}
            Err(err) => panic!("kill {kill}: the record did not load: {err}"),
        }
        // At most one stale temporary file per record, whatever the kill interrupted.
        let temps = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".tmp")
            })
            .count();
        assert!(temps <= 2, "kill {kill}: {temps} temporary files left");
    }
    eprintln!(
        "{KILLS} kills in {:.1?}: the record advanced {writes_interrupted} times, to value {last_seen}",
        started.elapsed()
    );
    assert!(
        writes_interrupted > KILLS / 4 && last_seen > KILLS as u64,
        "the child rarely got to write ({writes_interrupted} advances, last value {last_seen}): \
         the kills did not exercise the write path"
    );
}

#[test]
fn sigkill_during_store_leaves_the_old_or_the_new_record() {
    kill_loop(
        "sigkill_during_store_leaves_the_old_or_the_new_record",
        false,
    );
}

#[test]
fn sigkill_during_store_with_backup_leaves_the_old_or_the_new_record() {
    kill_loop(
        "sigkill_during_store_with_backup_leaves_the_old_or_the_new_record",
        true,
    );
}

//! store+load of a typical `SnapshotInstanceStatus` against the raw durable write of the same
//! bytes (temp file, write, fsync, rename, directory fsync), measured in the same run, runs
//! interleaved so that disk drift hits both alike. Target: ratio ≤ 1.5.
//!
//! `cargo bench -p cairn-types --bench persist` (set `CAIRN_BENCH_DIR` to measure another disk).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_persist::{encode, load, store};
use cairn_types::{
    ErrorDescription, SnapshotDesc, SnapshotInstanceStatus, SnapshotType, UUIDandVersion,
};
use chrono::Utc;
use uuid::Uuid;

const ROUNDS: usize = 400;

fn typical() -> SnapshotInstanceStatus {
    let app = Uuid::new_v4();
    SnapshotInstanceStatus {
        snapshot: SnapshotDesc {
            snapshot_id: Uuid::new_v4(),
            snapshot_type: SnapshotType::Immediate,
            ..Default::default()
        },
        reported: true,
        time_triggered: Some(Utc::now()),
        time_created: Some(Utc::now()),
        app_instance_id: app,
        config_version: UUIDandVersion {
            uuid: app,
            version: "17".into(),
        },
        error: ErrorDescription::default(),
        ..Default::default()
    }
}

fn raw_durable_write(path: &Path, bytes: &[u8]) {
    let dir = path.parent().expect("has a parent");
    let tmp = dir.join(".raw.tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .expect("create");
    file.write_all(bytes).expect("write");
    file.sync_all().expect("fsync");
    fs::rename(&tmp, path).expect("rename");
    File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("dir fsync");
}

struct Stats(Vec<Duration>);

impl Stats {
    fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort();
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }
    fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }
}

fn us(d: Duration) -> String {
    format!("{:8.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let base: PathBuf = std::env::var_os("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = base.join(format!("persist-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("bench dir");
    let record = typical();
    let bytes = encode(&record).expect("encode");
    let cairn_path = dir.join("snapshotInstanceStatus.json");
    let raw_path = dir.join("raw.json");

    // Warm up the page cache and the file entries.
    for _ in 0..20 {
        store(&cairn_path, &record).expect("store");
        raw_durable_write(&raw_path, &bytes);
    }

    let (mut cairn, mut cairn_store, mut cairn_load, mut raw) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        store(&cairn_path, &record).expect("store");
        let stored = t.elapsed();
        let loaded = load::<SnapshotInstanceStatus>(&cairn_path).expect("load");
        let total = t.elapsed();
        assert_eq!(loaded.record, record);
        cairn.push(total);
        cairn_store.push(stored);
        cairn_load.push(total - stored);

        let t = Instant::now();
        raw_durable_write(&raw_path, &bytes);
        raw.push(t.elapsed());
    }
    let _ = fs::remove_dir_all(&dir);

    let (mut cairn, mut cairn_store, mut cairn_load, mut raw) = (
        Stats(cairn),
        Stats(cairn_store),
        Stats(cairn_load),
        Stats(raw),
    );
    println!(
        "persist bench: {ROUNDS} interleaved rounds, {} byte SnapshotInstanceStatus, dir {}",
        bytes.len(),
        base.display()
    );
    println!("{:<40} {:>12} {:>12} {:>12}", "", "median", "p99", "mean");
    for (name, stats) in [
        ("cairn store+load", &mut cairn),
        ("  of which store", &mut cairn_store),
        ("  of which load", &mut cairn_load),
        ("raw write+fsync+rename+dir-fsync", &mut raw),
    ] {
        let (p50, p99, mean) = (stats.percentile(0.5), stats.percentile(0.99), stats.mean());
        println!("{name:<40} {} {} {}", us(p50), us(p99), us(mean));
    }
    let ratio = cairn.percentile(0.5).as_secs_f64() / raw.percentile(0.5).as_secs_f64();
    let ratio_mean = cairn.mean().as_secs_f64() / raw.mean().as_secs_f64();
    println!(
        "ratio cairn/raw: median {ratio:.2}x, mean {ratio_mean:.2}x (target <= 1.50x) {}",
        if ratio <= 1.5 { "OK" } else { "OVER TARGET" }
    );
}

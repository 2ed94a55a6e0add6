//! Figures, run by hand (README "Figures"): the log queue's disk use after an hour with the
//! controller unreachable, and the bytes one log entry takes once compressed.
//!
//! `cargo nextest run -p cairn-log-manager --test figures --run-ignored only --no-capture`
//!
//! The hour is simulated, not waited for: the agents' log files and an app's console are written
//! with lines in the agents' real format (templates taken from their output) at a stated rate
//! (`CAIRN_FIGURES_AGENT_LINES_PER_S`, default 2: a device changing state now and then, its
//! link logging each poll's outcome; `CAIRN_FIGURES_CONSOLE_LINES_PER_S`, default 5), and the
//! real collector reads them every 10 s of simulated time and writes a file when one is full or
//! every 300 s, as it does by default (EVE's `logfileDelay`).

#![allow(clippy::unwrap_used)] // figures: a failed unwrap is a failed run
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::io::Write;

use cairn_log_manager::collect::{Collector, Headers, sources};
use cairn_log_manager::queue::Queue;
use uuid::Uuid;

const AGENT_LINES: [(&str, &str, &str); 8] = [
    (
        "config-agent",
        "INFO cairn_config_agent::link",
        "config unchanged (304) hash=1c7adaa5c674d466129285ee180d58dfae214ac473f00d9119b56cd2a8427124",
    ),
    (
        "config-agent",
        "INFO cairn_config_agent::report",
        "app report sent app={app} state=RUNNING queued=0",
    ),
    (
        "app-manager",
        "INFO cairn_app_manager::agent",
        "app phase app={app} from=Idle to=Starting",
    ),
    (
        "domain-manager",
        "INFO cairn_domain_manager::domain",
        "domain state app={app} from=Halted to=Running",
    ),
    (
        "volume-manager",
        "INFO cairn_volume_manager::manager",
        "snapshot taken volume={app} snapshot={id} backend=qcow2 took_ms={n}",
    ),
    (
        "downloader",
        "INFO cairn_downloader::agent",
        "download progress tree={id} bytes={n} of=536870912",
    ),
    (
        "config-agent",
        "WARN cairn_config_agent::link",
        "controller unreachable; retrying error=\"cannot connect to the controller at 10.0.0.1:443: Connection refused (os error 111)\" retry_ms={n}",
    ),
    (
        "domain-manager",
        "INFO cairn_domain_manager::metrics",
        "domain metrics app={app} cpu_ns={n} memory_kib=262144",
    ),
];

/// The log-manager's default `--batch-ms`.
const FLUSH_S: u64 = 300;

fn rate(var: &str, default: f64) -> f64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "figures: run by hand"]
fn log_queue_disk_use_after_an_hour_offline() {
    let agent_rate = rate("CAIRN_FIGURES_AGENT_LINES_PER_S", 2.0);
    let console_rate = rate("CAIRN_FIGURES_CONSOLE_LINES_PER_S", 5.0);
    let root = tempfile::tempdir().unwrap();
    let logs = root.path().join("run/logs");
    let apps = root.path().join("run/domain-manager/apps");
    let app = Uuid::new_v4();
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(apps.join(app.to_string())).unwrap();
    let queue = Queue::open(root.path().join("persist/newlog")).unwrap();
    let mut collector = Collector::open(queue, u64::MAX).unwrap();
    collector.set_device(Uuid::new_v4());
    let mut headers = Headers::default();
    headers.bundle.dev_id = Uuid::new_v4().to_string();
    headers.app_names.insert(app, "sensor".into());

    let mut rng = fastrand::Rng::with_seed(18);
    let start = chrono::Utc::now();
    let (mut agent_lines, mut console_lines, mut raw_bytes) = (0u64, 0u64, 0u64);
    let (mut entries, mut files) = (0usize, 0usize);
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let cycle_s = 10u64;
    for cycle in 0..(3600 / cycle_s) {
        let open = |path: std::path::PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap()
        };
        let due_agent = (((cycle + 1) * cycle_s) as f64 * agent_rate) as u64;
        while agent_lines < due_agent {
            let (agent, level, text) = AGENT_LINES[rng.usize(..AGENT_LINES.len())];
            let at = start
                + chrono::Duration::milliseconds((agent_lines as f64 * 1000.0 / agent_rate) as i64);
            let text = text
                .replace("{app}", &ids[rng.usize(..2)].to_string())
                .replace("{id}", &ids[2 + rng.usize(..2)].to_string())
                .replace("{n}", &rng.u32(..1_000_000).to_string());
            let line = format!("{}  {level}: {text}\n", at.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
            raw_bytes += line.len() as u64;
            open(logs.join(format!("{agent}.log")))
                .write_all(line.as_bytes())
                .unwrap();
            agent_lines += 1;
        }
        let due_console = (((cycle + 1) * cycle_s) as f64 * console_rate) as u64;
        while console_lines < due_console {
            // A service's console: a counter, a reading, a status word.
            let line = format!(
                "[{:>10.3}] sensor: reading {} temp={}.{} status={}\n",
                console_lines as f64 / console_rate,
                console_lines,
                rng.u32(15..35),
                rng.u32(0..10),
                ["ok", "ok", "ok", "retry"][rng.usize(..4)]
            );
            raw_bytes += line.len() as u64;
            open(apps.join(app.to_string()).join("app.log"))
                .write_all(line.as_bytes())
                .unwrap();
            console_lines += 1;
        }
        collector.collect(&sources(&logs, &apps), &headers).unwrap();
        let (_, full) = collector.pending();
        if full || (cycle + 1) % (FLUSH_S / cycle_s) == 0 {
            let flushed = collector.flush().unwrap();
            entries += flushed.entries;
            files += flushed.files;
        }
    }
    let (queued_files, queued_bytes) = collector.queue().usage().unwrap();
    assert_eq!(queued_files, files);
    assert_eq!(entries as u64, agent_lines + console_lines);
    println!(
        "log queue after one hour offline (simulated; {agent_rate} agent lines/s + {console_rate} console lines/s, read every {cycle_s} s, a file when full or every {FLUSH_S} s):"
    );
    println!(
        "  {entries} entries ({:.1} MiB as the agents wrote them) -> {queued_files} gzip files, {:.2} MiB on disk ({:.1} bytes per entry; {:.1}x smaller than the raw lines)",
        raw_bytes as f64 / (1 << 20) as f64,
        queued_bytes as f64 / (1 << 20) as f64,
        queued_bytes as f64 / entries as f64,
        raw_bytes as f64 / queued_bytes as f64
    );
    println!(
        "  the default 64 MiB cap holds {:.0} hours of this",
        (64u64 << 20) as f64 / queued_bytes as f64
    );
}

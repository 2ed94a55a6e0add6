//! Figures for the local config file follower: time from a config write (replaced by rename)
//! to the new config on the bus, median of 20; and the config-agent's CPU and RSS while a
//! 50 MB config file sits unchanged for 30 s. Prints; never fails on timing.
//!
//! `CAIRN_BENCH_CONFIG_AGENT=<binary>` measures another build (e.g. an older one) the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // bench code: blocking file work is fine here

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Subscription};
use cairn_types::AppInstanceConfig;

const APP: &str = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const VOLUME: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const WRITES: usize = 20;
const BIG_FILE: usize = 50 * 1000 * 1000;
const IDLE: Duration = Duration::from_secs(30);

fn config(version: &str, padding: usize) -> String {
    let mut text = format!(
        r#"{{"apps": [{{"uuid": "{APP}", "version": "{version}", "display_name": "sensor",
            "volume_refs": [{{"uuid": "{VOLUME}"}}],
            "domain": {{"kind": "process", "command": "/bin/sleep", "args": ["1000"]}}}}],
           "volumes": [{{"uuid": "{VOLUME}", "format": "qcow2", "max_size_bytes": 1048576}}]}}"#
    );
    // Whitespace keeps the file valid JSON at any size.
    text.push_str(&" ".repeat(padding.saturating_sub(text.len())));
    text
}

fn replace(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, root: &Path, file: &Path) -> Agent {
    // No --poll-ms: the agent runs as `cairn up` starts it.
    Agent(
        Command::new(binary)
            .args(["--config", file.to_str().unwrap()])
            .env("CAIRN_RUN_DIR", root.join("run"))
            .env("CAIRN_PERSIST_DIR", root.join("persist"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

async fn version_on_bus(apps: &mut Subscription<AppInstanceConfig>, version: &str) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), apps.recv())
            .await
            .expect("the config on the bus within 60 s");
        if let Event::Create { value, .. } | Event::Modify { new: value, .. } = event
            && value.uuid_and_version.version == version
        {
            return;
        }
    }
}

/// (user + system CPU time, RSS in KiB) of a process.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends at the last ')': utime and stime are 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let tick_hz: u64 = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(100);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (Duration::from_millis(ticks * 1000 / tick_hz), rss)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let binary = std::env::var_os("CAIRN_BENCH_CONFIG_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cairn-config-agent")));
    println!("config-agent: {}", binary.display());

    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("config.json");
    std::fs::write(&file, config("0", 0)).unwrap();
    let agent = start(&binary, root.path(), &file);
    let reader = Bus::new(
        "app-manager",
        root.path().join("run"),
        root.path().join("persist"),
    );
    let mut apps = reader.subscribe::<AppInstanceConfig>("config-agent");
    version_on_bus(&mut apps, "0").await;
    let mut latencies = Vec::new();
    for i in 1..=WRITES {
        // Writes land at a different phase of any poll each time.
        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..250))).await;
        let t = Instant::now();
        replace(&file, &config(&i.to_string(), 0));
        version_on_bus(&mut apps, &i.to_string()).await;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    println!(
        "config write -> new config on the bus, {WRITES} writes: median {}, min {}, max {}",
        ms(latencies[WRITES / 2]),
        ms(latencies[0]),
        ms(latencies[WRITES - 1])
    );
    drop(agent);
    drop(apps);
    drop(root);

    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("config.json");
    std::fs::write(&file, config("big", BIG_FILE)).unwrap();
    let agent = start(&binary, root.path(), &file);
    let reader = Bus::new(
        "app-manager",
        root.path().join("run"),
        root.path().join("persist"),
    );
    let mut apps = reader.subscribe::<AppInstanceConfig>("config-agent");
    version_on_bus(&mut apps, "big").await;
    let (cpu_before, _) = usage(agent.0.id());
    tokio::time::sleep(IDLE).await;
    let (cpu_after, rss) = usage(agent.0.id());
    println!(
        "{} MB config file unchanged for {} s: CPU {} ({:.1} % of one core), RSS {:.1} MiB",
        BIG_FILE / 1_000_000,
        IDLE.as_secs(),
        ms(cpu_after - cpu_before),
        (cpu_after - cpu_before).as_secs_f64() * 100.0 / IDLE.as_secs_f64(),
        rss as f64 / 1024.0
    );
}

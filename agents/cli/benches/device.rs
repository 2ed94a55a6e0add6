//! Device benchmarks (issue 8, item 4), run by hand:
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench -p cairn --bench device
//! ```
//!
//! Everything runs as on a device: `cairn up` and its four agents as processes on a temporary
//! root, observed from here over the bus. Prints, in one run:
//! (a) an immediate snapshot of a process app with one qcow2 volume, from the config in force
//!     to the snapshot reported available, next to raw `qemu-img snapshot -c` on the same file
//!     and the app's own stop and start as the domain-manager reports them;
//! (b) the idle RSS of the four agents together;
//! (c) the time from `cairn up` to every topic synchronized with 100 apps × 10 snapshots
//!     persisted (state made by the agents themselves in a first run; `/run` wiped in between,
//!     as by a reboot), then the agents' idle RSS and the time of `cairn snapshots`.
//!
//! Scale (issue 19): `CAIRN_BENCH_ONLY=startup CAIRN_BENCH_APPS=1000 cargo bench -p cairn
//! --bench device --profile dev` (after `cargo build --workspace --bins`) runs (b, c) with
//! 1,000 process apps on directory volumes; it also measures the agents with no app at all,
//! for the cost per app.
//! (d) Cairn against Incus on the same btrfs (`device/incus.rs`; `CAIRN_BENCH_ONLY=incus` runs
//! it alone; skipped, saying why, where Incus is not installed: `install-incus` beside this file).
//! `CAIRN_BENCH_CAIRN=<dir>/cairn` takes the CLI and the agents from `<dir>` (release agents
//! beside a copy of the debug CLI). Figures only: nothing here fails on timing.

#![allow(clippy::unwrap_used)] // bench code: a failed unwrap is a failed run
#![allow(clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // bench code: blocking file work is fine here

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Subscription, Topic, socket_path};
use cairn_types::{
    AppInstanceConfig, AppInstanceStatus, DeviceStatus, DomainConfig, DomainLiveOpStatus,
    DomainState, DomainStatus, VolumeConfig, VolumeState, VolumeStatus, VolumesSnapshotAction,
    VolumesSnapshotConfig, VolumesSnapshotStatus,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use uuid::Uuid;

#[path = "device/incus.rs"]
mod incus;

const AGENTS: [&str; 4] = [
    "config-agent",
    "app-manager",
    "volume-manager",
    "domain-manager",
];
const SNAPSHOT_RUNS: usize = 10;
/// Apps of part (c): `CAIRN_BENCH_APPS`, default 100.
fn apps_count() -> usize {
    std::env::var("CAIRN_BENCH_APPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}
const SNAPSHOTS_PER_APP: usize = 10;
/// Written into the qcow2 volume before the snapshots, so that they have data to cover.
const WRITTEN: &str = "256M";

fn main() {
    // `CAIRN_BENCH_CAIRN=<dir>/cairn` measures the agents beside another `cairn` (e.g. a copy of
    // the debug CLI next to release agents: `cargo build --release -p <agents>`).
    let cairn = std::env::var_os("CAIRN_BENCH_CAIRN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cairn")));
    let bin_dir = cairn.parent().unwrap();
    for agent in AGENTS {
        let binary = bin_dir.join(format!("cairn-{agent}"));
        if !binary.is_file() {
            eprintln!(
                "{} is missing: build the agents for this profile first \
                 (cargo build --release --workspace --bins)",
                binary.display()
            );
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // CAIRN_BENCH_ONLY=incus runs part (d) alone.
    if std::env::var("CAIRN_BENCH_ONLY").is_ok_and(|v| v == "incus") {
        eprintln!("(d) Cairn vs Incus on btrfs…");
        if let Some(figures) = runtime.block_on(incus::compare(&cairn)) {
            print_incus(&figures);
        }
        return;
    }
    // CAIRN_BENCH_ONLY=startup runs part (b, c) alone.
    let only_startup = std::env::var("CAIRN_BENCH_ONLY").is_ok_and(|v| v == "startup");
    let n_apps = apps_count();
    eprintln!("(b, c) {n_apps} apps × {SNAPSHOTS_PER_APP} snapshots…");
    let startup = runtime.block_on(startup_with_history(&cairn));
    if only_startup {
        println!(
            "| startup, CAIRN_ACCEL=auto | {} |",
            startup.synchronized_auto
        );
        println!(
            "| startup, CAIRN_ACCEL=tcg | {} |",
            startup.synchronized_tcg
        );
        println!(
            "| all apps running again (auto / tcg) | {} / {} |",
            startup.running_auto, startup.running_tcg
        );
        println!(
            "| idle RSS, {n_apps} apps, after populating | {} |",
            startup.idle_rss
        );
        println!(
            "| idle RSS, {n_apps} apps, after the restart | {} |",
            startup.idle_rss_restarted
        );
        println!("| idle RSS, no app | {} |", startup.idle_rss_empty);
        println!(
            "| cost per app (restarted − no app) / {n_apps} | {:.1} KiB |",
            (startup.rss_restarted_kib as f64 - startup.rss_empty_kib as f64) / n_apps as f64
        );
        println!("| `cairn snapshots` (5 runs) | {} |", startup.snapshots_cli);
        println!(
            "| populating ({} snapshots) | {} |",
            n_apps * SNAPSHOTS_PER_APP,
            startup.populate
        );
        return;
    }
    eprintln!("(a) immediate snapshots of a process app on a directory volume…");
    let process = runtime.block_on(immediate_snapshot(&cairn, Kind::Process));
    eprintln!("(a) immediate snapshots of a VM on a qcow2 volume…");
    let vm = runtime.block_on(immediate_snapshot(&cairn, Kind::Vm));

    println!();
    println!(
        "| measure | process app, directory volume | VM (test guest, TCG), 1 qcow2 volume, {WRITTEN} written |"
    );
    println!("|---|---|---|");
    let row = |what: &str, p: &str, v: &str| println!("| {what} | {p} | {v} |");
    row(
        &format!("immediate snapshot, config in force → snapshot available ({SNAPSHOT_RUNS} runs)"),
        &process.total,
        &vm.total,
    );
    row(
        "〃 app stop: DomainConfig activate=false → DomainStatus halted",
        &process.stop,
        &vm.stop,
    );
    row(
        "〃 volume snapshot: VolumesSnapshotConfig → VolumesSnapshotStatus",
        &process.volume,
        &vm.volume,
    );
    row(
        "〃 app start: DomainConfig activate=true → DomainStatus running",
        &process.start,
        &vm.start,
    );
    row(
        "(after it: guest boot, DomainStatus running → console `CAIRN-GUEST-BOOTED`)",
        "–",
        &vm.boot,
    );
    row(
        "raw `qemu-img snapshot -c` on the same file, same run",
        "–",
        &vm.raw,
    );
    row(
        "idle RSS of the four agents (1 app)",
        &process.idle_rss,
        &vm.idle_rss,
    );
    println!();
    println!("| measure | result |");
    println!("|---|---|");
    println!(
        "| idle RSS of the four agents, {n_apps} apps × {SNAPSHOTS_PER_APP} snapshots | {} |",
        startup.idle_rss
    );
    println!(
        "| `cairn up` → every topic synchronized with its full table, {n_apps} apps × {SNAPSHOTS_PER_APP} snapshots persisted, /run wiped (domain-manager probes the accelerator: CAIRN_ACCEL=auto) | {} |",
        startup.synchronized_auto
    );
    println!(
        "| 〃 → all {n_apps} apps running again | {} |",
        startup.running_auto
    );
    println!(
        "| same, accelerator given (CAIRN_ACCEL=tcg) | {} |",
        startup.synchronized_tcg
    );
    println!(
        "| 〃 → all {n_apps} apps running again | {} |",
        startup.running_tcg
    );
    println!(
        "| (making that state: {} immediate snapshots through the agents) | {} |",
        n_apps * SNAPSHOTS_PER_APP,
        startup.populate
    );
    eprintln!("(d) Cairn vs Incus on btrfs…");
    if let Some(figures) = runtime.block_on(incus::compare(&cairn)) {
        print_incus(&figures);
    }
}

fn print_incus(figures: &incus::Figures) {
    println!();
    println!(
        "| measure (one btrfs on a loop device) | Cairn, process app | Incus 6.0.4, busybox container | Cairn / Incus |"
    );
    println!("|---|---|---|---|");
    for (what, cairn, incus, ratio) in &figures.rows {
        println!("| {what} | {cairn} | {incus} | {ratio} |");
    }
}

// ---- (a) and (b): one app, immediate snapshots -----------------------------------------------

struct SnapshotFigures {
    total: String,
    stop: String,
    volume: String,
    start: String,
    raw: String,
    boot: String,
    idle_rss: String,
}

/// The app the immediate snapshots are taken of.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A process app on a directory volume (the domain-manager gives process apps directory
    /// volumes only; on ext4 the volume-manager's backend for them is `Copy`).
    Process,
    /// The test guest under TCG on one qcow2 volume with data written.
    Vm,
}

async fn immediate_snapshot(cairn: &Path, kind: Kind) -> SnapshotFigures {
    let device = Device::new();
    let app = Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_a001);
    let volume = Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_b001);
    let snapshot =
        |i: usize| Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_c000 + i as u128);
    let (domain, disk) = match kind {
        Kind::Process => (
            r#"{"kind": "process", "command": "/bin/sh", "args": ["-c", "while :; do date > \"$CAIRN_VOLUME_0/beat\"; sleep 1; done"]}"#.to_string(),
            r#""format": "dir", "max_size_bytes": 16777216"#.to_string(),
        ),
        Kind::Vm => {
            let guest = guest_dir();
            let base = device.dir.as_path().join("base.qcow2");
            run("qemu-img", &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1G"]);
            run(
                "qemu-io",
                &["-c", &format!("write -P 0x5a 0 {WRITTEN}"), base.to_str().unwrap()],
            );
            let sha = run("sha256sum", &[base.to_str().unwrap()]);
            let sha = sha.split_whitespace().next().unwrap().to_string();
            (
                format!(
                    r#"{{"kind": "vm", "kernel": "{}", "initrd": "{}", "memory_mib": 128,
                        "append": "console=ttyS0 cryptomgr.notests panic=-1"}}"#,
                    guest.join("vmlinuz").display(),
                    guest.join("initramfs.cpio.gz").display()
                ),
                format!(
                    r#""format": "qcow2", "max_size_bytes": 1073741824,
                       "base_image": {{"path": "{}", "sha256": "{sha}"}}"#,
                    base.display()
                ),
            )
        }
    };
    let config = |snapshots: usize| {
        let ids: Vec<String> = (1..=snapshots)
            .map(|i| format!(r#"{{"id": "{}", "type": "immediate"}}"#, snapshot(i)))
            .collect();
        format!(
            r#"{{"apps": [{{"uuid": "{app}", "version": "1", "display_name": "bench-app",
  "volume_refs": [{{"uuid": "{volume}", "mount_dir": "/data"}}],
  "snapshot": {{"max_snapshots": {max}, "snapshots": [{ids}]}},
  "domain": {domain}}}],
 "volumes": [{{"uuid": "{volume}", "display_name": "bench-disk", {disk}}}]}}"#,
            max = SNAPSHOT_RUNS + 1,
            ids = ids.join(", ")
        )
    };
    device.write_config(&config(0));
    let mut up = device.up(cairn);
    let mut observer = Observer::start(&device);

    let volume_file = loop {
        if let Some(v) = observer
            .volumes
            .values()
            .find(|v| v.state == VolumeState::Ready)
        {
            break v.file_location.clone();
        }
        observer.next(Duration::from_secs(30)).await;
    };
    observer
        .until(Duration::from_secs(30), |o| {
            o.domains.values().any(|d| d.state == DomainState::Running)
        })
        .await;
    let mut boot = Vec::new();
    if kind == Kind::Vm {
        observer
            .until(Duration::from_secs(60), |o| {
                o.domains.values().any(|d| d.state == DomainState::Running)
            })
            .await;
        booted(&observer).await;
    }
    let (mut total, mut stop, mut volume_step, mut start, mut raw) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 1..=SNAPSHOT_RUNS {
        let id = snapshot(i);
        device.write_config(&config(i));
        // Each milestone is stamped with the arrival of the event that made it true; the
        // later ones only count once the one they follow has been seen.
        let mut steps = vec![
            Milestone::new("config in force", None, move |o: &Observer| {
                o.configs
                    .values()
                    .any(|c| c.snapshot.snapshots.iter().any(|s| s.snapshot_id == id))
            }),
            Milestone::new("stop asked", Some(0), |o: &Observer| {
                o.domain_configs.values().any(|c| !c.activate)
            }),
            Milestone::new("stopped", Some(1), |o: &Observer| {
                o.domains
                    .values()
                    .any(|d| !d.activated && d.state != DomainState::Running)
            }),
            Milestone::new("volumes asked", Some(0), move |o: &Observer| {
                o.snapshot_requests
                    .values()
                    .any(|r| r.snapshot_id == id && r.action == VolumesSnapshotAction::Create)
            }),
            Milestone::new("volumes answered", Some(3), move |o: &Observer| {
                o.snapshot_results.values().any(|r| {
                    r.snapshot_id == id
                        && r.result_of_action == VolumesSnapshotAction::Create
                        && !r.is_in_progress()
                })
            }),
            Milestone::new("start asked", Some(4), |o: &Observer| {
                o.domain_configs.values().any(|c| c.activate)
            }),
            Milestone::new("running", Some(5), |o: &Observer| {
                o.domains
                    .values()
                    .any(|d| d.activated && d.state == DomainState::Running)
            }),
            Milestone::new("available", Some(0), move |o: &Observer| {
                o.apps.values().any(|a| {
                    a.snap_status
                        .available_snapshots
                        .iter()
                        .any(|s| s.snapshot.snapshot_id == id)
                })
            }),
        ];
        observer.reach(Duration::from_secs(90), &mut steps).await;
        let at = |i: usize| steps[i].at.unwrap();
        total.push(at(7) - at(0));
        stop.push(at(2) - at(1));
        volume_step.push(at(4) - at(3));
        start.push(at(6) - at(5));
        // The app runs again (a guest has booted: powerdown is honoured) before the next one.
        if kind == Kind::Vm {
            boot.push(booted(&observer).await - at(6));
        }
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = rss_line(&up);
    drop(observer);
    up.stop();
    // The raw operation on the same file, once the device is down (a running VM holds the
    // image's write lock, as qemu-img would need).
    if kind == Kind::Vm {
        for i in 1..=SNAPSHOT_RUNS {
            let name = format!("raw-{i}");
            let began = Instant::now();
            run(
                "qemu-img",
                &["snapshot", "-c", &name, volume_file.to_str().unwrap()],
            );
            raw.push(began.elapsed());
            run(
                "qemu-img",
                &["snapshot", "-d", &name, volume_file.to_str().unwrap()],
            );
        }
    }
    SnapshotFigures {
        total: spread(&total),
        stop: spread(&stop),
        volume: spread(&volume_step),
        start: spread(&start),
        raw: spread(&raw),
        boot: spread(&boot),
        idle_rss,
    }
}

/// When the guest's console shows it has booted (qemu truncates the console file at start).
async fn booted(observer: &Observer) -> Instant {
    let console = observer
        .domains
        .values()
        .next()
        .map(|d| d.log_path.clone())
        .expect("the VM's domain status");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read(&console).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains("CAIRN-GUEST-BOOTED") {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no boot marker in {}",
            console.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- (c) and (b): 100 apps × 10 snapshots -----------------------------------------------------

struct StartupFigures {
    populate: String,
    idle_rss_empty: String,
    rss_empty_kib: u64,
    idle_rss_restarted: String,
    rss_restarted_kib: u64,
    snapshots_cli: String,
    synchronized_auto: String,
    running_auto: String,
    synchronized_tcg: String,
    running_tcg: String,
    idle_rss: String,
}

/// What each topic held before the restart: its key count.
type Tables = BTreeMap<&'static str, usize>;

async fn startup_with_history(cairn: &Path) -> StartupFigures {
    let n_apps = apps_count();
    // The agents with nothing to do, for the cost per app: on a root of its own.
    let (idle_rss_empty, rss_empty_kib) = {
        let empty = Device::new();
        empty.write_config(r#"{"apps": [], "volumes": []}"#);
        let mut up = empty.up(cairn);
        let deadline = Instant::now() + Duration::from_secs(30);
        while up.agent_pids().len() < AGENTS.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let figures = (rss_line(&up), rss_total_kib(&up));
        up.stop();
        figures
    };
    let reuse = std::env::var_os("CAIRN_BENCH_REUSE").map(PathBuf::from);
    let (device, tables, populate, idle_rss) = if let Some(root) = reuse {
        // The tables a populated device of n_apps apps holds (see the first run below).
        let tables: Tables = [
            (AppInstanceConfig::NAME, n_apps),
            (AppInstanceStatus::NAME, n_apps),
            (DeviceStatus::NAME, 1),
            (DomainConfig::NAME, n_apps),
            (DomainLiveOpStatus::NAME, 0),
            (DomainStatus::NAME, n_apps),
            (VolumeConfig::NAME, n_apps),
            (VolumeStatus::NAME, n_apps),
        ]
        .into_iter()
        .collect();
        (
            Device::reused(root),
            tables,
            Duration::ZERO,
            "–".to_string(),
        )
    } else {
        // Kept from the start when asked: a panic or an early exit during the minutes that
        // follow must not remove what they made (a drop would start deleting it).
        let device = if std::env::var_os("CAIRN_BENCH_KEEP").is_some() {
            Device::kept()
        } else {
            Device::new()
        };
        let app = |n: usize| Uuid::from_u128(0xbe9d_0000_0000_4000_8000_0000_0000_0000 + n as u128);
        let volume =
            |n: usize| Uuid::from_u128(0xbe9e_0000_0000_4000_8000_0000_0000_0000 + n as u128);
        let snapshot = |n: usize, k: usize| {
            Uuid::from_u128(0xbe9f_0000_0000_4000_8000_0000_0000_0000 + (n * 100 + k) as u128)
        };
        let apps: Vec<String> = (0..n_apps)
            .map(|n| {
                let ids: Vec<String> = (0..SNAPSHOTS_PER_APP)
                    .map(|k| format!(r#"{{"id": "{}", "type": "immediate"}}"#, snapshot(n, k)))
                    .collect();
                format!(
                    r#"{{"uuid": "{}", "version": "1", "display_name": "app-{n:03}",
      "volume_refs": [{{"uuid": "{}", "mount_dir": "/data"}}],
      "snapshot": {{"max_snapshots": {SNAPSHOTS_PER_APP}, "snapshots": [{}]}},
      "domain": {{"kind": "process", "command": "/bin/sleep", "args": ["100000"]}}}}"#,
                    app(n),
                    volume(n),
                    ids.join(", ")
                )
            })
            .collect();
        let volumes: Vec<String> = (0..n_apps)
            .map(|n| {
                format!(
                    r#"{{"uuid": "{}", "display_name": "data-{n:03}", "format": "dir", "max_size_bytes": 1048576}}"#,
                    volume(n)
                )
            })
            .collect();
        device.write_config(&format!(
            r#"{{"apps": [{}], "volumes": [{}]}}"#,
            apps.join(",\n"),
            volumes.join(",\n")
        ));

        // First run: the agents make the state (records, app states, volumes).
        let began = Instant::now();
        let mut up = device.up(cairn);
        let mut observer = Observer::start(&device);
        let complete = |o: &Observer| {
            o.apps.len() == n_apps
                && o.apps.values().all(|a| {
                    a.snap_status.available_snapshots.len() == SNAPSHOTS_PER_APP
                        && a.state == cairn_types::SwState::Running
                })
        };
        observer.until(Duration::from_secs(1800), complete).await;
        let populate = began.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let tables = observer.tables();
        let idle_rss = rss_line(&up);
        drop(observer);
        up.stop();
        let records = std::fs::read_dir(device.persist().join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0);
        eprintln!("populated in {populate:?}: {records} snapshot records; tables {tables:?}");
        (device, tables, populate, idle_rss)
    };

    // As after a reboot: /run is empty, /persist is what the agents left. Twice: with the
    // domain-manager probing the accelerator (its answer is kept in /run), and told it.
    let mut restarts = Vec::new();
    let mut idle_rss_restarted = (String::new(), 0);
    let mut snapshots_cli = String::new();
    for accel in ["auto", "tcg"] {
        std::fs::remove_dir_all(device.run()).unwrap();
        let began = Instant::now();
        let mut up = device.up_with(cairn, &[("CAIRN_ACCEL", accel)]);
        let mut synchronized = wait_tables(&device, &tables, began).await;
        let running = match synchronized.remove(RUNNING).unwrap() {
            Ok(t) => ms(t),
            Err(e) => e,
        };
        if accel == "tcg" {
            tokio::time::sleep(Duration::from_secs(3)).await;
            idle_rss_restarted = (rss_line(&up), rss_total_kib(&up));
            let root = device.dir.as_path().to_str().unwrap().to_string();
            // `CAIRN_BENCH_CLI_BEFORE=<another cairn>`: timed too, in turns, for a before figure
            // on the same device in the same run.
            let before = std::env::var_os("CAIRN_BENCH_CLI_BEFORE");
            let (mut times, mut before_times) = (Vec::new(), Vec::new());
            let (mut rows, mut before_rows) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                let t = Instant::now();
                let out = run(cairn.to_str().unwrap(), &["--root", &root, "snapshots"]);
                times.push(t.elapsed());
                rows.push(out.lines().count());
                if let Some(before) = &before {
                    let t = Instant::now();
                    let out = run(before.to_str().unwrap(), &["--root", &root, "snapshots"]);
                    before_times.push(t.elapsed());
                    before_rows.push(out.lines().count());
                }
            }
            // Each run's lines, not an assertion: a CLI that missed the app-manager's table
            // prints fewer, and that is a figure to report, not a reason to lose the others.
            snapshots_cli = format!("{} (lines {rows:?})", spread(&times));
            if before.is_some() {
                snapshots_cli +=
                    &format!("; {} before (lines {before_rows:?})", spread(&before_times));
            }
        }
        up.stop();
        restarts.push((accel, synchronized, running));
    }
    let figure = |synchronized: &BTreeMap<&'static str, Result<Duration, String>>| {
        format!(
            "**{}** (per topic: {})",
            ms(synchronized
                .values()
                .filter_map(|t| t.as_ref().ok().copied())
                .max()
                .unwrap_or_default()),
            synchronized
                .iter()
                .map(|(topic, t)| match t {
                    Ok(t) => format!("{topic} {}", ms(*t)),
                    Err(e) => format!("{topic} {e}"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    StartupFigures {
        populate: format!("{:.1} s", populate.as_secs_f64()),
        idle_rss_empty,
        rss_empty_kib,
        idle_rss_restarted: idle_rss_restarted.0,
        rss_restarted_kib: idle_rss_restarted.1,
        snapshots_cli,
        synchronized_auto: figure(&restarts[0].1),
        running_auto: restarts[0].2.clone(),
        synchronized_tcg: figure(&restarts[1].1),
        running_tcg: restarts[1].2.clone(),
        idle_rss,
    }
}

/// For each topic, the time from `began` until a subscriber holds the table it had before the
/// restart: as many keys, each complete (app status: every snapshot available; volumes: ready).
/// The request/answer topics between app-manager and volume-manager live in `/run` only and
/// are made again on demand, so for them the first complete table counts, whatever its size.
/// Each subscriber connects as soon as the socket exists, so no reconnect backoff is measured.
async fn wait_tables(
    device: &Device,
    tables: &Tables,
    began: Instant,
) -> BTreeMap<&'static str, Result<Duration, String>> {
    async fn follow<T: Topic>(
        bus: Bus,
        label: &'static str,
        publisher: &'static str,
        keys: Option<usize>,
        complete: fn(&T) -> bool,
        began: Instant,
    ) -> (&'static str, Result<Duration, String>) {
        let socket = socket_path(bus.run_dir(), publisher, T::NAME);
        let deadline = tokio::time::Instant::from_std(began + Duration::from_secs(60));
        let mut sub: Option<Subscription<T>> = None;
        let reached = tokio::time::timeout_at(deadline, async {
            while !socket.exists() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let sub = sub.insert(bus.subscribe(publisher));
            loop {
                let _ = sub.recv().await;
                if sub.is_synchronized()
                    && keys.is_none_or(|k| sub.len() == k)
                    && sub.values().all(complete)
                {
                    return began.elapsed();
                }
            }
        })
        .await;
        let outcome = reached.map_err(|_| {
            format!(
                "not within 60 s: {} of {keys:?} keys",
                sub.as_ref().map(|s| s.len()).unwrap_or(0)
            )
        });
        (label, outcome)
    }
    fn any<T>(_: &T) -> bool {
        true
    }
    let bus = device.bus();
    let n = |topic: &str| Some(tables.get(topic).copied().unwrap_or(0));
    let handles = vec![
        tokio::spawn(follow::<DeviceStatus>(
            bus.clone(),
            DeviceStatus::NAME,
            "config-agent",
            n(DeviceStatus::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<AppInstanceConfig>(
            bus.clone(),
            AppInstanceConfig::NAME,
            "config-agent",
            n(AppInstanceConfig::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<VolumeConfig>(
            bus.clone(),
            VolumeConfig::NAME,
            "config-agent",
            n(VolumeConfig::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<AppInstanceStatus>(
            bus.clone(),
            AppInstanceStatus::NAME,
            "app-manager",
            n(AppInstanceStatus::NAME),
            |a| a.snap_status.available_snapshots.len() == SNAPSHOTS_PER_APP,
            began,
        )),
        tokio::spawn(follow::<DomainConfig>(
            bus.clone(),
            DomainConfig::NAME,
            "app-manager",
            n(DomainConfig::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<VolumesSnapshotConfig>(
            bus.clone(),
            VolumesSnapshotConfig::NAME,
            "app-manager",
            None,
            any,
            began,
        )),
        tokio::spawn(follow::<VolumeStatus>(
            bus.clone(),
            VolumeStatus::NAME,
            "volume-manager",
            n(VolumeStatus::NAME),
            |v| v.state == VolumeState::Ready,
            began,
        )),
        tokio::spawn(follow::<VolumesSnapshotStatus>(
            bus.clone(),
            VolumesSnapshotStatus::NAME,
            "volume-manager",
            None,
            any,
            began,
        )),
        tokio::spawn(follow::<DomainStatus>(
            bus.clone(),
            DomainStatus::NAME,
            "domain-manager",
            n(DomainStatus::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<DomainLiveOpStatus>(
            bus.clone(),
            DomainLiveOpStatus::NAME,
            "domain-manager",
            n(DomainLiveOpStatus::NAME),
            any,
            began,
        )),
        tokio::spawn(follow::<DomainStatus>(
            bus.clone(),
            RUNNING,
            "domain-manager",
            n(DomainStatus::NAME),
            |d| d.state == DomainState::Running,
            began,
        )),
    ];
    let mut done = BTreeMap::new();
    for handle in handles {
        let (label, outcome) = handle.await.unwrap();
        done.insert(label, outcome);
    }
    done
}

/// The label of "every app's domain running again" among the topic figures.
const RUNNING: &str = "all apps running";

// ---- the device and the observer ---------------------------------------------------------------

struct Device {
    dir: PathBuf,
    /// Removes the root on drop; `None` for a kept or reused root.
    _temp: Option<tempfile::TempDir>,
}

impl Device {
    fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        Self {
            dir: temp.path().to_path_buf(),
            _temp: Some(temp),
        }
    }

    /// A new root that no drop removes (`CAIRN_BENCH_KEEP`), named before anything is put in
    /// it, for `CAIRN_BENCH_REUSE`.
    fn kept() -> Self {
        let dir = tempfile::tempdir().unwrap().keep();
        eprintln!("device root kept: {}", dir.display());
        Self { dir, _temp: None }
    }

    /// A root kept by an earlier run (`CAIRN_BENCH_KEEP`), measured again and kept
    /// (`CAIRN_BENCH_REUSE=<root>`): a populated device of 1,000 apps takes minutes to make.
    fn reused(dir: PathBuf) -> Self {
        Self { dir, _temp: None }
    }

    fn run(&self) -> PathBuf {
        self.dir.as_path().join("run")
    }

    fn persist(&self) -> PathBuf {
        self.dir.as_path().join("persist")
    }

    fn config(&self) -> PathBuf {
        self.dir.as_path().join("config.json")
    }

    fn bus(&self) -> Bus {
        Bus::new("bench", self.run(), self.persist())
    }

    fn write_config(&self, text: &str) {
        let tmp = self.dir.as_path().join(".config.json.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config()).unwrap();
    }

    fn up(&self, cairn: &Path) -> Up {
        self.up_with(cairn, &[])
    }

    fn up_with(&self, cairn: &Path, env: &[(&str, &str)]) -> Up {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.as_path().join("up.log"))
            .unwrap();
        let child = Command::new(cairn)
            .arg("--root")
            .arg(self.dir.as_path())
            .args(["up", "--config"])
            .arg(self.config())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Up { child: Some(child) }
    }
}

struct Up {
    child: Option<Child>,
}

impl Up {
    fn agent_pids(&self) -> Vec<(String, i32)> {
        let parent = self.child.as_ref().unwrap().id() as i32;
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid != Some(parent) {
                continue;
            }
            let exe = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let exe = String::from_utf8_lossy(exe.split(|b| *b == 0).next().unwrap_or_default())
                .into_owned();
            if let Some(agent) = AGENTS.iter().find(|a| exe.ends_with(&format!("cairn-{a}"))) {
                found.push((agent.to_string(), pid));
            }
        }
        found.sort();
        found
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a tool to success; its stdout.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test guest built by images/test-guest/build.
fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("CAIRN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/cairn/test-guest")
        });
    assert!(
        dir.join("vmlinuz").is_file(),
        "the test guest is not built in {}: run images/test-guest/build",
        dir.display()
    );
    dir
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_total_kib(up: &Up) -> u64 {
    up.agent_pids().iter().map(|(_, pid)| rss_kib(*pid)).sum()
}

fn rss_line(up: &Up) -> String {
    let agents = up.agent_pids();
    let each: Vec<(String, u64)> = agents
        .iter()
        .map(|(agent, pid)| (agent.clone(), rss_kib(*pid)))
        .collect();
    let total: u64 = each.iter().map(|(_, kib)| kib).sum();
    format!(
        "**{:.1} MiB** ({})",
        total as f64 / 1024.0,
        each.iter()
            .map(|(agent, kib)| format!("{agent} {:.1}", *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The bus as the benchmark sees it: each topic's table, updated by one task; `next` applies
/// one event and returns when it arrived.
struct Observer {
    rx: mpsc::UnboundedReceiver<(Instant, Update)>,
    configs: BTreeMap<String, AppInstanceConfig>,
    domain_configs: BTreeMap<String, DomainConfig>,
    domains: BTreeMap<String, DomainStatus>,
    snapshot_requests: BTreeMap<String, VolumesSnapshotConfig>,
    snapshot_results: BTreeMap<String, VolumesSnapshotStatus>,
    apps: BTreeMap<String, AppInstanceStatus>,
    volumes: BTreeMap<String, VolumeStatus>,
    counts: Tables,
    task: tokio::task::JoinHandle<()>,
}

// One update lives at a time, matched straight away: its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Update {
    Config(Event<AppInstanceConfig>),
    DomainConfig(Event<DomainConfig>),
    Domain(Event<DomainStatus>),
    Request(Event<VolumesSnapshotConfig>),
    Result(Event<VolumesSnapshotStatus>),
    App(Event<AppInstanceStatus>),
    Volume(Event<VolumeStatus>),
    /// Key counts of the topics only counted.
    Count(&'static str, usize),
}

fn apply<T: Topic>(table: &mut BTreeMap<String, T>, event: Event<T>) {
    match event {
        Event::Create { key, value }
        | Event::Modify {
            key, new: value, ..
        } => {
            table.insert(key, value);
        }
        Event::Delete { key, .. } => {
            table.remove(&key);
        }
        _ => {}
    }
}

impl Observer {
    fn start(device: &Device) -> Self {
        let bus = device.bus();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut configs = bus.subscribe::<AppInstanceConfig>("config-agent");
            let mut domain_configs = bus.subscribe::<DomainConfig>("app-manager");
            let mut domains = bus.subscribe::<DomainStatus>("domain-manager");
            let mut requests = bus.subscribe::<VolumesSnapshotConfig>("app-manager");
            let mut results = bus.subscribe::<VolumesSnapshotStatus>("volume-manager");
            let mut apps = bus.subscribe::<AppInstanceStatus>("app-manager");
            let mut volumes = bus.subscribe::<VolumeStatus>("volume-manager");
            let mut device = bus.subscribe::<DeviceStatus>("config-agent");
            let mut volume_configs = bus.subscribe::<VolumeConfig>("config-agent");
            let mut live_ops = bus.subscribe::<DomainLiveOpStatus>("domain-manager");
            loop {
                let update = tokio::select! {
                    e = configs.recv() => Update::Config(e),
                    e = domain_configs.recv() => Update::DomainConfig(e),
                    e = domains.recv() => Update::Domain(e),
                    e = requests.recv() => Update::Request(e),
                    e = results.recv() => Update::Result(e),
                    e = apps.recv() => Update::App(e),
                    e = volumes.recv() => Update::Volume(e),
                    _ = device.recv() => Update::Count(DeviceStatus::NAME, device.len()),
                    _ = volume_configs.recv() => Update::Count(VolumeConfig::NAME, volume_configs.len()),
                    _ = live_ops.recv() => Update::Count(DomainLiveOpStatus::NAME, live_ops.len()),
                };
                if tx.send((Instant::now(), update)).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            configs: BTreeMap::new(),
            domain_configs: BTreeMap::new(),
            domains: BTreeMap::new(),
            snapshot_requests: BTreeMap::new(),
            snapshot_results: BTreeMap::new(),
            apps: BTreeMap::new(),
            volumes: BTreeMap::new(),
            counts: BTreeMap::new(),
            task,
        }
    }

    async fn next(&mut self, within: Duration) -> Instant {
        let (at, update) = tokio::time::timeout(within, self.rx.recv())
            .await
            .expect("the bus went quiet")
            .expect("observer running");
        match update {
            Update::Config(e) => apply(&mut self.configs, e),
            Update::DomainConfig(e) => apply(&mut self.domain_configs, e),
            Update::Domain(e) => apply(&mut self.domains, e),
            Update::Request(e) => apply(&mut self.snapshot_requests, e),
            Update::Result(e) => apply(&mut self.snapshot_results, e),
            Update::App(e) => apply(&mut self.apps, e),
            Update::Volume(e) => apply(&mut self.volumes, e),
            Update::Count(topic, n) => {
                self.counts.insert(topic, n);
            }
        }
        at
    }

    /// The arrival time of the event after which `done` holds (now, if it holds already).
    async fn until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) -> Instant {
        let deadline = Instant::now() + within;
        if done(self) {
            return Instant::now();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let at = self.next(left).await;
            if done(self) {
                return at;
            }
        }
    }

    /// Key counts of every topic (after draining what has arrived).
    fn tables(&mut self) -> Tables {
        while let Ok((_, update)) = self.rx.try_recv() {
            match update {
                Update::Config(e) => apply(&mut self.configs, e),
                Update::DomainConfig(e) => apply(&mut self.domain_configs, e),
                Update::Domain(e) => apply(&mut self.domains, e),
                Update::Request(e) => apply(&mut self.snapshot_requests, e),
                Update::Result(e) => apply(&mut self.snapshot_results, e),
                Update::App(e) => apply(&mut self.apps, e),
                Update::Volume(e) => apply(&mut self.volumes, e),
                Update::Count(topic, n) => {
                    self.counts.insert(topic, n);
                }
            }
        }
        let mut tables = self.counts.clone();
        tables.insert(AppInstanceConfig::NAME, self.configs.len());
        tables.insert(DomainConfig::NAME, self.domain_configs.len());
        tables.insert(DomainStatus::NAME, self.domains.len());
        tables.insert(VolumesSnapshotConfig::NAME, self.snapshot_requests.len());
        tables.insert(VolumesSnapshotStatus::NAME, self.snapshot_results.len());
        tables.insert(AppInstanceStatus::NAME, self.apps.len());
        tables.insert(VolumeStatus::NAME, self.volumes.len());
        tables
    }
}

/// A point in an operation, seen on the bus.
struct Milestone<'a> {
    name: &'static str,
    /// The milestone that must be reached first.
    after: Option<usize>,
    done: Box<dyn Fn(&Observer) -> bool + 'a>,
    at: Option<Instant>,
}

impl<'a> Milestone<'a> {
    fn new(
        name: &'static str,
        after: Option<usize>,
        done: impl Fn(&Observer) -> bool + 'a,
    ) -> Self {
        Self {
            name,
            after,
            done: Box::new(done),
            at: None,
        }
    }
}

impl Observer {
    /// Applies events until every milestone is reached, stamping each with the arrival of the
    /// event after which it held.
    async fn reach(&mut self, within: Duration, steps: &mut [Milestone<'_>]) {
        let deadline = Instant::now() + within;
        let mut at = Instant::now();
        loop {
            for i in 0..steps.len() {
                let ready = steps[i].after.is_none_or(|j| steps[j].at.is_some());
                if steps[i].at.is_none() && ready && (steps[i].done)(self) {
                    steps[i].at = Some(at);
                }
            }
            if steps.iter().all(|s| s.at.is_some()) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<_> = steps
                    .iter()
                    .filter(|s| s.at.is_none())
                    .map(|s| s.name)
                    .collect();
                panic!("not reached within {within:?}: {missing:?}");
            }
            at = self.next(left).await;
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- figures ----------------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// `median (min–max)`.
fn spread(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return "-".into();
    }
    format!(
        "median **{}** ({}–{})",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1])
    )
}

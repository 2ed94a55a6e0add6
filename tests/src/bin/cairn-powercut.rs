//! `cairn-powercut`: the issue 20 power-cut torture. It boots the device image (`images/`)
//! under qemu TCG on a persist disk that survives, configures several process apps on
//! directory volumes through the local config on that disk, changes their snapshots at random
//! (take, delete, roll back, new version, a schedule on or off) and cuts the power at a random
//! moment: SIGKILL of qemu, so whatever the guest had not written to its disk (its page cache)
//! is lost. Then it boots again and checks, inside the guest over the serial console, that
//! the device converged:
//!
//! - every app Running, no snapshot in flight, no rollback in progress;
//! - every snapshot the config lists is available, or failed with a reason;
//! - the snapshot records and each volume's snapshot directories equal the available
//!   snapshots (a leak either way is a fault);
//! - every record under `/persist` passes `cairn record check`;
//! - no "panicked" in any agent's log (checked at each convergence and just before each cut:
//!   the logs are on the guest's tmpfs and die with it).
//!
//! On the host, after each cut, `qemu-img check` of the persist disk (leaked clusters are
//! what a killed qemu leaves; corruption is a fault).
//!
//! When the image has `qemu-img` (#24), every other app is a VM app instead: the test guest
//! (images/test-guest, handed over on a third disk, run by the device's qemu under nested TCG)
//! on a qcow2 volume, whose snapshots are the image's internal ones (compared like the
//! directories above); each look runs the device's `qemu-img check` on every such volume: any
//! leak or corruption left once the device converged is a fault (#20).
//!
//! `target/debug/cairn-powercut [--cuts N] [--seed S] [--apps A] [--jobs J] [--image DIR]
//! [--work DIR] [--keep]`; without `--image` it builds one with `images/build --bin-dir` from the binaries
//! beside it (`cargo build --workspace --bins` first). The exit status is 0 only when every cut
//! was survived and nothing else was seen. Reproducible by seed as far as the random choices
//! go (the cut moments are seeded delays; TCG timing varies).
//!
//! `--jobs J` runs J devices side by side, each on its own persist disk under `<work>/job-<j>`,
//! with the seed `S + j` and its share of the cuts; the figures are the sum of theirs. A long
//! run takes hours under TCG with one device, and each device keeps one core busy: two jobs
//! on two cores halve it. The same `--seed` and `--jobs` replay the same run.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cairn_e2e::runs::{Snapshots, exit, random_uuid, short, short_id, snapshot_leaks, time_seed};
use cairn_types::{AppInstanceStatus, SwState};
use uuid::Uuid;

/// From qemu's launch to the agents answering; generous: TCG on a busy 2-core machine.
const BOOT_BOUND: Duration = Duration::from_secs(300);
/// From the agents answering to a converged device.
const CONVERGE_BOUND: Duration = Duration::from_secs(240);
/// One shell command in the guest.
const COMMAND_BOUND: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(1000);
/// Snapshots listed per app at most; `max_snapshots` leaves room for scheduled ones.
const MAX_LISTED: usize = 3;
const MAX_SNAPSHOTS: usize = 8;
/// Scheduled snapshots: every minute, the last two kept.
const SCHEDULE: &str = "* * * * *";
const KEEP_LAST: u32 = 2;
/// What an app runs: a heartbeat on its volume, so a snapshot has data to copy.
const APP_SCRIPT: &str = "while :; do date >> \"$CAIRN_VOLUME_0/beat\"; sleep 1; done";
/// Where the device keeps the test guest for the VM apps (copied from the third disk).
const GUEST_DIR: &str = "/persist/guest";
/// The longest line the guest's tty takes in canonical mode is 4095 bytes: the config is
/// typed in base64 pieces shorter than that.
const BASE64_PIECE: usize = 1000;
/// A file the tool writes without syncing just before a cut.
const UNSYNCED: &str = "/persist/.powercut-unsynced";
/// The snapshot of the demo config (`agents/cli/src/demo-config.json`).
const DEMO_SNAPSHOT: Uuid = Uuid::from_u128(0xd3e0c0de_0000_4000_8000_00000000c001);

#[derive(Clone)]
struct Options {
    cuts: usize,
    seed: u64,
    apps: usize,
    /// Devices run side by side (`--jobs`).
    jobs: usize,
    /// Put before each line a job prints (`[j] `), empty for a single job.
    label: String,
    image: Option<PathBuf>,
    work: Option<PathBuf>,
    keep: bool,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        cuts: 5,
        seed: time_seed(),
        apps: 3,
        jobs: 1,
        label: String::new(),
        image: None,
        work: None,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cuts" => options.cuts = value()?.parse().context("--cuts: a number")?,
            "--seed" => options.seed = value()?.parse().context("--seed: a number")?,
            "--apps" => options.apps = value()?.parse().context("--apps: a number")?,
            "--jobs" => options.jobs = value()?.parse().context("--jobs: a number")?,
            "--image" => options.image = Some(PathBuf::from(value()?)),
            "--work" => options.work = Some(PathBuf::from(value()?)),
            "--keep" => options.keep = true,
            "-h" | "--help" => {
                println!(
                    "cairn-powercut [--cuts N (5)] [--seed S (from the time)] [--apps A (3)] \
                     [--jobs J (1): devices side by side, seeds S..S+J-1] [--image DIR (built with images/build --bin-dir)] [--work DIR (a tempdir)] \
                     [--keep]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if options.apps == 0 {
        bail!("--apps needs at least one");
    }
    if options.jobs == 0 || options.jobs > options.cuts.max(1) {
        bail!("--jobs: between 1 and the number of cuts");
    }
    Ok(options)
}

// ---- the config the tool drives ----

/// One app as the tool configures it, on its own `dir` volume.
struct AppPlan {
    uuid: Uuid,
    volume: Uuid,
    version: u32,
    /// The listed snapshots, oldest first.
    listed: Vec<Uuid>,
    active_snapshot: Option<Uuid>,
    rollback_counter: u32,
    scheduled: bool,
    /// The config's `activate`: Running when set, halted when not.
    active: bool,
    /// A VM app on a qcow2 volume (the image has qemu-img) instead of a process on a directory.
    qcow2: bool,
}

impl AppPlan {
    /// Where the volume-manager keeps a qcow2 volume (`volumes::volume_path`).
    fn qcow2_path(&self) -> String {
        format!(
            "/persist/volumes/{}.qcow2",
            cairn_types::volume_key(self.volume, 0)
        )
    }
}

fn config_json(plans: &[AppPlan]) -> serde_json::Value {
    let apps: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let snapshots: Vec<_> = app
                .listed
                .iter()
                .map(|id| serde_json::json!({"id": id, "type": "immediate"}))
                .collect();
            let mut snapshot = serde_json::json!({
                "max_snapshots": MAX_SNAPSHOTS,
                "active_snapshot": app.active_snapshot.map(|s| s.to_string()).unwrap_or_default(),
                "rollback_counter": app.rollback_counter,
                "snapshots": snapshots,
            });
            if app.scheduled {
                snapshot["schedule"] = SCHEDULE.into();
                snapshot["retention"] = serde_json::json!({"keep_last": KEEP_LAST});
                snapshot["pattern"] = "sched-%Y%m%d-%H%M".into();
            }
            serde_json::json!({
                "uuid": app.uuid,
                "version": app.version.to_string(),
                "activate": app.active,
                "display_name": format!("powercut-{i}"),
                "restart_policy": "always",
                "volume_refs": [{"uuid": app.volume, "generation_count": 0, "mount_dir": "/data"}],
                "snapshot": snapshot,
                "domain": if app.qcow2 {
                    serde_json::json!({"kind": "vm", "kernel": format!("{GUEST_DIR}/vmlinuz"),
                        "initrd": format!("{GUEST_DIR}/initramfs.cpio.gz"), "memory_mib": 128,
                        "append": "console=ttyS0 quiet cryptomgr.notests panic=-1 cairn.workload=counter"})
                } else {
                    serde_json::json!({"kind": "process", "command": "/bin/sh", "args": ["-c", APP_SCRIPT]})
                },
            })
        })
        .collect();
    let volumes: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let (format, size) = if app.qcow2 {
                ("qcow2", 1 << 20)
            } else {
                ("dir", 16 << 20)
            };
            serde_json::json!({"uuid": app.volume, "generation_count": 0, "format": format,
                               "display_name": format!("powercut-{i}-data"),
                               "max_size_bytes": size})
        })
        .collect();
    serde_json::json!({"apps": apps, "volumes": volumes})
}

/// One random change of the config, described for the cut's line; `available` is what the
/// app had at the last convergence (a rollback goes to one of those).
fn change_config(
    rng: &mut fastrand::Rng,
    plans: &mut [AppPlan],
    available: &BTreeMap<Uuid, BTreeSet<Uuid>>,
) -> String {
    let index = rng.usize(..plans.len());
    let app = &mut plans[index];
    let rollback_targets: Vec<Uuid> = app
        .listed
        .iter()
        .filter(|id| available.get(&app.uuid).is_some_and(|a| a.contains(id)))
        .copied()
        .collect();
    // A delete or a rollback that has nothing to act on becomes a take.
    let mut choice = rng.u8(..11);
    if (choice == 4 || choice == 5) && app.listed.is_empty()
        || (choice == 6 || choice == 7) && rollback_targets.is_empty()
    {
        choice = 0;
    }
    match choice {
        4..=5 => {
            let id = app.listed.remove(rng.usize(..app.listed.len()));
            format!("app {index}: delete {}", short_id(&id))
        }
        6..=7 => {
            let id = rollback_targets[rng.usize(..rollback_targets.len())];
            app.active_snapshot = Some(id);
            app.rollback_counter += 1;
            format!("app {index}: roll back to {}", short_id(&id))
        }
        8 => {
            app.version += 1;
            format!("app {index}: version {}", app.version)
        }
        10 => {
            app.active = !app.active;
            format!(
                "app {index}: {}",
                if app.active { "activate" } else { "deactivate" }
            )
        }
        9 => {
            app.scheduled = !app.scheduled;
            format!(
                "app {index}: schedule {}",
                if app.scheduled { SCHEDULE } else { "off" }
            )
        }
        _ => {
            let mut what = String::new();
            if app.listed.len() >= MAX_LISTED {
                let oldest = app.listed.remove(0);
                what = format!("delete {} and ", short_id(&oldest));
            }
            let id = random_uuid(rng);
            app.listed.push(id);
            format!("app {index}: {what}take {}", short_id(&id))
        }
    }
}

// ---- the guest: qemu and its serial console ----

/// The repository's `images/` directory (this tool runs from the source tree).
/// The test guest's kernel and initramfs as a tar (handed to the device as a raw disk, which
/// its busybox tar reads; tar pads to 512-byte blocks).
fn test_guest_tar(work: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(images_dir().join("test-guest/build"))
        .stderr(Stdio::inherit())
        .output()
        .context("running images/test-guest/build")?;
    if !out.status.success() {
        bail!("images/test-guest/build failed: {}", out.status);
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let tar = work.join("test-guest.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&dir)
        .args(["vmlinuz", "initramfs.cpio.gz"])
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar of the test guest in {dir} failed: {status}");
    }
    Ok(tar)
}

fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

/// One boot of the device: qemu (via `images/run`, which execs it: the child is qemu itself)
/// with its console on two fifos.
struct Guest {
    qemu: Child,
    /// The console's input, opened read-write so that opening never blocks.
    input: File,
    /// Everything the console printed during this boot.
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    launched: Instant,
    commands: u32,
    out_fifo: PathBuf,
}

impl Guest {
    /// `vm_disk`: the test guest's tar, for VM apps (the device then gets 1 GiB: the test
    /// guest's 128 MiB and its qemu's TCG code cache).
    fn boot(
        image: &Path,
        work: &Path,
        fresh: bool,
        console_log: &Path,
        vm_disk: Option<&Path>,
    ) -> anyhow::Result<Guest> {
        let base = work.join("con");
        for end in ["in", "out"] {
            let fifo = base.with_extension(end);
            if !fifo.exists() {
                nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .with_context(|| format!("mkfifo {}", fifo.display()))?;
            }
        }
        let mut command = Command::new(images_dir().join("run"));
        command
            .arg("--image")
            .arg(image)
            .arg("--persist")
            .arg(work.join("persist.qcow2"))
            .arg("--console")
            .arg(format!("pipe:{}", base.display()));
        if fresh {
            command.arg("--fresh");
        }
        if let Some(disk) = vm_disk {
            command.args(["--memory", "1024", "--extra-disk"]).arg(disk);
        }
        let qemu_log = File::create(work.join("qemu.log"))?;
        let qemu = command
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log)
            .spawn()
            .context("starting images/run")?;
        let launched = Instant::now();
        let input = OpenOptions::new()
            .read(true)
            .write(true)
            .open(base.with_extension("in"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let out_path = base.with_extension("out");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(console_log)?;
        let sink = output.clone();
        // Blocks in open until qemu has the fifo; ends at EOF, when qemu is gone.
        let reader = std::thread::spawn(move || {
            let Ok(mut fifo) = File::open(&out_path) else {
                return;
            };
            let mut chunk = [0u8; 4096];
            while let Ok(n) = fifo.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let _ = log.write_all(&chunk[..n]);
                if let Ok(mut all) = sink.lock() {
                    all.extend_from_slice(&chunk[..n]);
                }
            }
        });
        Ok(Guest {
            qemu,
            input,
            output,
            reader: Some(reader),
            launched,
            commands: 0,
            out_fifo: base.with_extension("out"),
        })
    }

    fn text(&self) -> String {
        let bytes = self.output.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    fn alive(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// Waits until the console printed `pattern`, qemu died, or `bound` passed.
    fn wait_for(&mut self, pattern: &str, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if self.text().contains(pattern) {
                return Ok(());
            }
            if !self.alive() {
                bail!("qemu exited while waiting for {pattern:?}");
            }
            if Instant::now() > deadline {
                bail!("no {pattern:?} on the console within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a shell command in the guest: its exit status and its output (stdout and stderr;
    /// the init's `CAIRN-` lines, which may land in between, left out). The markers are
    /// split by quotes in the typed text, so that an echo of the line never matches them.
    fn run(&mut self, command: &str) -> anyhow::Result<(i32, String)> {
        self.commands += 1;
        let n = self.commands;
        let line =
            format!("echo @@B-\"{n}\"@@; {{ {command} ; }} 2>&1; echo @@E-\"{n}\"-rc=$?@@\n");
        self.input.write_all(line.as_bytes())?;
        let end = format!("@@E-{n}-rc=");
        self.wait_for(&end, COMMAND_BOUND)
            .with_context(|| format!("guest command {command:.80}"))?;
        let text = self.text();
        let begin = format!("@@B-{n}@@");
        let start = text
            .find(&begin)
            .map(|i| i + begin.len())
            .context("no begin marker")?;
        let stop = text[start..]
            .find(&end)
            .map(|i| start + i)
            .context("no end marker")?;
        let rc: i32 = text[stop + end.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(-1);
        let body: Vec<&str> = text[start..stop]
            .lines()
            .filter(|l| !l.starts_with("CAIRN-"))
            .collect();
        Ok((rc, body.join("\n")))
    }

    /// The power cut: SIGKILL of qemu. What the guest had in its page cache is gone.
    fn cut(mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        // A qemu that died before opening the console leaves the reader blocked in open: a
        // writer of our own lets it through to EOF.
        drop(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.out_fifo),
        );
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// A clean end: `poweroff` in the guest, bounded, else the cut.
    fn power_off(mut self) {
        let _ = self.input.write_all(b"poweroff\n");
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.cut();
    }
}

/// Replaces the config on the guest's /persist: typed in base64 pieces, decoded beside it,
/// fsynced, renamed and the directory fsynced (the config-agent never reads half a file, and
/// the config the device has after a cut is the last one written).
fn write_config(guest: &mut Guest, config: &serde_json::Value) -> anyhow::Result<()> {
    let encoded = base64_encode(&serde_json::to_vec_pretty(config)?);
    guest.run("rm -f /persist/.config.b64")?;
    for piece in encoded.as_bytes().chunks(BASE64_PIECE) {
        let piece = std::str::from_utf8(piece)?;
        let (rc, out) = guest.run(&format!("echo {piece} >> /persist/.config.b64"))?;
        if rc != 0 {
            bail!("writing the config in the guest: {out}");
        }
    }
    let (rc, out) = guest.run(
        "base64 -d /persist/.config.b64 > /persist/config.json.new && \
         sync /persist/config.json.new && mv /persist/config.json.new /persist/config.json && \
         sync /persist && rm -f /persist/.config.b64",
    )?;
    if rc != 0 {
        bail!("replacing the config in the guest: {out}");
    }
    Ok(())
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- the invariants, checked in the guest ----

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// An app not Running, a snapshot in flight or missing, a rollback in progress.
    App(String),
    /// A snapshot record or volume snapshot directory without its snapshot, or the reverse.
    Leak(String),
    /// A record `cairn record check` refuses.
    Record(String),
    /// "panicked" in a log.
    Panic(String),
    /// The guest could not be asked.
    Guest(String),
    /// A qcow2 volume `qemu-img check` finds leaks or corruption in.
    Qcow2(String),
}

/// Each app Running (halted when deactivated), nothing in flight, every listed snapshot
/// available or failed with a reason, and nothing available that the config deleted
/// (scheduled ones are the device's).
fn apps_settled(
    statuses: &[AppInstanceStatus],
    plans: &[AppPlan],
    ever_listed: &BTreeSet<Uuid>,
    faults: &mut Vec<Fault>,
) -> Snapshots {
    let mut seen = Snapshots::default();
    for (i, app) in plans.iter().enumerate() {
        let Some(status) = statuses
            .iter()
            .find(|s| s.uuid_and_version.uuid == app.uuid)
        else {
            faults.push(Fault::App(format!("app {i}: no status")));
            continue;
        };
        // A deactivated app ends halted (EVE: Halted; Installed if it never ran).
        let settled = if app.active {
            status.activated && status.state == SwState::Running
        } else {
            !status.activated && matches!(status.state, SwState::Halted | SwState::Installed)
        };
        if !settled {
            let why = &status.error.error;
            faults.push(Fault::App(format!(
                "app {i}: {:?} activated={} but the config says activate={} {why}",
                status.state, status.activated, app.active
            )));
        }
        let snap = &status.snap_status;
        for request in &snap.requested_snapshots {
            let id = request.snapshot.snapshot_id;
            if request.error.error.is_empty() {
                faults.push(Fault::App(format!(
                    "app {i}: snapshot {} in flight",
                    short_id(&id)
                )));
            } else {
                seen.failed.insert(id, request.error.error.clone());
            }
        }
        seen.pending
            .extend(snap.snapshots_to_be_deleted.iter().map(|s| s.snapshot_id));
        if snap.rollback_in_progress {
            faults.push(Fault::App(format!("app {i}: rollback in progress")));
        }
        let have: BTreeSet<Uuid> = snap
            .available_snapshots
            .iter()
            .map(|s| s.snapshot.snapshot_id)
            .collect();
        let want: BTreeSet<Uuid> = app
            .listed
            .iter()
            .filter(|id| !seen.failed.contains_key(id))
            .copied()
            .collect();
        let missing: BTreeSet<Uuid> = want.difference(&have).copied().collect();
        if !missing.is_empty() {
            faults.push(Fault::App(format!(
                "app {i}: listed {} not available",
                short(&missing)
            )));
        }
        let deleted_but_there: BTreeSet<Uuid> = have
            .iter()
            .filter(|id| ever_listed.contains(id) && !app.listed.contains(id))
            .copied()
            .collect();
        if !deleted_but_there.is_empty() {
            faults.push(Fault::App(format!(
                "app {i}: deleted {} still available",
                short(&deleted_but_there)
            )));
        }
        seen.scheduled += have.iter().filter(|id| !ever_listed.contains(id)).count();
        seen.available.insert(app.uuid, have);
    }
    seen
}

/// The directories on the guest's /persist, by the section the listing named.
fn parse_listing(out: &str) -> BTreeMap<String, BTreeSet<Uuid>> {
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if let Some(dir) = line.strip_prefix("DIR ") {
            current = Some(dir.trim().to_string());
            sections
                .entry(dir.trim().to_string())
                .or_insert_with(BTreeSet::new);
        } else if let (Some(dir), Ok(id)) = (&current, line.trim().parse::<Uuid>())
            && let Some(set) = sections.get_mut(dir)
        {
            set.insert(id);
        }
    }
    sections
}

/// The records and each volume's snapshot directories against the available snapshots (a
/// failed snapshot may keep its record, never its volume data; a pending deletion keeps
/// both until the app stops).
fn snapshots_on_disk_match(
    listing: &BTreeMap<String, BTreeSet<Uuid>>,
    plans: &[AppPlan],
    snapshots: &Snapshots,
    faults: &mut Vec<Fault>,
) {
    let empty = BTreeSet::new();
    let records = listing.get("/persist/snapshots").unwrap_or(&empty);
    let volumes = plans.iter().enumerate().map(|(i, app)| {
        let dir = if app.qcow2 {
            app.qcow2_path()
        } else {
            format!(
                "/persist/volumes/.snapshots/{}",
                cairn_types::volume_key(app.volume, 0)
            )
        };
        (i, app.uuid, listing.get(&dir).unwrap_or(&empty))
    });
    faults.extend(
        snapshot_leaks(records, volumes, snapshots)
            .into_iter()
            .map(Fault::Leak),
    );
}

/// Lists the snapshot record directories and each volume's snapshot directories.
const LISTING: &str = "for d in /persist/snapshots /persist/volumes/.snapshots/*; do \
     [ -d \"$d\" ] && { echo \"DIR $d\"; ls -1 \"$d\"; }; done";
/// Every record on /persist through `cairn record check`; prints only the refused ones.
/// The local config is the technician's file, not a record; volumes hold app data.
const RECORDS: &str = "find /persist -name '*.json' -type f ! -path '/persist/volumes/*' \
     ! -path '/persist/lost+found/*' ! -name 'config.json*' ! -name '.*' | \
     while read -r f; do cairn record check \"$f\"; done | grep -v ': OK' ; true";
const PANICS: &str = "grep -H panicked /run/logs/* /run/cairn-up.log 2>/dev/null; true";

/// One look at the device from its console.
struct Look {
    faults: Vec<Fault>,
    snapshots: Snapshots,
    records_checked: usize,
}

fn look(
    guest: &mut Guest,
    plans: &[AppPlan],
    ever_listed: &BTreeSet<Uuid>,
    baseline: &BTreeSet<Uuid>,
) -> Look {
    let mut faults = Vec::new();
    let mut snapshots = Snapshots::default();
    let mut records_checked = 0;
    match guest.run("cairn apps --json") {
        Ok((0, out)) => match serde_json::from_str::<Vec<AppInstanceStatus>>(&out) {
            Ok(statuses) => {
                snapshots = apps_settled(&statuses, plans, ever_listed, &mut faults);
            }
            Err(e) => faults.push(Fault::Guest(format!("cairn apps --json: {e}"))),
        },
        Ok((rc, out)) => faults.push(Fault::Guest(format!(
            "cairn apps --json exited {rc}: {out:.200}"
        ))),
        Err(e) => faults.push(Fault::Guest(format!("{e:#}"))),
    }
    if !faults.is_empty() {
        return Look {
            faults,
            snapshots,
            records_checked,
        };
    }
    // Only a settled app-manager view says which directories should exist. A qcow2 volume's
    // snapshots are its internal ones, listed like a directory (-U: an app may hold it).
    let mut listing_command = LISTING.to_string();
    for app in plans.iter().filter(|a| a.qcow2) {
        let path = app.qcow2_path();
        listing_command.push_str(&format!(
            "; [ -f '{path}' ] && {{ echo 'DIR {path}'; qemu-img snapshot -l -U '{path}' | awk 'NR > 2 {{ print $2 }}'; }}"
        ));
    }
    match guest.run(&listing_command) {
        Ok((_, out)) => {
            let mut listing = parse_listing(&out);
            if let Some(records) = listing.get_mut("/persist/snapshots") {
                records.retain(|id| !baseline.contains(id));
            }
            snapshots_on_disk_match(&listing, plans, &snapshots, &mut faults)
        }
        Err(e) => faults.push(Fault::Guest(format!("{e:#}"))),
    }
    match guest.run(RECORDS) {
        Ok((_, out)) => {
            for line in out.lines().filter(|l| l.contains("INVALID")) {
                // Every schema is checked field by field, the agents' own by their binaries.
                if line.contains("No such file or directory") {
                    // Deleted between the find and the check (a deletion, a retention): gone
                    // whole, not damaged; the listing above judges what should exist.
                } else {
                    faults.push(Fault::Record(line.to_string()));
                }
            }
        }
        Err(e) => faults.push(Fault::Guest(format!("{e:#}"))),
    }
    for app in plans.iter().filter(|a| a.qcow2) {
        let path = app.qcow2_path();
        // 0: clean; 3: leaked clusters; 2: corruption; 1: the check could not finish.
        match guest.run(&format!("[ ! -f '{path}' ] || qemu-img check -U '{path}'")) {
            Ok((0, _)) => {}
            Ok((rc, out)) => faults.push(Fault::Qcow2(format!(
                "{path}: qemu-img check exited {rc}: {}",
                out.lines().take(3).collect::<Vec<_>>().join(" / ")
            ))),
            Err(e) => faults.push(Fault::Guest(format!("{e:#}"))),
        }
    }
    if let Ok((_, out)) = guest.run(
        "find /persist -name '*.json' -type f ! -path '/persist/volumes/*' ! -name 'config.json*' | wc -l",
    ) {
        records_checked = out.trim().parse().unwrap_or(0);
    }
    faults.extend(panics(guest));
    Look {
        faults,
        snapshots,
        records_checked,
    }
}

fn panics(guest: &mut Guest) -> Vec<Fault> {
    match guest.run(PANICS) {
        Ok((_, out)) => out
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(|l| Fault::Panic(l.to_string()))
            .collect(),
        Err(e) => vec![Fault::Guest(format!("{e:#}"))],
    }
}

// ---- figures ----

#[derive(Default)]
struct Figures {
    cuts: usize,
    /// Cuts while the device was booting or recovering from the previous one.
    cuts_in_recovery: usize,
    /// Boots after a cut that converged with nothing wrong.
    survived: usize,
    boots_checked: usize,
    /// From qemu's launch to converged, per boot after a cut that was checked.
    converged: Vec<Duration>,
    /// The cut (with its job's label) after which the boot did not converge, and why.
    stuck: Vec<(String, Vec<Fault>)>,
    unreadable: BTreeSet<String>,
    leaks: BTreeSet<String>,
    failed: BTreeMap<Uuid, String>,
    panics: BTreeSet<String>,
    records_checked: usize,
    most_scheduled: usize,
    fsck_corrected: usize,
    qcow2_problems: Vec<String>,
    /// Apps on qcow2 volumes, and the device's `qemu-img check`s of them that came back clean.
    qcow2_apps: usize,
    volume_checks_clean: usize,
    changes: usize,
    /// Evidence that a cut loses what the guest had not synced: a line written (no fsync)
    /// just before the cut, and how often it was gone after the boot.
    unsynced_written: usize,
    unsynced_lost: usize,
    /// Boots whose e2fsck replayed the ext4 journal (an unclean stop).
    journal_replays: usize,
}

impl Figures {
    /// Adds what another job saw.
    fn merge(&mut self, other: Figures) {
        self.cuts += other.cuts;
        self.cuts_in_recovery += other.cuts_in_recovery;
        self.survived += other.survived;
        self.boots_checked += other.boots_checked;
        self.converged.extend(other.converged);
        self.stuck.extend(other.stuck);
        self.unreadable.extend(other.unreadable);
        self.leaks.extend(other.leaks);
        self.failed.extend(other.failed);
        self.panics.extend(other.panics);
        self.records_checked = self.records_checked.max(other.records_checked);
        self.most_scheduled = self.most_scheduled.max(other.most_scheduled);
        self.fsck_corrected += other.fsck_corrected;
        self.qcow2_problems.extend(other.qcow2_problems);
        self.qcow2_apps += other.qcow2_apps;
        self.volume_checks_clean += other.volume_checks_clean;
        self.changes += other.changes;
        self.unsynced_written += other.unsynced_written;
        self.unsynced_lost += other.unsynced_lost;
        self.journal_replays += other.journal_replays;
    }

    fn clean(&self) -> bool {
        self.survived == self.boots_checked
            && self.unreadable.is_empty()
            && self.leaks.is_empty()
            && self.panics.is_empty()
            && self.qcow2_problems.is_empty()
    }

    fn print(&self, seed: u64, jobs: usize) {
        println!("\n== cairn-powercut figures ==");
        if jobs > 1 {
            println!(
                "seed: {seed} (--jobs {jobs}: seeds {seed}..={})",
                seed.wrapping_add(jobs as u64 - 1)
            );
        } else {
            println!("seed: {seed}");
        }
        println!(
            "power cuts: {} ({} during boot or recovery); config changes: {}",
            self.cuts, self.cuts_in_recovery, self.changes
        );
        println!(
            "boots checked after a cut: {}; survived (converged, nothing wrong): {}",
            self.boots_checked, self.survived
        );
        for (cut, faults) in self.stuck.iter().take(8) {
            println!("  after cut {cut}:");
            for fault in faults.iter().take(8) {
                println!("    {fault:?}");
            }
        }
        println!(
            "records unreadable: {} (records checked at the last look: {})",
            self.unreadable.len(),
            self.records_checked
        );
        for record in self.unreadable.iter().take(5) {
            println!("  {record}");
        }
        println!("leaked snapshots (either way): {}", self.leaks.len());
        for leak in self.leaks.iter().take(5) {
            println!("  {leak}");
        }
        println!("failed snapshots (with a reason): {}", self.failed.len());
        for (id, error) in self.failed.iter().take(5) {
            println!("  {id}: {error}");
        }
        println!("logs with \"panicked\": {}", self.panics.len());
        for panic in self.panics.iter().take(5) {
            println!("  {panic}");
        }
        println!(
            "e2fsck corrections at boot: {}; persist qcow2 problems (qemu-img check): {}",
            self.fsck_corrected,
            self.qcow2_problems.len()
        );
        for problem in self.qcow2_problems.iter().take(5) {
            println!("  {problem}");
        }
        println!(
            "apps on qcow2 volumes: {}; their qemu-img checks in the device at convergence, clean: {}",
            self.qcow2_apps, self.volume_checks_clean
        );
        println!(
            "unsynced line written just before the cut, gone after the boot: {} of {}; \
             boots that replayed the ext4 journal: {}",
            self.unsynced_lost, self.unsynced_written, self.journal_replays
        );
        println!(
            "scheduled snapshots available at once, at most: {}",
            self.most_scheduled
        );
        let mut times = self.converged.clone();
        times.sort();
        if let Some(max) = times.last() {
            println!(
                "boot to converged after a cut (from qemu's launch): median {:.1}s, max {:.1}s ({} boots)",
                times[(times.len() - 1) / 2].as_secs_f64(),
                max.as_secs_f64(),
                times.len()
            );
        }
        println!(
            "result: {}",
            if self.clean() { "CLEAN" } else { "FAULTS SEEN" }
        );
    }

    /// Keeps what a look found that is a fault whatever the timing.
    fn note(&mut self, seen: &Look) {
        for fault in &seen.faults {
            match fault {
                Fault::Record(r) => {
                    self.unreadable.insert(r.clone());
                }
                Fault::Panic(p) => {
                    self.panics.insert(p.clone());
                }
                _ => {}
            }
        }
        for (id, error) in &seen.snapshots.failed {
            self.failed.entry(*id).or_insert_with(|| error.clone());
        }
    }
}

/// `qemu-img check` of the persist disk: leaked clusters are what a killed qemu leaves (and
/// harmless); anything else is a fault.
fn check_qcow2(persist: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output", "json"])
        .arg(persist)
        .output()
        .ok()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let corruptions = report["corruptions"].as_u64().unwrap_or(0);
    let errors = report["check-errors"].as_u64().unwrap_or(0);
    if corruptions + errors > 0 {
        Some(format!(
            "{}: {corruptions} corruptions, {errors} check errors",
            persist.display()
        ))
    } else {
        None
    }
}

/// Boots the guest and waits until it converged; the time from qemu's launch, or the faults.
fn boot_and_converge(
    guest: &mut Guest,
    plans: &[AppPlan],
    ever_listed: &BTreeSet<Uuid>,
    baseline: &BTreeSet<Uuid>,
    unsynced: &mut Option<String>,
    figures: &mut Figures,
) -> (Look, Option<Duration>) {
    if let Err(e) = guest.wait_for("CAIRN-AGENTS-READY", BOOT_BOUND) {
        let look = Look {
            faults: vec![Fault::Guest(format!("{e:#}"))],
            snapshots: Snapshots::default(),
            records_checked: 0,
        };
        return (look, None);
    }
    if guest.text().contains("CAIRN-WARN e2fsck corrected") {
        figures.fsck_corrected += 1;
    }
    let _ = guest.run("stty -echo; dmesg -n 1");
    if let Ok((_, out)) = guest.run("grep -c 'recovering journal' /run/e2fsck.log; true")
        && out.trim().parse::<u32>().unwrap_or(0) > 0
    {
        figures.journal_replays += 1;
    }
    if let Some(line) = unsynced.take() {
        figures.unsynced_written += 1;
        match guest.run(&format!("cat {UNSYNCED} 2>/dev/null; true")) {
            Ok((_, out)) if out.trim() == line => {}
            _ => figures.unsynced_lost += 1,
        }
    }
    let deadline = Instant::now() + CONVERGE_BOUND;
    loop {
        let seen = look(guest, plans, ever_listed, baseline);
        figures.note(&seen);
        if seen.faults.is_empty() {
            // A look without faults ran `qemu-img check` clean on every qcow2 volume.
            figures.volume_checks_clean += plans.iter().filter(|a| a.qcow2).count();
            return (seen, Some(guest.launched.elapsed()));
        }
        if Instant::now() > deadline || !guest.alive() {
            return (seen, None);
        }
        std::thread::sleep(POLL);
    }
}

fn run(options: &Options, image: &Path, work: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let console_log = work.join("console.log");
    let persist = work.join("persist.qcow2");
    let mut plans: Vec<AppPlan> = (0..options.apps)
        .map(|i| AppPlan {
            uuid: random_uuid(&mut rng),
            volume: random_uuid(&mut rng),
            version: 1,
            listed: Vec::new(),
            active_snapshot: None,
            rollback_counter: 0,
            // One app on a schedule from the start: scheduled snapshots in every run.
            scheduled: i == 0,
            active: true,
            qcow2: false,
        })
        .collect();
    let mut ever_listed = BTreeSet::new();
    let mut unsynced = None;

    // First boot: a blank persist disk, the demo config replaced by ours.
    // VM apps on qcow2 volumes when the image can run them (#24's image has qemu-img).
    let manifest = std::fs::read_to_string(image.join("manifest.txt")).unwrap_or_default();
    let vm_disk = if manifest.contains(" /usr/bin/qemu-img ") {
        for app in plans.iter_mut().skip(1).step_by(2) {
            app.qcow2 = true;
        }
        Some(test_guest_tar(work)?)
    } else {
        None
    };
    figures.qcow2_apps = plans.iter().filter(|a| a.qcow2).count();
    println!(
        "{}VM apps on qcow2 volumes: {} of {}{}",
        options.label,
        figures.qcow2_apps,
        plans.len(),
        if vm_disk.is_none() {
            " (the image has no qemu-img)"
        } else {
            ""
        }
    );
    let mut guest = Guest::boot(image, work, true, &console_log, vm_disk.as_deref())?;
    guest
        .wait_for("CAIRN-AGENTS-READY", BOOT_BOUND)
        .context("first boot")?;
    guest.run("stty -echo; dmesg -n 1")?;
    // The demo app's snapshot (the config the device seeds itself with on first boot), if
    // taken before ours replaced it, stays with the demo's detached volume: not ours to count.
    let baseline: BTreeSet<Uuid> = [DEMO_SNAPSHOT].into();
    if vm_disk.is_some() {
        let (rc, out) = guest.run(&format!(
            "mkdir -p {GUEST_DIR} && tar -xf /dev/vdc -C {GUEST_DIR} && sync"
        ))?;
        if rc != 0 {
            guest.cut();
            bail!("cannot copy the test guest from /dev/vdc in the device: {out:.300}");
        }
    }
    write_config(&mut guest, &config_json(&plans))?;
    let (first, took) = boot_and_converge(
        &mut guest,
        &plans,
        &ever_listed,
        &baseline,
        &mut unsynced,
        figures,
    );
    if took.is_none() {
        guest.cut();
        bail!(
            "the device did not converge on its first boot: {:?}",
            first.faults
        );
    }
    println!(
        "{}device up: {} apps running, {:.1}s from qemu's launch",
        options.label,
        plans.len(),
        guest.launched.elapsed().as_secs_f64()
    );
    let mut available = first.snapshots.available;
    let mut converged_now = true;

    for cut in 1..=options.cuts {
        let mut what = Vec::new();
        if converged_now {
            // A few changes, each at a random moment, then the cut at another.
            for _ in 0..rng.usize(1..=4) {
                let change = change_config(&mut rng, &mut plans, &available);
                ever_listed.extend(plans.iter().flat_map(|p| p.listed.iter().copied()));
                write_config(&mut guest, &config_json(&plans))?;
                figures.changes += 1;
                what.push(change);
                std::thread::sleep(Duration::from_millis(rng.u64(..=2000)));
            }
            // The logs die with the guest: read them for panics now.
            for fault in panics(&mut guest) {
                if let Fault::Panic(p) = fault {
                    figures.panics.insert(p);
                }
            }
            // Written, never synced: a cut must lose it (the guest's page cache dies).
            let line = format!("cut-{cut}");
            guest.run(&format!("echo {line} > {UNSYNCED}"))?;
            unsynced = Some(line);
            let delay = rng.u64(..=5000);
            std::thread::sleep(Duration::from_millis(delay));
            what.push(format!(
                "cut {:.1}s after the last change",
                delay as f64 / 1000.0
            ));
        } else {
            figures.cuts_in_recovery += 1;
            what.push("cut during boot/recovery".into());
        }
        guest.cut();
        figures.cuts += 1;
        if let Some(problem) = check_qcow2(&persist) {
            figures
                .qcow2_problems
                .push(format!("{}after cut {cut}: {problem}", options.label));
        }
        guest = Guest::boot(image, work, false, &console_log, vm_disk.as_deref())?;
        // One cut in five falls while the device boots or recovers.
        if cut < options.cuts && rng.u8(..5) == 0 {
            let delay = rng.u64(2000..=40_000);
            std::thread::sleep(Duration::from_millis(delay));
            println!(
                "{}#{cut} {}; next cut {:.1}s into the boot",
                options.label,
                what.join("; "),
                delay as f64 / 1000.0
            );
            converged_now = false;
            continue;
        }
        figures.boots_checked += 1;
        let (seen, took) = boot_and_converge(
            &mut guest,
            &plans,
            &ever_listed,
            &baseline,
            &mut unsynced,
            figures,
        );
        figures.most_scheduled = figures.most_scheduled.max(seen.snapshots.scheduled);
        figures.records_checked = seen.records_checked;
        match took {
            Some(took) => {
                println!(
                    "{}#{cut} {}: converged {:.1}s after launch",
                    options.label,
                    what.join("; "),
                    took.as_secs_f64()
                );
                figures.survived += 1;
                figures.converged.push(took);
                converged_now = true;
            }
            None => {
                println!(
                    "{}#{cut} {}: NOT CONVERGED {:?}",
                    options.label,
                    what.join("; "),
                    seen.faults
                );
                for fault in &seen.faults {
                    if let Fault::Leak(leak) = fault {
                        figures.leaks.insert(leak.clone());
                    }
                }
                figures
                    .stuck
                    .push((format!("{}{cut}", options.label), seen.faults.clone()));
                if !guest.alive()
                    || guest
                        .wait_for("CAIRN-AGENTS-READY", Duration::ZERO)
                        .is_err()
                {
                    bail!("the device does not come up after cut {cut}");
                }
                // Go on from what the device reports: the next changes build on it.
                converged_now = true;
            }
        }
        available = seen.snapshots.available;
    }
    guest.power_off();
    Ok(())
}

/// `--jobs`: the devices side by side, each a [`run`] of its share of the cuts, on its own
/// seed and work directory; the first error is the outcome, after every job has ended.
fn run_jobs(
    options: &Options,
    image: &Path,
    work: &Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.jobs)
            .map(|j| {
                let job = Options {
                    cuts: options.cuts / options.jobs
                        + usize::from(j < options.cuts % options.jobs),
                    seed: options.seed.wrapping_add(j as u64),
                    jobs: 1,
                    label: format!("[{j}] "),
                    ..options.clone()
                };
                let dir = work.join(format!("job-{j}"));
                scope.spawn(move || {
                    let mut figures = Figures::default();
                    let outcome = std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))
                        .and_then(|()| run(&job, image, &dir, &mut figures))
                        .with_context(|| format!("job {j} (seed {})", job.seed));
                    (figures, outcome)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a job's thread panicked"))
            .collect::<Vec<_>>()
    });
    let mut first_error = None;
    for (job_figures, outcome) in outcomes {
        figures.merge(job_figures);
        if let Err(e) = outcome {
            println!("{e:#}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn main() -> ExitCode {
    exit("cairn-powercut", main_inner())
}

/// Whether the run was clean.
fn main_inner() -> anyhow::Result<bool> {
    let options = parse_options()?;
    println!("seed: {}", options.seed);
    let (work, remove_work) = match &options.work {
        Some(work) => {
            std::fs::create_dir_all(work)
                .with_context(|| format!("creating {}", work.display()))?;
            (std::path::absolute(work)?, false)
        }
        None => (
            tempfile::Builder::new()
                .prefix("cairn-powercut-")
                .tempdir()?
                .keep(),
            !options.keep,
        ),
    };
    println!("work: {}", work.display());
    let image = match &options.image {
        Some(image) => image.clone(),
        None => {
            let exe = std::env::current_exe().context("finding this binary")?;
            let bin_dir = exe.parent().context("the binary's directory")?;
            let out = work.join("image");
            let status = Command::new(images_dir().join("build"))
                .arg("--bin-dir")
                .arg(bin_dir)
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::null())
                .status()
                .context("running images/build")?;
            if !status.success() {
                bail!("images/build --bin-dir {} failed", bin_dir.display());
            }
            out
        }
    };
    let started = Instant::now();
    let mut figures = Figures::default();
    let outcome = if options.jobs == 1 {
        run(&options, &image, &work, &mut figures)
    } else {
        run_jobs(&options, &image, &work, &mut figures)
    };
    figures.print(options.seed, options.jobs);
    println!("run took {:.0}s", started.elapsed().as_secs_f64());
    // A run that saw something keeps its console log and disk for a look.
    if remove_work && outcome.is_ok() && figures.clean() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("kept: {} (console.log, persist.qcow2)", work.display());
    }
    outcome?;
    Ok(figures.clean())
}

//! `cairn-torture`: the issue 17 torture run. It runs the real device under `cairn up` on a
//! local config of shell apps, changes the snapshots at random (take, delete, roll back, new
//! version), SIGKILLs one process at random (an agent, the supervisor, an app) and measures
//! whether and how fast the device converges again. Not part of the test suite: a benchmark
//! that prints figures, run by hand after `cargo build --workspace --bins`:
//!
//! `target/debug/cairn-torture [--kills N] [--seed S] [--apps A] [--root DIR] [--keep]
//! [--victims agents,apps,supervisor]`
//!
//! Converged means: one `cairn up`, one process per agent, one process group per app, every
//! app Running with no snapshot in flight, its available snapshots equal to the listed ones
//! that did not fail, and the snapshot records and the volume backend's snapshot directories
//! equal to the available snapshots. The exit status is 0 only if every kill converged and
//! nothing else (duplicate, leak, failed snapshot, panic) was seen.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cairn_e2e::runs::{Snapshots, exit, random_uuid, short, snapshot_leaks, time_seed};
use cairn_pubsub::{Bus, Event, Topic};
use cairn_types::{AppInstanceStatus, SwState, layout};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

const AGENTS: [&str; 4] = [
    "config-agent",
    "app-manager",
    "volume-manager",
    "domain-manager",
];
/// How long one kill may take to converge before the iteration counts as stuck.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);
/// The first start builds the volumes and starts every app: more than a recovery.
const FIRST_START_BOUND: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);
/// How long one read of the app-manager's status may take.
const STATUS_READ: Duration = Duration::from_secs(1);
/// Snapshots listed per app at most; `max_snapshots` is one more, so a take never drops one.
const MAX_LISTED: usize = 3;
const MAX_SNAPSHOTS: usize = 4;
/// What an app runs: it logs its pid at each start and beats; the marker (the device root,
/// the last argument) finds it by its command line.
const APP_SCRIPT: &str = "echo $$ >> pids; while :; do echo x >> beat; sleep 0.2; done";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum VictimKind {
    Agents,
    Apps,
    Supervisor,
}

struct Options {
    kills: usize,
    seed: u64,
    apps: usize,
    root: Option<PathBuf>,
    keep: bool,
    victims: BTreeSet<VictimKind>,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        kills: 200,
        seed: time_seed(),
        apps: 3,
        root: None,
        keep: false,
        victims: [VictimKind::Agents, VictimKind::Apps, VictimKind::Supervisor].into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kills" => options.kills = value()?.parse().context("--kills: a number")?,
            "--seed" => options.seed = value()?.parse().context("--seed: a number")?,
            "--apps" => options.apps = value()?.parse().context("--apps: a number")?,
            "--root" => options.root = Some(PathBuf::from(value()?)),
            "--keep" => options.keep = true,
            "--victims" => {
                options.victims = value()?
                    .split(',')
                    .map(|kind| match kind.trim() {
                        "agents" => Ok(VictimKind::Agents),
                        "apps" => Ok(VictimKind::Apps),
                        "supervisor" => Ok(VictimKind::Supervisor),
                        other => {
                            bail!("--victims: unknown kind {other:?} (agents, apps, supervisor)")
                        }
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "cairn-torture [--kills N (200)] [--seed S (from the time)] [--apps A (3)] \
                     [--root DIR (a tempdir)] [--keep] [--victims agents,apps,supervisor]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if options.apps == 0 || options.victims.is_empty() {
        bail!("--apps and --victims need at least one");
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
}

fn config_json(plans: &[AppPlan], marker: &str) -> serde_json::Value {
    let apps: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let snapshots: Vec<_> = app
                .listed
                .iter()
                .map(|id| serde_json::json!({"id": id, "type": "immediate"}))
                .collect();
            serde_json::json!({
                "uuid": app.uuid,
                "version": app.version.to_string(),
                "display_name": format!("torture-{i}"),
                "restart_policy": "always",
                "volume_refs": [{"uuid": app.volume, "generation_count": 0}],
                "snapshot": {
                    "max_snapshots": MAX_SNAPSHOTS,
                    "active_snapshot": app.active_snapshot.map(|s| s.to_string()).unwrap_or_default(),
                    "rollback_counter": app.rollback_counter,
                    "snapshots": snapshots,
                },
                "domain": {"kind": "process", "command": "/bin/sh",
                           "args": ["-c", APP_SCRIPT, marker]},
            })
        })
        .collect();
    let volumes: Vec<_> = plans
        .iter()
        .map(|app| serde_json::json!({"uuid": app.volume, "generation_count": 0, "format": "dir"}))
        .collect();
    serde_json::json!({"apps": apps, "volumes": volumes})
}

/// One random change of the config, described for the iteration's line; `available` is what
/// the app had at the last convergence (a rollback goes to one of those).
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
    match rng.u8(..10) {
        0..=3 => {
            let mut what = String::new();
            if app.listed.len() >= MAX_LISTED {
                let oldest = app.listed.remove(0);
                what = format!("delete {oldest} and ");
            }
            let id = random_uuid(rng);
            app.listed.push(id);
            format!("app {index}: {what}take {id}")
        }
        4..=5 if !app.listed.is_empty() => {
            let id = app.listed.remove(rng.usize(..app.listed.len()));
            format!("app {index}: delete {id}")
        }
        6..=7 if !rollback_targets.is_empty() => {
            let id = rollback_targets[rng.usize(..rollback_targets.len())];
            app.active_snapshot = Some(id);
            app.rollback_counter += 1;
            format!("app {index}: roll back to {id}")
        }
        8 => {
            app.version += 1;
            format!("app {index}: version {}", app.version)
        }
        _ => "no change".to_string(),
    }
}

// ---- the processes of the device, from /proc ----

struct ProcInfo {
    ppid: i32,
    pgid: i32,
    zombie: bool,
    argv: Vec<String>,
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let pgid = fields.get(2)?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcInfo {
        ppid,
        pgid,
        zombie: matches!(state, 'Z' | 'X' | 'x'),
        argv,
    })
}

fn environ(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn program_name(info: &ProcInfo) -> &str {
    info.argv
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("")
}

/// The live processes of one device root, by role.
#[derive(Default)]
struct Census {
    supervisors: Vec<i32>,
    agents: BTreeMap<&'static str, Vec<i32>>,
    /// Each agent process's parent pid.
    parents: BTreeMap<i32, i32>,
    /// App process group leaders, by the app their domain-manager marked them with.
    apps: BTreeMap<Uuid, Vec<i32>>,
    /// App process group leaders without a readable app marker.
    unmarked_apps: Vec<i32>,
    /// Every live process of the root, whatever its role (for the final cleanup).
    all: Vec<i32>,
}

fn census(root: &Path) -> Census {
    let marker = root.display().to_string();
    let run_env = format!("CAIRN_RUN_DIR={}", root.join("run").display());
    let me = std::process::id() as i32;
    let mut census = Census::default();
    let mut agent_parents = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return census;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some(info) = proc_info(pid) else { continue };
        if info.zombie || pid == me {
            continue;
        }
        let name = program_name(&info);
        let has_marker = info.argv.contains(&marker);
        if name == "cairn" && has_marker && info.argv.iter().any(|a| a == "up") {
            census.supervisors.push(pid);
            census.all.push(pid);
        } else if let Some(agent) = AGENTS.iter().find(|a| name == format!("cairn-{a}")) {
            if environ(pid).contains(&run_env) {
                agent_parents.push((*agent, pid, info.ppid));
                census.all.push(pid);
            }
        } else if has_marker {
            census.all.push(pid);
            if info.pgid == pid {
                let app = environ(pid)
                    .iter()
                    .find_map(|v| v.strip_prefix("CAIRN_DOMAIN_APP=")?.parse::<Uuid>().ok());
                match app {
                    Some(app) => census.apps.entry(app).or_default().push(pid),
                    None => census.unmarked_apps.push(pid),
                }
            }
        }
    }
    // An agent's child between fork and exec still looks like the agent: not a second one.
    for (agent, pid, ppid) in &agent_parents {
        let forked = agent_parents
            .iter()
            .any(|(other, parent, _)| other == agent && parent == ppid);
        if !forked {
            census.agents.entry(agent).or_default().push(*pid);
            census.parents.insert(*pid, *ppid);
        }
    }
    census
}

// ---- the device under `cairn up` ----

struct Device {
    root: PathBuf,
    bin_dir: PathBuf,
    supervisor: Option<Child>,
    runtime: tokio::runtime::Runtime,
}

impl Device {
    fn config_file(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// Replaces the config atomically: the config-agent never reads half a file.
    fn write_config(&self, config: &serde_json::Value) -> anyhow::Result<()> {
        let tmp = self.root.join(".config.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(config)?)?;
        std::fs::rename(&tmp, self.config_file())?;
        Ok(())
    }

    fn start_supervisor(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("cairn-up.log"))?;
        let child = Command::new(self.bin_dir.join("cairn"))
            .arg("--root")
            .arg(&self.root)
            .arg("up")
            .arg("--config")
            .arg(self.config_file())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cairn up")?;
        self.supervisor = Some(child);
        Ok(())
    }

    /// SIGKILLs our `cairn up` and reaps it.
    fn kill_supervisor(&mut self) -> Option<i32> {
        let mut child = self.supervisor.take()?;
        let pid = child.id() as i32;
        let _ = child.kill();
        let _ = child.wait();
        Some(pid)
    }

    /// Every app's status as the app-manager publishes it, or why it cannot be read.
    fn app_statuses(&self) -> Result<Vec<AppInstanceStatus>, String> {
        let run = self.root.join("run");
        let socket = cairn_pubsub::socket_path(&run, "app-manager", AppInstanceStatus::NAME);
        if !socket.exists() {
            return Err("the app-manager publishes no status".into());
        }
        let bus = Bus::new("torture", &run, self.root.join("persist"));
        self.runtime.block_on(async {
            let mut sub = bus.subscribe::<AppInstanceStatus>("app-manager");
            let synced = tokio::time::timeout(STATUS_READ, async {
                loop {
                    match sub.recv().await {
                        Event::Synchronized => return Ok(()),
                        Event::Refused { reason } => return Err(reason),
                        _ => {}
                    }
                }
            })
            .await;
            match synced {
                Ok(Ok(())) => Ok(sub.values().cloned().collect()),
                Ok(Err(reason)) => Err(format!("the app-manager refused: {reason}")),
                Err(_) => Err(format!(
                    "the app-manager's status not readable within {STATUS_READ:?}"
                )),
            }
        })
    }

    fn persist(&self) -> PathBuf {
        self.root.join("persist")
    }

    /// The snapshot record directories under `<persist>/snapshots`.
    fn snapshot_records(&self) -> BTreeSet<Uuid> {
        uuid_entries(&layout::snapshots_dir(&self.persist()))
    }

    /// The backend's snapshot directories of a `dir` volume (`.snapshots/<key>/<id>`).
    fn volume_snapshots(&self, volume: Uuid) -> BTreeSet<Uuid> {
        uuid_entries(
            &layout::volumes_dir(&self.persist())
                .join(".snapshots")
                .join(cairn_types::volume_key(volume, 0)),
        )
    }
}

fn uuid_entries(dir: &Path) -> BTreeSet<Uuid> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

// ---- convergence ----

/// What keeps the device from having converged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// A process missing.
    Process(String),
    /// More than one live process of one kind.
    Duplicate(String),
    /// An app not Running, or a snapshot still in flight.
    App(String),
    /// A snapshot directory without its available snapshot, or the reverse.
    Leak(String),
}

/// One look at the device.
struct Look {
    faults: Vec<Fault>,
    /// The largest number of live processes of one kind (1 when there is no duplicate).
    most_of_one_kind: usize,
    snapshots: Snapshots,
}

fn one_of_each_process(census: &Census, plans: &[AppPlan], faults: &mut Vec<Fault>) -> usize {
    let mut most = census.supervisors.len();
    let mut count = |what: String, pids: &[i32], faults: &mut Vec<Fault>| {
        most = most.max(pids.len());
        match pids.len() {
            0 => faults.push(Fault::Process(format!("no {what}"))),
            1 => {}
            n => faults.push(Fault::Duplicate(format!("{n} {what}: {pids:?}"))),
        }
    };
    count("cairn up".into(), &census.supervisors, faults);
    for agent in AGENTS {
        let pids = census.agents.get(agent).map(Vec::as_slice).unwrap_or(&[]);
        count(agent.into(), pids, faults);
    }
    for (i, app) in plans.iter().enumerate() {
        let pids = census.apps.get(&app.uuid).map(Vec::as_slice).unwrap_or(&[]);
        count(format!("app {i} process groups"), pids, faults);
    }
    agents_owned_by_the_supervisor(census, faults);
    if !census.unmarked_apps.is_empty() {
        faults.push(Fault::Process(format!(
            "app processes without CAIRN_DOMAIN_APP: {:?}",
            census.unmarked_apps
        )));
    }
    most
}

/// Every agent is a child of the live `cairn up`: an agent left by a killed supervisor is an
/// orphan even when it is the only one of its kind (the new supervisor cannot stop it).
fn agents_owned_by_the_supervisor(census: &Census, faults: &mut Vec<Fault>) {
    let [supervisor] = census.supervisors.as_slice() else {
        return;
    };
    for (agent, pids) in &census.agents {
        for pid in pids {
            let parent = census.parents.get(pid).copied().unwrap_or(0);
            if parent != *supervisor {
                faults.push(Fault::Process(format!(
                    "{agent} {pid} is not a child of cairn up {supervisor} (parent {parent})"
                )));
            }
        }
    }
}

/// Each app Running, nothing in flight, its available snapshots the listed ones that did not
/// fail. Returns the failed snapshots, the available ones by app and those pending deletion.
fn apps_settled(
    statuses: &[AppInstanceStatus],
    plans: &[AppPlan],
    faults: &mut Vec<Fault>,
) -> Snapshots {
    let mut failed = BTreeMap::new();
    let mut available = BTreeMap::new();
    let mut pending = BTreeSet::new();
    for (i, app) in plans.iter().enumerate() {
        let Some(status) = statuses
            .iter()
            .find(|s| s.uuid_and_version.uuid == app.uuid)
        else {
            faults.push(Fault::App(format!("app {i}: no status")));
            continue;
        };
        if status.state != SwState::Running {
            let why = &status.error.error;
            faults.push(Fault::App(format!("app {i}: {:?} {why}", status.state)));
        }
        let snap = &status.snap_status;
        for request in &snap.requested_snapshots {
            let id = request.snapshot.snapshot_id;
            if request.error.error.is_empty() {
                faults.push(Fault::App(format!("app {i}: snapshot {id} in flight")));
            } else {
                failed.insert(id, request.error.error.clone());
            }
        }
        // EVE deletes at the app's next deactivation: a pending deletion is a settled state.
        pending.extend(snap.snapshots_to_be_deleted.iter().map(|s| s.snapshot_id));
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
            .filter(|id| !failed.contains_key(id))
            .copied()
            .collect();
        if have != want {
            faults.push(Fault::App(format!(
                "app {i}: available {} but listed {}",
                short(&have),
                short(&want)
            )));
        }
        available.insert(app.uuid, have);
    }
    Snapshots {
        failed,
        available,
        pending,
        scheduled: 0,
    }
}

/// The snapshot records and each volume's snapshot directories equal the available snapshots
/// (a failed snapshot may keep its record, to be reported, never its volume data; a pending
/// deletion keeps both until the app stops).
fn snapshots_on_disk_match(
    device: &Device,
    plans: &[AppPlan],
    snapshots: &Snapshots,
    faults: &mut Vec<Fault>,
) {
    let volumes: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(i, app)| (i, app.uuid, device.volume_snapshots(app.volume)))
        .collect();
    let volumes = volumes.iter().map(|(i, app, on)| (*i, *app, on));
    faults.extend(
        snapshot_leaks(&device.snapshot_records(), volumes, snapshots)
            .into_iter()
            .map(Fault::Leak),
    );
}

fn look(device: &Device, plans: &[AppPlan]) -> Look {
    let mut faults = Vec::new();
    let most_of_one_kind = one_of_each_process(&census(&device.root), plans, &mut faults);
    let snapshots = match device.app_statuses() {
        Ok(statuses) => apps_settled(&statuses, plans, &mut faults),
        Err(why) => {
            faults.push(Fault::App(why));
            Snapshots::default()
        }
    };
    if faults
        .iter()
        .all(|f| matches!(f, Fault::Process(_) | Fault::Duplicate(_)))
    {
        // Only a settled app-manager view says which directories should exist.
        snapshots_on_disk_match(device, plans, &snapshots, &mut faults);
    }
    Look {
        faults,
        most_of_one_kind,
        snapshots,
    }
}

/// Polls until the device converged or `bound` passed; the last look and the time taken.
fn wait_for_convergence(
    iteration: usize,
    device: &Device,
    plans: &[AppPlan],
    since: Instant,
    bound: Duration,
    figures: &mut Figures,
) -> (Look, Option<Duration>) {
    loop {
        let seen = look(device, plans);
        figures.most_of_one_kind = figures.most_of_one_kind.max(seen.most_of_one_kind);
        for fault in &seen.faults {
            let seen = |what: &String| format!("#{iteration}: {what}");
            if let Fault::Duplicate(what) = fault
                && !figures.duplicates.contains(&seen(what))
            {
                figures.duplicates.push(seen(what));
            }
        }
        for (id, error) in &seen.snapshots.failed {
            figures.failed.entry(*id).or_insert_with(|| error.clone());
        }
        if seen.faults.is_empty() {
            return (seen, Some(since.elapsed()));
        }
        if since.elapsed() > bound {
            return (seen, None);
        }
        std::thread::sleep(POLL);
    }
}

// ---- the victims ----

#[derive(Debug, Clone, Copy)]
enum Victim {
    Agent(&'static str),
    Supervisor,
    App(usize),
}

impl Victim {
    fn kind_name(self) -> &'static str {
        match self {
            Victim::Agent(agent) => agent,
            Victim::Supervisor => "cairn up",
            Victim::App(_) => "app",
        }
    }
}

fn pick_victim(rng: &mut fastrand::Rng, kinds: &BTreeSet<VictimKind>, apps: usize) -> Victim {
    let mut candidates = Vec::new();
    if kinds.contains(&VictimKind::Agents) {
        candidates.extend(AGENTS.map(Victim::Agent));
    }
    if kinds.contains(&VictimKind::Supervisor) {
        candidates.push(Victim::Supervisor);
    }
    if kinds.contains(&VictimKind::Apps) {
        candidates.push(Victim::App(rng.usize(..apps)));
    }
    candidates[rng.usize(..candidates.len())]
}

/// SIGKILLs the victim; the pid killed, or None when it had no live process at that instant.
/// A killed supervisor is replaced at once by a new `cairn up`.
fn kill_victim(
    device: &mut Device,
    victim: Victim,
    plans: &[AppPlan],
) -> anyhow::Result<Option<i32>> {
    let census = census(&device.root);
    let pid = match victim {
        Victim::Supervisor => {
            let pid = device.kill_supervisor();
            device.start_supervisor()?;
            return Ok(pid);
        }
        Victim::Agent(agent) => census.agents.get(agent).and_then(|p| p.first().copied()),
        Victim::App(i) => census
            .apps
            .get(&plans[i].uuid)
            .and_then(|p| p.first().copied()),
    };
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        // A SIGKILLed process lingers for a moment; counted then, it would look recovered.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_info(pid).is_some_and(|p| !p.zombie) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(pid)
}

// ---- figures ----

#[derive(Default)]
struct Figures {
    kills: BTreeMap<&'static str, usize>,
    /// Kills that found no live process of the victim (it was being restarted).
    missed: BTreeMap<&'static str, usize>,
    iterations: usize,
    converged: Vec<Duration>,
    stuck: Vec<(usize, String, Vec<Fault>)>,
    most_of_one_kind: usize,
    /// Each duplicate seen, in order, by iteration (`#0` is the first start).
    duplicates: Vec<String>,
    duplicates_after: usize,
    leaks: BTreeSet<String>,
    failed: BTreeMap<Uuid, String>,
    /// Deletions still waiting for their app's next stop after the last kill.
    pending_at_end: usize,
    panics: Vec<String>,
}

impl Figures {
    fn clean(&self) -> bool {
        self.stuck.is_empty()
            && self.most_of_one_kind <= 1
            && self.duplicates_after == 0
            && self.leaks.is_empty()
            && self.failed.is_empty()
            && self.panics.is_empty()
    }

    fn print(&self, seed: u64) {
        println!("\n== cairn-torture figures ==");
        println!("seed: {seed}");
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|(kind, n)| {
                let missed = self.missed.get(kind).copied().unwrap_or(0);
                format!("{kind} {n} ({missed} found no process)")
            })
            .collect();
        println!("kills: {}", kills.join(", "));
        println!(
            "converged: {} / {} iterations",
            self.converged.len(),
            self.iterations
        );
        println!(
            "stuck (not converged within {CONVERGE_BOUND:?}): {}",
            self.stuck.len()
        );
        for (iteration, what, faults) in self.stuck.iter().take(5) {
            println!("  #{iteration} {what}:");
            for fault in faults {
                println!("    {fault:?}");
            }
        }
        println!(
            "duplicate processes: at most {} of one kind seen during the run ({} sighting(s)); {} iteration(s) ended with a duplicate",
            self.most_of_one_kind,
            self.duplicates.len(),
            self.duplicates_after
        );
        for duplicate in self.duplicates.iter().take(5) {
            println!("  {duplicate}");
        }
        println!("leaked snapshots (either way): {}", self.leaks.len());
        for leak in self.leaks.iter().take(5) {
            println!("  {leak}");
        }
        println!("failed snapshots: {}", self.failed.len());
        for (id, error) in self.failed.iter().take(5) {
            println!("  {id}: {error}");
        }
        println!(
            "deletions pending at the end (EVE: done at the app's next stop): {}",
            self.pending_at_end
        );
        println!("logs with \"panicked\": {}", self.panics.len());
        for panic in self.panics.iter().take(5) {
            println!("  {panic}");
        }
        let mut times = self.converged.clone();
        times.sort();
        if let Some(max) = times.last() {
            let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            println!(
                "time to converge: median {:.2}s, p90 {:.2}s, max {:.2}s",
                at(0.5).as_secs_f64(),
                at(0.9).as_secs_f64(),
                max.as_secs_f64()
            );
        }
        println!(
            "result: {}",
            if self.clean() { "CLEAN" } else { "FAULTS SEEN" }
        );
    }
}

/// The log lines under `<root>/run/logs/` that report a panic, as `file: line`.
fn panics_in_logs(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("run/logs")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked")) {
            found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Stops the device: SIGTERM to `cairn up` (it stops its agents, the domain-manager its
/// apps), then SIGKILL to whatever of the root is left. Bounded.
fn stop_everything(device: &mut Device) {
    if let Some(mut child) = device.supervisor.take() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(50);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = census(&device.root).all;
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cairn-torture: processes of the root survive SIGKILL: {left:?}");
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(POLL);
    }
}

fn run(options: &Options, device: &mut Device, figures: &mut Figures) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(options.seed);
    let marker = device.root.display().to_string();
    let mut plans: Vec<AppPlan> = (0..options.apps)
        .map(|_| AppPlan {
            uuid: random_uuid(&mut rng),
            volume: random_uuid(&mut rng),
            version: 1,
            listed: Vec::new(),
            active_snapshot: None,
            rollback_counter: 0,
        })
        .collect();
    device.write_config(&config_json(&plans, &marker))?;
    device.start_supervisor()?;
    let (first, converged) = wait_for_convergence(
        0,
        device,
        &plans,
        Instant::now(),
        FIRST_START_BOUND,
        figures,
    );
    if converged.is_none() {
        bail!(
            "the device did not start within {FIRST_START_BOUND:?}: {:?}",
            first.faults
        );
    }
    println!("device up: {} apps running", plans.len());
    let mut available = first.snapshots.available;

    for iteration in 1..=options.kills {
        let change = change_config(&mut rng, &mut plans, &available);
        device.write_config(&config_json(&plans, &marker))?;
        std::thread::sleep(Duration::from_millis(rng.u64(..=1500)));
        let victim = pick_victim(&mut rng, &options.victims, plans.len());
        let killed_at = Instant::now();
        let pid = kill_victim(device, victim, &plans)?;
        let kind = victim.kind_name();
        *figures.kills.entry(kind).or_default() += 1;
        if pid.is_none() {
            *figures.missed.entry(kind).or_default() += 1;
        }
        figures.iterations += 1;
        let what = match (victim, pid) {
            (Victim::App(i), Some(pid)) => format!("{change}; killed app {i} (pid {pid})"),
            (_, Some(pid)) => format!("{change}; killed {kind} (pid {pid})"),
            (_, None) => format!("{change}; {kind} had no process to kill"),
        };
        let (seen, took) = wait_for_convergence(
            iteration,
            device,
            &plans,
            killed_at,
            CONVERGE_BOUND,
            figures,
        );
        match took {
            Some(took) => {
                println!(
                    "#{iteration} {what}: converged in {:.2}s",
                    took.as_secs_f64()
                );
                figures.converged.push(took);
            }
            None => {
                println!("#{iteration} {what}: STUCK {:?}", seen.faults);
                if seen.most_of_one_kind > 1 {
                    figures.duplicates_after += 1;
                }
                for fault in &seen.faults {
                    if let Fault::Leak(leak) = fault {
                        figures.leaks.insert(leak.clone());
                    }
                }
                figures.stuck.push((iteration, what, seen.faults.clone()));
            }
        }
        available = seen.snapshots.available;
        figures.pending_at_end = seen.snapshots.pending.len();
    }
    Ok(())
}

fn main() -> ExitCode {
    exit("cairn-torture", main_inner())
}

/// Whether the run was clean.
fn main_inner() -> anyhow::Result<bool> {
    let options = parse_options()?;
    println!("seed: {}", options.seed);
    let exe = std::env::current_exe().context("finding this binary")?;
    let bin_dir = exe
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    for binary in std::iter::once("cairn".to_string()).chain(AGENTS.map(|a| format!("cairn-{a}"))) {
        if !bin_dir.join(&binary).is_file() {
            bail!(
                "{} is missing: run `cargo build --workspace --bins` first",
                bin_dir.join(&binary).display()
            );
        }
    }
    let (root, remove_root) = match &options.root {
        Some(root) => {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating {}", root.display()))?;
            (std::path::absolute(root)?, false)
        }
        None => (
            tempfile::Builder::new()
                .prefix("cairn-torture-")
                .tempdir()?
                .keep(),
            !options.keep,
        ),
    };
    println!("root: {}", root.display());
    let mut device = Device {
        root,
        bin_dir,
        supervisor: None,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    let mut figures = Figures::default();
    let outcome = run(&options, &mut device, &mut figures);
    stop_everything(&mut device);
    figures.panics = panics_in_logs(&device.root);
    figures.print(options.seed);
    if remove_root {
        let _ = std::fs::remove_dir_all(&device.root);
    } else {
        println!("kept: {}", device.root.display());
    }
    outcome?;
    Ok(figures.clean())
}

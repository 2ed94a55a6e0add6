//! What a technician reads: the agents' publications, taken over the bus sockets (read-only by
//! construction), plus the snapshot records on disk that no agent could load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_pubsub::{Bus, Event, Topic, socket_path};
use cairn_types::export::ExportStatus;
use cairn_types::layout::{SNAPSHOT_INSTANCE_STATUS_FILE, snapshots_dir};
use cairn_types::{
    AppInstanceStatus, ContentTreeStatus, DeviceStatus, DomainStatus, LogManagerStatus,
    SnapshotInstanceStatus, VolumeStatus,
};
use serde::Serialize;

use crate::supervision::Supervisor;

pub const AGENTS: [&str; 8] = [
    "config-agent",
    "app-manager",
    "volume-manager",
    "domain-manager",
    "downloader",
    "log-manager",
    "baseos-manager",
    "edgeview",
];

/// The run and persist roots the device uses.
#[derive(Debug, Clone)]
pub struct Roots {
    pub run: PathBuf,
    pub persist: PathBuf,
}

impl Roots {
    /// `--root DIR` → `DIR/run`, `DIR/persist`; else `CAIRN_RUN_DIR`/`CAIRN_PERSIST_DIR`; else the
    /// demo root `./cairn-demo` if it exists; else the device defaults.
    pub fn resolve(root: Option<&Path>) -> Self {
        use cairn_types::layout::*;
        if let Some(root) = root {
            return Self::under(root);
        }
        let run = std::env::var_os(RUN_DIR_ENV).map(PathBuf::from);
        let persist = std::env::var_os(PERSIST_DIR_ENV).map(PathBuf::from);
        if run.is_some() || persist.is_some() {
            return Self {
                run: run.unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
                persist: persist.unwrap_or_else(|| DEFAULT_PERSIST_DIR.into()),
            };
        }
        let demo = Path::new(DEMO_ROOT);
        if demo.is_dir() {
            return Self::under(demo);
        }
        Self {
            run: DEFAULT_RUN_DIR.into(),
            persist: DEFAULT_PERSIST_DIR.into(),
        }
    }

    pub fn under(root: &Path) -> Self {
        Self {
            run: root.join("run"),
            persist: root.join("persist"),
        }
    }

    pub fn bus(&self) -> Bus {
        Bus::new("cli", &self.run, &self.persist)
    }
}

/// The demo device's root, relative to where `cairn up` runs.
pub const DEMO_ROOT: &str = "cairn-demo";

#[derive(Debug, Clone, Serialize)]
pub struct AgentHealth {
    pub agent: String,
    /// `up`, `up (no supervisor: orphan pid N; …)` (its `cairn up` died without stopping it),
    /// `down` (no publisher on its socket) or `refused: <why>`.
    pub state: String,
}

/// One snapshot as the technician sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub app: String,
    pub app_name: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// requested, being taken (a directory with no record yet), available, pending deletion,
    /// failed, corrupt.
    pub state: String,
    pub config_version: String,
    pub time_triggered: Option<String>,
    pub time_created: Option<String>,
    /// How it is taken: stopped, live, stateful.
    pub mode: String,
    /// How long a live or stateful snapshot paused the VM, in milliseconds (0: not paused).
    pub pause_ms: u64,
    pub error: String,
    /// The snapshot's name (scheduled snapshots: from their policy's pattern); may be empty.
    #[serde(default)]
    pub name: String,
    /// When it expires (created + its expiry), if it has one.
    #[serde(default)]
    pub expires: Option<String>,
    /// What the state waits for, e.g. a pending deletion waits for the app to stop.
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub run_dir: String,
    pub persist_dir: String,
    /// Why `<persist>` takes no record now (read-only, full), when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist_fault: Option<String>,
    pub agents: Vec<AgentHealth>,
    pub device: Option<DeviceStatus>,
    #[serde(serialize_with = "named::apps")]
    pub apps: Vec<AppInstanceStatus>,
    pub domains: Vec<DomainStatus>,
    pub volumes: Vec<VolumeStatus>,
    #[serde(serialize_with = "named::content_trees")]
    pub content_trees: Vec<ContentTreeStatus>,
    /// The log queue and its uploads.
    pub logs: Option<LogManagerStatus>,
    /// Export and verify jobs the volume-manager runs or ran since it started, with progress.
    #[serde(default)]
    pub exports: Vec<ExportStatus>,
    /// The root slots and the last update (the baseos-manager).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseos: Option<cairn_types::BaseOsStatus>,
    /// The errors above, each with its time and what to do (`problems::problems`).
    #[serde(default)]
    pub problems: Vec<crate::problems::Problem>,
}

enum Read<T> {
    Values(Vec<T>),
    Down,
    Refused(String),
}

/// The whole table of `publisher`'s topic `T`, or why it could not be read within `wait`.
async fn read<T: Topic>(roots: &Roots, publisher: &str, wait: Duration) -> Read<T> {
    let socket = socket_path(&roots.run, publisher, T::NAME);
    if !socket.exists() {
        return Read::Down;
    }
    if let Some(reason) = socket_refusal(&socket) {
        return Read::Refused(reason);
    }
    let mut sub = roots.bus().subscribe::<T>(publisher);
    let outcome = tokio::time::timeout(wait, async {
        loop {
            match sub.recv().await {
                Event::Synchronized => return None,
                Event::Refused { reason } => return Some(reason),
                _ => {}
            }
        }
    })
    .await;
    match outcome {
        Ok(None) => Read::Values(sub.values().cloned().collect()),
        Ok(Some(reason)) => Read::Refused(reason),
        Err(_) => Read::Down,
    }
}

/// Why this user cannot connect to `socket`, if the file's mode or group shuts them out
/// (connecting to a Unix socket needs write permission on it). The subscription itself would
/// only retry silently; the technician needs the reason.
pub fn socket_refusal(socket: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    match nix::unistd::access(socket, nix::unistd::AccessFlags::W_OK) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => None,
        Err(errno) => {
            let uid = nix::unistd::getuid();
            Some(match std::fs::metadata(socket) {
                Ok(m) if m.gid() != 0 => format!(
                    "uid {uid} may not connect to {} (group {}, mode {:o}): ask for membership \
                     of group {} (the technicians' group), or run as root",
                    socket.display(),
                    m.gid(),
                    m.mode() & 0o777,
                    m.gid()
                ),
                Ok(m) => format!(
                    "uid {uid} may not connect to {} (mode {:o}, no technicians' group): this \
                     topic is for agents and root only; technicians read the status topics when \
                     the device runs with `cairn up --technicians-gid GID`",
                    socket.display(),
                    m.mode() & 0o777
                ),
                Err(_) => format!(
                    "uid {uid} may not connect to {}: {}",
                    socket.display(),
                    errno.desc()
                ),
            })
        }
    }
}

/// The app-manager's statuses alone, or `None` when it does not answer (down, refused, too
/// slow): every column of `cairn snapshots` but the records' own verdicts comes from this one
/// topic, and the other eight are thousands of values at scale that it would read for nothing.
pub async fn app_statuses(roots: &Roots, wait: Duration) -> Option<Vec<AppInstanceStatus>> {
    match read::<AppInstanceStatus>(roots, "app-manager", wait).await {
        Read::Values(apps) => Some(apps),
        Read::Down | Read::Refused(_) => None,
    }
}

/// Reads every agent's status topics.
pub async fn device_view(roots: &Roots, wait: Duration) -> DeviceView {
    let (device, apps, domains, volumes, content_trees, log_manager, exports, baseos, edgeview) = tokio::join!(
        read::<DeviceStatus>(roots, "config-agent", wait),
        read::<AppInstanceStatus>(roots, "app-manager", wait),
        read::<DomainStatus>(roots, "domain-manager", wait),
        read::<VolumeStatus>(roots, "volume-manager", wait),
        read::<ContentTreeStatus>(roots, "downloader", wait),
        read::<LogManagerStatus>(roots, "log-manager", wait),
        read::<ExportStatus>(roots, "volume-manager", wait),
        read::<cairn_types::BaseOsStatus>(roots, "baseos-manager", wait),
        read::<cairn_types::EdgeviewStatus>(roots, "edgeview", wait),
    );
    let mut agents = Vec::new();
    let mut health = |agent: &str, state: String| {
        agents.push(AgentHealth {
            agent: agent.to_string(),
            state,
        })
    };
    // An agent that answers while the `cairn up` that started it is gone is an orphan: nobody
    // restarts it, and a new `cairn up` will stop it. It is never called plainly `up`.
    let supervisor = crate::supervision::supervisor(&roots.run);
    let state = |read_state: String, agent: &str, topic: &str| -> String {
        match supervisor {
            Supervisor::Gone(up) if read_state == "up" => {
                let pid = crate::supervision::topic_holder(&roots.run, agent, topic)
                    .map(|pid| format!(" pid {pid}"))
                    .unwrap_or_default();
                format!("up (no supervisor: orphan{pid}; its cairn up pid {up} is gone)")
            }
            _ => read_state,
        }
    };
    fn read_state<T>(read: &Read<T>) -> String {
        match read {
            Read::Values(_) => "up".into(),
            Read::Down => "down".into(),
            Read::Refused(reason) => format!("refused: {reason}"),
        }
    }
    health(
        "config-agent",
        state(read_state(&device), "config-agent", DeviceStatus::NAME),
    );
    health(
        "app-manager",
        state(read_state(&apps), "app-manager", AppInstanceStatus::NAME),
    );
    health(
        "volume-manager",
        state(read_state(&volumes), "volume-manager", VolumeStatus::NAME),
    );
    health(
        "domain-manager",
        state(read_state(&domains), "domain-manager", DomainStatus::NAME),
    );
    health(
        "downloader",
        state(
            read_state(&content_trees),
            "downloader",
            ContentTreeStatus::NAME,
        ),
    );
    health(
        "log-manager",
        state(
            read_state(&log_manager),
            "log-manager",
            LogManagerStatus::NAME,
        ),
    );
    health(
        "baseos-manager",
        state(
            read_state(&baseos),
            "baseos-manager",
            <cairn_types::BaseOsStatus as cairn_types::Topic>::NAME,
        ),
    );
    health(
        "edgeview",
        state(
            read_state(&edgeview),
            "edgeview",
            <cairn_types::EdgeviewStatus as cairn_types::Topic>::NAME,
        ),
    );
    fn values<T>(read: Read<T>) -> Vec<T> {
        match read {
            Read::Values(values) => values,
            _ => Vec::new(),
        }
    }
    let persist = roots.persist.clone();
    let persist_fault = tokio::task::spawn_blocking(move || persist_fault(&persist))
        .await
        .unwrap_or_default();
    let mut view = DeviceView {
        run_dir: roots.run.display().to_string(),
        persist_dir: roots.persist.display().to_string(),
        persist_fault,
        agents,
        device: values(device).into_iter().next(),
        apps: values(apps),
        domains: values(domains),
        volumes: values(volumes),
        content_trees: values(content_trees),
        logs: values(log_manager).into_iter().next(),
        exports: values(exports),
        baseos: values(baseos).into_iter().next(),
        problems: Vec::new(),
    };
    view.problems = crate::problems::problems(&view, chrono::Utc::now());
    view
}

/// The volumes `app` uses, in its config's order (those the volume-manager reports).
pub fn app_volumes<'a>(view: &'a DeviceView, app: &AppInstanceStatus) -> Vec<&'a VolumeStatus> {
    app.volume_refs
        .iter()
        .filter_map(|r| {
            let key = cairn_types::volume::volume_key_local(
                r.volume_id,
                r.generation_counter,
                r.local_generation_counter,
            );
            view.volumes.iter().find(|v| v.key() == key)
        })
        .collect()
}

/// Less free space than this and a record write may fail: the persist file system is full.
const PERSIST_FULL_BELOW: u64 = 1 << 20;

/// Why `persist` cannot take a record now, as its mount says (`statvfs`): read-only, or less
/// than 1 MiB free. The agents then do nothing they cannot record (the app-manager names each
/// app it holds). Blocking.
pub fn persist_fault(persist: &Path) -> Option<String> {
    let stat = nix::sys::statvfs::statvfs(persist).ok()?;
    let hold = "the agents take no action they cannot record until it can";
    if stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Some(format!("read-only: {hold}; remount it read-write"));
    }
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    (free < PERSIST_FULL_BELOW)
        .then(|| format!("full ({free} bytes free): {hold}; free space on it"))
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<String> {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Why it was taken: EVE's type, or `Scheduled` for the device's own policy.
fn kind(desc: &cairn_types::SnapshotDesc) -> String {
    if desc.scheduled {
        "Scheduled".into()
    } else {
        format!("{:?}", desc.snapshot_type)
    }
}

fn mode(mode: cairn_types::SnapshotMode) -> String {
    format!("{mode:?}").to_lowercase()
}

fn row(app: &AppInstanceStatus, s: &SnapshotInstanceStatus, state: &str) -> SnapshotRow {
    SnapshotRow {
        app: app.uuid_and_version.uuid.to_string(),
        app_name: app.display_name.clone(),
        id: s.snapshot.snapshot_id.to_string(),
        kind: kind(&s.snapshot),
        state: state.to_string(),
        config_version: s.config_version.version.clone(),
        time_triggered: time(s.time_triggered),
        time_created: time(s.time_created),
        mode: mode(s.snapshot.mode),
        pause_ms: s.pause_ms,
        error: s.error.error.clone(),
        name: s.snapshot.name.clone(),
        expires: (s.snapshot.expiry_seconds > 0)
            .then(|| {
                s.time_created.map(|t| {
                    t + chrono::Duration::seconds(
                        i64::try_from(s.snapshot.expiry_seconds).unwrap_or(i64::MAX / 1000),
                    )
                })
            })
            .and_then(time),
        note: String::new(),
    }
}

/// What a snapshot directory on disk holds, when not a record that loads.
pub enum OnDisk {
    /// The record exists and does not load: the reason, naming the file and the fault.
    Corrupt(String),
    /// No record yet: the snapshot is being taken (the volume-manager writes its files first,
    /// the app-manager the record last), or its create was interrupted.
    NoRecord(PathBuf),
}

/// Snapshot directories whose record is missing or does not load, by snapshot id. Blocking:
/// every record is read, on every core (10,000 snapshots are 10,000 records), and checked by
/// its envelope and checksum; only one that fails that is decoded.
/// Independent of the bus: a caller may run it while it reads the topics ([`rows_from`]).
pub fn unloadable_records(persist: &Path) -> std::collections::BTreeMap<String, OnDisk> {
    let dirs: Vec<_> = snapshot_dirs(persist).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let per_thread = dirs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = dirs
            .chunks(per_thread)
            .map(|part| scope.spawn(move || unloadable_in(part.iter().cloned())))
            .collect();
        parts
            .into_iter()
            // A panic is a bug in the check: it reaches the caller as before.
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// [`unloadable_records`] on the calling thread alone, for a process that lives for months:
/// each thread that allocates keeps a malloc arena for the life of the process (glibc), so a
/// server checks on one thread of its own rather than start one per core on every reading,
/// and one directory at a time, never holding the list of them.
pub fn unloadable_records_serial(persist: &Path) -> std::collections::BTreeMap<String, OnDisk> {
    unloadable_in(snapshot_dirs(persist)).into_iter().collect()
}

/// The snapshot directories under `<persist>/snapshots/`, by name (the snapshot's id).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn snapshot_dirs(persist: &Path) -> impl Iterator<Item = (String, PathBuf)> {
    std::fs::read_dir(snapshots_dir(persist))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            )
        })
        .filter(|(_, dir)| dir.is_dir())
}

/// Those of `dirs` (named by snapshot id) whose record is missing or does not load. Blocking.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn unloadable_in(dirs: impl Iterator<Item = (String, PathBuf)>) -> Vec<(String, OnDisk)> {
    let mut found = Vec::new();
    for (name, dir) in dirs {
        let file = dir.join(SNAPSHOT_INSTANCE_STATUS_FILE);
        // The app-manager's records as it writes them are known sound from their envelope and
        // checksum alone; anything else is loaded whole, for the verdict and its reason.
        if std::fs::read(&file)
            .is_ok_and(|bytes| cairn_persist::is_sound_current::<SnapshotInstanceStatus>(&bytes))
        {
            continue;
        }
        let state = match cairn_persist::load::<SnapshotInstanceStatus>(&file) {
            Ok(_) => continue,
            Err(e) if matches!(e.kind, cairn_persist::ErrorKind::NotFound) => OnDisk::NoRecord(dir),
            Err(e) => OnDisk::Corrupt(e.to_string()),
        };
        found.push((name, state));
    }
    found
}

/// Every snapshot the app-manager reports, and every record on disk that does not load; one
/// row per snapshot: a reported snapshot whose record is corrupt is shown `corrupt`, not also
/// `available`.
pub fn snapshot_rows(
    apps: &[AppInstanceStatus],
    persist: &Path,
    app_filter: Option<&str>,
) -> Vec<SnapshotRow> {
    rows_from(apps, unloadable_records(persist), app_filter)
}

/// [`snapshot_rows`] with the records' check already made ([`unloadable_records`]).
pub fn rows_from(
    apps: &[AppInstanceStatus],
    mut on_disk: std::collections::BTreeMap<String, OnDisk>,
    app_filter: Option<&str>,
) -> Vec<SnapshotRow> {
    let wanted = |app: &AppInstanceStatus| {
        app_filter
            .is_none_or(|f| app.uuid_and_version.uuid.to_string() == f || app.display_name == f)
    };
    let mut rows = Vec::new();
    for app in apps {
        let snap = &app.snap_status;
        let listed = !wanted(app);
        for s in &snap.available_snapshots {
            let id = s.snapshot.snapshot_id.to_string();
            let row_state = match on_disk.remove(&id) {
                Some(OnDisk::Corrupt(problem)) => {
                    let mut corrupt = row(app, s, "corrupt");
                    corrupt.error = problem;
                    if !listed {
                        rows.push(corrupt);
                    }
                    continue;
                }
                // Its record is being written: the app-manager reports it available first.
                Some(OnDisk::NoRecord(_)) | None => "available",
            };
            if !listed {
                rows.push(row(app, s, row_state));
            }
        }
        for s in &snap.requested_snapshots {
            // Its directory without a record is this snapshot being taken, shown by this row.
            if matches!(
                on_disk.get(&s.snapshot.snapshot_id.to_string()),
                Some(OnDisk::NoRecord(_))
            ) {
                on_disk.remove(&s.snapshot.snapshot_id.to_string());
            }
            if listed {
                continue;
            }
            rows.push(row(
                app,
                s,
                if s.error.is_error() {
                    "failed"
                } else {
                    "requested"
                },
            ));
        }
        for desc in &snap.snapshots_to_be_deleted {
            // Being removed: a missing record is the removal under way.
            if matches!(
                on_disk.get(&desc.snapshot_id.to_string()),
                Some(OnDisk::NoRecord(_))
            ) {
                on_disk.remove(&desc.snapshot_id.to_string());
            }
            if listed {
                continue;
            }
            rows.push(SnapshotRow {
                app: app.uuid_and_version.uuid.to_string(),
                app_name: app.display_name.clone(),
                id: desc.snapshot_id.to_string(),
                kind: kind(desc),
                state: "pending deletion".into(),
                config_version: String::new(),
                time_triggered: None,
                time_created: None,
                mode: mode(desc.mode),
                pause_ms: 0,
                // A failed deletion's reason is among the app's warnings, naming the snapshot.
                error: app
                    .warnings
                    .iter()
                    .find(|w| w.contains(&desc.snapshot_id.to_string()))
                    .cloned()
                    .unwrap_or_default(),
                name: desc.name.clone(),
                expires: None,
                note: "waits for the app to stop: deleted at its next deactivation (a restart of \
                       the app deletes it now)"
                    .into(),
            });
        }
    }
    // Records nobody can use are shown, never hidden.
    for (id, state) in on_disk {
        let (state, error) = match state {
            OnDisk::Corrupt(problem) => ("corrupt", problem),
            OnDisk::NoRecord(dir) => (
                "being taken",
                format!(
                    "{} has no {SNAPSHOT_INSTANCE_STATUS_FILE} yet: the snapshot is being taken, \
                     or its create was interrupted",
                    dir.display()
                ),
            ),
        };
        rows.push(SnapshotRow {
            app: String::new(),
            app_name: String::new(),
            id,
            kind: String::new(),
            state: state.into(),
            config_version: String::new(),
            time_triggered: None,
            time_created: None,
            mode: String::new(),
            pause_ms: 0,
            error,
            name: String::new(),
            expires: None,
            note: String::new(),
        });
    }
    rows
}

/// Publications present under the run root: `(agent, topic, socket)`. Blocking (a walk).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn topics(roots: &Roots) -> Vec<(String, String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(agents) = std::fs::read_dir(&roots.run) else {
        return found;
    };
    for agent in agents.flatten() {
        let Ok(files) = std::fs::read_dir(agent.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "sock")
                && let Some(topic) = path.file_stem().and_then(|s| s.to_str())
            {
                found.push((
                    agent.file_name().to_string_lossy().into_owned(),
                    topic.to_string(),
                    path.clone(),
                ));
            }
        }
    }
    found.sort();
    found
}

/// Where the config in force came from, in words (not its Rust form).
pub fn config_source_text(source: &cairn_types::device::ConfigSource) -> String {
    use cairn_types::device::ConfigSource;
    match source {
        ConfigSource::None => "none yet".into(),
        ConfigSource::LocalFile { path } => format!("local file {path}"),
        ConfigSource::Controller { url } => format!("controller {url}"),
        ConfigSource::Checkpoint => {
            "the last controller config (checkpoint: the controller is unreachable)".into()
        }
    }
}

/// The read-outs' JSON of EVE's records: each value's [`Topic::readout_json`] (EVE's numbered
/// states by name, `"State": "RUNNING"` not `115`, and `null` for a time never set, not Go's
/// zero time). The page, the JSON API, `cairn --json` and the D-Bus gateway all print it.
pub mod named {
    use cairn_types::{AppInstanceStatus, ContentTreeStatus, Topic};
    use serde::{Serialize, Serializer};

    fn list<T: Topic, S: Serializer>(values: &[T], s: S) -> Result<S::Ok, S::Error> {
        let named: Result<Vec<serde_json::Value>, _> =
            values.iter().map(Topic::readout_json).collect();
        named.map_err(serde::ser::Error::custom)?.serialize(s)
    }

    /// `serialize_with` for a `Vec<AppInstanceStatus>`.
    pub fn apps<S: Serializer>(apps: &[AppInstanceStatus], s: S) -> Result<S::Ok, S::Error> {
        list(apps, s)
    }

    /// `serialize_with` for a `Vec<ContentTreeStatus>`.
    pub fn content_trees<S: Serializer>(
        trees: &[ContentTreeStatus],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        list(trees, s)
    }

    /// A list of apps that serializes as [`apps`] does (for `cairn apps --json`).
    pub struct Apps<'a>(pub &'a [AppInstanceStatus]);

    impl Serialize for Apps<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            apps(self.0, s)
        }
    }
}

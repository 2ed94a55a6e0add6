//! A device on a temporary root for end-to-end tests: the real agent binaries as processes
//! (built by `cargo test --workspace` / `cargo nextest run --workspace` into the same target
//! directory as the test), a local config file for the config-agent, and read-outs over the bus.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Topic};
use cairn_types::{AppInstanceStatus, VolumeStatus, layout};
use uuid::Uuid;

pub mod runs;

pub const AGENTS: [&str; 5] = [
    "config-agent",
    "downloader",
    "volume-manager",
    "domain-manager",
    "app-manager",
];

pub struct Device {
    pub root: tempfile::TempDir,
    bin_dir: PathBuf,
    agents: BTreeMap<String, Child>,
    /// The config-agent's source flags: empty for the local file, else a controller's.
    controller_args: Vec<String>,
    /// Extra environment for one agent (e.g. an injected clock for the app-manager).
    agent_env: BTreeMap<String, Vec<(String, String)>>,
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

impl Device {
    pub fn new() -> Self {
        // The test binary is target/<profile>/deps/<test>; the agents are in target/<profile>.
        let exe = std::env::current_exe().unwrap();
        let bin_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        for agent in AGENTS {
            let binary = bin_dir.join(format!("cairn-{agent}"));
            assert!(
                binary.is_file(),
                "{} is missing: run the tests for the whole workspace (cargo nextest run --workspace)",
                binary.display()
            );
        }
        Self {
            root: tempfile::tempdir().unwrap(),
            bin_dir,
            agents: BTreeMap::new(),
            controller_args: Vec::new(),
            agent_env: BTreeMap::new(),
        }
    }

    /// From its next start on, `agent` runs with `key=value` in its environment.
    pub fn set_agent_env(&mut self, agent: &str, key: &str, value: &str) {
        self.agent_env
            .entry(agent.to_string())
            .or_default()
            .push((key.to_string(), value.to_string()));
    }

    /// From now on the config-agent follows a controller: `args` are its flags (e.g. from
    /// `cairn_test_controller::TestController::device_args`, plus timing flags).
    pub fn follow_controller(&mut self, args: Vec<String>) {
        self.controller_args = args;
    }

    /// The pid of `agent` while this device runs it.
    pub fn agent_pid(&self, agent: &str) -> Option<u32> {
        self.agents.get(agent).map(Child::id)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.path().join("run")
    }

    pub fn persist_dir(&self) -> PathBuf {
        self.root.path().join("persist")
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.path().join("config.json")
    }

    /// Replaces the local config atomically (the agent polls it).
    pub fn write_config(&self, json: &str) {
        let tmp = self.root.path().join(".config.json.tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, self.config_file()).unwrap();
    }

    /// Starts `agent`, optionally set to die at a named crash point.
    pub fn start(&mut self, agent: &str, crash_at: Option<&str>) {
        let mut command = Command::new(self.bin_dir.join(format!("cairn-{agent}")));
        command
            .env("CAIRN_RUN_DIR", self.run_dir())
            .env("CAIRN_PERSIST_DIR", self.persist_dir())
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stderr(self.log_file(agent));
        if agent == "config-agent" && self.controller_args.is_empty() {
            command.args([
                "--config",
                self.config_file().to_str().unwrap(),
                "--poll-ms",
                "50",
            ]);
        } else if agent == "config-agent" {
            command.args(&self.controller_args);
        }
        if let Some(point) = crash_at {
            command.env("CAIRN_CRASH_AT", point);
        }
        for (key, value) in self.agent_env.get(agent).into_iter().flatten() {
            command.env(key, value);
        }
        // The old one goes first: a new one started beside it finds its topics held and exits.
        if let Some(mut old) = self.agents.remove(agent) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let child = command.spawn().unwrap();
        self.agents.insert(agent.to_string(), child);
    }

    pub fn start_all(&mut self) {
        for agent in AGENTS {
            self.start(agent, None);
        }
    }

    pub fn kill(&mut self, agent: &str) {
        if let Some(mut child) = self.agents.remove(agent) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether `agent` has died (by its own SIGKILL at a crash point), without waiting.
    pub fn has_died(&mut self, agent: &str) -> bool {
        let Some(child) = self.agents.get_mut(agent) else {
            return false;
        };
        match child.try_wait().unwrap() {
            Some(status) => {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "{agent} ended otherwise: {status:?}"
                );
                self.agents.remove(agent);
                true
            }
            None => false,
        }
    }

    /// A subscription to the app-manager's status, for polling loops.
    pub fn app_statuses(&self) -> cairn_pubsub::Subscription<AppInstanceStatus> {
        self.bus().subscribe("app-manager")
    }

    /// Whether `agent` died (by its own SIGKILL at a crash point) within `within`.
    pub fn died_within(&mut self, agent: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let child = self.agents.get_mut(agent).unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "{agent} ended otherwise: {status:?}"
                );
                self.agents.remove(agent);
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn bus(&self) -> Bus {
        Bus::new("e2e", self.run_dir(), self.persist_dir())
    }

    /// The first value of `publisher`'s topic `T` (any key) that satisfies `done`.
    pub async fn wait_for<T: Topic>(
        &self,
        publisher: &str,
        within: Duration,
        done: impl Fn(&T) -> bool,
    ) -> Result<T, String> {
        let mut sub = self.bus().subscribe::<T>(publisher);
        let mut last = None;
        let found = tokio::time::timeout(within, async {
            loop {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                    sub.recv().await
                {
                    if done(&value) {
                        return value;
                    }
                    last = Some(value);
                }
            }
        })
        .await;
        found.map_err(|_| format!("not within {within:?}; last seen: {last:#?}"))
    }

    pub async fn app_status(
        &self,
        within: Duration,
        done: impl Fn(&AppInstanceStatus) -> bool,
    ) -> Result<AppInstanceStatus, String> {
        self.wait_for("app-manager", within, done).await
    }

    pub async fn volume(&self, within: Duration) -> VolumeStatus {
        self.wait_for::<VolumeStatus>("volume-manager", within, |v| {
            v.state == cairn_types::VolumeState::Ready
        })
        .await
        .unwrap()
    }

    /// The snapshot directories under `<persist>/snapshots`.
    pub fn snapshot_dirs(&self) -> BTreeSet<Uuid> {
        let Ok(entries) = std::fs::read_dir(layout::snapshots_dir(&self.persist_dir())) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }
}

/// The test guest built by `images/test-guest/build` (scripts/install-deps builds it).
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("CAIRN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/cairn/test-guest")
        });
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initramfs.cpio.gz").is_file(),
        "the test guest is not built in {}: run images/test-guest/build",
        dir.display()
    );
    dir
}

/// The internal snapshots of a qcow2 file, by name (`qemu-img snapshot -l`, shared lock).
/// The counter the test guest (`cairn.workload=counter`) keeps in sector 0 of `file`, or of
/// its internal snapshot `snapshot` (read with a shared lock while the VM may hold the image).
pub fn sector_counter(file: &Path, snapshot: Option<&str>) -> u64 {
    sector_counter_at(file, snapshot, 0)
}

/// Where the test guest's bootable `disk.qcow2` keeps its counter: partition 2 (`/dev/vda2`),
/// which starts at sector 67584 (images/test-guest/build).
pub const BOOT_DISK_COUNTER_OFFSET: usize = 67584 * 512;

/// The counter in the sector at byte `offset` of `file` (or of its internal snapshot).
pub fn sector_counter_at(file: &Path, snapshot: Option<&str>, offset: usize) -> u64 {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]);
    if let Some(name) = snapshot {
        command.args(["-l", &format!("snapshot.name={name}")]);
    }
    let status = command.arg(file).arg(out.path()).output().unwrap();
    assert!(
        status.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let bytes = std::fs::read(out.path()).unwrap();
    let text: String = bytes[offset..offset + 512]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| *b as char)
        .collect();
    text.parse().unwrap_or(0)
}

/// The `CAIRN-COUNTER N` values the test guest printed since its console log was (re)opened.
pub fn console_counters(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CAIRN-COUNTER ")?.trim().parse().ok())
        .collect()
}

pub fn qcow2_snapshots(file: &Path) -> BTreeSet<String> {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(file)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img snapshot -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2) // "Snapshot list:" and the header
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

impl Device {
    /// Where `agent`'s stderr goes: `<root>/agent-logs/<agent>.log`, appended to by each of
    /// its starts.
    pub fn agent_log(&self, agent: &str) -> PathBuf {
        self.root
            .path()
            .join("agent-logs")
            .join(format!("{agent}.log"))
    }

    fn log_file(&self, agent: &str) -> Stdio {
        let path = self.agent_log(agent);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        Stdio::from(file)
    }

    /// The last `lines` lines of every agent's log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for agent in AGENTS {
            let text = std::fs::read_to_string(self.agent_log(agent)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!("--- {agent} (last {} lines) ---\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // A failing test shows what the agents did.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(60));
        }
        for (_, mut child) in std::mem::take(&mut self.agents) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The domain-manager leaves domains running for re-adoption; this device's apps carry
        // its root in their command line, so they can be found and stopped.
        let marker = self.root.path().to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker)
                    && pid != std::process::id() as i32
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }
}

impl Device {
    /// A power cut and a boot: every agent and every app process of this device SIGKILLed, the
    /// run root wiped (it is a tmpfs on a device), `/persist` kept; then the agents start again.
    pub fn power_cycle(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.agents) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_apps();
        let _ = std::fs::remove_dir_all(self.run_dir());
        self.start_all();
    }

    /// SIGKILLs this device's app processes (their command lines carry its root).
    pub fn kill_apps(&self) {
        let marker = self.root.path().to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        let agents: BTreeSet<u32> = self.agents.values().map(Child::id).collect();
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker)
                && pid != std::process::id()
                && !agents.contains(&pid)
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }

    /// The directory of a `dir` volume at a generation.
    pub fn dir_volume(&self, volume: Uuid, generation: i64) -> PathBuf {
        layout::volumes_dir(&self.persist_dir()).join(cairn_types::volume_key(volume, generation))
    }
}

impl Device {
    /// The directory of a `dir` volume at a controller generation and a local generation (a
    /// bare purge's fresh volume, `<uuid>#<gen>.<local>`).
    pub fn dir_volume_local(&self, volume: Uuid, generation: i64, local: i64) -> PathBuf {
        layout::volumes_dir(&self.persist_dir()).join(cairn_types::volume::volume_key_local(
            volume, generation, local,
        ))
    }

    /// Waits until `cond` holds, polling; panics with `what` after `within`.
    pub async fn until(&self, within: Duration, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Device {
    /// The snapshots the copy or btrfs backend keeps of a `dir` volume at a generation
    /// (`<persist>/volumes/.snapshots/<key>/<snapshot id>`).
    pub fn dir_volume_snapshots(&self, volume: Uuid, generation: i64) -> BTreeSet<Uuid> {
        let dir = layout::volumes_dir(&self.persist_dir())
            .join(".snapshots")
            .join(cairn_types::volume_key(volume, generation));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }
}

/// The processes `cairn up` started for the device under `root`: their environment names its
/// run root.
pub fn processes_of(root: &Path) -> Vec<i32> {
    let marker = format!("CAIRN_RUN_DIR={}", root.join("run").display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|kv| kv == marker.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// The `cairn` binary beside the test's agents.
pub fn cairn_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().join("cairn")
}

/// A btrfs filesystem on a loop device of its own, mounted at a device's volumes directory so
/// that its directory volumes get the btrfs backend; unmounted and detached on drop.
pub struct LoopBtrfs {
    mount: PathBuf,
    loop_device: String,
}

impl LoopBtrfs {
    /// Mounts a fresh `size_mib` btrfs at `<persist>/volumes` of `device` (before its start).
    pub fn at_volumes(device: &Device, size_mib: u64) -> Self {
        let mount = layout::volumes_dir(&device.persist_dir());
        std::fs::create_dir_all(&mount).unwrap();
        let image = device.root.path().join("volumes-btrfs.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size_mib << 20).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let loop_device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let guard = Self {
            mount: mount.clone(),
            loop_device: loop_device.clone(),
        };
        for (tool, args) in [
            ("mkfs.btrfs", vec!["-q", loop_device.as_str()]),
            ("mount", vec![loop_device.as_str(), mount.to_str().unwrap()]),
        ] {
            let status = Command::new(tool).args(&args).status().unwrap();
            assert!(status.success(), "{tool} {args:?}: {status}");
        }
        guard
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        // Lazily: an agent still running may hold a directory in it.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}

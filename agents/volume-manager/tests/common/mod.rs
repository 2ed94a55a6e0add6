//! Test fixtures: temporary roots, loop-mounted filesystems, qemu-img helpers, and a bus harness
//! that plays the config-agent and the app-manager against the real binary.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Publication, PublishOptions, Subscription};
use cairn_types::snapshot::{VolumesSnapshotAction, VolumesSnapshotConfig, VolumesSnapshotStatus};
use cairn_types::volume::{AppVolumeRefs, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeStatus};
use uuid::Uuid;

pub mod exports;

pub const MIB: u64 = 1 << 20;

/// Runs a command that must succeed; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is required by this test and could not run: {e} (CI installs it)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The snapshot tags in a qcow2 file.
pub fn qcow2_tags(file: &Path) -> Vec<String> {
    cairn_volume_manager::backend::qcow2::parse_list(&sh(
        "qemu-img",
        &[
            "snapshot",
            "-l",
            "-U",
            "-f",
            "qcow2",
            file.to_str().unwrap(),
        ],
    ))
}

/// Writes `len` bytes of `pattern` at offset 0 through qemu-io.
pub fn qcow2_write(file: &Path, pattern: u8, len: u64) {
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} 0 {len}"),
            file.to_str().unwrap(),
        ],
    );
}

/// Whether the first `len` bytes read back as `pattern`.
pub fn qcow2_reads(file: &Path, pattern: u8, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pattern} 0 {len}"),
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

pub fn volume(format: VolumeFormat, size: u64) -> VolumeConfig {
    VolumeConfig {
        volume_id: Uuid::new_v4(),
        display_name: "test".into(),
        max_vol_size: size,
        format,
        origin: VolumeOrigin::Blank,
        ..VolumeConfig::default()
    }
}

pub fn request(
    id: Uuid,
    action: VolumesSnapshotAction,
    volumes: &[&VolumeConfig],
    counter: u64,
) -> VolumesSnapshotConfig {
    VolumesSnapshotConfig {
        snapshot_id: id,
        action,
        volume_ids: volumes.iter().map(|v| v.volume_id).collect(),
        app_uuid: Uuid::from_u128(0xa99),
        request_counter: counter,
        ..VolumesSnapshotConfig::default()
    }
}

/// A filesystem on a loop device of our own, mounted at `mount`; unmounted and detached on drop.
pub struct LoopFs {
    pub mount: PathBuf,
    device: String,
    image: PathBuf,
}

impl LoopFs {
    pub fn new(kind: &str, mount: &Path, size_mib: u64) -> Self {
        std::fs::create_dir_all(mount).unwrap();
        let image = mount.with_extension("img");
        sh(
            "truncate",
            &["-s", &format!("{size_mib}M"), image.to_str().unwrap()],
        );
        let device = sh("losetup", &["-f", "--show", image.to_str().unwrap()])
            .trim()
            .to_string();
        let guard = Self {
            mount: mount.to_path_buf(),
            device: device.clone(),
            image,
        };
        match kind {
            "btrfs" => sh("mkfs.btrfs", &["-q", &device]),
            other => sh(&format!("mkfs.{other}"), &["-q", &device]),
        };
        sh("mount", &[&device, mount.to_str().unwrap()]);
        guard
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A cgroup v1 freezer cgroup of our own with a shell in it appending to `<dir>/log` (a
/// container as the volume-manager sees it); on drop it is thawed, its writer killed, the
/// cgroup removed.
pub struct FreezerCgroup {
    /// As a live create names it (`/<name>`).
    pub name: String,
    dir: PathBuf,
    writer: std::process::Child,
}

impl FreezerCgroup {
    pub fn with_writer(dir: &Path) -> Self {
        let freezer = Path::new("/sys/fs/cgroup/freezer");
        assert!(
            freezer.join("cgroup.procs").exists(),
            "a cgroup v1 freezer hierarchy is required (scripts/install-deps)"
        );
        let name = format!("cairn-test-{}", Uuid::new_v4().simple());
        let cgroup = freezer.join(&name);
        std::fs::create_dir(&cgroup).unwrap();
        let writer = Command::new("/bin/sh")
            .args(["-c", "while :; do echo line >> log; done"])
            .current_dir(dir)
            .spawn()
            .unwrap();
        let this = Self {
            name: format!("/{name}"),
            dir: cgroup,
            writer,
        };
        std::fs::write(this.dir.join("cgroup.procs"), this.writer.id().to_string()).unwrap();
        this
    }

    /// `FROZEN`, `FREEZING` or `THAWED`.
    pub fn state(&self) -> String {
        std::fs::read_to_string(self.dir.join("freezer.state"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for FreezerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        let _ = self.writer.kill();
        let _ = self.writer.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A small tmpfs at `mount`, unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn new(mount: &Path, size: &str) -> Self {
        std::fs::create_dir_all(mount).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                mount.to_str().unwrap(),
            ],
        );
        Self(mount.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The real binary as a child, stopped by its pid on drop.
pub struct Agent {
    pub child: std::process::Child,
}

impl Agent {
    pub fn start(persist: &Path, run: &Path, crash_at: Option<&str>) -> Self {
        Self::start_with(persist, run, crash_at, &[])
    }

    /// Started with `env` added to its environment (a test-only tool on PATH, say).
    pub fn start_with(
        persist: &Path,
        run: &Path,
        crash_at: Option<&str>,
        env: &[(&str, std::ffi::OsString)],
    ) -> Self {
        Self::spawn(&[], persist, run, crash_at, env)
    }

    /// Started with the test-only tools of `tools` (a directory of this crate's `tests/`) first
    /// on its PATH, the product calling them by name as always, and `env` added.
    pub fn start_with_tools(
        persist: &Path,
        run: &Path,
        tools: &str,
        env: &[(&str, std::ffi::OsString)],
    ) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join(tools);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(dir).chain(std::env::split_paths(&path));
        let mut all = vec![("PATH", std::env::join_paths(dirs).unwrap())];
        all.extend(env.iter().cloned());
        Self::spawn(&[], persist, run, None, &all)
    }

    /// Started through `launcher` (`fiu-run -x …`), which runs the binary given after it.
    pub fn start_via(launcher: &[&str], persist: &Path, run: &Path) -> Self {
        Self::spawn(launcher, persist, run, None, &[])
    }

    fn spawn(
        launcher: &[&str],
        persist: &Path,
        run: &Path,
        crash_at: Option<&str>,
        env: &[(&str, std::ffi::OsString)],
    ) -> Self {
        let mut cmd = cairn_fiu::command_via(launcher, env!("CARGO_BIN_EXE_cairn-volume-manager"));
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.env("CAIRN_PERSIST_DIR", persist)
            .env("CAIRN_RUN_DIR", run)
            .env_remove("CAIRN_CRASH_AT")
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some(point) = crash_at {
            cmd.env("CAIRN_CRASH_AT", point);
        }
        Self {
            child: cmd.spawn().unwrap(),
        }
    }

    /// Waits for the agent to die at its crash point.
    pub fn wait_killed(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "agent ended by {status}, not SIGKILL"
                );
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the agent did not reach its crash point"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
        }
    }
}

/// Plays the config-agent and the app-manager, and watches the volume-manager's statuses.
pub struct Harness {
    pub persist: PathBuf,
    pub run: PathBuf,
    pub volume_configs: Publication<VolumeConfig>,
    /// The config items in force (the volume deletion grace): none set, i.e. the default.
    pub config_items: Publication<cairn_types::ConfigItemValueMap>,
    pub snapshot_configs: Publication<VolumesSnapshotConfig>,
    /// The app-manager's holds on volumes: none, its table complete.
    pub app_holds: Publication<AppVolumeRefs>,
    pub volume_statuses: Subscription<VolumeStatus>,
    pub snapshot_statuses: Subscription<VolumesSnapshotStatus>,
    /// Last, so dropped last: the publications stop writing their key files (behind) before
    /// their directory goes; the other way round they made it again and left it in /tmp.
    pub root: tempfile::TempDir,
}

pub const WAIT: Duration = Duration::from_secs(30);

impl Harness {
    pub async fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let persist = root.path().join("persist");
        let run = root.path().join("run");
        std::fs::create_dir_all(&persist).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let config_agent = Bus::new("config-agent", &run, &persist);
        let app_manager = Bus::new("app-manager", &run, &persist);
        let watcher = Bus::new("test", &run, &persist);
        let app_holds = app_manager
            .publish(PublishOptions::default())
            .await
            .unwrap();
        app_holds.signal_restarted().await.unwrap();
        let config_items = config_agent
            .publish(PublishOptions::default())
            .await
            .unwrap();
        config_items
            .publish(cairn_types::ConfigItemValueMap::default())
            .await
            .unwrap();
        Self {
            app_holds,
            config_items,
            volume_configs: config_agent
                .publish(PublishOptions::default())
                .await
                .unwrap(),
            snapshot_configs: app_manager
                .publish(PublishOptions::default())
                .await
                .unwrap(),
            volume_statuses: watcher.subscribe("volume-manager"),
            snapshot_statuses: watcher.subscribe("volume-manager"),
            root,
            persist,
            run,
        }
    }

    /// Sets the deletion grace of a volume that leaves the config (0: at once, as EVE).
    pub async fn set_delete_grace(&self, seconds: u64) {
        let mut items = cairn_types::ConfigItemValueMap::default();
        items.items.insert(
            cairn_types::device::VOLUME_DELETE_GRACE_ITEM.into(),
            seconds.to_string(),
        );
        self.config_items.publish(items).await.unwrap();
    }

    pub fn agent(&self, crash_at: Option<&str>) -> Agent {
        Agent::start(&self.persist, &self.run, crash_at)
    }

    /// Waits until the volume status of `key` satisfies `pred`.
    pub async fn volume_where(
        &mut self,
        key: &str,
        pred: impl Fn(&VolumeStatus) -> bool,
    ) -> VolumeStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.volume_statuses.get(key)
                && pred(s)
            {
                return s.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "volume {key}: no matching status; last {:?}",
                self.volume_statuses.get(key)
            );
            let _ = tokio::time::timeout(left, self.volume_statuses.recv()).await;
        }
    }

    pub async fn ready(&mut self, config: &VolumeConfig) -> VolumeStatus {
        self.volume_where(&config.key(), |s| {
            s.state != cairn_types::volume::VolumeState::Creating
        })
        .await
    }

    /// Waits until the snapshot status of `id` answers `counter` with `action`.
    pub async fn answer(
        &mut self,
        id: Uuid,
        action: VolumesSnapshotAction,
        counter: u64,
    ) -> VolumesSnapshotStatus {
        let key = id.to_string();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.snapshot_statuses.get(&key)
                && s.result_of_action == action
                && s.request_counter == counter
                && !s.is_in_progress()
            {
                return s.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "snapshot {id}: no answer to {action:?} #{counter}; last {:?}",
                self.snapshot_statuses.get(&key)
            );
            let _ = tokio::time::timeout(left, self.snapshot_statuses.recv()).await;
        }
    }

    /// The record on disk, if any.
    pub fn record(&self, id: Uuid) -> Option<VolumesSnapshotStatus> {
        let path = cairn_volume_manager::manager::record_path(&self.persist, id);
        path.exists().then(|| {
            cairn_persist::load::<VolumesSnapshotStatus>(&path)
                .unwrap()
                .record
        })
    }

    pub fn volume_file(&self, config: &VolumeConfig) -> PathBuf {
        cairn_volume_manager::volumes::volume_path(
            &cairn_types::layout::volumes_dir(&self.persist),
            config,
        )
    }
}

/// Discards events so the subscription's table stays current (use between steps).
pub async fn drain<T: cairn_types::Topic>(sub: &mut Subscription<T>) {
    while let Ok(_e) = tokio::time::timeout(Duration::from_millis(1), sub.recv()).await {
        let _: &Event<T> = &_e;
    }
}

/// A manager run in-process with EVE's immediate deletion of a volume that leaves the config
/// (grace 0): the tests of deletion rules other than the grace.
pub async fn immediate_deletion(m: &mut cairn_volume_manager::VolumeManager) {
    let mut items = cairn_types::ConfigItemValueMap::default();
    items.items.insert(
        cairn_types::device::VOLUME_DELETE_GRACE_ITEM.into(),
        "0".into(),
    );
    m.handle_config_items(Some(&items)).await;
}

//! A fake app-manager on a private bus, the real domain-manager binary, and the test guest.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, Publication, PublishOptions, Subscription};
use cairn_types::domain::{
    DomainLiveOp, DomainLiveOpConfig, DomainLiveOpState, DomainLiveOpStatus,
};
use cairn_types::{
    DiskConfig, DomainConfig, DomainSpec, DomainStatus, ProcessSpec, UUIDandVersion, VmSpec,
    VolumeFormat,
};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(60);

/// The test guest's directory, built on first use if needed.
pub fn guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("CAIRN_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/cairn/test-guest")
            });
        let built = ["vmlinuz", "initramfs.cpio.gz", "disk.qcow2"];
        if !built.iter().all(|f| dir.join(f).is_file()) {
            let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/test-guest/build");
            let out = Command::new(&build)
                .output()
                .expect("run images/test-guest/build");
            assert!(
                out.status.success(),
                "images/test-guest/build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
        dir
    })
    .clone()
}

/// Orphans (a killed domain-manager's qemu) come to this test process, which reaps them.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Reaps `pid` if it is a zombie child of this process (an adopted orphan); no-op otherwise.
pub fn reap(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

/// Live (non-zombie) qemu processes whose command line mentions `root`.
pub fn qemus_under(root: &Path) -> Vec<u32> {
    let root = root.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).into_owned();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.starts_with("qemu-system") && cmd.contains(&root) && !zombie {
            found.push(pid);
        }
    }
    found
}

/// `(state, ppid, pgid)` of a live process from `/proc/<pid>/stat`; `None` if gone.
fn proc_stat(pid: u32) -> Option<(char, u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Live process groups leaders (not zombies) whose command line mentions `token`: the running
/// copies of a process app whose script names it (the app's own children share its group).
pub fn process_apps_mentioning(token: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&raw).contains(token) {
            continue;
        }
        if let Some((state, _, pgid)) = proc_stat(pid)
            && state != 'Z'
            && pgid == pid
        {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

pub struct Harness {
    pub tmp: tempfile::TempDir,
    pub run: PathBuf,
    pub persist: PathBuf,
    pub configs: Publication<DomainConfig>,
    pub ops: Publication<DomainLiveOpConfig>,
    pub statuses: Subscription<DomainStatus>,
    pub op_statuses: Subscription<DomainLiveOpStatus>,
    manager: Option<Child>,
    starts: u32,
    /// `--stop-timeout` given to the domain-manager, in seconds.
    pub stop_timeout: String,
    /// More arguments for the next domain-manager started.
    pub extra_args: Vec<String>,
    /// A program the next domain-manager is started through (`fiu-run -x …`), which runs the
    /// binary given after it in the same process.
    pub launcher: Vec<String>,
}

impl Harness {
    pub async fn new() -> Self {
        Self::new_crashing_at("").await
    }

    /// A harness whose first domain-manager dies at crash point `point`.
    pub async fn new_crashing_at(point: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let persist = tmp.path().join("persist");
        let bus = Bus::new("app-manager", &run, &persist);
        let configs = bus.publish(PublishOptions::default()).await.unwrap();
        let ops = bus.publish(PublishOptions::default()).await.unwrap();
        let statuses = bus.subscribe("domain-manager");
        let op_statuses = bus.subscribe("domain-manager");
        let mut h = Harness {
            tmp,
            run,
            persist,
            configs,
            ops,
            statuses,
            op_statuses,
            manager: None,
            starts: 0,
            stop_timeout: "20".into(),
            extra_args: Vec::new(),
            launcher: Vec::new(),
        };
        h.start_manager_crashing_at(point);
        h
    }

    pub fn start_manager(&mut self) {
        self.start_manager_crashing_at("");
    }

    /// Starts the domain-manager with `CAIRN_CRASH_AT` set to `point` (empty: none).
    pub fn start_manager_crashing_at(&mut self, point: &str) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.tmp.path().join(format!("manager-{}.log", self.starts)))
                .unwrap();
        let mut command =
            cairn_fiu::command_via(&self.launcher, env!("CARGO_BIN_EXE_cairn-domain-manager"));
        let child = command
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--persist-dir")
            .arg(&self.persist)
            .args(["--stop-timeout", &self.stop_timeout])
            // docs/design.md: KVM does not work on these machines (it opens, then stalls).
            .args(["--accel", "tcg"])
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("CAIRN_CRASH_AT", point)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.manager = Some(child);
    }

    pub fn manager_pid(&self) -> u32 {
        self.manager.as_ref().expect("manager running").id()
    }

    /// Waits for the domain-manager to end by itself (a crash point).
    pub fn wait_manager_exit(&mut self) {
        let deadline = Instant::now() + WAIT;
        let child = self.manager.as_mut().expect("manager running");
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "domain-manager did not crash");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.manager = None;
    }

    /// SIGKILL, as a crash would.
    pub fn kill_manager(&mut self) {
        if let Some(mut child) = self.manager.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn manager_log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.tmp.path().join(format!("manager-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the status of `app` satisfies `pred`; panics with the last status otherwise.
    pub async fn wait_status(
        &mut self,
        app: Uuid,
        what: &str,
        pred: impl Fn(&DomainStatus) -> bool,
    ) -> DomainStatus {
        let key = app.to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(s) = self.statuses.get(&key)
                && pred(s)
            {
                return s.clone();
            }
            if tokio::time::timeout_at(deadline, self.statuses.recv())
                .await
                .is_err()
            {
                panic!(
                    "no DomainStatus `{what}` for {app} within {WAIT:?}; last: {:#?}\nmanager log:\n{}",
                    self.statuses.get(&key),
                    self.manager_log()
                );
            }
        }
    }

    /// Waits for the domain-manager's restart barrier after a restart.
    pub async fn wait_restarted(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.statuses.recv()).await {
                Ok(Event::Restarted) => return,
                Ok(_) => {}
                Err(_) => panic!(
                    "domain-manager never signalled its restart\n{}",
                    self.manager_log()
                ),
            }
        }
    }

    pub fn request_live_op(&self, app: Uuid, op: DomainLiveOp, tag: &str) -> DomainLiveOpConfig {
        DomainLiveOpConfig {
            request_id: Uuid::new_v4(),
            app_uuid: app,
            op,
            tag: tag.into(),
        }
    }

    /// Requests a live operation and waits for its outcome.
    pub async fn live_op(&mut self, app: Uuid, op: DomainLiveOp, tag: &str) -> DomainLiveOpStatus {
        let request = self.request_live_op(app, op, tag);
        self.ops.publish(request.clone()).await.unwrap();
        self.wait_live_op(request.request_id).await
    }

    /// Waits for the outcome of request `request_id`.
    pub async fn wait_live_op(&mut self, request_id: Uuid) -> DomainLiveOpStatus {
        let key = request_id.to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(s) = self.op_statuses.get(&key)
                && s.state != DomainLiveOpState::InProgress
            {
                return s.clone();
            }
            if tokio::time::timeout_at(deadline, self.op_statuses.recv())
                .await
                .is_err()
            {
                panic!(
                    "live op {request_id} got no outcome\n{}",
                    self.manager_log()
                );
            }
        }
    }

    /// A fresh 64 MiB qcow2 disk.
    pub fn qcow2(&self, name: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("64M")
            .output()
            .expect("qemu-img (qemu-utils) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_manager();
        // Whatever a failed test left: only qemus of this test's own roots, by pid.
        for pid in qemus_under(self.tmp.path()) {
            let _ = nix::sys::signal::kill(
                Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            reap(pid);
        }
        for pid in process_apps_mentioning(&self.tmp.path().to_string_lossy()) {
            let _ = nix::sys::signal::killpg(
                Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            reap(pid);
        }
    }
}

pub fn vm_config(app: Uuid, disk: Option<&Path>, activate: bool) -> DomainConfig {
    let guest = guest_dir();
    DomainConfig {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "test-guest".into(),
        activate,
        spec: DomainSpec::Vm(VmSpec {
            kernel: guest.join("vmlinuz"),
            initrd: guest.join("initramfs.cpio.gz"),
            append: "console=ttyS0 quiet panic=-1 cryptomgr.notests cairn.workload=counter".into(),
            memory_mib: 256,
            cpus: 1,
            guest_agent: false,
        }),
        disk_config_list: disk
            .map(|d| {
                vec![DiskConfig {
                    volume_key: format!("{app}#0"),
                    file_location: d.to_path_buf(),
                    format: VolumeFormat::Qcow2,
                    read_only: false,
                    mount_dir: String::new(),
                }]
            })
            .unwrap_or_default(),
        restart_counter: 0,
        purge_counter: 0,
        load_state_tag: String::new(),
    }
}

/// The test guest booted from a copy of its bootable disk (`disk.qcow2`) through the BIOS: no
/// kernel, the disk is the VM's first and only one.
pub fn disk_boot_config(app: Uuid, disk: &Path, activate: bool) -> DomainConfig {
    let mut config = vm_config(app, Some(disk), activate);
    config.spec = DomainSpec::Vm(VmSpec {
        memory_mib: 256,
        cpus: 1,
        ..VmSpec::default()
    });
    config
}

/// A writable copy of the test guest's bootable disk under `dir`.
pub fn boot_disk_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("boot.qcow2");
    std::fs::copy(guest_dir().join("disk.qcow2"), &copy).expect("copy disk.qcow2");
    copy
}

pub fn process_config(app: Uuid, script: &str, volume: &Path, activate: bool) -> DomainConfig {
    DomainConfig {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: "1".into(),
        },
        display_name: "test-process".into(),
        activate,
        spec: DomainSpec::Process(ProcessSpec {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: [("GREETING".to_string(), "cairn".to_string())].into(),
            working_dir: None,
        }),
        disk_config_list: vec![DiskConfig {
            volume_key: format!("{app}#0"),
            file_location: volume.to_path_buf(),
            format: VolumeFormat::Dir,
            read_only: false,
            mount_dir: "data".into(),
        }],
        restart_counter: 0,
        purge_counter: 0,
        load_state_tag: String::new(),
    }
}

/// Numbers on `CAIRN-COUNTER N` lines of a console log, from byte `from` on.
pub fn counters(console: &Path, from: usize) -> Vec<u64> {
    let text = std::fs::read(console).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned();
    text.lines()
        .filter_map(|l| l.trim_end().strip_prefix("CAIRN-COUNTER "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

pub fn console_len(console: &Path) -> usize {
    std::fs::metadata(console)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

pub async fn wait_console(console: &Path, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
        if pred(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "console {} never showed {what}; it holds:\n{text}",
            console.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sector 0 of a qcow2 image as the guest's counter (`qemu-io -r -U`, so also while qemu runs).
pub fn disk_counter(disk: &Path) -> Option<u64> {
    disk_counter_at(disk, 0)
}

/// Where the test guest's bootable `disk.qcow2` keeps its counter: partition 2 (`/dev/vda2`),
/// which starts at sector 67584 (images/test-guest/build).
pub const BOOT_DISK_COUNTER_OFFSET: u64 = 67584 * 512;

/// The counter in the sector at byte `offset` of a qcow2 image.
pub fn disk_counter_at(disk: &Path, offset: u64) -> Option<u64> {
    let read = format!("read -v {offset} 512");
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", &read])
        .arg(disk)
        .output()
        .expect("qemu-io (qemu-utils) must be installed");
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "00000000:  33 0a 00 ...  '3...'"
        let Some((_, rest)) = line.split_once(":  ") else {
            continue;
        };
        for hex in rest.split_whitespace().take(16) {
            match u8::from_str_radix(hex, 16) {
                Ok(b) if hex.len() == 2 => bytes.push(b),
                _ => break,
            }
        }
    }
    let text: String = bytes
        .iter()
        .take_while(|b| **b != 0 && **b != b'\n')
        .map(|b| *b as char)
        .collect();
    text.trim().parse().ok()
}

/// Internal snapshot names of an image (`qemu-img snapshot -l -U`).
pub fn snapshot_names(disk: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(disk)
        .output()
        .expect("qemu-img");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

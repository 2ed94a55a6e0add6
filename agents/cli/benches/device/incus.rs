//! Cairn against a peer on the same machine and the same storage: Incus 6.0.4 (Debian
//! bookworm-backports, installed by `agents/cli/benches/install-incus`), `incusd` started here in
//! the foreground with a directory of its own (`INCUS_DIR`), its storage pool and Cairn's device
//! root both on one btrfs file system on a loop device made for the run. Incus runs a busybox
//! container built here from Debian's busybox-static (imported with `incus image import`, no
//! network); Cairn a process app on a directory volume (the btrfs backend). Measured in one run:
//!
//! - a snapshot of the running app: Cairn, the config file changed (a `live` immediate snapshot
//!   added) → the snapshot listed available; Incus, `incus snapshot create`;
//! - a rollback until the app runs again: Cairn, the config file changed (`active_snapshot`, the
//!   rollback counter) → its domain running again; Incus, `incus snapshot restore` (it stops
//!   the container, restores, starts it again before it returns);
//! - the deletion of a stopped app's snapshot (newest first, all but the one rolled back to):
//!   Cairn, the snapshot dropped from the config → no longer listed; Incus, `incus snapshot delete` of a stopped container's snapshot;
//! - idle memory: the four agents (and everything `cairn up` runs, itself included) vs `incusd`
//!   and the container's `[lxc monitor]`.
//!
//! Each Cairn operation is also broken down by stage, as seen on the bus (which agent the time
//! went to); `CAIRN_BENCH_LOGS=<dir>` keeps the agents' own logs, at info level, in `<dir>`.
//! Where Incus is not installed, this says so and skips. Figures only.

use super::*;

const INCUSD: &str = "/usr/libexec/incus/incusd";
/// Snapshots taken (and then deleted) per side; rollbacks are fewer (each restarts the app).
const RUNS: usize = 10;
const ROLLBACKS: usize = 5;

/// What is missing for the comparison, if anything.
fn missing() -> Option<String> {
    let incusd = std::env::var_os("CAIRN_BENCH_INCUSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(INCUSD));
    if !incusd.is_file() {
        return Some(format!(
            "{} is not installed (Incus 6.0.4 from bookworm-backports: run \
             agents/cli/benches/install-incus as root)",
            incusd.display()
        ));
    }
    for tool in ["incus", "mkfs.btrfs", "losetup", "busybox"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: the loop device, btrfs and incusd need root".into());
    }
    None
}

pub struct Figures {
    pub rows: Vec<(String, String, String, String)>,
}

/// Runs the comparison, or says why not; `None` when skipped.
pub async fn compare(cairn: &Path) -> Option<Figures> {
    if let Some(why) = missing() {
        eprintln!("Incus comparison skipped: {why}");
        return None;
    }
    let storage = BtrfsLoop::new();
    eprintln!(
        "btrfs on {} mounted at {}",
        storage.device,
        storage.mnt.display()
    );
    eprintln!("Incus…");
    let incus = incus_side(&storage).await;
    eprintln!("Cairn…");
    let cairn = cairn_side(cairn, &storage).await;
    drop(storage);
    let ratio = |c: &[Duration], i: &[Duration]| {
        let median = |s: &[Duration]| {
            let mut s = s.to_vec();
            s.sort();
            s[s.len() / 2].as_secs_f64()
        };
        format!("**{:.2}×**", median(c) / median(i))
    };
    let rows = vec![
        (
            format!(
                "snapshot of the running app ({RUNS} runs; Cairn: config file written → available)"
            ),
            spread(&cairn.snapshot),
            spread(&incus.snapshot),
            format!("{} (target ≤ 1×)", ratio(&cairn.snapshot, &incus.snapshot)),
        ),
        (
            "〃 Cairn counted from the config in force (config-agent's part left out)".into(),
            spread(&cairn.snapshot_from_config),
            "–".into(),
            ratio(&cairn.snapshot_from_config, &incus.snapshot),
        ),
        (
            "〃 Cairn's stages: written → in force (config-agent) / → volumes asked (app-manager) \
             / → answered (volume-manager) / → available (app-manager)"
                .into(),
            cairn.parts.join(" / "),
            "–".into(),
            "–".into(),
        ),
        (
            format!("rollback until the app runs again ({ROLLBACKS} runs)"),
            spread(&cairn.rollback),
            spread(&incus.rollback),
            format!(
                "{} (target ≤ 0.25×)",
                ratio(&cairn.rollback, &incus.rollback)
            ),
        ),
        (
            "〃 Cairn's stages: written → in force (config-agent) / → stop asked (app-manager) \
             / → stopped (domain-manager) / → volumes asked (app-manager) / → rolled back \
             (volume-manager) / → start asked (app-manager) / → running (domain-manager)"
                .into(),
            cairn.rollback_parts.join(" / "),
            "–".into(),
            "–".into(),
        ),
        (
            format!("delete of a stopped app's snapshot ({} runs)", RUNS - 1),
            spread(&cairn.delete),
            spread(&incus.delete),
            format!("{} (target ≤ 1×)", ratio(&cairn.delete, &incus.delete)),
        ),
        (
            "〃 Cairn's stages: written → in force (config-agent) / → volumes asked (app-manager) \
             / → deleted (volume-manager) / → gone from the app's status (app-manager)"
                .into(),
            cairn.delete_parts.join(" / "),
            "–".into(),
            "–".into(),
        ),
        (
            "idle RSS: Cairn's four agents vs incusd + the container's [lxc monitor]".into(),
            cairn.rss_four.clone(),
            incus.rss.clone(),
            format!(
                "**{:.2}×** (target ≤ 0.3×)",
                cairn.rss_four_kib as f64 / incus.rss_kib as f64
            ),
        ),
        (
            "〃 everything `cairn up` runs (seven agents and itself)".into(),
            cairn.rss_all.clone(),
            "–".into(),
            format!("{:.2}×", cairn.rss_all_kib as f64 / incus.rss_kib as f64),
        ),
        (
            "backend chosen for Cairn's volume".into(),
            cairn.backend.clone(),
            "btrfs pool".into(),
            "–".into(),
        ),
    ];
    Some(Figures { rows })
}

// ---- the storage ------------------------------------------------------------------------------

/// One btrfs file system on a loop device over a sparse file, for both sides; removed on drop
/// (every mount under it first, then the loop device).
struct BtrfsLoop {
    temp: tempfile::TempDir,
    device: String,
    mnt: PathBuf,
}

impl BtrfsLoop {
    fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let image = temp.path().join("btrfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let device = run("losetup", &["-f", "--show", image.to_str().unwrap()])
            .trim()
            .to_string();
        run("mkfs.btrfs", &["-q", &device]);
        let mnt = temp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run("mount", &[&device, mnt.to_str().unwrap()]);
        Self { temp, device, mnt }
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        // Deepest first: incusd's bind mounts of the pool, then the pool itself.
        let under = self.temp.path().to_str().unwrap().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&under))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

// ---- Incus ------------------------------------------------------------------------------------

struct IncusFigures {
    snapshot: Vec<Duration>,
    rollback: Vec<Duration>,
    delete: Vec<Duration>,
    rss: String,
    rss_kib: u64,
}

/// `incusd` in the foreground with its own directory; stopped (and its container) on drop.
struct Incusd {
    dir: PathBuf,
    child: Child,
}

impl Incusd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("incusd.log")).unwrap();
        let child =
            Command::new(std::env::var_os("CAIRN_BENCH_INCUSD").unwrap_or_else(|| INCUSD.into()))
                .args(["--group", "root"])
                .env("INCUS_DIR", dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
        let incusd = Self {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !incusd.try_cli(&["info"]) {
            assert!(
                Instant::now() < deadline,
                "incusd did not answer within 60 s: see {}",
                dir.join("incusd.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        incusd
    }

    fn try_cli(&self, args: &[&str]) -> bool {
        Command::new("incus")
            .args(args)
            .env("INCUS_DIR", &self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `incus ARGS` to success; how long it took.
    fn cli(&self, args: &[&str]) -> Duration {
        let began = Instant::now();
        let out = Command::new("incus")
            .args(args)
            .env("INCUS_DIR", &self.dir)
            .output()
            .unwrap();
        let took = began.elapsed();
        assert!(
            out.status.success(),
            "incus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }

    fn state(&self, instance: &str) -> String {
        let out = Command::new("incus")
            .args(["list", "-f", "csv", "-c", "s", instance])
            .env("INCUS_DIR", &self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// incusd's RSS and that of the `[lxc monitor]` of each of its running containers.
    fn rss(&self) -> (String, u64) {
        let daemon = rss_kib(self.child.id() as i32);
        let marker = self.dir.to_str().unwrap().to_string();
        let monitors: u64 = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.starts_with("[lxc monitor]") && cmdline.contains(&marker)
            })
            .map(rss_kib)
            .sum();
        (
            format!(
                "**{:.1} MiB** (incusd {:.1}, monitor {:.1})",
                (daemon + monitors) as f64 / 1024.0,
                daemon as f64 / 1024.0,
                monitors as f64 / 1024.0
            ),
            daemon + monitors,
        )
    }
}

impl Drop for Incusd {
    fn drop(&mut self) {
        let _ = Command::new("incus")
            .args(["stop", "--force", "c1"])
            .env("INCUS_DIR", &self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A busybox image as `incus image import` takes it: a metadata tarball and a rootfs tarball,
/// made from the host's busybox-static (no network). Its init sleeps.
fn busybox_image(dir: &Path) -> (PathBuf, PathBuf) {
    let rootfs = dir.join("rootfs");
    for sub in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
    ] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    let busybox = run("sh", &["-c", "command -v busybox"]);
    std::fs::copy(busybox.trim(), rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "date", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let init = rootfs.join("sbin/init");
    std::fs::write(
        &init,
        "#!/bin/sh\nwhile :; do date > /root/beat; sleep 1; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1765000000\nproperties:\n  os: busybox\n  \
         description: Debian busybox-static, for Cairn's device bench\n",
    )
    .unwrap();
    let meta = dir.join("meta.tar");
    let root = dir.join("rootfs.tar");
    run(
        "tar",
        &[
            "-C",
            dir.to_str().unwrap(),
            "-cf",
            meta.to_str().unwrap(),
            "metadata.yaml",
        ],
    );
    run(
        "tar",
        &[
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            root.to_str().unwrap(),
            ".",
        ],
    );
    (meta, root)
}

async fn incus_side(storage: &BtrfsLoop) -> IncusFigures {
    let dir = storage.temp.path().join("incus");
    let incusd = Incusd::start(&dir);
    let pool = storage.mnt.join("incus-pool");
    incusd.cli(&[
        "storage",
        "create",
        "pool",
        "btrfs",
        &format!("source={}", pool.display()),
    ]);
    incusd.cli(&[
        "profile",
        "device",
        "add",
        "default",
        "root",
        "disk",
        "path=/",
        "pool=pool",
    ]);
    let (meta, root) = busybox_image(&dir);
    incusd.cli(&[
        "image",
        "import",
        meta.to_str().unwrap(),
        root.to_str().unwrap(),
        "--alias",
        "busybox",
    ]);
    incusd.cli(&["launch", "busybox", "c1"]);
    assert_eq!(incusd.state("c1"), "RUNNING");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut snapshot = Vec::new();
    for i in 1..=RUNS {
        snapshot.push(incusd.cli(&["snapshot", "create", "c1", &format!("s{i}")]));
    }
    let mut rollback = Vec::new();
    for _ in 0..ROLLBACKS {
        rollback.push(incusd.cli(&["snapshot", "restore", "c1", "s1"]));
        assert_eq!(incusd.state("c1"), "RUNNING", "running again after restore");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, rss_kib) = incusd.rss();
    incusd.cli(&["stop", "--force", "c1"]);
    let mut delete = Vec::new();
    for i in (2..=RUNS).rev() {
        delete.push(incusd.cli(&["snapshot", "delete", "c1", &format!("s{i}")]));
    }
    drop(incusd);
    IncusFigures {
        snapshot,
        rollback,
        delete,
        rss,
        rss_kib,
    }
}

// ---- Cairn ------------------------------------------------------------------------------------

struct CairnFigures {
    /// The live snapshot's stages: config-agent, app-manager, volume-manager, app-manager.
    parts: [String; 4],
    /// The rollback's stages: config-agent, app-manager, domain-manager, app-manager,
    /// volume-manager, app-manager, domain-manager.
    rollback_parts: [String; 7],
    /// The delete's stages: config-agent, app-manager, volume-manager, app-manager.
    delete_parts: [String; 4],
    snapshot: Vec<Duration>,
    snapshot_from_config: Vec<Duration>,
    rollback: Vec<Duration>,
    delete: Vec<Duration>,
    rss_four: String,
    rss_four_kib: u64,
    rss_all: String,
    rss_all_kib: u64,
    backend: String,
}

async fn cairn_side(cairn: &Path, storage: &BtrfsLoop) -> CairnFigures {
    let root = storage.mnt.join("cairn");
    std::fs::create_dir_all(&root).unwrap();
    let device = Device::reused(root);
    let app = Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_a101);
    let volume = Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_b101);
    let snapshot =
        |i: usize| Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_c100 + i as u128);
    // The app's config with snapshots `from..=to`, rolled back `rollbacks` times to the first.
    let config = |snapshots: std::ops::RangeInclusive<usize>, rollbacks: usize, activate: bool| {
        let ids: Vec<String> = snapshots
            .map(|i| {
                format!(
                    r#"{{"id": "{}", "type": "immediate", "mode": "live"}}"#,
                    snapshot(i)
                )
            })
            .collect();
        let active = if rollbacks > 0 {
            snapshot(1).to_string()
        } else {
            String::new()
        };
        format!(
            r#"{{"apps": [{{"uuid": "{app}", "version": "1", "display_name": "bench-app",
  "activate": {activate},
  "volume_refs": [{{"uuid": "{volume}", "mount_dir": "/data"}}],
  "snapshot": {{"max_snapshots": {max}, "active_snapshot": "{active}",
                "rollback_counter": {rollbacks}, "snapshots": [{ids}]}},
  "domain": {{"kind": "process", "command": "/bin/sh",
              "args": ["-c", "while :; do date > \"$CAIRN_VOLUME_0/beat\"; sleep 1; done"]}}}}],
 "volumes": [{{"uuid": "{volume}", "display_name": "bench-disk", "format": "dir",
               "max_size_bytes": 16777216}}]}}"#,
            max = RUNS + 1,
            ids = ids.join(", ")
        )
    };
    #[allow(clippy::reversed_empty_ranges)] // no snapshot yet: the empty range
    device.write_config(&config(1..=0, 0, true));
    // `CAIRN_BENCH_LOGS=<dir>`: the agents log at info level, and their logs are copied to
    // `<dir>` before the loop device goes (each line is time-stamped: the stages in detail).
    let keep_logs = std::env::var_os("CAIRN_BENCH_LOGS").map(PathBuf::from);
    let mut up = match keep_logs {
        Some(_) => device.up_with(cairn, &[("RUST_LOG", "info")]),
        None => device.up(cairn),
    };
    let mut observer = Observer::start(&device);
    observer
        .until(Duration::from_secs(60), |o| {
            o.domains
                .values()
                .any(|d| d.activated && d.state == DomainState::Running)
        })
        .await;
    let backend = observer
        .volumes
        .values()
        .next()
        .map(|v| format!("{:?} ({})", v.backend, v.backend_reason))
        .unwrap_or_default();

    let (mut taken, mut from_config) = (Vec::new(), Vec::new());
    // Written → in force (config-agent), → volumes asked (app-manager), → answered
    // (volume-manager), → available (app-manager).
    let mut parts: [Vec<Duration>; 4] = Default::default();
    for i in 1..=RUNS {
        let id = snapshot(i);
        let written = Instant::now();
        device.write_config(&config(1..=i, 0, true));
        let mut steps = vec![
            Milestone::new("config in force", None, move |o: &Observer| {
                o.configs
                    .values()
                    .any(|c| c.snapshot.snapshots.iter().any(|s| s.snapshot_id == id))
            }),
            Milestone::new("volumes asked", Some(0), move |o: &Observer| {
                o.snapshot_requests
                    .values()
                    .any(|r| r.snapshot_id == id && r.action == VolumesSnapshotAction::Create)
            }),
            Milestone::new("volumes answered", Some(1), move |o: &Observer| {
                o.snapshot_results.values().any(|r| {
                    r.snapshot_id == id
                        && r.result_of_action == VolumesSnapshotAction::Create
                        && !r.is_in_progress()
                })
            }),
            Milestone::new("available", Some(2), move |o: &Observer| {
                o.apps.values().any(|a| {
                    a.snap_status
                        .available_snapshots
                        .iter()
                        .any(|s| s.snapshot.snapshot_id == id)
                })
            }),
        ];
        observer.reach(Duration::from_secs(60), &mut steps).await;
        let at = |i: usize| steps[i].at.unwrap();
        taken.push(at(3) - written);
        from_config.push(at(3) - at(0));
        parts[0].push(at(0) - written);
        parts[1].push(at(1) - at(0));
        parts[2].push(at(2) - at(1));
        parts[3].push(at(3) - at(2));
    }

    let mut rollback = Vec::new();
    // Written → in force (config-agent), → stop asked (app-manager), → stopped
    // (domain-manager), → volumes asked (app-manager), → rolled back (volume-manager), → start
    // asked (app-manager), → running (domain-manager).
    let mut rollback_parts: [Vec<Duration>; 7] = Default::default();
    for n in 1..=ROLLBACKS {
        // The rollback request of this run is the first with a counter above the last one seen.
        let asked_before = observer
            .snapshot_requests
            .values()
            .filter(|r| r.action == VolumesSnapshotAction::Rollback)
            .map(|r| r.request_counter)
            .max()
            .unwrap_or(0);
        let written = Instant::now();
        device.write_config(&config(1..=RUNS, n, true));
        let counter = n as u32;
        let rollback_asked = move |o: &Observer| {
            o.snapshot_requests.values().any(|r| {
                r.action == VolumesSnapshotAction::Rollback && r.request_counter > asked_before
            })
        };
        let mut steps = vec![
            Milestone::new("config in force", None, move |o: &Observer| {
                o.configs
                    .values()
                    .any(|c| c.snapshot.rollback_cmd.counter == counter)
            }),
            Milestone::new("stop asked", Some(0), |o: &Observer| {
                o.domain_configs.values().any(|c| !c.activate)
            }),
            Milestone::new("stopped", Some(1), |o: &Observer| {
                o.domains
                    .values()
                    .any(|d| !d.activated && d.state != DomainState::Running)
            }),
            Milestone::new("volumes asked", Some(2), rollback_asked),
            Milestone::new("rolled back", Some(3), move |o: &Observer| {
                o.snapshot_results.values().any(|r| {
                    r.result_of_action == VolumesSnapshotAction::Rollback
                        && r.request_counter > asked_before
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
        ];
        observer.reach(Duration::from_secs(60), &mut steps).await;
        let at = |i: usize| steps[i].at.unwrap();
        rollback.push(at(6) - written);
        rollback_parts[0].push(at(0) - written);
        for (i, part) in rollback_parts.iter_mut().enumerate().skip(1) {
            part.push(at(i) - at(i - 1));
        }
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_four, rss_four_kib) = (rss_line(&up), rss_total_kib(&up));
    let (rss_all, rss_all_kib) = rss_everything(&up);

    // Deletions happen while the app is stopped.
    device.write_config(&config(1..=RUNS, ROLLBACKS, false));
    observer
        .until(Duration::from_secs(60), |o| {
            o.domains
                .values()
                .any(|d| !d.activated && d.state == DomainState::Halted)
                && o.apps
                    .values()
                    .any(|a| a.state == cairn_types::SwState::Halted)
        })
        .await;
    // The newest first, down to the second: the first is the one rolled back to.
    let mut delete = Vec::new();
    // Written → in force (config-agent), → volumes asked (app-manager), → deleted
    // (volume-manager), → gone from the app's status (app-manager).
    let mut delete_parts: [Vec<Duration>; 4] = Default::default();
    for i in (2..=RUNS).rev() {
        let id = snapshot(i);
        let written = Instant::now();
        device.write_config(&config(1..=i - 1, ROLLBACKS, false));
        let mut steps = vec![
            Milestone::new("config in force", None, move |o: &Observer| {
                o.configs.values().any(|c| {
                    !c.snapshot.snapshots.is_empty()
                        && !c.snapshot.snapshots.iter().any(|s| s.snapshot_id == id)
                })
            }),
            Milestone::new("volumes asked", Some(0), move |o: &Observer| {
                o.snapshot_requests
                    .values()
                    .any(|r| r.snapshot_id == id && r.action == VolumesSnapshotAction::Delete)
            }),
            Milestone::new("deleted", Some(1), move |o: &Observer| {
                o.snapshot_results.values().any(|r| {
                    r.snapshot_id == id
                        && r.result_of_action == VolumesSnapshotAction::Delete
                        && !r.is_in_progress()
                })
            }),
            Milestone::new("gone", Some(2), move |o: &Observer| {
                o.apps.values().any(|a| {
                    !a.snap_status
                        .available_snapshots
                        .iter()
                        .any(|s| s.snapshot.snapshot_id == id)
                        && !a
                            .snap_status
                            .snapshots_to_be_deleted
                            .iter()
                            .any(|s| s.snapshot_id == id)
                })
            }),
        ];
        observer.reach(Duration::from_secs(60), &mut steps).await;
        let at = |i: usize| steps[i].at.unwrap();
        delete.push(at(3) - written);
        delete_parts[0].push(at(0) - written);
        for (i, part) in delete_parts.iter_mut().enumerate().skip(1) {
            part.push(at(i) - at(i - 1));
        }
    }
    drop(observer);
    up.stop();
    if let Some(dir) = keep_logs {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(device.run().join("logs"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        eprintln!("the agents' logs are in {}", dir.display());
    }
    CairnFigures {
        parts: parts.map(|p| spread(&p)),
        rollback_parts: rollback_parts.map(|p| spread(&p)),
        delete_parts: delete_parts.map(|p| spread(&p)),
        snapshot: taken,
        snapshot_from_config: from_config,
        rollback,
        delete,
        rss_four,
        rss_four_kib,
        rss_all,
        rss_all_kib,
        backend,
    }
}

/// RSS of `cairn up` and every process it started.
fn rss_everything(up: &Up) -> (String, u64) {
    let parent = up.child.as_ref().unwrap().id() as i32;
    let children: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<i32>().ok())
                })
                == Some(parent)
        })
        .collect();
    let agents: u64 = children.iter().map(|pid| rss_kib(*pid)).sum();
    let supervisor = rss_kib(parent);
    (
        format!(
            "{:.1} MiB ({} processes {:.1}, cairn up {:.1})",
            (agents + supervisor) as f64 / 1024.0,
            children.len(),
            agents as f64 / 1024.0,
            supervisor as f64 / 1024.0
        ),
        agents + supervisor,
    )
}

//! The baseos-manager's own file calls failing during an update: the real agent runs under
//! libfiu's POSIX preload (`fiu-run -x`, Debian `fiu-utils`) on a boot disk made of three
//! files (boot state, slot A, slot B), the test publishing the controller's `BaseOsConfig` and
//! the downloader's `ContentTreeStatus`; `fiu-ctrl` makes one call fail. After each fault the
//! status names the update and the fault, the agent still runs, and the update record agrees
//! with the slots and the boot state: nothing is written into slot B before its record says
//! so, and a record that says failed has no trial mark beside it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cairn_baseos_manager::bootstate::{BootState, SECTOR, Slot};
use cairn_baseos_manager::bundle::{self, SigningKey};
use cairn_baseos_manager::update::{Phase, UpdateRecord, record_path};
use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_types::{
    BaseOsConfig, BaseOsStatus, BaseOsUpdateStatus, ContentFormat, ContentTreeState,
    ContentTreeStatus,
};

const TREE: &str = "5d4c3b2a-1f0e-4d9c-8b7a-695847362514";
const SLOT_BYTES: u64 = 80 << 20;
/// Big enough that checking and copying the image last a while, so that a fault armed when
/// the status says "verifying" reaches the copy's fsync.
const ROOT_BYTES: usize = 64 << 20;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Harness {
    // Fields drop in order: the agent is killed first, its directory goes last.
    agent: Agent,
    fiu: Fiu,
    statuses: Subscription<BaseOsStatus>,
    configs: Publication<BaseOsConfig>,
    trees: Publication<ContentTreeStatus>,
    bundle: PathBuf,
    root: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(BootState::initial(), "A", "committed", "").await
    }

    /// Booted from `slot` in `mode` with `state` on the boot disk; the trial deadline
    /// `deadline_s` (empty: the default).
    async fn start_with(state: BootState, slot: &str, mode: &str, deadline_s: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let (run, persist) = (dir.join("run"), dir.join("persist"));
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        let disk = dir.join("boot/disk");
        let mut sectors = vec![0u8; 2 * SECTOR];
        let at = (state.seq % 2) as usize * SECTOR;
        sectors[at..at + SECTOR].copy_from_slice(&state.encode());
        std::fs::write(dir.join("boot/disk1"), sectors).unwrap();
        for slot in ["boot/disk2", "boot/disk3"] {
            std::fs::File::create(dir.join(slot))
                .unwrap()
                .set_len(SLOT_BYTES)
                .unwrap();
        }
        let key_path = dir.join("signing.pem");
        std::fs::write(&key_path, SigningKey::generate_pem().unwrap()).unwrap();
        let key = SigningKey::load(&key_path).unwrap();
        std::fs::write(dir.join("update.pub"), key.public_key().to_hex()).unwrap();
        let image: Vec<u8> = (0..ROOT_BYTES).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(dir.join("root.squashfs"), image).unwrap();
        std::fs::write(dir.join("manifest.txt"), "manifest\n").unwrap();
        let bundle = dir.join("update.bundle");
        bundle::create(
            &key,
            "2.0",
            1,
            &dir.join("manifest.txt"),
            &dir.join("root.squashfs"),
            &bundle,
        )
        .unwrap();
        std::fs::write(dir.join("release"), "VERSION=1.0\n").unwrap();

        let fiu = Fiu::new(dir);
        let mut command =
            cairn_fiu::command_via(&fiu.launcher(), env!("CARGO_BIN_EXE_cairn-baseos-manager"));
        command
            .env("CAIRN_RUN_DIR", &run)
            .env("CAIRN_PERSIST_DIR", &persist)
            .env("CAIRN_BOOT_DISK", &disk)
            .env("CAIRN_BOOT_SLOT", slot)
            .env("CAIRN_BOOT_MODE", mode)
            .env("CAIRN_UPDATE_KEY", dir.join("update.pub"))
            .env("CAIRN_RELEASE_FILE", dir.join("release"))
            .env(
                "CAIRN_REBOOT_COMMAND",
                format!("touch {}", dir.join("rebooted").display()),
            )
            .stderr(Stdio::inherit());
        if !deadline_s.is_empty() {
            command.env("CAIRN_TRIAL_DEADLINE_S", deadline_s);
        }
        let agent = Agent(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("fiu-run is required (Debian fiu-utils): {e}")),
        );
        let controller = Bus::new("config-agent", run.clone(), persist.clone());
        let configs = controller
            .publish::<BaseOsConfig>(PublishOptions::default())
            .await
            .unwrap();
        let downloader = Bus::new("downloader", run.clone(), persist.clone());
        let trees = downloader
            .publish::<ContentTreeStatus>(PublishOptions::default())
            .await
            .unwrap();
        let reader = Bus::new("cli", run, persist);
        let statuses = reader.subscribe::<BaseOsStatus>("baseos-manager");
        let mut h = Self {
            root,
            fiu,
            agent,
            statuses,
            configs,
            trees,
            bundle,
        };
        h.until("the slots reported", |s| s.slots.len() == 2).await;
        h
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// The bundle, downloaded and verified, and the controller asking for it (activate).
    async fn offer(&self, retry_counter: u32) {
        self.trees
            .publish(ContentTreeStatus {
                content_id: TREE.parse().unwrap(),
                display_name: "update".into(),
                format: ContentFormat::Raw,
                content_sha256: "ab".repeat(32),
                state: ContentTreeState::Loaded,
                progress: 100,
                file_location: self.bundle.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.configs
            .publish(BaseOsConfig {
                content_tree_uuid: TREE.parse().unwrap(),
                base_os_version: "2.0".into(),
                retry_update_counter: retry_counter,
                activate: true,
                unusable: String::new(),
            })
            .await
            .unwrap();
    }

    async fn until(&mut self, what: &str, done: impl Fn(&BaseOsStatus) -> bool) -> BaseOsStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.statuses.get("global")
                && done(status)
            {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "never: {what}; last {:?}",
                self.statuses.get("global").map(|s| &s.update)
            );
            assert!(
                self.agent.0.try_wait().unwrap().is_none(),
                "the agent ended"
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), self.statuses.recv()).await;
        }
    }

    fn record(&self) -> Option<UpdateRecord> {
        cairn_persist::load::<UpdateRecord>(&record_path(&self.path("persist")))
            .ok()
            .map(|l| l.record)
    }

    fn boot_state(&self) -> BootState {
        BootState::read(&self.path("boot/disk1")).unwrap()
    }

    fn slot_b_is_blank(&self) -> bool {
        let bytes = std::fs::read(self.path("boot/disk3")).unwrap();
        bytes.iter().all(|b| *b == 0)
    }

    /// Installed into slot B and marked for its trial, the record saying so.
    async fn until_installed(&mut self) {
        self.until("installed into slot B", |s| {
            s.update.as_ref().is_some_and(|u| {
                u.partition_label == "IMGB" && u.progress == 100 && !u.error.is_error()
            }) && s
                .slots
                .iter()
                .any(|slot| slot.partition_state == "updating")
        })
        .await;
        let record = self.record().unwrap();
        assert_eq!(
            (record.phase, record.slot()),
            (Phase::Installed, Some(Slot::B))
        );
        assert_eq!(self.boot_state().trial, Some(Slot::B));
        let slot = std::fs::read(self.path("boot/disk3")).unwrap();
        let image = std::fs::read(self.path("root.squashfs")).unwrap();
        assert!(slot[..image.len()] == image[..], "slot B is not the image");
    }
}

fn error_of(status: &BaseOsStatus) -> &str {
    status
        .update
        .as_ref()
        .map_or("", |u: &BaseOsUpdateStatus| u.error.error.as_str())
}

/// The first fsync of an update is its record's, written before any byte of the slot: it
/// fails, the status says so, nothing is written, and the update goes on 5 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_record_that_cannot_be_synced_is_reported_and_the_update_goes_on_later() {
    let mut h = Harness::start().await;
    h.fiu.fail_once(h.agent.0.id(), "posix/io/sync/fsync", EIO);
    h.offer(0).await;
    let failed = h
        .until("the record fault reported", |s| !error_of(s).is_empty())
        .await;
    let text = error_of(&failed).to_string();
    println!("fiu baseos-manager posix/io/sync/fsync errno={EIO} (update record): {text}");
    assert!(
        text.contains("base OS 2.0")
            && text.contains("update record")
            && text.to_lowercase().contains(fault_words(EIO)),
        "{text}"
    );
    assert!(h.slot_b_is_blank(), "slot B written without its record");
    assert_eq!(h.boot_state().trial, None);
    h.until_installed().await;
}

/// The install failed with slot B named and `fault` in words: the record says failed and the
/// slot is not marked.
async fn failed_with_no_trial_mark(h: &mut Harness, what: &str, fault: &str) {
    let failed = h
        .until("the slot fault reported", |s| !error_of(s).is_empty())
        .await;
    let text = error_of(&failed).to_string();
    println!("fiu baseos-manager {what} (slot B): {text}");
    assert!(
        text.contains("slot IMGB") && text.to_lowercase().contains(fault),
        "{text}"
    );
    let record = h.record().unwrap();
    assert_eq!(record.phase, Phase::Failed, "{record:?}");
    assert_eq!(
        h.boot_state().trial,
        None,
        "a failed install left a trial mark"
    );
}

/// The slot's fsync fails (the first fsync after the bundle check starts: the install's
/// record is already written): the install fails, nothing marked; a new retry counter
/// installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_fsync_fails_fails_the_install_with_no_trial_mark() {
    let mut h = Harness::start().await;
    h.offer(0).await;
    h.until("the bundle check or the copy under way", |s| {
        s.update
            .as_ref()
            .is_some_and(|u| u.step.starts_with("verifying") || u.step.starts_with("writing"))
    })
    .await;
    h.fiu.fail_once(h.agent.0.id(), "posix/io/sync/fsync", EIO);
    failed_with_no_trial_mark(&mut h, "posix/io/sync/fsync errno=5", fault_words(EIO)).await;
    h.offer(1).await;
    h.until_installed().await;
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Slot B on a real full file system (a tmpfs smaller than the image): the copy's write
/// fails with ENOSPC; the install fails, nothing marked; with room made (remounted bigger), a
/// new retry counter installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_on_a_full_disk_fails_the_install_with_no_trial_mark() {
    let mut h = Harness::start().await;
    let small = h.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "cairn-slot-b"])
        .arg(&small)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let disk = SmallDisk(small.clone());
    std::fs::File::create(small.join("slot-b"))
        .unwrap()
        .set_len(SLOT_BYTES)
        .unwrap();
    std::fs::remove_file(h.path("boot/disk3")).unwrap();
    std::os::unix::fs::symlink(small.join("slot-b"), h.path("boot/disk3")).unwrap();
    h.offer(0).await;
    failed_with_no_trial_mark(&mut h, "a full tmpfs, write", fault_words(ENOSPC)).await;
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,size=128m"])
        .arg(&disk.0)
        .status()
        .unwrap();
    assert!(remounted.success());
    h.offer(1).await;
    h.until_installed().await;
}

/// A trial boot that is not healthy in time (no other agent runs here) is rolled back; the
/// roll-back's first fsync (its outcome record) fails: the running slot's error says so, and
/// 5 s later the roll-back is done: the trial failed in the boot state, the outcome recorded,
/// the reboot asked. Before, the agent ended and the trial was left to the try counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_back_that_cannot_be_recorded_is_reported_and_done_later() {
    let on_trial = BootState {
        seq: 2,
        ..BootState::initial().mark_trial(Slot::B, 0)
    };
    let mut h = Harness::start_with(on_trial, "B", "trial", "1").await;
    h.fiu.fail_once(h.agent.0.id(), "posix/io/sync/fsync", EIO);
    let failed = h
        .until("the roll-back fault reported", |s| {
            s.slots
                .iter()
                .any(|slot| slot.error.contains("cannot be rolled back"))
        })
        .await;
    let text = failed
        .slots
        .iter()
        .find(|slot| slot.partition_label == "IMGB")
        .map(|slot| slot.error.clone())
        .unwrap();
    println!("fiu baseos-manager posix/io/sync/fsync errno={EIO} (trial roll-back): {text}");
    assert!(
        text.contains("slot IMGB")
            && text.contains("last-update.json")
            && text.to_lowercase().contains(fault_words(EIO)),
        "{text}"
    );
    assert!(
        !h.path("rebooted").exists(),
        "rebooted before the verdict was recorded"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.path("rebooted").exists() {
        assert!(Instant::now() < deadline, "never rolled back");
        assert!(h.agent.0.try_wait().unwrap().is_none(), "the agent ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = h.boot_state();
    assert_eq!(
        (state.committed, state.trial, state.failed),
        (Slot::A, None, Some(Slot::B))
    );
    let outcome = cairn_persist::load::<cairn_types::UpdateOutcome>(
        &h.path("persist/baseos/last-update.json"),
    )
    .unwrap()
    .record;
    assert_eq!(
        (outcome.result.as_str(), outcome.partition_label.as_str()),
        ("failed", "IMGB")
    );
}

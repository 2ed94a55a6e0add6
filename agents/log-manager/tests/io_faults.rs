//! The log-manager's own file calls failing while the controller is unreachable and lines
//! queue on disk: the real agent runs under libfiu's POSIX preload (`fiu-run -x`, Debian
//! `fiu-utils`), and `fiu-ctrl` makes one of its calls fail. A queue file that cannot be
//! written (its fsync, its rename) is reported in `LogManagerStatus.queue_error` with the file
//! and the fault, and the lines are written again: each one ends in the queue exactly once.
//! A queued file that cannot be read when it is to be sent is reported and kept, not dropped.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
use cairn_pubsub::{Bus, PublishOptions, Subscription};
use cairn_types::{DeviceStatus, LogManagerStatus};

const DEVICE: &str = "0b7c6d5e-1f2a-4b3c-9d8e-7f6a5b4c3d2e";

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
    statuses: Subscription<LogManagerStatus>,
    // Held for the device UUID it publishes (the collector waits for it).
    _device: cairn_pubsub::Publication<DeviceStatus>,
    root: tempfile::TempDir,
}

impl Harness {
    /// The agent under libfiu, told the device's UUID; the controller unreachable (no link
    /// files unless `link` writes them).
    async fn start(device_uuid: &str, link: impl FnOnce(&Path)) -> Self {
        let root = tempfile::tempdir().unwrap();
        let (run, persist) = (root.path().join("run"), root.path().join("persist"));
        std::fs::create_dir_all(root.path().join("logs")).unwrap();
        link(&persist);
        let fiu = Fiu::new(root.path());
        let agent = Agent(
            cairn_fiu::command_via(&fiu.launcher(), env!("CARGO_BIN_EXE_cairn-log-manager"))
                .env("CAIRN_RUN_DIR", &run)
                .env("CAIRN_PERSIST_DIR", &persist)
                .env("CAIRN_LOG_DIR", root.path().join("logs"))
                .env("CAIRN_LOG_COLLECT_MS", "100")
                .env("CAIRN_LOG_BATCH_MS", "1000")
                .env("CAIRN_LOG_RETRY_MIN_MS", "50")
                .env("CAIRN_LOG_RETRY_MAX_MS", "100")
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("fiu-run is required (Debian fiu-utils): {e}")),
        );
        let config_agent = Bus::new("config-agent", run.clone(), persist.clone());
        let device = config_agent
            .publish::<DeviceStatus>(PublishOptions::default())
            .await
            .unwrap();
        device
            .publish(DeviceStatus {
                device_uuid: device_uuid.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let reader = Bus::new("cli", run, persist);
        let statuses = reader.subscribe::<LogManagerStatus>("log-manager");
        Self {
            root,
            fiu,
            agent,
            statuses,
            _device: device,
        }
    }

    fn append(&self, lines: impl IntoIterator<Item = String>) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("logs/app-manager.log"))
            .unwrap();
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
    }

    fn queue_dir(&self) -> PathBuf {
        self.root.path().join("persist/newlog/devUpload")
    }

    /// Every line in the queue's device files.
    fn queued_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.queue_dir()) else {
            return lines;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().is_none_or(|e| e != "gz") {
                continue;
            }
            let gzip = std::fs::read(&path).unwrap();
            let mut text = String::new();
            flate2::read::GzDecoder::new(&gzip[..])
                .read_to_string(&mut text)
                .unwrap();
            lines.extend(text.lines().map(String::from));
        }
        lines
    }

    async fn until_status(
        &mut self,
        what: &str,
        done: impl Fn(&LogManagerStatus) -> bool,
    ) -> LogManagerStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.statuses.get("global")
                && done(status)
            {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "never: {what}; last {:?}",
                self.statuses.get("global")
            );
            assert!(
                self.agent.0.try_wait().unwrap().is_none(),
                "the agent ended"
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), self.statuses.recv()).await;
        }
    }

    /// The first status within `within` that `done` accepts.
    async fn watch(
        &mut self,
        within: Duration,
        done: impl Fn(&LogManagerStatus) -> bool,
    ) -> Option<LogManagerStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.statuses.get("global")
                && done(status)
            {
                return Some(status.clone());
            }
            if tokio::time::timeout_at(deadline, self.statuses.recv())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    async fn until_queued(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.queued_lines().iter().any(|l| l.contains(line)) {
            assert!(Instant::now() < deadline, "{line} was never queued");
            assert!(
                self.agent.0.try_wait().unwrap().is_none(),
                "the agent ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn numbered(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i:03} end")).collect()
}

/// The fault hits the first flush of lines that wait in memory: each line must still end in
/// the queue, once, and the status must have named the file and the fault meanwhile.
async fn a_queue_file_that_cannot_be_written(point: &str, errno: i32) {
    let mut h = Harness::start(DEVICE, |_| {}).await;
    // Up, and its first status out (the uploader's "no controller" among it): from here on
    // nothing but a flush writes or syncs a file.
    h.until_status("the uploader waits for a controller", |s| {
        !s.last_error.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.fiu.fail_once(h.agent.0.id(), point, errno);
    h.append(numbered("before", 50));

    let failed = h
        .until_status("the queue fault reported", |s| !s.queue_error.is_empty())
        .await;
    let text = failed.queue_error.to_lowercase();
    println!(
        "fiu log-manager {point} errno={errno}: {}",
        failed.queue_error
    );
    assert!(
        text.contains(fault_words(errno)) && text.contains("newlog/devupload"),
        "{}",
        failed.queue_error
    );
    h.until_status("the queue fault cleared", |s| {
        s.queue_error.is_empty() && s.queued_files > 0
    })
    .await;
    h.append(numbered("after", 1));
    h.until_queued("after-000").await;

    let queued = h.queued_lines();
    for line in numbered("before", 50) {
        let copies = queued.iter().filter(|l| l.contains(&line)).count();
        assert_eq!(copies, 1, "{line} queued {copies} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_whose_fsync_fails_is_reported_and_its_lines_written_again() {
    a_queue_file_that_cannot_be_written("posix/io/sync/fsync", EIO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_that_cannot_be_renamed_into_place_is_reported_and_its_lines_written_again() {
    a_queue_file_that_cannot_be_written("posix/io/dir/rename", ENOSPC).await;
}

/// The link files of a controller nobody answers at (a closed port on loopback).
fn unreachable_controller(persist: &Path) {
    let dir = persist.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("server"), "127.0.0.1:9").unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["controller.test".into()]).unwrap();
    std::fs::write(dir.join("root-certificate.pem"), cert.cert.pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_file_that_cannot_be_read_is_reported_and_kept() {
    let mut h = Harness::start(DEVICE, unreachable_controller).await;
    h.append(numbered("kept", 20));
    h.until_queued("kept-019").await;
    let queued: Vec<PathBuf> = std::fs::read_dir(h.queue_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(queued.len(), 1, "{queued:?}");
    h.until_status("the upload waits for the controller", |s| {
        s.last_error.contains("127.0.0.1:9") || s.last_error.contains("connect")
    })
    .await;

    // The uploader opens the file at each try (every 50-100 ms); other opens are rarer (the
    // cursors once a second), so a few arms reach it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reported = loop {
        assert!(Instant::now() < deadline, "no read fault was ever reported");
        h.fiu.fail_once(h.agent.0.id(), "posix/io/oc/open", EIO);
        if let Some(s) = h
            .watch(Duration::from_millis(1500), |s| {
                s.queue_error.contains("cannot read it")
            })
            .await
        {
            break s.queue_error;
        }
        assert!(queued[0].exists(), "the queued file was dropped");
    };
    assert!(queued[0].exists(), "the queued file was dropped");
    println!("fiu log-manager posix/io/oc/open errno={EIO} (queued file): {reported}");
    assert!(
        reported.to_lowercase().contains(fault_words(EIO))
            && reported.contains(&queued[0].display().to_string()),
        "{reported}"
    );
    // Read again at the next try: the error goes, the file stays until the controller has it.
    h.until_status("the read fault cleared", |s| s.queue_error.is_empty())
        .await;
    assert!(queued[0].exists(), "the queued file was dropped");
    let lines = h.queued_lines();
    for line in numbered("kept", 20) {
        assert!(lines.iter().any(|l| l.contains(&line)), "{line} lost");
    }
}

/// The controller takes a file, and the file cannot be removed: said, not sent again (the
/// controller has it once), removed at the next try. Before, the agent ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_file_that_cannot_be_removed_is_reported_and_not_sent_again() {
    let controller = cairn_test_controller::TestController::start()
        .await
        .unwrap();
    let serial = "CAIRN-LOGS-FIU";
    let device = controller.device_uuid(serial).to_string();
    let (server, root_pem) = (
        controller.url().trim_start_matches("https://").to_string(),
        controller.root_pem().to_string(),
    );
    let mut h = Harness::start(&device, |persist| {
        let dir = persist.join("config");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server"), server).unwrap();
        std::fs::write(dir.join("root-certificate.pem"), root_pem).unwrap();
    })
    .await;
    // Up, its first status out; from here on only the removal of a sent file unlinks.
    h.until_status("the agent up", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.fiu.fail_once(h.agent.0.id(), "posix/io/dir/unlink", EIO);
    h.append(numbered("sent", 10));

    let failed = h
        .until_status("the removal fault reported", |s| !s.queue_error.is_empty())
        .await;
    println!(
        "fiu log-manager posix/io/dir/unlink errno={EIO} (a sent file): {}",
        failed.queue_error
    );
    assert!(
        failed.queue_error.contains("not sent again")
            && failed.queue_error.to_lowercase().contains(fault_words(EIO)),
        "{}",
        failed.queue_error
    );
    h.until_status("removed at the next try", |s| {
        s.queue_error.is_empty() && s.queued_files == 0 && s.sent_files == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let uploads = controller.device(serial).map_or(0, |d| d.logs.len());
    assert_eq!(uploads, 1, "the controller got the file {uploads} times");
    assert!(h.agent.0.try_wait().unwrap().is_none(), "the agent ended");
}

//! Runs an app's quiesce hooks on the device for the executor: one task per hook,
//! so a slow hook never holds up the other apps. The machine decides when
//! ([`crate::machine::HookRequest`]); this module only runs the command and says how it went.
//!
//! A hook runs in its own process group with stdin closed and this environment:
//! `CAIRN_APP_UUID`, `CAIRN_APP_NAME`, `CAIRN_SNAPSHOT_ID`, `CAIRN_SNAPSHOT_NAME`,
//! `CAIRN_HOOK_PHASE` (`pre`/`post`), `CAIRN_SNAPSHOT_OUTCOME` (`post` only: `taken`/`failed`)
//! and `CAIRN_APP_VOLUMES` (the app's volume paths, `:`-separated). At its timeout the whole
//! group is SIGKILLed. `CAIRN_HOOK_OWNER` (the persist root) marks the device's hooks, so that
//! a restarted app-manager finds and kills hooks its predecessor left running
//! ([`kill_orphans`]) before it decides what an interrupted hook means. A hook should
//! therefore leave no process of its own behind (start services through the init system). Its output is kept (the last [`OUTPUT_KEPT`] bytes of each stream),
//! logged, and the last lines of a failing hook go into the reason the snapshot reports.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::machine::{HookKind, HookRequest, Input};

/// Bytes of each output stream kept (the tail).
pub const OUTPUT_KEPT: usize = 16 * 1024;
/// Bytes of each stream written to the log.
const OUTPUT_LOGGED: usize = 2 * 1024;
/// Lines of output a failure reason carries.
const REASON_LINES: usize = 3;
/// How long the output is still read after the hook ended (a background child of it may hold
/// its pipes open).
const DRAIN: Duration = Duration::from_secs(2);
/// Names the app-manager (by its persist root) that runs a hook.
const OWNER_VAR: &str = "CAIRN_HOOK_OWNER";

/// A hook that ended, for the executor to feed to the app's machine.
#[derive(Debug, Clone, PartialEq)]
pub struct HookDone {
    pub app: Uuid,
    pub input: Input,
}

/// How a hook ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEnd {
    Exited(ExitStatus),
    TimedOut(u32),
    /// It could not be started (missing command, not executable, empty argv).
    NotRun(String),
}

/// A hook's end and the tails of its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    pub end: HookEnd,
    pub stdout: String,
    pub stderr: String,
}

impl HookRun {
    pub fn succeeded(&self) -> bool {
        matches!(&self.end, HookEnd::Exited(status) if status.success())
    }

    /// Why the hook failed, for the snapshot's status: `pre hook <cmd> failed: exit 3: <last
    /// stderr line>` (or stdout's, when stderr is empty), `… timed out after 5s`, `… failed:
    /// cannot run it: <errno>`. `None` when it succeeded.
    pub fn failure(&self, kind: HookKind, argv: &[String]) -> Option<String> {
        if self.succeeded() {
            return None;
        }
        let command = display_command(argv);
        let hook = kind.name();
        let tail = last_lines(&self.stderr, REASON_LINES)
            .or_else(|| last_lines(&self.stdout, REASON_LINES));
        let with_tail = |head: String| match &tail {
            Some(tail) => format!("{head}: {tail}"),
            None => head,
        };
        Some(match &self.end {
            HookEnd::NotRun(why) => format!("{hook} hook {command} failed: cannot run it: {why}"),
            HookEnd::TimedOut(seconds) => with_tail(format!(
                "{hook} hook {command} timed out after {seconds}s (its process group was killed)"
            )),
            HookEnd::Exited(status) => {
                use std::os::unix::process::ExitStatusExt;
                let how = match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exit {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    (None, None) => status.to_string(),
                };
                with_tail(format!("{hook} hook {command} failed: {how}"))
            }
        })
    }
}

/// A command as a person would type it: arguments with blanks or quotes are single-quoted.
pub fn display_command(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `n` non-blank lines of `text`, joined by ` | `; `None` if there are none.
fn last_lines(text: &str, n: usize) -> Option<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    (!tail.is_empty()).then(|| tail.join(" | "))
}

/// Starts `request` in its own task; its end is sent to `done` as the machine's input.
/// `volumes` are the paths of the app's volumes.
/// `owner` is the persist root (see [`kill_orphans`]); `guest_agent` the VM's guest agent
/// port, used when the request freezes or thaws the guest ([`crate::guest_agent`]): after a
/// successful `pre` command, before the `post` command.
pub fn spawn(
    request: HookRequest,
    volumes: Vec<PathBuf>,
    owner: PathBuf,
    guest_agent: PathBuf,
    done: mpsc::UnboundedSender<HookDone>,
) {
    tokio::spawn(async move {
        let within = Duration::from_secs(u64::from(request.timeout_seconds));
        let (app, snapshot) = (request.app, request.snapshot);
        let mut failures = Vec::new();
        let mut note = None;
        if request.guest && request.kind == HookKind::Post {
            match crate::guest_agent::thaw(&guest_agent, within).await {
                Ok(()) => {
                    tracing::info!(app = %app, snapshot = %snapshot, "guest filesystems thawed")
                }
                Err(e) => {
                    let failure = format!("guest fsfreeze thaw failed: {e}");
                    tracing::warn!(app = %app, snapshot = %snapshot, "{failure}");
                    failures.push(failure);
                }
            }
        }
        if !request.argv.is_empty() {
            let run = run(&request, &volumes, &owner).await;
            let failure = run.failure(request.kind, &request.argv);
            log(&request, &run, failure.as_deref());
            failures.extend(failure);
        }
        if request.guest && request.kind == HookKind::Pre && failures.is_empty() {
            match crate::guest_agent::freeze(&guest_agent, within).await {
                Ok(()) => {
                    tracing::info!(app = %app, snapshot = %snapshot, "guest filesystems frozen")
                }
                Err(e) if request.proceed_without_guest_agent => {
                    let text = format!(
                        "guest fsfreeze failed: {e}; the snapshot is taken without it (proceed_without_guest_agent)"
                    );
                    tracing::warn!(app = %app, snapshot = %snapshot, "{text}");
                    note = Some(text);
                }
                Err(e) => {
                    let failure = format!("guest fsfreeze failed: {e}");
                    tracing::warn!(app = %app, snapshot = %snapshot, "{failure}");
                    failures.push(failure);
                }
            }
        }
        let input = Input::Hook {
            snapshot,
            kind: request.kind,
            counter: request.counter,
            failure: (!failures.is_empty()).then(|| failures.join("; ")),
            note,
        };
        // The executor is gone only when the agent ends.
        let _ = done.send(HookDone { app, input });
    });
}

fn log(request: &HookRequest, run: &HookRun, failure: Option<&str>) {
    let stdout = tail(&run.stdout, OUTPUT_LOGGED);
    let stderr = tail(&run.stderr, OUTPUT_LOGGED);
    let command = display_command(&request.argv);
    match failure {
        None => tracing::info!(
            app = %request.app, snapshot = %request.snapshot, hook = request.kind.name(),
            command = %command, stdout = %stdout, stderr = %stderr, "quiesce hook succeeded"
        ),
        Some(reason) => tracing::warn!(
            app = %request.app, snapshot = %request.snapshot, hook = request.kind.name(),
            command = %command, stdout = %stdout, stderr = %stderr, "{reason}"
        ),
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs one hook to its end or its timeout.
pub async fn run(request: &HookRequest, volumes: &[PathBuf], owner: &Path) -> HookRun {
    let not_run = |why: String| HookRun {
        end: HookEnd::NotRun(why),
        stdout: String::new(),
        stderr: String::new(),
    };
    let Some((program, args)) = request.argv.split_first() else {
        return not_run("the command is empty".into());
    };
    let volumes = std::env::join_paths(volumes)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("CAIRN_APP_UUID", request.app.to_string())
        .env("CAIRN_APP_NAME", &request.app_name)
        .env("CAIRN_SNAPSHOT_ID", request.snapshot.to_string())
        .env("CAIRN_SNAPSHOT_NAME", &request.snapshot_name)
        .env("CAIRN_HOOK_PHASE", request.kind.name())
        .env("CAIRN_APP_VOLUMES", volumes)
        .env(OWNER_VAR, owner)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(outcome) = request.outcome {
        command.env("CAIRN_SNAPSHOT_OUTCOME", outcome.name());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return not_run(format!("{program}: {e}")),
    };
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_tail(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_tail(s)));
    let timeout = Duration::from_secs(u64::from(request.timeout_seconds));
    let end = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => HookEnd::Exited(status),
        Ok(Err(e)) => HookEnd::NotRun(format!("waiting for it: {e}")),
        Err(_) => {
            if let Some(group) = group {
                // The whole group: a shell's children too, which hold the pipes open.
                let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
            }
            let _ = child.kill().await;
            HookEnd::TimedOut(request.timeout_seconds)
        }
    };
    HookRun {
        end,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    }
}

/// SIGKILLs every process of a hook that an earlier app-manager of `owner` (the persist root)
/// started and did not see end: a `pre` hook still running after its snapshot was given up
/// must not freeze anything after the `post` hook thawed it. Blocking (reads `/proc`); run
/// before any hook of this app-manager starts. Returns the pids killed.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn kill_orphans(owner: &Path) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let mut wanted = format!("{OWNER_VAR}=").into_bytes();
    wanted.extend_from_slice(owner.as_os_str().as_bytes());
    let me = std::process::id();
    let mut killed = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid).is_ok_and(|p| p == me) {
            continue;
        }
        // Another user's process, or one that just ended: not ours to kill.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_slice())
            && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

async fn collect(reader: Option<tokio::task::JoinHandle<Vec<u8>>>) -> String {
    let Some(mut reader) = reader else {
        return String::new();
    };
    let bytes = match tokio::time::timeout(DRAIN, &mut reader).await {
        Ok(Ok(bytes)) => bytes,
        // Still open (a background child of the hook holds it): what was read is lost with
        // the task; say so rather than wait.
        Ok(Err(_)) | Err(_) => {
            reader.abort();
            b"(output not collected: the hook's pipes stayed open after it ended)".to_vec()
        }
    };
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads a stream to its end, keeping its last [`OUTPUT_KEPT`] bytes.
async fn read_tail(mut stream: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_KEPT {
                    kept.drain(..kept.len() - OUTPUT_KEPT);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::machine::SnapshotOutcome;

    fn request(kind: HookKind, argv: &[&str], timeout_seconds: u32) -> HookRequest {
        HookRequest {
            app: Uuid::from_u128(1),
            app_name: "sensor".into(),
            snapshot: Uuid::from_u128(2),
            snapshot_name: "before-upgrade".into(),
            kind,
            counter: 7,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_seconds,
            outcome: (kind == HookKind::Post).then_some(SnapshotOutcome::Taken),
            volume_keys: Vec::new(),
            guest: false,
            proceed_without_guest_agent: false,
        }
    }

    #[tokio::test]
    async fn failing_hook_reports_exit_code_and_last_stderr_line() {
        let argv = ["sh", "-c", "echo starting; echo cannot flush >&2; exit 3"];
        let r = request(HookKind::Pre, &argv, 10);
        let run = run(&r, &[], Path::new("/nonexistent")).await;
        let reason = run.failure(r.kind, &r.argv).unwrap();
        assert_eq!(
            reason,
            "pre hook sh -c 'echo starting; echo cannot flush >&2; exit 3' failed: exit 3: cannot flush"
        );
    }

    #[tokio::test]
    async fn hook_sees_its_environment() {
        let argv = [
            "sh",
            "-c",
            "echo $CAIRN_APP_UUID $CAIRN_APP_NAME $CAIRN_SNAPSHOT_ID $CAIRN_SNAPSHOT_NAME $CAIRN_HOOK_PHASE $CAIRN_SNAPSHOT_OUTCOME $CAIRN_APP_VOLUMES",
        ];
        let r = request(HookKind::Post, &argv, 10);
        let run = run(
            &r,
            &[PathBuf::from("/a"), PathBuf::from("/b")],
            Path::new("/nonexistent"),
        )
        .await;
        assert!(run.succeeded(), "{run:?}");
        assert_eq!(
            run.stdout.trim(),
            format!(
                "{} sensor {} before-upgrade post taken /a:/b",
                Uuid::from_u128(1),
                Uuid::from_u128(2)
            )
        );
    }

    #[tokio::test]
    async fn hanging_hook_is_killed_with_its_group_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        // A background child in the same group, which would hold the pipes open.
        let script = format!(
            "sleep 600 & echo $! > {}; echo frozen >&2; wait",
            pidfile.display()
        );
        let r = request(HookKind::Pre, &["sh", "-c", &script], 1);
        let run = run(&r, &[], Path::new("/nonexistent")).await;
        assert_eq!(run.end, HookEnd::TimedOut(1));
        let reason = run.failure(r.kind, &r.argv).unwrap();
        assert!(
            reason.contains("timed out after 1s") && reason.ends_with(": frozen"),
            "{reason}"
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child was killed with the group: a zombie nobody reaps, or gone. The
        // signal is delivered asynchronously; a SIGKILLed process is dead within moments.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z"))
                .unwrap_or(false)
        };
        for _ in 0..100 {
            if !alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!alive(), "the hook's background child {pid} survived");
    }

    #[tokio::test]
    async fn missing_command_is_a_failure_naming_it() {
        let r = request(HookKind::Pre, &["/nonexistent/flush-db"], 10);
        let run = run(&r, &[], Path::new("/nonexistent")).await;
        let reason = run.failure(r.kind, &r.argv).unwrap();
        assert!(
            reason.starts_with("pre hook /nonexistent/flush-db failed: cannot run it: /nonexistent/flush-db: No such file"),
            "{reason}"
        );
    }

    #[test]
    fn hooks_left_by_an_earlier_app_manager_of_the_same_device_are_killed() {
        use std::os::unix::process::ExitStatusExt;
        let owner = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let spawn = |root: &Path| {
            std::process::Command::new("sleep")
                .arg("600")
                .env(OWNER_VAR, root)
                .spawn()
                .unwrap()
        };
        let mut orphan = spawn(owner.path());
        let mut neighbour = spawn(other.path());
        // Between fork and exec a child still shows its parent's environment: wait for exec.
        for child in [&orphan, &neighbour] {
            let environ = format!("/proc/{}/environ", child.id());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !std::fs::read(&environ)
                .unwrap_or_default()
                .windows(OWNER_VAR.len())
                .any(|w| w == OWNER_VAR.as_bytes())
            {
                assert!(std::time::Instant::now() < deadline, "sleep never ran");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let killed = kill_orphans(owner.path());
        assert_eq!(killed, [orphan.id() as i32]);
        assert_eq!(orphan.wait().unwrap().signal(), Some(9));
        assert_eq!(neighbour.try_wait().unwrap(), None, "another device's hook");
        neighbour.kill().unwrap();
        neighbour.wait().unwrap();
    }

    #[test]
    fn output_tail_keeps_whole_characters() {
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
        assert_eq!(
            last_lines("a\n\nb\nc\nd\n", 3).as_deref(),
            Some("b | c | d")
        );
        assert_eq!(last_lines(" \n", 3), None);
    }
}

//! How `cairn up` finds its processes again: its own lock with its pid, one pid record per agent
//! (pid and start time, so a reused pid is never taken for the agent), and the bus's topic
//! locks, whose holder pid names a publisher nobody recorded. Read-outs use the same records to
//! tell a supervised agent from an orphan.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `<run>/cairn-up.lock`: flocked by the living `cairn up`, holding its pid and start time.
pub fn up_lock_path(run: &Path) -> PathBuf {
    run.join("cairn-up.lock")
}

/// `<run>/agents/<agent>.pid`: the agent `cairn up` started last.
pub fn agent_record_path(run: &Path, agent: &str) -> PathBuf {
    run.join("agents").join(format!("{agent}.pid"))
}

/// One process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    /// Clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl ProcessId {
    /// The process `pid` as it is now, if it runs.
    pub fn of(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields count from the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = *fields.first()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let start = fields.get(19)?.parse().ok()?;
        Some(Self { pid, start })
    }

    pub fn me() -> Option<Self> {
        Self::of(std::process::id() as i32)
    }

    /// Whether this very process still runs (not a zombie, not a reused pid).
    pub fn runs(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now.start == self.start)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse().ok()?;
        let start = words.next()?.parse().ok()?;
        Some(Self { pid, start })
    }

    fn line(&self) -> String {
        format!("{} {}\n", self.pid, self.start)
    }

    /// Reads a record written by `record`; None when absent, empty or unreadable.
    pub fn read(file: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(file).ok()?)
    }

    /// Replaces `file` with this process's record (rename: never half written). Blocking.
    #[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
    pub fn record(&self, file: &Path) -> anyhow::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = file.with_extension("pid.tmp");
        std::fs::write(&tmp, self.line()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, file).with_context(|| format!("renaming to {}", file.display()))
    }

    fn signal(&self, signal: Signal) {
        // Checked just before: a pid reused since the record was read is left alone.
        if self.runs() {
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }
}

/// Held while `cairn up` runs; a second `cairn up` on the same run root cannot take it.
pub struct UpLock {
    file: Flock<File>,
}

impl UpLock {
    pub fn take(run: &Path) -> anyhow::Result<Self> {
        let path = up_lock_path(run);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Readable by technicians: the read-outs look at who supervises.
        use std::os::unix::fs::PermissionsExt;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => file,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = match ProcessId::read(&path) {
                    Some(holder) => format!("pid {}", holder.pid),
                    None => "another process".to_string(),
                };
                anyhow::bail!(
                    "another `cairn up` ({holder}) already supervises the device under {}: \
                     stop it first, or give another --root",
                    run.display()
                );
            }
            Err((_, errno)) => {
                return Err(errno).with_context(|| format!("locking {}", path.display()));
            }
        };
        let me = ProcessId::me().context("reading /proc/self/stat")?;
        file.set_len(0)
            .and_then(|()| file.write_all(me.line().as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { file })
    }

    /// A clean stop leaves no supervisor pid behind: agents found later were not orphaned.
    pub fn release(self) {
        let _ = self.file.set_len(0);
    }
}

/// Who supervises the agents under a run root, as a read-out sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervisor {
    /// No `cairn up` recorded (agents started by hand), or the last one stopped cleanly.
    None,
    Alive(i32),
    /// The recorded `cairn up` is gone without stopping: its agents, if any run, are orphans.
    Gone(i32),
}

pub fn supervisor(run: &Path) -> Supervisor {
    match ProcessId::read(&up_lock_path(run)) {
        None => Supervisor::None,
        Some(up) if up.runs() => Supervisor::Alive(up.pid),
        Some(up) => Supervisor::Gone(up.pid),
    }
}

/// The pid written into a topic lock `<run>/<agent>/<Topic>.lock` by its publisher.
pub fn topic_holder(run: &Path, agent: &str, topic: &str) -> Option<i32> {
    let text = std::fs::read_to_string(run.join(agent).join(format!("{topic}.lock"))).ok()?;
    text.trim().parse().ok()
}

/// An agent process that no living `cairn up` started.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub agent: String,
    pub process: ProcessId,
    /// How it was found: its pid record, or the topic lock it holds.
    pub found_by: String,
}

/// Agents of `agents` that run under `run` without this supervisor: recorded by an earlier
/// `cairn up`, or holding a topic lock. Call it with the up lock held (no other supervisor).
pub fn orphans(run: &Path, agents: &[&str]) -> Vec<Orphan> {
    let mut found: Vec<Orphan> = Vec::new();
    let mut add = |orphan: Orphan| {
        if !found.iter().any(|o| o.process == orphan.process) {
            found.push(orphan);
        }
    };
    for agent in agents {
        let record = agent_record_path(run, agent);
        if let Some(process) = ProcessId::read(&record)
            && process.runs()
        {
            add(Orphan {
                agent: agent.to_string(),
                process,
                found_by: format!("recorded in {}", record.display()),
            });
        }
        for (topic, process) in topic_lock_holders(&run.join(agent)) {
            add(Orphan {
                agent: agent.to_string(),
                process,
                found_by: format!("holds the lock of topic {agent}/{topic}"),
            });
        }
    }
    found
}

/// The processes holding the topic locks in an agent's bus directory. Blocking (a walk).
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn topic_lock_holders(dir: &Path) -> Vec<(String, ProcessId)> {
    let mut held = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return held;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "lock") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // A lock we can take is nobody's: let it go at once.
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(free) => drop(free),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let topic = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Some(process) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|pid| pid.trim().parse().ok())
                    .and_then(ProcessId::of)
                {
                    held.push((topic, process));
                }
            }
            Err(_) => {}
        }
    }
    held
}

/// SIGTERM to every orphan, up to `grace` for them to end, then SIGKILL; returns when none
/// runs (or after a further bounded wait for the killed ones).
pub async fn stop_orphans(orphans: &[Orphan], grace: Duration) {
    for orphan in orphans {
        orphan.process.signal(Signal::SIGTERM);
    }
    let running = |orphans: &[Orphan]| orphans.iter().any(|o| o.process.runs());
    let deadline = Instant::now() + grace;
    while running(orphans) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for orphan in orphans.iter().filter(|o| o.process.runs()) {
        eprintln!(
            "cairn up: orphan {} pid {} did not stop within {grace:?}; killing it",
            orphan.agent, orphan.process.pid
        );
        orphan.process.signal(Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(orphans) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! What `/proc` says about a pid: alive (not a zombie), its start time (to tell a reused pid
//! from ours), its command line, its marker. Used for domains this process did not start itself.
//!
//! Every process the domain-manager starts carries a marker in its environment
//! ([`OWNER_VAR`], [`APP_VAR`]): it exists from the process's first instruction on, so a
//! domain-manager killed before it could record the pid still finds its processes again.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A process as identified across a domain-manager restart: pid plus its start time in clock
/// ticks since boot (field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// Names the domain-manager (by its run directory) that started a process.
pub const OWNER_VAR: &str = "CAIRN_DOMAIN_OWNER";
/// Names the app (its UUID) a process was started for.
pub const APP_VAR: &str = "CAIRN_DOMAIN_APP";
/// The restart counter a process was started for, so a re-adopted domain knows its generation
/// even when its `DomainStatus` was not written yet.
pub const RESTART_VAR: &str = "CAIRN_DOMAIN_RESTART_COUNTER";

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    state: char,
    ppid: u32,
    pgid: u32,
    start_time: u64,
}

/// `/proc/<pid>/stat`; `None` when the process does not exist.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 overall (state) is the first here; ppid 4, pgrp 5, starttime 22.
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgid,
        start_time,
    })
}

fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

/// The identity of a live process, `None` if it is gone or a zombie.
pub fn identify(pid: u32) -> Option<ProcessId> {
    let s = stat(pid)?;
    (!is_dead(s.state)).then_some(ProcessId {
        pid,
        start_time: s.start_time,
    })
}

/// A live process carrying the marker of one owner and app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    pub id: ProcessId,
    pub ppid: u32,
    pub pgid: u32,
    /// From [`RESTART_VAR`], when it parses.
    pub restart_counter: Option<u32>,
}

impl Marked {
    pub fn is_group_leader(&self) -> bool {
        self.id.pid == self.pgid
    }
}

/// The value of `var` in a raw `/proc/<pid>/environ`.
fn env_value<'a>(environ: &'a [u8], var: &str) -> Option<&'a [u8]> {
    environ.split(|b| *b == 0).find_map(|entry| {
        entry
            .strip_prefix(var.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// The marker values that [`scan`] looks for: the canonical run directory names the owner.
pub fn marker(run_dir: &Path, app: &str) -> [(&'static str, String); 2] {
    let owner = std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    [
        (OWNER_VAR, owner.to_string_lossy().into_owned()),
        (APP_VAR, app.to_string()),
    ]
}

/// Every live process marked by the domain-manager of `run_dir`, with the app it was marked
/// for (the app's own children inherit the marker). Blocking: walks `/proc`.
pub fn scan(run_dir: &Path) -> Vec<(String, Marked)> {
    let [(_, owner), _] = marker(run_dir, "");
    let me = std::process::id();
    pids()
        .filter(|pid| *pid != me)
        .filter_map(|pid| marked_as(pid, &owner))
        .collect()
}

/// The pids in `/proc`. Blocking.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
}

/// `pid` with the app it was marked for, if it is alive and carries `owner`'s marker.
fn marked_as(pid: u32, owner: &str) -> Option<(String, Marked)> {
    // Another user's process, or one that just ended: not ours.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    if env_value(&environ, OWNER_VAR) != Some(owner.as_bytes()) {
        return None;
    }
    let app = env_value(&environ, APP_VAR)?;
    let s = stat(pid).filter(|s| !is_dead(s.state))?;
    let restart_counter = env_value(&environ, RESTART_VAR)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok());
    let marked = Marked {
        id: ProcessId {
            pid,
            start_time: s.start_time,
        },
        ppid: s.ppid,
        pgid: s.pgid,
        restart_counter,
    };
    Some((String::from_utf8_lossy(app).into_owned(), marked))
}

/// The restart counter a live process was marked with.
pub fn restart_counter(pid: u32) -> Option<u32> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    std::str::from_utf8(env_value(&environ, RESTART_VAR)?)
        .ok()?
        .parse()
        .ok()
}

/// The processes among `marked` that the domain-manager started itself: group leaders whose
/// parent is not itself a process of the app (a child of the app that made its own group is
/// part of the app, not a second copy of it). Oldest first.
pub fn leaders(marked: &[Marked]) -> Vec<Marked> {
    let mut leaders: Vec<Marked> = marked
        .iter()
        .filter(|m| m.is_group_leader() && !marked.iter().any(|p| p.id.pid == m.ppid))
        .copied()
        .collect();
    leaders.sort_by_key(|m| (m.id.start_time, m.id.pid));
    leaders
}

/// Whether this exact process (same pid, same start time) still runs; a zombie does not.
pub fn is_running(id: ProcessId) -> bool {
    identify(id.pid) == Some(id)
}

/// The command line of a live process.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// What one walk of `/proc` found: the processes marked by this domain-manager's owner
/// ([`scan`]) and every live qemu with its command line.
#[derive(Debug, Default)]
pub struct Walk {
    pub marked: Vec<(String, Marked)>,
    qemus: Vec<(ProcessId, Vec<String>)>,
}

impl Walk {
    /// One pass over `/proc` for both questions a start asks. Blocking: walks `/proc`.
    fn take(run_dir: &Path) -> Self {
        let [(_, owner), _] = marker(run_dir, "");
        let me = std::process::id();
        let mut walk = Self::default();
        for pid in pids().filter(|pid| *pid != me) {
            if let Some(marked) = marked_as(pid, &owner) {
                walk.marked.push(marked);
            }
            // A command line is read only for what may be a qemu: `comm`, the executable's
            // name cut at 15 bytes, says so without reading the process's memory.
            let maybe_qemu = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.contains("qemu") || comm.trim_end().len() >= 15);
            if maybe_qemu
                && let Some(args) = cmdline(pid)
                && args.first().is_some_and(|a| a.contains("qemu-system"))
                && let Some(id) = identify(pid)
            {
                walk.qemus.push((id, args));
            }
        }
        walk
    }

    /// Every live process marked for `app` (its own children inherit the marker).
    pub fn marked_for(&self, app: &str) -> Vec<Marked> {
        self.marked
            .iter()
            .filter(|(a, _)| a == app)
            .map(|(_, m)| *m)
            .collect()
    }

    /// Every live qemu serving `qmp_socket` (the socket path names the app, so a reused pid
    /// cannot match by accident), oldest first: for a qemu whose pidfile is not written yet.
    pub fn qemus_serving(&self, qmp_socket: &Path) -> Vec<ProcessId> {
        let socket = qmp_socket.to_string_lossy();
        let mut found: Vec<ProcessId> = self
            .qemus
            .iter()
            .filter(|(_, args)| args.iter().any(|a| a.contains(socket.as_ref())))
            .map(|(id, _)| *id)
            .collect();
        found.sort_by_key(|id| (id.start_time, id.pid));
        found
    }
}

/// Walks of `/proc` shared by the domain tasks. Every start first looks for a copy of its app
/// already running; 1,000 apps started at once made 2,000 walks over 1,000 processes each
/// (minutes). A task asking now gets a walk begun after it asked, so it sees whatever ran at
/// that moment, exactly as a walk of its own; the tasks that asked while one walk ran share
/// the next.
pub struct Census {
    run_dir: std::path::PathBuf,
    latest: tokio::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Walk>)>>,
}

impl Census {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            latest: tokio::sync::Mutex::new(None),
        }
    }

    /// A walk of `/proc` begun at or after `asked`.
    pub async fn since(&self, asked: std::time::Instant) -> std::sync::Arc<Walk> {
        let mut latest = self.latest.lock().await;
        if let Some((began, walk)) = latest.as_ref()
            && *began >= asked
        {
            return walk.clone();
        }
        let began = std::time::Instant::now();
        let run_dir = self.run_dir.clone();
        let walk = std::sync::Arc::new(
            tokio::task::spawn_blocking(move || Walk::take(&run_dir))
                .await
                .unwrap_or_default(),
        );
        *latest = Some((began, walk.clone()));
        walk
    }
}

/// Waits until the process is gone, polling `/proc` (it is not our child, so it cannot be
/// waited for: a zombie left for its reaper counts as gone).
pub async fn wait_gone(id: ProcessId, poll: Duration) {
    while is_running(id) {
        tokio::time::sleep(poll).await;
    }
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(raw), signal);
    }
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(raw), signal);
    }
}

/// "exit status N" or "killed by signal N".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_identified_and_running() {
        let id = identify(std::process::id()).expect("own /proc entry");
        assert!(is_running(id));
        assert!(!is_running(ProcessId {
            start_time: id.start_time + 1,
            ..id
        }));
    }

    #[test]
    fn env_value_matches_whole_names_only() {
        let environ = b"CAIRN_DOMAIN_APPX=no\0CAIRN_DOMAIN_APP=a1\0OTHER=1\0";
        assert_eq!(env_value(environ, APP_VAR), Some(&b"a1"[..]));
        assert_eq!(env_value(environ, "MISSING"), None);
    }

    #[test]
    fn a_child_that_made_its_own_group_is_not_a_second_leader() {
        let m = |pid, ppid, pgid, start_time| Marked {
            id: ProcessId { pid, start_time },
            ppid,
            pgid,
            restart_counter: None,
        };
        // 10: the app (leader); 11: its child in its group; 12: its child in a group of its
        // own; 20: a second copy started by another domain-manager run, younger.
        let all = [
            m(20, 1, 20, 50),
            m(10, 1, 10, 5),
            m(11, 10, 10, 6),
            m(12, 10, 12, 7),
        ];
        let found: Vec<u32> = leaders(&all).iter().map(|l| l.id.pid).collect();
        assert_eq!(found, vec![10, 20]);
    }
}

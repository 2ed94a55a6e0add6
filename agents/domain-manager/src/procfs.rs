//! What `/proc` says about a pid: alive (not a zombie), its start time (to tell a reused pid
//! from ours), its command line. Used for domains this process did not start itself.

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

/// `(state, start_time)` from `/proc/<pid>/stat`; `None` when the process does not exist.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is index 19 after the name (fields 3.. start at index 0).
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}

/// The identity of a live process, `None` if it is gone or a zombie.
pub fn identify(pid: u32) -> Option<ProcessId> {
    match stat(pid)? {
        ('Z' | 'X' | 'x', _) => None,
        (_, start_time) => Some(ProcessId { pid, start_time }),
    }
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

/// Whether `pid` is a qemu serving QMP on `qmp_socket` (the socket path names the app, so a
/// reused pid cannot match by accident).
pub fn is_our_qemu(pid: u32, qmp_socket: &Path) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let socket = qmp_socket.to_string_lossy();
    args.first().is_some_and(|a| a.contains("qemu-system"))
        && args.iter().any(|a| a.contains(socket.as_ref()))
}

/// A live qemu serving `qmp_socket`, found by scanning `/proc`: for a qemu whose pidfile is not
/// written yet (the domain-manager died right after starting it).
pub fn find_our_qemu(qmp_socket: &Path) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .find(|pid| is_our_qemu(*pid, qmp_socket) && identify(*pid).is_some())
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
}

//! A device started the way a user starts one: `cairn up --root <tmp>` as a child process, with
//! the real agents next to the `cairn` binary; read-outs run as processes too.

#![allow(dead_code)] // each test file uses a part
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const DEMO_APP: &str = "d3e0c0de-0000-4000-8000-00000000a001";
pub const DEMO_SNAPSHOT: &str = "d3e0c0de-0000-4000-8000-00000000c001";
pub const AGENTS: [&str; 8] = [
    "config-agent",
    "app-manager",
    "volume-manager",
    "domain-manager",
    "downloader",
    "log-manager",
    "baseos-manager",
    "edgeview",
];

pub fn cairn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cairn"))
}

/// Runs `cairn --root ROOT ARGS…` to completion: (exit code, stdout, stderr).
pub fn cairn(root: &Path, args: &[&str]) -> (i32, String, String) {
    output(Command::new(cairn_bin()).arg("--root").arg(root).args(args))
}

pub fn output(command: &mut Command) -> (i32, String, String) {
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cairn up` running on a temporary root; its stderr (the agents' prefixed logs) goes to
/// `<root>/up.log`.
pub struct Up {
    pub root: tempfile::TempDir,
    child: Option<Child>,
}

impl Up {
    pub fn start(args: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), &cairn_bin(), args)
    }

    pub fn start_in(root: tempfile::TempDir, cairn: &Path, args: &[&str]) -> Self {
        Self::start_with_env(root, cairn, args, &[])
    }

    /// As `start_in`, with more environment for `cairn up` (and so its agents).
    pub fn start_with_env(
        root: tempfile::TempDir,
        cairn: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(root.path().join("up.log")).unwrap();
        let child = Command::new(cairn)
            .arg("--root")
            .arg(root.path())
            .arg("up")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            root,
            child: Some(child),
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("up.log")).unwrap_or_default()
    }

    pub fn cairn(&self, args: &[&str]) -> (i32, String, String) {
        cairn(self.path(), args)
    }

    /// Polls `cairn status --json` until `done` holds; panics with the last status and the
    /// supervisor's log otherwise.
    pub fn wait_status(
        &self,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let (code, out, err) = self.cairn(&["status", "--json"]);
            let last = if code == 0 {
                let view: serde_json::Value = serde_json::from_str(&out).unwrap();
                if done(&view) {
                    return view;
                }
                out
            } else {
                format!("exit {code}: {err}")
            };
            assert!(
                Instant::now() < deadline,
                "status not as expected within {within:?}; last: {last}\n--- cairn up log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The agents `cairn up` runs now: agent name → pid (children of `cairn up`).
    pub fn agent_pids(&self) -> BTreeMap<String, i32> {
        children_of(self.pid())
            .into_iter()
            .filter_map(|pid| {
                let exe = cmdline(pid).into_iter().next()?;
                let agent = AGENTS
                    .iter()
                    .find(|a| exe.ends_with(&format!("cairn-{a}")))?;
                Some((agent.to_string(), pid))
            })
            .collect()
    }

    /// Sends `signal` to `cairn up` and waits for it to end.
    pub fn stop(&mut self, signal: Signal, within: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "cairn up did not stop within {within:?} after {signal}\n--- log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Agents and apps orphaned by a failed test carry the root in their environment.
        kill_processes_mentioning(self.root.path());
    }
}

/// Whether `pid` still runs (a zombie nobody reaped does not).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn children_of(parent: i32) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// Living processes whose command line or environment mention `root`.
pub fn processes_mentioning(root: &Path) -> Vec<i32> {
    let marker = root.to_string_lossy().into_owned().into_bytes();
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|file| {
                std::fs::read(format!("/proc/{pid}/{file}"))
                    .unwrap_or_default()
                    .windows(marker.len())
                    .any(|w| w == marker.as_slice())
            })
        })
        .collect()
}

fn kill_processes_mentioning(root: &Path) {
    for pid in processes_mentioning(root) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

pub fn app<'a>(view: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    view["apps"]
        .as_array()?
        .iter()
        .find(|a| a["DisplayName"] == name)
}

/// EVE's SwState RUNNING, by name as the read-outs print it.
pub const RUNNING: &str = "RUNNING";

pub fn agent_state<'a>(view: &'a serde_json::Value, agent: &str) -> &'a str {
    view["agents"]
        .as_array()
        .and_then(|agents| agents.iter().find(|a| a["agent"] == agent))
        .and_then(|a| a["state"].as_str())
        .unwrap_or("")
}

/// The demo app runs and its immediate snapshot is available.
pub fn demo_ready(view: &serde_json::Value) -> bool {
    app(view, "demo-logger").is_some_and(|a| {
        a["State"] == RUNNING
            && a["SnapStatus"]["AvailableSnapshots"]
                .as_array()
                .is_some_and(|s| {
                    s.iter()
                        .any(|s| s["Snapshot"]["SnapshotID"] == DEMO_SNAPSHOT)
                })
    })
}

/// Lines of a child's stream, read by a thread, so a test can wait with a timeout.
pub fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line satisfying `wanted`; returns it and every line seen before it.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<(String, Vec<String>), Vec<String>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if wanted(&line) => return Ok((line, seen)),
            Ok(line) => seen.push(line),
            Err(_) => return Err(seen),
        }
    }
}

pub const NORTH_APP: &str = "d8b50000-0000-4000-8000-00000000a001";
pub const SOUTH_APP: &str = "d8b50000-0000-4000-8000-00000000a002";
pub const NORTH_VOLUME: &str = "d8b50000-0000-4000-8000-00000000b001";
pub const SOUTH_VOLUME: &str = "d8b50000-0000-4000-8000-00000000b002";

/// Two process apps, one per tenant (north: pump, south: valve), each on its own directory volume.
pub fn two_tenants_config() -> String {
    let app = |uuid: &str, name: &str, tenant: &str, volume: &str| {
        format!(
            r#"{{"uuid": "{uuid}", "version": "1", "display_name": "{name}", "tenant": "{tenant}",
                "volume_refs": [{{"uuid": "{volume}"}}],
                "domain": {{"kind": "process", "command": "/bin/sh", "args": ["-c", "while :; do sleep 1; done"]}}}}"#
        )
    };
    let volumes = [NORTH_VOLUME, SOUTH_VOLUME];
    format!(
        r#"{{"apps": [{}, {}],
            "volumes": [{{"uuid": "{}", "format": "dir"}}, {{"uuid": "{}", "format": "dir"}}]}}"#,
        app(NORTH_APP, "pump", "north", volumes[0]),
        app(SOUTH_APP, "valve", "south", volumes[1]),
        volumes[0],
        volumes[1]
    )
}

/// A local config with one process app on a directory volume, with the given snapshots.
pub fn process_app_config(app: &str, name: &str, version: &str, snapshots: &[&str]) -> String {
    let snapshots: Vec<String> = snapshots
        .iter()
        .map(|id| format!(r#"{{ "id": "{id}", "type": "immediate" }}"#))
        .collect();
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{app}", "version": "{version}", "display_name": "{name}",
    "volume_refs": [{{ "uuid": "0000000b-0000-4000-8000-000000000001", "mount_dir": "/data" }}],
    "snapshot": {{ "max_snapshots": 4, "snapshots": [{}] }},
    "domain": {{ "kind": "process", "command": "/bin/sh",
                 "args": ["-c", "while :; do date >> \"$CAIRN_VOLUME_0/beat\"; sleep 1; done"] }}
  }}],
  "volumes": [{{ "uuid": "0000000b-0000-4000-8000-000000000001", "display_name": "data",
                 "format": "dir", "max_size_bytes": 1048576 }}]
}}"#,
        snapshots.join(", ")
    )
}

/// Replaces `file` atomically (the config-agent polls it).
pub fn write_atomically(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Waits for `child` to end; kills it and panics if it does not within `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not end within {within:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every living agent process of the device under `root`, found by a /proc scan (executable
/// `cairn-<agent>`, `root` in its environment): (agent, pid), whoever started it. An agent's
/// child between fork and exec looks like the agent: it is not counted.
pub fn agent_processes(root: &Path) -> Vec<(String, i32)> {
    let found: Vec<(String, i32)> = processes_mentioning(root)
        .into_iter()
        .filter_map(|pid| {
            let exe = cmdline(pid).into_iter().next()?;
            let agent = AGENTS
                .iter()
                .find(|a| exe.ends_with(&format!("cairn-{a}")))?;
            Some((agent.to_string(), pid))
        })
        .collect();
    let pids: Vec<i32> = found.iter().map(|(_, pid)| *pid).collect();
    let mut found: Vec<(String, i32)> = found
        .into_iter()
        .filter(|(_, pid)| parent_of(*pid).is_none_or(|p| !pids.contains(&p)))
        .collect();
    found.sort();
    found
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Waits until none of `pids` runs; panics naming those that still do.
pub fn wait_gone(pids: &[i32], within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {left:?} still run after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent binary next to `cairn`.
pub fn agent_bin(agent: &str) -> PathBuf {
    cairn_bin().with_file_name(format!("cairn-{agent}"))
}

/// The app processes of the device under `root`: those the domain-manager gave an app's
/// environment (`CAIRN_VOLUME_<n>`, `CAIRN_DOMAIN_APP`), not their own children such as the
/// demo's `sleep`, nor the agents' tools (`rsync`, `qemu-img`).
pub fn app_processes(root: &Path) -> Vec<i32> {
    let all: Vec<i32> = processes_mentioning(root)
        .into_iter()
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|b| *b == 0).any(|var| {
                var.starts_with(b"CAIRN_VOLUME_") || var.starts_with(b"CAIRN_DOMAIN_APP=")
            })
        })
        .collect();
    all.iter()
        .copied()
        .filter(|pid| parent_of(*pid).is_none_or(|p| !all.contains(&p)))
        .collect()
}

/// A free TCP port on `ip` (for `cairn up --http`).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 exchange: (status, head, body). `extra` are more header lines.
pub fn http(port: u16, method: &str, path: &str, extra: &[String]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: device\r\nConnection: close\r\n");
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    // A server that refuses early may close while we still write: its answer counts.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

pub fn get(port: u16, path: &str) -> (u16, String, String) {
    http(port, "GET", path, &[])
}

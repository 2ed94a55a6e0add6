//! EVE's EdgeView commands (`cmdOpt`, `edge-view.go`) and the read-only subset Cairn answers.
//! A command is one JSON object; its category is the first non-empty of `network`, `pubsub`,
//! `system` and `logopt` (EVE `parserAndRun`). The reply is plain text, as EVE's commands print
//! it (titles in the same ANSI colours), sent in envelopes of at most [`CHUNK`] bytes and ended
//! by `+++Done+++` (see `session`).
//!
//! Answered: `system` `app`, `volume`, `download`, `configitem`, `newlog`, `lastreboot`
//! (comma-separated lists as EVE takes them), `pub/<EVE agent>` for the Cairn agent doing that
//! agent's job (the topics as JSON), and `log/<regex>` over the agents' live logs. Not offered,
//! said by name: network probes and TCP tunnels, file copy and reading (`cp/`, `tar/`, `cat/`,
//! `ls/`), process and kernel read-outs, tech-support collection: Cairn's EdgeView is read-only
//! and shows what the agents publish, nothing of the host beyond that.

use std::fmt::Write as _;
use std::path::PathBuf;

use cairn_types::{
    AppInstanceStatus, ConfigItemValueMap, ContentTreeStatus, DeviceStatus, EdgeviewStatus,
    LogManagerStatus, Topic, VolumeStatus,
};
use serde::{Deserialize, Serialize};

/// Replies go out in pieces of at most this many bytes (EVE: half the pipe buffer, 32 KiB).
pub const CHUNK: usize = 32 * 1024;
/// Log search prints at most this many matching lines, newest files first.
const MAX_LOG_LINES: usize = 2_000;

/// EVE's `cmdOpt`: the command a client sends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CmdOpt {
    pub version: String,
    #[serde(rename = "clientEPAddr")]
    pub client_ep_addr: String,
    pub network: String,
    pub system: String,
    pub pubsub: String,
    pub logopt: String,
    pub timerange: String,
    #[serde(rename = "isJSON")]
    pub is_json: bool,
    pub extraline: i64,
    pub logtype: String,
    pub userinfo: String,
    #[serde(rename = "appUUID", skip_serializing_if = "String::is_empty")]
    pub app_uuid: String,
}

impl CmdOpt {
    /// The command as EVE logs it (`getCMDString`).
    pub fn describe(&self) -> String {
        if !self.network.is_empty() {
            self.network.clone()
        } else if !self.system.is_empty() {
            self.system.clone()
        } else if !self.pubsub.is_empty() {
            format!("pub/{}", self.pubsub)
        } else if !self.logopt.is_empty() {
            format!("log/{}", self.logopt)
        } else {
            String::new()
        }
    }
}

/// EVE's policy names (`policy.go`): the texts the client prints after
/// "cmd policy check failed: ".
pub const DEV_POLICY_ERR: &str = "EVE policy not allow";

/// What a command may do under the token's policies: `Ok(())` counts as a device command
/// (EVE's `CmdCountDev`); `Err` is the text sent back.
pub fn check_policy(cmd: &CmdOpt, dev_allowed: bool) -> Result<(), String> {
    if cmd.network.starts_with("tcp/") {
        return Err(
            "Cairn's EdgeView is read-only: TCP tunnels (tcp/) are not offered".to_string(),
        );
    }
    if cmd.describe().is_empty() {
        return Err("no command given".to_string());
    }
    if !dev_allowed {
        return Err(DEV_POLICY_ERR.to_string());
    }
    Ok(())
}

/// The bus tables a command reads.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub device: Option<DeviceStatus>,
    pub items: Option<ConfigItemValueMap>,
    pub apps: Vec<AppInstanceStatus>,
    pub volumes: Vec<VolumeStatus>,
    pub content_trees: Vec<ContentTreeStatus>,
    pub logs: Option<LogManagerStatus>,
    pub edgeview: Option<EdgeviewStatus>,
    /// `<run>/logs`: the agents' log files `cairn up` writes.
    pub logs_dir: PathBuf,
}

const PURPLE: &str = "\x1b[1;95m";
const CYAN: &str = "\x1b[1;36m";
const BLUE: &str = "\x1b[1;34m";
const RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// EVE's `printColor`: the text in colour, then a newline.
fn color(out: &mut String, text: &str, code: &str) {
    let _ = writeln!(out, "{code}{text}{RESET}");
}

/// The reply text for `cmd` (already allowed by [`check_policy`]). Reads log files: blocking.
pub fn answer(cmd: &CmdOpt, view: &View) -> String {
    let mut out = String::new();
    if !cmd.network.is_empty() {
        let _ = writeln!(
            out,
            "Cairn's EdgeView does not offer network commands ({}): it is read-only and shows what the agents publish",
            cmd.network
        );
    } else if !cmd.pubsub.is_empty() {
        pubsub(&mut out, &cmd.pubsub, view);
    } else if !cmd.system.is_empty() {
        for opt in cmd.system.split(',') {
            color(&mut out, &format!("\n === System: <{opt}> ===\n\n"), PURPLE);
            system(&mut out, opt, view);
        }
    } else if !cmd.logopt.is_empty() {
        log_search(&mut out, cmd, view);
    }
    out
}

fn system(out: &mut String, opt: &str, view: &View) {
    match opt {
        "app" => apps(out, view),
        "volume" => volumes(out, view),
        "download" => downloads(out, view),
        "configitem" => {
            if let Some(items) = &view.items {
                for (key, value) in &items.items {
                    let _ = writeln!(out, " {key}: {value}");
                }
            }
        }
        "newlog" => match &view.logs {
            Some(logs) => {
                let _ = writeln!(
                    out,
                    " queued files {}, bytes {}; sent {}; dropped {}; set aside {}; last upload {}; last error {:?}; queue error {:?}",
                    logs.queued_files,
                    logs.queued_bytes,
                    logs.sent_files,
                    logs.dropped_files,
                    logs.set_aside_files,
                    when(logs.last_upload),
                    logs.last_error,
                    logs.queue_error
                );
            }
            None => out.push_str(" the log-manager publishes no status\n"),
        },
        "lastreboot" => match &view.device {
            Some(device) => {
                color(out, "device", CYAN);
                let _ = writeln!(
                    out,
                    " uuid {}, config agent started {}, last contact {}",
                    device.device_uuid,
                    when(device.agent_started),
                    when(device.last_contact)
                );
            }
            None => out.push_str(" the config-agent publishes no status\n"),
        },
        other => {
            let _ = writeln!(
                out,
                "opt {other}: not offered by Cairn's EdgeView (read-only: app, volume, download, configitem, newlog, lastreboot, pub/, log/)"
            );
        }
    }
}

fn when(time: Option<chrono::DateTime<chrono::Utc>>) -> String {
    time.map_or_else(|| "never".to_string(), |t| t.to_rfc3339())
}

fn apps(out: &mut String, view: &View) {
    let mut apps: Vec<&AppInstanceStatus> = view.apps.iter().collect();
    apps.sort_by(|a, b| a.display_name.cmp(&b.display_name));
    for app in apps {
        color(
            out,
            &format!(
                "\n == app: {}, state: {}\n",
                app.display_name,
                app.state.name()
            ),
            BLUE,
        );
        let _ = writeln!(
            out,
            " - app uuid {}, version {}",
            app.uuid_and_version.uuid, app.uuid_and_version.version
        );
        let _ = writeln!(
            out,
            " - activated {}, boot time {}, restarts {}",
            app.activated,
            when(app.boot_time),
            app.restarts
        );
        let snaps = &app.snap_status;
        let _ = writeln!(
            out,
            " - snapshots: {} available (max {}), active {:?}, rollback in progress {}",
            snaps.available_snapshots.len(),
            snaps.max_snapshots,
            snaps.active_snapshot,
            snaps.rollback_in_progress
        );
        for snap in &snaps.available_snapshots {
            let _ = writeln!(
                out,
                "   snapshot {} created {}",
                snap.snapshot.snapshot_id,
                when(snap.time_created)
            );
        }
        if !app.error.error.is_empty() {
            color(out, &format!(" - error: {}", app.error.error), RED);
        }
    }
}

fn volumes(out: &mut String, view: &View) {
    let mut volumes: Vec<&VolumeStatus> = view.volumes.iter().collect();
    volumes.sort_by(|a, b| a.display_name.cmp(&b.display_name));
    for volume in volumes {
        color(out, &format!("\n - volume {}", volume.display_name), CYAN);
        let _ = writeln!(
            out,
            "   ID {}, generation {}, state {:?}, format {:?}, backend {:?}",
            volume.volume_id,
            volume.generation_counter,
            volume.state,
            volume.format,
            volume.backend
        );
        let _ = writeln!(
            out,
            "   size {} of max {} bytes",
            volume.current_size, volume.max_vol_size
        );
        if !volume.error.error.is_empty() {
            color(out, &format!("   error: {}", volume.error.error), RED);
        }
    }
}

fn downloads(out: &mut String, view: &View) {
    for tree in &view.content_trees {
        let _ = writeln!(
            out,
            " - content tree: {}",
            serde_json::to_string(&tree.readout_json().unwrap_or_default()).unwrap_or_default()
        );
    }
}

/// EVE's agent names (the client accepts only these after `pub/`) and the Cairn agent doing
/// each one's job.
fn pubsub(out: &mut String, agents: &str, view: &View) {
    for agent in agents.split(',') {
        color(out, &format!("\n === Pub/Sub: <{agent}> ===\n"), PURPLE);
        let values: Vec<(&str, serde_json::Value)> = match agent {
            "zedmanager" => json_all(AppInstanceStatus::NAME, &view.apps),
            "volumemgr" => json_all(VolumeStatus::NAME, &view.volumes),
            "downloader" => json_all(ContentTreeStatus::NAME, &view.content_trees),
            "zedagent" | "zedclient" => {
                let mut all = json_all(DeviceStatus::NAME, view.device.as_slice());
                all.extend(json_all(ConfigItemValueMap::NAME, view.items.as_slice()));
                all
            }
            "newlogd" | "loguploader" => json_all(LogManagerStatus::NAME, view.logs.as_slice()),
            "edgeview" => json_all(EdgeviewStatus::NAME, view.edgeview.as_slice()),
            other => {
                let _ = writeln!(
                    out,
                    " {other}: no Cairn agent publishes this (zedmanager, volumemgr, downloader, zedagent, newlogd, edgeview do)"
                );
                continue;
            }
        };
        for (topic, value) in values {
            color(out, &format!(" - {topic}"), CYAN);
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
    }
}

fn json_all<'a, T: Topic>(topic: &'a str, values: &[T]) -> Vec<(&'a str, serde_json::Value)> {
    values
        .iter()
        .map(|v| (topic, v.readout_json().unwrap_or_default()))
        .collect()
}

/// `log/<pattern>`: lines of the agents' live logs matching the pattern (EVE: `grep -E`, with
/// the same allowed characters), per file, newest file first. `-line N` adds no context lines
/// here and `-time` is not applied: the live logs are the recent ones.
fn log_search(out: &mut String, cmd: &CmdOpt, view: &View) {
    let pattern = &cmd.logopt;
    // EVE's `rePattern`: what a search string may contain.
    if !pattern
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " =-_.:,/@".contains(c))
    {
        out.push_str("log search contains invalid string\n");
        return;
    }
    #[allow(clippy::disallowed_methods)] // answer() runs on the blocking pool
    let entries = std::fs::read_dir(&view.logs_dir);
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        // Cairn's agents are "dev"; apps' console output is the log-manager's.
        .filter(|_| cmd.logtype != "app")
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut printed = 0;
    for (_, path) in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let matches: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(pattern.as_str()))
            .collect();
        if matches.is_empty() {
            continue;
        }
        color(out, &format!("\n {}, -- live --\n", path.display()), RED);
        for line in matches {
            if printed == MAX_LOG_LINES {
                let _ = writeln!(
                    out,
                    "... more than {MAX_LOG_LINES} lines match; narrow the pattern"
                );
                return;
            }
            let _ = writeln!(out, "{line}");
            printed += 1;
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eve_client_command_parses() {
        // What EVE's client marshals for `edge-view-query app`.
        let sent = r#"{"version":"0.8.8","clientEPAddr":"127.0.0.1:5555","network":"","system":"app","pubsub":"","logopt":"","timerange":"","isJSON":false,"extraline":0,"logtype":"","userinfo":"tech"}"#;
        let cmd: CmdOpt = serde_json::from_str(sent).unwrap();
        assert_eq!(cmd.system, "app");
        assert_eq!(cmd.describe(), "app");
        assert_eq!(check_policy(&cmd, true), Ok(()));
        assert_eq!(check_policy(&cmd, false), Err(DEV_POLICY_ERR.to_string()));
        let tcp = CmdOpt {
            network: "tcp/localhost:22".into(),
            ..Default::default()
        };
        assert!(check_policy(&tcp, true).unwrap_err().contains("read-only"));
    }
}

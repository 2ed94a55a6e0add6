//! One log line as EVE's `logs.LogEntry` in the JSON newlogd writes (Go's `json.Marshal` of the
//! generated struct: lower-case field names, empty fields left out, the timestamp as
//! `{"seconds", "nanos"}`), and how an agent's tracing line or an app's console line becomes one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longer lines are cut (and say so): a gzip file must hold at least one entry.
pub const MAX_CONTENT: usize = 16 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nanos: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub severity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    #[serde(default)]
    pub msgid: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filename: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub function: String,
}

/// EVE's `LogBundle` fields newlogd puts, as JSON, in a device log file's gzip Comment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMeta {
    #[serde(rename = "devID")]
    pub dev_id: String,
    pub image: String,
    #[serde(rename = "eveVersion")]
    pub eve_version: String,
}

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn cut(mut content: String) -> String {
    if content.len() > MAX_CONTENT {
        let mut end = MAX_CONTENT;
        while !content.is_char_boundary(end) {
            end -= 1;
        }
        content.truncate(end);
        content.push_str(" [cut: longer than 16 KiB]");
    }
    content
}

/// An agent's stderr line as `tracing_subscriber::fmt` writes it without colours
/// (`2026-12-07T06:33:32.123456Z  INFO cairn_config_agent::link: text k=v`): the time, level and
/// module are taken from it; any other line (a panic, a supervisor's note) is kept whole, at
/// INFO, stamped `now`.
pub fn from_agent_line(agent: &str, line: &str, now: DateTime<Utc>) -> LogEntry {
    let mut entry = LogEntry {
        severity: "info".into(),
        source: agent.into(),
        content: cut(line.to_string()),
        timestamp: Some(timestamp(now)),
        ..LogEntry::default()
    };
    let mut words = line.splitn(2, ' ');
    let (Some(time), Some(rest)) = (words.next(), words.next()) else {
        return entry;
    };
    let Ok(at) = DateTime::parse_from_rfc3339(time) else {
        return entry;
    };
    let rest = rest.trim_start();
    let Some((level, rest)) = rest.split_once(' ') else {
        return entry;
    };
    let severity = match level {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARN" => "warning",
        "ERROR" => "error",
        _ => return entry,
    };
    entry.severity = severity.into();
    entry.timestamp = Some(timestamp(at.with_timezone(&Utc)));
    match rest.split_once(": ") {
        // The module path stands in for EVE's file name (no file:line in tracing's default).
        Some((module, text)) if !module.contains(' ') => {
            entry.filename = module.to_string();
            entry.content = cut(text.to_string());
        }
        _ => entry.content = cut(rest.to_string()),
    }
    entry
}

/// A line of an app's console (`console.log`, a VM's serial port) or output (`app.log`).
pub fn from_app_line(stream: &str, line: &str, now: DateTime<Utc>) -> LogEntry {
    LogEntry {
        severity: "info".into(),
        source: stream.into(),
        content: cut(line.to_string()),
        timestamp: Some(timestamp(now)),
        ..LogEntry::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracing_line_gives_its_time_level_and_module() {
        let now = Utc::now();
        let line = "2026-12-07T06:33:32.123456Z  WARN cairn_config_agent::link: controller unreachable error=\"x\"";
        let entry = from_agent_line("config-agent", line, now);
        assert_eq!(entry.severity, "warning");
        assert_eq!(entry.source, "config-agent");
        assert_eq!(entry.filename, "cairn_config_agent::link");
        assert_eq!(entry.content, "controller unreachable error=\"x\"");
        assert_eq!(
            entry.timestamp,
            Some(Timestamp {
                seconds: 1796625212,
                nanos: 123_456_000
            })
        );
    }

    #[test]
    fn any_other_line_is_kept_whole() {
        let now = Utc::now();
        let entry = from_agent_line("app-manager", "thread 'main' panicked at x.rs:1", now);
        assert_eq!(entry.content, "thread 'main' panicked at x.rs:1");
        assert_eq!(entry.severity, "info");
        assert_eq!(entry.timestamp, Some(timestamp(now)));
    }

    #[test]
    fn json_has_eves_field_names_and_leaves_out_empty_ones() {
        let entry = from_app_line("console", "hello", DateTime::UNIX_EPOCH);
        let json = serde_json::to_string(&LogEntry { msgid: 7, ..entry }).unwrap();
        assert_eq!(
            json,
            r#"{"severity":"info","source":"console","content":"hello","msgid":7,"timestamp":{"seconds":0}}"#
        );
    }

    #[test]
    fn a_huge_line_is_cut_on_a_character_boundary() {
        let line = "é".repeat(MAX_CONTENT);
        let entry = from_app_line("console", &line, Utc::now());
        assert!(entry.content.len() < MAX_CONTENT + 40);
        assert!(entry.content.ends_with("[cut: longer than 16 KiB]"));
    }
}

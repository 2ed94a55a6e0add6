//! EVE's log endpoints as a controller sees them: the gzip files a device POSTs to
//! `.../newlogs` (device) and `.../apps/instanceid/<app>/newlogs`, stored as they came, and a
//! decoder that reads them back as EVE's `logs.LogEntry` (the type generated from eve-api's
//! `log.proto`), refusing any JSON key that is not one of its fields.

use std::io::Read;

use anyhow::Context;
use cairn_config_agent::eve::org::lfedge::eve::logs::LogEntry;
use uuid::Uuid;

/// One upload as it arrived.
#[derive(Debug, Clone)]
pub struct LogUpload {
    /// `None` for the device's logs, else the app instance the URL names.
    pub app: Option<Uuid>,
    pub gzip: Vec<u8>,
}

/// A log file decoded.
#[derive(Debug, Clone, Default)]
pub struct LogFile {
    /// The gzip header's Comment (the device's `LogBundle` JSON) and Name (an app's name).
    pub comment: Option<String>,
    pub name: Option<String>,
    pub entries: Vec<LogEntry>,
}

/// Reads a file as newlogd writes it: gzip of newline-separated JSON `LogEntry`s.
pub fn decode(gzip: &[u8]) -> anyhow::Result<LogFile> {
    let mut decoder = flate2::read::GzDecoder::new(gzip);
    let mut text = String::new();
    decoder
        .read_to_string(&mut text)
        .context("not a gzip file of UTF-8 text")?;
    let header = decoder.header().context("no gzip header")?;
    let latin1 = |b: &[u8]| b.iter().map(|c| *c as char).collect::<String>();
    let mut file = LogFile {
        comment: header.comment().map(latin1),
        name: header.filename().map(latin1),
        entries: Vec::new(),
    };
    for (n, line) in text.lines().enumerate() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
        file.entries
            .push(entry(&value).with_context(|| format!("line {}: {line}", n + 1))?);
    }
    Ok(file)
}

/// The JSON of Go's `json.Marshal(&logs.LogEntry{...})` into the generated type.
fn entry(value: &serde_json::Value) -> anyhow::Result<LogEntry> {
    let object = value.as_object().context("not a JSON object")?;
    let mut entry = LogEntry::default();
    let text = |v: &serde_json::Value, key: &str| -> anyhow::Result<String> {
        v.as_str()
            .map(str::to_string)
            .with_context(|| format!("{key} is not a string"))
    };
    for (key, v) in object {
        match key.as_str() {
            "severity" => entry.severity = text(v, key)?,
            "source" => entry.source = text(v, key)?,
            "iid" => entry.iid = text(v, key)?,
            "content" => entry.content = text(v, key)?,
            "filename" => entry.filename = text(v, key)?,
            "function" => entry.function = text(v, key)?,
            "msgid" => entry.msgid = v.as_u64().context("msgid is not an unsigned number")?,
            "tags" => {
                for (k, t) in v.as_object().context("tags is not an object")? {
                    entry.tags.insert(k.clone(), text(t, "a tag")?);
                }
            }
            "timestamp" => {
                let seconds = v["seconds"].as_i64().context("timestamp.seconds")?;
                let nanos = v.get("nanos").and_then(|n| n.as_i64()).unwrap_or(0);
                entry.timestamp = Some(prost_types::Timestamp {
                    seconds,
                    nanos: i32::try_from(nanos).context("timestamp.nanos")?,
                });
            }
            other => anyhow::bail!("{other} is not a field of EVE's LogEntry"),
        }
    }
    Ok(entry)
}

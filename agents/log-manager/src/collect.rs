//! Collecting (EVE's newlogd): follows each agent's log file (`cairn up` appends an agent's
//! output to `<run>/logs/<agent>.log`) and each app's console and output
//! (`<run>/domain-manager/apps/<uuid>/{console,app}.log`), turns complete lines into
//! `LogEntry`s and, at each flush, writes them into the queue as gzip files.
//!
//! Crash safety: how far each file was read (and the next msgid and file number) is kept in
//! `<persist>/newlog/cursors.json`, stored only after every gzip file holding those lines is
//! durable. A collector killed at any point reads again from the last stored cursors: no line
//! is lost, and at most the lines of the batch being written are queued twice. Everything
//! here blocks.
// File work through and through, with no async fn: the crate's ban on blocking calls is lifted
// here, and its callers go through `spawn_blocking`.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_persist::Persist;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::entry::{self, BundleMeta};
use crate::levels::RemoteLevels;
use crate::queue::{GzipBatch, Queue, QueueError, Queued, Stream};

/// At most this much of one file is read per cycle, so a burst costs bounded memory.
const READ_PER_CYCLE: u64 = 1 << 20;

/// Where one file was read to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct Cursor {
    /// The file's inode: a new file under the same name is read from its start.
    pub inode: u64,
    pub offset: u64,
}

/// `cursors.json`: the collector's progress, kept after the files it wrote are durable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "LogCursors", version = 1)]
pub struct LogCursors {
    pub files: BTreeMap<String, Cursor>,
    /// The msgid of the next entry (one counter for the device, as newlogd's).
    pub next_msgid: u64,
    /// The number of the next gzip file.
    pub next_seq: u64,
    /// Files (and their bytes) dropped, oldest first, because the queue was over its cap.
    pub dropped_files: u64,
    pub dropped_bytes: u64,
    /// The device's UUID once the controller gave it: device files are stamped with it, and
    /// uploads can start after a restart before the config-agent has reached the controller.
    #[serde(rename = "DeviceUUID")]
    pub device_uuid: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("log cursors: {0}")]
    Cursors(#[from] cairn_persist::PersistError),
    #[error("log source {path}: cannot {step}: {source}")]
    Source {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("compressing logs: {0}")]
    Compress(std::io::Error),
}

/// One file followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub stream: Stream,
    /// The agent's name, or `console` / `app` for an app.
    pub name: String,
}

/// The files dropped so far, as the stored cursors at `path` say (0 when none are stored;
/// None when they cannot be read now).
pub fn dropped_files(path: &Path) -> Option<u64> {
    match cairn_persist::load_with_backup::<LogCursors>(path) {
        Ok(loaded) => Some(loaded.record.dropped_files),
        Err(_) if !path.exists() && !cairn_persist::backup_path(path).exists() => Some(0),
        Err(_) => None,
    }
}

/// The files to follow now.
pub fn sources(logs_dir: &Path, apps_dir: &Path) -> Vec<Source> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(logs_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log")
                && let Some(agent) = path.file_stem().map(|s| s.to_string_lossy().into_owned())
            {
                found.push(Source {
                    path,
                    stream: Stream::Device,
                    name: agent,
                });
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(apps_dir) {
        for entry in entries.flatten() {
            let Some(app) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Uuid>().ok())
            else {
                continue;
            };
            for (file, name) in [("console.log", "console"), ("app.log", "app")] {
                let path = entry.path().join(file);
                if path.is_file() {
                    found.push(Source {
                        path,
                        stream: Stream::App(app),
                        name: name.into(),
                    });
                }
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// What the header of a file says: the device's bundle metadata, the apps' display names.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    pub bundle: BundleMeta,
    pub app_names: BTreeMap<Uuid, String>,
}

/// What one flush did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flushed {
    pub files: usize,
    pub entries: usize,
    pub input_bytes: usize,
    pub gzip_bytes: u64,
    pub dropped_files: usize,
}

pub struct Collector {
    queue: Queue,
    cursors_path: PathBuf,
    /// What has been stored (durable); `read` runs ahead of it until the next flush.
    stored: LogCursors,
    read: BTreeMap<String, Cursor>,
    next_msgid: u64,
    batches: BTreeMap<Stream, Vec<GzipBatch>>,
    cap: u64,
    device_uuid: Option<Uuid>,
    /// Which agent lines are uploaded; the others are skipped (they stay in their files).
    remote: RemoteLevels,
    /// Files (and bytes) dropped for the cap whose count is not stored yet (a flush failed).
    dropped_unstored: (u64, u64),
}

impl Collector {
    pub fn open(queue: Queue, cap: u64) -> Result<Self, CollectError> {
        let cursors_path = queue.root().join("cursors.json");
        let stored = match cairn_persist::load_with_backup::<LogCursors>(&cursors_path) {
            Ok(loaded) => loaded.record,
            Err(e)
                if !cursors_path.exists()
                    && !cairn_persist::backup_path(&cursors_path).exists() =>
            {
                tracing::debug!("no log cursors yet: {e}");
                LogCursors {
                    next_msgid: 1,
                    ..LogCursors::default()
                }
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            queue,
            cursors_path,
            read: stored.files.clone(),
            next_msgid: stored.next_msgid.max(1),
            device_uuid: stored.device_uuid,
            stored,
            batches: BTreeMap::new(),
            cap,
            remote: RemoteLevels::default(),
            dropped_unstored: (0, 0),
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn stored(&self) -> &LogCursors {
        &self.stored
    }

    /// The remote log levels for the lines read from now on.
    pub fn set_remote_levels(&mut self, levels: RemoteLevels) {
        self.remote = levels;
    }

    /// The device's UUID, kept with the next flush.
    pub fn set_device(&mut self, uuid: Uuid) {
        self.device_uuid = Some(uuid);
    }

    /// Reads what the sources gained since the last cycle into the open batches.
    pub fn collect(
        &mut self,
        sources: &[Source],
        headers: &Headers,
    ) -> Result<usize, CollectError> {
        let mut entries = 0;
        for source in sources {
            entries += self.collect_one(source, headers)?;
        }
        Ok(entries)
    }

    fn collect_one(&mut self, source: &Source, headers: &Headers) -> Result<usize, CollectError> {
        let io = |step: &'static str| {
            let path = source.path.clone();
            move |source| CollectError::Source { step, path, source }
        };
        let mut file = match std::fs::File::open(&source.path) {
            Ok(file) => file,
            // Gone between listing and opening (an app removed): nothing more to read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("open")(e)),
        };
        let meta = file.metadata().map_err(io("stat"))?;
        let key = source.path.to_string_lossy().into_owned();
        let mut cursor = self.read.get(&key).cloned().unwrap_or_default();
        if cursor.inode != meta.ino() || meta.len() < cursor.offset {
            // A new file, or this one was truncated: read it from its start.
            cursor = Cursor {
                inode: meta.ino(),
                offset: 0,
            };
        }
        if meta.len() == cursor.offset {
            self.read.insert(key, cursor);
            return Ok(0);
        }
        file.seek(SeekFrom::Start(cursor.offset))
            .map_err(io("seek"))?;
        let mut chunk = Vec::new();
        file.take(READ_PER_CYCLE)
            .read_to_end(&mut chunk)
            .map_err(io("read"))?;
        // Only complete lines; a partial one waits for its end (unless it fills a whole read).
        let complete = match chunk.iter().rposition(|b| *b == b'\n') {
            Some(last) => last + 1,
            None if chunk.len() as u64 >= READ_PER_CYCLE => chunk.len(),
            None => 0,
        };
        let now = Utc::now();
        let mut entries = 0;
        for line in chunk[..complete].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(line);
            let mut entry = match source.stream {
                Stream::Device => entry::from_agent_line(&source.name, &text, now),
                Stream::App(_) => entry::from_app_line(&source.name, &text, now),
            };
            if source.stream == Stream::Device && !self.remote.sends(&entry.source, &entry.severity)
            {
                continue;
            }
            entry.msgid = self.next_msgid;
            self.next_msgid += 1;
            let json = serde_json::to_vec(&entry)
                .map_err(|e| CollectError::Compress(std::io::Error::other(e.to_string())))?;
            self.push(source.stream, &json, headers)?;
            entries += 1;
        }
        cursor.offset += complete as u64;
        self.read.insert(key, cursor);
        Ok(entries)
    }

    fn push(&mut self, stream: Stream, json: &[u8], headers: &Headers) -> Result<(), CollectError> {
        let batches = self.batches.entry(stream).or_default();
        if batches.last().is_none_or(|b| !b.fits(json)) {
            let header = match stream {
                Stream::Device => serde_json::to_string(&headers.bundle).unwrap_or_default(),
                Stream::App(app) => headers
                    .app_names
                    .get(&app)
                    .cloned()
                    .unwrap_or_else(|| app.to_string()),
            };
            batches.push(GzipBatch::new(stream, &header));
        }
        if let Some(batch) = batches.last_mut() {
            batch.push(json).map_err(CollectError::Compress)?;
        }
        Ok(())
    }

    /// Whether lines wait in memory, and whether a whole file is ready.
    pub fn pending(&self) -> (bool, bool) {
        let any = self.batches.values().flatten().any(|b| !b.is_empty());
        let full = self.batches.values().any(|b| b.len() > 1);
        (any, full)
    }

    /// Drops the oldest queued files if the new ones would not fit under the cap, writes every
    /// open batch into the queue durably, then stores the cursors (the order that makes a crash
    /// lose nothing). A flush that fails (a full disk, an I/O error) is undone as a kill before
    /// it would be: the files it wrote go, the lines since the stored cursors are read again
    /// at the next cycle.
    pub fn flush(&mut self) -> Result<Flushed, CollectError> {
        let mut written = Vec::new();
        let result = self.write_batches(&mut written);
        if result.is_err() {
            for file in &written {
                // A file left behind would only be a duplicate of lines written again.
                let _ = self.queue.remove(file);
            }
            self.batches.clear();
            self.read = self.stored.files.clone();
            self.next_msgid = self.stored.next_msgid.max(1);
        }
        result
    }

    fn write_batches(&mut self, written: &mut Vec<Queued>) -> Result<Flushed, CollectError> {
        let mut flushed = Flushed::default();
        let mut files = Vec::new();
        for (stream, batches) in std::mem::take(&mut self.batches) {
            for batch in batches {
                if batch.is_empty() {
                    continue;
                }
                flushed.entries += batch.entries();
                flushed.input_bytes += batch.input_bytes();
                files.push((stream, batch.finish().map_err(CollectError::Compress)?));
            }
        }
        let incoming: u64 = files.iter().map(|(_, gzip)| gzip.len() as u64).sum();
        let dropped = self.queue.make_room(self.cap, incoming)?;
        // Counted even when the writes below fail: those files are gone either way.
        self.dropped_unstored.0 += dropped.len() as u64;
        self.dropped_unstored.1 += dropped.iter().map(|d| d.bytes).sum::<u64>();
        let mut seq = self.stored.next_seq;
        for (stream, gzip) in files {
            // Listed before it is written: a write that fails after its rename leaves it.
            written.push(Queued {
                seq,
                stream,
                path: self.queue.path_of(seq, stream),
                bytes: gzip.len() as u64,
            });
            let file = self.queue.write(seq, stream, &gzip)?;
            flushed.gzip_bytes += file.bytes;
            flushed.files += 1;
            seq += 1;
        }
        let mut next = self.stored.clone();
        next.files = self.read.clone();
        next.next_msgid = self.next_msgid;
        next.next_seq = seq;
        next.device_uuid = self.device_uuid;
        next.dropped_files += self.dropped_unstored.0;
        next.dropped_bytes += self.dropped_unstored.1;
        if next != self.stored {
            cairn_persist::crash_point("log-manager:before-cursors");
            cairn_persist::store_with_backup(&self.cursors_path, &next)?;
            self.stored = next;
            self.dropped_unstored = (0, 0);
        }
        flushed.dropped_files = dropped.len();
        if !dropped.is_empty() {
            tracing::warn!(
                files = dropped.len(),
                total_dropped = self.stored.dropped_files,
                "log queue over its cap: oldest files dropped"
            );
        }
        Ok(flushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    fn contents(collector: &Collector) -> Vec<String> {
        let mut lines = Vec::new();
        for queued in collector.queue().pending().unwrap() {
            let gzip = std::fs::read(&queued.path).unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gzip[..]), &mut text)
                .unwrap();
            for line in text.lines() {
                let entry: entry::LogEntry = serde_json::from_str(line).unwrap();
                lines.push(entry.content);
            }
        }
        lines
    }

    #[test]
    fn a_partial_line_waits_for_its_end_and_a_replaced_file_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join("app-manager.log");
        let queue = Queue::open(dir.path().join("newlog")).unwrap();
        let mut collector = Collector::open(queue, u64::MAX).unwrap();
        let headers = Headers::default();

        append(&log, "one\ntw");
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        collector.flush().unwrap();
        assert_eq!(contents(&collector), ["one"]);

        append(&log, "o\n");
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        collector.flush().unwrap();
        assert_eq!(contents(&collector), ["one", "two"]);

        // Rotated: a new file under the same name.
        std::fs::remove_file(&log).unwrap();
        append(&log, "three\n");
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        collector.flush().unwrap();
        assert_eq!(contents(&collector), ["one", "two", "three"]);
    }

    #[test]
    fn a_collector_reopened_goes_on_from_its_stored_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join("config-agent.log");
        let open = || {
            let queue = Queue::open(dir.path().join("newlog")).unwrap();
            Collector::open(queue, u64::MAX).unwrap()
        };
        let headers = Headers::default();
        let mut collector = open();
        append(&log, "a\nb\n");
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        collector.flush().unwrap();
        // Read but never flushed: as if killed before the flush.
        append(&log, "c\n");
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        drop(collector);

        let mut collector = open();
        collector
            .collect(&sources(&logs, dir.path()), &headers)
            .unwrap();
        collector.flush().unwrap();
        assert_eq!(contents(&collector), ["a", "b", "c"]);
        assert_eq!(collector.stored().next_msgid, 4);
    }
}

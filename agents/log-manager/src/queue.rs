//! The bounded on-disk queue of gzip log files under `<persist>/newlog/`, laid out as EVE's
//! newlogd does: `devUpload/dev.log.upload.<seq>.gz`, `appUpload/app.<uuid>.log.<seq>.gz`, and
//! `failedUpload/` for files the controller refused ten times. `<seq>` is one counter over both
//! streams, zero-padded, so the upload order is the order the files were written.
//!
//! A file is built in memory ([`GzipBatch`]), then written as `.tmp-<name>`, fsynced, renamed and
//! its directory fsynced: a file in the queue is always whole. Everything here blocks.
// File work through and through, with no async fn: the crate's ban on blocking calls is lifted
// here, and its callers go through `spawn_blocking`.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use uuid::Uuid;

/// newlogd's `maxGzipFileSize`: the controller expects files about this big, at most.
pub const MAX_GZIP_BYTES: usize = 50_000;
/// loguploader's hard limit: a bigger file is never sent.
pub const MAX_UPLOAD_BYTES: u64 = 65_536;
/// loguploader's `max4xxdropFiles`: refused files kept on the device.
pub const MAX_FAILED_FILES: usize = 1000;
/// Input between sync flushes: the compressed size is then known to within this much input.
const FLUSH_EVERY: usize = 8 * 1024;
/// gzip trailer (CRC32 + size) and a deflate block's framing, with room to spare.
const TRAILER: usize = 64;

pub const DEV_DIR: &str = "devUpload";
pub const APP_DIR: &str = "appUpload";
pub const FAILED_DIR: &str = "failedUpload";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("log queue {path}: cannot {step}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> QueueError {
    let path = path.to_path_buf();
    move |source| QueueError::Io { step, path, source }
}

/// Whose logs a file holds: the device's (its agents) or one app's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Device,
    App(Uuid),
}

/// One gzip file being filled: newline-separated JSON `LogEntry`s, best compression, with
/// the device's `LogBundle` JSON in the header Comment or the app's name in the header Name.
pub struct GzipBatch {
    encoder: flate2::write::GzEncoder<Vec<u8>>,
    unflushed: usize,
    entries: usize,
    input_bytes: usize,
}

impl GzipBatch {
    /// `header`: the Comment (device) or Name (app), Latin-1 only as gzip wants (others become '?').
    pub fn new(stream: Stream, header: &str) -> Self {
        let latin1: Vec<u8> = header
            .chars()
            .map(|c| {
                if (c as u32) < 256 && c != '\0' {
                    c as u8
                } else {
                    b'?'
                }
            })
            .collect();
        let builder = match stream {
            Stream::Device => GzBuilder::new().comment(latin1),
            Stream::App(_) => GzBuilder::new().filename(latin1),
        };
        Self {
            encoder: builder.write(Vec::new(), Compression::best()),
            unflushed: 0,
            entries: 0,
            input_bytes: 0,
        }
    }

    /// Whether `line` still fits under [`MAX_GZIP_BYTES`] (an empty batch takes any line: one
    /// entry is at most 16 KiB of content and so well under).
    pub fn fits(&self, line: &[u8]) -> bool {
        self.entries == 0
            || self.encoder.get_ref().len() + self.unflushed + line.len() + 1 + TRAILER
                <= MAX_GZIP_BYTES
    }

    pub fn push(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.encoder.write_all(line)?;
        self.encoder.write_all(b"\n")?;
        self.entries += 1;
        self.input_bytes += line.len() + 1;
        self.unflushed += line.len() + 1;
        if self.unflushed >= FLUSH_EVERY {
            self.encoder.flush()?;
            self.unflushed = 0;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn input_bytes(&self) -> usize {
        self.input_bytes
    }

    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        self.encoder.finish()
    }
}

/// A file waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub stream: Stream,
    pub path: PathBuf,
    pub bytes: u64,
}

impl Queued {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

pub struct Queue {
    root: PathBuf,
}

impl Queue {
    /// `<persist>/newlog`, its directories made durably.
    pub fn open(root: PathBuf) -> Result<Self, QueueError> {
        for dir in [DEV_DIR, APP_DIR, FAILED_DIR] {
            let dir = root.join(dir);
            cairn_persist::create_dir_durable(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, seq: u64, stream: Stream) -> PathBuf {
        match stream {
            Stream::Device => self
                .root
                .join(DEV_DIR)
                .join(format!("dev.log.upload.{seq:020}.gz")),
            Stream::App(app) => self
                .root
                .join(APP_DIR)
                .join(format!("app.{app}.log.{seq:020}.gz")),
        }
    }

    /// Writes a whole file durably under its final name (replacing one of the same sequence
    /// number: the same lines, read again after a crash that came before their cursors were kept).
    pub fn write(&self, seq: u64, stream: Stream, gzip: &[u8]) -> Result<Queued, QueueError> {
        let path = self.path_of(seq, stream);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let tmp = dir.join(format!(".tmp-{seq:020}"));
        let mut file = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(gzip).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        cairn_persist::crash_point("log-manager:gzip-written");
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        cairn_persist::sync_dir(&dir).map_err(io_err("fsync", &dir))?;
        Ok(Queued {
            seq,
            stream,
            path,
            bytes: gzip.len() as u64,
        })
    }

    /// The queued files, oldest first. Left-over temporary files are removed.
    pub fn pending(&self) -> Result<Vec<Queued>, QueueError> {
        let mut queued = Vec::new();
        for dir in [DEV_DIR, APP_DIR] {
            let dir = self.root.join(dir);
            for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                let entry = entry.map_err(io_err("list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    let _ = std::fs::remove_file(entry.path());
                    continue;
                }
                let Some((seq, stream)) = parse_name(&name) else {
                    continue;
                };
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                queued.push(Queued {
                    seq,
                    stream,
                    path: entry.path(),
                    bytes,
                });
            }
        }
        queued.sort_by_key(|q| q.seq);
        Ok(queued)
    }

    /// Drops the oldest files until `incoming` more bytes fit under `cap`; returns what it
    /// dropped. Called before the new files are written, so the queue never holds more than `cap`.
    pub fn make_room(&self, cap: u64, incoming: u64) -> Result<Vec<Queued>, QueueError> {
        let queued = self.pending()?;
        let mut total: u64 = queued.iter().map(|q| q.bytes).sum::<u64>() + incoming;
        let mut dropped = Vec::new();
        for file in queued {
            if total <= cap {
                break;
            }
            std::fs::remove_file(&file.path).map_err(io_err("remove", &file.path))?;
            total -= file.bytes;
            dropped.push(file);
        }
        Ok(dropped)
    }

    /// The controller took it.
    pub fn remove(&self, file: &Queued) -> Result<(), QueueError> {
        match std::fs::remove_file(&file.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &file.path)(e)),
        }
    }

    /// The controller refused it too often: kept aside (the oldest of those dropped past
    /// [`MAX_FAILED_FILES`]) so the queue moves on.
    pub fn set_aside(&self, file: &Queued) -> Result<PathBuf, QueueError> {
        let dir = self.root.join(FAILED_DIR);
        let mut kept: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err("list", &dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        kept.sort();
        while kept.len() >= MAX_FAILED_FILES {
            let oldest = kept.remove(0);
            let _ = std::fs::remove_file(&oldest);
        }
        let to = dir.join(file.name());
        std::fs::rename(&file.path, &to).map_err(io_err("move aside", &file.path))?;
        Ok(to)
    }

    /// Queued files and bytes.
    pub fn usage(&self) -> Result<(usize, u64), QueueError> {
        let queued = self.pending()?;
        Ok((queued.len(), queued.iter().map(|q| q.bytes).sum()))
    }
}

fn parse_name(name: &str) -> Option<(u64, Stream)> {
    if let Some(seq) = name
        .strip_prefix("dev.log.upload.")
        .and_then(|r| r.strip_suffix(".gz"))
    {
        return Some((seq.parse().ok()?, Stream::Device));
    }
    let rest = name.strip_prefix("app.")?.strip_suffix(".gz")?;
    let (app, seq) = rest.split_once(".log.")?;
    Some((seq.parse().ok()?, Stream::App(app.parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort_by_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path().join("newlog")).unwrap();
        let app = Uuid::new_v4();
        for (seq, stream) in [
            (3, Stream::Device),
            (1, Stream::App(app)),
            (2, Stream::Device),
        ] {
            queue.write(seq, stream, b"x").unwrap();
        }
        let pending = queue.pending().unwrap();
        let order: Vec<_> = pending.iter().map(|q| (q.seq, q.stream)).collect();
        assert_eq!(
            order,
            [
                (1, Stream::App(app)),
                (2, Stream::Device),
                (3, Stream::Device)
            ]
        );
    }

    #[test]
    fn the_oldest_files_go_when_the_queue_is_over_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path().join("newlog")).unwrap();
        for seq in 0..5 {
            queue.write(seq, Stream::Device, &[0; 100]).unwrap();
        }
        let dropped = queue.make_room(250, 0).unwrap();
        assert_eq!(dropped.iter().map(|q| q.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(queue.usage().unwrap(), (2, 200));
        // Room for a new file is made before it is written.
        let dropped = queue.make_room(250, 100).unwrap();
        assert_eq!(dropped.iter().map(|q| q.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_batch_stops_taking_lines_before_fifty_thousand_bytes() {
        // Lines that barely compress (random hex): the cut must come from the compressed size.
        let mut batch = GzipBatch::new(Stream::Device, "{}");
        let mut rng = fastrand::Rng::with_seed(7);
        loop {
            let line: String = (0..200).map(|_| rng.alphanumeric()).collect();
            if !batch.fits(line.as_bytes()) {
                break;
            }
            batch.push(line.as_bytes()).unwrap();
        }
        let gzip = batch.finish().unwrap();
        assert!(gzip.len() <= MAX_GZIP_BYTES, "{}", gzip.len());
        assert!(gzip.len() > MAX_GZIP_BYTES - 12_000, "{}", gzip.len());
    }
}

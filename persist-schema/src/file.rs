//! Atomic, durable files: a power cut leaves the old record or the new one, never a mix.
//!
//! A write goes to `.<name>.tmp` in the same directory, is fsynced, renamed over the target, and
//! the directory is fsynced. One writer per record is assumed (the record's owning agent), so
//! the temporary name is fixed: a writer killed mid-write leaves at most one stale temp file,
//! which the next write of that record replaces. Readers never look at dot-files.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::Record;
use crate::codec::{self, Decoded, Format};
use crate::error::{ErrorKind, PersistError};

/// Where a loaded record came from.
#[derive(Debug)]
pub enum Origin {
    /// The record file itself.
    Primary,
    /// The `.bak` copy, because the primary could not be used for the reason given.
    Backup { primary_error: ErrorKind },
}

/// A record read from disk, with what the caller should know about how it was read.
#[derive(Debug)]
pub struct Loaded<T> {
    pub record: T,
    /// The version the writer declared; greater than `T::VERSION` for a newer writer's record.
    pub stored_version: u32,
    pub format: Format,
    pub origin: Origin,
}

/// Writes `record` atomically and durably to `path`, creating missing directories durably.
pub fn store<T: Record>(path: &Path, record: &T) -> Result<(), PersistError> {
    let bytes = codec::encode(record).map_err(|e| failure::<T>(path, ErrorKind::Encode(e)))?;
    write_atomic(path, &bytes, false).map_err(|(op, e)| failure::<T>(path, ErrorKind::io(op, e)))
}

/// Like [`store`], and first keeps the current record as `<path>.bak` (see [`load_with_backup`]).
pub fn store_with_backup<T: Record>(path: &Path, record: &T) -> Result<(), PersistError> {
    let bytes = codec::encode(record).map_err(|e| failure::<T>(path, ErrorKind::Encode(e)))?;
    write_atomic(path, &bytes, true).map_err(|(op, e)| failure::<T>(path, ErrorKind::io(op, e)))
}

/// Like [`store`] but without fsync: atomic against a crash of the process (the rename), not
/// against power loss. For files under the run root, which a reboot wipes anyway.
pub fn store_unsynced<T: Record>(path: &Path, record: &T) -> Result<(), PersistError> {
    let bytes = codec::encode(record).map_err(|e| failure::<T>(path, ErrorKind::Encode(e)))?;
    write_atomic_with(path, &bytes, false, false)
        .map_err(|(op, e)| failure::<T>(path, ErrorKind::io(op, e)))
}

/// Reads and validates the record at `path`.
pub fn load<T: Record>(path: &Path) -> Result<Loaded<T>, PersistError> {
    read_record::<T>(path)
        .map(|decoded| Loaded {
            record: decoded.record,
            stored_version: decoded.stored_version,
            format: decoded.format,
            origin: Origin::Primary,
        })
        .map_err(|kind| failure::<T>(path, kind))
}

/// Reads the record at `path`; if it is missing or unusable, falls back to `<path>.bak` and says
/// so in [`Loaded::origin`]. Fails only when neither copy can be used.
pub fn load_with_backup<T: Record>(path: &Path) -> Result<Loaded<T>, PersistError> {
    let primary_error = match read_record::<T>(path) {
        Ok(decoded) => {
            return Ok(Loaded {
                record: decoded.record,
                stored_version: decoded.stored_version,
                format: decoded.format,
                origin: Origin::Primary,
            });
        }
        Err(kind) => kind,
    };
    match read_record::<T>(&backup_path(path)) {
        Ok(decoded) => Ok(Loaded {
            record: decoded.record,
            stored_version: decoded.stored_version,
            format: decoded.format,
            origin: Origin::Backup { primary_error },
        }),
        Err(ErrorKind::NotFound) => Err(failure::<T>(path, primary_error)),
        Err(backup) => Err(failure::<T>(
            path,
            ErrorKind::BackupAlsoFailed {
                primary: Box::new(primary_error),
                backup: Box::new(backup),
            },
        )),
    }
}

/// Removes a record and its backup, durably. Removing a record that is not there succeeds.
/// The backup goes first: a power cut (or an error) between the two unlinks must not leave the
/// older backup alone, which `load_with_backup` would bring back in place of the last record.
pub fn remove(path: &Path) -> io::Result<()> {
    for file in [backup_path(path), path.to_path_buf()] {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(parent_of(path))
}

/// `<path>.bak`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".bak");
    PathBuf::from(name)
}

fn read_record<T: Record>(path: &Path) -> Result<Decoded<T>, ErrorKind> {
    let bytes = fs::read(path).map_err(|e| ErrorKind::io("reading", e))?;
    codec::decode::<T>(&bytes).map_err(ErrorKind::Decode)
}

fn failure<T: Record>(path: &Path, kind: ErrorKind) -> PersistError {
    PersistError {
        schema: T::SCHEMA,
        path: path.to_path_buf(),
        kind,
    }
}

type IoStep = (&'static str, io::Error);

/// Writes `bytes` to `path` atomically and durably; with `keep_backup`, the current content of
/// `path` (if any) becomes `<path>.bak` first. The primary is never absent at any instant.
pub fn write_atomic(path: &Path, bytes: &[u8], keep_backup: bool) -> Result<(), IoStep> {
    write_atomic_with(path, bytes, keep_backup, true)
}

fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    keep_backup: bool,
    sync: bool,
) -> Result<(), IoStep> {
    let dir = parent_of(path);
    if sync {
        create_dir_durable(dir).map_err(|e| ("creating the directory", e))?;
    } else if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(|e| ("creating the directory", e))?;
    }
    let tmp = sibling(path, ".", ".tmp");
    if let Err(e) = write_file(&tmp, bytes, sync) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if keep_backup && let Err(e) = refresh_backup(path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(|e| ("renaming into place", e))?;
    if sync {
        sync_dir(dir).map_err(|e| ("syncing the directory", e))?;
    }
    Ok(())
}

fn write_file(tmp: &Path, bytes: &[u8], sync: bool) -> Result<(), IoStep> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| ("creating the temporary file", e))?;
    file.write_all(bytes).map_err(|e| ("writing", e))?;
    if sync {
        file.sync_all().map_err(|e| ("syncing", e))?;
    }
    Ok(())
}

/// Makes `<path>.bak` a copy of the current `path` without ever removing `path`: a hard link
/// (or a synced copy where links are not supported) is renamed over the old backup.
fn refresh_backup(path: &Path) -> Result<(), IoStep> {
    if !path.exists() {
        return Ok(());
    }
    let staged = sibling(path, ".", ".bak.tmp");
    let _ = fs::remove_file(&staged);
    if fs::hard_link(path, &staged).is_err() {
        fs::copy(path, &staged).map_err(|e| ("copying the backup", e))?;
        File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(|e| ("syncing the backup", e))?;
    }
    fs::rename(&staged, backup_path(path)).map_err(|e| ("renaming the backup", e))
}

/// Creates `dir` and its missing ancestors, fsyncing each parent so the new entries survive a
/// power cut. An existing directory is trusted to be durable: one whose parent's fsync failed
/// is removed again.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Err(e) = sync_dir(parent_of(dir)) {
        // Not durable: taken back, so that the next call makes it and syncs again instead of
        // finding it and writing acknowledged records into a directory a power cut can take.
        let _ = fs::remove_dir(dir);
        return Err(e);
    }
    Ok(())
}

/// Removes a directory tree and makes the removal durable.
pub fn remove_dir_durable(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(parent_of(dir))
}

/// fsync of a directory: makes renames, creations and removals inside it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn sibling(path: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let mut name = OsString::from(prefix);
    name.push(path.file_name().unwrap_or_default());
    name.push(suffix);
    parent_of(path).join(name)
}

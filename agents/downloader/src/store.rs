//! The content store under `<persist>/content/`: blobs by sha256 and who holds them.
//!
//! ```text
//! partial/<sha256>   bytes being downloaded (resumed from their length)
//! blobs/<sha256>     verified content, mode 0444; nothing unverified is ever here
//! refs.json          sha256 → the content tree uuids holding it (cairn-persist record), and
//!                    the verified blobs nobody holds, kept until a deadline for reuse
//! ```
//!
//! Invariants: a blob or partial file whose sha256 no content tree holds is garbage (removed
//! by [`ContentStore::collect_garbage`]); a reference is written durably before its download
//! starts and removed durably before its files go, so a crash between the two leaves only
//! garbage, never a blob some tree still counts on. Everything here blocks: call it from the
//! blocking pool.
// File work through and through, with no async fn: the crate's ban on blocking calls is lifted
// here, and its callers go through `spawn_blocking`.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// After a reference is written, before anything is downloaded for it.
pub const CRASH_AFTER_REF_WRITE: &str = "downloader:after-ref-write";
/// A verified partial file, not yet renamed into `blobs/`.
pub const CRASH_AFTER_VERIFY: &str = "downloader:after-verify";
/// The blob is in `blobs/`, its content tree not yet reported LOADED.
pub const CRASH_AFTER_BLOB_RENAME: &str = "downloader:after-blob-rename";
/// A reference removed, the blob not yet.
pub const CRASH_AFTER_REF_REMOVE: &str = "downloader:after-ref-remove";

/// `refs.json`: per blob sha256, the content trees that hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ContentRefs", version = 1)]
pub struct ContentRefs {
    pub blobs: BTreeMap<String, BTreeSet<Uuid>>,
    /// Verified blobs no tree holds, kept until then (`timer.defer.content.delete`; EVE's
    /// `DeferredContentDeleteStatus`): a tree that comes back with the same sha256 takes the
    /// blob as it is, without a download.
    pub deferred: BTreeMap<String, DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content store: cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("content store: {0}")]
    Record(#[from] cairn_persist::PersistError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// Whether `text` is a sha256 as the store names files: 64 lower-case hex digits.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub struct ContentStore {
    root: PathBuf,
    refs: ContentRefs,
}

impl ContentStore {
    /// Opens (creating durably) `<persist>/content`, reading its references. An unreadable
    /// `refs.json` is an error: trusting none would delete blobs trees still hold.
    pub fn open(persist: &Path) -> Result<Self, StoreError> {
        let root = cairn_types::layout::content_dir(persist);
        for dir in [root.join("partial"), root.join("blobs")] {
            cairn_persist::create_dir_durable(&dir).map_err(io_err("create", &dir))?;
        }
        let path = root.join("refs.json");
        let refs = match cairn_persist::load_with_backup::<ContentRefs>(&path) {
            Ok(loaded) => loaded.record,
            Err(e) if !path.exists() && !cairn_persist::backup_path(&path).exists() => {
                tracing::debug!("no content references yet: {e}");
                ContentRefs::default()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self { root, refs })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.root.join("partial").join(sha256)
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    pub fn refs(&self) -> &ContentRefs {
        &self.refs
    }

    /// The sha256 `tree` holds, if any.
    pub fn held_by(&self, tree: Uuid) -> Option<&str> {
        self.refs
            .blobs
            .iter()
            .find(|(_, trees)| trees.contains(&tree))
            .map(|(sha, _)| sha.as_str())
    }

    fn save(&self) -> Result<(), StoreError> {
        cairn_persist::store_with_backup(&self.root.join("refs.json"), &self.refs)?;
        Ok(())
    }

    /// Makes `tree` hold `sha256` (and nothing else), durably. Returns the blobs it held
    /// before that are now held by nobody and not kept until `keep_until` (their files are then
    /// garbage). A kept blob of `sha256` is taken back.
    pub fn hold(
        &mut self,
        tree: Uuid,
        sha256: &str,
        keep_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<String>, StoreError> {
        let held: Vec<&String> = self
            .refs
            .blobs
            .iter()
            .filter(|(_, trees)| trees.contains(&tree))
            .map(|(sha, _)| sha)
            .collect();
        if held.len() == 1 && held[0] == sha256 {
            return Ok(Vec::new());
        }
        let released = self.detach(tree, keep_until);
        if self.refs.deferred.remove(sha256).is_some() {
            tracing::info!(sha256, "a kept blob is held again: no download");
        }
        self.refs
            .blobs
            .entry(sha256.to_string())
            .or_default()
            .insert(tree);
        self.save()?;
        cairn_persist::crash_point(CRASH_AFTER_REF_WRITE);
        Ok(released.into_iter().filter(|s| s != sha256).collect())
    }

    /// Makes `tree` hold `sha256` besides what it holds (an image's blobs), durably.
    pub fn hold_also(&mut self, tree: Uuid, sha256: &str) -> Result<(), StoreError> {
        if self
            .refs
            .blobs
            .get(sha256)
            .is_some_and(|t| t.contains(&tree))
        {
            return Ok(());
        }
        self.refs.deferred.remove(sha256);
        self.refs
            .blobs
            .entry(sha256.to_string())
            .or_default()
            .insert(tree);
        self.save()?;
        cairn_persist::crash_point(CRASH_AFTER_REF_WRITE);
        Ok(())
    }

    /// Makes `tree` hold exactly `blobs` (an image just pulled), durably. Returns the blobs it
    /// held before that are now held by nobody (an older image's layers).
    pub fn hold_exactly(
        &mut self,
        tree: Uuid,
        blobs: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut released = Vec::new();
        let mut changed = false;
        for (sha, trees) in self.refs.blobs.iter_mut() {
            if !blobs.contains(sha) && trees.remove(&tree) {
                changed = true;
                if trees.is_empty() {
                    released.push(sha.clone());
                }
            }
        }
        self.refs.blobs.retain(|_, trees| !trees.is_empty());
        for sha in blobs {
            changed |= self.refs.blobs.entry(sha.clone()).or_default().insert(tree);
            // A kept blob (an unheld layer within its deferral) is held again.
            changed |= self.refs.deferred.remove(sha).is_some();
        }
        if changed {
            self.save()?;
        }
        Ok(released)
    }

    /// Drops `tree`'s references, durably. Returns the blobs nobody holds any more and that
    /// are not kept until `keep_until`.
    pub fn release(
        &mut self,
        tree: Uuid,
        keep_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<String>, StoreError> {
        if self.held_by(tree).is_none() {
            return Ok(Vec::new());
        }
        let released = self.detach(tree, keep_until);
        self.save()?;
        cairn_persist::crash_point(CRASH_AFTER_REF_REMOVE);
        Ok(released)
    }

    /// `tree` lets go of its blobs; one held by nobody now is kept until `keep_until` if it is
    /// a verified blob (EVE defers only LOADED content), else returned as garbage.
    fn detach(&mut self, tree: Uuid, keep_until: Option<DateTime<Utc>>) -> Vec<String> {
        let mut released = Vec::new();
        for (sha, trees) in self.refs.blobs.iter_mut() {
            if trees.remove(&tree) && trees.is_empty() {
                released.push(sha.clone());
            }
        }
        self.refs.blobs.retain(|_, trees| !trees.is_empty());
        let mut garbage = Vec::new();
        for sha in released {
            match keep_until {
                Some(until) if self.blob_path(&sha).exists() => {
                    tracing::info!(sha256 = %sha, until = %until, "no content tree holds the blob: kept for reuse");
                    self.refs.deferred.insert(sha, until);
                }
                _ => garbage.push(sha),
            }
        }
        garbage
    }

    /// When the first kept blob is due for removal.
    pub fn next_deferred(&self) -> Option<DateTime<Utc>> {
        self.refs.deferred.values().min().copied()
    }

    /// Forgets the kept blobs due by `now`, durably, and returns them: their files are garbage.
    pub fn expire_deferred(&mut self, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let due: Vec<String> = self
            .refs
            .deferred
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(sha, _)| sha.clone())
            .collect();
        if !due.is_empty() {
            self.refs.deferred.retain(|_, until| *until > now);
            self.save()?;
        }
        Ok(due)
    }

    /// Drops the references of trees not in `configured` (the config left them while the
    /// agent was down), durably, then removes every file no reference names.
    /// References dropped here are not kept for reuse (`keep_until` applies to releases seen
    /// live); kept blobs past their deadline at `now` go too.
    pub fn collect_garbage(
        &mut self,
        configured: &BTreeSet<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let before = self.refs.clone();
        for trees in self.refs.blobs.values_mut() {
            trees.retain(|t| configured.contains(t));
        }
        self.refs.blobs.retain(|_, trees| !trees.is_empty());
        self.refs.deferred.retain(|_, until| *until > now);
        if self.refs != before {
            self.save()?;
            cairn_persist::crash_point(CRASH_AFTER_REF_REMOVE);
        }
        for dir in ["partial", "blobs"] {
            let dir = self.root.join(dir);
            let entries = fs::read_dir(&dir).map_err(io_err("list", &dir))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !self.refs.blobs.contains_key(&name) && !self.refs.deferred.contains_key(&name) {
                    tracing::info!(file = %entry.path().display(), "removing content no content tree holds");
                    remove_file(&entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Removes the blob and partial file of `sha256` (one nobody holds any more).
    pub fn remove_content(&self, sha256: &str) -> Result<(), StoreError> {
        remove_file(&self.partial_path(sha256))?;
        remove_file(&self.blob_path(sha256))?;
        Ok(())
    }

    /// Moves the verified partial file of `sha256` into `blobs/`, read-only, durably.
    pub fn promote(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        let (from, to) = (self.partial_path(sha256), self.blob_path(sha256));
        fs::set_permissions(&from, fs::Permissions::from_mode(0o444))
            .map_err(io_err("make read-only", &from))?;
        cairn_persist::crash_point(CRASH_AFTER_VERIFY);
        fs::rename(&from, &to).map_err(io_err("rename into blobs", &to))?;
        for dir in [self.root.join("blobs"), self.root.join("partial")] {
            cairn_persist::sync_dir(&dir).map_err(io_err("sync", &dir))?;
        }
        cairn_persist::crash_point(CRASH_AFTER_BLOB_RENAME);
        Ok(to)
    }
}

/// Removes `path`; one already gone is not an error. Not durable (a partial file comes back
/// as garbage at worst).
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                cairn_persist::sync_dir(dir).map_err(io_err("sync", dir))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

pub use cairn_persist::digest::sha256_file;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_blob_held_by_two_trees_is_released_by_the_last_one_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, t2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut store = ContentStore::open(dir.path()).unwrap();
        assert!(store.hold(t1, A, None).unwrap().is_empty());
        assert!(store.hold(t2, A, None).unwrap().is_empty());
        let mut store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(store.refs().blobs[A].len(), 2);
        assert!(store.release(t1, None).unwrap().is_empty());
        assert_eq!(store.release(t2, None).unwrap(), vec![A.to_string()]);
        // A tree moving to another sha releases the old one.
        store.hold(t1, A, None).unwrap();
        assert_eq!(store.hold(t1, B, None).unwrap(), vec![A.to_string()]);
    }

    #[test]
    fn an_images_layers_are_shared_and_released_with_the_last_image_holding_them() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, t2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let c = "c".repeat(64);
        let mut store = ContentStore::open(dir.path()).unwrap();
        store.hold_also(t1, A).unwrap();
        store.hold_also(t1, B).unwrap();
        store.hold_exactly(t2, &[B.to_string(), c.clone()]).unwrap();
        let mut store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(
            store.refs().blobs[B].len(),
            2,
            "the shared layer counts both"
        );
        // t1 moves to a new image without A: A is released, B stays (t2 holds it).
        assert_eq!(
            store.hold_exactly(t1, std::slice::from_ref(&c)).unwrap(),
            vec![A.to_string()]
        );
        assert_eq!(store.release(t2, None).unwrap(), vec![B.to_string()]);
        assert_eq!(store.release(t1, None).unwrap(), vec![c]);
    }

    #[test]
    fn a_verified_blob_released_with_a_deferral_is_kept_and_taken_back_without_a_download() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, t2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut store = ContentStore::open(dir.path()).unwrap();
        store.hold(t1, A, None).unwrap();
        fs::write(store.blob_path(A), b"a").unwrap();
        let until = Utc::now() + chrono::Duration::seconds(60);
        assert!(store.release(t1, Some(until)).unwrap().is_empty(), "kept");
        assert_eq!(store.refs().deferred.get(A), Some(&until));
        assert!(store.hold(t2, A, None).unwrap().is_empty());
        assert!(store.refs().deferred.is_empty(), "held again");
    }

    #[test]
    fn garbage_is_what_no_configured_tree_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, t2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut store = ContentStore::open(dir.path()).unwrap();
        store.hold(t1, A, None).unwrap();
        store.hold(t2, B, None).unwrap();
        fs::write(store.blob_path(A), b"a").unwrap();
        fs::write(store.partial_path(B), b"b").unwrap();
        fs::write(store.partial_path("stray"), b"x").unwrap();
        store
            .collect_garbage(&BTreeSet::from([t1]), Utc::now())
            .unwrap();
        assert!(store.blob_path(A).exists());
        assert!(!store.partial_path(B).exists());
        assert!(!store.partial_path("stray").exists());
        assert_eq!(
            ContentStore::open(dir.path()).unwrap().held_by(t2),
            None,
            "the dropped reference is durable"
        );
    }

    #[test]
    fn a_promoted_blob_is_read_only_and_its_partial_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        fs::write(store.partial_path(A), b"content").unwrap();
        let blob = store.promote(A).unwrap();
        assert_eq!(
            fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
            0o444
        );
        assert!(!store.partial_path(A).exists());
    }
}

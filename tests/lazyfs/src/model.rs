//! The file system as two states: what a reader sees now (the page cache) and what the disk
//! holds (durable). FUSE requests change the live state; fsync of a file or a directory makes
//! that object's live state durable; a crash keeps only the durable state.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

/// The inode number of the root directory (FUSE's).
pub const ROOT: u64 = 1;

/// What survives a power cut besides what was fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// Nothing unsynced survives: LazyFS's and ALICE's base model.
    #[default]
    DropAll,
    /// Every directory change reached the disk, no unsynced file data did: the outcome of a
    /// file system that commits metadata without waiting for data (a rename of a file whose data
    /// was never fsynced leaves an empty or old file under the new name).
    KeepEntries,
}

#[derive(Debug, Clone)]
pub(crate) enum Body {
    File {
        live: Vec<u8>,
        durable: Vec<u8>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
        parent: u64,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub body: Body,
    pub mode: u32,
    pub mtime: SystemTime,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }
    pub fn size(&self) -> u64 {
        match &self.body {
            Body::File { live, .. } => live.len() as u64,
            Body::Dir { live, .. } => live.len() as u64,
        }
    }
}

/// The state behind the mount, shared between the FUSE thread and the test's handle.
#[derive(Debug)]
pub struct Model {
    pub(crate) nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Changing or syncing requests since the last [`Model::reset_ops`] or arm.
    ops: u64,
    crash_after: Option<u64>,
    /// The counted request that fails with EIO, changing nothing (a disk error).
    fail_at: Option<u64>,
    crashed: bool,
    mode: CrashMode,
    /// The operations counted since the last reset, for a failure's message.
    log: Vec<String>,
}

/// Why a request failed, as an errno.
pub type Errno = i32;

impl Model {
    /// An empty file system.
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                body: Body::Dir {
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: ROOT,
                },
                mode: 0o755,
                mtime: SystemTime::now(),
            },
        );
        Self {
            nodes,
            next_ino: ROOT + 1,
            ops: 0,
            crash_after: None,
            fail_at: None,
            crashed: false,
            mode: CrashMode::DropAll,
            log: Vec::new(),
        }
    }

    /// The file system the backing directory holds: all of it durable.
    pub fn load(backing: &Path) -> io::Result<Self> {
        let mut model = Self::new();
        let mut seen = HashMap::new();
        model.load_dir(backing, ROOT, &mut seen)?;
        Ok(model)
    }

    fn load_dir(
        &mut self,
        dir: &Path,
        ino: u64,
        seen: &mut HashMap<(u64, u64), u64>,
    ) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            let child = if let Some(known) = seen.get(&(meta.dev(), meta.ino())) {
                *known
            } else {
                let child = self.alloc();
                let body = if meta.is_dir() {
                    Body::Dir {
                        live: BTreeMap::new(),
                        durable: BTreeMap::new(),
                        parent: ino,
                    }
                } else if meta.is_file() {
                    let data = fs::read(entry.path())?;
                    Body::File {
                        live: data.clone(),
                        durable: data,
                    }
                } else {
                    return Err(io::Error::other(format!(
                        "{}: only files and directories are modelled",
                        entry.path().display()
                    )));
                };
                self.nodes.insert(
                    child,
                    Node {
                        body,
                        mode: meta.mode() & 0o7777,
                        mtime: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                    },
                );
                if meta.is_dir() {
                    self.load_dir(&entry.path(), child, seen)?;
                } else {
                    seen.insert((meta.dev(), meta.ino()), child);
                }
                child
            };
            if let Some(Body::Dir { live, durable, .. }) =
                self.nodes.get_mut(&ino).map(|n| &mut n.body)
            {
                live.insert(entry.file_name(), child);
                durable.insert(entry.file_name(), child);
            }
        }
        Ok(())
    }

    /// Writes the durable state into `backing`, replacing what it held: the disk after the cut.
    pub fn store(&self, backing: &Path) -> io::Result<()> {
        for entry in fs::read_dir(backing)? {
            let path = entry?.path();
            if fs::symlink_metadata(&path)?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        let mut written = HashMap::new();
        self.store_dir(ROOT, backing, &mut written)
    }

    fn store_dir(
        &self,
        ino: u64,
        dir: &Path,
        written: &mut HashMap<u64, std::path::PathBuf>,
    ) -> io::Result<()> {
        let Some(Body::Dir { durable, .. }) = self.nodes.get(&ino).map(|n| &n.body) else {
            return Ok(());
        };
        for (name, child) in durable {
            let path = dir.join(name);
            let Some(node) = self.nodes.get(child) else {
                continue;
            };
            match &node.body {
                Body::Dir { .. } => {
                    fs::create_dir(&path)?;
                    self.store_dir(*child, &path, written)?;
                }
                Body::File { durable, .. } => {
                    if let Some(first) = written.get(child) {
                        fs::hard_link(first, &path)?;
                        continue;
                    }
                    fs::write(&path, durable)?;
                    written.insert(*child, path.clone());
                }
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(node.mode))?;
        }
        Ok(())
    }

    fn alloc(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    // ---- crash control ---------------------------------------------------------------------

    pub fn set_mode(&mut self, mode: CrashMode) {
        self.mode = mode;
    }

    /// Counts from zero again and crashes after the `n`-th counted request (at once for 0).
    pub fn arm(&mut self, n: u64) {
        self.reset_ops();
        self.crash_after = Some(n);
        if n == 0 {
            self.freeze();
        }
    }

    pub fn reset_ops(&mut self) {
        self.ops = 0;
        self.fail_at = None;
        self.log.clear();
    }

    /// Counts from zero and fails the `n`-th counted request (from 1) with EIO: it changes
    /// nothing and the ones after it run normally.
    pub fn fail_at(&mut self, n: u64) {
        self.reset_ops();
        self.fail_at = Some(n);
    }

    pub fn ops(&self) -> u64 {
        self.ops
    }

    pub fn log(&self) -> &[String] {
        &self.log
    }

    pub fn crashed(&self) -> bool {
        self.crashed
    }

    /// The power goes out: what is durable now is all the disk will hold; every later request
    /// fails with EIO until [`Model::reboot`].
    pub fn freeze(&mut self) {
        if self.crashed {
            return;
        }
        self.crashed = true;
        self.crash_after = None;
        if self.mode == CrashMode::KeepEntries {
            for node in self.nodes.values_mut() {
                if let Body::Dir { live, durable, .. } = &mut node.body {
                    *durable = live.clone();
                }
            }
        }
    }

    /// Power back on (crashing first if still running): the live state becomes the durable
    /// one; objects no durable entry reaches are gone.
    pub fn reboot(&mut self) {
        self.freeze();
        let mut reachable = vec![(ROOT, ROOT)];
        let mut keep = HashMap::new();
        while let Some((ino, parent)) = reachable.pop() {
            if keep.insert(ino, ()).is_some() {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            match &mut node.body {
                Body::File { live, durable } => *live = durable.clone(),
                Body::Dir {
                    live,
                    durable,
                    parent: p,
                } => {
                    *live = durable.clone();
                    *p = parent;
                    reachable.extend(durable.values().map(|child| (*child, ino)));
                }
            }
        }
        self.nodes.retain(|ino, _| keep.contains_key(ino));
        self.crashed = false;
        self.crash_after = None;
        self.reset_ops();
    }

    /// A clean shutdown: everything becomes durable (as `sync` before an unmount).
    pub fn sync_all(&mut self) {
        if self.crashed {
            return;
        }
        for node in self.nodes.values_mut() {
            match &mut node.body {
                Body::File { live, durable } => *durable = live.clone(),
                Body::Dir { live, durable, .. } => *durable = live.clone(),
            }
        }
    }

    fn begin(&self) -> Result<(), Errno> {
        if self.crashed { Err(libc::EIO) } else { Ok(()) }
    }

    /// Before a changing or syncing request: refused after the crash, or failed if it is the
    /// one chosen to fail (counted, not carried out).
    fn change(&mut self) -> Result<(), Errno> {
        self.begin()?;
        if self.fail_at == Some(self.ops + 1) {
            self.count("failed with EIO (injected)".into());
            return Err(libc::EIO);
        }
        Ok(())
    }

    /// Counts a changing or syncing request that was carried out, and crashes if it was the
    /// armed one.
    fn count(&mut self, what: String) {
        self.ops += 1;
        self.log.push(what);
        if self.crash_after == Some(self.ops) {
            self.freeze();
        }
    }

    // ---- reading -----------------------------------------------------------------------------

    pub(crate) fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.begin()?;
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    /// `ino` even after the crash: for the reply to the request that was counted last.
    pub(crate) fn peek(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn dir_live(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.nodes.get(&ino).ok_or(libc::ENOENT)?.body {
            Body::Dir { live, .. } => Ok(live),
            Body::File { .. } => Err(libc::ENOTDIR),
        }
    }

    fn dir_live_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?.body {
            Body::Dir { live, .. } => Ok(live),
            Body::File { .. } => Err(libc::ENOTDIR),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.begin()?;
        self.dir_live(parent)?
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// Live links to `ino`, for `st_nlink`.
    pub fn nlink(&self, ino: u64) -> u32 {
        let links = self
            .nodes
            .values()
            .filter_map(|n| match &n.body {
                Body::Dir { live, .. } => Some(live.values().filter(|c| **c == ino).count()),
                Body::File { .. } => None,
            })
            .sum::<usize>();
        u32::try_from(links.max(1)).unwrap_or(u32::MAX)
    }

    /// `.`, `..` and the live entries with their kinds.
    pub fn list(&self, ino: u64) -> Result<Vec<(u64, bool, OsString)>, Errno> {
        self.begin()?;
        let Body::Dir { live, parent, .. } = &self.nodes.get(&ino).ok_or(libc::ENOENT)?.body else {
            return Err(libc::ENOTDIR);
        };
        let mut out = vec![(ino, true, ".".into()), (*parent, true, "..".into())];
        for (name, child) in live {
            let is_dir = self.nodes.get(child).is_some_and(Node::is_dir);
            out.push((*child, is_dir, name.clone()));
        }
        Ok(out)
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        self.begin()?;
        match &self.nodes.get(&ino).ok_or(libc::ENOENT)?.body {
            Body::File { live, .. } => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(live.len());
                let end = start.saturating_add(size as usize).min(live.len());
                Ok(live[start..end].to_vec())
            }
            Body::Dir { .. } => Err(libc::EISDIR),
        }
    }

    // ---- changing ----------------------------------------------------------------------------

    fn name_of(&self, parent: u64, name: &OsStr) -> String {
        let mut path = vec![name.to_string_lossy().into_owned()];
        let mut at = parent;
        while at != ROOT {
            let Some(Body::Dir { parent: up, .. }) = self.nodes.get(&at).map(|n| &n.body) else {
                break;
            };
            let Ok(entries) = self.dir_live(*up) else {
                break;
            };
            match entries.iter().find(|(_, c)| **c == at) {
                Some((n, _)) => path.push(n.to_string_lossy().into_owned()),
                None => path.push(format!("<dir {at}>")),
            }
            at = *up;
        }
        path.reverse();
        path.join("/")
    }

    fn path_of(&self, ino: u64) -> String {
        let parent = self.nodes.iter().find_map(|(p, n)| match &n.body {
            Body::Dir { live, .. } => live
                .iter()
                .find(|(_, c)| **c == ino)
                .map(|(name, _)| (*p, name.clone())),
            Body::File { .. } => None,
        });
        match parent {
            Some((p, name)) => self.name_of(p, &name),
            None if ino == ROOT => "/".into(),
            None => format!("<unlinked {ino}>"),
        }
    }

    /// A new file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        dir: bool,
    ) -> Result<u64, Errno> {
        self.change()?;
        if self.dir_live(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.alloc();
        let body = if dir {
            Body::Dir {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                parent,
            }
        } else {
            Body::File {
                live: Vec::new(),
                durable: Vec::new(),
            }
        };
        self.nodes.insert(
            ino,
            Node {
                body,
                mode: mode & 0o7777,
                mtime: SystemTime::now(),
            },
        );
        self.dir_live_mut(parent)?.insert(name.to_owned(), ino);
        let what = format!(
            "{} {}",
            if dir { "mkdir" } else { "create" },
            self.name_of(parent, name)
        );
        self.count(what);
        Ok(ino)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.change()?;
        if self.nodes.get(&ino).ok_or(libc::ENOENT)?.is_dir() {
            return Err(libc::EPERM);
        }
        if self.dir_live(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let what = format!(
            "link {} -> {}",
            self.path_of(ino),
            self.name_of(parent, name)
        );
        self.dir_live_mut(parent)?.insert(name.to_owned(), ino);
        self.count(what);
        Ok(())
    }

    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        self.change()?;
        let ino = self.lookup(parent, name)?;
        match (&self.nodes.get(&ino).ok_or(libc::ENOENT)?.body, dir) {
            (Body::Dir { live, .. }, true) if !live.is_empty() => return Err(libc::ENOTEMPTY),
            (Body::Dir { .. }, false) => return Err(libc::EISDIR),
            (Body::File { .. }, true) => return Err(libc::ENOTDIR),
            _ => {}
        }
        let what = format!(
            "{} {}",
            if dir { "rmdir" } else { "unlink" },
            self.name_of(parent, name)
        );
        self.dir_live_mut(parent)?.remove(name);
        self.count(what);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        self.change()?;
        let ino = self.lookup(parent, name)?;
        let is_dir = self.nodes.get(&ino).ok_or(libc::ENOENT)?.is_dir();
        if let Some(target) = self.dir_live(new_parent)?.get(new_name).copied() {
            if no_replace {
                return Err(libc::EEXIST);
            }
            if target == ino {
                return Ok(());
            }
            match (&self.nodes.get(&target).ok_or(libc::ENOENT)?.body, is_dir) {
                (Body::Dir { live, .. }, true) if !live.is_empty() => {
                    return Err(libc::ENOTEMPTY);
                }
                (Body::Dir { .. }, false) => return Err(libc::EISDIR),
                (Body::File { .. }, true) => return Err(libc::ENOTDIR),
                _ => {}
            }
        }
        if is_dir {
            // Not into its own subtree.
            let mut at = new_parent;
            while at != ROOT {
                if at == ino {
                    return Err(libc::EINVAL);
                }
                match self.nodes.get(&at).map(|n| &n.body) {
                    Some(Body::Dir { parent, .. }) => at = *parent,
                    _ => break,
                }
            }
        }
        let what = format!(
            "rename {} -> {}",
            self.name_of(parent, name),
            self.name_of(new_parent, new_name)
        );
        self.dir_live_mut(parent)?.remove(name);
        self.dir_live_mut(new_parent)?
            .insert(new_name.to_owned(), ino);
        if let Some(Body::Dir { parent: p, .. }) = self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            *p = new_parent;
        }
        self.count(what);
        Ok(())
    }

    /// `renameat2(RENAME_EXCHANGE)`: the two names swap their objects.
    pub fn exchange(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<(), Errno> {
        self.change()?;
        let a = self.lookup(parent, name)?;
        let b = self.lookup(new_parent, new_name)?;
        let what = format!(
            "exchange {} <-> {}",
            self.name_of(parent, name),
            self.name_of(new_parent, new_name)
        );
        self.dir_live_mut(parent)?.insert(name.to_owned(), b);
        self.dir_live_mut(new_parent)?
            .insert(new_name.to_owned(), a);
        for (ino, up) in [(a, new_parent), (b, parent)] {
            if let Some(Body::Dir { parent: p, .. }) = self.nodes.get_mut(&ino).map(|n| &mut n.body)
            {
                *p = up;
            }
        }
        self.count(what);
        Ok(())
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        self.change()?;
        let what = format!(
            "write {} bytes at {offset} to {}",
            data.len(),
            self.path_of(ino)
        );
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        let Body::File { live, .. } = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let start = usize::try_from(offset).map_err(|_| libc::EFBIG)?;
        let end = start.checked_add(data.len()).ok_or(libc::EFBIG)?;
        if live.len() < end {
            live.resize(end, 0);
        }
        live[start..end].copy_from_slice(data);
        node.mtime = SystemTime::now();
        self.count(what);
        Ok(data.len())
    }

    /// `truncate` and `chmod`; times are accepted and ignored.
    pub fn set_attr(
        &mut self,
        ino: u64,
        size: Option<u64>,
        mode: Option<u32>,
    ) -> Result<(), Errno> {
        self.begin()?;
        if size.is_none() && mode.is_none() {
            return Ok(());
        }
        self.change()?;
        let what = format!(
            "setattr {} size {size:?} mode {:?}",
            self.path_of(ino),
            mode.map(|m| format!("{:o}", m & 0o7777))
        );
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        if let Some(size) = size {
            let Body::File { live, .. } = &mut node.body else {
                return Err(libc::EISDIR);
            };
            live.resize(usize::try_from(size).map_err(|_| libc::EFBIG)?, 0);
            node.mtime = SystemTime::now();
        }
        if let Some(mode) = mode {
            node.mode = mode & 0o7777;
        }
        self.count(what);
        Ok(())
    }

    /// fsync or fdatasync of a file, fsync of a directory: its live state becomes durable.
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        self.change()?;
        let what = format!("fsync {}", self.path_of(ino));
        match &mut self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?.body {
            Body::File { live, durable } => *durable = live.clone(),
            Body::Dir { live, durable, .. } => *durable = live.clone(),
        }
        self.count(what);
        Ok(())
    }
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(model: &mut Model, parent: u64, name: &str, data: &[u8]) -> u64 {
        let ino = model.create(parent, name.as_ref(), 0o644, false).unwrap();
        model.write(ino, 0, data).unwrap();
        ino
    }

    fn content(model: &Model, parent: u64, name: &str) -> Option<Vec<u8>> {
        let ino = model.lookup(parent, name.as_ref()).ok()?;
        model.read(ino, 0, u32::MAX).ok()
    }

    #[test]
    fn unsynced_data_and_entries_are_lost_at_a_crash() {
        let mut model = Model::new();
        let a = file(&mut model, ROOT, "a", b"one");
        model.sync(a).unwrap();
        model.sync(ROOT).unwrap();
        model.write(a, 0, b"two").unwrap();
        file(&mut model, ROOT, "b", b"x");
        assert_eq!(content(&model, ROOT, "a").unwrap(), b"two");
        model.reboot();
        assert_eq!(content(&model, ROOT, "a").unwrap(), b"one");
        assert!(content(&model, ROOT, "b").is_none());
    }

    #[test]
    fn a_rename_is_durable_only_with_its_directory() {
        let mut model = Model::new();
        let old = file(&mut model, ROOT, "rec", b"old");
        model.sync(old).unwrap();
        model.sync(ROOT).unwrap();
        let new = file(&mut model, ROOT, ".rec.tmp", b"new");
        model.sync(new).unwrap();
        model
            .rename(ROOT, ".rec.tmp".as_ref(), ROOT, "rec".as_ref(), false)
            .unwrap();
        model.reboot();
        assert_eq!(content(&model, ROOT, "rec").unwrap(), b"old");
    }

    #[test]
    fn keep_entries_renames_but_loses_unsynced_data() {
        let mut model = Model::new();
        model.set_mode(CrashMode::KeepEntries);
        file(&mut model, ROOT, ".rec.tmp", b"new");
        model
            .rename(ROOT, ".rec.tmp".as_ref(), ROOT, "rec".as_ref(), false)
            .unwrap();
        model.reboot();
        assert_eq!(content(&model, ROOT, "rec").unwrap(), b"");
    }

    #[test]
    fn a_crash_after_the_nth_request_refuses_the_rest() {
        let mut model = Model::new();
        model.arm(2);
        let a = file(&mut model, ROOT, "a", b"1"); // create, write: 2 requests
        assert!(model.crashed());
        assert_eq!(model.sync(a), Err(libc::EIO));
        model.reboot();
        assert!(content(&model, ROOT, "a").is_none());
    }

    #[test]
    fn an_injected_failure_changes_nothing_and_the_rest_goes_on() {
        let mut model = Model::new();
        model.fail_at(3);
        let a = file(&mut model, ROOT, "a", b"1");
        assert_eq!(model.sync(a), Err(libc::EIO));
        model.sync(a).unwrap();
        model.sync(ROOT).unwrap();
        model.reboot();
        assert_eq!(content(&model, ROOT, "a").unwrap(), b"1");
    }

    #[test]
    fn hard_links_and_directories_round_trip_through_the_backing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        let sub = model.create(ROOT, "sub".as_ref(), 0o750, true).unwrap();
        let a = file(&mut model, sub, "a", b"data");
        model.link(a, sub, "a.bak".as_ref()).unwrap();
        model.sync_all();
        model.store(dir.path()).unwrap();
        let loaded = Model::load(dir.path()).unwrap();
        let sub = loaded.lookup(ROOT, "sub".as_ref()).unwrap();
        assert_eq!(
            loaded.lookup(sub, "a".as_ref()),
            loaded.lookup(sub, "a.bak".as_ref())
        );
        assert_eq!(content(&loaded, sub, "a").unwrap(), b"data");
    }
}

//! cairn-lazyfs: a FUSE file system that loses what a power cut loses, for testing crash safety
//! of code that writes durable files (in the spirit of LazyFS and of ALICE's model).
//!
//! # The model
//!
//! The backing directory is the disk. At mount its tree is read into memory, all of it durable.
//! Every request through the mount changes the *live* state, which is what any reader of the
//! mount sees (the page cache). Per object, the live state becomes *durable* only by:
//!
//! - a file's data (its bytes and size): `fsync` or `fdatasync` of that file;
//! - a directory's entries (create, mkdir, link, unlink, rmdir, rename into or out of it):
//!   `fsync` of that directory. A rename across directories is two entry changes, each durable
//!   with its own directory; a new directory is reachable after a crash only once its parent
//!   was fsynced, and its own entries only once it was.
//!
//! A *crash* ([`LazyFs::crash_after`], [`LazyFs::crash_now`]) keeps only the durable state; from
//! that instant every request fails with EIO (the power is off: the workload cannot go on, so
//! a call that returned success returned before the crash). [`LazyFs::reboot`] then makes the
//! durable state the live one, drops what no durable entry reaches, and writes it into the
//! backing directory. A clean [`LazyFs::unmount`] syncs everything first, as `umount` does.
//!
//! [`CrashMode::KeepEntries`] is the other outcome a power cut can have: every directory change
//! reached the disk but no unsynced file data did (a file system that commits metadata without
//! waiting for data). It catches a rename of a file whose data was never fsynced, which
//! [`CrashMode::DropAll`] hides by dropping the rename too.
//!
//! [`LazyFs::fail_at`] injects a disk error instead: the chosen request fails with EIO and
//! changes nothing (a failed fsync makes nothing durable), and the workload goes on; a crash
//! afterwards shows whether a failure was acknowledged as a success.
//!
//! # Limits
//!
//! - Each request is atomic: no torn writes, no reordering or partial persistence of the
//!   unsynced writes of one file, and no arbitrary subset of the unsynced directory changes
//!   survives: all of them ([`CrashMode::KeepEntries`]) or none ([`CrashMode::DropAll`]).
//!   Cutting after every request in `KeepEntries` covers every in-order prefix (a journal's
//!   outcome), not a reordered subset.
//! - An injected EIO fails one whole request; a write is not partly applied. What a real
//!   file system does to the page cache after a failed fsync (ext4 marks it clean) is not
//!   modelled: here the data stays dirty and a later fsync can still make it durable.
//! - A mode change is durable at once, not with its file's fsync; times, owners and xattrs are
//!   not modelled (owners are those of the mounting user); no symlinks, devices or mmap.
//! - The kernel caches nothing (attribute and entry timeouts 0, direct I/O), so a read always
//!   reaches the model; fine for records, slow for bulk data.
//! - It is meant for small trees: the whole state lives in memory.
//!
//! Mounting needs a usable `/dev/fuse` and root: `fuser` without libfuse mounts with mount(2)
//! (as non-root it would fall back to a setuid `fusermount`). [`fuse_unusable`] says why not,
//! for a test that must skip.

#![allow(clippy::too_many_arguments)] // the FUSE trait's signatures

mod model;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

pub use model::{CrashMode, Model};

/// Nothing is cached by the kernel: every lookup and read reaches the model, so a reboot is
/// seen at once.
const TTL: Duration = Duration::ZERO;

#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    #[error("cannot read the backing directory {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the durable state into the backing directory {}: {source}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount the lazy file system on {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why FUSE cannot be used here, or `None` when it can.
pub fn fuse_unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/fuse cannot be opened: {e}")),
    }
}

/// A mounted lazy file system.
pub struct LazyFs {
    model: Arc<Mutex<Model>>,
    backing: PathBuf,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl LazyFs {
    /// Mounts the tree of `backing` (all durable) on `mountpoint`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Self, LazyFsError> {
        let model = Model::load(backing).map_err(|source| LazyFsError::Load {
            path: backing.to_path_buf(),
            source,
        })?;
        let model = Arc::new(Mutex::new(model));
        let options = [
            MountOption::FSName("cairn-lazyfs".into()),
            MountOption::Subtype("lazyfs".into()),
            MountOption::RW,
            MountOption::NoAtime,
        ];
        let session =
            fuser::spawn_mount2(Fuse(model.clone()), mountpoint, &options).map_err(|source| {
                LazyFsError::Mount {
                    path: mountpoint.to_path_buf(),
                    source,
                }
            })?;
        Ok(Self {
            model,
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// What survives a crash besides what was fsynced (default [`CrashMode::DropAll`]).
    pub fn set_mode(&self, mode: CrashMode) {
        self.model().set_mode(mode);
    }

    /// Requests that changed or synced something since the last count reset (arm, reboot or
    /// [`LazyFs::reset_ops`]): the crash points of a workload.
    pub fn ops(&self) -> u64 {
        self.model().ops()
    }

    pub fn reset_ops(&self) {
        self.model().reset_ops();
    }

    /// The counted requests since the last reset, one line each: where a crash point is.
    pub fn op_log(&self) -> Vec<String> {
        self.model().log().to_vec()
    }

    /// Makes everything durable, as `sync(2)`; not counted as a request.
    pub fn sync(&self) {
        self.model().sync_all();
    }

    /// Counts from zero and cuts the power right after the `n`-th counted request (0: now).
    pub fn crash_after(&self, n: u64) {
        self.model().arm(n);
    }

    /// Counts from zero and fails the `n`-th counted request (from 1) with EIO, changing
    /// nothing; the requests after it run as usual. A disk error, as on a failed fsync.
    pub fn fail_at(&self, n: u64) {
        self.model().fail_at(n);
    }

    pub fn crash_now(&self) {
        self.model().freeze();
    }

    pub fn crashed(&self) -> bool {
        self.model().crashed()
    }

    /// Power on again after a crash (crashing now if it did not yet): only the durable state
    /// is left, in the mount and in the backing directory.
    pub fn reboot(&self) -> Result<(), LazyFsError> {
        let mut model = self.model();
        model.reboot();
        model
            .store(&self.backing)
            .map_err(|source| LazyFsError::Store {
                path: self.backing.clone(),
                source,
            })
    }

    /// A clean unmount: everything is synced and written into the backing directory.
    pub fn unmount(mut self) -> Result<(), LazyFsError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), LazyFsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        unmount(&self.mountpoint);
        session.join();
        let mut model = self.model();
        model.sync_all();
        model.reboot();
        model
            .store(&self.backing)
            .map_err(|source| LazyFsError::Store {
                path: self.backing.clone(),
                source,
            })
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lazyfs: {e}");
        }
    }
}

/// Unmounts, retrying while busy: a child forked by another thread of the test process holds
/// copies of its open files until it execs, and a busy unmount would leave the session's join
/// waiting for ever. Lazily at last, so that the session ends when the last file closes.
fn unmount(mountpoint: &Path) {
    let umount = |lazy: bool| {
        let mut command = std::process::Command::new("umount");
        if lazy {
            command.arg("-l");
        }
        command
            .arg(mountpoint)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for _ in 0..50 {
        if umount(false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !umount(true) {
        eprintln!("lazyfs: cannot unmount {}", mountpoint.display());
    }
}

fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    // A panic in a request handler leaves a model that is still consistent per request.
    model
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The FUSE side: each request locks the model for its duration.
struct Fuse(Arc<Mutex<Model>>);

/// The attributes of `ino`, also for the reply to the request the power was cut after.
fn attr(model: &Model, ino: u64, req: &Request<'_>) -> Result<FileAttr, i32> {
    let node = model.peek(ino)?;
    let size = node.size();
    Ok(FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: node.mtime,
        mtime: node.mtime,
        ctime: node.mtime,
        crtime: UNIX_EPOCH,
        kind: if node.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: u16::try_from(node.mode & 0o7777).unwrap_or(0o600),
        nlink: if node.is_dir() { 2 } else { model.nlink(ino) },
        uid: req.uid(),
        gid: req.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

impl Fuse {
    fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.0)
    }

    fn entry(&self, req: &Request<'_>, result: Result<u64, i32>, reply: ReplyEntry) {
        let model = self.model();
        match result.and_then(|ino| attr(&model, ino, req)) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(result: Result<(), i32>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Fuse {
    fn lookup(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = self.model().lookup(parent, name);
        self.entry(req, found, reply);
    }

    fn getattr(&mut self, req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let model = self.model();
        match model.node(ino).and_then(|_| attr(&model, ino, req)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut model = self.model();
        match model
            .set_attr(ino, size, mode)
            .and_then(|()| attr(&model, ino, req))
        {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(libc::EPERM);
            return;
        }
        let made = self.model().create(parent, name, mode & !umask, false);
        self.entry(req, made, reply);
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.model().create(parent, name, mode & !umask, true);
        self.entry(req, made, reply);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(self.model().remove(parent, name, false), reply);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(self.model().remove(parent, name, true), reply);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut model = self.model();
        let done = match flags {
            0 => model.rename(parent, name, newparent, newname, false),
            libc::RENAME_NOREPLACE => model.rename(parent, name, newparent, newname, true),
            libc::RENAME_EXCHANGE => model.exchange(parent, name, newparent, newname),
            _ => Err(libc::EINVAL),
        };
        empty(done, reply);
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let linked = self.model().link(ino, newparent, newname).map(|()| ino);
        self.entry(req, linked, reply);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.model().node(ino) {
            Ok(_) => reply.opened(0, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let offset = u64::try_from(offset).unwrap_or(0);
        match self.model().read(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(libc::EINVAL);
            return;
        };
        match self.model().write(ino, offset, data) {
            Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        empty(self.model().sync(ino), reply);
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.model().node(ino) {
            Ok(n) if n.is_dir() => reply.opened(0, 0),
            Ok(_) => reply.error(libc::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model().list(ino) {
            Ok(entries) => entries,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, (child, is_dir, name)) in entries.into_iter().enumerate().skip(skip) {
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
            if reply.add(child, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _d: bool, reply: ReplyEmpty) {
        empty(self.model().sync(ino), reply);
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255, 4096);
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        empty(self.model().node(ino).map(|_| ()), reply);
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut model = self.model();
        match model
            .create(parent, name, mode & !umask, false)
            .and_then(|ino| attr(&model, ino, req))
        {
            Ok(a) => reply.created(&TTL, &a, 0, 0, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }
}

//! Being told when the local config file may have changed: an inotify watch on its directory.
//!
//! The directory is watched, not the file: a config replaced by rename (the way editors and
//! `cairn` tooling write it) is a new inode that a watch on the old file would never see.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("config file {path}: it has no file name to watch")]
    NoFileName { path: PathBuf },
    #[error("config file {path}: cannot watch its directory {dir}: {source}")]
    Watch {
        path: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(
        "config file {path}: the watch on its directory {dir} ended (directory removed or moved, or events lost)"
    )]
    Ended { path: PathBuf, dir: PathBuf },
}

/// The inotify instance, as tokio's reactor wants it (nix's type has `AsFd` only).
struct OwnedInotify(Inotify);

impl std::os::fd::AsRawFd for OwnedInotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify watch on the directory of one file, woken by the events that name that file.
pub struct FileWatch {
    inotify: AsyncFd<OwnedInotify>,
    path: PathBuf,
    dir: PathBuf,
    name: OsString,
}

impl FileWatch {
    /// Starts watching. Events that happen from now on are kept until `changed` reads them,
    /// so a change between a read of the file and the next `changed` is not lost.
    pub fn new(path: &Path) -> Result<Self, WatchError> {
        let name = path
            .file_name()
            .ok_or_else(|| WatchError::NoFileName {
                path: path.to_path_buf(),
            })?
            .to_os_string();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let failed = |source: io::Error| WatchError::Watch {
            path: path.to_path_buf(),
            dir: dir.clone(),
            source,
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| failed(e.into()))?;
        // A complete write (close after writing), a rename onto the name, a removal; plain
        // IN_MODIFY is left out so a half-written file is not read.
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        inotify
            .add_watch(&dir, mask)
            .map_err(|e| failed(e.into()))?;
        // SAFETY: `OwnedInotify` owns its descriptor and never replaces it; the AsyncFd owns the
        // `OwnedInotify`, so the descriptor stays open and the same for the AsyncFd's lifetime.
        #[allow(unsafe_code)]
        let inotify =
            unsafe { AsyncFd::register(OwnedInotify(inotify)) }.map_err(|e| failed(e.into()))?;
        Ok(Self {
            inotify,
            path: path.to_path_buf(),
            dir,
            name,
        })
    }

    /// Returns when an event names the file. An error means the watch is over (its directory
    /// went away, or the kernel's queue overflowed): the caller re-reads and watches anew.
    pub async fn changed(&mut self) -> Result<(), WatchError> {
        loop {
            let mut ready = self.inotify.readable().await.map_err(|_| self.ended())?;
            let events = match ready.get_inner().0.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(_) => return Err(self.ended()),
            };
            let mut named = false;
            for event in &events {
                let whole_dir = AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_Q_OVERFLOW;
                if event.mask.intersects(whole_dir) {
                    return Err(self.ended());
                }
                named |= event.name.as_deref() == Some(self.name.as_os_str());
            }
            if named {
                return Ok(());
            }
        }
    }

    fn ended(&self) -> WatchError {
        WatchError::Ended {
            path: self.path.clone(),
            dir: self.dir.clone(),
        }
    }
}

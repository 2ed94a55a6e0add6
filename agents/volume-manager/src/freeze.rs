//! A container frozen while its volumes are snapshotted (a live create with
//! `VolumesSnapshotConfig.freeze_cgroup`): its processes stop between two instructions, so
//! the snapshots of all its volumes are of one moment. The cgroup freezer does it directly
//! (cgroup v1 `freezer.state`, v2 `cgroup.freeze`): no runtime process to start inside the
//! pause, which is the time reported.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the kernel may take to stop every task of the cgroup (a task in an uninterruptible
/// sleep holds it): past this the container is thawed and the snapshot not taken.
const FREEZE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("container cgroup {cgroup}: no freezer at {} ({source}); is the container running?", path.display())]
    NoFreezer {
        cgroup: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container cgroup {cgroup}: {what} {}: {source}", path.display())]
    Io {
        cgroup: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "container cgroup {cgroup}: not frozen within {within:?} (a task stuck in the kernel?); thawed again"
    )]
    Timeout { cgroup: String, within: Duration },
}

/// Which freezer interface the host has.
#[derive(Debug, Clone, Copy)]
enum Version {
    V1,
    V2,
}

/// A frozen container cgroup; [`Frozen::thaw`] ends the pause. Dropped without a thaw it stays
/// frozen: a restarted volume-manager thaws it ([`thaw`]) before it resumes the create.
#[derive(Debug)]
pub struct Frozen {
    cgroup: String,
    version: Version,
    dir: PathBuf,
    since: Instant,
    /// How long the kernel took to stop every task (a task in the kernel, in a `sync` say,
    /// stops only when it returns).
    pub stopping: Duration,
}

/// The freezer of `cgroup` under the cgroup mount `root` (`/sys/fs/cgroup`): v1 when a freezer
/// hierarchy is mounted, else the unified v2 tree.
fn locate(root: &Path, cgroup: &str) -> (Version, PathBuf) {
    let relative = cgroup.trim_start_matches('/');
    let v1 = root.join("freezer");
    if v1.join("freezer.state").exists() || v1.join("cgroup.procs").exists() {
        (Version::V1, v1.join(relative))
    } else {
        (Version::V2, root.join(relative))
    }
}

fn control(version: Version) -> &'static str {
    match version {
        Version::V1 => "freezer.state",
        Version::V2 => "cgroup.freeze",
    }
}

#[allow(clippy::disallowed_methods)] // on the blocking pool
fn write(cgroup: &str, path: PathBuf, value: &str) -> Result<(), FreezeError> {
    std::fs::write(&path, value).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FreezeError::NoFreezer {
                cgroup: cgroup.to_string(),
                path,
                source,
            }
        } else {
            FreezeError::Io {
                cgroup: cgroup.to_string(),
                what: "cannot write",
                path,
                source,
            }
        }
    })
}

/// Whether every task of the cgroup has stopped. On v1 the read itself is what moves the state
/// from FREEZING to FROZEN (the kernel checks the tasks then), so it is asked, not waited for.
#[allow(clippy::disallowed_methods)] // on the blocking pool
fn is_frozen(cgroup: &str, version: Version, dir: &Path) -> Result<bool, FreezeError> {
    let path = match version {
        Version::V1 => dir.join("freezer.state"),
        Version::V2 => dir.join("cgroup.events"),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| FreezeError::Io {
        cgroup: cgroup.to_string(),
        what: "cannot read",
        path,
        source,
    })?;
    Ok(match version {
        Version::V1 => text.trim() == "FROZEN",
        Version::V2 => text.lines().any(|l| l.trim() == "frozen 1"),
    })
}

/// The waits between two looks at the freezer's state: a task in user space stops within
/// microseconds, so the first looks come quickly, then less often for one held in the kernel.
fn next_wait(wait: Duration) -> Duration {
    (wait * 2).clamp(Duration::from_micros(20), Duration::from_millis(1))
}

/// Runs `job` on the blocking pool: the freezer's files are written and read by plain system
/// calls on one thread, without a trip back to the runtime between them.
async fn blocking<T: Send + 'static>(
    cgroup: &str,
    job: impl FnOnce() -> Result<T, FreezeError> + Send + 'static,
) -> Result<T, FreezeError> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| FreezeError::Io {
            cgroup: cgroup.to_string(),
            what: "background task failed on",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

impl Frozen {
    /// Freezes `cgroup` (a path such as `/cairn/<id>`) and waits, bounded, until all its tasks
    /// have stopped.
    pub async fn freeze(cgroup: &str) -> Result<Self, FreezeError> {
        Self::freeze_under(Path::new("/sys/fs/cgroup"), cgroup).await
    }

    async fn freeze_under(root: &Path, cgroup: &str) -> Result<Self, FreezeError> {
        let (root, name) = (root.to_path_buf(), cgroup.to_string());
        blocking(cgroup, move || {
            let (version, dir) = locate(&root, &name);
            Self::freeze_blocking(name, version, dir)
        })
        .await
    }

    fn freeze_blocking(
        cgroup: String,
        version: Version,
        dir: PathBuf,
    ) -> Result<Self, FreezeError> {
        let value = match version {
            Version::V1 => "FROZEN",
            Version::V2 => "1",
        };
        let since = Instant::now();
        write(&cgroup, dir.join(control(version)), value)?;
        let mut frozen = Self {
            cgroup,
            version,
            dir,
            since,
            stopping: Duration::ZERO,
        };
        let mut wait = Duration::ZERO;
        loop {
            match is_frozen(&frozen.cgroup, version, &frozen.dir) {
                Ok(true) => {
                    frozen.stopping = since.elapsed();
                    return Ok(frozen);
                }
                Ok(false) if since.elapsed() < FREEZE_WITHIN => {
                    wait = next_wait(wait);
                    std::thread::sleep(wait);
                }
                Ok(false) => {
                    let cgroup = frozen.cgroup.clone();
                    let _ = frozen.thaw_blocking();
                    return Err(FreezeError::Timeout {
                        cgroup,
                        within: FREEZE_WITHIN,
                    });
                }
                Err(e) => {
                    let _ = frozen.thaw_blocking();
                    return Err(e);
                }
            }
        }
    }

    /// Thaws the cgroup; returns how long it was frozen (from the freeze request on).
    pub async fn thaw(self) -> Result<Duration, FreezeError> {
        let cgroup = self.cgroup.clone();
        blocking(&cgroup, move || self.thaw_blocking()).await
    }

    fn thaw_blocking(self) -> Result<Duration, FreezeError> {
        let value = match self.version {
            Version::V1 => "THAWED",
            Version::V2 => "0",
        };
        write(&self.cgroup, self.dir.join(control(self.version)), value)?;
        Ok(self.since.elapsed())
    }
}

/// Thaws `cgroup` whatever its state: a create interrupted between freeze and thaw left it
/// frozen. A cgroup that is gone (the container ended) is nothing to thaw.
pub async fn thaw(cgroup: &str) -> Result<(), FreezeError> {
    let name = cgroup.to_string();
    let thawed = blocking(cgroup, move || {
        let (version, dir) = locate(Path::new("/sys/fs/cgroup"), &name);
        let value = match version {
            Version::V1 => "THAWED",
            Version::V2 => "0",
        };
        write(&name, dir.join(control(version)), value)
    });
    match thawed.await {
        Err(FreezeError::NoFreezer { .. }) => Ok(()),
        other => other,
    }
}

/// A pause as reported: whole milliseconds rounded up, so a pause is never reported as none.
pub fn pause_ms(paused: Duration) -> u64 {
    u64::try_from(paused.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

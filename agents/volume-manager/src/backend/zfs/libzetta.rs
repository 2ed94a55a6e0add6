//! The libzetta driver: snapshot create, exists and destroy through libzfs_core's ioctls on
//! `/dev/zfs` (libzetta's `DelegatingZfsEngine`), rollback through `lzc_rollback_to`. libzetta
//! itself lists datasets and snapshots by running the `zfs` CLI, so that tool is needed here too.
//! Its calls block; they run on tokio's blocking pool.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libzetta::zfs::{DelegatingZfsEngine, DestroyTiming, Error as ZettaError, ZfsEngine};

use super::DEV_ZFS;

/// An open libzfs_core handle (process-wide in libzfs_core; cheap to clone).
#[derive(Clone)]
pub struct Engine(Arc<DelegatingZfsEngine>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("libzetta::DelegatingZfsEngine")
    }
}

impl Engine {
    /// Opens libzfs_core, which opens `/dev/zfs`; the error says why it cannot.
    pub fn open() -> Result<Self, String> {
        DelegatingZfsEngine::new()
            .map(|engine| Self(Arc::new(engine)))
            .map_err(|e| match e {
                ZettaError::LZCInitializationFailed(io) => format!(
                    "libzfs_core cannot open {DEV_ZFS} ({io}): kernel ZFS is not loaded here (zfs-fuse has no {DEV_ZFS})"
                ),
                other => format!("libzfs_core cannot start on {DEV_ZFS}: {}", describe(&other)),
            })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&DelegatingZfsEngine) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let engine = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || call(&engine))
            .await
            .map_err(io::Error::other)?
    }

    pub async fn exists(&self, snapshot: &str) -> io::Result<bool> {
        let snapshot = PathBuf::from(snapshot);
        self.blocking(move |e| e.exists(snapshot).map_err(to_io))
            .await
    }

    pub async fn snapshot(&self, snapshot: &str) -> io::Result<()> {
        let snapshot = PathBuf::from(snapshot);
        self.blocking(move |e| e.snapshot(&[snapshot], None).map_err(to_io))
            .await
    }

    pub async fn destroy(&self, snapshot: &str) -> io::Result<()> {
        let snapshot = PathBuf::from(snapshot);
        self.blocking(move |e| {
            e.destroy_snapshots(&[snapshot], DestroyTiming::RightNow)
                .map_err(to_io)
        })
        .await
    }

    /// Rolls `dataset` back to `snapshot`, destroying the snapshots taken after it first (as
    /// `zfs rollback -r`, which the CLI driver uses): `lzc_rollback_to` only goes back to the
    /// latest one.
    pub async fn rollback(&self, dataset: &str, snapshot: &str) -> io::Result<()> {
        let (dataset, snapshot) = (dataset.to_string(), snapshot.to_string());
        self.blocking(move |e| {
            let listed = e.list_snapshots(&dataset).map_err(to_io)?;
            let later = later_snapshots(&listed, &dataset, &snapshot);
            if !later.is_empty() {
                e.destroy_snapshots(&later, DestroyTiming::RightNow)
                    .map_err(to_io)?;
            }
            rollback_to(&dataset, &snapshot)
        })
        .await
    }
}

/// From `zfs list -t snapshot -r <dataset>` (libzetta's list: creation order within a
/// dataset), the snapshots of `dataset` itself taken after `snapshot`.
pub fn later_snapshots(listed: &[PathBuf], dataset: &str, snapshot: &str) -> Vec<PathBuf> {
    let own = format!("{dataset}@");
    let mut own_snapshots = listed
        .iter()
        .filter(|s| s.to_str().is_some_and(|s| s.starts_with(&own)));
    match own_snapshots.position(|s| s == Path::new(snapshot)) {
        Some(_) => own_snapshots.cloned().collect(),
        None => Vec::new(),
    }
}

/// libzetta 0.5 has no rollback: this is the one direct call into libzfs_core (the library
/// libzetta links and initialised when the engine was opened).
#[allow(unsafe_code)]
fn rollback_to(dataset: &str, snapshot: &str) -> io::Result<()> {
    let dataset = CString::new(dataset)?;
    let snapshot = CString::new(snapshot)?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the call and that
    // lzc_rollback_to only reads; libzfs_core_init ran (Engine::open) before any Engine exists.
    let errno = unsafe { zfs_core_sys::lzc_rollback_to(dataset.as_ptr(), snapshot.as_ptr()) };
    match errno {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// libzetta's errors, as one line.
fn describe(e: &ZettaError) -> String {
    match e {
        ZettaError::Io(io) | ZettaError::LZCInitializationFailed(io) => io.to_string(),
        ZettaError::UnknownSoFar(stderr) => stderr.trim().to_string(),
        ZettaError::DatasetNotFound(name) => format!("dataset {} not found", name.display()),
        ZettaError::MultiOpError(errors) => {
            let mut per_name: Vec<String> = errors
                .iter()
                .map(|(name, value)| match value {
                    libzetta::libnv::nvpair::Value::Int32(errno) => {
                        format!("{name}: {}", io::Error::from_raw_os_error(*errno))
                    }
                    other => format!("{name}: {other:?}"),
                })
                .collect();
            per_name.sort();
            per_name.join("; ")
        }
        other => format!("{other:?}"),
    }
}

fn to_io(e: ZettaError) -> io::Error {
    match e {
        ZettaError::Io(io) => io,
        other => io::Error::other(describe(&other)),
    }
}

//! Persistent dirty bitmaps `cairn-<snapshot>` on qcow2 volumes (see the module above).

use std::path::Path;
use std::time::Duration;

use cairn_types::volume::{SnapshotBackendKind, VolumeSnapshotMeta};
use serde::Deserialize;

use crate::process;

pub const PREFIX: &str = "cairn-";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The bitmap that tracks changes after snapshot `snapshot`.
pub fn name(snapshot: &str) -> String {
    format!("{PREFIX}{snapshot}")
}

#[derive(Debug, Clone, Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub granularity: u64,
}

impl BitmapInfo {
    /// Why this bitmap cannot be trusted, if it cannot.
    pub fn unusable(&self) -> Option<String> {
        if self.flags.iter().any(|f| f == "in-use") {
            Some(format!(
                "bitmap {} is marked in-use: a VM has the volume open, or one stopped without storing it (crash)",
                self.name
            ))
        } else if self.flags.iter().any(|f| f == "inconsistent") {
            Some(format!("bitmap {} is inconsistent", self.name))
        } else if !self.flags.iter().any(|f| f == "auto") {
            Some(format!("bitmap {} is disabled", self.name))
        } else {
            None
        }
    }
}

/// What `qemu-img info` says about an image (the parts exports use).
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

/// Reads `file`'s size and bitmaps (`-U`: works while a VM holds it).
pub async fn info(file: &Path) -> Result<ImageInfo, String> {
    let out = process::run(
        "qemu-img",
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            file.as_os_str(),
        ],
        TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).map_err(|e| format!("qemu-img info output: {e}"))?;
    let bitmaps = value
        .pointer("/format-specific/data/bitmaps")
        .cloned()
        .map(serde_json::from_value::<Vec<BitmapInfo>>)
        .transpose()
        .map_err(|e| format!("qemu-img info bitmaps: {e}"))?
        .unwrap_or_default();
    Ok(ImageInfo {
        virtual_size: value
            .get("virtual-size")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        cluster_size: value
            .get("cluster-size")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(65536),
        bitmaps,
    })
}

async fn bitmap_op(file: &Path, args: &[&str]) -> Result<(), String> {
    // qemu-img bitmap [ops] -f qcow2 FILE NAME: the last arg is the bitmap's name.
    let Some((name, ops)) = args.split_last() else {
        return Ok(());
    };
    let mut all: Vec<std::ffi::OsString> = vec!["bitmap".into()];
    all.extend(ops.iter().map(std::ffi::OsString::from));
    all.extend([
        "-f".into(),
        "qcow2".into(),
        file.as_os_str().to_owned(),
        (*name).into(),
    ]);
    process::run("qemu-img", &all, TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Adds an enabled persistent bitmap `name` to `file` (needs the write lock: no VM running).
pub async fn add(file: &Path, name: &str) -> Result<(), String> {
    bitmap_op(file, &["--add", "--enable", name]).await
}

/// Marks `file` as tracked without tracking anything yet (a disabled `cairn-tracking` bitmap):
/// its next snapshots get bitmaps.
pub async fn add_marker(file: &Path) -> Result<(), String> {
    bitmap_op(file, &["--add", "--disable", &name("tracking")]).await
}

pub async fn remove(file: &Path, name: &str) -> Result<(), String> {
    bitmap_op(file, &["--remove", name]).await
}

/// qcow2 header extension type of the persistent bitmaps directory.
const BITMAPS_EXTENSION: u32 = 0x2385_2875;

/// [`may_have_bitmaps`] off the runtime (it reads the image header).
async fn may_have_bitmaps_blocking(file: &Path) -> bool {
    let f = file.to_path_buf();
    tokio::task::spawn_blocking(move || may_have_bitmaps(&f))
        .await
        .unwrap_or(true)
}

/// Whether `file` is a qcow2 image with persistent bitmaps, read from its header (no process:
/// the snapshot hooks run on every qcow2 snapshot, and most volumes are not tracked). Errs on
/// the safe side: anything unreadable counts as "may have bitmaps".
pub fn may_have_bitmaps(file: &Path) -> bool {
    use std::io::Read;
    let mut header = vec![0u8; 4096];
    let Ok(read) = std::fs::File::open(file).and_then(|mut f| f.read(&mut header)) else {
        return true;
    };
    header.truncate(read);
    let be32 = |at: usize| -> Option<u32> {
        header
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    if header.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return false; // not qcow2: no bitmaps
    }
    let mut at = match be32(4) {
        Some(2) => 72,
        Some(_) => match be32(100) {
            Some(len) => len as usize,
            None => return true,
        },
        None => return true,
    };
    // Extensions: type, length, data padded to 8 bytes; type 0 ends them.
    loop {
        let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) else {
            return true;
        };
        match kind {
            0 => return false,
            BITMAPS_EXTENSION => return true,
            _ => at += 8 + (len as usize).div_ceil(8) * 8,
        }
    }
}

/// Whether `file` is tracked for exports: it has some `cairn-` bitmap.
fn tracked(info: &ImageInfo) -> bool {
    info.bitmaps.iter().any(|b| b.name.starts_with(PREFIX))
}

/// After a qcow2 snapshot is made of a volume whose changes are tracked: a bitmap for it too.
pub async fn after_create(meta: &VolumeSnapshotMeta) {
    if meta.backend != SnapshotBackendKind::Qcow2
        || !may_have_bitmaps_blocking(&meta.file_location).await
    {
        return;
    }
    let Ok(info) = info(&meta.file_location).await else {
        return;
    };
    let wanted = name(&meta.name);
    if tracked(&info) && !info.bitmaps.iter().any(|b| b.name == wanted) {
        match add(&meta.file_location, &wanted).await {
            Ok(()) => {
                tracing::info!(volume = %meta.volume_key, bitmap = %wanted, "change tracking for incremental exports")
            }
            Err(e) => {
                tracing::warn!(volume = %meta.volume_key, "no change tracking for this snapshot (its next incremental export will be full): {e}")
            }
        }
    }
}

/// Before a rollback: qemu refuses to apply a snapshot while the image has bitmaps, so Cairn's
/// go (their tracking is lost: the next incremental export from them is full). Returns whether
/// there were any, to restart tracking after the rollback.
pub async fn before_rollback(meta: &VolumeSnapshotMeta) -> bool {
    if meta.backend != SnapshotBackendKind::Qcow2
        || !may_have_bitmaps_blocking(&meta.file_location).await
    {
        return false;
    }
    let Ok(info) = info(&meta.file_location).await else {
        return false;
    };
    let mut had = false;
    for bitmap in info.bitmaps.iter().filter(|b| b.name.starts_with(PREFIX)) {
        had = true;
        if let Err(e) = remove(&meta.file_location, &bitmap.name).await {
            tracing::warn!(volume = %meta.volume_key, bitmap = %bitmap.name, "cannot remove before the rollback: {e}");
        }
    }
    had
}

/// After a rollback to `meta`: the volume equals that snapshot, so tracking restarts from it.
pub async fn after_rollback(meta: &VolumeSnapshotMeta, had: bool) {
    if had && let Err(e) = add(&meta.file_location, &name(&meta.name)).await {
        tracing::warn!(volume = %meta.volume_key, "change tracking not restarted after the rollback: {e}");
    }
}

/// After a snapshot is deleted: its bitmap goes too.
pub async fn after_delete(meta: &VolumeSnapshotMeta) {
    if meta.backend != SnapshotBackendKind::Qcow2
        || !may_have_bitmaps_blocking(&meta.file_location).await
    {
        return;
    }
    let wanted = name(&meta.name);
    if let Ok(info) = info(&meta.file_location).await
        && info.bitmaps.iter().any(|b| b.name == wanted)
        && let Err(e) = remove(&meta.file_location, &wanted).await
    {
        tracing::warn!(volume = %meta.volume_key, bitmap = %wanted, "cannot remove: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_tells_whether_an_image_has_bitmaps() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("v.qcow2");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("qemu-img")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "qemu-img {args:?} (qemu-utils is needed by this test)");
        };
        let path = file.to_str().unwrap_or_default();
        run(&["create", "-q", "-f", "qcow2", path, "16M"]);
        assert!(!may_have_bitmaps(&file));
        run(&["bitmap", "--add", "-f", "qcow2", path, "cairn-x"]);
        assert!(may_have_bitmaps(&file));
        run(&["bitmap", "--remove", "-f", "qcow2", path, "cairn-x"]);
        assert!(!may_have_bitmaps(&file));
        assert!(!may_have_bitmaps(Path::new("/dev/null")));
    }

    #[test]
    fn an_in_use_bitmap_is_not_trusted() {
        let bitmap = |flags: &[&str]| BitmapInfo {
            name: "cairn-x".into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            granularity: 65536,
        };
        assert!(bitmap(&["auto"]).unusable().is_none());
        let why = bitmap(&["in-use", "auto"]).unusable().unwrap_or_default();
        assert!(why.contains("in-use"), "{why}");
        assert!(bitmap(&[]).unusable().is_some());
    }
}

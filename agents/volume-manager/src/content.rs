//! Volumes made from content trees (EVE's `VCOT_DOWNLOAD`): the volume waits until the
//! downloader reports its content tree LOADED (verified, in `<persist>/content/blobs/`), then
//! is converted from the image's format into the volume's and grown to the volume's size.
//! A content tree in error makes the volume Failed with that error, naming the tree; the
//! volume is made as soon as the tree is LOADED (the downloader retries).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cairn_types::volume::{SnapshotBackendKind, VolumeConfig, VolumeFormat};
use cairn_types::{ContentFormat, ContentTreeState, ContentTreeStatus};
use uuid::Uuid;

use crate::backend::Backends;
use crate::error::{Result, VolumeError};
use crate::process;

/// A conversion of a large image is slow; a hung qemu-img still ends.
const CONVERT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The verified blob volume `key` is made from, or why not yet (`ContentNotReady`) or not at
/// all (`ContentFailed`).
pub fn usable_blob(
    key: &str,
    tree: Uuid,
    trees: &BTreeMap<Uuid, ContentTreeStatus>,
    persist: &Path,
) -> Result<(std::path::PathBuf, ContentFormat)> {
    let Some(status) = trees.get(&tree) else {
        return Err(VolumeError::ContentNotReady {
            volume: key.to_string(),
            tree,
            state: "not reported by the downloader yet".into(),
        });
    };
    if status.error.is_error() {
        return Err(VolumeError::ContentFailed {
            volume: key.to_string(),
            tree,
            why: status.error.error.clone(),
        });
    }
    if status.state != ContentTreeState::Loaded {
        return Err(VolumeError::ContentNotReady {
            volume: key.to_string(),
            tree,
            // The state only: progress would rewrite the volume's status every 200 ms.
            state: format!("{:?}", status.state).to_uppercase(),
        });
    }
    // A container image's manifest is the first of its blobs (an image archive's tree has the
    // archive's sha256).
    let sha = match status.blobs.first() {
        Some(first)
            if status.format == ContentFormat::Container
                && first.len() == 64
                && first.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            first
        }
        _ => &status.content_sha256,
    };
    // The store's own path for the sha256, not a path read from the bus.
    Ok((
        cairn_types::layout::content_blob(persist, sha),
        status.format,
    ))
}

/// qemu-img's name for an image format Cairn converts from; `-f` is always given, never probed
/// (a raw image could otherwise pass for any format its first bytes resemble).
fn qemu_format(key: &str, tree: Uuid, format: ContentFormat) -> Result<&'static str> {
    match format {
        ContentFormat::Raw => Ok("raw"),
        ContentFormat::Qcow2 => Ok("qcow2"),
        ContentFormat::Qcow => Ok("qcow"),
        ContentFormat::Vmdk => Ok("vmdk"),
        ContentFormat::Vhdx => Ok("vhdx"),
        ContentFormat::Vhd => Ok("vpc"),
        other => Err(VolumeError::Unsupported {
            volume: key.to_string(),
            what: format!(
                "content tree {tree} is {}: a volume is made from a disk image (RAW, QCOW2, QCOW, VMDK, VHDX, VHD)",
                other.eve_name()
            ),
        }),
    }
}

/// Makes the image of `config` at `tmp` from `blob`: converted to the volume's format, then
/// grown to `max_vol_size` when that is larger than the image (never shrunk).
pub async fn make_from_blob(
    config: &VolumeConfig,
    tree: Uuid,
    blob: &Path,
    format: ContentFormat,
    tmp: &Path,
) -> Result<()> {
    let key = config.key();
    let from = qemu_format(&key, tree, format)?;
    let to = match config.format {
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Raw => "raw",
        VolumeFormat::Dir => {
            return Err(VolumeError::Unsupported {
                volume: key,
                what: format!(
                    "a directory volume cannot be made from content tree {tree} (a disk image); use qcow2 or raw"
                ),
            });
        }
    };
    let command = |source| VolumeError::Command {
        volume: key.clone(),
        source,
    };
    process::run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            from.as_ref(),
            "-O".as_ref(),
            to.as_ref(),
            blob.as_os_str(),
            tmp.as_os_str(),
        ],
        CONVERT_TIMEOUT,
    )
    .await
    .map_err(command)?;
    let info = process::run(
        "qemu-img",
        &[
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            to.as_ref(),
            tmp.as_os_str(),
        ],
        process::COMMAND_TIMEOUT,
    )
    .await
    .map_err(command)?;
    let virtual_size = serde_json::from_str::<serde_json::Value>(&info.stdout)
        .ok()
        .and_then(|v| v.get("virtual-size").and_then(serde_json::Value::as_u64))
        .unwrap_or(0);
    if config.max_vol_size > virtual_size {
        process::run(
            "qemu-img",
            &[
                "resize".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                to.as_ref(),
                tmp.as_os_str(),
                config.max_vol_size.to_string().as_ref(),
            ],
            process::COMMAND_TIMEOUT,
        )
        .await
        .map_err(command)?;
    }
    tracing::info!(volume = %key, tree = %tree, from, to, virtual_size, size = config.max_vol_size.max(virtual_size), "volume made from a content tree");
    Ok(())
}

/// Makes volume `config` at `path` from content tree `tree`'s verified blob.
pub async fn create(
    config: &VolumeConfig,
    path: &Path,
    kind: SnapshotBackendKind,
    tree: Uuid,
    blob: (std::path::PathBuf, ContentFormat),
    backends: &Backends,
) -> Result<()> {
    let key = config.key();
    if blob.1 == ContentFormat::Container {
        return create_rootfs(config, path, kind, tree, &blob.0, backends).await;
    }
    backends.check_image_tool(&key)?;
    let tmp = crate::volumes::staging(&key, path).await?;
    let made = make_from_blob(config, tree, &blob.0, blob.1, &tmp).await;
    crate::volumes::put_in_place(&key, &tmp, path, kind, backends, made).await
}

/// Makes directory volume `config` at `path` from container image `tree` (`blob` is its
/// manifest in the store): the image's root and config (`crate::image`), so the volume is
/// snapshotted and rolled back like any directory volume.
async fn create_rootfs(
    config: &VolumeConfig,
    path: &Path,
    kind: SnapshotBackendKind,
    tree: Uuid,
    manifest: &Path,
    backends: &Backends,
) -> Result<()> {
    let key = config.key();
    if config.format != VolumeFormat::Dir {
        return Err(VolumeError::Unsupported {
            volume: key,
            what: format!(
                "content tree {tree} is a container image: its volume is a directory (format dir), not {:?}",
                config.format
            ),
        });
    }
    let tmp = crate::volumes::staging(&key, path).await?;
    let made = match backends.make(kind, &key, &tmp).await {
        Ok(()) => {
            let (blobs, sha, dir, k) = (
                manifest.parent().unwrap_or(Path::new("")).to_path_buf(),
                manifest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                tmp.clone(),
                key.clone(),
            );
            let started = std::time::Instant::now();
            let unpacked = crate::backend::blocking(&key, move || {
                crate::image::unpack_image(&blobs, &sha, &dir).map_err(|source| {
                    VolumeError::Image {
                        volume: k.clone(),
                        source,
                    }
                })?;
                // Ready is said only of what a power cut keeps.
                crate::backend::sync_tree(&k, &dir)
            })
            .await;
            if unpacked.is_ok() {
                tracing::info!(volume = %key, tree = %tree, elapsed_ms = started.elapsed().as_millis() as u64, "root filesystem unpacked from a container image");
            }
            unpacked
        }
        Err(e) => Err(e),
    };
    crate::volumes::put_in_place(&key, &tmp, path, kind, backends, made).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::{ErrorDescription, ErrorSeverity};

    fn trees(status: ContentTreeStatus) -> BTreeMap<Uuid, ContentTreeStatus> {
        BTreeMap::from([(status.content_id, status)])
    }

    #[test]
    fn a_volume_waits_for_loaded_fails_on_an_error_and_uses_the_stores_own_path() {
        let tree = Uuid::from_u128(7);
        let persist = Path::new("/p");
        let mut status = ContentTreeStatus {
            content_id: tree,
            content_sha256: "ab".repeat(32),
            state: ContentTreeState::Downloading,
            format: ContentFormat::Raw,
            file_location: "/elsewhere/evil".into(),
            ..Default::default()
        };
        let waiting = usable_blob("v#0", tree, &trees(status.clone()), persist);
        assert!(
            matches!(waiting, Err(VolumeError::ContentNotReady { ref state, .. }) if state == "DOWNLOADING"),
            "{waiting:?}"
        );
        let unknown = usable_blob("v#0", Uuid::from_u128(8), &trees(status.clone()), persist);
        assert!(matches!(unknown, Err(VolumeError::ContentNotReady { .. })));
        status.state = ContentTreeState::Loaded;
        let (blob, format) = usable_blob("v#0", tree, &trees(status.clone()), persist)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            blob,
            cairn_types::layout::content_blob(persist, &"ab".repeat(32))
        );
        assert_eq!(format, ContentFormat::Raw);
        status.error = ErrorDescription::new("HTTP 404", ErrorSeverity::Error, chrono::Utc::now());
        let failed = usable_blob("v#0", tree, &trees(status), persist);
        let text = failed.map(|_| ()).unwrap_err().to_string();
        assert!(
            text.contains("HTTP 404") && text.contains(&tree.to_string()),
            "{text}"
        );
    }

    #[test]
    fn formats_are_named_to_qemu_img_and_others_refused_by_name() {
        let tree = Uuid::from_u128(1);
        assert_eq!(qemu_format("v", tree, ContentFormat::Vhd).ok(), Some("vpc"));
        let refused = qemu_format("v", tree, ContentFormat::Container)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("CONTAINER"), "{refused}");
    }
}

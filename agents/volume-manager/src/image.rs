//! A container app's root filesystem: a directory volume made from an OCI image the downloader
//! put in the content store (a content tree of format CONTAINER), so it is snapshotted and
//! rolled back like any directory volume.
//!
//! ```text
//! <volume>/rootfs/              the image's layers applied in order
//! <volume>/image-config.json    the image's config blob (entrypoint, cmd, env, user, ...)
//! <volume>/image-manifest       the manifest digest it was made from
//! ```
//!
//! The config travels in the volume so that a rollback brings back the image's config with
//! its root. Layers (gzip, zstd or plain tar) are applied as the OCI image spec says: `.wh.<name>`
//! removes `<name>` of the layers below, `.wh..wh..opq` empties its directory of them; a
//! non-directory replaces whatever was at its path. Modes, owners, mtimes, xattrs, symlinks
//! and hard links are kept (the tar crate's unpack, which also refuses paths leaving the root).
//! Nothing is removed or written through a symlink: a whiteout or an entry under a symlinked
//! directory is refused, naming the layer. Everything here blocks: run it on the blocking pool.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{ImageIndex, ImageManifest};

pub const ROOTFS: &str = "rootfs";
pub const IMAGE_CONFIG: &str = "image-config.json";
pub const IMAGE_MANIFEST: &str = "image-manifest";

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {manifest}: {what}")]
    Image { manifest: String, what: String },
    #[error("image {manifest}: layer {layer}: {what}")]
    Layer {
        manifest: String,
        layer: String,
        what: String,
    },
}

fn hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The image manifest of `manifest_sha` in `blobs` (an index: the entry of this host's
/// platform, which the downloader pulled too).
pub fn manifest(blobs: &Path, manifest_sha: &str) -> Result<ImageManifest, ImageError> {
    let err = |what: String| ImageError::Image {
        manifest: format!("sha256:{manifest_sha}"),
        what,
    };
    let bytes = fs::read(blobs.join(manifest_sha)).map_err(|e| {
        err(format!(
            "cannot read its manifest from the content store: {e}"
        ))
    })?;
    if let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes)
        && !index.manifests().is_empty()
    {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let entry = index
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == arch
                })
            })
            .ok_or_else(|| err(format!("its index has no manifest for linux/{arch}")))?;
        let digest = entry.digest().to_string();
        let sha =
            hex(&digest).ok_or_else(|| err(format!("manifest digest {digest} is not sha256")))?;
        return manifest(blobs, sha);
    }
    serde_json::from_slice(&bytes).map_err(|e| err(format!("its manifest does not parse: {e}")))
}

/// Makes the volume at `dir` (an empty directory) from image `manifest_sha` in `blobs`.
pub fn unpack_image(blobs: &Path, manifest_sha: &str, dir: &Path) -> Result<(), ImageError> {
    let name = format!("sha256:{manifest_sha}");
    let err = |what: String| ImageError::Image {
        manifest: name.clone(),
        what,
    };
    let manifest = manifest(blobs, manifest_sha)?;
    let config_digest = manifest.config().digest().to_string();
    let config_sha = hex(&config_digest)
        .ok_or_else(|| err(format!("config digest {config_digest} is not sha256")))?;
    let config = fs::read(blobs.join(config_sha))
        .map_err(|e| err(format!("cannot read config {config_digest}: {e}")))?;
    let root = dir.join(ROOTFS);
    fs::create_dir_all(&root).map_err(|e| err(format!("cannot create {}: {e}", root.display())))?;
    for layer in manifest.layers() {
        let digest = layer.digest().to_string();
        let layer_err = |what: String| ImageError::Layer {
            manifest: name.clone(),
            layer: digest.clone(),
            what,
        };
        let sha = hex(&digest).ok_or_else(|| layer_err("not a sha256 digest".into()))?;
        let file = fs::File::open(blobs.join(sha))
            .map_err(|e| layer_err(format!("not in the content store: {e}")))?;
        apply_layer(io::BufReader::new(file), &root).map_err(layer_err)?;
    }
    fs::write(dir.join(IMAGE_CONFIG), config)
        .map_err(|e| err(format!("cannot write {IMAGE_CONFIG}: {e}")))?;
    fs::write(dir.join(IMAGE_MANIFEST), format!("{name}\n"))
        .map_err(|e| err(format!("cannot write {IMAGE_MANIFEST}: {e}")))?;
    Ok(())
}

/// Applies one layer (gzip- or zstd-compressed or plain tar, told by its first bytes, as the
/// media types `tar+gzip`, `tar+zstd` and `tar` say) to `root`.
pub fn apply_layer(mut reader: impl io::BufRead, root: &Path) -> Result<(), String> {
    let head = reader.fill_buf().map_err(|e| format!("cannot read: {e}"))?;
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(reader)
            .map_err(|e| format!("not a zstd stream: {e}"))?;
        return apply_tar(decoder, root);
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        apply_tar(flate2::read::GzDecoder::new(reader), root)
    } else {
        apply_tar(reader, root)
    }
}

/// `rel` as plain components (no root, `..` refused).
fn clean(rel: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("entry {} leaves the root (..)", rel.display()));
            }
        }
    }
    Ok(out)
}

/// Refuses a path whose parent directories inside `root` include a symlink: nothing is
/// removed or written through one.
fn check_parents(root: &Path, rel: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in parts.iter().take(parts.len().saturating_sub(1)) {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "entry {} lies under symlink {}: refused",
                    rel.display(),
                    at.strip_prefix(root).unwrap_or(&at).display()
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn apply_tar(reader: impl Read, root: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // Paths this layer wrote: an opaque marker removes only what the layers below left.
    let mut written: BTreeSet<PathBuf> = BTreeSet::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("a broken tar entry: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("an entry with a bad path: {e}"))?
            .into_owned();
        let rel = clean(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            check_parents(root, &rel)?;
            let dir = root.join(&parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent.join(child.file_name());
                    if !written.contains(&child_rel) {
                        remove_any(&child.path()).map_err(|e| {
                            format!("cannot clear {} (opaque): {e}", child_rel.display())
                        })?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let target = parent.join(hidden);
            check_parents(root, &target)?;
            remove_any(&root.join(&target))
                .map_err(|e| format!("cannot remove {} (whiteout): {e}", target.display()))?;
            continue;
        }
        check_parents(root, &rel)?;
        let dest = root.join(&rel);
        let is_dir = entry.header().entry_type().is_dir();
        if let Ok(existing) = fs::symlink_metadata(&dest)
            && !(is_dir && existing.is_dir())
        {
            remove_any(&dest).map_err(|e| format!("cannot replace {}: {e}", rel.display()))?;
        }
        let unpacked = entry
            .unpack_in(root)
            .map_err(|e| format!("cannot unpack {}: {e}", rel.display()))?;
        if !unpacked {
            return Err(format!("entry {} leaves the root: refused", rel.display()));
        }
        written.insert(rel);
    }
    Ok(())
}

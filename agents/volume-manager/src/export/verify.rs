//! Re-reading an export: every file's sha256 against the manifest, and each chain link's
//! manifest against the sha256 its successor recorded. Read-only.

// File work: its blocking calls run on the blocking pool (`blocking`, `spawn_blocking`).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use cairn_types::export::{
    ExportKind, ExportManifest, MANIFEST_FILE, MANIFEST_FORMAT, PARTIAL_SUFFIX,
};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("export {}: {what}", dir.display())]
    Export { dir: PathBuf, what: String },
    #[error(
        "export {}: volume {volume} ({name}): file {file}: {what}",
        dir.display()
    )]
    Volume {
        dir: PathBuf,
        volume: Uuid,
        name: String,
        file: String,
        what: String,
    },
    #[error("cancelled")]
    Cancelled,
}

pub use cairn_persist::digest::sha256_file_with_progress as sha256_file;

/// Reads and parses `dir/manifest.json`; returns it and the file's sha256.
pub fn read_manifest(dir: &Path) -> Result<(ExportManifest, String), VerifyError> {
    let fail = |what: String| VerifyError::Export {
        dir: dir.to_path_buf(),
        what,
    };
    if dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(PARTIAL_SUFFIX))
    {
        return Err(fail(
            "an unfinished export (.partial): it was interrupted or is being written".into(),
        ));
    }
    if !dir.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let path = dir.join(MANIFEST_FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| fail(format!("{MANIFEST_FILE} cannot be read: {e}")))?;
    let manifest =
        parse_manifest(&bytes).map_err(|what| fail(format!("{MANIFEST_FILE} {what}")))?;
    Ok((manifest, cairn_persist::digest::sha256_hex(&bytes)))
}

/// A manifest's bytes parsed and checked (format, at least one volume); the error says what is
/// wrong with it, for the caller to name the file.
pub fn parse_manifest(bytes: &[u8]) -> Result<ExportManifest, String> {
    let manifest: ExportManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("is not a valid manifest: {e}"))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(format!(
            "has format {}, this build reads {MANIFEST_FORMAT}",
            manifest.format
        ));
    }
    if manifest.volumes.is_empty() {
        return Err("lists no volume".into());
    }
    Ok(manifest)
}

/// Checks the export in `dir` and, for incremental volumes, every earlier link of the chain.
/// `progress(done, total)` sees bytes hashed and may cancel by returning false. Returns the
/// manifest and the bytes checked.
pub fn verify_export(
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<(ExportManifest, u64), VerifyError> {
    // The chain, newest first: (dir, manifest).
    let (manifest, _) = read_manifest(dir)?;
    let mut links: Vec<(PathBuf, ExportManifest)> = vec![(dir.to_path_buf(), manifest.clone())];
    let mut index = 0;
    while index < links.len() {
        let (link_dir, link) = links[index].clone();
        for volume in &link.volumes {
            if volume.kind != ExportKind::Incremental {
                continue;
            }
            let Some(base) = &volume.base else {
                return Err(VerifyError::Volume {
                    dir: link_dir.clone(),
                    volume: volume.volume_id,
                    name: volume.display_name.clone(),
                    file: volume.file.clone(),
                    what: "incremental but names no base export".into(),
                });
            };
            let base_dir = link_dir
                .parent()
                .map(|p| p.join(&base.dir))
                .unwrap_or_else(|| PathBuf::from(&base.dir));
            if links.iter().any(|(d, _)| d == &base_dir) {
                continue;
            }
            let (base_manifest, sha) =
                read_manifest(&base_dir).map_err(|e| VerifyError::Volume {
                    dir: link_dir.clone(),
                    volume: volume.volume_id,
                    name: volume.display_name.clone(),
                    file: volume.file.clone(),
                    what: format!("its base export is unusable: {e}"),
                })?;
            if sha != base.manifest_sha256 {
                return Err(VerifyError::Volume {
                    dir: link_dir.clone(),
                    volume: volume.volume_id,
                    name: volume.display_name.clone(),
                    file: volume.file.clone(),
                    what: format!(
                        "its base export {} has another manifest than the one it was made on (sha256 {sha}, expected {})",
                        base_dir.display(),
                        base.manifest_sha256
                    ),
                });
            }
            if base_manifest.volume(volume.volume_id).is_none() {
                return Err(VerifyError::Volume {
                    dir: link_dir.clone(),
                    volume: volume.volume_id,
                    name: volume.display_name.clone(),
                    file: volume.file.clone(),
                    what: format!("its base export {} lacks this volume", base_dir.display()),
                });
            }
            links.push((base_dir, base_manifest));
        }
        index += 1;
    }
    let files: Vec<(PathBuf, &cairn_types::export::ManifestVolume, u64)> = links
        .iter()
        .flat_map(|(d, m)| {
            m.volumes.iter().map(move |v| {
                let path = d.join(&v.file);
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                (d.clone(), v, len)
            })
        })
        .collect();
    let total: u64 = files.iter().map(|(_, _, len)| len).sum();
    let mut done = 0u64;
    for (link_dir, volume, len) in &files {
        let fail = |what: String| VerifyError::Volume {
            dir: link_dir.clone(),
            volume: volume.volume_id,
            name: volume.display_name.clone(),
            file: volume.file.clone(),
            what,
        };
        if volume.file.contains('/') || volume.file.is_empty() {
            return Err(fail("not a plain file name".into()));
        }
        let path = link_dir.join(&volume.file);
        let before = done;
        let sha = sha256_file(&path, &mut |n| progress(before + n, total)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                return VerifyError::Cancelled;
            }
            fail(format!("cannot be read: {e}"))
        })?;
        if sha != volume.sha256 {
            return Err(fail(format!(
                "checksum mismatch: sha256 {sha}, the manifest says {} (the file is damaged)",
                volume.sha256
            )));
        }
        done += len;
    }
    Ok((manifest, total))
}

//! Making a volume from an export at an object-store remote (`VolumeOrigin::RemoteExport`): the
//! manifest and, for an incremental volume, each earlier link's manifest (checked against the
//! sha256 its successor recorded) are read; the volume's files along the chain are downloaded
//! into a staging directory, hashed as they arrive, and only when every sha256 matched (and each
//! file's backing file is the chain's previous link) is the last link converted into the volume.
//! Any fault names the object and nothing is made.

// File work: its blocking calls run on the blocking pool (`spawn_blocking`).
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use cairn_objstore::{ErrorKind, Remote, join_key};
use cairn_types::RemoteConfig;
use cairn_types::export::{ExportContent, ExportKind, ExportManifest, MANIFEST_FILE};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::verify;
use crate::error::VolumeError;

/// Longest chain followed (a loop of bases in a forged manifest ends here).
const MAX_CHAIN: usize = 1000;
/// Downloaded bytes are handed to the hashing writer in pieces of this size.
const PIECE: usize = 1 << 20;

/// One link of the chain to download: the export's key, its directory name in the staging
/// directory, and the volume's entry in its manifest.
struct Link {
    key: String,
    dir: String,
    file: String,
    sha256: String,
    kind: ExportKind,
    content: ExportContent,
}

/// Writes volume `volume` of the export at `export` (its key under the remote's prefix) into
/// `out`, downloading through `stage` (made here, removed after): a new qcow2 (`out` must not
/// exist), or for a directory volume (`tree`) its tree unpacked into the made directory `out`.
#[allow(clippy::too_many_arguments)]
pub async fn materialize(
    key: &str,
    persist: &Path,
    config: &RemoteConfig,
    export: &str,
    volume: Uuid,
    stage: &Path,
    out: &Path,
    tree: bool,
) -> Result<(), VolumeError> {
    let shown = format!("{}:{}", config.id, export);
    let failed = |what: String| VolumeError::Unsupported {
        volume: key.to_string(),
        what: format!("cannot be restored from export {shown}: {what}"),
    };
    let opening = std::time::Instant::now();
    let remote = Remote::open(config, persist)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let links = chain(&remote, export, volume).await.map_err(&failed)?;
    if let Some(last) = links.first() {
        super::import::check_content(last.content, tree).map_err(&failed)?;
    }
    let began = std::time::Instant::now();
    let result = async {
        let stage_dir = stage.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(stage_dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("creating {}: {e}", stage.display()))?;
        for link in &links {
            let dir = stage.join(&link.dir);
            let d = dir.clone();
            tokio::task::spawn_blocking(move || std::fs::create_dir_all(d))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            download_verified(&remote, link, &dir.join(&link.file)).await?;
        }
        let last = links.first().ok_or("no link")?;
        let source = stage.join(&last.dir).join(&last.file);
        if tree {
            tracing::info!(volume = key, export = %shown, "restoring a directory volume from an export at a remote");
            let (archive, dest) = (source.clone(), out.to_path_buf());
            return tokio::task::spawn_blocking(move || super::tree::unpack(&archive, &dest))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("unpacking {}/{}: {e}", last.key, last.file));
        }
        let downloaded = began.elapsed();
        check_backing(&links, stage).await?;
        tracing::info!(volume = key, export = %shown, links = links.len(), "restoring a volume from an export at a remote");
        let checked = began.elapsed();
        super::import::convert_into_volume(&source, out)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            volume = key,
            open_and_manifests_ms = (began - opening).as_millis() as u64,
            download_ms = downloaded.as_millis() as u64,
            check_ms = (checked - downloaded).as_millis() as u64,
            convert_ms = (began.elapsed() - checked).as_millis() as u64,
            "volume restored from an export at a remote"
        );
        Ok(())
    }
    .await;
    let stage_dir = stage.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(stage_dir)).await;
    result.map_err(failed)
}

/// The object a link's file is (its full key at the remote), for messages.
fn object(remote: &Remote, key: &str) -> String {
    format!("object {}", remote.full_key(key))
}

/// Reads a manifest object; returns it parsed and its sha256.
async fn read_manifest(remote: &Remote, dir: &str) -> Result<(ExportManifest, String), String> {
    let key = join_key(&[dir, MANIFEST_FILE]);
    let bytes = match remote.get(&key).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind == ErrorKind::NotFound => {
            return Err(format!(
                "{} is missing (not a complete export, or not there)",
                object(remote, &key)
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let manifest = verify::parse_manifest(&bytes)
        .map_err(|what| format!("{}: {what}", object(remote, &key)))?;
    Ok((manifest, format!("{:x}", Sha256::digest(&bytes))))
}

/// A name of a file or directory inside an export: one plain path component.
fn plain(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// The links of `volume`'s chain, newest first.
async fn chain(remote: &Remote, export: &str, volume: Uuid) -> Result<Vec<Link>, String> {
    let export = export.trim_matches('/');
    let (parent, name) = export.rsplit_once('/').unwrap_or(("", export));
    if !plain(name) {
        return Err(format!("{export:?} is not an export's key"));
    }
    let (mut manifest, _) = read_manifest(remote, export).await?;
    let mut key = export.to_string();
    let mut dir = name.to_string();
    let mut links: Vec<Link> = Vec::new();
    loop {
        let manifest_key = join_key(&[&key, MANIFEST_FILE]);
        let entry = manifest.volume(volume).ok_or_else(|| {
            format!(
                "{} has no volume {volume} (it has {})",
                object(remote, &manifest_key),
                manifest
                    .volumes
                    .iter()
                    .map(|v| v.volume_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if !plain(&entry.file) {
            return Err(format!(
                "{}: volume {volume}'s file {:?} is not a plain file name",
                object(remote, &manifest_key),
                entry.file
            ));
        }
        links.push(Link {
            key: key.clone(),
            dir: dir.clone(),
            file: entry.file.clone(),
            sha256: entry.sha256.clone(),
            kind: entry.kind,
            content: entry.content,
        });
        if entry.kind != ExportKind::Incremental {
            return Ok(links);
        }
        let base = entry.base.clone().ok_or_else(|| {
            format!(
                "{}: volume {volume} is incremental but names no base export",
                object(remote, &manifest_key)
            )
        })?;
        if !plain(&base.dir) || links.iter().any(|l| l.dir == base.dir) {
            return Err(format!(
                "{}: volume {volume}'s base export {:?} is not a sibling export",
                object(remote, &manifest_key),
                base.dir
            ));
        }
        if links.len() >= MAX_CHAIN {
            return Err(format!(
                "{}: the chain is longer than {MAX_CHAIN} exports",
                object(remote, &manifest_key)
            ));
        }
        let base_key = join_key(&[parent, &base.dir]);
        let (base_manifest, sha) = read_manifest(remote, &base_key).await?;
        if sha != base.manifest_sha256 {
            return Err(format!(
                "{} is not the manifest the export {} was made on (sha256 {sha}, expected {}): the base export was changed",
                object(remote, &join_key(&[&base_key, MANIFEST_FILE])),
                remote.full_key(&key),
                base.manifest_sha256
            ));
        }
        manifest = base_manifest;
        key = base_key;
        dir = base.dir;
    }
}

/// Downloads `link`'s file to `local`, hashing it on the way (a blocking writer beside the
/// network reads); refused, naming the object, when it is missing or its sha256 is not the
/// manifest's.
async fn download_verified(remote: &Remote, link: &Link, local: &Path) -> Result<u64, String> {
    let key = join_key(&[&link.key, &link.file]);
    let name = object(remote, &key);
    let mut stream = match remote.read_stream(&key).await {
        Ok(stream) => stream,
        Err(e) if e.kind == ErrorKind::NotFound => {
            return Err(format!("{name} is missing"));
        }
        Err(e) => return Err(e.to_string()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let path = local.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut file = std::io::BufWriter::with_capacity(PIECE, std::fs::File::create(&path)?);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(piece) = rx.blocking_recv() {
            hasher.update(&piece);
            file.write_all(&piece)?;
            size += piece.len() as u64;
        }
        file.flush()?;
        Ok((format!("{:x}", hasher.finalize()), size))
    });
    let mut piece = BytesMut::with_capacity(PIECE);
    let mut read_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                piece.extend_from_slice(&chunk);
                if piece.len() >= PIECE && tx.send(piece.split().freeze()).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    if read_error.is_none() && !piece.is_empty() {
        let _ = tx.send(piece.freeze()).await;
    }
    drop(tx);
    let written = writer.await.map_err(|e| e.to_string())?;
    if let Some(e) = read_error {
        return Err(e);
    }
    let (sha, size) = written.map_err(|e| format!("writing {}: {e}", local.display()))?;
    if sha != link.sha256 {
        return Err(format!(
            "{name}: checksum mismatch: sha256 {sha} of its {size} bytes, the manifest says {} (the object is damaged, truncated or was changed)",
            link.sha256
        ));
    }
    Ok(size)
}

/// Each downloaded file's backing file is the chain's previous link, and a full link has none:
/// a forged image must not make qemu-img read a file outside the staging directory.
async fn check_backing(links: &[Link], stage: &Path) -> Result<(), String> {
    for (index, link) in links.iter().enumerate() {
        let path: PathBuf = stage.join(&link.dir).join(&link.file);
        let out = crate::process::run(
            "qemu-img",
            &[
                "info".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
            ],
            crate::process::COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| format!("{}/{}: not a qcow2 image: {e}", link.key, link.file))?;
        let info: serde_json::Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("qemu-img info of {}: {e}", path.display()))?;
        let backing = info.get("backing-filename").and_then(|v| v.as_str());
        let expected = match (link.kind, links.get(index + 1)) {
            (ExportKind::Incremental, Some(base)) => Some(format!("../{}/{}", base.dir, base.file)),
            _ => None,
        };
        if backing != expected.as_deref() {
            return Err(format!(
                "{}/{}: its backing file is {backing:?}, the chain says {expected:?}",
                link.key, link.file
            ));
        }
    }
    Ok(())
}

//! A content tree of format CONTAINER from an HTTP(S) datastore: the file is an OCI image
//! archive (an `oci-layout` directory as a tar, what `skopeo copy ... oci-archive:` or
//! `docker save` of an OCI image writes), downloaded and verified by its sha256 like any file.
//! Loading it copies each of its blobs into the content store under its own sha256, checked
//! against its name, so the volume-manager makes the root volume from the store exactly as
//! from a registry pull:
//!
//! ```text
//! archive.tar ─► oci-layout      (imageLayoutVersion 1.0.0)
//!              ├ index.json      the image's manifest: the only one, or this host's platform
//!              └ blobs/sha256/<hex>   each one hashed while copied to partial/, promoted
//! ```
//!
//! The tree then holds the archive and the image's blobs; its `FileLocation` is the manifest
//! blob, its sha256 stays the archive's (the one the controller gave). Everything here blocks:
//! the agent runs it on the blocking pool, off its event loop, and publishes the tree LOADING
//! meanwhile.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::{ImageIndex, ImageManifest};
use sha2::Digest;
use uuid::Uuid;

use crate::store::ContentStore;

/// What an archive held: its image's manifest (the one the index names), then every blob of
/// that image (a platform's manifest under an index, the config, the layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub manifest_sha: String,
    pub blobs: Vec<String>,
}

fn lock(store: &Mutex<ContentStore>) -> std::sync::MutexGuard<'_, ContentStore> {
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The hex of a `sha256:<hex>` digest, refusing anything else.
fn hex_of(digest: &str) -> Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| crate::store::is_sha256(h))
        .ok_or_else(|| format!("digest {digest} is not a sha256 digest"))
}

/// Copies one blob entry into the store (held by `tree` first), refusing bytes that do not
/// hash to its name. A blob already in the store is only held.
fn store_blob(
    store: &Mutex<ContentStore>,
    tree: Uuid,
    sha: &str,
    mut entry: impl Read,
    cancel: &AtomicBool,
) -> Result<(), String> {
    let partial = {
        let mut store = lock(store);
        // Checked under the lock the agent's release of the tree takes after setting it: a
        // cancelled load holds nothing more.
        if cancel.load(Ordering::SeqCst) {
            return Err(CANCELLED.into());
        }
        store.hold_also(tree, sha).map_err(|e| e.to_string())?;
        if store.blob_path(sha).exists() {
            return Ok(());
        }
        store.partial_path(sha)
    };
    let mut file = std::fs::File::create(&partial)
        .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| format!("blob {sha}: cannot read it from the archive: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("cannot sync {}: {e}", partial.display()))?;
    drop(file);
    let actual = cairn_persist::digest::hex(&hasher.finalize());
    if actual != sha {
        let _ = crate::store::remove_if_present(&partial);
        return Err(format!(
            "blob {sha} of the archive has sha256 {actual}; refused"
        ));
    }
    let store = lock(store);
    if cancel.load(Ordering::SeqCst) {
        let _ = crate::store::remove_if_present(&partial);
        return Err(CANCELLED.into());
    }
    store.promote(sha).map_err(|e| e.to_string())?;
    Ok(())
}

/// Why a cancelled load stopped (its tree was released or given another file meanwhile).
pub const CANCELLED: &str = "the load was cancelled";

/// Loads the verified archive at `archive` for `tree` into `store`; `Err` says what is wrong
/// with it, for the tree's status. `cancel` set stops it before its next blob.
pub fn load(
    store: &Mutex<ContentStore>,
    tree: Uuid,
    archive: &Path,
    cancel: &AtomicBool,
) -> Result<Loaded, String> {
    let file = std::fs::File::open(archive)
        .map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut index: Option<Vec<u8>> = None;
    let mut layout = false;
    let mut found: BTreeSet<String> = BTreeSet::new();
    let entries = tar
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("a broken tar entry: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("an entry with a bad path: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        match path.as_str() {
            "index.json" => {
                let mut bytes = Vec::new();
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("cannot read index.json: {e}"))?;
                index = Some(bytes);
            }
            "oci-layout" => layout = true,
            _ => {
                if let Some(sha) = path.strip_prefix("blobs/sha256/")
                    && crate::store::is_sha256(sha)
                {
                    let sha = sha.to_string();
                    store_blob(store, tree, &sha, &mut entry, cancel)?;
                    found.insert(sha);
                }
            }
        }
    }
    let Some(index) = index else {
        return Err(if layout {
            "the OCI image archive has no index.json".into()
        } else {
            "not an OCI image archive (no oci-layout, no index.json): a CONTAINER content tree from an HTTP datastore is an oci-layout tar".into()
        });
    };
    let index: ImageIndex = serde_json::from_slice(&index)
        .map_err(|e| format!("its index.json does not parse: {e}"))?;
    let top = match index.manifests().as_slice() {
        [] => return Err("its index.json names no image".into()),
        [only] => only.clone(),
        _ => crate::registry::platform_manifest(&index)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "its index.json names {} images and none for this host's platform",
                    index.manifests().len()
                )
            })?,
    };
    let read = |sha: &str| -> Result<Vec<u8>, String> {
        if !found.contains(sha) && !lock(store).blob_path(sha).exists() {
            return Err(format!(
                "blob {sha} named by the image is not in the archive"
            ));
        }
        let path = lock(store).blob_path(sha);
        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let top_sha = hex_of(top.digest().as_ref())?.to_string();
    let mut blobs = vec![top_sha.clone()];
    let mut bytes = read(&top_sha)?;
    // An index inside (a multi-platform image): this host's manifest.
    if let Ok(inner) = serde_json::from_slice::<ImageIndex>(&bytes)
        && !inner.manifests().is_empty()
    {
        let entry = crate::registry::platform_manifest(&inner).ok_or_else(|| {
            "its image index has no manifest for this host's platform".to_string()
        })?;
        let sha = hex_of(entry.digest().as_ref())?.to_string();
        bytes = read(&sha)?;
        blobs.push(sha);
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its manifest is not an image manifest: {e}"))?;
    for d in std::iter::once(manifest.config()).chain(manifest.layers().iter()) {
        let sha = hex_of(d.digest().as_ref())?.to_string();
        if !found.contains(&sha) && !lock(store).blob_path(&sha).exists() {
            return Err(format!(
                "blob {} named by the image is not in the archive",
                d.digest()
            ));
        }
        blobs.push(sha);
    }
    Ok(Loaded {
        manifest_sha: top_sha,
        blobs,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use cairn_persist::digest::sha256_hex as sha;

    /// An archive of one image (config, one layer); `tamper` changes the layer's bytes after
    /// its name was taken from them.
    fn archive(path: &Path, tamper: bool) -> (String, String) {
        let layer = b"not really a tar, but a blob".to_vec();
        let layer_sha = sha(&layer);
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let config_sha = sha(&config);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_sha}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_sha}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        )
        .into_bytes();
        let manifest_sha = sha(&manifest);
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_sha}","size":{}}}]}}"#,
            manifest.len()
        );
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, bytes).unwrap();
        };
        add("./oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("./index.json", index.as_bytes());
        add(&format!("./blobs/sha256/{manifest_sha}"), &manifest);
        add(&format!("./blobs/sha256/{config_sha}"), &config);
        let mut sent = layer.clone();
        if tamper {
            sent[0] ^= 0xff;
        }
        add(&format!("./blobs/sha256/{layer_sha}"), &sent);
        b.finish().unwrap();
        (manifest_sha, layer_sha)
    }

    #[test]
    fn an_archive_is_loaded_blob_by_blob_and_a_tampered_blob_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Uuid::from_u128(7);
        let store = Mutex::new(ContentStore::open(dir.path()).unwrap());
        let good = dir.path().join("good.tar");
        let (manifest, layer) = archive(&good, false);
        let loaded = load(&store, tree, &good, &AtomicBool::new(false)).unwrap();
        assert_eq!(loaded.manifest_sha, manifest);
        assert_eq!(loaded.blobs.len(), 3, "manifest, config, layer");
        assert!(loaded.blobs.contains(&layer));
        for blob in &loaded.blobs {
            assert!(lock(&store).blob_path(blob).exists(), "{blob} in the store");
        }

        let dir = tempfile::tempdir().unwrap();
        let store = Mutex::new(ContentStore::open(dir.path()).unwrap());
        let bad = dir.path().join("bad.tar");
        let (_, layer) = archive(&bad, true);
        let refused = load(&store, tree, &bad, &AtomicBool::new(false)).unwrap_err();
        assert!(
            refused.contains(&layer) && refused.contains("refused"),
            "{refused}"
        );
        assert!(!lock(&store).blob_path(&layer).exists());
        assert!(!lock(&store).partial_path(&layer).exists());

        let not = dir.path().join("not.tar");
        tar::Builder::new(std::fs::File::create(&not).unwrap())
            .finish()
            .unwrap();
        let refused = load(&store, tree, &not, &AtomicBool::new(false)).unwrap_err();
        assert!(refused.contains("oci-layout"), "{refused}");
    }
}

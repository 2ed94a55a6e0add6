//! Content trees of format CONTAINER from a `DsContainerRegistry` datastore (EVE's downloader
//! pulls OCI images the same way): the distribution protocol through `oci-client` (token and
//! basic auth, TLS trusting the datastore's CAs only when it gives any), OCI and Docker v2
//! manifests as `oci-spec` types.
//!
//! Every blob of the image, manifest and config included, goes into the content store under its
//! sha256 like any other blob, so images sharing layers share them (reference counts per blob):
//!
//! ```text
//! reference ─► manifest (its digest recorded; when the config names one, it must match)
//!            ├─ an index: the manifest of this host's platform, by digest
//!            ├─ config blob   ┐ each one: reference written, downloaded to partial/ with a
//!            └─ layer blobs   ┘ Range resume, sha256 checked, promoted into blobs/
//! ```
//!
//! The tree's `ContentSha256` is the digest of the top manifest (what a tag resolves to); its
//! `Blobs` are every blob of the image, that manifest first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_types::{ContentTreeConfig, DatastoreConfig};
use futures_util::StreamExt;
use oci_client::RegistryOperation;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};

use cairn_persist::digest::sha256_hex;

use crate::fetch::Progress;
use crate::store::{self, ContentStore};

/// EVE's type name of a container registry datastore.
pub const DS_CONTAINER_REGISTRY: &str = "DsContainerRegistry";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What to pull and how to reach it: one per content tree.
#[derive(Clone)]
pub struct ImageSource {
    pub reference: Reference,
    pub auth: RegistryAuth,
    /// The datastore's CAs (PEM): when given, the only trust anchors (as EVE).
    pub ca_pem: Vec<String>,
    /// The manifest digest the config names (`sha256:<hex>`), if it names one.
    pub expected: Option<String>,
    /// The datastore whose credentials are used, named when they fail.
    pub datastore: uuid::Uuid,
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("ImageSource")
            .field("reference", &self.reference.whole())
            .field("expected", &self.expected)
            .field("datastore", &self.datastore)
            .finish()
    }
}

/// Whether a tree is pulled from a registry rather than fetched over HTTP: its datastore is
/// a registry (a CONTAINER tree from an HTTP datastore is an image archive, fetched as a file
/// and then loaded, `crate::archive`).
pub fn is_registry_tree(config: &ContentTreeConfig) -> bool {
    config.datastores.first().map_or(
        config.format == cairn_types::ContentFormat::Container,
        |d| d.ds_type == DS_CONTAINER_REGISTRY,
    )
}

/// The image a tree names: `<fqdn host>/<dpath>/<relative URL>` as EVE joins them (a `docker://`
/// or `oci://` scheme on `fqdn` is dropped), by the config's sha256 when it gives one, else by
/// the tag (`latest` when none). `Err` says what is wrong, for the tree's status.
pub fn source(config: &ContentTreeConfig) -> Result<ImageSource, String> {
    let Some(ds) = config.datastores.first() else {
        return Err(match config.datastore_id_list.first() {
            Some(id) => format!("datastore {id} is not in the config"),
            None => "names no datastore".into(),
        });
    };
    if config.format != cairn_types::ContentFormat::Container {
        return Err(format!(
            "format {} from container registry datastore {}: a registry serves container images (format CONTAINER)",
            config.format.eve_name(),
            ds.uuid
        ));
    }
    if ds.ds_type != DS_CONTAINER_REGISTRY {
        return Err(format!(
            "format CONTAINER from datastore {} of type {}: container images come from a {DS_CONTAINER_REGISTRY} datastore",
            ds.uuid, ds.ds_type
        ));
    }
    let reference = reference(ds, &config.relative_url)?;
    let sha = config.content_sha256.trim();
    let expected = if sha.is_empty() {
        None
    } else if store::is_sha256(sha) {
        Some(format!("sha256:{sha}"))
    } else {
        return Err(format!(
            "sha256 {sha:?} is not 64 hex digits: the image's manifest could not be verified, so it is not pulled"
        ));
    };
    if let (Some(want), Some(named)) = (&expected, reference.digest())
        && want != named
    {
        return Err(format!(
            "the URL names digest {named} and the content tree sha256 {want}: they must agree"
        ));
    }
    let auth = match (ds.api_key.is_empty(), ds.password.is_empty()) {
        (true, true) => RegistryAuth::Anonymous,
        _ => RegistryAuth::Basic(ds.api_key.clone(), ds.password.clone()),
    };
    Ok(ImageSource {
        reference,
        auth,
        ca_pem: ds.ds_cert_pem.clone(),
        expected,
        datastore: ds.uuid,
    })
}

fn reference(ds: &DatastoreConfig, relative: &str) -> Result<Reference, String> {
    let host = ds
        .fqdn
        .trim()
        .trim_start_matches("docker://")
        .trim_start_matches("oci://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "datastore {} fqdn {:?} is not a registry host (host[:port], optionally docker://)",
            ds.uuid, ds.fqdn
        ));
    }
    let path = [ds.dpath.trim_matches('/'), relative.trim_matches('/')]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    let whole = format!("{host}/{path}");
    whole
        .parse::<Reference>()
        .map_err(|e| format!("{whole:?} is not an image reference: {e}"))
}

/// The client for one source: HTTPS only, trusting the datastore's CAs when it gives any.
fn client(source: &ImageSource, stall: std::time::Duration) -> Client {
    let certs: Vec<Certificate> = source
        .ca_pem
        .iter()
        .map(|pem| Certificate {
            encoding: CertificateEncoding::Pem,
            data: pem.as_bytes().to_vec(),
        })
        .collect();
    Client::new(ClientConfig {
        tls_certs_only: certs,
        read_timeout: Some(stall),
        connect_timeout: Some(stall),
        platform_resolver: None,
        ..Default::default()
    })
}

/// An image in the store: the top manifest's digest and every blob, that manifest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub manifest_sha: String,
    pub blobs: Vec<String>,
    pub size: u64,
}

/// Why a pull failed, worded for the content tree's status.
fn describe(
    what: &str,
    datastore: uuid::Uuid,
    e: oci_client::errors::OciDistributionError,
) -> String {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::AuthenticationFailure(reason) => format!(
            "{what}: the registry refused the credentials of datastore {datastore}: {reason}"
        ),
        E::UnauthorizedError { url } => format!(
            "{what}: the registry refused the credentials of datastore {datastore} (HTTP 401 Unauthorized at {url})"
        ),
        other => format!("{what}: {other}"),
    }
}

/// Why the authentication with a registry failed, naming the datastore whose credentials were
/// taken, and telling a refusal from a server that cannot be reached.
fn describe_auth(
    what: &str,
    datastore: uuid::Uuid,
    e: oci_client::errors::OciDistributionError,
) -> String {
    use oci_client::errors::OciDistributionError as E;
    match e {
        // Only the token request answers this: the registry's own 401 comes later.
        E::AuthenticationFailure(reason) => format!(
            "image {what}: the registry's token server refused the credentials of datastore {datastore}: {}",
            reason.trim()
        ),
        E::RequestError(e) => {
            // The query holds only the scope asked for; the URL without it is the server.
            let url = e.url().map_or_else(String::new, |u| {
                let mut u = u.clone();
                u.set_query(None);
                u.to_string()
            });
            let mut cause = String::new();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            // oci-client asks the registry's `/v2/` first, then the realm its challenge names.
            let server = if url.ends_with("/v2/") {
                "the registry"
            } else {
                "the registry's token server"
            };
            let cause = if cause.is_empty() {
                e.to_string()
            } else {
                cause
            };
            format!(
                "image {what}: {server} at {url} could not be reached to authenticate with the credentials of datastore {datastore}: {cause}"
            )
        }
        other => format!(
            "image {what}: authenticating with the credentials of datastore {datastore}: {other}"
        ),
    }
}

fn hex_of(digest: &str) -> Result<&str, String> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if store::is_sha256(hex) => Ok(hex),
        _ => Err(format!(
            "digest {digest:?} is not sha256:<64 hex digits>: Cairn verifies sha256 only"
        )),
    }
}

fn lock(store: &Arc<Mutex<ContentStore>>) -> std::sync::MutexGuard<'_, ContentStore> {
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `bytes` as the verified blob `sha` (held by `tree` first), unless it is there.
#[allow(clippy::disallowed_methods)] // the file work runs inside spawn_blocking
async fn store_small_blob(
    store: &Arc<Mutex<ContentStore>>,
    tree: uuid::Uuid,
    sha: &str,
    bytes: Vec<u8>,
) -> Result<(), String> {
    let (store, sha) = (store.clone(), sha.to_string());
    tokio::task::spawn_blocking(move || {
        let mut store = lock(&store);
        store.hold_also(tree, &sha).map_err(|e| e.to_string())?;
        if store.blob_path(&sha).exists() {
            return Ok(());
        }
        let partial = store.partial_path(&sha);
        let mut file = std::fs::File::create(&partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        store.promote(&sha).map(|_| ()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The host's platform as OCI names it.
fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        other => other,
    };
    ("linux", arch)
}

/// The manifest of an index for this host's platform.
pub fn platform_manifest(index: &ImageIndex) -> Option<&oci_spec::image::Descriptor> {
    let (os, arch) = host_platform();
    index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
    })
}

/// Pulls the image of `source` into the store for `tree`: manifest(s), config and layers, each
/// verified by its digest. `progress` hears the bytes of the layers.
pub async fn pull(
    tree: uuid::Uuid,
    source: &ImageSource,
    store: &Arc<Mutex<ContentStore>>,
    content: &Path,
    stall: std::time::Duration,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<Pulled, String> {
    let client = client(source, stall);
    let what = source.reference.whole();
    let mut reference = source.reference.clone();
    if let Some(expected) = &source.expected {
        reference = reference.clone_with_digest(expected.clone());
    }
    // The auth handshake on its own first: oci-client's manifest and blob calls drop a failed
    // token request and go on without a token, so a refused password and a token server that
    // is down would both end as the registry's bare 401. The token is cached in the client
    // for the calls below.
    client
        .auth(&reference, &source.auth, RegistryOperation::Pull)
        .await
        .map_err(|e| describe_auth(&what, source.datastore, e))?;
    let accepted = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
    let (top, _) = client
        .pull_manifest_raw(&reference, &source.auth, &accepted)
        .await
        .map_err(|e| describe(&format!("image {what}: manifest"), source.datastore, e))?;
    // The digest is computed here from the bytes, never taken from the registry's header.
    let top_sha = sha256_hex(&top);
    if let Some(expected) = &source.expected
        && *expected != format!("sha256:{top_sha}")
    {
        return Err(format!(
            "image {what}: the registry sent a manifest with digest sha256:{top_sha}, the config says {expected}; refused"
        ));
    }
    let mut blobs = vec![top_sha.clone()];
    store_small_blob(store, tree, &top_sha, top.to_vec()).await?;
    let mut manifest_bytes = top.to_vec();
    if let Ok(index) = serde_json::from_slice::<ImageIndex>(&manifest_bytes)
        && !index.manifests().is_empty()
    {
        let Some(entry) = platform_manifest(&index) else {
            let (os, arch) = host_platform();
            return Err(format!(
                "image {what}: its index has no manifest for {os}/{arch}"
            ));
        };
        let digest = entry.digest().to_string();
        let (bytes, _) = client
            .pull_manifest_raw(
                &reference.clone_with_digest(digest.clone()),
                &source.auth,
                &accepted,
            )
            .await
            .map_err(|e| {
                describe(
                    &format!("image {what}: manifest {digest}"),
                    source.datastore,
                    e,
                )
            })?;
        let sha = sha256_hex(&bytes);
        if format!("sha256:{sha}") != digest {
            return Err(format!(
                "image {what}: manifest {digest} arrived with digest sha256:{sha}; refused"
            ));
        }
        store_small_blob(store, tree, &sha, bytes.to_vec()).await?;
        blobs.push(sha);
        manifest_bytes = bytes.to_vec();
    }
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| format!("image {what}: the manifest is not an image manifest: {e}"))?;
    let mut descriptors = vec![manifest.config().clone()];
    descriptors.extend(manifest.layers().iter().cloned());
    let total: u64 = descriptors.iter().map(|d| d.size()).sum();
    let mut done = 0u64;
    for d in &descriptors {
        let digest = d.digest().to_string();
        let sha = hex_of(&digest)
            .map_err(|e| format!("image {what}: blob {digest}: {e}"))?
            .to_string();
        let desc = OciDescriptor {
            digest: digest.clone(),
            size: d.size() as i64,
            media_type: d.media_type().to_string(),
            ..Default::default()
        };
        pull_blob(
            &client,
            &reference,
            source.datastore,
            tree,
            &desc,
            &sha,
            store,
            content,
            &what,
            done,
            total,
            &progress,
        )
        .await?;
        done += d.size();
        blobs.push(sha);
    }
    Ok(Pulled {
        manifest_sha: top_sha,
        blobs,
        size: total,
    })
}

/// One blob: held, downloaded into `partial/` (resuming from its length with a Range request),
/// verified, promoted. A blob already in `blobs/` is only held.
#[allow(clippy::too_many_arguments)]
async fn pull_blob(
    client: &Client,
    reference: &Reference,
    datastore: uuid::Uuid,
    tree: uuid::Uuid,
    desc: &OciDescriptor,
    sha: &str,
    store: &Arc<Mutex<ContentStore>>,
    content: &Path,
    what: &str,
    done: u64,
    total: u64,
    progress: &(impl Fn(Progress) + Send + Sync),
) -> Result<(), String> {
    let (s, st) = (sha.to_string(), store.clone());
    let present = tokio::task::spawn_blocking(move || {
        let mut store = lock(&st);
        store.hold_also(tree, &s).map_err(|e| e.to_string())?;
        Ok::<_, String>(store.blob_path(&s).exists())
    })
    .await
    .map_err(|e| e.to_string())??;
    if present {
        return Ok(());
    }
    let partial: PathBuf = content.join("partial").join(sha);
    let have = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let layer = format!("image {what}: layer {}", desc.digest);
    // The auth handshake happened with the manifest: blob requests reuse its token.
    let response = client
        .pull_blob_stream_partial(reference, desc, have, None)
        .await
        .map_err(|e| describe(&layer, datastore, e))?;
    let (mut stream, append) = match response {
        BlobResponse::Partial(s) => {
            tracing::info!(layer = %desc.digest, from = have, "resuming a layer download");
            (s.stream, true)
        }
        BlobResponse::Full(s) => {
            if have > 0 {
                tracing::info!(layer = %desc.digest, kept = have, "the registry ignored the Range request: downloading the layer from its start");
            }
            (s.stream, false)
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&partial)
        .await
        .map_err(|e| format!("cannot open {}: {e}", partial.display()))?;
    let mut written = if append { have } else { 0 };
    use tokio::io::AsyncWriteExt;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = file.flush().await;
                // The client's own digest check ends the stream: those bytes are never resumed.
                if e.to_string().to_ascii_lowercase().contains("digest") {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(format!("{layer}: refused: {e}"));
                }
                return Err(format!("{layer}: the download broke off: {e}"));
            }
        };
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        written += chunk.len() as u64;
        if desc.size > 0 && written > desc.size as u64 {
            drop(file);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(format!(
                "{layer}: the registry sent more than the {} bytes the manifest gives; refused",
                desc.size
            ));
        }
        progress(Progress {
            current: done + written,
            total: Some(total),
        });
    }
    file.sync_all()
        .await
        .map_err(|e| format!("cannot sync {}: {e}", partial.display()))?;
    drop(file);
    let p = partial.clone();
    let actual = tokio::task::spawn_blocking(move || store::sha256_file(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read {} to verify it: {e}", partial.display()))?;
    if actual != sha {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(format!(
            "{layer}: the registry sent {written} bytes with sha256 {actual}; refused and discarded"
        ));
    }
    let (st, s) = (store.clone(), sha.to_string());
    tokio::task::spawn_blocking(move || {
        let store = lock(&st);
        if !store.refs().blobs.contains_key(&s) {
            return Err("released while it was verified".to_string());
        }
        store.promote(&s).map(|_| ()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::ContentFormat;

    fn tree(fqdn: &str, dpath: &str, url: &str, sha: &str) -> ContentTreeConfig {
        ContentTreeConfig {
            relative_url: url.into(),
            format: ContentFormat::Container,
            content_sha256: sha.into(),
            datastores: vec![DatastoreConfig {
                ds_type: DS_CONTAINER_REGISTRY.into(),
                fqdn: fqdn.into(),
                dpath: dpath.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_reference_joins_fqdn_dpath_and_url_as_eve_does() {
        let s = source(&tree(
            "docker://docker.io",
            "andreizededa",
            "hello:v1.2.3",
            "",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.reference.registry(), "docker.io");
        assert_eq!(s.reference.repository(), "andreizededa/hello");
        assert_eq!(s.reference.tag(), Some("v1.2.3"));
        assert!(s.expected.is_none());
        assert!(matches!(s.auth, RegistryAuth::Anonymous));
        let sha = "ab".repeat(32);
        let s = source(&tree("127.0.0.1:5000", "", "app", &sha)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.reference.registry(), "127.0.0.1:5000");
        assert_eq!(
            s.expected.as_deref(),
            Some(format!("sha256:{sha}").as_str())
        );
        let bad = source(&tree("127.0.0.1:5000", "", "app", "xyz")).unwrap_err();
        assert!(bad.contains("64 hex digits"), "{bad}");
        let mut http = tree("127.0.0.1:5000", "", "app", "");
        http.datastores[0].ds_type = "DsHttps".into();
        let bad = source(&http).unwrap_err();
        assert!(bad.contains(DS_CONTAINER_REGISTRY), "{bad}");
    }
}

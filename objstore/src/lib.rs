//! Cairn's S3-compatible object-store remotes (issue 22): opening a configured remote (its
//! credentials file checked), streamed multipart uploads with a bandwidth limit, and the few
//! listing, reading and clean-up calls exports need. Everything S3 lives here; callers see
//! keys relative to the remote's prefix and errors that name the remote, never a credential.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_types::RemoteConfig;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

pub mod crypt;
#[cfg(feature = "seaweedfs")]
pub mod seaweedfs;

/// Parts of a multipart upload (S3 wants at least 5 MiB but for the last).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one upload sent at once (memory: this many parts).
pub const PARTS_IN_FLIGHT: usize = 3;
/// Ciphertext gathered before it is opened on the blocking pool (one hand-off per batch).
const OPEN_BATCH: usize = 1 << 20;
/// How long an upload step is retried while the server is unreachable or failing (5xx): the
/// client's own retries give up within seconds when connections are refused, shorter than a
/// server restart.
pub const OUTAGE_LIMIT: Duration = Duration::from_secs(120);

/// Why a remote cannot be used, or an operation on it failed. The text names the remote and
/// what was at fault; credentials are scrubbed from it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("remote {remote}: {message}")]
pub struct RemoteError {
    pub remote: String,
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration or the credentials file is unusable.
    Config,
    /// The server refused the credentials or the access.
    Denied,
    /// The bucket or the object does not exist.
    NotFound,
    /// An encrypted object was sealed with another key than the remote's.
    WrongKey,
    /// An object fails authentication (tampered, truncated, damaged), or its encryption is not
    /// what the remote's configuration says.
    Damaged,
    Other,
}

/// A file sent by [`Remote::send_file`]: its size and the sha256 of its content (the
/// plaintext, also when the remote encrypts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    pub size: u64,
    pub sha256: String,
}

/// The access key pair, as read from the credentials file. Its Debug shows no secret.
#[derive(Clone, serde::Deserialize)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// An opened remote.
#[derive(Debug, Clone)]
pub struct Remote {
    pub id: String,
    pub bucket: String,
    pub endpoint: String,
    prefix: String,
    store: Arc<AmazonS3>,
    bandwidth_limit: u64,
    /// What must never appear in a message (the key id and the secret).
    secrets: Arc<[String]>,
    /// When a request last found the server unreachable or failing.
    last_outage: Arc<std::sync::Mutex<Option<Instant>>>,
    /// The client-side encryption key (see [`crypt`]); `None`: objects are stored as they are.
    key: Option<crypt::Key>,
    /// The key's file, for messages.
    key_file: String,
}

/// The credentials file of `config`: a relative name is taken under `<persist>/config/`, an
/// absolute one must be there.
pub fn credentials_path(config: &RemoteConfig, persist: &Path) -> Result<PathBuf, RemoteError> {
    config_file_path(
        config,
        persist,
        "credentials file",
        &config.credentials_file,
    )
}

/// The encryption key file of `config` (same rules as the credentials file); `None` when none
/// is configured.
pub fn key_path(config: &RemoteConfig, persist: &Path) -> Result<Option<PathBuf>, RemoteError> {
    if config.encryption_key_file.as_os_str().is_empty() {
        return Ok(None);
    }
    config_file_path(
        config,
        persist,
        "encryption key file",
        &config.encryption_key_file,
    )
    .map(Some)
}

fn config_file_path(
    config: &RemoteConfig,
    persist: &Path,
    what: &str,
    file: &Path,
) -> Result<PathBuf, RemoteError> {
    let dir = persist.join("config");
    if file.as_os_str().is_empty() {
        return Err(config_error(config, format!("no {what} configured")));
    }
    let path = if file.is_absolute() {
        file.to_path_buf()
    } else {
        dir.join(file)
    };
    if !path.starts_with(&dir) || path.components().any(|c| c.as_os_str() == "..") {
        return Err(config_error(
            config,
            format!("{what} {} is not under {}", path.display(), dir.display()),
        ));
    }
    Ok(path)
}

fn config_error(config: &RemoteConfig, message: impl Into<String>) -> RemoteError {
    RemoteError {
        remote: config.id.clone(),
        kind: ErrorKind::Config,
        message: message.into(),
    }
}

/// The content of the secret file `path` (`what` for messages): refused unless it is a regular
/// file of mode 0600 owned by root.
async fn read_secret_file(
    config: &RemoteConfig,
    path: &Path,
    what: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, RemoteError> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display().to_string();
    let meta = tokio::fs::symlink_metadata(&path)
        .await
        .map_err(|e| config_error(config, format!("{what} {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(config_error(
            config,
            format!("{what} {shown} is not a regular file"),
        ));
    }
    // Anyone else able to read (or replace) it could take (or forge) the fleet's backups.
    if meta.mode() & 0o777 != 0o600 || meta.uid() != 0 {
        return Err(config_error(
            config,
            format!(
                "{what} {shown} is refused: it must be mode 0600 and owned by root (it is mode {:04o}, owner uid {})",
                meta.mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    tokio::fs::read(&path)
        .await
        .map(zeroize::Zeroizing::new)
        .map_err(|e| config_error(config, format!("{what} {shown}: {e}")))
}

async fn read_credentials(
    config: &RemoteConfig,
    persist: &Path,
) -> Result<Credentials, RemoteError> {
    let path = credentials_path(config, persist)?;
    let shown = path.display().to_string();
    let bytes = read_secret_file(config, &path, "credentials file").await?;
    // serde's message could quote the file's content: only its position is kept.
    serde_json::from_slice::<Credentials>(&bytes).map_err(|e| {
        config_error(
            config,
            format!(
                "credentials file {shown} is not JSON {{\"access_key_id\": …, \"secret_access_key\": …}} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// The remote's encryption key and its file's name, when one is configured.
async fn read_key(
    config: &RemoteConfig,
    persist: &Path,
) -> Result<Option<(crypt::Key, String)>, RemoteError> {
    let Some(path) = key_path(config, persist)? else {
        return Ok(None);
    };
    let shown = path.display().to_string();
    let bytes = read_secret_file(config, &path, "encryption key file").await?;
    crypt::Key::parse(&bytes)
        .map(|key| Some((key, shown.clone())))
        .map_err(|why| config_error(config, format!("encryption key file {shown}: {why}")))
}

/// Joins key parts with `/`, skipping empty ones and stray slashes.
pub fn join_key(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

impl Remote {
    /// Opens `config`'s remote: reads and checks its credentials file, builds the client. No
    /// request is made (see [`Remote::check`]).
    pub async fn open(config: &RemoteConfig, persist: &Path) -> Result<Self, RemoteError> {
        // reqwest's TLS uses the process's rustls provider; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if config.endpoint.is_empty() || config.bucket.is_empty() {
            return Err(config_error(config, "an endpoint and a bucket are needed"));
        }
        let credentials = read_credentials(config, persist).await?;
        let key = read_key(config, persist).await?;
        let mut options = ClientOptions::new()
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        if !config.ca_cert_file.as_os_str().is_empty() {
            let pem = tokio::fs::read(&config.ca_cert_file).await.map_err(|e| {
                config_error(
                    config,
                    format!("CA certificate {}: {e}", config.ca_cert_file.display()),
                )
            })?;
            let cert = object_store::Certificate::from_pem(&pem).map_err(|e| {
                config_error(
                    config,
                    format!("CA certificate {}: {e}", config.ca_cert_file.display()),
                )
            })?;
            options = options
                .with_root_certificate(cert)
                .with_no_system_certificates(true);
        }
        // 5xx answers and timeouts are retried with exponential backoff, for up to 3 minutes.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 8,
            retry_timeout: Duration::from_secs(180),
        };
        let region = if config.region.is_empty() {
            "us-east-1"
        } else {
            &config.region
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_region(region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            // Parts are not hashed for the signature (S3's UNSIGNED-PAYLOAD): a second pass
            // over every byte otherwise; TLS protects them on the way, the manifest's sha256s
            // end to end.
            .with_unsigned_payload(true)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| {
                config_error(
                    config,
                    scrub(
                        &e.to_string(),
                        &[&credentials.access_key_id, &credentials.secret_access_key],
                    ),
                )
            })?;
        Ok(Self {
            id: config.id.clone(),
            bucket: config.bucket.clone(),
            endpoint: config.endpoint.clone(),
            prefix: config.prefix.clone(),
            store: Arc::new(store),
            bandwidth_limit: config.bandwidth_limit,
            secrets: Arc::from(vec![
                credentials.access_key_id,
                credentials.secret_access_key,
            ]),
            last_outage: Arc::default(),
            key_file: key.as_ref().map(|(_, f)| f.clone()).unwrap_or_default(),
            key: key.map(|(k, _)| k),
        })
    }

    /// An object that cannot be opened, named.
    fn open_error(&self, key: &str, e: crypt::OpenError) -> RemoteError {
        let kind = match e {
            crypt::OpenError::WrongKey => ErrorKind::WrongKey,
            _ => ErrorKind::Damaged,
        };
        let file = if kind == ErrorKind::WrongKey {
            format!(" (key file {})", self.key_file)
        } else {
            String::new()
        };
        RemoteError {
            remote: self.id.clone(),
            kind,
            message: format!(
                "object {} in bucket {}: {e}{file}",
                self.full_key(key),
                self.bucket
            ),
        }
    }

    /// An encrypted object found by a remote with no key.
    fn unexpected_ciphertext(&self, key: &str) -> RemoteError {
        RemoteError {
            remote: self.id.clone(),
            kind: ErrorKind::Damaged,
            message: format!(
                "object {} in bucket {} is encrypted, but this remote has no encryption key file configured",
                self.full_key(key),
                self.bucket
            ),
        }
    }

    fn local_error(&self, message: String) -> RemoteError {
        RemoteError {
            remote: self.id.clone(),
            kind: ErrorKind::Other,
            message,
        }
    }

    /// The full object key of `key` (relative to the remote's prefix).
    pub fn full_key(&self, key: &str) -> String {
        join_key(&[&self.prefix, key])
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(self.full_key(key))
    }

    fn error(&self, what: &str, e: object_store::Error) -> RemoteError {
        let text = e.to_string();
        let kind = match &e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => ErrorKind::Denied,
            _ if text.contains("NoSuchBucket") => ErrorKind::NotFound,
            _ if text.contains("403")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("InvalidAccessKeyId")
                || text.contains("AccessDenied") =>
            {
                ErrorKind::Denied
            }
            _ => ErrorKind::Other,
        };
        let why = match kind {
            ErrorKind::Denied => {
                "access denied (wrong credentials, or no permission on the bucket): "
            }
            ErrorKind::NotFound if text.contains("NoSuchBucket") => "the bucket does not exist: ",
            _ => "",
        };
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        RemoteError {
            remote: self.id.clone(),
            kind,
            message: format!(
                "bucket {} at {}: {what}: {why}{}",
                self.bucket,
                self.endpoint,
                scrub(&text, &secrets)
            ),
        }
    }

    /// Runs `op` until it succeeds, fails at once for a reason a retry cannot change
    /// (credentials, missing bucket or object; after an outage such a refusal is retried too),
    /// or the server has been failing for [`OUTAGE_LIMIT`]; waits 1, 2, 4 … 15 s between tries.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        let began = Instant::now();
        let mut wait = Duration::from_secs(1);
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    let error = self.error(what, e);
                    // A refusal soon after the server was unreachable may be its start-up
                    // (seen: SeaweedFS denies access until its identities are loaded).
                    let recent_outage = self
                        .last_outage
                        .lock()
                        .ok()
                        .and_then(|t| *t)
                        .is_some_and(|t| t.elapsed() < OUTAGE_LIMIT);
                    let lasting = error.kind != ErrorKind::Other && !recent_outage;
                    if lasting || began.elapsed() + wait > OUTAGE_LIMIT {
                        return Err(error);
                    }
                    if error.kind == ErrorKind::Other
                        && let Ok(mut last) = self.last_outage.lock()
                    {
                        *last = Some(Instant::now());
                    }
                    tracing::warn!(remote = %self.id, retry_in_ms = wait.as_millis() as u64, "{error}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(15));
                }
            }
        }
    }

    /// One listing request under the prefix: the credentials and the bucket work.
    pub async fn check(&self) -> Result<(), RemoteError> {
        let prefix = self.path("");
        self.store
            .list_with_delimiter(Some(&prefix))
            .await
            .map(drop)
            .map_err(|e| self.error("listing", e))
    }

    /// Begins a multipart upload of `key`; returns its id (to record before any part is sent:
    /// a restart aborts what a crash left).
    pub async fn begin_upload(&self, key: &str) -> Result<String, RemoteError> {
        let path = self.path(key);
        self.retrying(&format!("starting the upload of {key}"), || {
            self.store.create_multipart(&path)
        })
        .await
    }

    /// Sends the file at `local` as the parts of upload `upload_id` of `key`, read in
    /// [`PART_SIZE`] pieces ([`PARTS_IN_FLIGHT`] at most in memory; each sealed on the blocking
    /// pool when the remote encrypts), and completes it; `progress` gets the bytes of the file
    /// sent so far. A failed upload is aborted. Returns the file's size and the sha256 of its
    /// content (hashed on the blocking pool as the parts are read: the file is read once).
    pub async fn send_file(
        &self,
        local: &Path,
        key: &str,
        upload_id: &str,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<SentFile, RemoteError> {
        let path = self.path(key);
        let id = upload_id.to_string();
        let result = async {
            let mut file = tokio::fs::File::open(local)
                .await
                .map_err(|e| RemoteError {
                    remote: self.id.clone(),
                    kind: ErrorKind::Other,
                    message: format!("reading {}: {e}", local.display()),
                })?;
            let sealer = match &self.key {
                Some(k) => {
                    Some(Arc::new(k.sealer(key).map_err(|e| {
                        self.local_error(format!("encrypting {key}: {e}"))
                    })?))
                }
                None => None,
            };
            let began = Instant::now();
            // Up to PARTS_IN_FLIGHT parts are sent at once (one TCP stream leaves a loopback
            // or LAN link half idle while the server writes); read in order, completed in order.
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            let mut parts: Vec<Option<PartId>> = Vec::new();
            let mut sent = 0u64;
            let mut read_all = false;
            // The hash of the parts read so far, running on the blocking pool one part at a
            // time while the next is read and sent.
            let mut hashing = tokio::task::spawn_blocking(Sha256::new);
            while !read_all || !in_flight.is_empty() {
                if !read_all && in_flight.len() < PARTS_IN_FLIGHT {
                    let mut buf = Vec::with_capacity(PART_SIZE);
                    let n = (&mut file)
                        .take(PART_SIZE as u64)
                        .read_to_end(&mut buf)
                        .await
                        .map_err(|e| RemoteError {
                            remote: self.id.clone(),
                            kind: ErrorKind::Other,
                            message: format!("reading {}: {e}", local.display()),
                        })?;
                    read_all = n < PART_SIZE;
                    let buf = Bytes::from(buf);
                    let mut hasher = hashing
                        .await
                        .map_err(|e| self.local_error(format!("hashing {key}: {e}")))?;
                    let hashed = buf.clone();
                    hashing = tokio::task::spawn_blocking(move || {
                        hasher.update(&hashed);
                        hasher
                    });
                    // Encrypted, the short read always makes a part: it ends the stream (its
                    // last chunk may be empty, its tag is not).
                    if n > 0 || parts.is_empty() || sealer.is_some() {
                        let index = parts.len();
                        parts.push(None);
                        let (path, id, sealer) = (&path, &id, sealer.clone());
                        let last = read_all;
                        in_flight.push(async move {
                            let part = async {
                                let bytes = match sealer {
                                    Some(sealer) => {
                                        let first = (index * (PART_SIZE / crypt::CHUNK)) as u64;
                                        tokio::task::spawn_blocking(move || {
                                            sealer.seal(&buf, first, last).map(Bytes::from)
                                        })
                                        .await
                                        .map_err(|e| e.to_string())
                                        .and_then(|sealed| sealed)
                                        .map_err(|e| {
                                            self.local_error(format!(
                                                "encrypting part {index} of {key}: {e}"
                                            ))
                                        })?
                                    }
                                    None => buf,
                                };
                                let payload = PutPayload::from(bytes);
                                self.retrying(&format!("uploading part {index} of {key}"), || {
                                    self.store.put_part(path, id, index, payload.clone())
                                })
                                .await
                            }
                            .await;
                            (index, n as u64, part)
                        });
                    }
                    continue;
                }
                if let Some((index, n, part)) = in_flight.next().await {
                    parts[index] = Some(part?);
                    sent += n;
                    progress(sent);
                    self.throttle(began, sent).await;
                }
            }
            let parts: Vec<PartId> = parts.into_iter().flatten().collect();
            let sha256 = hashing
                .await
                .map_err(|e| self.local_error(format!("hashing {key}: {e}")))?
                .finalize();
            self.retrying(&format!("completing the upload of {key}"), || {
                self.store.complete_multipart(&path, &id, parts.clone())
            })
            .await?;
            Ok(SentFile {
                size: sent,
                sha256: format!("{sha256:x}"),
            })
        }
        .await;
        if result.is_err()
            && let Err(e) = self.abort_upload(key, upload_id).await
        {
            tracing::warn!(remote = %self.id, key, "aborting a failed upload: {e}");
        }
        result
    }

    /// [`Remote::begin_upload`] and [`Remote::send_file`] in one.
    pub async fn upload_file(&self, local: &Path, key: &str) -> Result<SentFile, RemoteError> {
        let id = self.begin_upload(key).await?;
        self.send_file(local, key, &id, &mut |_| {}).await
    }

    /// Sleeps as long as sending `sent` bytes since `began` is ahead of the bandwidth limit.
    async fn throttle(&self, began: Instant, sent: u64) {
        if self.bandwidth_limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.bandwidth_limit as f64);
        if let Some(wait) = due.checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Aborts a multipart upload a crashed export left (one already gone is no fault).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), RemoteError> {
        let path = self.path(key);
        let id = upload_id.to_string();
        match self
            .retrying(&format!("aborting the upload of {key}"), || {
                self.store.abort_multipart(&path, &id)
            })
            .await
        {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Writes a small object in one request (sealed whole when the remote encrypts).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let path = self.path(key);
        let bytes = match &self.key {
            Some(k) => k
                .sealer(key)
                .and_then(|sealer| sealer.seal_all(&bytes))
                .map_err(|e| self.local_error(format!("encrypting {key}: {e}")))?,
            None => bytes,
        };
        let payload = PutPayload::from(bytes);
        self.retrying(&format!("writing {key}"), || {
            self.store.put(&path, payload.clone())
        })
        .await
        .map(drop)
    }

    /// Reads a whole (small) object (opened, authenticated, when the remote encrypts).
    pub async fn get(&self, key: &str) -> Result<Bytes, RemoteError> {
        let path = self.path(key);
        let got = self
            .retrying(&format!("reading {key}"), || self.store.get(&path))
            .await?;
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.error(&format!("reading {key}"), e))?;
        match &self.key {
            Some(k) => crypt::open_all(k, key, &bytes)
                .map(Bytes::from)
                .map_err(|e| self.open_error(key, e)),
            None if crypt::is_encrypted(&bytes) => Err(self.unexpected_ciphertext(key)),
            None => Ok(bytes),
        }
    }

    /// Streams an object's content into `out` chunk by chunk; returns its size.
    pub async fn download(
        &self,
        key: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, RemoteError> {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.read_stream(key).await?;
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            out.write_all(&chunk).await.map_err(|e| RemoteError {
                remote: self.id.clone(),
                kind: ErrorKind::Other,
                message: format!("writing {key} locally: {e}"),
            })?;
            size += chunk.len() as u64;
        }
        Ok(size)
    }

    /// An object's content as a stream of chunks, as they arrive (a missing object is a
    /// [`ErrorKind::NotFound`] error naming `key`). When the remote encrypts, the chunks are
    /// opened as they come (on the blocking pool, [`OPEN_BATCH`] at a time) and only what
    /// authenticated is handed on; a fault ends the stream with an error naming the object.
    pub async fn read_stream(
        &self,
        key: &str,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<Bytes, RemoteError>>, RemoteError>
    {
        let path = self.path(key);
        let got = self
            .retrying(&format!("reading {key}"), || self.store.get(&path))
            .await?;
        let remote = self.clone();
        let name = key.to_string();
        let raw = got
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| remote.error(&format!("reading {name}"), e)))
            .boxed();
        let Some(k) = &self.key else {
            // Without a key, an encrypted object is refused at its first bytes.
            let remote = self.clone();
            let name = key.to_string();
            let mut first = true;
            return Ok(raw
                .map(move |chunk| {
                    let chunk = chunk?;
                    if std::mem::take(&mut first) && crypt::is_encrypted(&chunk) {
                        return Err(remote.unexpected_ciphertext(&name));
                    }
                    Ok(chunk)
                })
                .boxed());
        };
        let state = Opening {
            raw,
            opener: Some(k.opener(key)),
            remote: self.clone(),
            key: key.to_string(),
        };
        Ok(futures_util::stream::try_unfold(state, Opening::next).boxed())
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool, RemoteError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(&format!("looking up {key}"), e)),
        }
    }

    /// The "directories" right under `key` (one delimiter listing; relative to `key`).
    pub async fn list_dirs(&self, key: &str) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(key);
        let listed = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.error(&format!("listing {key}"), e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// The objects under `key` with their sizes (relative to the remote's prefix).
    pub async fn list_objects(&self, key: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        let prefix = self.path(key);
        let mut stream = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        let strip = join_key(&[&self.prefix]);
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.error(&format!("listing {key}"), e))?;
            let full = meta.location.to_string();
            let rel = full
                .strip_prefix(&strip)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or(full);
            out.push((rel, meta.size));
        }
        Ok(out)
    }

    /// Deletes the one object `key` (already absent: nothing to do). Not `delete_under`,
    /// which lists `key` as a directory.
    pub async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&format!("deleting {key}"), e)),
        }
    }

    /// Deletes every object under `key`; returns how many.
    pub async fn delete_under(&self, key: &str) -> Result<usize, RemoteError> {
        let objects = self.list_objects(key).await?;
        for (object, _) in &objects {
            match self.store.delete(&self.path(object)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(&format!("deleting {object}"), e)),
            }
        }
        Ok(objects.len())
    }
}

/// An encrypted object being read: its ciphertext stream and the opener (gone at the end).
struct Opening {
    raw: futures_util::stream::BoxStream<'static, Result<Bytes, RemoteError>>,
    opener: Option<crypt::Opener>,
    remote: Remote,
    key: String,
}

impl Opening {
    /// The next plaintext that authenticated, or `None` after the last chunk.
    async fn next(mut self) -> Result<Option<(Bytes, Self)>, RemoteError> {
        loop {
            let Some(mut opener) = self.opener.take() else {
                return Ok(None);
            };
            let mut batch = Vec::with_capacity(OPEN_BATCH);
            let mut ended = false;
            while batch.len() < OPEN_BATCH {
                match self.raw.next().await {
                    Some(chunk) => batch.extend_from_slice(&chunk?),
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            let opened = tokio::task::spawn_blocking(move || {
                let mut out = opener.push(&batch)?;
                if ended {
                    out.extend(opener.finish()?);
                    return Ok((None, out));
                }
                Ok((Some(opener), out))
            })
            .await
            .map_err(|e| {
                self.remote
                    .local_error(format!("opening {}: {e}", self.key))
            })?;
            let (opener, out) = opened.map_err(|e| self.remote.open_error(&self.key, e))?;
            self.opener = opener;
            if !out.is_empty() {
                return Ok(Some((Bytes::from(out), self)));
            }
        }
    }
}

/// `text` with every secret replaced (a server or a library may echo what it was sent).
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        if !secret.is_empty() {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_without_empty_parts_or_doubled_slashes() {
        assert_eq!(
            join_key(&["fleet/", "", "/dev-1", "a/b"]),
            "fleet/dev-1/a/b"
        );
        assert_eq!(join_key(&["", ""]), "");
    }

    #[test]
    fn a_credentials_file_outside_the_config_directory_is_refused() {
        let config = RemoteConfig {
            id: "r".into(),
            credentials_file: "../secrets.json".into(),
            ..RemoteConfig::default()
        };
        let err = credentials_path(&config, Path::new("/persist")).err();
        assert!(
            err.as_ref()
                .is_some_and(|e| e.to_string().contains("not under /persist/config")),
            "{err:?}"
        );
    }

    #[test]
    fn secrets_are_scrubbed() {
        assert_eq!(
            scrub("key AKIA secret s3cr3t", &["AKIA", "s3cr3t"]),
            "key <redacted> secret <redacted>"
        );
    }
}

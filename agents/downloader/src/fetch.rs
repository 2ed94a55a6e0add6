//! One HTTP(S) download into a partial file, resumed from the file's length with a `Range`
//! request. The stack is the config-agent's (hyper http1 + rustls with ring), one connection
//! per attempt: a download is long, a connection per attempt leaves nothing pooled to doubt.
//!
//! The file is written on the blocking pool by one writer fed through a small bounded channel,
//! so the network and the disk overlap and the runtime never waits on a write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_types::{ContentTreeConfig, DatastoreConfig};
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, HOST, RANGE, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the system's CA certificates are on Debian (and most Linux systems); `SSL_CERT_FILE`
/// overrides it as for OpenSSL.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Written bytes between two background flushes of the partial file.
const FLUSH_EVERY: usize = 32 << 20;
/// A progress report at most this often: each one is a durable write of the (persistent)
/// status of every tree of the blob.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Source(String),
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("{url}: HTTP {code} {reason}")]
    Status {
        url: String,
        code: u16,
        reason: String,
    },
    #[error("{url}: no data for {after:?} (stalled after {bytes} bytes)")]
    Stalled {
        url: String,
        after: Duration,
        bytes: u64,
    },
    #[error(
        "{url}: the content is larger than maxSizeBytes {limit}: {} bytes",
        if *announced { format!("the server announces {size}") } else { format!("more than {size}") }
    )]
    TooLarge {
        url: String,
        size: u64,
        limit: u64,
        announced: bool,
    },
    #[error("{url}: the connection ended after {got} of the {expected} bytes announced")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("{url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed download location with its TLS setup.
#[derive(Clone)]
pub struct Source {
    pub url: String,
    /// `host:port` to connect to.
    server: String,
    host_header: String,
    path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Where `tree` can be downloaded from: one source per datastore of its `ds_ids_list` that
/// Cairn can use, in that order (EVE's downloader tries each in turn until one succeeds).
/// `Err` says why none can be used.
pub fn sources(tree: &ContentTreeConfig) -> Result<Vec<Source>, String> {
    let mut usable = Vec::new();
    let mut unusable = Vec::new();
    for store in &tree.datastores {
        match source_at(tree, store) {
            Ok(source) => usable.push(source),
            Err(reason) => unusable.push(reason),
        }
    }
    if usable.is_empty() {
        return Err(if tree.datastores.is_empty() {
            source(tree).err().unwrap_or_default()
        } else {
            unusable.join("; ")
        });
    }
    for reason in unusable {
        tracing::warn!(tree = %tree.content_id, "{reason}; the tree's other datastores are used");
    }
    Ok(usable)
}

/// The URL of `tree` on its first datastore, as EVE builds it (`fqdn` / `dpath` / `URL`),
/// with the datastore's trust: its `dsCertPEM` alone when given (EVE replaces the roots with
/// them), else the system's roots. `Err` says why the tree cannot be downloaded.
pub fn source(tree: &ContentTreeConfig) -> Result<Source, String> {
    let Some(store) = tree.datastores.first() else {
        let ids: Vec<String> = tree
            .datastore_id_list
            .iter()
            .map(|id| id.to_string())
            .collect();
        return Err(format!(
            "datastore {} is not in the config's datastores",
            if ids.is_empty() {
                "(none named)".to_string()
            } else {
                ids.join(", ")
            }
        ));
    };
    source_at(tree, store)
}

/// The URL of `tree` on `store`, with the datastore's trust.
fn source_at(tree: &ContentTreeConfig, store: &DatastoreConfig) -> Result<Source, String> {
    let https = match store.ds_type.as_str() {
        "DsHttp" => false,
        "DsHttps" => true,
        other => {
            return Err(format!(
                "datastore {} is of type {other}: Cairn downloads from DsHttp and DsHttps datastores only",
                store.uuid
            ));
        }
    };
    let fqdn = store.fqdn.trim().trim_end_matches('/');
    let (scheme_https, rest) = match fqdn.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        Some((other, _)) => {
            return Err(format!(
                "datastore {}: fqdn {fqdn:?} has scheme {other:?}; use http or https",
                store.uuid
            ));
        }
        None => (https, fqdn),
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(format!(
            "datastore {}: fqdn {fqdn:?} is not a server (host[:port])",
            store.uuid
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => (h.to_string(), port),
            Err(_) => {
                return Err(format!(
                    "datastore {}: fqdn {fqdn:?} has a bad port {p:?}",
                    store.uuid
                ));
            }
        },
        _ => (rest.to_string(), if scheme_https { 443 } else { 80 }),
    };
    let mut path = String::new();
    for part in [store.dpath.as_str(), tree.relative_url.as_str()] {
        let part = part.trim_matches('/');
        if !part.is_empty() {
            path.push('/');
            path.push_str(part);
        }
    }
    if path.is_empty() {
        path.push('/');
    }
    let scheme = if scheme_https { "https" } else { "http" };
    let url = format!("{scheme}://{rest}{path}");
    if path.parse::<hyper::Uri>().is_err() {
        return Err(format!("{url} is not a valid URL"));
    }
    let tls = if scheme_https {
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(bare).map_err(|e| {
            format!(
                "datastore {}: {host:?} is not a server name: {e}",
                store.uuid
            )
        })?;
        Some((connector(store)?, name))
    } else {
        None
    };
    Ok(Source {
        url,
        server: format!("{host}:{port}"),
        host_header: rest.to_string(),
        path,
        tls,
    })
}

fn connector(store: &DatastoreConfig) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    if store.ds_cert_pem.is_empty() {
        let file = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| SYSTEM_ROOTS.into());
        // A root the system file holds that rustls cannot use is skipped, as browsers do.
        if let Ok(certs) = CertificateDer::pem_file_iter(&file) {
            for cert in certs.flatten() {
                let _ = roots.add(cert);
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "datastore {} gives no dsCertPEM and the system has no CA certificates ({})",
                store.uuid,
                file.display()
            ));
        }
    } else {
        for (i, pem) in store.ds_cert_pem.iter().enumerate() {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| {
                    format!(
                        "datastore {}: dsCertPEM[{i}] is not a PEM certificate: {e}",
                        store.uuid
                    )
                })?;
                roots.add(cert).map_err(|e| {
                    format!(
                        "datastore {}: dsCertPEM[{i}] is not usable as a trust anchor: {e}",
                        store.uuid
                    )
                })?;
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "datastore {}: dsCertPEM holds no certificate",
                store.uuid
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Bytes so far and the total the server announced, if it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub current: u64,
    pub total: Option<u64>,
}

/// Limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// 0: none.
    pub max_size: u64,
    /// Longest wait for the connection, the response head or the next bytes.
    pub stall: Duration,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Downloads `source` into `partial`, resuming from its length (`Range`; a server that answers
/// 200 instead restarts it from 0). Returns the file's final length once the server sent the
/// whole content; the file is fsynced. `progress` is called at most once a second.
pub async fn fetch(
    source: &Source,
    partial: &Path,
    limits: Limits,
    mut progress: impl FnMut(Progress),
) -> Result<u64, FetchError> {
    let url = source.url.clone();
    let stalled = |bytes: u64| FetchError::Stalled {
        url: url.clone(),
        after: limits.stall,
        bytes,
    };
    let protocol = |reason: String| FetchError::Protocol {
        url: url.clone(),
        reason,
    };
    let offset = match tokio::fs::metadata(partial).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => {
            return Err(FetchError::Io {
                what: "read",
                path: partial.to_path_buf(),
                source,
            });
        }
    };
    let io = tokio::time::timeout(limits.stall, connect(source))
        .await
        .map_err(|_| stalled(offset))??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::get(source.path.as_str())
        .header(HOST, &source.host_header)
        .header(
            USER_AGENT,
            concat!("cairn-downloader/", env!("CARGO_PKG_VERSION")),
        );
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| protocol(e.to_string()))?;
    let result = async {
        let response = tokio::time::timeout(limits.stall, sender.send_request(request))
            .await
            .map_err(|_| stalled(offset))?
            .map_err(|e| protocol(e.to_string()))?;
        let status = response.status();
        let length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Where the body starts in the content, and the content's whole size if known.
        let (start, total) = match status {
            StatusCode::OK => {
                if offset > 0 {
                    tracing::info!(url = %url, offset, "the server ignored the Range request: starting over");
                }
                (0, length)
            }
            StatusCode::PARTIAL_CONTENT => {
                let (start, total) = parse_content_range(range.as_deref())
                    .ok_or_else(|| protocol(format!("206 with Content-Range {range:?}")))?;
                if start != offset {
                    // Not the bytes asked for: start over rather than splice.
                    truncate(partial).await?;
                    return Err(protocol(format!(
                        "asked for bytes from {offset}, the server sent them from {start}; starting over at the next attempt"
                    )));
                }
                (start, total.or(length.map(|l| start + l)))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let total = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes */"))
                    .and_then(|t| t.trim().parse::<u64>().ok());
                if total == Some(offset) {
                    // Everything had arrived before the last attempt ended.
                    return Ok(offset);
                }
                truncate(partial).await?;
                return Err(protocol(format!(
                    "416 for bytes from {offset} (content size {total:?}); starting over at the next attempt"
                )));
            }
            other => {
                return Err(FetchError::Status {
                    url: url.clone(),
                    code: other.as_u16(),
                    reason: other.canonical_reason().unwrap_or("").to_string(),
                });
            }
        };
        if let Some(total) = total
            && limits.max_size > 0
            && total > limits.max_size
        {
            return Err(FetchError::TooLarge {
                url: url.clone(),
                size: total,
                limit: limits.max_size,
                announced: true,
            });
        }
        let expected_body = total.map(|t| t.saturating_sub(start));
        let (chunks, writer) = spawn_writer(partial.to_path_buf(), start == 0);
        let mut body = response.into_body();
        let mut current = start;
        let mut reported = Instant::now();
        progress(Progress { current, total });
        let streamed: Result<(), FetchError> = async {
            loop {
                let frame = tokio::time::timeout(limits.stall, body.frame())
                    .await
                    .map_err(|_| stalled(current))?;
                let frame = match frame {
                    None => break,
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        return Err(match total {
                            Some(expected) if current < expected => FetchError::Truncated {
                                url: url.clone(),
                                got: current,
                                expected,
                            },
                            _ => protocol(format!("reading the body: {e}")),
                        });
                    }
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                current += data.len() as u64;
                if limits.max_size > 0 && current > limits.max_size {
                    return Err(FetchError::TooLarge {
                        url: url.clone(),
                        size: limits.max_size,
                        limit: limits.max_size,
                        announced: false,
                    });
                }
                if chunks.send(data).await.is_err() {
                    break; // the writer failed; its error is collected below
                }
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    progress(Progress { current, total });
                }
            }
            if let Some(expected) = expected_body
                && current - start < expected
            {
                return Err(FetchError::Truncated {
                    url: url.clone(),
                    got: current,
                    expected: start + expected,
                });
            }
            Ok(())
        }
        .await;
        drop(chunks);
        let written = writer.await.map_err(|e| FetchError::Io {
            what: "write",
            path: partial.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let length = written?;
        streamed?;
        progress(Progress {
            current: length,
            total,
        });
        Ok(length)
    }
    .await;
    drop(sender);
    driver.abort();
    result
}

async fn connect(source: &Source) -> Result<Box<dyn Io>, FetchError> {
    let tcp = TcpStream::connect(&source.server)
        .await
        .map_err(|e| FetchError::Connect {
            server: source.server.clone(),
            source: e,
        })?;
    let _ = tcp.set_nodelay(true);
    match &source.tls {
        None => Ok(Box::new(tcp)),
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| FetchError::Tls {
                    server: source.server.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Box::new(tls))
        }
    }
}

/// `bytes <start>-<end>/<total|*>` → (start, total).
fn parse_content_range(value: Option<&str>) -> Option<(u64, Option<u64>)> {
    let rest = value?.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

async fn truncate(path: &Path) -> Result<(), FetchError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || crate::store::remove_if_present(&p))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| FetchError::Io {
            what: "remove",
            path: path.to_path_buf(),
            source,
        })
}

/// A writer on the blocking pool appending the chunks it receives (truncating first when
/// `from_start`), fsyncing at the end; returns the file's length.
fn spawn_writer(
    path: PathBuf,
    from_start: bool,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<u64, FetchError>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    #[allow(clippy::disallowed_methods)] // the closure is the writer, on the blocking pool
    let handle = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Io { what, path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(!from_start)
            .write(true)
            .truncate(from_start)
            .open(&path)
            .map_err(io("open", &path))?;
        let flusher = file.try_clone().map_err(io("open", &path))?;
        // Written data is flushed by a second thread as it comes (every FLUSH_EVERY bytes),
        // so the fsync at the end finds little left: the disk works while the network does.
        std::thread::scope(|scope| {
            let (kick, kicks) = std::sync::mpsc::sync_channel::<()>(1);
            let flushing = scope.spawn(move || {
                while kicks.recv().is_ok() {
                    // Best effort: the final fsync below reports what fails.
                    let _ = flusher.sync_data();
                }
            });
            let mut unflushed = 0;
            let written = (|| {
                while let Some(chunk) = rx.blocking_recv() {
                    file.write_all(&chunk).map_err(io("write", &path))?;
                    unflushed += chunk.len();
                    if unflushed >= FLUSH_EVERY {
                        unflushed = 0;
                        // A flush already pending covers these bytes too.
                        let _ = kick.try_send(());
                    }
                }
                Ok::<(), FetchError>(())
            })();
            drop(kick);
            let _ = flushing.join();
            written
        })?;
        file.sync_all().map_err(io("fsync", &path))?;
        Ok(file.metadata().map_err(io("stat", &path))?.len())
    });
    (tx, handle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use uuid::Uuid;

    fn tree(ds_type: &str, fqdn: &str, dpath: &str, url: &str) -> ContentTreeConfig {
        ContentTreeConfig {
            content_id: Uuid::from_u128(1),
            datastore_id_list: vec![Uuid::from_u128(2)],
            relative_url: url.into(),
            datastores: vec![DatastoreConfig {
                uuid: Uuid::from_u128(2),
                ds_type: ds_type.into(),
                fqdn: fqdn.into(),
                dpath: dpath.into(),
                ds_cert_pem: Vec::new(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_url_joins_fqdn_dpath_and_url_as_eve_does() {
        let s = source(&tree("DsHttp", "http://h:8080/", "/images/", "disk.qcow2")).unwrap();
        assert_eq!(s.url, "http://h:8080/images/disk.qcow2");
        assert_eq!(s.server, "h:8080");
        let s = source(&tree("DsHttp", "h", "", "a/b.img")).unwrap();
        assert_eq!(s.url, "http://h/a/b.img");
        assert_eq!(s.server, "h:80");
    }

    #[test]
    fn unsupported_types_and_missing_datastores_are_named() {
        let e = source(&tree("DsS3", "h", "", "x")).unwrap_err();
        assert!(
            e.contains("DsS3") && e.contains("DsHttp and DsHttps"),
            "{e}"
        );
        let mut t = tree("DsHttp", "h", "", "x");
        t.datastores.clear();
        let e = source(&t).unwrap_err();
        assert!(e.contains(&Uuid::from_u128(2).to_string()), "{e}");
    }

    #[test]
    fn content_range_is_read() {
        assert_eq!(
            parse_content_range(Some("bytes 10-19/20")),
            Some((10, Some(20)))
        );
        assert_eq!(parse_content_range(Some("bytes 0-9/*")), Some((0, None)));
        assert_eq!(parse_content_range(Some("items 0-9/10")), None);
    }
}

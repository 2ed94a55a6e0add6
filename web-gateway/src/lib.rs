//! Read-only web status page and JSON API for technicians on site (`cairn up --http ADDR`).
//!
//! Every answer is built from [`cairn_readout`], the model `cairn status --json` and
//! `cairn snapshots --json` print, so the page, the API and the CLI cannot disagree: the API
//! prints exactly those bytes. No route changes the device: the router has only `GET` routes,
//! and the read-out only subscribes to the agents' status topics (a subscriber cannot write into
//! a topic) and reads records.
//!
//! Access follows the socket and D-Bus read-outs: a bearer token of a tenant (from
//! [`TOKENS_FILE`] under `<persist>/config/`) sees that tenant's apps and snapshots and the
//! device; a `device` token, or any request on a loopback bind without a token, sees everything.
//! A non-loopback bind needs the token file. Wrong or missing tokens get 401 and count against
//! the peer's address; too many within [`FAILURE_WINDOW`] get 429 until it passes. Tokens are
//! never rendered or logged.
//!
//! Live updates: one subscription per status topic feeds a change counter; each open page
//! listens on `/api/v1/events` (server-sent events) and fetches its content again on a change.

mod auth;
mod blocking;
mod page;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cairn_pubsub::{Event, Topic};
use cairn_readout::readout::{self, DeviceView, Roots, SnapshotRow};
use cairn_types::export::ExportStatus;
use cairn_types::{AppInstanceStatus, ContentTreeStatus, DeviceStatus, DomainStatus, VolumeStatus};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::blocking::Blocking;

pub use auth::{
    FAILURE_LIMIT, FAILURE_WINDOW, MAX_HEADER_BYTES, Scope, TOKENS_FILE, TokenFile, Tokens,
};

/// How long a read-out waits for an agent's table, as the CLI does.
pub const READ_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(
        "web read-out on {addr}: a non-loopback address needs bearer tokens, and {file} is \
         missing: write lines `device TOKEN` or `tenant:NAME TOKEN` there (mode 600), or bind \
         a loopback address"
    )]
    TokensRequired { addr: SocketAddr, file: PathBuf },
    #[error("web read-out: token file {file}: {fault}")]
    Tokens { file: PathBuf, fault: String },
    #[error("web read-out: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "web read-out on {addr}: TLS needs the device's certificate and key, {cert} and {key}: \
         {fault}"
    )]
    Tls {
        addr: SocketAddr,
        cert: PathBuf,
        key: PathBuf,
        fault: String,
    },
    #[error("web read-out on {addr}: cannot start its file thread: {source}")]
    Thread {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("web read-out on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The server's shared state.
pub struct Web {
    roots: Roots,
    /// Where the server's file work runs (see [`blocking`]).
    io: Blocking,
    tokens: TokenFile,
    /// Loopback binds admit requests without a token (the device's own users).
    loopback: bool,
    failures: auth::Failures,
    changes: watch::Receiver<u64>,
    rendered: std::sync::Mutex<HashMap<(&'static str, Scope), Rendered>>,
    /// Held while a body is rendered (see `cached`).
    rendering: tokio::sync::Mutex<()>,
}

/// A body as last rendered for one route and scope. Pages are read far more often than the
/// device changes: one rendering per change (or per [`RENDER_FOR`]) serves them all, and the
/// server's memory stays that of one body, not of a heap grown by rendering each request.
/// Kept gzip-compressed (the JSON and HTML of 100 apps shrink about tenfold): browsers take it
/// as it is, other clients get it inflated per request, which costs less than a rendering.
struct Rendered {
    changes: u64,
    at: std::time::Instant,
    content_type: &'static str,
    gzip: axum::body::Bytes,
    /// The length of the plain text.
    len: u64,
}

/// How long a rendering may be served while no status topic changed: what no topic announces
/// (disk space, snapshot directories, relative times) is never older than this.
const RENDER_FOR: Duration = Duration::from_secs(2);

/// Where the tokens are looked for: `<persist>/config/web-tokens`.
pub fn tokens_path(persist: &Path) -> PathBuf {
    persist.join("config").join(TOKENS_FILE)
}

/// Binds `addr`, checks the access rule, and serves until `stopping` turns true.
pub async fn serve(
    addr: SocketAddr,
    roots: Roots,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), WebError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WebError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let router = router(addr, roots).await?;
    tracing::info!(%bound, "web read-out listening");
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    })
    .await
    .map_err(|source| WebError::Serve { addr, source })
}

/// The device's own certificate and key under `<persist>/config/` (made by the config-agent
/// when it onboards), served with `--http-tls`.
pub const DEVICE_CERT: &str = "device.cert.pem";
pub const DEVICE_KEY: &str = "device.key.pem";
/// A client that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// As [`serve`], over TLS with the device's certificate.
pub async fn serve_tls(
    addr: SocketAddr,
    roots: Roots,
    stopping: watch::Receiver<bool>,
) -> Result<(), WebError> {
    let config_dir = roots.persist.join("config");
    let (cert, key) = (config_dir.join(DEVICE_CERT), config_dir.join(DEVICE_KEY));
    let acceptor = {
        let (c, k) = (cert.clone(), key.clone());
        tokio::task::spawn_blocking(move || tls_acceptor(&c, &k))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|fault| WebError::Tls {
                addr,
                cert: cert.clone(),
                key: key.clone(),
                fault,
            })?
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WebError::Bind { addr, source })?;
    let router = router(addr, roots).await?;
    // The guard `wait_for` returns must not live across an await (it is not Send).
    let mut stopping = stopping;
    let stop = async move {
        let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
    };
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // E.g. out of file descriptors: the next accept may work.
                    tracing::warn!(error = %e, "web read-out: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .layer(Extension(axum::extract::ConnectInfo(peer))),
        );
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The routes for a server bound to `addr`, after reading the tokens.
pub async fn router(addr: SocketAddr, roots: Roots) -> Result<Router, WebError> {
    let file = tokens_path(&roots.persist);
    let loopback = addr.ip().is_loopback();
    let io = Blocking::start().map_err(|source| WebError::Thread { addr, source })?;
    let tokens = TokenFile::open(file.clone(), io.clone()).await?;
    if !loopback && tokens.current().await.is_empty() {
        return Err(WebError::TokensRequired { addr, file });
    }
    let changes = follow_changes(&roots, &io);
    let web = Arc::new(Web {
        roots,
        io,
        tokens,
        loopback,
        failures: auth::Failures::default(),
        changes,
        rendered: std::sync::Mutex::new(HashMap::new()),
        rendering: tokio::sync::Mutex::new(()),
    });
    Ok(Router::new()
        .route("/", get(page_handler))
        .route("/content", get(content_handler))
        .route("/api/v1/status", get(status_handler))
        .route("/api/v1/snapshots", get(snapshots_handler))
        .route("/api/v1/snapshots/{app}", get(app_snapshots_handler))
        .route("/api/v1/events", get(events_handler))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            auth::guard,
        ))
        .with_state(web))
}

/// A counter bumped on every change of a status topic the page shows. The followers keep a
/// digest per key, not the tables: a rendering reads the tables afresh, as the CLI does.
fn follow_changes(roots: &Roots, io: &Blocking) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let bus = roots.bus();
    spawn_follow(bus.notice::<DeviceStatus>("config-agent"), tx.clone());
    spawn_follow(bus.notice::<AppInstanceStatus>("app-manager"), tx.clone());
    spawn_follow(bus.notice::<VolumeStatus>("volume-manager"), tx.clone());
    spawn_follow(bus.notice::<DomainStatus>("domain-manager"), tx.clone());
    // Export progress and downloads move on the page too.
    spawn_follow(bus.notice::<ExportStatus>("volume-manager"), tx.clone());
    spawn_follow(bus.notice::<ContentTreeStatus>("downloader"), tx.clone());
    spawn_persist_watch(roots.persist.clone(), io.clone(), tx);
    rx
}

/// How often the server looks whether `<persist>` turned read-only or full: no agent publishes
/// that (none can record it), and an open page must show it.
const PERSIST_LOOK: Duration = Duration::from_secs(2);

/// Bumps the counter when `<persist>`'s fault comes or goes (one `statvfs` per look).
fn spawn_persist_watch(persist: PathBuf, io: Blocking, tx: Arc<watch::Sender<u64>>) {
    tokio::spawn(async move {
        let mut last: Option<String> = None;
        loop {
            let path = persist.clone();
            let fault = io
                .run(move || readout::persist_fault(&path))
                .await
                .unwrap_or_default();
            if fault != last {
                tx.send_modify(|n| *n += 1);
                last = fault;
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(PERSIST_LOOK).await;
        }
    });
}

fn spawn_follow<T: Topic>(
    mut sub: cairn_pubsub::Subscription<T, cairn_pubsub::Digest>,
    tx: Arc<watch::Sender<u64>>,
) {
    tokio::spawn(async move {
        loop {
            match sub.recv().await {
                Event::Create { .. }
                | Event::Modify { .. }
                | Event::Delete { .. }
                | Event::Synchronized => tx.send_modify(|n| *n += 1),
                _ => {}
            }
            // The server is gone (its state held the receiver): stop following.
            if tx.is_closed() {
                return;
            }
        }
    });
}

/// The device as `scope` may see it: a tenant sees its apps with their volumes, the device
/// and the agents; no other app's volumes, no domains, no downloads (the images of every
/// tenant), as on the socket and D-Bus, where a tenant reads its apps and the device only.
pub fn scoped(mut view: DeviceView, scope: &Scope) -> DeviceView {
    use cairn_readout::problems::About;
    if let Scope::Tenant(tenant) = scope {
        view.apps.retain(|app| &app.tenant == tenant);
        let own: std::collections::HashSet<String> = view
            .apps
            .iter()
            .flat_map(|app| readout::app_volumes(&view, app))
            .map(VolumeStatus::key)
            .collect();
        view.volumes.retain(|v| own.contains(&v.key()));
        view.domains.clear();
        view.content_trees.clear();
        // Exports of its own apps only (a job found after a restart names no app: hidden).
        let apps: Vec<_> = view.apps.iter().map(|a| a.uuid_and_version.uuid).collect();
        view.exports.retain(|job| apps.contains(&job.app_uuid));
        let apps: Vec<String> = apps.iter().map(ToString::to_string).collect();
        view.problems.retain(|p| match p.about {
            About::Device | About::Persist => true,
            _ => apps.contains(&p.app),
        });
    }
    view
}

/// The snapshot rows of `scope`: a tenant's apps only (records on disk that belong to no app
/// it can see are other tenants' business).
fn scoped_rows(rows: Vec<SnapshotRow>, view: &DeviceView, scope: &Scope) -> Vec<SnapshotRow> {
    match scope {
        Scope::Device => rows,
        Scope::Tenant(_) => rows
            .into_iter()
            .filter(|r| {
                view.apps
                    .iter()
                    .any(|a| a.uuid_and_version.uuid.to_string() == r.app)
            })
            .collect(),
    }
}

async fn read_view(web: &Web, scope: &Scope) -> DeviceView {
    scoped(readout::device_view(&web.roots, READ_WAIT).await, scope)
}

/// The view and its snapshot rows. The records are checked on the server's file thread while
/// the bus is read (as `cairn snapshots` does); the rows are made here, on the runtime's thread,
/// so that thread's heap, not the file thread's, holds them while the body is rendered.
async fn read_all(web: &Web, scope: &Scope, app: Option<String>) -> (DeviceView, Vec<SnapshotRow>) {
    let persist = web.roots.persist.clone();
    let (view, on_disk) = tokio::join!(
        read_view(web, scope),
        web.io
            .run(move || readout::unloadable_records_serial(&persist))
    );
    let on_disk = on_disk.unwrap_or_else(|e| {
        // The rows still show what the app-manager reports; only the records' verdict is missing.
        tracing::error!("web read-out: checking the snapshot records: {e}");
        Default::default()
    });
    let rows = readout::rows_from(&view.apps, on_disk, app.as_deref());
    let rows = scoped_rows(rows, &view, scope);
    (view, rows)
}

/// Pretty JSON and a newline: the bytes `cairn … --json` prints.
/// `Err` is what went wrong, for a 500.
fn json<T: serde::Serialize>(value: &T) -> Result<(&'static str, String), String> {
    match serde_json::to_string_pretty(value) {
        Ok(mut text) => {
            text.push('\n');
            Ok(("application/json", text))
        }
        Err(e) => Err(format!("encoding the read-out as JSON: {e}\n")),
    }
}

fn internal_error(text: String) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
}

const HTML: &str = "text/html; charset=utf-8";

/// A rendering's scratch (the device view, its JSON tree: several times the body) is freed by
/// now, but glibc keeps freed heap mapped unless asked; on a device the server lives inside
/// `cairn up` for months.
fn give_back_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A rendering's output, compressed as it is written: the whole text never has to be held.
/// It counts the plain bytes, so a client that takes no gzip still gets a `Content-Length`.
struct Body {
    gzip: flate2::write::GzEncoder<Vec<u8>>,
    len: u64,
}

impl std::io::Write for Body {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = std::io::Write::write(&mut self.gzip, bytes)?;
        self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut self.gzip)
    }
}

impl Body {
    fn new() -> Self {
        Self {
            // The fastest level: a rendering runs once per change, and it still shrinks ~10x.
            gzip: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
            len: 0,
        }
    }

    fn html(markup: maud::Markup) -> Result<(&'static str, Self), String> {
        let mut body = Self::new();
        std::io::Write::write_all(&mut body, markup.into_string().as_bytes())
            .map_err(|e| format!("compressing the page: {e}\n"))?;
        Ok((HTML, body))
    }

    /// The compressed bytes and the plain length.
    fn finish(self) -> std::io::Result<(axum::body::Bytes, u64)> {
        let mut bytes = self.gzip.finish()?;
        bytes.shrink_to_fit();
        Ok((bytes.into(), self.len))
    }
}

/// Pretty JSON and a newline, the bytes `cairn … --json` prints, compressed.
/// `Err` is what went wrong, for a 500.
fn json_gz<T: serde::Serialize>(value: &T) -> Result<(&'static str, Body), String> {
    let mut body = Body::new();
    serde_json::to_writer_pretty(&mut body, value)
        .map_err(|e| format!("encoding the read-out as JSON: {e}\n"))?;
    std::io::Write::write_all(&mut body, b"\n")
        .map_err(|e| format!("compressing the read-out: {e}\n"))?;
    Ok(("application/json", body))
}

/// Whether the request's `Accept-Encoding` takes gzip (`gzip` or `*`, not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// The body of `route` for `scope`: the last rendering while it is current, else `render`'s;
/// compressed for a client that takes gzip, inflated for one that does not.
async fn cached<F>(
    web: &Web,
    route: &'static str,
    scope: &Scope,
    headers: &HeaderMap,
    render: F,
) -> Response
where
    F: std::future::Future<Output = Result<(&'static str, Body), String>>,
{
    let key = (route, scope.clone());
    let current = |changes: u64| {
        let rendered = web.rendered.lock().unwrap_or_else(|e| e.into_inner());
        rendered
            .get(&key)
            .filter(|r| r.changes == changes && r.at.elapsed() < RENDER_FOR)
            .map(|r| (r.content_type, r.gzip.clone(), r.len))
    };
    let mut changes = *web.changes.borrow();
    let mut hit = current(changes);
    // One rendering at a time: the pages that ask together after a change wait for it and
    // share it, instead of each holding a device view and a body of its own at once.
    let _turn = match hit {
        Some(_) => None,
        None => {
            let turn = web.rendering.lock().await;
            changes = *web.changes.borrow();
            hit = current(changes);
            Some(turn)
        }
    };
    let (content_type, gzip, len) = match hit {
        Some(hit) => hit,
        None => {
            let (content_type, body) = match render.await {
                Ok(made) => made,
                Err(text) => return internal_error(text),
            };
            let (gzip, len) = match body.finish() {
                Ok(done) => done,
                Err(e) => return internal_error(format!("compressing the read-out: {e}\n")),
            };
            web.rendered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    key,
                    Rendered {
                        changes,
                        at: std::time::Instant::now(),
                        content_type,
                        gzip: gzip.clone(),
                        len,
                    },
                );
            give_back_freed_heap();
            (content_type, gzip, len)
        }
    };
    let vary = (header::VARY, "accept-encoding");
    if accepts_gzip(headers) {
        return (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CONTENT_ENCODING, "gzip"),
                vary,
            ],
            gzip,
        )
            .into_response();
    }
    // Inflated as it is sent, a chunk at a time: a request never holds the whole text.
    let body = axum::body::Body::from_stream(futures_util::stream::iter(Inflate(Some(
        flate2::read::GzDecoder::new(bytes_reader(gzip)),
    ))));
    // Its length is known: sent with it, not chunked, as before the bodies were compressed.
    let length = (header::CONTENT_LENGTH, len.to_string());
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (vary.0, vary.1.to_string()),
            length,
        ],
        body,
    )
        .into_response()
}

fn bytes_reader(bytes: axum::body::Bytes) -> impl std::io::Read + Send + 'static {
    std::io::Cursor::new(bytes)
}

/// The chunks of an inflated body (our own compression: an error ends the body early).
struct Inflate<R>(Option<flate2::read::GzDecoder<R>>);

const INFLATE_CHUNK: usize = 64 << 10;

impl<R: std::io::Read> Iterator for Inflate<R> {
    type Item = std::io::Result<axum::body::Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        let decoder = self.0.as_mut()?;
        let mut chunk = vec![0; INFLATE_CHUNK];
        match std::io::Read::read(decoder, &mut chunk) {
            Ok(0) => {
                self.0 = None;
                None
            }
            Ok(n) => {
                chunk.truncate(n);
                Some(Ok(chunk.into()))
            }
            Err(e) => {
                self.0 = None;
                Some(Err(e))
            }
        }
    }
}

async fn status_handler(
    State(web): State<Arc<Web>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
) -> Response {
    cached(&web, "status", &scope, &headers, async {
        json_gz(&read_view(&web, &scope).await)
    })
    .await
}

async fn snapshots_handler(
    State(web): State<Arc<Web>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
) -> Response {
    cached(&web, "snapshots", &scope, &headers, async {
        json_gz(&read_all(&web, &scope, None).await.1)
    })
    .await
}

async fn app_snapshots_handler(
    State(web): State<Arc<Web>>,
    Extension(scope): Extension<Scope>,
    UrlPath(app): UrlPath<String>,
) -> Response {
    let (view, rows) = read_all(&web, &scope, Some(app.clone())).await;
    let known = view
        .apps
        .iter()
        .any(|a| a.uuid_and_version.uuid.to_string() == app || a.display_name == app);
    if !known {
        // Another tenant's app is as unknown as one that does not exist.
        return (
            StatusCode::NOT_FOUND,
            format!("no app {app:?} on this device (give its UUID or name)\n"),
        )
            .into_response();
    }
    match json(&rows) {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(text) => internal_error(text),
    }
}

async fn page_handler(
    State(web): State<Arc<Web>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
) -> Response {
    cached(&web, "page", &scope, &headers, async {
        let (view, rows) = read_all(&web, &scope, None).await;
        let disk = disk_space(&web).await;
        Body::html(page::page(&view, &rows, &scope, disk))
    })
    .await
}

async fn content_handler(
    State(web): State<Arc<Web>>,
    Extension(scope): Extension<Scope>,
    headers: HeaderMap,
) -> Response {
    cached(&web, "content", &scope, &headers, async {
        let (view, rows) = read_all(&web, &scope, None).await;
        let disk = disk_space(&web).await;
        Body::html(page::content(&view, &rows, &scope, disk))
    })
    .await
}

async fn events_handler(State(web): State<Arc<Web>>) -> Response {
    let changes = tokio_stream::wrappers::WatchStream::from_changes(web.changes.clone());
    let events = changes.map(|n| {
        Ok::<_, std::convert::Infallible>(SseEvent::default().event("change").data(n.to_string()))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no page {}: this read-out serves /, /api/v1/status, /api/v1/snapshots[/APP] and \
             /api/v1/events\n",
            uri.path()
        ),
    )
        .into_response()
}

/// Free and total bytes of the filesystem holding `<persist>`.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    pub free: u64,
    pub total: u64,
}

async fn disk_space(web: &Web) -> Option<Disk> {
    let persist = web.roots.persist.clone();
    web.io
        .run(move || {
            let s = nix::sys::statvfs::statvfs(&persist).ok()?;
            let unit = s.fragment_size() as u64;
            Some(Disk {
                free: s.blocks_available() as u64 * unit,
                total: s.blocks() as u64 * unit,
            })
        })
        .await
        .ok()
        .flatten()
}

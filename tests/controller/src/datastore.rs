//! A datastore for tests: files over real HTTP or HTTPS (its own CA, made at start), with
//! faults a test injects per file, and a log of every request (with its `Range` header) so a
//! test can see what the device asked for.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cairn_test_controller::datastore::{DatastoreFault, TestDatastore};
//! let store = TestDatastore::start(true).await?;
//! store.put("disk.qcow2", vec![0u8; 4096]);
//! store.set_fault("disk.qcow2", Some(DatastoreFault::StallAfter(1024)));
//! // store.url(), store.ca_pem() go into the device's DatastoreConfig.
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Frame;
use hyper::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How the datastore misbehaves for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreFault {
    /// 404 Not Found.
    NotFound,
    /// Any other status, with no body.
    Status(u16),
    /// The file with its first byte changed: the length is right, the sha256 is not.
    WrongContent,
    /// Sends this many bytes (of the part asked for), then nothing more, keeping the
    /// connection open.
    StallAfter(u64),
    /// Announces the whole length, sends this many bytes, then closes the connection: a
    /// Content-Length that lies.
    TruncateAfter(u64),
    /// Answers 200 with the whole file whatever `Range` asks.
    IgnoreRange,
}

/// One request as the datastore saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The `Range` header, if the request had one.
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, Bytes>,
    faults: BTreeMap<String, DatastoreFault>,
    seen: Vec<Seen>,
}

pub struct TestDatastore {
    addr: SocketAddr,
    https: bool,
    ca_pem: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestDatastore {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl TestDatastore {
    /// Listens on 127.0.0.1; `https`: TLS with a certificate for `127.0.0.1` and `localhost`
    /// from a CA of its own ([`Self::ca_pem`]).
    pub async fn start(https: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (issuer, ca_pem) = crate::ca("datastore CA")?;
        let (cert, key) = crate::leaf(
            &issuer,
            "datastore",
            vec!["localhost".into(), "127.0.0.1".into()],
        )?;
        let acceptor = if https {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let key = rcgen::KeyPair::from_pem(&key)?;
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes())?],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsAcceptor::from(Arc::new(config)))
        } else {
            None
        };
        let state = Arc::new(Mutex::new(State::default()));
        let server = tokio::spawn(serve(listener, acceptor, state.clone()));
        Ok(Self {
            addr,
            https,
            ca_pem,
            state,
            server,
        })
    }

    /// `http(s)://127.0.0.1:<port>`: a datastore's `fqdn` as EVE's controllers give it.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.addr
        )
    }

    /// The CA that issued the server's certificate (a datastore's `dsCertPEM`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Serves `content` at `/<path>`.
    pub fn put(&self, path: &str, content: impl Into<Bytes>) {
        lock(&self.state)
            .files
            .insert(path.trim_start_matches('/').to_string(), content.into());
    }

    pub fn set_fault(&self, path: &str, fault: Option<DatastoreFault>) {
        let path = path.trim_start_matches('/').to_string();
        let mut state = lock(&self.state);
        match fault {
            Some(f) => state.faults.insert(path, f),
            None => state.faults.remove(&path),
        };
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<Mutex<State>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::io::Error>(answer(&request, &state)) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match acceptor {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
                Some(acceptor) => {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                }
            }
        });
    }
}

/// `bytes=<start>-` (the only form a downloader resuming sends).
fn range_start(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

fn answer<B>(request: &Request<B>, state: &Mutex<State>) -> Response<Content> {
    let path = request.uri().path().trim_start_matches('/').to_string();
    let range = request
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut state = lock(state);
    let fault = state.faults.get(&path).cloned();
    let file = state.files.get(&path).cloned();
    let (status, response) = build(file, fault, range.as_deref());
    state.seen.push(Seen {
        path,
        range,
        status,
    });
    response
}

fn build(
    file: Option<Bytes>,
    fault: Option<DatastoreFault>,
    range: Option<&str>,
) -> (u16, Response<Content>) {
    let empty = |status: u16| {
        let mut response = Response::new(Content::empty());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
        (status, response)
    };
    let Some(mut data) = file else {
        return empty(404);
    };
    match fault {
        Some(DatastoreFault::NotFound) => return empty(404),
        Some(DatastoreFault::Status(code)) => return empty(code),
        Some(DatastoreFault::WrongContent) if !data.is_empty() => {
            let mut changed = data.to_vec();
            changed[0] ^= 0xff;
            data = Bytes::from(changed);
        }
        _ => {}
    }
    let total = data.len() as u64;
    let start = match (range.and_then(range_start), &fault) {
        (_, Some(DatastoreFault::IgnoreRange)) | (None, _) => None,
        (Some(start), _) => Some(start),
    };
    if let Some(start) = start
        && start >= total
    {
        let (status, mut response) = empty(416);
        if let Ok(value) = format!("bytes */{total}").parse() {
            response.headers_mut().insert(CONTENT_RANGE, value);
        }
        return (status, response);
    }
    let from = start.unwrap_or(0);
    let part = data.slice(from as usize..);
    let cut = match fault {
        Some(DatastoreFault::StallAfter(n)) => Some((n.min(part.len() as u64), Cut::Stall)),
        Some(DatastoreFault::TruncateAfter(n)) => Some((n.min(part.len() as u64), Cut::Close)),
        _ => None,
    };
    let announced = part.len() as u64;
    let mut response = Response::new(Content {
        end: cut.map_or(part.len(), |(n, _)| n as usize),
        data: part,
        pos: 0,
        cut: cut.map(|(_, c)| c),
        closing: None,
    });
    let status = if start.is_some() { 206 } else { 200 };
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    if let Ok(v) = announced.to_string().parse() {
        headers.insert(CONTENT_LENGTH, v);
    }
    if fault != Some(DatastoreFault::IgnoreRange)
        && let Ok(v) = "bytes".parse()
    {
        headers.insert(ACCEPT_RANGES, v);
    }
    if start.is_some()
        && let Ok(v) = format!("bytes {from}-{}/{total}", total.saturating_sub(1)).parse()
    {
        headers.insert(CONTENT_RANGE, v);
    }
    (status, response)
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    /// No more bytes, the connection stays open.
    Stall,
    /// The connection is closed.
    Close,
}

/// A body sent in 256 KiB chunks up to `end`, then cut as asked.
pub struct Content {
    data: Bytes,
    pos: usize,
    end: usize,
    cut: Option<Cut>,
    /// Before a close, a pause: hyper flushes what was sent (the head and the bytes before
    /// the cut) only while the body is pending.
    closing: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Content {
    fn empty() -> Self {
        Self {
            data: Bytes::new(),
            pos: 0,
            end: 0,
            cut: None,
            closing: None,
        }
    }
}

impl hyper::body::Body for Content {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return match this.cut {
                None => Poll::Ready(None),
                // Never woken: the connection hangs until the client gives up.
                Some(Cut::Stall) => Poll::Pending,
                Some(Cut::Close) => {
                    let pause = this.closing.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(100)))
                    });
                    match pause.as_mut().poll(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::other(
                            "cut by the test datastore",
                        )))),
                    }
                }
            };
        }
        let n = (this.end - this.pos).min(256 << 10);
        let chunk = this.data.slice(this.pos..this.pos + n);
        this.pos += n;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

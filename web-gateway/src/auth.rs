//! Who may read what: bearer tokens per tenant, the loopback rule, and the failure limit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::blocking::Blocking;
use crate::{Web, WebError};

/// The token file under `<persist>/config/`: one `device TOKEN` or `tenant:NAME TOKEN` per line
/// (`tenant: TOKEN` is the default tenant), `#` comments.
pub const TOKENS_FILE: &str = "web-tokens";
/// Failed attempts a peer address may make within [`FAILURE_WINDOW`] before it gets 429.
pub const FAILURE_LIMIT: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Request headers larger than this in total are refused (431): nothing here needs more.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Short tokens can be guessed within the failure limit's patience.
const MIN_TOKEN_LEN: usize = 16;
/// Peers remembered at most; beyond it the oldest windows are forgotten.
const MAX_PEERS: usize = 4096;

/// What a request may see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The whole device.
    Device,
    /// One tenant's apps and snapshots, and the device; `""` is the default tenant.
    Tenant(String),
}

impl Scope {
    pub fn describe(&self) -> String {
        match self {
            Scope::Device => "the whole device".into(),
            Scope::Tenant(t) if t.is_empty() => "the default tenant".into(),
            Scope::Tenant(t) => format!("tenant {t}"),
        }
    }
}

/// The tokens of the token file. Debug never shows a token.
#[derive(Default)]
pub struct Tokens(Vec<(Scope, String)>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.0.len())
    }
}

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads `file`; a missing file is no tokens. A line that does not parse is an error naming
    /// its number and the fault, never its token.
    pub fn load(file: &Path) -> Result<Self, WebError> {
        use std::os::unix::fs::MetadataExt;
        let fault = |fault: String| WebError::Tokens {
            file: file.to_path_buf(),
            fault,
        };
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(fault(format!("cannot read it: {e}"))),
        };
        // Others able to read the tokens could read the device through them.
        if let Ok(meta) = std::fs::metadata(file)
            && meta.mode() & 0o077 != 0
        {
            return Err(fault(format!(
                "mode {:o} lets others read the tokens: chmod 600 it",
                meta.mode() & 0o777
            )));
        }
        Self::parse(&text).map_err(fault)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = n + 1;
            let (who, token) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("line {n}: want `device TOKEN` or `tenant:NAME TOKEN`"))?;
            let token = token.trim();
            let scope = match who {
                "device" => Scope::Device,
                _ => match who.strip_prefix("tenant:") {
                    Some(tenant) if cairn_types::app::is_tenant_name(tenant) => {
                        Scope::Tenant(tenant.to_string())
                    }
                    Some(tenant) => {
                        return Err(format!("line {n}: {tenant:?} is not a tenant name"));
                    }
                    None => {
                        return Err(format!(
                            "line {n}: {who:?} is neither `device` nor `tenant:NAME`"
                        ));
                    }
                },
            };
            if token.len() < MIN_TOKEN_LEN || token.contains(char::is_whitespace) {
                return Err(format!(
                    "line {n}: the token must be at least {MIN_TOKEN_LEN} characters without \
                     spaces"
                ));
            }
            tokens.push((scope, token.to_string()));
        }
        Ok(Self(tokens))
    }

    /// The scope of `given`, comparing every token in constant time (no early exit telling how
    /// much of a guess was right).
    fn scope_of(&self, given: &str) -> Option<Scope> {
        let mut found = None;
        for (scope, token) in &self.0 {
            if constant_time_eq(token.as_bytes(), given.as_bytes()) && found.is_none() {
                found = Some(scope.clone());
            }
        }
        found
    }
}

/// The tokens file as it is now: re-read when its identity (inode, size, modification and
/// change times) changes, so a token added or revoked counts from the next request, without a restart.
pub struct TokenFile {
    file: PathBuf,
    /// The file is looked at on every request with a token: on the server's file thread.
    io: Blocking,
    cached: tokio::sync::Mutex<(Option<FileStamp>, Arc<Tokens>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// The inode's change time: moves with a rename or chmod that keeps the rest alike.
    changed: (i64, i64),
}

impl TokenFile {
    /// Reads `file` once: a fault at start is the caller's error (the server does not start).
    pub(crate) async fn open(file: PathBuf, io: Blocking) -> Result<Self, WebError> {
        let stamp = stamp(&io, &file).await;
        let tokens = load_blocking(&io, file.clone()).await?;
        Ok(Self {
            file,
            io,
            cached: tokio::sync::Mutex::new((stamp, Arc::new(tokens))),
        })
    }

    /// The tokens in force. A file changed into one that does not load admits no token (fail
    /// closed: a revocation with a typo must not keep the revoked token valid); the fault is
    /// logged naming the line, never a token.
    pub async fn current(&self) -> Arc<Tokens> {
        let now = stamp(&self.io, &self.file).await;
        let mut cached = self.cached.lock().await;
        if cached.0 != now {
            let tokens = match load_blocking(&self.io, self.file.clone()).await {
                Ok(tokens) => {
                    tracing::info!(file = %self.file.display(), tokens = tokens.0.len(), "web read-out: tokens re-read");
                    tokens
                }
                Err(e) => {
                    tracing::error!("web read-out: {e}; no token is accepted until it is fixed");
                    Tokens::default()
                }
            };
            *cached = (now, Arc::new(tokens));
        }
        cached.1.clone()
    }
}

async fn stamp(io: &Blocking, file: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let file = file.to_path_buf();
    let meta = io.run(move || std::fs::metadata(file)).await.ok()?.ok()?;
    Some(FileStamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
        changed: (meta.ctime(), meta.ctime_nsec()),
    })
}

async fn load_blocking(io: &Blocking, file: PathBuf) -> Result<Tokens, WebError> {
    let shown = file.clone();
    io.run(move || Tokens::load(&file))
        .await
        .map_err(|e| WebError::Tokens {
            file: shown,
            fault: e.to_string(),
        })?
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Failed attempts per peer address, within the current window.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<IpAddr, (Instant, u32)>>);

impl Failures {
    /// Whether `peer` has used up its failures in the current window.
    fn blocked(&self, peer: IpAddr) -> Option<Duration> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (since, count) = map.get(&peer)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*count >= FAILURE_LIMIT).then_some(left)
    }

    fn record(&self, peer: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PEERS {
            map.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = map.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The token a request carries: `Authorization: Bearer TOKEN`, or Basic with the token as the
/// password (what a browser sends after its login prompt; the user name is ignored).
fn presented(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (kind, rest) = value.split_once(' ')?;
    if kind.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if kind.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, token)| token.to_string());
    }
    None
}

fn unauthorized(why: &str) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        format!("{why}: give a token from <persist>/config/{TOKENS_FILE} as `Authorization: Bearer TOKEN` (or as the password of the browser's prompt)\n"),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"cairn\", charset=\"UTF-8\""),
    );
    response
}

/// Admits a request with its scope, or answers 431, 429 or 401.
pub async fn guard(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers of {header_bytes} bytes: at most {MAX_HEADER_BYTES}\n"),
        )
            .into_response();
    }
    if let Some(left) = web.failures.blocked(peer.ip()) {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many wrong or missing tokens from {}: wait {} s\n",
                peer.ip(),
                left.as_secs() + 1
            ),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&(left.as_secs() + 1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    let scope = match presented(&request) {
        Some(token) => match web.tokens.current().await.scope_of(&token) {
            Some(scope) => scope,
            None => {
                web.failures.record(peer.ip());
                // The peer and path are logged, never what it sent.
                tracing::warn!(peer = %peer.ip(), path = request.uri().path(), "web read-out: wrong token");
                return unauthorized("wrong token");
            }
        },
        None if web.loopback => Scope::Device,
        None => {
            web.failures.record(peer.ip());
            return unauthorized("a token is needed on this address");
        }
    };
    request.extensions_mut().insert(scope);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_parse_and_faults_name_the_line_never_the_token() {
        let tokens = Tokens::parse(
            "# technicians\ndevice 0123456789abcdef0\ntenant:acme acme-token-0123456789\ntenant: default-token-0123456\n",
        )
        .expect("parses");
        assert_eq!(tokens.scope_of("0123456789abcdef0"), Some(Scope::Device));
        assert_eq!(
            tokens.scope_of("acme-token-0123456789"),
            Some(Scope::Tenant("acme".into()))
        );
        assert_eq!(
            tokens.scope_of("default-token-0123456"),
            Some(Scope::Tenant(String::new()))
        );
        assert_eq!(tokens.scope_of("acme-token-012345678"), None);
        assert!(!format!("{tokens:?}").contains("acme-token"));

        let fault = Tokens::parse("tenant:Bad! secret-secret-secret").expect_err("refused");
        assert!(
            fault.contains("line 1") && !fault.contains("secret"),
            "{fault}"
        );
        let fault = Tokens::parse("device short").expect_err("refused");
        assert!(
            fault.contains("at least 16") && !fault.contains("short"),
            "{fault}"
        );
    }

    #[test]
    fn a_peer_is_blocked_after_the_limit_within_the_window() {
        let failures = Failures::default();
        let peer: IpAddr = "192.0.2.1".parse().expect("address");
        for _ in 0..FAILURE_LIMIT - 1 {
            failures.record(peer);
        }
        assert!(failures.blocked(peer).is_none());
        failures.record(peer);
        assert!(failures.blocked(peer).is_some());
        assert!(
            failures
                .blocked("192.0.2.2".parse().expect("address"))
                .is_none()
        );
    }
}

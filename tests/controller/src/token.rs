//! A registry token server for tests: the distribution "token" auth scheme's realm. The
//! registry answers 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`; the
//! client asks this server (HTTPS on loopback) for a token with its basic credentials; the
//! server checks them and answers with a JWT (ES256, the signing certificate in the `x5c`
//! header, issued by a CA of the server's own that the registry's `rootcertbundle` holds)
//! granting the scopes asked for. Every request is logged so a test can see it came.
//!
//! The server runs on a thread of its own (its own tokio runtime), so a synchronous test
//! helper can start and stop it; stopping it closes its port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::DecodePrivateKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// How long a token is good for (seconds).
const TOKEN_LIFETIME: u64 = 300;

/// One token request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The `scope` parameters, as sent (`repository:cairn/app:pull`).
    pub scopes: Vec<String>,
    pub service: Option<String>,
    /// The user of the request's basic credentials, if it had any.
    pub user: Option<String>,
    /// 200 when a token was issued, 401 when the credentials were refused.
    pub status: u16,
}

/// Who may have tokens and what the tokens say.
struct Grants {
    user: String,
    password: String,
    service: String,
    issuer: String,
    key: SigningKey,
    /// The signing certificate (DER), standard base64 as `x5c` carries it.
    x5c: String,
}

pub struct TokenServer {
    addr: SocketAddr,
    root_pem: String,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TokenServer {
    /// Starts a token server on 127.0.0.1 with a TLS certificate from `tls_issuer` (so clients
    /// trusting the registry's CA trust it too), granting tokens for `service` signed as
    /// `issuer` to `user` with `password`.
    pub(crate) fn start(
        tls_issuer: &crate::Issuer,
        user: &str,
        password: &str,
        service: &str,
        issuer: &str,
    ) -> anyhow::Result<Self> {
        let (tls_cert, tls_key) = crate::leaf(
            tls_issuer,
            "token server",
            vec!["localhost".into(), "127.0.0.1".into()],
        )?;
        let tls_key = rcgen::KeyPair::from_pem(&tls_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(tls_cert.as_bytes())?],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls_key.serialize_der())),
            )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        // The token signing key: a certificate under a root of its own, the root being all
        // the registry trusts for tokens.
        let (root, root_pem) = crate::ca("token signing CA")?;
        let (sign_cert, sign_key) = crate::leaf(&root, "token signer", Vec::new())?;
        let sign_der = CertificateDer::from_pem_slice(sign_cert.as_bytes())?;
        let key = SigningKey::from_pkcs8_der(&rcgen::KeyPair::from_pem(&sign_key)?.serialize_der())
            .map_err(|e| anyhow::anyhow!("the token signing key: {e}"))?;
        let grants = Arc::new(Grants {
            user: user.into(),
            password: password.into(),
            service: service.into(),
            issuer: issuer.into(),
            key,
            x5c: STANDARD.encode(sign_der.as_ref()),
        });

        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let log = seen.clone();
        let thread = std::thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = serve(listener, acceptor, grants, log) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here ends the connections in flight.
            })
            .context("cannot start the token server's thread")?;
        Ok(Self {
            addr,
            root_pem,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The realm the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    /// The root the registry trusts token signatures under (its `rootcertbundle`).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Every token request so far, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.seen).clone()
    }

    /// Stops the server; its port refuses connections from then on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    grants: Arc<Grants>,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, grants, seen) = (acceptor.clone(), grants.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |request| {
                let answer = answer(&request, &grants, &seen);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The user and password of a `Basic` authorization header.
fn basic_credentials<B>(request: &Request<B>) -> Option<(String, String)> {
    let value = request
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.into(), password.into()))
}

/// The token's `access` claim for the scopes asked for: `type:name:action,...` each (a name
/// may hold a `:` of a registry port, so the type is up to the first `:` and the actions after
/// the last).
fn access(scopes: &[String]) -> Vec<serde_json::Value> {
    scopes
        .iter()
        .flat_map(|s| s.split(' '))
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect()
}

fn answer<B>(
    request: &Request<B>,
    grants: &Grants,
    seen: &Mutex<Vec<TokenRequest>>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/token" {
        return json(StatusCode::NOT_FOUND, serde_json::json!({}));
    }
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let scopes: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let service = pairs
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.clone());
    let credentials = basic_credentials(request);
    let mut record = TokenRequest {
        scopes: scopes.clone(),
        service: service.clone(),
        user: credentials.as_ref().map(|(u, _)| u.clone()),
        status: 401,
    };
    let granted = credentials
        .as_ref()
        .is_some_and(|(u, p)| *u == grants.user && *p == grants.password);
    if !granted || service.as_deref() != Some(grants.service.as_str()) {
        lock(seen).push(record);
        let why = if granted {
            "the token is for another service"
        } else {
            "user name or password is wrong"
        };
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": why}]}),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [grants.x5c]});
    let claims = serde_json::json!({
        "iss": grants.issuer,
        "sub": grants.user,
        "aud": grants.service,
        "exp": now + TOKEN_LIFETIME,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": uuid::Uuid::new_v4().to_string(),
        "access": access(&scopes),
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    // ES256 in a JWS is the fixed 64-byte r || s, not DER.
    let signature: p256::ecdsa::Signature = grants.key.sign(input.as_bytes());
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    record.status = 200;
    lock(seen).push(record);
    json(
        StatusCode::OK,
        serde_json::json!({"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME}),
    )
}

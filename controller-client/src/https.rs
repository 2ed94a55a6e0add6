//! A small HTTPS/1.1 client for the controller link: rustls with the ring provider, the device's
//! root certificate as the only trust anchor (no system roots, no client certificate, as in
//! EVE's API v2), one connection per request and one deadline over connect, handshake, request
//! and body. The link talks to the controller every few seconds at most, so a fresh connection
//! per request costs little and leaves no half-dead pooled connection to reason about.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// EVE's MIME type for every protobuf body.
pub const PROTO_MIME: &str = "application/x-proto-binary";
/// No controller response is anywhere near this; a bigger one is refused, not buffered.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("root certificate {path}: {reason}")]
    Root { path: String, reason: String },
    #[error("controller address {0:?} is not host:port")]
    Address(String),
    #[error("cannot connect to the controller at {server}: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("TLS with the controller at {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("{method} {path}: no answer from {server} within {after:?}")]
    Timeout {
        method: &'static str,
        path: String,
        server: String,
        after: Duration,
    },
    #[error("{method} {path} at {server}: {reason}")]
    Exchange {
        method: &'static str,
        path: String,
        server: String,
        reason: String,
    },
}

impl HttpsError {
    /// Whether waiting and trying again can help (an unreachable or overloaded controller), as
    /// opposed to a fault of this device's setup.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Root { .. } | Self::Address(_))
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// A client bound to one controller (`host:port`) and one trust anchor.
#[derive(Clone)]
pub struct Https {
    server: String,
    host: String,
    name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
}

impl Https {
    /// `root_pem`: the certificate(s) the controller's TLS certificate must chain to.
    pub fn new(
        server: &str,
        root_pem: &[u8],
        root_path: &Path,
        timeout: Duration,
    ) -> Result<Self, HttpsError> {
        let root_error = |reason: String| HttpsError::Root {
            path: root_path.display().to_string(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem) {
            let cert = cert.map_err(|e| root_error(format!("not a PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| root_error(format!("not usable as a trust anchor: {e}")))?;
        }
        if roots.is_empty() {
            return Err(root_error("holds no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| root_error(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = host_of(server).ok_or_else(|| HttpsError::Address(server.to_string()))?;
        let name = ServerName::try_from(host.clone())
            .map_err(|_| HttpsError::Address(server.to_string()))?;
        Ok(Self {
            server: server.to_string(),
            host,
            name,
            connector: TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub async fn get(&self, path: &str) -> Result<Response, HttpsError> {
        self.request("GET", path, None).await
    }

    /// POSTs a protobuf body.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<Response, HttpsError> {
        self.request("POST", path, Some(body)).await
    }

    async fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpsError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| HttpsError::Timeout {
                method,
                path: path.to_string(),
                server: self.server.clone(),
                after: self.timeout,
            })?
    }

    async fn exchange(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpsError> {
        let exchange_error = |reason: String| HttpsError::Exchange {
            method,
            path: path.to_string(),
            server: self.server.clone(),
            reason,
        };
        let tcp = TcpStream::connect(&self.server)
            .await
            .map_err(|source| HttpsError::Connect {
                server: self.server.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| HttpsError::Tls {
                server: self.server.clone(),
                reason: describe_tls(&e),
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| exchange_error(e.to_string()))?;
        // The connection task ends with the request: dropping `sender` closes it.
        let driver = tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host);
        if body.is_some() {
            request = request.header(CONTENT_TYPE, PROTO_MIME);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| exchange_error(e.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| exchange_error(describe_hyper(&e)))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| exchange_error(format!("reading the body: {e}")))?
                .to_bytes();
            Ok(Response { status, body })
        }
        .await;
        drop(sender);
        driver.abort();
        result
    }
}

fn host_of(server: &str) -> Option<String> {
    let (host, port) = server.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// rustls puts the reason a certificate was refused inside an io::Error; say it plainly.
fn describe_tls(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "the controller's certificate is refused ({why:?}): it does not chain to the \
             device's root certificate, or names another host"
        ),
        Some(other) => other.to_string(),
        None => error.to_string(),
    }
}

fn describe_hyper(error: &hyper::Error) -> String {
    let mut chain = error.to_string();
    let mut closed = error.is_incomplete_message() || error.is_closed();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        chain.push_str(&format!(": {cause}"));
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            closed |= matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    if closed {
        format!("the controller closed the connection before answering ({chain})")
    } else {
        chain
    }
}

/// Splits `https://host:port[/...]` (or a bare `host:port`) into `host:port`.
pub fn server_of_url(url: &str) -> Result<String, HttpsError> {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    if rest.starts_with("http://") {
        return Err(HttpsError::Address(format!(
            "{url} (only https is spoken with a controller)"
        )));
    }
    let server = rest.split('/').next().unwrap_or_default();
    let server = if host_of(server).is_some() {
        server.to_string()
    } else {
        format!("{server}:443")
    };
    host_of(&server)
        .map(|_| server.clone())
        .ok_or_else(|| HttpsError::Address(url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses() {
        assert_eq!(
            server_of_url("https://ctl.example:8443/x").unwrap(),
            "ctl.example:8443"
        );
        assert_eq!(
            server_of_url("https://ctl.example").unwrap(),
            "ctl.example:443"
        );
        assert_eq!(server_of_url("127.0.0.1:9").unwrap(), "127.0.0.1:9");
        assert!(server_of_url("http://ctl.example:80").is_err());
        assert_eq!(host_of("[::1]:443").as_deref(), Some("::1"));
        assert!(host_of("nohost").is_none());
    }
}

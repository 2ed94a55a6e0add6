//! One EdgeView instance's link to the dispatcher (EVE `setupWebC`, the server loop of
//! `edge-view.go`): a websocket over TLS to the token's `dep`, headers `X-Session-Token` (the
//! token's hash, by which the dispatcher pairs this device with a client), `X-Hostname`
//! (`<hostname>[-inst-N]-EV-server`) and `X-EdgeView-Version`; pings every 30 s so a proxy keeps
//! the connection; reconnects with a growing delay when it drops. The dispatcher's own plain-text
//! notes ("no device online", "YourEndPointIPAddr:…") are not envelopes and are skipped; every
//! command is answered with envelopes and ended by `+++Done+++`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::envelope::{self, Refusal};
use crate::query::{self, CmdOpt};
use crate::token::{AuthType, Token};

/// EVE's `closeMessage`: the end of every reply.
pub const CLOSE_MESSAGE: &str = "+++Done+++";
/// The dispatcher's note that the peer is not there (EVE `noDeviceStr`).
pub const NO_DEVICE: &str = "no device online";
const KEEPALIVE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a session tells the agent.
#[derive(Debug)]
pub enum SessionEvent {
    Connected {
        instance: u8,
    },
    Disconnected {
        instance: u8,
        reason: String,
    },
    /// A verified command that passed the policy; the agent answers on `reply`.
    Command {
        instance: u8,
        cmd: Box<CmdOpt>,
        reply: oneshot::Sender<String>,
    },
}

pub struct SessionSettings {
    pub token: Arc<Token>,
    pub instance: u8,
    pub tls: Arc<rustls::ClientConfig>,
    pub hostname: String,
    /// EVE's device policy (`dev_policy.allow_dev`).
    pub dev_allowed: bool,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

/// TLS trust for the dispatcher: the device's root (as the controller link trusts it) and the
/// config's `disp_cert_pem`.
pub fn tls_config(
    root_pem: &[u8],
    disp_cert_pem: &[String],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let pems = std::iter::once(root_pem).chain(disp_cert_pem.iter().map(String::as_bytes));
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("a dispatcher certificate is not PEM: {e}"))?;
            roots.add(cert).map_err(|e| {
                format!("a dispatcher certificate is not usable as a trust anchor: {e}")
            })?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no certificate to trust the dispatcher with: the device has no controller root and the config no disp_cert_pem"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Runs the instance until the task is aborted.
pub async fn run(settings: SessionSettings, events: mpsc::Sender<SessionEvent>) {
    let instance = settings.instance;
    let mut backoff = settings.first_backoff;
    loop {
        let reason = match connect(&settings).await {
            Ok(ws) => {
                tracing::info!(instance, dispatcher = %settings.token.host_port, "connected to the edgeview dispatcher");
                backoff = settings.first_backoff;
                if events
                    .send(SessionEvent::Connected { instance })
                    .await
                    .is_err()
                {
                    return;
                }
                serve(ws, &settings, &events).await
            }
            Err(e) => e,
        };
        tracing::warn!(instance, dispatcher = %settings.token.host_port, "edgeview dispatcher link: {reason}; again in {backoff:?}");
        if events
            .send(SessionEvent::Disconnected { instance, reason })
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(settings.max_backoff);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn connect(settings: &SessionSettings) -> Result<Ws, String> {
    let token = &settings.token;
    let attempt = async {
        let tcp = TcpStream::connect(&token.host_port)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", token.host_port))?;
        let host = token
            .host_port
            .rsplit_once(':')
            .map_or(token.host_port.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| format!("{host:?} is not a host name or address"))?;
        let tls = TlsConnector::from(settings.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {} failed: {e}", token.host_port))?;
        let url = format!("wss://{}{}", token.host_port, token.path);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("{url}: {e}"))?;
        let header = |v: String| HeaderValue::from_str(&v).map_err(|e| e.to_string());
        let mut hostname = settings.hostname.clone();
        if settings.instance > 0 {
            hostname.push_str(&format!("-inst-{}", settings.instance));
        }
        let headers = request.headers_mut();
        headers.insert(
            "X-Session-Token",
            header(token.session_hash(settings.instance))?,
        );
        headers.insert("X-Hostname", header(format!("{hostname}-EV-server"))?);
        headers.insert(
            "X-EdgeView-Version",
            header(crate::EDGEVIEW_VERSION.to_string())?,
        );
        let (ws, _) = tokio_tungstenite::client_async(request, tls)
            .await
            .map_err(|e| format!("websocket with {url} failed: {e}"))?;
        Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| {
            format!(
                "no answer from {} within {CONNECT_TIMEOUT:?}",
                token.host_port
            )
        })?
}

/// Serves commands until the connection ends; returns why it ended.
async fn serve(
    mut ws: Ws,
    settings: &SessionSettings,
    events: &mpsc::Sender<SessionEvent>,
) -> String {
    let token = &settings.token;
    let key = token.claims.key.as_str();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = keepalive.tick() => {
                if let Err(e) = ws.send(Message::Ping(b"keepalive".to_vec().into())).await {
                    return format!("keepalive failed: {e}");
                }
                continue;
            }
        };
        let (data, is_text) = match frame {
            None => return "the dispatcher closed the connection".into(),
            Some(Err(e)) => return format!("read failed: {e}"),
            Some(Ok(Message::Text(text))) => (text.as_bytes().to_vec(), true),
            Some(Ok(Message::Binary(bytes))) => (bytes.to_vec(), false),
            Some(Ok(Message::Close(_))) => return "the dispatcher closed the connection".into(),
            Some(Ok(_)) => continue,
        };
        let signer = (is_text && token.auth == AuthType::ControllerCert).then_some(&token.signer);
        let payload = match envelope::open(key, &data, signer) {
            Ok(payload) => payload,
            Err(Refusal::NotJson) => {
                tracing::debug!(
                    instance = settings.instance,
                    "dispatcher: {}",
                    String::from_utf8_lossy(&data)
                );
                continue;
            }
            Err(refusal) => {
                tracing::warn!(
                    instance = settings.instance,
                    "edgeview command refused: {refusal}"
                );
                if is_text {
                    let text = match refusal {
                        Refusal::BadHmac => "authentication for command failed to verify\n".to_string(),
                        Refusal::Unsigned => "Edgeview requires client authentication signing by Private Ceritificate, +++Verify failed+++".to_string(),
                        other => format!("Edgeview client signed message not valid.\n{other}\n+++Verify failed+++"),
                    };
                    if let Err(e) = reply(&mut ws, key, &text).await {
                        return e;
                    }
                }
                continue;
            }
        };
        if !is_text {
            // Binary frames carry file copies and TCP data, neither of which Cairn offers.
            continue;
        }
        let text = String::from_utf8_lossy(&payload);
        if text.contains(NO_DEVICE) || text.contains(CLOSE_MESSAGE) {
            continue;
        }
        let cmd: CmdOpt = match serde_json::from_slice(&payload) {
            Ok(cmd) => cmd,
            Err(e) => {
                tracing::warn!(
                    instance = settings.instance,
                    "edgeview command is not EVE's cmdOpt JSON: {e}"
                );
                continue;
            }
        };
        let user = if cmd.userinfo.is_empty() {
            String::new()
        } else {
            format!(", ({})", cmd.userinfo)
        };
        let inst = if settings.instance > 0 {
            format!("-inst-{}", settings.instance)
        } else {
            String::new()
        };
        // EVE logs every command so (its obj_type makes the controller raise an event).
        tracing::info!(
            obj_type = "newlog-gen-event",
            obj_name = "edgeview-cmd",
            "recv[ep{inst}:{}{user}] cmd: {}",
            cmd.client_ep_addr,
            cmd.describe()
        );
        let answer = match query::check_policy(&cmd, settings.dev_allowed) {
            Err(why) => format!("cmd policy check failed: {why}"),
            Ok(()) => {
                let (tx, rx) = oneshot::channel();
                let event = SessionEvent::Command {
                    instance: settings.instance,
                    cmd: Box::new(cmd),
                    reply: tx,
                };
                if events.send(event).await.is_err() {
                    return "the agent is stopping".into();
                }
                rx.await.unwrap_or_default()
            }
        };
        if let Err(e) = reply(&mut ws, key, &answer).await {
            return e;
        }
    }
}

/// The reply in envelopes of at most [`query::CHUNK`] bytes, then `+++Done+++`.
async fn reply(ws: &mut Ws, key: &str, text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    for chunk in bytes.chunks(query::CHUNK) {
        ws.send(Message::text(envelope::seal(key, chunk)))
            .await
            .map_err(|e| format!("write failed: {e}"))?;
    }
    ws.send(Message::text(envelope::seal(key, CLOSE_MESSAGE.as_bytes())))
        .await
        .map_err(|e| format!("write failed: {e}"))
}

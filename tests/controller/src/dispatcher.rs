//! An EdgeView dispatcher for tests, written from EVE's example
//! (`pkg/edgeview/dispatcher/wss-server.go`): on loopback TLS with a CA made at start, it pairs
//! two websocket peers by their `X-Session-Token`, says "no device online" to a lone peer and
//! "YourEndPointIPAddr:…" to each, then relays every frame to the other peer. And a client that
//! sends commands as EVE's edge-view client does: `cmdOpt` JSON in an HMAC envelope (Go's
//! encoding: `message` base64, `sha256Hash` an array of 32 numbers), reading the reply to
//! `+++Done+++` and checking each reply's HMAC. Built from EVE's definitions, not with the
//! edgeview agent's code.

// Test support: a failed unwrap is a failed test, with its place in the panic.
#![allow(clippy::unwrap_used)]
// tungstenite's handshake callback returns its own (large) error response type.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Relay {
    /// Per session token: the peers (connection id, hostname, sender).
    peers: HashMap<String, Vec<(u64, String, mpsc::UnboundedSender<Message>)>>,
    /// Every device connection: (token, hostname, version header).
    devices: Vec<(String, String, String)>,
    next_id: u64,
}

pub struct Dispatcher {
    pub addr: std::net::SocketAddr,
    /// The CA that issued the dispatcher's certificate (for `127.0.0.1`).
    pub ca_pem: String,
    relay: Arc<Mutex<Relay>>,
}

impl Dispatcher {
    pub async fn start() -> Dispatcher {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Arc::new(Mutex::new(Relay::default()));
        let shared = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let (acceptor, relay) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_peer(tls, peer.to_string(), relay).await;
                    }
                });
            }
        });
        Dispatcher {
            addr,
            ca_pem: ca_cert.pem(),
            relay,
        }
    }

    /// Every device connection so far: (session token, X-Hostname, X-EdgeView-Version).
    pub fn devices(&self) -> Vec<(String, String, String)> {
        self.relay.lock().unwrap().devices.clone()
    }

    /// The peers connected now under `token`.
    pub fn peers(&self, token: &str) -> usize {
        self.relay
            .lock()
            .unwrap()
            .peers
            .get(token)
            .map_or(0, Vec::len)
    }
}

async fn serve_peer(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    remote: String,
    relay: Arc<Mutex<Relay>>,
) {
    let headers = Arc::new(Mutex::new((String::new(), String::new(), String::new())));
    let seen = headers.clone();
    let callback = move |request: &Request, response: Response| {
        let get = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        *seen.lock().unwrap() = (
            get("X-Session-Token"),
            get("X-Hostname"),
            get("X-EdgeView-Version"),
        );
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
        return;
    };
    let (token, hostname, version) = headers.lock().unwrap().clone();
    let (mut sink, mut stream) = ws.split();
    if token.is_empty() {
        let _ = sink.send(Message::text("token is required")).await;
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let (id, alone) = {
        let mut relay = relay.lock().unwrap();
        relay.next_id += 1;
        let id = relay.next_id;
        if hostname.ends_with("-EV-server") {
            relay
                .devices
                .push((token.clone(), hostname.clone(), version));
        }
        let peers = relay.peers.entry(token.clone()).or_default();
        // EVE's rule: a third peer is refused unless it replaces one of the same hostname.
        peers.retain(|(_, h, _)| *h != hostname);
        peers.push((id, hostname.clone(), tx));
        (id, peers.len() < 2)
    };
    if alone {
        let _ = sink
            .send(Message::text("no device online\n+++Done+++"))
            .await;
    }
    let _ = sink
        .send(Message::text(format!("YourEndPointIPAddr:{remote}")))
        .await;
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        if !(message.is_text() || message.is_binary()) {
            continue;
        }
        let other = relay.lock().unwrap().peers.get(&token).and_then(|p| {
            p.iter()
                .find(|(i, _, _)| *i != id)
                .map(|(_, _, tx)| tx.clone())
        });
        if let Some(other) = other {
            let _ = other.send(message);
        }
    }
    writer.abort();
    if let Some(peers) = relay.lock().unwrap().peers.get_mut(&token) {
        peers.retain(|(i, _, _)| *i != id);
    }
}

pub fn hmac(key: &str, message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Go's encoding of `envelopeMsg` (`message` base64, `sha256Hash` an array of 32 numbers).
pub fn envelope(key: &str, message: &[u8]) -> String {
    serde_json::json!({
        "message": STANDARD.encode(message),
        "sha256Hash": hmac(key, message),
        "Signature": null,
    })
    .to_string()
}

pub fn session_hash(jwt: &str, instance: u8) -> String {
    let text = if instance > 0 {
        format!("{jwt}.{instance}")
    } else {
        jwt.to_string()
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(text.as_bytes()))
}

/// Sends one command and returns the reply text up to `+++Done+++`; every reply envelope's
/// HMAC is checked.
pub async fn query(
    dispatcher: &Dispatcher,
    hash: &str,
    key: &str,
    cmd: serde_json::Value,
) -> String {
    query_signed(dispatcher, hash, key, key, cmd).await
}

/// `send_key` signs the command; the device's replies always carry the token's key.
pub async fn query_signed(
    dispatcher: &Dispatcher,
    hash: &str,
    send_key: &str,
    key: &str,
    cmd: serde_json::Value,
) -> String {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&dispatcher.ca_pem)));
    let tcp = TcpStream::connect(dispatcher.addr).await.unwrap();
    let tls = connector
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!("wss://{}/edge-view", dispatcher.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("X-Session-Token", hash.parse().unwrap());
    request
        .headers_mut()
        .insert("X-Hostname", "laptop".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    // EVE's client reads the dispatcher's endpoint note first.
    let first = ws.next().await.unwrap().unwrap();
    assert!(
        first.to_text().unwrap().starts_with("YourEndPointIPAddr:"),
        "the device is paired: {first:?}"
    );
    ws.send(Message::text(envelope(
        send_key,
        cmd.to_string().as_bytes(),
    )))
    .await
    .unwrap();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the reply ends with +++Done+++ in time")
            .unwrap()
            .unwrap();
        let Ok(value) = serde_json::from_str::<serde_json::Value>(frame.to_text().unwrap()) else {
            continue;
        };
        let message = STANDARD.decode(value["message"].as_str().unwrap()).unwrap();
        let hash: Vec<u8> = value["sha256Hash"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(hash, hmac(key, &message), "the reply's HMAC verifies");
        let message = String::from_utf8(message).unwrap();
        if message.contains("+++Done+++") {
            return text;
        }
        text.push_str(&message);
    }
}

pub fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

pub fn system(cmd: &str) -> serde_json::Value {
    serde_json::json!({"version": "0.8.8", "clientEPAddr": "127.0.0.1:40000", "network": "",
        "system": cmd, "pubsub": "", "logopt": "", "timerange": "", "isJSON": false,
        "extraline": 0, "logtype": "", "userinfo": "tech@example"})
}

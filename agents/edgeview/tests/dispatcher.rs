//! The edgeview agent (the real binary) against a dispatcher on loopback TLS, written here from
//! EVE's example (`pkg/edgeview/dispatcher/wss-server.go`: pairs two websocket peers by their
//! `X-Session-Token`, says "no device online" to a lone peer and "YourEndPointIPAddr:…" to
//! each, then relays every frame to the other peer), and a client that sends commands as EVE's
//! client does (`cmdOpt` JSON in an HMAC envelope). The envelope and JWT are built here by hand
//! from EVE's definitions, not with the agent's own code.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cairn_pubsub::{Bus, PublishOptions};
use cairn_types::{AppInstanceStatus, EdgeviewConfig, EdgeviewStatus, EvPolicy, UUIDandVersion};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const DEVICE: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
const NONCE: &str = "session-nonce-1";
const WAIT: Duration = Duration::from_secs(30);

// ---- the dispatcher ----

#[derive(Default)]
struct Relay {
    /// Per session token: the peers (connection id, hostname, sender).
    peers: HashMap<String, Vec<(u64, String, mpsc::UnboundedSender<Message>)>>,
    /// Every device connection: (token, hostname, version header).
    devices: Vec<(String, String, String)>,
    next_id: u64,
}

struct Dispatcher {
    addr: std::net::SocketAddr,
    ca_pem: String,
    relay: Arc<Mutex<Relay>>,
}

impl Dispatcher {
    async fn start() -> Dispatcher {
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

    fn devices(&self) -> Vec<(String, String, String)> {
        self.relay.lock().unwrap().devices.clone()
    }

    fn peers(&self, token: &str) -> usize {
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
        let other = relay
            .lock()
            .unwrap()
            .peers
            .get(&token)
            .and_then(|p| p.iter().find(|(i, _, _)| *i != id).map(|(_, _, tx)| tx.clone()));
        if let Some(other) = other {
            let _ = other.send(message);
        }
    }
    writer.abort();
    if let Some(peers) = relay.lock().unwrap().peers.get_mut(&token) {
        peers.retain(|(i, _, _)| *i != id);
    }
}

// ---- the client, as EVE's edge-view client talks ----

fn hmac(key: &str, message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Go's encoding of `envelopeMsg` (`message` base64, `sha256Hash` an array of 32 numbers).
fn envelope(key: &str, message: &[u8]) -> String {
    serde_json::json!({
        "message": STANDARD.encode(message),
        "sha256Hash": hmac(key, message),
        "Signature": null,
    })
    .to_string()
}

fn session_hash(jwt: &str, instance: u8) -> String {
    let text = if instance > 0 {
        format!("{jwt}.{instance}")
    } else {
        jwt.to_string()
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(text.as_bytes()))
}

/// Sends one command and returns the reply text up to `+++Done+++`; every reply envelope's
/// HMAC is checked.
async fn query(dispatcher: &Dispatcher, hash: &str, key: &str, cmd: serde_json::Value) -> String {
    query_signed(dispatcher, hash, key, key, cmd).await
}

/// `send_key` signs the command; the device's replies always carry the token's key.
async fn query_signed(
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
    ws.send(Message::text(envelope(send_key, cmd.to_string().as_bytes())))
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
        let message = STANDARD
            .decode(value["message"].as_str().unwrap())
            .unwrap();
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

fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
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

fn system(cmd: &str) -> serde_json::Value {
    serde_json::json!({"version": "0.8.8", "clientEPAddr": "127.0.0.1:40000", "network": "",
        "system": cmd, "pubsub": "", "logopt": "", "timerange": "", "isJSON": false,
        "extraline": 0, "logtype": "", "userinfo": "tech@example"})
}

// ---- the controller's side: a signed token ----

fn controller_key() -> (SigningKey, String) {
    use p256::pkcs8::EncodePublicKey;
    let key = SigningKey::from_slice(&[42; 32]).unwrap();
    let pem = key
        .verifying_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    (key, pem)
}

fn jwt(key: &SigningKey, dispatcher: &Dispatcher, sub: &str, exp: u64, num: u8) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"dep": format!("{}/edge-view", dispatcher.addr), "sub": sub,
            "exp": exp, "key": NONCE, "num": num, "enc": false, "aut": 0})
        .to_string(),
    );
    let text = format!("{header}.{claims}");
    let signature: Signature = key.sign(text.as_bytes());
    format!("{text}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the device ----

struct Device {
    _dir: tempfile::TempDir,
    run: PathBuf,
    persist: PathBuf,
    agent: Option<Child>,
}

impl Device {
    fn new(dispatcher: &Dispatcher) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let (run, persist) = (dir.path().join("run"), dir.path().join("persist"));
        // The device's root, as set-up stores it for the controller link, issued the
        // dispatcher's certificate.
        let config = persist.join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::create_dir_all(run.join("logs")).unwrap();
        std::fs::write(config.join("server"), "127.0.0.1:1").unwrap();
        std::fs::write(config.join("root-certificate.pem"), &dispatcher.ca_pem).unwrap();
        Device {
            _dir: dir,
            run,
            persist,
            agent: None,
        }
    }

    fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, &self.run, &self.persist)
    }

    fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cairn-edgeview"))
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--persist-dir")
            .arg(&self.persist)
            .arg("--retry-min-ms")
            .arg("100")
            .arg("--retry-max-ms")
            .arg("500")
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(token: String, signer: &str) -> EdgeviewConfig {
    EdgeviewConfig {
        jw_token: token,
        dev_policy: EvPolicy { enabled: true },
        signing_cert_pem: signer.to_string(),
        device_uuid: DEVICE.to_string(),
        ..Default::default()
    }
}

async fn wait_status(
    status: &mut cairn_pubsub::Subscription<EdgeviewStatus>,
    what: &str,
    done: impl Fn(&EdgeviewStatus) -> bool,
) -> EdgeviewStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = status.values().next()
            && done(value)
        {
            return value.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the status stays {:?}",
            status.values().next()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), status.recv()).await;
    }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn app(name: &str) -> AppInstanceStatus {
    AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: "0f0e0d0c-0b0a-4908-8706-050403020100".parse().unwrap(),
            version: "1".into(),
        },
        display_name: name.into(),
        activated: true,
        ..Default::default()
    }
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_eve_commands_through_the_dispatcher_and_reconnects_after_a_kill() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let token = jwt(&key, &dispatcher, DEVICE, now() + 3600, 0);
    let hash = session_hash(&token, 0);
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    configs.publish(config(token, &signer)).await.unwrap();
    let apps = device
        .bus("app-manager")
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    apps.publish(app("web-frontend")).await.unwrap();
    let mut status = device
        .bus("reader")
        .subscribe::<EdgeviewStatus>("edgeview");
    device.start();

    wait_status(&mut status, "connected", |s| s.connected == 1).await;
    let devices = dispatcher.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].0, hash, "X-Session-Token is EVE's token hash");
    assert!(devices[0].1.ends_with("-EV-server"), "{:?}", devices[0]);
    assert_eq!(devices[0].2, "0.8.8");

    let reply = query(&dispatcher, &hash, NONCE, system("app")).await;
    assert!(reply.contains("=== System: <app> ==="), "{reply}");
    assert!(reply.contains("== app: web-frontend"), "{reply}");
    let reply = query(
        &dispatcher,
        &hash,
        NONCE,
        serde_json::json!({"version": "0.8.8", "pubsub": "zedmanager"}),
    )
    .await;
    assert!(reply.contains("\"DisplayName\": \"web-frontend\""), "{reply}");
    // Read-only: a TCP tunnel is refused by name.
    let reply = query(
        &dispatcher,
        &hash,
        NONCE,
        serde_json::json!({"version": "0.8.8", "network": "tcp/localhost:22"}),
    )
    .await;
    assert!(reply.starts_with("cmd policy check failed:"), "{reply}");
    assert!(reply.contains("read-only"), "{reply}");
    // A command under another key is refused.
    let reply = query_signed(&dispatcher, &hash, "not-the-nonce", NONCE, system("app")).await;
    assert!(
        reply.contains("authentication for command failed to verify"),
        "{reply}"
    );
    assert!(!reply.contains("web-frontend"), "{reply}");
    // Counted as EVE counts: device commands that ran (not the refused tunnel or command).
    let counted = wait_status(&mut status, "commands counted", |s| s.cmd_count_dev == 2).await;
    assert!(counted.started_on.is_some() && counted.expire_on > now());

    // Killed at any point, the agent comes back to the same config and pairs again.
    device.kill();
    wait_until("the dispatcher drops the dead device", || {
        dispatcher.peers(&hash) == 0
    })
    .await;
    device.start();
    wait_until("the restarted agent reconnects", || {
        dispatcher.devices().len() == 2 && dispatcher.peers(&hash) == 1
    })
    .await;
    let reply = query(&dispatcher, &hash, NONCE, system("app")).await;
    assert!(reply.contains("== app: web-frontend"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_instance_token_runs_one_session_per_instance() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let token = jwt(&key, &dispatcher, DEVICE, now() + 3600, 2);
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    configs.publish(config(token.clone(), &signer)).await.unwrap();
    let mut status = device
        .bus("reader")
        .subscribe::<EdgeviewStatus>("edgeview");
    device.start();
    wait_status(&mut status, "both instances up", |s| {
        s.connected == 2 && s.instances == 2
    })
    .await;
    let mut hostnames: Vec<String> = dispatcher.devices().into_iter().map(|d| d.1).collect();
    hostnames.sort();
    assert!(hostnames[0].ends_with("-inst-1-EV-server"), "{hostnames:?}");
    assert!(hostnames[1].ends_with("-inst-2-EV-server"), "{hostnames:?}");
    let reply = query(&dispatcher, &session_hash(&token, 2), NONCE, system("volume")).await;
    assert!(reply.contains("=== System: <volume> ==="), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_by_name_and_never_reach_the_dispatcher() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let (stranger, _) = {
        let k = SigningKey::from_slice(&[7; 32]).unwrap();
        (k, ())
    };
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    let mut status = device
        .bus("reader")
        .subscribe::<EdgeviewStatus>("edgeview");
    let cases = [
        (
            jwt(&key, &dispatcher, DEVICE, now() - 60, 0),
            "the edgeview token expired",
        ),
        (
            jwt(&stranger, &dispatcher, DEVICE, now() + 3600, 0),
            "signature does not verify",
        ),
        (
            jwt(&key, &dispatcher, "00000000-0000-4000-8000-000000000001", now() + 3600, 0),
            "is for device \"00000000-0000-4000-8000-000000000001\", not this device",
        ),
        (
            jwt(&key, &dispatcher, DEVICE, now() + 3600, 6),
            "asks for 6 instances; at most 5",
        ),
    ];
    configs
        .publish(config(cases[0].0.clone(), &signer))
        .await
        .unwrap();
    device.start();
    for (i, (token, fault)) in cases.iter().enumerate() {
        let mut cfg = config(token.clone(), &signer);
        cfg.gen_id = i as u32;
        configs.publish(cfg).await.unwrap();
        let refused = wait_status(&mut status, fault, |s| s.last_error.contains(fault)).await;
        assert_eq!(refused.connected, 0);
        assert_eq!(refused.expire_on, 0, "no token in force");
    }
    // The fault is the agent's log too (which the log-manager ships to the controller).
    assert!(dispatcher.devices().is_empty(), "no refused token was used");
    // A good token after the bad ones is taken.
    configs
        .publish(config(jwt(&key, &dispatcher, DEVICE, now() + 3600, 0), &signer))
        .await
        .unwrap();
    wait_status(&mut status, "connected", |s| {
        s.connected == 1 && s.last_error.is_empty()
    })
    .await;
}

//! A controller for tests: the EVE API v2 subset Cairn speaks, over real HTTPS, with a PKI made
//! at start (a root, the controller's TLS and signing certificates under it, and an onboarding
//! certificate for devices). A test sets a device's config by serial and reads what the device
//! reported; it can also make the controller misbehave ([`Fault`]) to test the device's side.
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path) -> anyhow::Result<()> {
//! use cairn_test_controller::TestController;
//! let controller = TestController::start().await?;
//! // Flags for cairn-config-agent (and `cairn up`): controller URL, root, onboarding, serial.
//! let args = controller.device_args(dir, "SN-1")?;
//! controller.set_config("SN-1", Default::default());
//! # Ok(()) }
//! ```

pub mod baseos;
pub mod datastore;
pub mod dispatcher;
pub mod logs;
pub mod registry;
pub mod token;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cairn_config_agent::auth::{self, Signer256};
use cairn_config_agent::controller::{CERTS, REGISTER, UUID};
use cairn_config_agent::proto::{
    AuthContainer, ConfigRequest, ConfigResponse, EdgeDevConfig, HashAlgorithm, InfoContent,
    UuidAndVersion, UuidResponse, ZCert, ZCertType, ZControllerCert, ZInfoApp, ZInfoContentTree,
    ZInfoDevice, ZInfoMsg, ZInfoVolume, ZMetricMsg, ZRegisterMsg,
};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use uuid::Uuid;

/// A way for the controller to misbehave, set with [`TestController::set_fault`].
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Every request is answered with this HTTP status and no body.
    Status(u16),
    /// Only reports (`info`) are answered with this status; config is served as usual.
    RefuseReports(u16),
    /// Every answer comes this much later.
    Delay(Duration),
    /// Every connection is closed after the request is read, with no answer.
    Close,
    /// Config answers carry a signature that does not verify.
    BadSignature,
    /// Config answers carry no signature at all.
    NoSignature,
    /// Config answers are not protobuf at all.
    Garbage,
    /// Config answers are signed by a certificate outside the device's root.
    ForeignSigner,
}

/// One device as the controller knows it.
#[derive(Debug, Clone, Default)]
pub struct Device {
    pub uuid: Uuid,
    /// The device certificate it registered (PEM); empty until it registers.
    pub cert_pem: Vec<u8>,
    pub config: Option<EdgeDevConfig>,
    pub config_hash: String,
    /// How many configs a test has set.
    pub configs_set: u32,
    /// Config requests received, and how many got the config (not a 304).
    pub config_requests: u32,
    pub configs_sent: u32,
    /// Every info message, in arrival order.
    pub infos: Vec<ZInfoMsg>,
    /// Every metrics report, in arrival order, with the bytes it took on the wire (the signed
    /// `AuthContainer` body, the `ZMetricMsg` inside).
    pub metrics: Vec<Metrics>,
    /// Every log file posted to EVE's log endpoints, in arrival order.
    pub logs: Vec<logs::LogUpload>,
}

/// One metrics report as it arrived.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub report: ZMetricMsg,
    pub body_bytes: usize,
    pub payload_bytes: usize,
}

impl Device {
    /// The latest report of each app.
    pub fn apps(&self) -> BTreeMap<String, ZInfoApp> {
        let mut apps = BTreeMap::new();
        for info in &self.infos {
            if let Some(InfoContent::Ainfo(app)) = &info.info_content {
                apps.insert(app.app_id.clone(), app.clone());
            }
        }
        apps
    }

    /// The latest report of each volume.
    pub fn volumes(&self) -> BTreeMap<String, ZInfoVolume> {
        let mut volumes = BTreeMap::new();
        for info in &self.infos {
            if let Some(InfoContent::Vinfo(volume)) = &info.info_content {
                volumes.insert(volume.uuid.clone(), volume.clone());
            }
        }
        volumes
    }

    /// The latest report of each content tree.
    pub fn content_trees(&self) -> BTreeMap<String, ZInfoContentTree> {
        let mut trees = BTreeMap::new();
        for info in &self.infos {
            if let Some(InfoContent::Cinfo(tree)) = &info.info_content {
                trees.insert(tree.uuid.clone(), tree.clone());
            }
        }
        trees
    }

    /// The latest EdgeView report, if any came.
    pub fn edgeview_info(&self) -> Option<cairn_config_agent::proto::ZInfoEdgeview> {
        self.infos
            .iter()
            .rev()
            .find_map(|info| match &info.info_content {
                Some(InfoContent::Evinfo(ev)) => Some(*ev),
                _ => None,
            })
    }

    /// The latest device report, if any came.
    pub fn device_info(&self) -> Option<ZInfoDevice> {
        self.infos
            .iter()
            .rev()
            .find_map(|info| match &info.info_content {
                Some(InfoContent::Dinfo(device)) => Some(device.clone()),
                _ => None,
            })
    }
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Device>,
    fault: Option<Fault>,
    /// `(method path, status)` of every request, for tests that check the sequence.
    requests: Vec<(String, u16)>,
}

/// Certificates and keys made at start.
struct Pki {
    root_pem: String,
    signer: Signer256,
    /// Signs when [`Fault::ForeignSigner`] is set: a valid key, an untrusted certificate.
    foreign: Signer256,
    tls_cert: CertificateDer<'static>,
    tls_key: PrivateKeyDer<'static>,
    onboard_cert: String,
    onboard_key: String,
}

pub struct TestController {
    addr: SocketAddr,
    pki: Arc<Pki>,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestController {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What the TLS side presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// A certificate issued by the controller's root, for `localhost` and `127.0.0.1`.
    Trusted,
    /// A certificate from another root: a device pinned to the real root must refuse it.
    Impostor,
}

impl TestController {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Tls::Trusted).await
    }

    pub async fn start_with(tls: Tls) -> anyhow::Result<Self> {
        let pki = Arc::new(Pki::new(tls)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![pki.tls_cert.clone()], pki.tls_key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let server = tokio::spawn(serve(listener, acceptor, pki.clone(), state.clone()));
        Ok(Self {
            addr,
            pki,
            state,
            server,
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn root_pem(&self) -> &str {
        &self.pki.root_pem
    }

    /// Writes the root certificate and the onboarding certificate and key into `dir` and
    /// returns the config-agent flags that set a device up for this controller (`cairn up`
    /// takes the same).
    pub fn device_args(&self, dir: &Path, serial: &str) -> anyhow::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let root = write("controller-root.pem", &self.pki.root_pem)?;
        let cert = write("onboard.cert.pem", &self.pki.onboard_cert)?;
        let key = write("onboard.key.pem", &self.pki.onboard_key)?;
        Ok([
            ("--controller", self.url()),
            ("--root-cert", root.display().to_string()),
            ("--onboard-cert", cert.display().to_string()),
            ("--onboard-key", key.display().to_string()),
            ("--serial", serial.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect())
    }

    /// An EdgeView token as EVE's controller issues it: a JWT with EVE's claims (`dep`, `sub`
    /// the device's UUID, `exp`, `key`, `num`), signed ES256 by the controller's signing key.
    pub fn edgeview_token(&self, serial: &str, dispatcher: &str, exp: u64, key: &str) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "dep": dispatcher, "sub": self.device_uuid(serial).to_string(), "exp": exp,
            "key": key, "num": 1, "enc": false, "aut": 0,
        });
        let text = format!("{header}.{}", b64.encode(claims.to_string()));
        // ES256 is ECDSA P-256 over SHA-256 with r‖s: the same signature as EVE's object signing.
        let signature = self.pki.signer.seal(text.clone().into_bytes(), false);
        format!("{text}.{}", b64.encode(signature.signature_hash))
    }

    /// The UUID this controller gives the device with `serial` (made on first use, like a
    /// device pre-registered by its owner).
    pub fn device_uuid(&self, serial: &str) -> Uuid {
        self.lock().device(serial).uuid
    }

    /// Sets the device's config. An empty `id` gets the device's UUID and a new version; the
    /// hash is the sha256 of the encoded config.
    pub fn set_config(&self, serial: &str, mut config: EdgeDevConfig) -> String {
        let mut state = self.lock();
        let device = state.device(serial);
        device.configs_set += 1;
        if config.id.is_none() {
            config.id = Some(UuidAndVersion {
                uuid: device.uuid.to_string(),
                version: device.configs_set.to_string(),
            });
        }
        let hash = hex(&Sha256::digest(config.encode_to_vec()));
        device.config = Some(config);
        device.config_hash = hash.clone();
        hash
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    pub fn device(&self, serial: &str) -> Option<Device> {
        self.lock().devices.get(serial).cloned()
    }

    /// `(method path, status)` of every request so far.
    pub fn requests(&self) -> Vec<(String, u16)> {
        self.lock().requests.clone()
    }

    /// Waits until `done` holds for the device with `serial` (checked every 20 ms).
    pub async fn wait_for(
        &self,
        serial: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Device) -> bool,
    ) -> anyhow::Result<Device> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(device) = self.device(serial)
                && done(&device)
            {
                return Ok(device);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "controller: {what} did not happen within {timeout:?}; device {serial}: {:?}",
                    self.device(serial)
                        .map(|d| (d.config_requests, d.infos.len()))
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn device(&mut self, serial: &str) -> &mut Device {
        self.devices
            .entry(serial.to_string())
            .or_insert_with(|| Device {
                uuid: Uuid::new_v4(),
                ..Default::default()
            })
    }

    fn by_cert_hash(&mut self, hash: &[u8]) -> Option<&mut Device> {
        self.devices
            .values_mut()
            .find(|d| !d.cert_pem.is_empty() && Sha256::digest(&d.cert_pem).as_slice() == hash)
    }
}

impl Pki {
    fn new(tls: Tls) -> anyhow::Result<Self> {
        let (root, root_pem) = ca("cairn test controller root")?;
        let (impostor, _) = ca("impostor root")?;
        let (stranger, _) = ca("stranger root")?;
        let (signing_cert, signing_key) = leaf(&root, "controller signing", vec![])?;
        let (foreign_cert, foreign_key) = leaf(&stranger, "controller signing", vec![])?;
        let tls_issuer = match tls {
            Tls::Trusted => &root,
            Tls::Impostor => &impostor,
        };
        let (tls_cert, tls_key) = leaf(
            tls_issuer,
            "controller",
            vec!["localhost".into(), "127.0.0.1".into()],
        )?;
        let (onboard_cert, onboard_key) = leaf(&root, "onboarding", vec![])?;
        let der = |pem: &str| -> anyhow::Result<CertificateDer<'static>> {
            use rustls_pki_types::pem::PemObject;
            Ok(CertificateDer::from_pem_slice(pem.as_bytes())?)
        };
        let key_der = |pem: &str| -> anyhow::Result<PrivateKeyDer<'static>> {
            let key = rcgen::KeyPair::from_pem(pem)?;
            Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
        };
        Ok(Self {
            root_pem,
            signer: Signer256::from_pem(signing_cert.as_bytes(), &signing_key, "signing")?,
            foreign: Signer256::from_pem(foreign_cert.as_bytes(), &foreign_key, "foreign")?,
            tls_cert: der(&tls_cert)?,
            tls_key: key_der(&tls_key)?,
            onboard_cert,
            onboard_key,
        })
    }
}

type Issuer = rcgen::Issuer<'static, rcgen::KeyPair>;

fn ca(name: &str) -> anyhow::Result<(Issuer, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key)?;
    Ok((Issuer::new(params, key), cert.pem()))
}

fn leaf(issuer: &Issuer, name: &str, sans: Vec<String>) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pki: Arc<Pki>,
    state: Arc<Mutex<State>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let pki = pki.clone();
        let state = state.clone();
        tokio::spawn(async move {
            // A device that refuses our certificate ends the handshake; nothing to do then.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |request| {
                let pki = pki.clone();
                let state = state.clone();
                async move { handle(request, &pki, &state).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

type Answer = Response<Full<Bytes>>;

/// Handles one request; an `Err` makes hyper drop the connection without an answer.
async fn handle(
    request: Request<hyper::body::Incoming>,
    pki: &Pki,
    state: &Mutex<State>,
) -> Result<Answer, std::io::Error> {
    let line = format!("{} {}", request.method(), request.uri().path());
    let path = request.uri().path().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let fault = lock(state).fault.clone();
    match &fault {
        Some(Fault::Close) => {
            lock(state).requests.push((line, 0));
            return Err(std::io::Error::other("closing on purpose"));
        }
        Some(Fault::Delay(by)) => tokio::time::sleep(*by).await,
        _ => {}
    }
    let answer = match fault {
        Some(Fault::Status(status)) => empty(status),
        _ => route(&path, &body, pki, state, fault.as_ref()),
    };
    lock(state).requests.push((line, answer.status().as_u16()));
    Ok(answer)
}

fn route(
    path: &str,
    body: &[u8],
    pki: &Pki,
    state: &Mutex<State>,
    fault: Option<&Fault>,
) -> Answer {
    match path {
        CERTS => certs(pki, fault),
        REGISTER => register(body, pki, state),
        UUID => with_device(body, state, |device| {
            let answer = UuidResponse {
                uuid: device.uuid.to_string(),
                manufacturer: "cairn".into(),
                product_name: "test device".into(),
            };
            signed(pki, &answer, None)
        }),
        _ => match path
            .strip_prefix("/api/v2/edgedevice/id/")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((id, "config")) => with_device(body, state, |device| {
                if id != device.uuid.to_string() {
                    return empty(403);
                }
                config(device, body, pki, fault)
            }),
            Some((id, "metrics")) => with_device(body, state, |device| {
                if id != device.uuid.to_string() {
                    return empty(403);
                }
                if let Some(Fault::RefuseReports(status)) = fault {
                    return empty(*status);
                }
                let Some(container) = AuthContainer::decode(body).ok() else {
                    return empty(422);
                };
                let payload = container.protected_payload.map(|p| p.payload);
                match payload
                    .as_deref()
                    .and_then(|p| ZMetricMsg::decode(p).ok().map(|m| (m, p.len())))
                {
                    Some((report, payload_bytes)) => {
                        device.metrics.push(Metrics {
                            report,
                            body_bytes: body.len(),
                            payload_bytes,
                        });
                        empty(201)
                    }
                    None => empty(422),
                }
            }),
            Some((id, rest)) if rest == "newlogs" || rest.ends_with("/newlogs") => {
                // Unsigned, as EVE's loguploader sends them: the URL names the device.
                let app = match rest.strip_suffix("/newlogs") {
                    None => None,
                    Some(app) => match app.strip_prefix("apps/instanceid/").map(str::parse) {
                        Some(Ok(app)) => Some(app),
                        _ => return empty(404),
                    },
                };
                let mut state = lock(state);
                let Some(device) = state
                    .devices
                    .values_mut()
                    .find(|d| d.uuid.to_string() == id)
                else {
                    return empty(404);
                };
                device.logs.push(logs::LogUpload {
                    app,
                    gzip: body.to_vec(),
                });
                empty(201)
            }
            Some((id, "info")) => with_device(body, state, |device| {
                if id != device.uuid.to_string() {
                    return empty(403);
                }
                if let Some(Fault::RefuseReports(status)) = fault {
                    return empty(*status);
                }
                match payload::<ZInfoMsg>(body) {
                    Some(info) => {
                        device.infos.push(info);
                        empty(201)
                    }
                    None => empty(422),
                }
            }),
            _ => empty(404),
        },
    }
}

fn certs(pki: &Pki, fault: Option<&Fault>) -> Answer {
    let signer = match fault {
        Some(Fault::ForeignSigner) => &pki.foreign,
        _ => &pki.signer,
    };
    let list = ZControllerCert {
        certs: vec![ZCert {
            hash_algo: HashAlgorithm::Sha25632bytes as i32,
            cert_hash: Sha256::digest(signer.cert_pem()).to_vec(),
            r#type: ZCertType::CertTypeControllerSigning as i32,
            cert: signer.cert_pem().to_vec(),
            ..Default::default()
        }],
    };
    let sealed = signer.seal(list.encode_to_vec(), false);
    proto_answer(200, sealed.encode_to_vec())
}

fn register(body: &[u8], pki: &Pki, state: &Mutex<State>) -> Answer {
    use base64::Engine;
    let Ok(container) = AuthContainer::decode(body) else {
        return empty(422);
    };
    let Ok(onboard_pem) = base64::engine::general_purpose::STANDARD.decode(&container.sender_cert)
    else {
        return empty(401);
    };
    if auth::check_issued_by(&onboard_pem, pki.root_pem.as_bytes(), "onboarding").is_err() {
        return empty(401);
    }
    let Ok(payload) = auth::open(&container, &onboard_pem) else {
        return empty(401);
    };
    let Ok(message) = ZRegisterMsg::decode(payload.as_slice()) else {
        return empty(422);
    };
    let mut state = lock(state);
    let device = state.device(&message.serial);
    if device.cert_pem.is_empty() {
        device.cert_pem = message.pem_cert;
        empty(201)
    } else if device.cert_pem == message.pem_cert {
        empty(200)
    } else {
        empty(409)
    }
}

/// Runs `then` for the registered device that signed `body`; 401 if none did.
fn with_device(
    body: &[u8],
    state: &Mutex<State>,
    then: impl FnOnce(&mut Device) -> Answer,
) -> Answer {
    let Ok(container) = AuthContainer::decode(body) else {
        return empty(422);
    };
    let mut state = lock(state);
    let Some(device) = state.by_cert_hash(&container.sender_cert_hash) else {
        return empty(401);
    };
    if auth::open(&container, &device.cert_pem).is_err() {
        return empty(401);
    }
    then(device)
}

fn config(device: &mut Device, body: &[u8], pki: &Pki, fault: Option<&Fault>) -> Answer {
    device.config_requests += 1;
    let Some(request) = payload::<ConfigRequest>(body) else {
        return empty(422);
    };
    let Some(config) = device.config.clone() else {
        return empty(404);
    };
    if request.config_hash == device.config_hash {
        return empty(304);
    }
    device.configs_sent += 1;
    let answer = ConfigResponse {
        config: Some(config),
        config_hash: device.config_hash.clone(),
    };
    match fault {
        Some(Fault::Garbage) => proto_answer(200, b"\xff\xffnot a protobuf message".to_vec()),
        Some(Fault::ForeignSigner) => signed(pki, &answer, Some(&pki.foreign)),
        Some(Fault::NoSignature) => {
            let mut sealed = pki.signer.seal(answer.encode_to_vec(), false);
            sealed.signature_hash.clear();
            proto_answer(200, sealed.encode_to_vec())
        }
        Some(Fault::BadSignature) => {
            let mut sealed = pki.signer.seal(answer.encode_to_vec(), false);
            sealed.signature_hash[10] ^= 0x40;
            proto_answer(200, sealed.encode_to_vec())
        }
        _ => signed(pki, &answer, None),
    }
}

/// The payload of a device's container (its signature was checked by [`with_device`]).
fn payload<M: Message + Default>(body: &[u8]) -> Option<M> {
    let container = AuthContainer::decode(body).ok()?;
    M::decode(container.protected_payload?.payload.as_slice()).ok()
}

fn signed(pki: &Pki, message: &impl Message, signer: Option<&Signer256>) -> Answer {
    let sealed = signer
        .unwrap_or(&pki.signer)
        .seal(message.encode_to_vec(), false);
    proto_answer(200, sealed.encode_to_vec())
}

fn proto_answer(status: u16, body: Vec<u8>) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    answer.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(cairn_config_agent::https::PROTO_MIME),
    );
    answer
}

fn empty(status: u16) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    answer
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! EVE's API v2 exchanges with the controller (eve-api APIv2.md, OBJECT-SIGNING.md):
//! `certs` → `register` → `uuid` → `config` → `info`. Every body is an `AuthContainer`; the
//! device signs with its onboarding key (register) or device key (everything else), and every
//! controller answer is opened against the controller's signing certificate, which itself must
//! chain to the device's root certificate. Nothing here touches the bus: [`Link`] only talks
//! and checks, the caller decides what to apply.

use prost::Message;
use uuid::Uuid;

use crate::auth::{self, AuthError};
use crate::https::{Https, HttpsError};
use crate::identity::Identity;
use crate::proto::{
    AuthContainer, ConfigRequest, ConfigResponse, EdgeDevConfig, UuidRequest, UuidResponse,
    ZCertType, ZControllerCert, ZInfoMsg, ZMetricMsg, ZRegisterMsg,
};

pub const CERTS: &str = "/api/v2/edgedevice/certs";
pub const REGISTER: &str = "/api/v2/edgedevice/register";
pub const UUID: &str = "/api/v2/edgedevice/uuid";

pub fn config_path(device: Uuid) -> String {
    format!("/api/v2/edgedevice/id/{device}/config")
}

pub fn info_path(device: Uuid) -> String {
    format!("/api/v2/edgedevice/id/{device}/info")
}

/// EVE's zedagent posts `ZMetricMsg` here (`URLPathString(server, devUUID, "metrics")`).
pub fn metrics_path(device: Uuid) -> String {
    format!("/api/v2/edgedevice/id/{device}/metrics")
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Https(#[from] HttpsError),
    #[error("{what}: the controller answered HTTP {status}{}", detail(.body))]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error(
        "register: the controller already holds another device certificate for this onboarding \
         certificate and serial (HTTP 409)"
    )]
    Conflict,
    #[error("{what}: the controller's answer is not a valid {message}: {reason}")]
    Malformed {
        what: &'static str,
        message: &'static str,
        reason: String,
    },
    #[error("{what}: the controller's answer is refused: {source}")]
    Signature {
        what: &'static str,
        #[source]
        source: AuthError,
    },
    #[error("certs: {0}")]
    Certs(String),
    #[error("config: it is for device {found}, this device is {expected}")]
    OtherDevice { expected: Uuid, found: String },
    #[error("config: {0}")]
    Incomplete(String),
}

fn detail(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(" ({body})")
    }
}

impl LinkError {
    /// Whether the controller could be reached at all (for `DeviceStatus.controller_reachable`).
    pub fn reached_controller(&self) -> bool {
        !matches!(self, Self::Https(_))
    }
}

/// What a config poll brought.
#[derive(Debug)]
pub enum Polled {
    /// 304, or the same hash without a config.
    Unchanged,
    Config {
        hash: String,
        /// Boxed: EVE's whole EdgeDevConfig is large next to `Unchanged`.
        config: Box<EdgeDevConfig>,
    },
}

/// One controller, one device.
pub struct Link {
    https: Https,
    identity: Identity,
    /// The controller's signing certificate (PEM), once fetched and checked.
    signing: Option<Vec<u8>>,
    device: Option<Uuid>,
    registered: bool,
}

impl Link {
    pub fn new(https: Https, identity: Identity) -> Self {
        let registered = identity.dir.join(REGISTERED_MARK).exists();
        Self {
            https,
            identity,
            signing: None,
            device: None,
            registered,
        }
    }

    pub fn server(&self) -> &str {
        self.https.server()
    }

    /// The UUID the controller gave this device, once it has.
    pub fn device(&self) -> Option<Uuid> {
        self.device
    }

    /// The controller's signing certificate (PEM), once fetched and checked.
    pub fn signing_cert(&self) -> Option<&[u8]> {
        self.signing.as_deref()
    }

    /// Brings the link up as far as it is not yet: signing certificate, registration, UUID.
    pub async fn connect(&mut self) -> Result<Uuid, LinkError> {
        if self.signing.is_none() {
            self.signing = Some(self.fetch_signing_cert().await?);
        }
        if !self.registered {
            self.register().await?;
        }
        if let Some(device) = self.device {
            return Ok(device);
        }
        let device = match self.fetch_uuid().await {
            // A controller that lost (or never had) the registration: register again, once.
            Err(LinkError::Status {
                status: 400 | 401 | 403 | 404,
                ..
            }) => {
                self.register().await?;
                self.fetch_uuid().await?
            }
            other => other?,
        };
        self.device = Some(device);
        Ok(device)
    }

    /// Asks for the config, sending the hash of the one in force.
    pub async fn poll_config(&mut self, hash: &str) -> Result<Polled, LinkError> {
        let device = self.connect().await?;
        const WHAT: &str = "config";
        let request = ConfigRequest {
            config_hash: hash.to_string(),
            integrity_token: Vec::new(),
        };
        let response = self.post_signed(&config_path(device), request).await?;
        match response.status {
            304 => return Ok(Polled::Unchanged),
            200 => {}
            status => return Err(self.forget_on_refusal(WHAT, status, &response.body)),
        }
        let answer: ConfigResponse = self.open(WHAT, "ConfigResponse", &response.body)?;
        let Some(config) = answer.config else {
            return if answer.config_hash == hash {
                Ok(Polled::Unchanged)
            } else {
                Err(LinkError::Incomplete(format!(
                    "the answer has hash {} but no config",
                    answer.config_hash
                )))
            };
        };
        let found = config
            .id
            .as_ref()
            .map(|id| id.uuid.clone())
            .unwrap_or_default();
        if found.parse::<Uuid>().ok() != Some(device) {
            return Err(LinkError::OtherDevice {
                expected: device,
                found: if found.is_empty() {
                    "none (no id in the config)".into()
                } else {
                    found
                },
            });
        }
        Ok(Polled::Config {
            hash: answer.config_hash,
            config: Box::new(config),
        })
    }

    /// Sends one info message.
    pub async fn send_info(&mut self, info: ZInfoMsg) -> Result<(), LinkError> {
        let device = self.connect().await?;
        let response = self.post_signed(&info_path(device), info).await?;
        match response.status {
            200..=202 => Ok(()),
            status => Err(self.forget_on_refusal("info", status, &response.body)),
        }
    }

    /// One metrics report, signed like every other message. Not queued: as in EVE, a report
    /// that does not get through is dropped and the next interval's takes its place.
    pub async fn send_metrics(&mut self, metrics: ZMetricMsg) -> Result<(), LinkError> {
        let device = self.connect().await?;
        let response = self.post_signed(&metrics_path(device), metrics).await?;
        match response.status {
            200..=202 => Ok(()),
            status => Err(self.forget_on_refusal("metrics", status, &response.body)),
        }
    }

    /// A 401/403 may mean the controller rotated its certificate or forgot the device: the
    /// next exchange starts the link again from `certs`.
    fn forget_on_refusal(&mut self, what: &'static str, status: u16, body: &[u8]) -> LinkError {
        if matches!(status, 401 | 403) {
            self.signing = None;
            self.device = None;
        }
        LinkError::Status {
            what,
            status,
            body: body_text(body),
        }
    }

    async fn fetch_signing_cert(&self) -> Result<Vec<u8>, LinkError> {
        let response = self.https.get(CERTS).await?;
        if response.status != 200 {
            return Err(LinkError::Status {
                what: "certs",
                status: response.status,
                body: body_text(&response.body),
            });
        }
        let container =
            AuthContainer::decode(response.body.as_ref()).map_err(|e| LinkError::Malformed {
                what: "certs",
                message: "AuthContainer",
                reason: e.to_string(),
            })?;
        let payload = container
            .protected_payload
            .as_ref()
            .map(|b| b.payload.clone())
            .unwrap_or_default();
        let certs =
            ZControllerCert::decode(payload.as_slice()).map_err(|e| LinkError::Malformed {
                what: "certs",
                message: "ZControllerCert",
                reason: e.to_string(),
            })?;
        let signing = certs
            .certs
            .iter()
            .find(|c| c.r#type == ZCertType::CertTypeControllerSigning as i32)
            .ok_or_else(|| LinkError::Certs("no signing certificate in the list".into()))?;
        auth::check_issued_by(
            &signing.cert,
            &self.identity.root_pem,
            "the controller signing certificate",
        )
        .map_err(|e| LinkError::Certs(e.to_string()))?;
        // The list itself must be signed by the certificate it brings.
        auth::open(&container, &signing.cert).map_err(|source| LinkError::Signature {
            what: "certs",
            source,
        })?;
        Ok(signing.cert.clone())
    }

    async fn register(&mut self) -> Result<(), LinkError> {
        // `onBoardKey` is deprecated in EVE and `softSerial` optional: both left empty.
        let message = ZRegisterMsg {
            pem_cert: self.identity.device.cert_pem().to_vec(),
            serial: self.identity.serial.clone(),
            ..Default::default()
        };
        let container = self.identity.onboard.seal(message.encode_to_vec(), true);
        let response = self.https.post(REGISTER, container.encode_to_vec()).await?;
        match response.status {
            200 | 201 => {
                let mark = self.identity.dir.join(REGISTERED_MARK);
                let file = mark.clone();
                // An fsynced write: on the blocking pool, not the link's runtime.
                #[allow(clippy::disallowed_methods)] // on the blocking pool
                let written = tokio::task::spawn_blocking(move || {
                    cairn_persist::write_atomic(&file, b"", false)
                        .map_err(|(step, e)| format!("{step} the mark failed: {e}"))
                })
                .await
                .unwrap_or_else(|e| Err(format!("the mark's writer ended: {e}")));
                if let Err(e) = written {
                    tracing::warn!(file = %mark.display(), "registered, but {e}");
                }
                self.registered = true;
                tracing::info!(serial = %self.identity.serial, "registered with the controller");
                Ok(())
            }
            409 => Err(LinkError::Conflict),
            status => Err(LinkError::Status {
                what: "register",
                status,
                body: body_text(&response.body),
            }),
        }
    }

    async fn fetch_uuid(&self) -> Result<Uuid, LinkError> {
        const WHAT: &str = "uuid";
        let response = self.post_signed(UUID, UuidRequest {}).await?;
        if response.status != 200 {
            return Err(LinkError::Status {
                what: WHAT,
                status: response.status,
                body: body_text(&response.body),
            });
        }
        let answer: UuidResponse = self.open(WHAT, "UuidResponse", &response.body)?;
        answer.uuid.parse().map_err(|e| LinkError::Malformed {
            what: WHAT,
            message: "UuidResponse",
            reason: format!("uuid {:?}: {e}", answer.uuid),
        })
    }

    async fn post_signed(
        &self,
        path: &str,
        message: impl Message,
    ) -> Result<crate::https::Response, LinkError> {
        let container = self.identity.device.seal(message.encode_to_vec(), false);
        Ok(self.https.post(path, container.encode_to_vec()).await?)
    }

    fn open<M: Message + Default>(
        &self,
        what: &'static str,
        message: &'static str,
        body: &[u8],
    ) -> Result<M, LinkError> {
        let container = AuthContainer::decode(body).map_err(|e| LinkError::Malformed {
            what,
            message: "AuthContainer",
            reason: e.to_string(),
        })?;
        let signing = self.signing.as_deref().unwrap_or_default();
        let payload = auth::open(&container, signing)
            .map_err(|source| LinkError::Signature { what, source })?;
        M::decode(payload.as_slice()).map_err(|e| LinkError::Malformed {
            what,
            message,
            reason: e.to_string(),
        })
    }
}

/// Written once the controller accepted the registration (EVE's device is "onboarded").
const REGISTERED_MARK: &str = "registered";

fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_string()
    }
}

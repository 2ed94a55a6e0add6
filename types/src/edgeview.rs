//! EdgeView, EVE's remote read-out through a websocket dispatcher: the config the config-agent
//! hands the edgeview agent, and the status the agent reports (EVE's `EdgeviewConfig` and
//! `EdgeviewStatus`, `pkg/pillar/types/edgeviewtypes.go`). The wire format is in
//! `docs/edgeview.md`.

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::common::go_time;

/// EVE's per-area access policy (`EvDevPolicy`, `EvAppPolicy`, `EvExtPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default)]
pub struct EvPolicy {
    #[serde(rename = "enabled")]
    pub enabled: bool,
}

/// config-agent → edgeview. One value, key `global`, present only while the config in force
/// has an `edgeview` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "EdgeviewConfig", version = 1)]
pub struct EdgeviewConfig {
    /// The JWT (EVE: `EdgeViewConfig.token`), checked by the edgeview agent.
    #[serde(rename = "JWToken")]
    pub jw_token: String,
    /// The dispatcher's certificates when no root the device trusts issued them
    /// (`disp_cert_pem`), PEM.
    #[serde(rename = "DispCertPEM")]
    pub disp_cert_pem: Vec<String>,
    pub dev_policy: EvPolicy,
    pub app_policy: EvPolicy,
    pub ext_policy: EvPolicy,
    /// `generation_id`: a new value restarts the sessions with the same token.
    #[serde(rename = "GenID")]
    pub gen_id: u32,
    /// The controller's signing certificate (PEM) the token's signature must verify against,
    /// as EVE's zedagent checks it (`verifyJWT`). From the controller link, or the local
    /// file's `signing_cert_pem`.
    #[serde(rename = "SigningCertPEM")]
    pub signing_cert_pem: String,
    /// The device's UUID the token's `sub` must name; empty when the device has none (a
    /// local-file device never registered), and then not checked, as EVE's edge-view skips
    /// the check without `/persist/status/uuid`.
    #[serde(rename = "DeviceUUID")]
    pub device_uuid: String,
}

crate::topic!(EdgeviewConfig, |_v| "global".to_string());

/// edgeview → config-agent (ZInfoEdgeview) and the read-outs. One value, key `global`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "EdgeviewStatus", version = 1)]
pub struct EdgeviewStatus {
    /// The token's `exp` (Unix seconds); 0 while no token is in force.
    pub expire_on: u64,
    /// When the sessions for the token in force started.
    #[serde(with = "go_time")]
    pub started_on: Option<DateTime<Utc>>,
    /// Commands run, by EVE's accounting (`CmdCountDev`, `CmdCountApp`, `CmdCountExt`).
    pub cmd_count_dev: u32,
    pub cmd_count_app: u32,
    pub cmd_count_ext: u32,
    /// Cairn: dispatcher connections up, of the token's instances.
    pub connected: u32,
    pub instances: u32,
    /// Cairn: why the token is not in force, or the last dispatcher fault; empty when all is
    /// well. Names the fault ("token expired at …", "token signature does not verify …").
    pub last_error: String,
}

crate::topic!(EdgeviewStatus, |_v| "global".to_string());

impl EdgeviewStatus {
    /// Whether a token is in force (EVE publishes its status only while edge-view runs).
    pub fn active(&self) -> bool {
        self.expire_on != 0
    }
}

//! The device as a whole: the controller link and the config in force, for the technician.

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::common::{ErrorDescription, go_time};

/// Where the config in force came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(tag = "Kind")]
pub enum ConfigSource {
    #[default]
    None,
    /// The local JSON file (development and offline devices).
    LocalFile {
        #[serde(rename = "Path")]
        path: String,
    },
    /// The controller, live.
    Controller {
        #[serde(rename = "Url")]
        url: String,
    },
    /// The last controller config, checkpointed, because the controller could not be reached.
    Checkpoint,
}

/// config-agent → cli. One value, key `global`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "DeviceStatus", version = 1)]
pub struct DeviceStatus {
    pub config_source: ConfigSource,
    pub controller_reachable: bool,
    /// Hash of the config in force (the controller's configHash, or sha256 of the local file).
    pub last_config_hash: String,
    #[serde(with = "go_time")]
    pub last_config_time: Option<DateTime<Utc>>,
    pub apps: u32,
    pub volumes: u32,
    /// The last refused config or failed contact; empty when the last attempt succeeded.
    pub last_error: ErrorDescription,
    /// The UUID the controller gave this device; empty before the first contact (or offline).
    #[serde(rename = "DeviceUUID")]
    pub device_uuid: String,
    /// The last answer from the controller, whatever it was.
    #[serde(with = "go_time")]
    pub last_contact: Option<DateTime<Utc>>,
    /// App reports queued for the controller, not yet accepted by it.
    pub reports_pending: u32,
    /// The config-agent's own health: its version, process and start time.
    pub agent_version: String,
    pub agent_pid: u32,
    #[serde(with = "go_time")]
    pub agent_started: Option<DateTime<Utc>>,
    /// Whether the app-manager's status reaches the config-agent (the reports depend on it).
    pub app_manager_up: bool,
}

crate::topic!(DeviceStatus, |_v| "global".to_string());

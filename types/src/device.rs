//! The device as a whole: the controller link and the config in force, for the technician.

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::common::{ErrorDescription, eve_number_enum, go_time};

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
    /// The device's name as the controller knows it (EVE's `EdgeDevConfig.device_name`), or
    /// the local config's `device_name`; empty when the config in force names none.
    pub device_name: String,
    /// The serial number the device registers with (EVE's `ZRegisterMsg.serial`): the one
    /// given at onboarding (`<persist>/config/serial`), else the machine's [`Self::product_serial`]
    /// as EVE takes it; empty when neither is known.
    pub serial: String,
    /// The machine's own serial number from its firmware (DMI `product_serial`, EVE's
    /// `ZInfoManufacturer.serialNumber`); empty where the machine has none or hides it.
    pub product_serial: String,
    /// The host name (EVE's `ZInfoDevice.HostName`).
    pub host_name: String,
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
    /// Cairn: the controller's `shutdown` command in force (its counter): every app is
    /// stopped until the device boots again. `None`: no shutdown asked in this boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_cmd: Option<u32>,
}

crate::topic!(DeviceStatus, |_v| "global".to_string());

/// config-agent → agents: the device-wide settings of the config in force (EVE's
/// `configItems`, published like EVE's `ConfigItemValueMap`). One value, key `global`,
/// published only while a config is in force: an absent value means "not known yet".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ConfigItemValueMap", version = 1)]
pub struct ConfigItemValueMap {
    pub items: std::collections::BTreeMap<String, String>,
}

crate::topic!(ConfigItemValueMap, |_v| "global".to_string());

/// How long a volume whose uuid left the config is kept before it is deleted, in seconds
/// (`0`: at once, as EVE does). A config item, in the local file's `config_items` and in the
/// controller's `configItems`.
pub const VOLUME_DELETE_GRACE_ITEM: &str = "cairn.volume.delete.grace.seconds";

/// The grace when the config does not set it: a day, so that a mistake made at the end of a
/// shift is still recoverable the next morning, while the space comes back without anyone
/// acting.
pub const DEFAULT_VOLUME_DELETE_GRACE_SECONDS: u64 = 24 * 3600;

impl ConfigItemValueMap {
    /// The volume deletion grace in force, or why the item's value is not one.
    pub fn volume_delete_grace_seconds(&self) -> Result<u64, String> {
        match self.items.get(VOLUME_DELETE_GRACE_ITEM) {
            None => Ok(DEFAULT_VOLUME_DELETE_GRACE_SECONDS),
            Some(text) => text.trim().parse::<u64>().map_err(|_| {
                format!(
                    "{VOLUME_DELETE_GRACE_ITEM} is {text:?}: give a whole number of seconds (0 deletes a removed volume at once; default {DEFAULT_VOLUME_DELETE_GRACE_SECONDS})"
                )
            }),
        }
    }
}

eve_number_enum! {
/// Why the device started (EVE's `BootReason`, eve-api `info.proto`; the numbers are EVE's).
#[repr(i32)]
pub enum BootReason {
    #[default]
    Unspecified = 0,
    /// The first start on this `<persist>`.
    First = 1,
    RebootCmd = 2,
    Update = 3,
    Fallback = 4,
    Disconnect = 5,
    Fatal = 6,
    Oom = 7,
    WatchdogHung = 8,
    WatchdogPid = 9,
    Kernel = 10,
    PowerFail = 11,
    /// Nothing recorded why the last run ended: a power cut, a kill or a crash.
    Unknown = 12,
    VaultFailed = 13,
    /// A deliberate stop (EVE: the local profile server's poweroff).
    PoweroffCmd = 14,
    ParseFail = 255,
}
}

/// What a deliberate stop leaves for the next start: EVE's `/persist/reboot-reason` and
/// `boot-reason`, written before a reboot it asks for; absent after a power cut or a kill.
/// Written by `cairn up` at `<persist>/boot/stop-reason.json` (`layout::stop_reason`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "StopReason", version = 1)]
pub struct StopReason {
    pub reason: String,
    pub boot_reason: BootReason,
    #[serde(with = "go_time")]
    pub time: Option<DateTime<Utc>>,
    /// The start of the run that stopped (its `LastBoot::started`): a marker is only believed
    /// for the run it names, so a stale one cannot explain a later crash.
    #[serde(with = "go_time")]
    pub run_started: Option<DateTime<Utc>>,
}

/// Why the device last started, as `cairn up` judged it at its start from what the run before
/// left (EVE's nodeagent `handleLastRebootReason`), read by the config-agent for `ZInfoDevice`
/// (`lastRebootReason`, `lastRebootTime`, `last_boot_reason`, `restartCounter`). At
/// `<persist>/boot/last-boot.json` (`layout::last_boot`); one writer, `cairn up`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "LastBoot", version = 1)]
pub struct LastBoot {
    pub reason: String,
    pub boot_reason: BootReason,
    /// When the previous run ended, if it said so; else when this one started (as EVE).
    #[serde(with = "go_time")]
    pub reboot_time: Option<DateTime<Utc>>,
    /// When this run started.
    #[serde(with = "go_time")]
    pub started: Option<DateTime<Utc>>,
    /// Starts on this `<persist>` before this one (EVE's `restartCounter`).
    pub restart_counter: u32,
}

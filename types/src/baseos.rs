//! The base OS (the device image in its two root slots): what the baseos-manager reports and
//! keeps (EVE's baseosmgr `BaseOsStatus` / zboot partition states, reported as `ZInfoDevSW`).

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::common::{ErrorDescription, eve_number_enum, go_time};

/// One root slot as EVE's `ZInfoDevSW` names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "BaseOsSlot", version = 1)]
pub struct BaseOsSlot {
    /// `IMGA` or `IMGB`.
    pub partition_label: String,
    pub partition_device: String,
    /// EVE's zboot partition states: `active` (booted, committed), `inprogress` (booted on
    /// trial), `updating` (written, marked for its trial boot), `unused`.
    pub partition_state: String,
    /// The slot the device runs.
    pub activated: bool,
    /// The image version in the slot, when known (the running one's `/etc/cairn/release`, the
    /// other from the last bundle written into it).
    pub version: String,
    /// Why the slot's last update failed; empty when it did not.
    pub error: String,
}

/// baseos-manager → config-agent, cli. One value, key `global`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "BaseOsStatus", version = 1)]
pub struct BaseOsStatus {
    /// `committed`, `trial` or `fallback` (the initramfs's choice); empty outside an A/B disk.
    pub boot_mode: String,
    pub slots: Vec<BaseOsSlot>,
    /// The last update's outcome, for the controller and the technician.
    pub last_update: Option<UpdateOutcome>,
    /// The update the controller (or the local file) asks for, as far as it got (EVE's
    /// `BaseOsStatus` of baseosmgr); none when no `baseos` is configured.
    pub update: Option<BaseOsUpdateStatus>,
}

/// config-agent → baseos-manager: the base OS the device should run (EVE's `BaseOsConfig`,
/// from `EdgeDevConfig.baseos` or the local file's `baseos`). One value, key `global`: EVE's
/// config has one `baseos` block, and zedagent keeps one `BaseOsConfig` at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "BaseOsConfig", version = 1)]
pub struct BaseOsConfig {
    /// The content tree holding the update bundle.
    #[serde(rename = "ContentTreeUUID")]
    pub content_tree_uuid: Uuid,
    /// The version the device should run (the bundle's signed header must say the same).
    pub base_os_version: String,
    /// EVE's `retry_update.counter`: a change retries a failed update of this version.
    pub retry_update_counter: u32,
    /// false: download and verify the bundle, but do not install it.
    pub activate: bool,
    /// Cairn: why the request cannot be carried out (its content tree is not in the config);
    /// the baseos-manager reports it.
    pub unusable: String,
}

crate::topic!(BaseOsConfig, |_v| "global".to_string());

eve_number_enum! {
/// How far an update got; numbers as EVE's `SwState` (reported as its `ZSwState`).
#[repr(u8)]
pub enum BaseOsUpdateState {
    #[default]
    Initial = 100,
    Downloading = 103,
    Downloaded = 104,
    Verifying = 105,
    Verified = 106,
    Loading = 107,
    /// Downloaded, its sha256 and signature verified.
    Loaded = 108,
    /// Written into a slot (or the running version).
    Installed = 111,
}
}

/// The configured update's progress (EVE's baseosmgr `BaseOsStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "BaseOsUpdateStatus", version = 1)]
pub struct BaseOsUpdateStatus {
    #[serde(rename = "ContentTreeUUID")]
    pub content_tree_uuid: Uuid,
    pub base_os_version: String,
    pub activate: bool,
    pub state: BaseOsUpdateState,
    /// The slot it was written to (or runs in), once assigned; empty before.
    pub partition_label: String,
    /// It runs in the slot booted (EVE's `Activated`).
    pub activated: bool,
    /// Deferred: the running slot is still on trial (EVE's `TooEarly`).
    pub too_early: bool,
    /// The download's 0-100.
    pub progress: u32,
    /// What it is doing now, in words (verifying, writing N bytes into slot IMGB, ...).
    pub step: String,
    pub error: ErrorDescription,
}

crate::topic!(BaseOsStatus, |_v| "global".to_string());

/// What became of an update (`<persist>/baseos/last-update.json`): kept on `/persist`, so the
/// old slot reports why the new one failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "UpdateOutcome", version = 1)]
pub struct UpdateOutcome {
    pub version: String,
    /// `IMGA` or `IMGB`: the slot the update went to.
    pub partition_label: String,
    /// `installed` (marked for trial), `committed`, `failed`.
    pub result: String,
    pub reason: String,
    #[serde(with = "go_time")]
    pub time: Option<DateTime<Utc>>,
}

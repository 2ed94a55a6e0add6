//! The base OS (the device image in its two root slots): what the baseos-manager reports and
//! keeps (EVE's baseosmgr `BaseOsStatus` / zboot partition states, reported as `ZInfoDevSW`).

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::common::go_time;

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

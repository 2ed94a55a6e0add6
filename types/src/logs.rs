//! The log-manager's state for the technician (EVE reports the same as `newlogMetric`).

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::common::go_time;

/// log-manager → cli. One value, key `global`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "LogManagerStatus", version = 1)]
pub struct LogManagerStatus {
    /// Gzip files waiting in `<persist>/newlog/` and their bytes.
    pub queued_files: u64,
    pub queued_bytes: u64,
    /// Files the controller took since the agent started.
    pub sent_files: u64,
    /// Files dropped, oldest first, because the queue was over its cap (since the device began).
    pub dropped_files: u64,
    /// Files moved to `failedUpload/` after ten refusals (since the agent started).
    pub set_aside_files: u64,
    /// Why the last upload failed; empty when it worked.
    pub last_error: String,
    /// Why lines could not be written into the queue (or a queued file not kept); empty when
    /// the last attempt worked. The lines wait in their source files meanwhile.
    pub queue_error: String,
    #[serde(with = "go_time")]
    pub last_upload: Option<DateTime<Utc>>,
    /// The remote log levels in force (EVE's `debug.default.remote.loglevel` as `default`,
    /// and each `agent.<name>.debug.remote.loglevel`): agent lines below them are not sent.
    pub remote_log_levels: std::collections::BTreeMap<String, String>,
}

crate::topic!(LogManagerStatus, |_v| "global".to_string());

//! Applications: the controller's config for one, and the app-manager's status of it.

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_repr::Serialize_repr;
use uuid::Uuid;

use crate::common::{
    AppInstanceOpsCmd, ErrorDescription, UUIDandVersion, go_time, null_as_default,
};
use crate::domain::DomainSpec;
use crate::snapshot::{SnapshotConfig, SnapshottingStatus};

/// A volume an app uses, at a generation (EVE `VolumeRefConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct VolumeRefConfig {
    #[serde(rename = "VolumeID")]
    #[persist(mandatory)]
    pub volume_id: Uuid,
    pub generation_counter: i64,
    pub local_generation_counter: i64,
    /// For process apps: where the volume's directory appears to the app.
    pub mount_dir: String,
}

/// The controller's (or a rollback's local) config of one app. Persisted with each snapshot as
/// `appInstanceConfig.json`; a rollback restores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "AppInstanceConfig", version = 1, plain_import)]
pub struct AppInstanceConfig {
    #[serde(rename = "UUIDandVersion")]
    #[persist(mandatory)]
    pub uuid_and_version: UUIDandVersion,
    pub display_name: String,
    pub activate: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub volume_ref_config_list: Vec<VolumeRefConfig>,
    pub restart_cmd: AppInstanceOpsCmd,
    pub purge_cmd: AppInstanceOpsCmd,
    /// Counters raised on the device itself (EVE: local restart/purge), added to the controller's.
    pub local_restart_cmd: AppInstanceOpsCmd,
    pub local_purge_cmd: AppInstanceOpsCmd,
    pub snapshot: SnapshotConfig,
    /// Cairn: how the app runs (EVE derives this from `FixedResources` and its images).
    pub domain: Option<DomainSpec>,
    /// EVE's `FixedResources.virtualizationMode` by name (`HVM`, `PV`, `NOHYPER`), as the
    /// controller gave it; empty from the local file, whose `kind` says it.
    pub virtualization_mode: String,
    /// Cairn: the tenant the app belongs to; `""` is the default tenant. A technician admitted
    /// for some tenants only reads their apps and snapshots.
    pub tenant: String,
    /// Cairn: the consistency group this app is a member of (an app is in at most one), as the
    /// device's config declares it; `None`: in none. Boxed: most apps are in none.
    pub group: Option<Box<crate::policy::ConsistencyGroup>>,
    /// Cairn: commands run on the device around each snapshot of the app.
    pub quiesce: Option<QuiesceHooks>,
    /// Cairn: what the device does when the app's domain ends without being asked to, or
    /// cannot be started. EVE has no field for it.
    pub restart_policy: RestartPolicy,
    /// Cairn: why the device cannot run this app as configured (the field and the reason),
    /// set by the config-agent for what EVE can express and Cairn cannot run yet. The app is
    /// accepted and reported broken with this reason; `domain` is then `None`.
    pub unrunnable: Option<String>,
    /// EVE's `start_delay_in_seconds`: after the device comes up, the app is started no
    /// sooner than this many seconds after the first config was in hand (0: at once). Later
    /// starts of the same boot are not delayed once the window has passed.
    pub start_delay_seconds: u32,
}

/// Cairn: when the app-manager starts an app again whose domain ended on its own or failed to
/// start. A restart waits 1 s, doubling per failure in a row up to 600 s (EVE's
/// `timer.boot.retry`); a run of 10 s or more ends the row. A restart command, a new version,
/// a purge or a rollback from the controller always tries at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// After any end: a crash, a kill, a clean exit, a failed start (systemd's `always`).
    #[default]
    Always,
    /// After a crash, a kill or a failed start, not after a clean exit (status 0).
    OnFailure,
    /// Never by itself: the app stays broken, reporting why, until the controller restarts
    /// it (EVE's handling of a crashed domain).
    Never,
}

impl RestartPolicy {
    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on_failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// Cairn: quiesce hooks of an app, run on the device (not in the guest) around every snapshot
/// the app-manager takes of it: `pre` before the volumes are snapshotted (for a snapshot that
/// stops the app, before the stop, so the app can still flush), `post` after, whatever the
/// outcome, once `pre` ran. Each is an argv; empty: no such hook.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct QuiesceHooks {
    pub pre: Vec<String>,
    pub post: Vec<String>,
    /// Each hook's process group is killed after this long; 0: [`Self::DEFAULT_TIMEOUT_SECONDS`].
    pub timeout_seconds: u32,
    /// A VM with a guest agent (`VmSpec::guest_agent`) whose filesystems cannot be frozen
    /// for a live snapshot: take the snapshot anyway (crash-consistent, with a warning)
    /// instead of failing it.
    pub proceed_without_guest_agent: bool,
}

impl QuiesceHooks {
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 30;

    pub fn timeout_seconds(&self) -> u32 {
        match self.timeout_seconds {
            0 => Self::DEFAULT_TIMEOUT_SECONDS,
            s => s,
        }
    }

    /// No hook to run (the block may still carry options).
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.post.is_empty()
    }
}

impl AppInstanceConfig {
    pub fn app_uuid(&self) -> Uuid {
        self.uuid_and_version.uuid
    }
}

/// Whether `name` is a tenant name: empty (the default tenant) or `[a-z0-9][a-z0-9_-]{0,62}`, so
/// that it fits in file names, D-Bus names and command lines as it is.
pub fn is_tenant_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let plain = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match bytes.split_first() {
        None => true,
        Some((first, rest)) => {
            bytes.len() <= 63
                && plain(first)
                && rest.iter().all(|b| plain(b) || *b == b'_' || *b == b'-')
        }
    }
}

/// EVE's state of an app or volume (`SwState`); the numbers are EVE's. Records and the bus carry
/// the number, as EVE's do; the read-outs show [`SwState::name`], and either is read back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize_repr, Persist)]
#[repr(u8)]
pub enum SwState {
    #[default]
    Initial = 100,
    CreatingVolume = 109,
    CreatedVolume = 110,
    Installed = 111,
    /// Waiting out the app's `start_delay_in_seconds` after the device came up.
    StartDelayed = 113,
    Booting = 114,
    Running = 115,
    Pausing = 116,
    Paused = 117,
    Halting = 118,
    Halted = 119,
    Broken = 120,
    Unknown = 121,
    Pending = 122,
    Failed = 124,
}

impl SwState {
    const ALL: [SwState; 15] = [
        SwState::Initial,
        SwState::CreatingVolume,
        SwState::CreatedVolume,
        SwState::Installed,
        SwState::StartDelayed,
        SwState::Booting,
        SwState::Running,
        SwState::Pausing,
        SwState::Paused,
        SwState::Halting,
        SwState::Halted,
        SwState::Broken,
        SwState::Unknown,
        SwState::Pending,
        SwState::Failed,
    ];

    /// EVE's name of the state, as its `SwState.String()` gives it: `RUNNING`, `HALTED`, ...
    pub fn name(self) -> &'static str {
        match self {
            SwState::Initial => "INITIAL",
            SwState::CreatingVolume => "CREATING_VOLUME",
            SwState::CreatedVolume => "CREATED_VOLUME",
            SwState::Installed => "INSTALLED",
            SwState::StartDelayed => "START_DELAYED",
            SwState::Booting => "BOOTING",
            SwState::Running => "RUNNING",
            SwState::Pausing => "PAUSING",
            SwState::Paused => "PAUSED",
            SwState::Halting => "HALTING",
            SwState::Halted => "HALTED",
            SwState::Broken => "BROKEN",
            SwState::Unknown => "UNKNOWN",
            SwState::Pending => "PENDING",
            SwState::Failed => "FAILED",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn from_number(number: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == number)
    }
}

impl<'de> Deserialize<'de> for SwState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Number(u8),
            Name(String),
        }
        match Given::deserialize(deserializer)? {
            Given::Number(n) => Self::from_number(n).ok_or_else(|| {
                D::Error::custom(format!("{n} is not one of EVE's SwState numbers"))
            }),
            Given::Name(name) => Self::from_name(&name).ok_or_else(|| {
                D::Error::custom(format!("{name:?} is not one of EVE's SwState names"))
            }),
        }
    }
}

/// The app-manager's view of one app. Key: app UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "AppInstanceStatus", version = 1)]
pub struct AppInstanceStatus {
    /// The config in effect: after a rollback, the snapshot's version.
    #[serde(rename = "UUIDandVersion")]
    #[persist(mandatory)]
    pub uuid_and_version: UUIDandVersion,
    pub display_name: String,
    pub state: SwState,
    pub activated: bool,
    #[serde(with = "go_time")]
    pub boot_time: Option<DateTime<Utc>>,
    pub snap_status: SnapshottingStatus,
    pub error: ErrorDescription,
    #[serde(deserialize_with = "null_as_default")]
    pub warnings: Vec<String>,
    /// Cairn: the tenant of the app (from its config); `""` is the default tenant.
    pub tenant: String,
    /// Cairn: how many times the device started the app again by its restart policy.
    pub restarts: u32,
    /// Cairn: the app's last unasked end or failed start, kept after it runs again; empty:
    /// none since the device knows the app.
    pub last_failure: ErrorDescription,
    /// Cairn: how the app runs: `vm`, `container` or `process`; empty when it cannot run
    /// as configured (see `error`).
    pub domain_kind: String,
    /// EVE's virtualization mode of the app (`VmMode` by name: `HVM`, `PV`, `NOHYPER` for a
    /// container); empty for a process, which EVE has no mode for.
    pub virtualization_mode: String,
    /// The volumes the app uses, as its config lists them (EVE's `VolumeRefStatusList`, by
    /// its identifying fields).
    #[serde(rename = "VolumeRefStatusList", deserialize_with = "null_as_default")]
    pub volume_refs: Vec<VolumeRefConfig>,
}

impl crate::Topic for AppInstanceConfig {
    const NAME: &'static str = <Self as cairn_persist::Record>::SCHEMA;
    fn key(&self) -> String {
        self.uuid_and_version.uuid.to_string()
    }
    fn tenant(&self) -> Option<&str> {
        Some(&self.tenant)
    }
}

impl crate::Topic for AppInstanceStatus {
    const NAME: &'static str = <Self as cairn_persist::Record>::SCHEMA;
    fn key(&self) -> String {
        self.uuid_and_version.uuid.to_string()
    }
    fn tenant(&self) -> Option<&str> {
        Some(&self.tenant)
    }
    fn readout_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        crate::never_as_null(&mut value);
        crate::with_state_name(value, self.state.name())
    }
}

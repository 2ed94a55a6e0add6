//! Every message that crosses Cairn's bus or disk: config, status and snapshot records.
//!
//! Invariant: this crate does no I/O. Its types carry EVE's field names (PascalCase, `…ID`,
//! `UUIDandVersion`) so that records EVE wrote load as they are; mandatory fields are declared
//! with `#[persist(mandatory)]` and checked by `cairn-persist` at every depth.

pub mod app;
pub mod baseos;
pub mod common;
pub mod content;
pub mod device;
pub mod domain;
pub mod edgeview;
pub mod export;
pub mod layout;
pub mod logs;
pub mod policy;
pub mod remote;
pub mod snapshot;
pub mod volume;

pub use app::{AppInstanceConfig, AppInstanceStatus, RestartPolicy, SwState, VolumeRefConfig};
pub use baseos::{
    BaseOsConfig, BaseOsSlot, BaseOsStatus, BaseOsUpdateState, BaseOsUpdateStatus, UpdateOutcome,
};
pub use common::{
    AppInstanceOpsCmd, ErrorDescription, ErrorEntity, ErrorEntityType, ErrorSeverity,
    UUIDandVersion,
};
pub use content::{
    ContentFormat, ContentTreeConfig, ContentTreeState, ContentTreeStatus, DatastoreConfig,
};
pub use device::{
    BootReason, ConfigItemValueMap, ConfigSource, DeviceStatus, LastBoot, StopReason,
};
pub use domain::{
    ContainerSpec, DiskConfig, DomainConfig, DomainLiveOp, DomainLiveOpConfig, DomainLiveOpState,
    DomainLiveOpStatus, DomainMetric, DomainSpec, DomainState, DomainStatus, ProcessSpec, VmSpec,
};
pub use edgeview::{EdgeviewConfig, EdgeviewStatus, EvPolicy};
pub use export::{
    ExportAction, ExportConfig, ExportKind, ExportManifest, ExportState, ExportStatus,
};
pub use logs::LogManagerStatus;
pub use policy::{ConsistencyGroup, Retention, ScheduledExport, SnapshotPolicy};
pub use remote::RemoteConfig;
pub use snapshot::{
    SnapshotConfig, SnapshotDesc, SnapshotInstanceStatus, SnapshotMode, SnapshotType, SnapshotWhen,
    SnapshottingStatus, VolumesSnapshotAction, VolumesSnapshotConfig, VolumesSnapshotStatus,
};
pub use volume::{
    AppVolumeRefs, DirRestoreMode, PendingDeletion, SnapshotBackendKind, VolumeConfig,
    VolumeFormat, VolumeOrigin, VolumeState, VolumeStatus, volume_key,
};

/// A message published on the bus: its topic is its type name, and each value has a key.
/// Each module implements it for its own messages.
pub trait Topic:
    cairn_persist::Record + Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The topic name, equal to the type name as in EVE.
    const NAME: &'static str;
    /// The key of this value within its topic.
    fn key(&self) -> String;
    /// The tenant this value belongs to, for topics whose values belong to one (apps and their
    /// snapshots); `Some("")` is the default tenant. `None`: device-wide, e.g. `DeviceStatus`,
    /// readable by every reader of the topic. The bus hands a reader admitted only for some
    /// tenants just the values of those tenants and the device-wide ones.
    fn tenant(&self) -> Option<&str> {
        None
    }
    /// The value as the read-outs show it (`cairn --json`, the web API, D-Bus): its record's
    /// JSON with EVE's numbered states by name and Go's zero time ("never") as `null`. The bus
    /// and the records keep EVE's numbers.
    fn readout_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        never_as_null(&mut value);
        Ok(value)
    }
}

/// Go's zero `time.Time`, which EVE's records carry for "never".
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Every Go zero time in `value`, at any depth, becomes `null`.
pub fn never_as_null(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(text) if text == GO_ZERO_TIME => *value = Value::Null,
        Value::Array(items) => items.iter_mut().for_each(never_as_null),
        Value::Object(fields) => fields.values_mut().for_each(never_as_null),
        _ => {}
    }
}

/// `value`'s top-level `State` replaced by `name`.
pub fn with_state_name(
    mut value: serde_json::Value,
    name: &str,
) -> serde_json::Result<serde_json::Value> {
    if let Some(fields) = value.as_object_mut() {
        fields.insert("State".into(), serde_json::Value::from(name));
    }
    Ok(value)
}

/// Implements [`Topic`] for a record type, naming the topic after its schema.
#[macro_export]
macro_rules! topic {
    ($ty:ty, |$v:ident| $key:expr) => {
        impl $crate::Topic for $ty {
            const NAME: &'static str = <$ty as cairn_persist::Record>::SCHEMA;
            fn key(&self) -> String {
                let $v = self;
                $key
            }
        }
    };
}

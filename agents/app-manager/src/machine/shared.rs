//! App configs shared, not copied: the state's configs (the controller's, a rollback's, the one
//! running) and every snapshot's are a [`SharedConfig`] each, and equal ones loaded from the
//! same state file are one allocation. An app's snapshots mostly belong to the config in force:
//! at 1,000 apps × 10 snapshots the app-manager held 12,000 copies of a few hundred configs, each
//! twice (the state in force and the state as last written), and decoded each one apart at every
//! start. On disk nothing changes: a shared config is written as the config itself, in every
//! place it is used.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;

use cairn_persist::{FieldPath, Schema};
use cairn_types::AppInstanceConfig;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// An app config, shared by the fields and snapshots of a state that hold the same one; a
/// change to one holder copies it first ([`Self::make_mut`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig(Arc<AppInstanceConfig>);

impl SharedConfig {
    pub fn new(config: AppInstanceConfig) -> Self {
        Self(Arc::new(config))
    }

    /// The config to change, copied first if another holder shares it.
    pub fn make_mut(&mut self) -> &mut AppInstanceConfig {
        Arc::make_mut(&mut self.0)
    }

    /// Whether both are one allocation.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Deref for SharedConfig {
    type Target = AppInstanceConfig;

    fn deref(&self) -> &AppInstanceConfig {
        &self.0
    }
}

impl From<AppInstanceConfig> for SharedConfig {
    fn from(config: AppInstanceConfig) -> Self {
        Self::new(config)
    }
}

impl Schema for SharedConfig {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        AppInstanceConfig::check_mandatory(value, path, missing);
    }
}

impl Serialize for SharedConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

thread_local! {
    /// While [`sharing`] runs on this thread: the configs decoded so far, by their JSON.
    static SEEN: RefCell<Option<Vec<(Value, SharedConfig)>>> = const { RefCell::new(None) };
}

/// Runs `load` (the decoding of one state) with equal configs decoded once and shared.
pub fn sharing<T>(load: impl FnOnce() -> T) -> T {
    /// Forgets the configs however `load` ends, so none outlives its state's load.
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            SEEN.with(|seen| *seen.borrow_mut() = None);
        }
    }
    SEEN.with(|seen| *seen.borrow_mut() = Some(Vec::new()));
    let _forget = Forget;
    load()
}

/// Within [`sharing`], a config equal to one already decoded is that one: its JSON is
/// compared, not decoded (comparing is a fraction of the typed decoding).
impl<'de> Deserialize<'de> for SharedConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if SEEN.with(|seen| seen.borrow().is_none()) {
            return AppInstanceConfig::deserialize(deserializer).map(Self::new);
        }
        let value = Value::deserialize(deserializer)?;
        let known = SEEN.with(|seen| {
            seen.borrow()
                .iter()
                .flatten()
                .find(|(json, _)| *json == value)
                .map(|(_, config)| config.clone())
        });
        if let Some(config) = known {
            return Ok(config);
        }
        let config: AppInstanceConfig = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            D::Error::custom(format_args!("{path}: {}", e.into_inner()))
        })?;
        let config = Self::new(config);
        SEEN.with(|seen| {
            if let Some(seen) = seen.borrow_mut().as_mut() {
                seen.push((value, config.clone()));
            }
        });
        Ok(config)
    }
}

//! The device's desired state, from either source — the controller's `EdgeDevConfig` or the
//! local JSON file — converted into the bus messages and validated as a whole. A config with
//! any fault is refused entirely; the error names the field and the fault.
//!
//! The smallest local config is an object naming `apps` or `volumes` (or both):
//! `{"apps": [], "volumes": []}` is a device that runs nothing, said on purpose. Anything else
//! at the top level — an array (serde would read it as a struct with every field defaulted),
//! `{}`, `null`, a number, a string, an object with only `config_items` or `groups` — is refused
//! by name, because applying it would remove every app and volume by accident. (The controller's
//! protobuf cannot tell an empty list from an absent one: there an empty config is EVE's "run
//! nothing"; the volume-manager's deletion grace is what protects the data then.)

use std::collections::BTreeMap;

use cairn_types::{
    AppInstanceConfig, BaseOsConfig, ContentTreeConfig, EdgeviewConfig, ExportConfig, RemoteConfig,
    VolumeConfig,
};

mod clones;
mod controller;
mod groups;
mod local;
mod remotes;
mod validate;

pub use controller::from_proto;
pub use local::{check_tenant, from_local_json};
pub use validate::validate;

/// What the config-agent publishes: one `AppInstanceConfig` per app, one `VolumeConfig` per
/// volume, one `ContentTreeConfig` per content tree (with its datastores), and the device's
/// config items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceConfig {
    pub apps: Vec<AppInstanceConfig>,
    pub volumes: Vec<VolumeConfig>,
    pub content_trees: Vec<ContentTreeConfig>,
    pub config_items: BTreeMap<String, String>,
    /// The controller's `shutdown` command counter (EVE's `DeviceOpsCmd`), if it sent one.
    pub shutdown_counter: Option<u32>,
    /// Object-store remotes exports may go to.
    pub remotes: Vec<RemoteConfig>,
    /// Exports of snapshots the config asks for (each app's `export_requests`), run once each.
    pub exports: Vec<ExportConfig>,
    /// EdgeView (EVE `EdgeDevConfig.edgeview`), for the edgeview agent. Its token is checked
    /// there, as EVE checks it outside the config parse: a bad token refuses EdgeView only.
    /// The signing certificate and device UUID are the link's, filled in when put in force.
    pub edgeview: Option<EdgeviewConfig>,
    /// The base OS to run (EVE's `baseos`), if the config names one.
    pub baseos: Option<BaseOsConfig>,
    /// The device's name (EVE's `EdgeDevConfig.device_name`); empty: none given.
    pub device_name: String,
}

/// EVE's `baseos` block as a bus request; a content tree the config does not have makes it
/// unusable (reported by the baseos-manager) rather than refusing the whole config, as EVE's
/// baseosmgr reports it on its `BaseOsStatus`.
pub(crate) fn baseos_config(
    content_tree_uuid: &str,
    base_os_version: &str,
    retry_update_counter: u32,
    activate: bool,
    trees: &[ContentTreeConfig],
) -> BaseOsConfig {
    let parsed = uuid::Uuid::parse_str(content_tree_uuid.trim());
    let unusable = match &parsed {
        _ if content_tree_uuid.trim().is_empty() => {
            "the base OS names no content tree (content_tree_uuid is empty)".to_string()
        }
        Err(_) => format!("the base OS content tree '{content_tree_uuid}' is not a UUID"),
        Ok(id) if !trees.iter().any(|t| t.content_id == *id) => {
            format!("the base OS content tree {id} is not in the config's content trees")
        }
        Ok(_) if base_os_version.trim().is_empty() => {
            "the base OS names no version (base_os_version is empty)".to_string()
        }
        Ok(_) => String::new(),
    };
    BaseOsConfig {
        content_tree_uuid: parsed.unwrap_or_default(),
        base_os_version: base_os_version.trim().to_string(),
        retry_update_counter,
        activate,
        unusable,
    }
}

/// A refused config: `path` locates the field (`apps[1].snapshot.snapshots[0].id`).
/// An empty `path` is the whole file (its top level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

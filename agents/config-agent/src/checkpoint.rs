//! The last config accepted from the controller, kept at `<persist>/checkpoint/lastconfig`
//! (+ `.bak`) so that a device that boots without its controller runs on it.

use std::path::{Path, PathBuf};

use base64::Engine;
use cairn_persist::{Origin, Persist, PersistError};
use chrono::{DateTime, Utc};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::model::{self, DeviceConfig};
use crate::proto::EdgeDevConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "LastConfig", version = 1)]
pub struct LastConfig {
    /// The controller's configHash for it.
    #[persist(mandatory)]
    pub config_hash: String,
    pub received: Option<DateTime<Utc>>,
    /// The `EdgeDevConfig` protobuf, base64.
    #[persist(mandatory)]
    pub edge_dev_config: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("checkpoint {}: the stored config does not decode: {reason}", path.display())]
    Undecodable { path: PathBuf, reason: String },
    #[error("checkpoint {}: the stored config is no longer valid: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: model::ConfigError,
    },
    #[error("the checkpoint could not be read: its reader ended ({0})")]
    ReaderEnded(String),
}

pub fn path(persist: &Path) -> PathBuf {
    cairn_types::layout::last_config_checkpoint(persist)
}

/// Keeps `config` as the last good one, durably, the previous one as `.bak`. Blocking.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn save(persist: &Path, hash: &str, config: &EdgeDevConfig) -> Result<(), PersistError> {
    let record = LastConfig {
        config_hash: hash.to_string(),
        received: Some(Utc::now()),
        edge_dev_config: base64::engine::general_purpose::STANDARD.encode(config.encode_to_vec()),
    };
    cairn_persist::store_with_backup(&path(persist), &record)
}

/// The checkpointed config, validated again; `from_backup` says whether `.bak` had to be used.
pub struct Restored {
    pub hash: String,
    pub config: DeviceConfig,
    pub from_backup: Option<String>,
}

/// Blocking: record I/O.
#[allow(clippy::disallowed_methods)] // blocking: called on the blocking pool
pub fn load(persist: &Path) -> Result<Restored, CheckpointError> {
    let file = path(persist);
    let loaded = cairn_persist::load_with_backup::<LastConfig>(&file)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&loaded.record.edge_dev_config)
        .map_err(|e| CheckpointError::Undecodable {
            path: file.clone(),
            reason: e.to_string(),
        })?;
    let proto =
        EdgeDevConfig::decode(bytes.as_slice()).map_err(|e| CheckpointError::Undecodable {
            path: file.clone(),
            reason: e.to_string(),
        })?;
    let config = model::from_proto(&proto).map_err(|source| CheckpointError::Invalid {
        path: file.clone(),
        source,
    })?;
    Ok(Restored {
        hash: loaded.record.config_hash,
        config,
        from_backup: match loaded.origin {
            Origin::Primary => None,
            Origin::Backup { primary_error } => Some(primary_error.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    fn config(version: &str) -> EdgeDevConfig {
        EdgeDevConfig {
            apps: vec![proto::AppInstanceConfig {
                uuidandversion: Some(proto::UuidAndVersion {
                    uuid: "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into(),
                    version: version.into(),
                }),
                activate: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_last_config_survives_and_a_damaged_one_falls_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), "h1", &config("1")).unwrap();
        save(dir.path(), "h2", &config("2")).unwrap();
        let restored = load(dir.path()).unwrap();
        assert_eq!(restored.hash, "h2");
        assert_eq!(restored.config.apps[0].uuid_and_version.version, "2");
        assert!(restored.from_backup.is_none());

        // A torn or altered primary: the previous config is used, and that is said.
        let file = path(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&file, bytes).unwrap();
        let restored = load(dir.path()).unwrap();
        assert_eq!(restored.hash, "h1");
        let why = restored.from_backup.expect("the fallback is reported");
        assert!(why.contains("checksum") || why.contains("JSON"), "{why}");
    }

    #[test]
    fn no_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).err().unwrap();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}

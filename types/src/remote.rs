//! Object-store remotes exports go to (issue 22): named in the config, used by the
//! volume-manager. The credentials themselves are never in a message: only the file holding them.

use std::path::PathBuf;

use cairn_persist::Persist;
use serde::{Deserialize, Serialize};

/// config-agent → volume-manager: one S3-compatible remote. Key: its id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "RemoteConfig", version = 1)]
pub struct RemoteConfig {
    /// The name exports use (`cairn export S --to ID[:PREFIX]`).
    #[serde(rename = "ID")]
    #[persist(mandatory)]
    pub id: String,
    /// The S3 endpoint URL (`https://s3.example:9000`; `http://` only for a loopback or test
    /// server).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix every export of this remote goes under (`fleet/device-1`).
    pub prefix: String,
    /// A file under `<persist>/config/` (mode 0600, owned by root) holding the credentials as
    /// JSON `{"access_key_id": …, "secret_access_key": …}`; a relative name is taken there.
    pub credentials_file: PathBuf,
    /// A PEM CA certificate the endpoint's TLS certificate must chain to; empty: system roots.
    #[serde(rename = "CACertFile")]
    pub ca_cert_file: PathBuf,
    /// Upload limit in bytes per second; 0: none.
    pub bandwidth_limit: u64,
    /// A 32-byte key file for client-side encryption; empty: objects are stored as they are.
    pub encryption_key_file: PathBuf,
}

crate::topic!(RemoteConfig, |v| v.id.clone());

//! Content trees: images the device downloads from a datastore, verifies against their sha256
//! and keeps in the content store under `<persist>/content/` (EVE: zedagent's
//! `ContentTreeConfig`, downloader + verifier, volumemgr's `ContentTreeStatus`).

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::common::{ErrorDescription, eve_number_enum, go_time, null_as_default};

eve_number_enum! {
/// The format of a content tree's image; numbers as EVE's `config.Format`.
#[repr(i32)]
pub enum ContentFormat {
    #[default]
    Unknown = 0,
    Raw = 1,
    Qcow = 2,
    Qcow2 = 3,
    Vhd = 4,
    Vmdk = 5,
    Ova = 6,
    Vhdx = 7,
    Container = 8,
    Iso = 9,
    Pvc = 10,
}
}

impl ContentFormat {
    /// The name EVE's API gives the format (`RAW`, `QCOW2`, ...).
    pub fn eve_name(self) -> &'static str {
        match self {
            Self::Unknown => "FmtUnknown",
            Self::Raw => "RAW",
            Self::Qcow => "QCOW",
            Self::Qcow2 => "QCOW2",
            Self::Vhd => "VHD",
            Self::Vmdk => "VMDK",
            Self::Ova => "OVA",
            Self::Vhdx => "VHDX",
            Self::Container => "CONTAINER",
            Self::Iso => "ISO",
            Self::Pvc => "PVC",
        }
    }
}

/// Where a content tree is downloaded from (EVE `DatastoreConfig`). `DsType` is EVE's type
/// name (`DsHttp`, `DsHttps`, `DsS3`, ...): the downloader reports a type it cannot use on
/// the content trees that need it, as EVE's downloader does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct DatastoreConfig {
    #[serde(rename = "UUID")]
    pub uuid: Uuid,
    pub ds_type: String,
    /// The server, with its scheme (`https://host:port`) as EVE's controllers send it; a bare
    /// `host[:port]` gets the scheme of `ds_type`.
    pub fqdn: String,
    /// A path prefix on the server, joined before the content tree's relative URL.
    pub dpath: String,
    /// CA certificates (PEM) the server's TLS certificate must chain to. EVE: when given, they
    /// are the only trust anchors for this datastore; when empty, the system's roots are.
    #[serde(rename = "DsCertPEM", deserialize_with = "null_as_default")]
    pub ds_cert_pem: Vec<String>,
    /// The user name for the datastore (EVE's `apiKey`; a registry's basic or token auth).
    pub api_key: String,
    /// The password for the datastore (EVE's `password`).
    pub password: String,
}

/// config-agent → downloader, volume-manager. Key: the content tree's UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ContentTreeConfig", version = 1)]
pub struct ContentTreeConfig {
    #[serde(rename = "ContentID")]
    #[persist(mandatory)]
    pub content_id: Uuid,
    #[serde(rename = "DatastoreIDList", deserialize_with = "null_as_default")]
    pub datastore_id_list: Vec<Uuid>,
    #[serde(rename = "RelativeURL")]
    pub relative_url: String,
    pub format: ContentFormat,
    /// Lower-case hex, as EVE stores it.
    pub content_sha256: String,
    /// The most bytes the download may bring; 0: no limit.
    pub max_download_size: u64,
    pub generation_counter: i64,
    pub display_name: String,
    /// Cairn: the datastores of `datastore_id_list` that the config has, in that order, so
    /// the downloader needs no second topic; one missing is reported on the content tree.
    #[serde(deserialize_with = "null_as_default")]
    pub datastores: Vec<DatastoreConfig>,
}

eve_number_enum! {
/// A content tree's progress; numbers as EVE's `SwState`.
#[repr(u8)]
pub enum ContentTreeState {
    #[default]
    Initial = 100,
    Downloading = 103,
    Downloaded = 104,
    Verifying = 105,
    Verified = 106,
    Loading = 107,
    /// In the content store, verified: volumes may be made from it.
    Loaded = 108,
}
}

/// downloader → volume-manager, config-agent, cli. Key: the content tree's UUID. Persistent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "ContentTreeStatus", version = 1)]
pub struct ContentTreeStatus {
    #[serde(rename = "ContentID")]
    #[persist(mandatory)]
    pub content_id: Uuid,
    pub display_name: String,
    #[serde(rename = "RelativeURL")]
    pub relative_url: String,
    pub format: ContentFormat,
    pub content_sha256: String,
    pub max_download_size: u64,
    pub generation_counter: i64,
    pub state: ContentTreeState,
    /// When it became LOADED.
    #[serde(with = "go_time")]
    pub create_time: Option<DateTime<Utc>>,
    /// The size the server announced, if any.
    pub total_size: i64,
    /// Bytes downloaded so far (resumed bytes included).
    pub current_size: i64,
    /// 0-100.
    pub progress: u32,
    /// The verified blob (`<persist>/content/blobs/<sha256>`), once LOADED.
    pub file_location: String,
    /// The sha256 of the blobs of the tree, the root first (one blob for an image).
    #[serde(deserialize_with = "null_as_default")]
    pub blobs: Vec<String>,
    /// The last failure; kept while a retry is pending (`ErrorRetryCondition` says when),
    /// cleared once the content is LOADED.
    pub error: ErrorDescription,
}

impl ContentTreeStatus {
    /// Whether a volume may be made from it: LOADED, with no error.
    pub fn is_loaded(&self) -> bool {
        self.state == ContentTreeState::Loaded && !self.error.is_error()
    }
}

impl ContentTreeState {
    /// EVE's name of the state (its `SwState` names): `DOWNLOADING`, `LOADED`, ...
    pub fn name(self) -> &'static str {
        match self {
            ContentTreeState::Initial => "INITIAL",
            ContentTreeState::Downloading => "DOWNLOADING",
            ContentTreeState::Downloaded => "DOWNLOADED",
            ContentTreeState::Verifying => "VERIFYING",
            ContentTreeState::Verified => "VERIFIED",
            ContentTreeState::Loading => "LOADING",
            ContentTreeState::Loaded => "LOADED",
        }
    }
}

crate::topic!(ContentTreeConfig, |c| c.content_id.to_string());

impl crate::Topic for ContentTreeStatus {
    const NAME: &'static str = <Self as cairn_persist::Record>::SCHEMA;
    fn key(&self) -> String {
        self.content_id.to_string()
    }
    fn readout_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        crate::never_as_null(&mut value);
        crate::with_state_name(value, self.state.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eve_field_names_and_numbers_round_trip() {
        let config = ContentTreeConfig {
            content_id: Uuid::from_u128(1),
            datastore_id_list: vec![Uuid::from_u128(2)],
            relative_url: "images/disk.qcow2".into(),
            format: ContentFormat::Qcow2,
            content_sha256: "ab".into(),
            max_download_size: 10,
            ..Default::default()
        };
        let text = serde_json::to_string(&config).unwrap_or_default();
        for name in [
            "\"ContentID\"",
            "\"DatastoreIDList\"",
            "\"RelativeURL\"",
            "\"Format\":3",
            "\"ContentSha256\"",
            "\"MaxDownloadSize\"",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert_eq!(
            serde_json::from_str::<ContentTreeConfig>(&text).ok(),
            Some(config)
        );
        let status = ContentTreeStatus {
            state: ContentTreeState::Loaded,
            ..Default::default()
        };
        let text = serde_json::to_string(&status).unwrap_or_default();
        assert!(text.contains("\"State\":108"), "{text}");
    }
}

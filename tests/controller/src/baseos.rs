//! A base OS update as a stock EVE controller sends it: the bundle on the controller's
//! datastore, one `contentInfo` entry naming it by sha256, and EVE's `baseos` block naming
//! that content tree (`EdgeDevConfig.baseos`, eve-api `config/baseosconfig.proto`).

use cairn_config_agent::proto::{
    BaseOs, ContentTree, DatastoreConfig, DeviceOpsCmd, DsType, EdgeDevConfig, Format,
};
use sha2::{Digest, Sha256};

use crate::datastore::TestDatastore;

/// What to serve and ask for.
#[derive(Debug, Clone)]
pub struct BundleOffer {
    pub datastore_id: String,
    pub content_tree_id: String,
    /// The file's name on the datastore (under `eve/`).
    pub name: String,
    pub version: String,
    pub activate: bool,
    pub retry_counter: u32,
    /// The sha256 the content tree claims; `None`: the bundle's own.
    pub sha256: Option<String>,
}

/// Puts `bundle` on `store` and returns `config` with the datastore, the content tree and the
/// `baseos` block added (a datastore or tree of the same id is replaced).
pub fn offer_bundle(
    store: &TestDatastore,
    offer: &BundleOffer,
    bundle: &[u8],
    mut config: EdgeDevConfig,
) -> EdgeDevConfig {
    store.put(&format!("eve/{}", offer.name), bundle.to_vec());
    let sha = offer.sha256.clone().unwrap_or_else(|| {
        Sha256::digest(bundle)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    config.datastores.retain(|d| d.id != offer.datastore_id);
    config.datastores.push(DatastoreConfig {
        id: offer.datastore_id.clone(),
        d_type: DsType::DsHttps as i32,
        fqdn: store.url(),
        dpath: "eve".into(),
        ds_cert_pem: vec![store.ca_pem().as_bytes().to_vec()],
        ..Default::default()
    });
    config
        .content_info
        .retain(|t| t.uuid != offer.content_tree_id);
    config.content_info.push(ContentTree {
        uuid: offer.content_tree_id.clone(),
        ds_id: offer.datastore_id.clone(),
        url: offer.name.clone(),
        // EVE's controllers send the root image as a raw file or an OCI image; Cairn's bundle
        // is one file.
        iformat: Format::Raw as i32,
        sha256: sha,
        max_size_bytes: bundle.len() as u64 * 2,
        display_name: format!("Cairn {}", offer.version),
        ..Default::default()
    });
    config.baseos = Some(BaseOs {
        content_tree_uuid: offer.content_tree_id.clone(),
        retry_update: Some(DeviceOpsCmd {
            counter: offer.retry_counter,
            ..Default::default()
        }),
        activate: offer.activate,
        base_os_version: offer.version.clone(),
    });
    config
}

//! cairn-downloader: EVE's downloader and verifier in one agent. It takes the config-agent's
//! `ContentTreeConfig`s, downloads each content tree from its HTTP(S) datastore into the
//! content store under `<persist>/content/` (resuming with `Range` after a restart), verifies
//! it against its sha256 before it enters `blobs/`, and publishes `ContentTreeStatus`
//! (persistent) for the volume-manager, the config-agent and the technician. Container images
//! (format CONTAINER) come from `DsContainerRegistry` datastores (`registry.rs`), each of their
//! blobs verified and kept in the same store, or as an OCI image archive from an HTTP(S)
//! datastore (`archive.rs`).

pub mod agent;
pub mod archive;
pub mod fetch;
pub mod registry;
pub mod store;

/// The agent's name on the bus.
pub const AGENT: &str = "downloader";

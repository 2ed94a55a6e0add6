//! Mandatory-field, versioned, checksummed, crash-safe records.
//!
//! A type derives [`Persist`] to declare its schema name, its version and its mandatory fields:
//! [`load`] rejects a record that lacks one (at any depth, with the field's path), accepts unknown
//! fields (a newer writer), refuses a newer writer's record that older builds cannot read right
//! (`readable_from`), defaults missing optional ones, migrates older versions through
//! registered steps, and turns damaged bytes into a [`DecodeError`] instead of a panic. [`store`]
//! replaces a file atomically and durably.
//!
//! This crate does file I/O but is synchronous: async callers run it in `spawn_blocking`.

// Lets the derive's `::cairn_persist::` paths resolve inside this crate's own tests.
extern crate self as cairn_persist;

mod codec;
mod crash;
pub mod digest;
mod error;
mod file;
pub mod schema;

pub use cairn_persist_derive::Persist;
pub use codec::{
    Decoded, Format, Inspected, PLAIN_VERSION, check_mandatory, decode, deserialize_value, encode,
    inspect, is_sound_current,
};
pub use crash::{CRASH_AT_ENV, crash_point};
pub use error::{DecodeError, ErrorKind, PersistError};
pub use file::{
    Loaded, Origin, backup_path, create_dir_durable, load, load_with_backup, remove,
    remove_dir_durable, store, store_unsynced, store_with_backup, sync_dir, write_atomic,
};
pub use schema::{FieldPath, Schema};
// The derive refers to serde_json through this crate so users need not depend on it.
pub use serde_json;

/// A top-level persisted record: a schema name and version, on top of its mandatory fields.
pub trait Record: Schema + serde::Serialize + serde::de::DeserializeOwned {
    /// Stable name stored in every file, checked on load.
    const SCHEMA: &'static str;
    /// The version this build writes. Starts at 1.
    const VERSION: u32;
    /// The oldest version whose builds read a record of `VERSION` right: they ignore the fields
    /// it added. A version that changes what an existing field means raises it to itself, and a
    /// build older than that refuses the record ([`DecodeError::TooNew`]) instead of misreading
    /// it. Stored in the envelope only when above 1.
    const READABLE_FROM: u32 = 1;
    /// Whether a bare JSON object without envelope (as EVE writes it) is accepted, as version 1.
    const PLAIN_IMPORT: bool = false;
    /// Steps that bring version `from` to `from + 1`, one per older version.
    fn migrations() -> &'static [Migration];
}

/// One migration step, applied to the raw JSON record before the mandatory check.
pub struct Migration {
    pub from: u32,
    /// What the step changes, for logs and review.
    pub note: &'static str,
    pub apply: fn(&mut serde_json::Value) -> Result<(), String>,
}

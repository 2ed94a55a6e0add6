//! The on-disk form of a record: a small JSON envelope around the pretty-printed record.
//!
//! ```text
//! {
//!   "schema": "SnapshotInstanceStatus",
//!   "version": 1,
//!   "sha256": "<hex of sha256(schema NUL version NUL record-bytes)>",
//!   "record": { ... }
//! }
//! ```
//!
//! The checksum covers the schema name, the version and the exact bytes of `record` as they stand
//! in the file (read back through `RawValue`), so any altered byte that still parses is caught.
//!
//! A version that older builds cannot read right (it changed what a field means) also stores
//! `"readable_from": N` after `version`, and the checksum then covers `version:N` in place of
//! `version`: a flipped `readable_from` is `Corrupt`, never a record read by the wrong build. A
//! build that predates the key ignores it, computes the plain checksum and refuses the record
//! as `Corrupt`: refused either way.

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::error::DecodeError;
use crate::schema::FieldPath;
use crate::{Record, Schema};

const ENVELOPE_KEYS: [&str; 5] = ["schema", "version", "readable_from", "sha256", "record"];

/// Records without an envelope (written by EVE) are read as this version.
pub const PLAIN_VERSION: u32 = 1;

/// How the bytes were laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Cairn envelope with schema, version and checksum.
    Envelope,
    /// A bare JSON object as EVE writes it: no version, no checksum.
    Plain,
}

/// A record decoded from bytes.
#[derive(Debug)]
pub struct Decoded<T> {
    pub record: T,
    /// The version the writer declared (before migration).
    pub stored_version: u32,
    pub format: Format,
}

/// The schema-independent view of a record: what `cairn record check` reports before it knows
/// the type.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// `None` for a plain (EVE) record.
    pub schema: Option<String>,
    pub version: u32,
    /// The oldest version whose builds read this record right (1 when the envelope has no
    /// `readable_from`, and for a plain record).
    pub readable_from: u32,
    pub format: Format,
    pub record: Value,
}

/// Serializes `record` into its envelope.
pub fn encode<T: Record>(record: &T) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_string_pretty(record)?;
    // JSON strings never hold a raw newline, so every newline is structure and re-indenting
    // nests the record one level inside the envelope.
    let body = body.replace('\n', "\n  ");
    let digest = checksum(T::SCHEMA, T::VERSION, T::READABLE_FROM, body.as_bytes());
    let schema = serde_json::to_string(T::SCHEMA)?;
    let mut out = String::with_capacity(body.len() + 160);
    out.push_str("{\n  \"schema\": ");
    out.push_str(&schema);
    out.push_str(",\n  \"version\": ");
    out.push_str(&T::VERSION.to_string());
    if T::READABLE_FROM > 1 {
        out.push_str(",\n  \"readable_from\": ");
        out.push_str(&T::READABLE_FROM.to_string());
    }
    out.push_str(",\n  \"sha256\": \"");
    out.push_str(&digest);
    out.push_str("\",\n  \"record\": ");
    out.push_str(&body);
    out.push_str("\n}\n");
    Ok(out.into_bytes())
}

/// Decodes `bytes` as a `T`: envelope and checksum, schema name, a newer version this build
/// cannot read right refused, migration of older versions, mandatory fields at every depth,
/// then the typed value.
pub fn decode<T: Record>(bytes: &[u8]) -> Result<Decoded<T>, DecodeError> {
    let inspected = inspect(bytes)?;
    match (&inspected.schema, inspected.format) {
        (Some(found), _) if found != T::SCHEMA => {
            return Err(DecodeError::WrongSchema {
                expected: T::SCHEMA,
                found: found.clone(),
            });
        }
        (None, Format::Plain) if !T::PLAIN_IMPORT => {
            return Err(DecodeError::NotARecord { schema: T::SCHEMA });
        }
        _ => {}
    }
    if inspected.readable_from > T::VERSION {
        return Err(DecodeError::TooNew {
            version: inspected.version,
            readable_from: inspected.readable_from,
            current: T::VERSION,
        });
    }
    let mut value = inspected.record;
    migrate::<T>(&mut value, inspected.version)?;
    check_mandatory::<T>(&value)?;
    let record = deserialize_value(value)?;
    Ok(Decoded {
        record,
        stored_version: inspected.version,
        format: inspected.format,
    })
}

/// Reads the envelope and verifies the checksum without knowing the record's type.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, DecodeError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|err| DecodeError::Malformed {
        line: 1 + bytes[..err.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        column: 0,
        message: format!("not UTF-8 at byte {}", err.valid_up_to()),
    })?;
    let top: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).map_err(|err| {
        if err.classify() == serde_json::error::Category::Data {
            DecodeError::BadEnvelope("the top level is not a JSON object".into())
        } else {
            DecodeError::from_json(&err, bytes.len())
        }
    })?;

    if !ENVELOPE_KEYS.iter().any(|k| top.contains_key(*k)) {
        let record: Value =
            serde_json::from_str(text).map_err(|err| DecodeError::from_json(&err, bytes.len()))?;
        return Ok(Inspected {
            schema: None,
            version: PLAIN_VERSION,
            readable_from: 1,
            format: Format::Plain,
            record,
        });
    }

    let field = |key: &str| {
        top.get(key)
            .ok_or_else(|| DecodeError::BadEnvelope(format!("`{key}` is missing")))
    };
    let schema: String = serde_json::from_str(field("schema")?.get())
        .map_err(|_| DecodeError::BadEnvelope("`schema` is not a string".into()))?;
    let version: u32 = serde_json::from_str(field("version")?.get())
        .map_err(|_| DecodeError::BadEnvelope("`version` is not a whole number".into()))?;
    if version == 0 {
        return Err(DecodeError::BadEnvelope(
            "`version` is 0; versions start at 1".into(),
        ));
    }
    let readable_from = match top.get("readable_from") {
        None => 1,
        Some(raw) => serde_json::from_str::<u32>(raw.get())
            .ok()
            .filter(|from| (1..=version).contains(from))
            .ok_or_else(|| {
                DecodeError::BadEnvelope(format!(
                    "`readable_from` is {}: it must be a version from 1 to the record's {version}",
                    raw.get()
                ))
            })?,
    };
    let stored: String = serde_json::from_str(field("sha256")?.get())
        .map_err(|_| DecodeError::BadEnvelope("`sha256` is not a string".into()))?;
    let raw = field("record")?.get();
    let computed = checksum(&schema, version, readable_from, raw.as_bytes());
    if stored != computed {
        return Err(DecodeError::Corrupt { stored, computed });
    }
    let record: Value =
        serde_json::from_str(raw).map_err(|err| DecodeError::from_json(&err, bytes.len()))?;
    Ok(Inspected {
        schema: Some(schema),
        version,
        readable_from,
        format: Format::Envelope,
        record,
    })
}

/// Whether `bytes` hold a record of `T` exactly as this build writes it: Cairn's envelope naming
/// `T`'s schema at `T::VERSION`, its checksum right. Such bytes came from [`encode`] of a `T`
/// with no byte changed since, so they pass every check of [`decode`] (mandatory fields, typed
/// fields) without the record being parsed: only the envelope is, and the record's bytes hashed.
/// For readers that only ask whether a record is sound (the read-out's look over 10,000
/// snapshot records). `false` says nothing either way: [`decode`] gives the verdict and its
/// reason (a damaged file, a plain EVE record, an older version to migrate, a newer writer).
pub fn is_sound_current<T: Record>(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        schema: &'a str,
        version: u32,
        /// Absent: 1, as [`inspect`] reads it.
        #[serde(default = "first_version")]
        readable_from: u32,
        sha256: &'a str,
        #[serde(borrow)]
        record: &'a RawValue,
    }
    fn first_version() -> u32 {
        1
    }
    // Duplicate keys, escapes in the borrowed strings, a missing key: not the writer's form.
    let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(bytes) else {
        return false;
    };
    envelope.schema == T::SCHEMA
        && envelope.version == T::VERSION
        && (1..=T::VERSION).contains(&envelope.readable_from)
        && hex_equals(
            envelope.sha256,
            &digest(
                T::SCHEMA,
                T::VERSION,
                envelope.readable_from,
                envelope.record.get().as_bytes(),
            ),
        )
}

/// `hex` (lower case, as [`checksum`] writes it) spells `bytes`.
fn hex_equals(hex: &str, bytes: &[u8]) -> bool {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    hex.len() == bytes.len() * 2
        && hex.as_bytes().chunks(2).zip(bytes).all(|(pair, b)| {
            pair[0] == DIGITS[usize::from(b >> 4)] && pair[1] == DIGITS[usize::from(b & 0xf)]
        })
}

/// Brings an older record up to `T::VERSION` through the registered steps, one version at a time.
/// A newer record that this build can read (its `readable_from` is not above `T::VERSION`) is left
/// as it is: its unknown fields are ignored and its mandatory fields checked.
fn migrate<T: Record>(value: &mut Value, stored_version: u32) -> Result<(), DecodeError> {
    let mut version = stored_version;
    while version < T::VERSION {
        let step =
            T::migrations()
                .iter()
                .find(|m| m.from == version)
                .ok_or(DecodeError::NoMigration {
                    from: version,
                    current: T::VERSION,
                })?;
        (step.apply)(value).map_err(|message| DecodeError::MigrationFailed {
            from: version,
            message,
        })?;
        version += 1;
    }
    Ok(())
}

/// Checks every mandatory field of `T` in `value`, naming each missing one by its full path.
pub fn check_mandatory<T: Schema>(value: &Value) -> Result<(), DecodeError> {
    let mut missing = Vec::new();
    T::check_mandatory(value, &mut FieldPath::new(), &mut missing);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::MissingFields(missing))
    }
}

/// Deserializes with the path of a mistyped field in the error.
pub fn deserialize_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        DecodeError::Invalid {
            path: if path == "." { "(record)".into() } else { path },
            message: err.into_inner().to_string(),
        }
    })
}

fn checksum(schema: &str, version: u32, readable_from: u32, record: &[u8]) -> String {
    crate::digest::hex(&digest(schema, version, readable_from, record))
}

fn digest(schema: &str, version: u32, readable_from: u32, record: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(schema.as_bytes());
    hasher.update([0]);
    hasher.update(version.to_string().as_bytes());
    // Absent (1): the bytes every record had before `readable_from` existed.
    if readable_from > 1 {
        hasher.update(format!(":{readable_from}").as_bytes());
    }
    hasher.update([0]);
    hasher.update(record);
    hasher.finalize().into()
}

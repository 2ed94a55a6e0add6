//! Building blocks shared by config and status messages, in EVE's JSON layout.

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An object's UUID and the version of its config (EVE `UUIDandVersion`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default)]
pub struct UUIDandVersion {
    #[serde(rename = "UUID")]
    #[persist(mandatory)]
    pub uuid: Uuid,
    #[serde(rename = "Version")]
    pub version: String,
}

/// A counter the controller increments to ask for an operation (restart, purge, rollback).
/// EVE `AppInstanceOpsCmd`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct AppInstanceOpsCmd {
    pub counter: u32,
    /// Unused by EVE; kept so the field round-trips.
    pub apply_time: String,
}

/// An enum of EVE's that travels as its number (`#[repr]`, serde_repr), ordered by it, with a
/// `#[default]` variant: the derives every such enum needs, in one place.
macro_rules! eve_number_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident $variants:tt) => {
        $(#[$meta])*
        #[derive(
            Debug,
            Clone,
            Copy,
            Default,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            serde_repr::Serialize_repr,
            serde_repr::Deserialize_repr,
            cairn_persist::Persist,
        )]
        $vis enum $name $variants
    };
}
pub(crate) use eve_number_enum;

eve_number_enum! {
    /// How bad an error is; numbers as EVE's `ErrorSeverity` and the API's `info.Severity`.
    #[repr(i32)]
    pub enum ErrorSeverity {
        #[default]
        Unspecified = 0,
        Notice = 1,
        Warning = 2,
        Error = 3,
    }
}

eve_number_enum! {
/// The kind of object an error concerns (EVE `ErrorEntityType`, API `info.Entity`).
#[repr(i32)]
pub enum ErrorEntityType {
    #[default]
    Unspecified = 0,
    BaseOs = 1,
    SystemAdapter = 2,
    Vault = 3,
    Attestation = 4,
    AppInstance = 5,
    Port = 6,
    Network = 7,
    NetworkInstance = 8,
    ContentTree = 9,
    ContentBlob = 10,
    Volume = 11,
}
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ErrorEntity {
    pub entity_type: ErrorEntityType,
    #[serde(rename = "EntityID")]
    pub entity_id: String,
}

/// An error with its severity and time (EVE `ErrorDescription`). An empty `error` means none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ErrorDescription {
    pub error: String,
    #[serde(with = "go_time")]
    pub error_time: Option<DateTime<Utc>>,
    pub error_severity: ErrorSeverity,
    pub error_retry_condition: String,
    #[serde(deserialize_with = "null_as_default")]
    pub error_entities: Vec<ErrorEntity>,
}

impl ErrorDescription {
    /// An error of `severity` that happened at `time`.
    pub fn new(error: impl Into<String>, severity: ErrorSeverity, time: DateTime<Utc>) -> Self {
        Self {
            error: error.into(),
            error_time: Some(time),
            error_severity: severity,
            ..Self::default()
        }
    }

    /// Adds the object the error concerns.
    pub fn about(mut self, entity_type: ErrorEntityType, entity_id: impl ToString) -> Self {
        self.error_entities.push(ErrorEntity {
            entity_type,
            entity_id: entity_id.to_string(),
        });
        self
    }

    pub fn is_error(&self) -> bool {
        !self.error.is_empty()
    }
}

/// Go's `encoding/json` writes a nil slice as `null`; read it as empty.
pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Optional times in Go's layout: absent is Go's zero time `0001-01-01T00:00:00Z`, which EVE
/// writes for "never"; present is RFC 3339 with up to nanoseconds.
pub mod go_time {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

    pub fn serialize<S: Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(t) => serializer.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => serializer.serialize_str(GO_ZERO_TIME),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else {
            return Ok(None);
        };
        let time = DateTime::parse_from_rfc3339(&text)
            .map_err(|e| {
                serde::de::Error::custom(format!("`{text}` is not an RFC 3339 time: {e}"))
            })?
            .with_timezone(&Utc);
        // Anything in year 1 is Go's zero time, whatever its offset.
        if time.timestamp() <= -62_135_596_800 + 86_400 {
            return Ok(None);
        }
        Ok(Some(time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Timed {
        #[serde(with = "go_time")]
        at: Option<DateTime<Utc>>,
    }

    #[test]
    fn go_zero_time_reads_as_none_and_none_writes_as_go_zero_time() {
        let parsed: Timed = serde_json::from_str(r#"{"at":"0001-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(parsed.at, None);
        assert_eq!(
            serde_json::to_string(&Timed { at: None }).unwrap(),
            r#"{"at":"0001-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn go_nanosecond_times_with_offsets_round_trip() {
        let parsed: Timed =
            serde_json::from_str(r#"{"at":"2024-03-01T12:00:00.123456789+02:00"}"#).unwrap();
        let at = parsed.at.unwrap();
        assert_eq!(at.to_rfc3339(), "2024-03-01T10:00:00.123456789+00:00");
        let again: Timed = serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(again.at, Some(at));
    }

    #[test]
    fn go_nil_slice_reads_as_empty() {
        let parsed: ErrorDescription =
            serde_json::from_str(r#"{"Error":"x","ErrorEntities":null}"#).unwrap();
        assert!(parsed.error_entities.is_empty());
        assert!(parsed.is_error());
    }
}

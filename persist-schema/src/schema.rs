//! The mandatory-field walk: each type knows which of its keys must be present, and recurses into
//! nested structs, `Vec` elements, map values and flattened structs so that the error names the
//! full path (`Snapshot.SnapshotID`, `VolumeRefs[2].UUID`, `Volumes["a"].Path`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

use serde_json::{Map, Value};

/// Implemented by `#[derive(Persist)]`; leaf types (numbers, strings, UUIDs, times) have nothing
/// to check.
pub trait Schema {
    /// Appends to `missing` the path of every mandatory field that `value` lacks (a `null`
    /// counts as missing). Values of the wrong JSON type are left to deserialization.
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>);
}

/// Finds a field by its serde key or one of its aliases. `null` is treated as absent so that a
/// mandatory field cannot be satisfied by an explicit `null`.
pub fn lookup<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    aliases: &[&str],
) -> Option<&'a Value> {
    std::iter::once(key)
        .chain(aliases.iter().copied())
        .filter_map(|k| object.get(k))
        .find(|v| !v.is_null())
}

/// The position of a value inside a record, rendered as `A.B[3].C` or `Map["key"].D`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
    MapKey(String),
}

impl FieldPath {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push_key(&mut self, key: &str) {
        self.segments.push(Segment::Key(key.to_string()));
    }

    pub fn push_index(&mut self, index: usize) {
        self.segments.push(Segment::Index(index));
    }

    pub fn push_map_key(&mut self, key: &str) {
        self.segments.push(Segment::MapKey(key.to_string()));
    }

    pub fn pop(&mut self) {
        self.segments.pop();
    }

    /// The rendering of this path extended by `key`, without changing the path.
    pub fn child(&self, key: &str) -> String {
        let mut child = self.clone();
        child.push_key(key);
        child.to_string()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::MapKey(key) => write!(f, "[{key:?}]")?,
            }
        }
        Ok(())
    }
}

macro_rules! leaf_schema {
    ($($ty:ty),* $(,)?) => {
        $(impl Schema for $ty {
            fn check_mandatory(_: &Value, _: &mut FieldPath, _: &mut Vec<String>) {}
        })*
    };
}

leaf_schema!(
    (),
    bool,
    char,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    f32,
    f64,
    String,
    Value,
    std::path::PathBuf,
    std::net::IpAddr,
    std::net::SocketAddr,
    std::time::Duration,
    uuid::Uuid,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::FixedOffset>,
    chrono::NaiveDateTime,
);

impl<T: Schema> Schema for Option<T> {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        if !value.is_null() {
            T::check_mandatory(value, path, missing);
        }
    }
}

impl<T: Schema + ?Sized> Schema for Box<T> {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        T::check_mandatory(value, path, missing);
    }
}

fn check_elements<T: Schema>(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
    if let Some(items) = value.as_array() {
        for (index, item) in items.iter().enumerate() {
            path.push_index(index);
            T::check_mandatory(item, path, missing);
            path.pop();
        }
    }
}

fn check_map_values<T: Schema>(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
    if let Some(object) = value.as_object() {
        for (key, item) in object {
            path.push_map_key(key);
            T::check_mandatory(item, path, missing);
            path.pop();
        }
    }
}

macro_rules! sequence_schema {
    ($($ty:ident),*) => {
        $(impl<T: Schema> Schema for $ty<T> {
            fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
                check_elements::<T>(value, path, missing);
            }
        })*
    };
}

sequence_schema!(Vec, VecDeque, BTreeSet, HashSet);

impl<T: Schema, const N: usize> Schema for [T; N] {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        check_elements::<T>(value, path, missing);
    }
}

impl<K, V: Schema> Schema for BTreeMap<K, V> {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        check_map_values::<V>(value, path, missing);
    }
}

impl<K, V: Schema, S> Schema for HashMap<K, V, S> {
    fn check_mandatory(value: &Value, path: &mut FieldPath, missing: &mut Vec<String>) {
        check_map_values::<V>(value, path, missing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_renders_keys_indices_and_map_keys() {
        let mut path = FieldPath::new();
        path.push_key("VolumeRefs");
        path.push_index(2);
        assert_eq!(path.child("UUID"), "VolumeRefs[2].UUID");
        path.pop();
        path.pop();
        path.push_key("Volumes");
        path.push_map_key("a.b");
        assert_eq!(path.child("Path"), "Volumes[\"a.b\"].Path");
    }

    #[test]
    fn explicit_null_does_not_satisfy_lookup() {
        let object = serde_json::json!({"A": null, "B": 1});
        let object = object.as_object().expect("object");
        assert!(lookup(object, "A", &[]).is_none());
        assert_eq!(lookup(object, "Old", &["B"]), Some(&Value::from(1)));
    }
}

//! Property tests: any value round-trips through encode/decode, and no input bytes — random,
//! or a valid record damaged at random — make decoding panic or pass damage off as valid.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use cairn_persist::{DecodeError, Persist, decode, encode, inspect};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
struct Part {
    #[persist(mandatory)]
    id: String,
    size: u64,
    ratio: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "Whole", version = 2, plain_import)]
struct Whole {
    #[persist(mandatory)]
    name: String,
    parts: Vec<Part>,
    by_name: BTreeMap<String, Part>,
    flag: bool,
    note: Option<String>,
}

fn part() -> impl Strategy<Value = Part> {
    (".{0,12}", any::<u64>(), any::<Option<i32>>()).prop_map(|(id, size, ratio)| Part {
        id,
        size,
        ratio,
    })
}

fn whole() -> impl Strategy<Value = Whole> {
    (
        "\\PC{0,24}",
        prop::collection::vec(part(), 0..5),
        prop::collection::btree_map("[a-z\"\\\\.]{0,6}", part(), 0..4),
        any::<bool>(),
        prop::option::of("\\PC{0,40}"),
    )
        .prop_map(|(name, parts, by_name, flag, note)| Whole {
            name,
            parts,
            by_name,
            flag,
            note,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_record_round_trips(value in whole()) {
        let bytes = encode(&value).unwrap();
        let decoded = decode::<Whole>(&bytes).unwrap();
        prop_assert_eq!(decoded.record, value);
        prop_assert_eq!(decoded.stored_version, 2);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Whole>(&bytes);
        let _ = inspect(&bytes);
    }

    #[test]
    fn arbitrary_json_text_never_panics(text in "[{}\\[\\]\":,0-9a-z \n]{0,200}") {
        let _ = decode::<Whole>(text.as_bytes());
    }

    #[test]
    fn a_damaged_record_is_never_taken_for_a_different_value(
        value in whole(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let original = encode(&value).unwrap();
        let mut bytes = original.clone();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.insert(i, byte); }
                _ => { bytes.truncate(i); }
            }
        }
        match decode::<Whole>(&bytes) {
            // Only edits outside the checksummed parts (envelope whitespace) may still load,
            // and then they must give back exactly the stored value.
            Ok(decoded) => prop_assert_eq!(decoded.record, value),
            Err(DecodeError::MissingFields(_)) | Err(DecodeError::Invalid { .. }) => {
                prop_assert!(false, "damage reached the record without failing the checksum");
            }
            Err(_) => {}
        }
    }
}

/// The same record under an older version number: what a build before a migration wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "Whole", version = 1)]
struct WholeV1 {
    #[persist(mandatory)]
    name: String,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The cheap check says sound for what `encode` wrote, and never for bytes `decode`
    /// refuses, whatever byte was damaged: it may only skip work, never pass damage.
    #[test]
    fn the_cheap_check_passes_only_what_decode_passes(
        value in whole(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let bytes = encode(&value).unwrap();
        prop_assert!(cairn_persist::is_sound_current::<Whole>(&bytes));
        let mut damaged = bytes.clone();
        let i = at.index(damaged.len());
        damaged[i] ^= flip;
        if cairn_persist::is_sound_current::<Whole>(&damaged) {
            prop_assert!(decode::<Whole>(&damaged).is_ok());
        }
    }
}

#[test]
fn the_cheap_check_leaves_plain_older_and_other_records_to_decode() {
    let value = Whole {
        name: "n".into(),
        ..Default::default()
    };
    let plain = serde_json::to_vec(&value).unwrap();
    assert!(!cairn_persist::is_sound_current::<Whole>(&plain));
    let older = encode(&WholeV1 { name: "n".into() }).unwrap();
    assert!(!cairn_persist::is_sound_current::<Whole>(&older));
    let mut renamed = String::from_utf8(encode(&value).unwrap()).unwrap();
    renamed = renamed.replacen("\"Whole\"", "\"Other\"", 1);
    assert!(!cairn_persist::is_sound_current::<Whole>(
        renamed.as_bytes()
    ));
}

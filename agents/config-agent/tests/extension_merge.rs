//! build.rs's merge of Cairn's extension fields into EVE's messages (`build/merge.rs`): the
//! fields land in EVE's message, and a Cairn field that could clash with EVE's is refused with
//! an error naming it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

#[path = "../build/merge.rs"]
mod merge;

use prost_types::FileDescriptorSet;

const EVE: &str = r#"
syntax = "proto3";
package org.lfedge.eve.test;
message Part { string b = 1; }
message Thing {
  string a = 1;
  repeated Part parts = 2;
  string eve_later = 1005;  // EVE took a number from 1000 up
}
"#;

/// Compiles a fake EVE file and a Cairn file holding `cairn` (after the `extends` option's
/// declaration), then merges.
fn merged(cairn: &str) -> (FileDescriptorSet, Result<Vec<String>, merge::MergeError>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("eve")).unwrap();
    std::fs::create_dir_all(dir.path().join("cairn")).unwrap();
    std::fs::write(dir.path().join("eve/thing.proto"), EVE).unwrap();
    let header = r#"
syntax = "proto3";
package cairn;
import "google/protobuf/descriptor.proto";
import "eve/thing.proto";
extend google.protobuf.MessageOptions { string extends = 51000; }
"#;
    std::fs::write(
        dir.path().join("cairn/extensions.proto"),
        format!("{header}{cairn}"),
    )
    .unwrap();
    let mut compiler = protox::Compiler::new([dir.path()]).unwrap();
    compiler.include_imports(true);
    compiler
        .open_file(dir.path().join("cairn/extensions.proto"))
        .unwrap();
    let pool = compiler.descriptor_pool();
    let mut fds = compiler.file_descriptor_set();
    let result = merge::merge_cairn_fields(&pool, &mut fds, "cairn/extensions.proto");
    (fds, result)
}

fn refused(cairn: &str) -> String {
    let (_, result) = merged(cairn);
    match result {
        Err(e) => e.to_string(),
        Ok(extended) => panic!("merged into {extended:?}: {cairn}"),
    }
}

#[test]
fn cairn_fields_land_in_eves_message_and_the_marker_message_goes() {
    let (fds, result) = merged(
        r#"
message ThingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Thing";
  string cairn_x = 1000;
  CairnOwn cairn_own = 1001;
}
message CairnOwn { repeated string y = 1; }
"#,
    );
    assert_eq!(result, Ok(vec!["org.lfedge.eve.test.Thing".to_string()]));
    let thing = fds
        .file
        .iter()
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "Thing")
        .unwrap();
    let fields: Vec<(&str, i32)> = thing.field.iter().map(|f| (f.name(), f.number())).collect();
    assert_eq!(
        fields,
        [
            ("a", 1),
            ("parts", 2),
            ("eve_later", 1005),
            ("cairn_x", 1000),
            ("cairn_own", 1001)
        ]
    );
    assert_eq!(thing.field[4].type_name(), ".cairn.CairnOwn");
    let cairn = fds
        .file
        .iter()
        .find(|f| f.name() == "cairn/extensions.proto")
        .unwrap();
    let own: Vec<&str> = cairn.message_type.iter().map(|m| m.name()).collect();
    assert_eq!(own, ["CairnOwn"]);
}

#[test]
fn a_cairn_field_below_1000_is_refused() {
    let e = refused(
        r#"message ThingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Thing";
  string cairn_x = 7;
}"#,
    );
    assert!(e.contains("ThingFields.cairn_x = 7"), "{e}");
    assert!(e.contains("numbered from 1000"), "{e}");
}

#[test]
fn a_number_eve_uses_is_refused() {
    let e = refused(
        r#"message ThingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Thing";
  string cairn_x = 1005;
}"#,
    );
    assert!(e.contains("ThingFields.cairn_x = 1005"), "{e}");
    assert!(e.contains("already has field eve_later = 1005"), "{e}");
}

#[test]
fn a_name_eve_uses_is_refused() {
    let e = refused(
        r#"message ThingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Thing";
  string a = 1000;
}"#,
    );
    assert!(e.contains("ThingFields.a = 1000"), "{e}");
    assert!(e.contains("already has a field named a (= 1)"), "{e}");
}

#[test]
fn an_unknown_eve_message_is_refused() {
    let e = refused(
        r#"message NothingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Nothing";
  string cairn_x = 1000;
}"#,
    );
    assert!(
        e.contains("NothingFields extends org.lfedge.eve.test.Nothing, which EVE does not have"),
        "{e}"
    );
}

#[test]
fn a_map_in_an_extending_message_is_refused() {
    // A map's entry type is nested in the marker message, which the merge drops.
    let e = refused(
        r#"message ThingFields {
  option (cairn.extends) = "org.lfedge.eve.test.Thing";
  map<string, string> cairn_env = 1000;
}"#,
    );
    assert!(e.contains("ThingFields: a message extending"), "{e}");
    assert!(e.contains("no map, oneof or nested type"), "{e}");
}

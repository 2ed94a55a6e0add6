//! Merges Cairn's extension fields into EVE's message descriptors (see
//! `proto/cairn/extensions.proto` for the design). Shared by build.rs and
//! `tests/extension_merge.rs`.

use std::collections::BTreeMap;
use std::fmt;

use prost_reflect::{DescriptorPool, Value};
use prost_types::{DescriptorProto, FileDescriptorSet};

/// The message option naming the EVE message an extension message's fields are merged into.
pub const EXTENDS: &str = "cairn.extends";
/// Field numbers from here up are Cairn's; an EVE controller never sends them.
pub const FIRST_CAIRN_FIELD: i32 = 1000;

/// Why Cairn's extensions cannot be merged, naming the Cairn message or field at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct MergeError(pub String);

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MergeError {}

fn fault(message: String) -> MergeError {
    MergeError(message)
}

/// In `fds` (compiled from EVE's files and `cairn_file`, `pool` the same as descriptors): moves
/// the fields of each message of `cairn_file` marked `(cairn.extends) = "<EVE message>"` into
/// that EVE message and drops the marked message; Cairn's other messages stay in `cairn_file`.
/// Returns the EVE messages extended, by full name.
pub fn merge_cairn_fields(
    pool: &DescriptorPool,
    fds: &mut FileDescriptorSet,
    cairn_file: &str,
) -> Result<Vec<String>, MergeError> {
    let extends = pool.get_extension_by_name(EXTENDS).ok_or_else(|| {
        fault(format!(
            "{cairn_file} does not declare the option {EXTENDS}"
        ))
    })?;
    // EVE message full name → the name of Cairn's message holding the fields to merge.
    let mut merges: BTreeMap<String, String> = BTreeMap::new();
    for message in pool.all_messages() {
        if message.parent_file().name() != cairn_file {
            continue;
        }
        let options = message.options();
        if !options.has_extension(&extends) {
            continue;
        }
        let Value::String(target) = options.get_extension(&extends).into_owned() else {
            return Err(fault(format!(
                "{}: {EXTENDS} is not a string",
                message.full_name()
            )));
        };
        if let Some(other) = merges.insert(target.clone(), message.name().to_string()) {
            return Err(fault(format!(
                "{} and {other} both extend {target}: one message per EVE message",
                message.name()
            )));
        }
    }

    // Take the marked messages out of Cairn's file, then merge their fields into EVE's.
    let cairn = fds
        .file
        .iter_mut()
        .find(|f| f.name() == cairn_file)
        .ok_or_else(|| fault(format!("{cairn_file} is not in the descriptor set")))?;
    let (marked, own): (Vec<DescriptorProto>, Vec<DescriptorProto>) =
        std::mem::take(&mut cairn.message_type)
            .into_iter()
            .partition(|m| merges.values().any(|name| name == m.name()));
    cairn.message_type = own;
    // The option's declaration is for protox only; prost-build has no use for it.
    cairn.extension.clear();

    for (target, name) in &merges {
        let added = marked.iter().find(|m| m.name() == name).ok_or_else(|| {
            fault(format!(
                "{name} must be a top-level message of {cairn_file}"
            ))
        })?;
        // A nested type (a map's entry too) or a oneof would refer to the dropped message.
        if !added.nested_type.is_empty()
            || !added.enum_type.is_empty()
            || !added.oneof_decl.is_empty()
        {
            return Err(fault(format!(
                "{name}: a message extending {target} holds fields only (no map, oneof or \
                 nested type; declare those as Cairn's own messages)"
            )));
        }
        let message = find_message(fds, target)
            .ok_or_else(|| fault(format!("{name} extends {target}, which EVE does not have")))?;
        for field in &added.field {
            let at = format!("{name}.{} = {}", field.name(), field.number());
            if field.number() < FIRST_CAIRN_FIELD {
                return Err(fault(format!(
                    "{at}: Cairn's fields of {target} are numbered from {FIRST_CAIRN_FIELD}"
                )));
            }
            if let Some(eve) = message.field.iter().find(|f| f.number() == field.number()) {
                return Err(fault(format!(
                    "{at}: {target} already has field {} = {}; give Cairn's field the next free \
                     number from {FIRST_CAIRN_FIELD}",
                    eve.name(),
                    eve.number()
                )));
            }
            if let Some(eve) = message.field.iter().find(|f| f.name() == field.name()) {
                return Err(fault(format!(
                    "{at}: {target} already has a field named {} (= {}); name Cairn's field \
                     cairn_<what it is>",
                    eve.name(),
                    eve.number()
                )));
            }
            message.field.push(field.clone());
        }
    }
    Ok(merges.into_keys().collect())
}

/// The top-level message `full_name` (`package.Message`) in `fds`.
fn find_message<'a>(
    fds: &'a mut FileDescriptorSet,
    full_name: &str,
) -> Option<&'a mut DescriptorProto> {
    fds.file.iter_mut().find_map(|file| {
        let package = file.package().to_string();
        file.message_type
            .iter_mut()
            .find(|m| format!("{package}.{}", m.name()) == full_name)
    })
}

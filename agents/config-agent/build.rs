//! Generates EVE's API v2 types from eve-api's own `.proto` files (`proto/eve/`) with Cairn's
//! extension fields (`proto/cairn/extensions.proto`) merged into EVE's messages; see that file's
//! header for why merging and not overlay messages. Pure Rust: protox compiles the `.proto`
//! files, prost-build writes the code; no protoc is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::path::PathBuf;

use prost_reflect::Value;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// EVE's files Cairn generates types for (their imports come along).
const EVE_FILES: &[&str] = &[
    "auth/auth.proto",
    "register/register.proto",
    "eveuuid/eveuuid.proto",
    "certs/certs.proto",
    "config/devconfig.proto",
    "config/appconfig.proto",
    "config/storage.proto",
    "config/vm.proto",
    "config/netconfig.proto",
    "config/devcommon.proto",
    "config/baseosconfig.proto",
    "evecommon/acipherinfo.proto",
    "evecommon/evecommon.proto",
    "info/info.proto",
    "metrics/metrics.proto",
    "logs/log.proto",
];
const CAIRN_FILE: &str = "cairn/extensions.proto";
/// The message option naming the EVE message an extension message's fields are merged into.
const EXTENDS: &str = "cairn.extends";
/// Field numbers from here up are Cairn's; an EVE controller never sends them.
const FIRST_CAIRN_FIELD: i32 = 1000;

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let eve_root = root.join("eve");

    let mut compiler = protox::Compiler::new([&eve_root, &root])?;
    compiler.include_imports(true);
    compiler.open_files(EVE_FILES.iter().map(|f| eve_root.join(f)))?;
    compiler.open_file(root.join(CAIRN_FILE))?;
    let pool = compiler.descriptor_pool();
    let mut fds = compiler.file_descriptor_set();

    let extends = pool
        .get_extension_by_name(EXTENDS)
        .ok_or_else(|| format!("{CAIRN_FILE} does not declare the option {EXTENDS}"))?;
    // EVE message full name → Cairn's extension message (its fields to merge).
    let mut merges: BTreeMap<String, String> = BTreeMap::new();
    for message in pool.all_messages() {
        if message.parent_file().name() != CAIRN_FILE {
            continue;
        }
        let options = message.options();
        if !options.has_extension(&extends) {
            continue;
        }
        let Value::String(target) = options.get_extension(&extends).into_owned() else {
            return Err(format!("{}: {EXTENDS} is not a string", message.full_name()).into());
        };
        if merges
            .insert(target.clone(), message.name().to_string())
            .is_some()
        {
            return Err(format!("two Cairn messages extend {target}").into());
        }
    }

    // Take the extension messages out of Cairn's file, then merge their fields into EVE's.
    let cairn = fds
        .file
        .iter_mut()
        .find(|f| f.name() == CAIRN_FILE)
        .ok_or("Cairn's file is not in the descriptor set")?;
    let (fields, own): (Vec<DescriptorProto>, Vec<DescriptorProto>) =
        std::mem::take(&mut cairn.message_type)
            .into_iter()
            .partition(|m| merges.values().any(|name| name == m.name()));
    cairn.message_type = own;
    cairn.extension.clear();
    cairn
        .dependency
        .retain(|d| !d.starts_with("google/protobuf/"));

    for (target, name) in &merges {
        let added = fields
            .iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| format!("Cairn message {name} vanished"))?;
        let message = find_message(&mut fds, target)
            .ok_or_else(|| format!("{name} extends {target}, which EVE does not have"))?;
        let numbers: BTreeSet<i32> = message.field.iter().map(|f| f.number()).collect();
        let names: BTreeSet<&str> = message.field.iter().map(|f| f.name()).collect();
        for field in &added.field {
            if field.number() < FIRST_CAIRN_FIELD
                || numbers.contains(&field.number())
                || names.contains(field.name())
            {
                return Err(format!(
                    "{name}.{} = {}: Cairn's fields of {target} need a number >= \
                     {FIRST_CAIRN_FIELD} and a name and number EVE's message does not use",
                    field.name(),
                    field.number()
                )
                .into());
            }
        }
        message.field.extend(added.field.iter().cloned());
    }

    // protoc-gen-validate's options (register.proto) do not change the wire: no code for them.
    // protobuf's own files stay, prost-build resolves their types to prost-types.
    fds.file.retain(|f| f.package() != "validate");
    prost_build::Config::new()
        .include_file("eve.rs")
        .compile_fds(fds)?;
    Ok(())
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

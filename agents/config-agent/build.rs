//! Generates EVE's API v2 types from eve-api's own `.proto` files (`proto/eve/`) with Cairn's
//! extension fields (`proto/cairn/extensions.proto`) merged into EVE's messages; see that file's
//! header for why merging and not overlay messages. Pure Rust: protox compiles the `.proto`
//! files, prost-build writes the code; no protoc is needed.

use std::error::Error;
use std::path::PathBuf;

#[path = "build/merge.rs"]
mod merge;

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

    merge::merge_cairn_fields(&pool, &mut fds, CAIRN_FILE)?;

    // protoc-gen-validate's options (register.proto) do not change the wire: no code for them.
    // protobuf's own files stay, prost-build resolves their types to prost-types.
    fds.file.retain(|f| f.package() != "validate");
    prost_build::Config::new()
        .include_file("eve.rs")
        .compile_fds(fds)?;
    Ok(())
}

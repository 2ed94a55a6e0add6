//! `cairn export`, `verify` and `import` as processes against a device started with `cairn up`.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::time::Duration;

use cairn_pubsub::{Bus, PublishOptions};
use cairn_types::export::ExportConfig;
use common::*;
use nix::sys::signal::Signal;

#[test]
fn export_of_an_unknown_snapshot_is_refused_writing_nothing() {
    let mut up = Up::start(&[]);
    up.wait_status(Duration::from_secs(60), demo_ready);
    let target = up.path().join("exports");
    std::fs::create_dir(&target).unwrap();
    let target_arg = target.to_str().unwrap();

    let unknown = "0000000a-0000-4000-8000-00000000dead";
    let (code, _, err) = up.cairn(&["export", unknown, "--to", target_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(unknown) && err.contains("not available"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    // Not an export: verify and import say so.
    let (code, _, err) = up.cairn(&["verify", target_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("manifest.json cannot be read"), "{err}");
    let (code, _, err) = up.cairn(&["import", target_arg, "--print-config"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a complete export"), "{err}");

    let status = up.stop(Signal::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_second_export_at_the_same_time_is_refused_with_a_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Another `cairn export` holds the request topic.
    let bus = Bus::new("cli", root.path().join("run"), root.path().join("persist"));
    let _held = runtime
        .block_on(bus.publish::<ExportConfig>(PublishOptions::default()))
        .unwrap();
    let (code, _, err) = cairn(
        root.path(),
        &[
            "export",
            DEMO_SNAPSHOT,
            "--to",
            root.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another `cairn export` or `cairn verify` is running"),
        "{err}"
    );
}

//! Issue 22 item 4 across the real agents, against the test controller and a real SeaweedFS:
//! the controller asks for an export of a snapshot (`cairn_export_requests`) and sees the job
//! in `ZInfoApp.cairn_exports` (state, bytes, last success, the export's key); the app's
//! snapshot policy exports each scheduled snapshot (`cairn_export`): a full export, then an
//! incremental one over it, then a full one again (`full_every` 2).
//!
//! The schedule runs under the app-manager's injected clock (`CAIRN_TEST_CLOCK`: an hour every
//! 10 s of real time) so the test sees several scheduled snapshots in under a minute.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::time::Duration;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, CairnDomain, CairnExportRequest, CairnRemote,
    CairnRetention, CairnScheduledExport, EdgeDevConfig, SnapshotConfig, SnapshotDesc,
    UuidAndVersion, Volume, VolumeRef,
};
use cairn_e2e::Device;
use cairn_objstore::seaweedfs::{SECRET_KEY, SeaweedFs};
use cairn_test_controller::TestController;
use cairn_types::export::{ExportKind, ExportManifest, MANIFEST_FILE};

const SERIAL: &str = "CAIRN-TEST-EXPORTS";
const APP: &str = "e2e0e590-0000-4000-8000-00000000a022";
const VOLUME: &str = "e2e0e590-0000-4000-8000-00000000b022";
const SNAPSHOT: &str = "e2e0e590-0000-4000-8000-00000000c022";
const JOB: &str = "e2e0e590-0000-4000-8000-00000000d022";
const BUCKET: &str = "backups";
const PREFIX: &str = "fleet/dev-1";

/// A process app on a qcow2 volume: one snapshot asked for and exported on request, and a
/// schedule whose snapshots are exported too.
fn config(server: &SeaweedFs) -> EdgeDevConfig {
    EdgeDevConfig {
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: "1".into(),
            }),
            displayname: "exported".into(),
            activate: true,
            volume_ref_list: vec![VolumeRef {
                uuid: VOLUME.into(),
                ..Default::default()
            }],
            snapshot: Some(SnapshotConfig {
                max_snapshots: 8,
                snapshots: vec![SnapshotDesc {
                    id: SNAPSHOT.into(),
                    r#type: proto::SnapshotType::Immediate as i32,
                    ..Default::default()
                }],
                cairn_schedule: "@hourly".into(),
                cairn_retention: Some(CairnRetention {
                    keep_last: 4,
                    ..Default::default()
                }),
                cairn_export: Some(CairnScheduledExport {
                    remote: "backups".into(),
                    prefix: "sched".into(),
                    full_every: 2,
                    keep_exports: 0,
                }),
                ..Default::default()
            }),
            cairn_domain: Some(CairnDomain {
                kind: "process".into(),
                command: "/bin/sh".into(),
                args: vec!["-c".into(), "while :; do sleep 1; done".into()],
                ..Default::default()
            }),
            cairn_export_requests: vec![CairnExportRequest {
                id: JOB.into(),
                snapshot: SNAPSHOT.into(),
                remote: "backups".into(),
                prefix: "asked".into(),
                incremental: false,
            }],
            ..Default::default()
        }],
        volumes: vec![Volume {
            uuid: VOLUME.into(),
            maxsizebytes: 16 << 20,
            display_name: "data".into(),
            cairn_format: "qcow2".into(),
            ..Default::default()
        }],
        cairn_remotes: vec![CairnRemote {
            id: "backups".into(),
            endpoint: server.endpoint(),
            bucket: BUCKET.into(),
            prefix: PREFIX.into(),
            credentials_file: "s3.json".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The complete exports under `PREFIX/sub`, oldest first, by their manifests.
fn manifests(server: &SeaweedFs, sub: &str, dir: &std::path::Path) -> Vec<ExportManifest> {
    let mut out = Vec::new();
    for key in server.keys(BUCKET) {
        if !(key.starts_with(&format!("{PREFIX}/{sub}/")) && key.ends_with(MANIFEST_FILE)) {
            continue;
        }
        let file = dir.join("manifest.json");
        let (code, body) = server.curl(
            "GET",
            &format!("{BUCKET}/{key}"),
            &["-o", file.to_str().unwrap()],
        );
        assert_eq!(code, 200, "{key}: {body}");
        out.push(serde_json::from_slice::<ExportManifest>(&std::fs::read(&file).unwrap()).unwrap());
    }
    out.sort_by_key(|m| m.export_time);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_sees_its_requested_export_and_scheduled_snapshots_go_full_then_incremental()
{
    let server = SeaweedFs::start();
    server.create_bucket(BUCKET);
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    server.write_credentials(&device.persist_dir(), "s3.json", SECRET_KEY);
    device.set_agent_env(
        "app-manager",
        "CAIRN_TEST_CLOCK",
        "2026-05-04T10:00:00Zx360",
    );
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(["--config-interval-ms", "200", "--retry-ms", "100"].map(String::from));
    device.follow_controller(args);
    controller.set_config(SERIAL, config(&server));
    device.start_all();

    // The requested export, as the controller sees it.
    let reported = controller
        .wait_for(
            SERIAL,
            Duration::from_secs(120),
            "the requested export done in ZInfoApp",
            |d| {
                d.apps().get(APP).is_some_and(|a| {
                    a.cairn_exports
                        .iter()
                        .any(|j| j.id == JOB && j.state == "DONE")
                })
            },
        )
        .await
        .unwrap();
    let app = &reported.apps()[APP];
    let job = app.cairn_exports.iter().find(|j| j.id == JOB).unwrap();
    assert_eq!(job.snapshot, SNAPSHOT);
    assert!(
        job.export
            .starts_with(&format!("backups:{PREFIX}/asked/{APP}-{SNAPSHOT}-")),
        "{job:?}"
    );
    assert!(
        job.last_success.as_ref().is_some_and(|t| t.seconds > 0),
        "{job:?}"
    );
    assert!(job.bytes_total > 0 && job.bytes_uploaded > 0, "{job:?}");
    assert!(job.error.is_empty(), "{job:?}");
    let key = job.export.strip_prefix("backups:").unwrap();
    assert!(
        server
            .keys(BUCKET)
            .contains(&format!("{key}/{MANIFEST_FILE}")),
        "{:?}",
        server.keys(BUCKET)
    );

    // Scheduled snapshots: three exports, each reported; full, incremental over it, full.
    let reported = controller
        .wait_for(
            SERIAL,
            Duration::from_secs(180),
            "three scheduled exports done",
            |d| {
                d.apps().get(APP).is_some_and(|a| {
                    a.cairn_exports
                        .iter()
                        .filter(|j| j.id != JOB && j.state == "DONE")
                        .count()
                        >= 3
                })
            },
        )
        .await
        .unwrap();
    let scheduled: Vec<_> = reported.apps()[APP]
        .cairn_exports
        .iter()
        .filter(|j| j.id != JOB && j.state == "DONE")
        .cloned()
        .collect();
    assert!(
        scheduled
            .iter()
            .all(|j| j.export.starts_with(&format!("backups:{PREFIX}/sched/"))),
        "{scheduled:?}"
    );
    let found = manifests(&server, "sched", device.root.path());
    assert!(found.len() >= 3, "{} exports", found.len());
    let kinds: Vec<ExportKind> = found.iter().take(3).map(|m| m.volumes[0].kind).collect();
    assert_eq!(
        kinds,
        [ExportKind::Full, ExportKind::Incremental, ExportKind::Full],
        "{:?}",
        found.iter().map(|m| &m.volumes).collect::<Vec<_>>()
    );
    assert!(server.multipart_uploads(BUCKET).is_empty());
}

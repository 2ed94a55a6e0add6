//! The config-agent against the test controller over real HTTPS (issue 7): EVE's sequence
//! (certs → register → uuid → config → info), a snapshot request reaching `AppInstanceConfig`,
//! app status reaching the controller as `ZInfoApp`, the checkpoint in force when the controller
//! is down at boot, and every kind of bad answer refused with the last good config kept whole.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, CairnDomain, EdgeDevConfig, InstanceOpsCmd,
    SnapshotConfig, SnapshotDesc, UuidAndVersion, Volume, VolumeRef,
};
use cairn_e2e::Device;
use cairn_test_controller::{Fault, TestController, Tls};
use cairn_types::{AppInstanceConfig, ConfigSource, DeviceStatus, SnapshotType, VolumeConfig};

const SERIAL: &str = "CAIRN-TEST-0001";
const APP: &str = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
const VOLUME: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const SNAPSHOT: &str = "5ca1ab1e-0000-4000-8000-000000000001";
const WITHIN: Duration = Duration::from_secs(15);

/// A process app on a directory volume, at `version`, with `snapshots` requested.
fn app_config(version: &str, snapshots: &[(&str, proto::SnapshotType)]) -> EdgeDevConfig {
    EdgeDevConfig {
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: version.into(),
            }),
            displayname: "sensor".into(),
            activate: true,
            restart: Some(InstanceOpsCmd::default()),
            purge: Some(InstanceOpsCmd::default()),
            volume_ref_list: vec![VolumeRef {
                uuid: VOLUME.into(),
                generation_count: 0,
                mount_dir: "/data".into(),
            }],
            snapshot: Some(SnapshotConfig {
                max_snapshots: 2,
                snapshots: snapshots
                    .iter()
                    .map(|(id, kind)| SnapshotDesc {
                        id: id.to_string(),
                        r#type: *kind as i32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            cairn_domain: Some(CairnDomain {
                kind: "process".into(),
                command: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    "while :; do date >> \"$CAIRN_VOLUME_0/log\"; sleep 1; done".into(),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }],
        volumes: vec![Volume {
            uuid: VOLUME.into(),
            maxsizebytes: 16 << 20,
            display_name: "data".into(),
            cairn_format: "dir".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The config-agent's flags for `controller`, with short timings.
fn link_args(device: &Device, controller: &TestController) -> Vec<String> {
    link_args_polling_every(device, controller, "200")
}

/// [`link_args`] with the device's own poll interval, in milliseconds.
fn link_args_polling_every(
    device: &Device,
    controller: &TestController,
    interval_ms: &str,
) -> Vec<String> {
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(
        [
            "--config-interval-ms",
            interval_ms,
            "--controller-timeout-ms",
            "700",
            "--retry-ms",
            "50",
            "--max-retry-ms",
            "400",
        ]
        .map(String::from),
    );
    args
}

async fn device_status(
    device: &Device,
    what: &str,
    done: impl Fn(&DeviceStatus) -> bool,
) -> DeviceStatus {
    device
        .wait_for::<DeviceStatus>("config-agent", WITHIN, done)
        .await
        .unwrap_or_else(|e| panic!("device status: {what}: {e}"))
}

async fn app(device: &Device, done: impl Fn(&AppInstanceConfig) -> bool) -> AppInstanceConfig {
    device
        .wait_for::<AppInstanceConfig>("config-agent", WITHIN, done)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_request_in_the_controller_config_reaches_the_app_config() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &controller));
    controller.set_config(
        SERIAL,
        app_config("1", &[(SNAPSHOT, proto::SnapshotType::Immediate)]),
    );
    device.start("config-agent", None);

    let config = app(&device, |a| !a.snapshot.snapshots.is_empty()).await;
    assert_eq!(config.uuid_and_version.version, "1");
    assert_eq!(
        config.snapshot.snapshots[0].snapshot_id.to_string(),
        SNAPSHOT
    );
    assert_eq!(
        config.snapshot.snapshots[0].snapshot_type,
        SnapshotType::Immediate
    );
    assert_eq!(config.snapshot.max_snapshots, 2);

    let expected_uuid = controller.device_uuid(SERIAL).to_string();
    let status = device_status(&device, "in force from the controller", |s| {
        matches!(s.config_source, ConfigSource::Controller { .. }) && s.apps == 1
    })
    .await;
    assert!(status.controller_reachable);
    assert_eq!(status.device_uuid, expected_uuid);
    assert!(
        status.agent_pid > 0 && !status.agent_version.is_empty() && status.agent_started.is_some()
    );
    assert!(!status.app_manager_up, "no app-manager runs in this test");
    assert!(!status.last_error.is_error(), "{:?}", status.last_error);

    // EVE's sequence, and the config is sent once: later polls carry its hash and get a 304.
    controller
        .wait_for(SERIAL, WITHIN, "a few polls", |d| d.config_requests >= 3)
        .await
        .unwrap();
    let requests: Vec<String> = controller.requests().into_iter().map(|(r, _)| r).collect();
    let first: Vec<&str> = requests.iter().take(4).map(String::as_str).collect();
    assert_eq!(
        first,
        [
            "GET /api/v2/edgedevice/certs",
            "POST /api/v2/edgedevice/register",
            "POST /api/v2/edgedevice/uuid",
            &format!("POST /api/v2/edgedevice/id/{expected_uuid}/config"),
        ]
    );
    let device_seen = controller.device(SERIAL).unwrap();
    assert_eq!(
        device_seen.configs_sent, 1,
        "unchanged config is not sent again"
    );
    assert!(
        controller
            .requests()
            .iter()
            .any(|(r, s)| r.ends_with("/config") && *s == 304)
    );

    // A new version from the controller replaces it.
    controller.set_config(SERIAL, app_config("2", &[]));
    app(&device, |a| a.uuid_and_version.version == "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_status_change_reaches_the_controller_as_zinfoapp_with_its_snapshot() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &controller));
    controller.set_config(
        SERIAL,
        app_config("1", &[(SNAPSHOT, proto::SnapshotType::Immediate)]),
    );
    device.start_all();

    let reported = controller
        .wait_for(
            SERIAL,
            Duration::from_secs(60),
            "a running app with its snapshot",
            |d| {
                d.apps().get(APP).is_some_and(|a| {
                    a.state == proto::ZSwState::Running as i32 && !a.snapshots.is_empty()
                })
            },
        )
        .await
        .unwrap();
    let app = &reported.apps()[APP];
    assert_eq!(app.app_version, "1");
    assert_eq!(app.app_name, "sensor");
    assert_eq!(
        app.volume_refs,
        [VOLUME],
        "the app's volumes in the config in force"
    );
    let snapshot = &app.snapshots[0];
    assert_eq!(snapshot.id, SNAPSHOT);
    assert_eq!(snapshot.config_id, APP);
    assert_eq!(snapshot.config_version, "1");
    assert_eq!(snapshot.r#type, proto::SnapshotType::Immediate as i32);
    assert!(snapshot.create_time.as_ref().is_some_and(|t| t.seconds > 0));
    assert!(snapshot.snap_err.is_none());
    // Every report names the device; each is a change (stop, take, start → several).
    assert!(
        reported
            .infos
            .iter()
            .all(|i| i.dev_id == reported.uuid.to_string())
    );
    assert!(
        reported.infos.len() >= 2,
        "{} reports",
        reported.infos.len()
    );

    // Once the app settles, every report has been accepted: nothing waits.
    device_status(&device, "the app-manager seen, no report waiting", |s| {
        s.app_manager_up && s.reports_pending == 0
    })
    .await;

    // Reports queued while the controller refuses them arrive once it is back.
    controller.set_fault(Some(Fault::RefuseReports(503)));
    let before = controller.device(SERIAL).unwrap().infos.len();
    controller.set_config(
        SERIAL,
        app_config("2", &[(SNAPSHOT, proto::SnapshotType::Immediate)]),
    );
    device_status(&device, "reports waiting", |s| {
        s.reports_pending > 0 && s.last_error.error.contains("503")
    })
    .await;
    assert_eq!(controller.device(SERIAL).unwrap().infos.len(), before);
    controller.set_fault(None);
    controller
        .wait_for(SERIAL, Duration::from_secs(60), "version 2 reported", |d| {
            d.apps()
                .get(APP)
                .is_some_and(|a| a.app_version == "2" && a.state == proto::ZSwState::Running as i32)
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_is_applied_when_the_controller_is_down_at_boot() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &controller));
    controller.set_config(
        SERIAL,
        app_config("7", &[(SNAPSHOT, proto::SnapshotType::AppUpdate)]),
    );
    device.start("config-agent", None);
    app(&device, |a| a.uuid_and_version.version == "7").await;
    let checkpoint = cairn_types::layout::last_config_checkpoint(&device.persist_dir());
    assert!(checkpoint.is_file(), "the accepted config is checkpointed");

    // Power cut: the agent dies, the run root is gone, and the controller is unreachable.
    device.kill("config-agent");
    drop(controller);
    std::fs::remove_dir_all(device.run_dir()).unwrap();
    device.start("config-agent", None);

    let config = app(&device, |a| a.uuid_and_version.version == "7").await;
    assert_eq!(
        config.snapshot.snapshots[0].snapshot_id.to_string(),
        SNAPSHOT
    );
    device
        .wait_for::<VolumeConfig>("config-agent", WITHIN, |v| {
            v.volume_id.to_string() == VOLUME
        })
        .await
        .unwrap();
    let status = device_status(&device, "the checkpoint in force", |s| {
        s.config_source == ConfigSource::Checkpoint
    })
    .await;
    assert!(!status.controller_reachable);
    assert!(
        status.last_error.error.contains("cannot connect"),
        "{}",
        status.last_error.error
    );
}

/// Each bad answer: refused with a reason in DeviceStatus; the last good config stays whole on
/// the bus and in the checkpoint; once the controller behaves, its new config is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_refused_and_the_last_good_config_stays_in_force() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &controller));
    let mut good_hash = controller.set_config(SERIAL, app_config("1", &[]));
    device.start("config-agent", None);
    app(&device, |a| a.uuid_and_version.version == "1").await;
    device_status(&device, "first config in force", |s| {
        s.last_config_hash == good_hash
    })
    .await;

    let mut other_device = app_config("2", &[]);
    other_device.id = Some(UuidAndVersion {
        uuid: "00000000-0000-4000-8000-0000000000ff".into(),
        version: "2".into(),
    });
    let mut bad_uuid = app_config("2", &[]);
    bad_uuid.apps[0].uuidandversion.as_mut().unwrap().uuid = "not-a-uuid".into();
    let duplicate = app_config(
        "2",
        &[
            (SNAPSHOT, proto::SnapshotType::Immediate),
            (SNAPSHOT, proto::SnapshotType::AppUpdate),
        ],
    );
    let cases: Vec<(&str, Option<Fault>, EdgeDevConfig, &str)> = vec![
        (
            "HTTP 500",
            Some(Fault::Status(500)),
            app_config("2", &[]),
            "HTTP 500",
        ),
        (
            "a timeout",
            Some(Fault::Delay(Duration::from_millis(1500))),
            app_config("2", &[]),
            "no answer",
        ),
        (
            "closed connections",
            Some(Fault::Close),
            app_config("2", &[]),
            "closed the connection",
        ),
        (
            "a bad signature",
            Some(Fault::BadSignature),
            app_config("2", &[]),
            "signature does not verify",
        ),
        (
            "a missing signature",
            Some(Fault::NoSignature),
            app_config("2", &[]),
            "not a 64-byte r‖s signature",
        ),
        (
            "malformed protobuf",
            Some(Fault::Garbage),
            app_config("2", &[]),
            "not a valid AuthContainer",
        ),
        (
            "a signer outside the root",
            Some(Fault::ForeignSigner),
            app_config("2", &[]),
            "signed by another certificate",
        ),
        (
            "a config for another device",
            None,
            other_device,
            "is for device 00000000-0000-4000-8000-0000000000ff",
        ),
        (
            "an invalid UUID",
            None,
            bad_uuid,
            "apps[0].uuidandversion.uuid",
        ),
        (
            "a duplicate snapshot id",
            None,
            duplicate,
            "apps[0].snapshot.snapshots[1].id",
        ),
    ];
    for (name, fault, config, reason) in cases {
        controller.set_fault(fault);
        controller.set_config(SERIAL, config);
        let status = device_status(&device, name, |s| s.last_error.error.contains(reason)).await;
        assert_eq!(
            status.last_config_hash, good_hash,
            "{name}: the good config stays"
        );
        // Nothing half-applied: the bus still holds exactly the good config.
        let apps = device
            .wait_for::<AppInstanceConfig>("config-agent", WITHIN, |_| true)
            .await
            .unwrap();
        assert_eq!(apps.uuid_and_version.version, "1", "{name}");
        let checkpoint = cairn_config_agent::checkpoint::load(&device.persist_dir()).unwrap();
        assert_eq!(
            checkpoint.hash, good_hash,
            "{name}: the checkpoint keeps the good config"
        );
        // Once the controller behaves, its next config is applied and the error clears.
        controller.set_fault(None);
        let recovered = controller.set_config(SERIAL, app_config("1", &[]));
        device_status(&device, "recovered", |s| {
            s.last_config_hash == recovered && !s.last_error.is_error()
        })
        .await;
        let checkpoint = cairn_config_agent::checkpoint::load(&device.persist_dir()).unwrap();
        assert_eq!(checkpoint.hash, recovered);
        good_hash = recovered;
    }
}

/// A server whose TLS certificate does not chain to the device's root is not talked to at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_a_foreign_tls_certificate_is_refused() {
    let impostor = TestController::start_with(Tls::Impostor).await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &impostor));
    impostor.set_config(SERIAL, app_config("1", &[]));
    device.start("config-agent", None);
    let status = device_status(&device, "the TLS refusal", |s| {
        s.last_error.error.contains("certificate is refused")
    })
    .await;
    assert!(!status.controller_reachable);
    assert!(status.last_config_hash.is_empty(), "nothing in force");
    // Not one request went over the refused connection: the impostor learned nothing.
    assert_eq!(impostor.requests(), []);
    assert_eq!(impostor.device(SERIAL).unwrap().config_requests, 0);
}

/// The controller's `timer.config.interval` holds across a restart that finds the config
/// unchanged (every poll a 304), not the device's own (here a minute) until a new config comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_poll_interval_holds_across_a_restart_with_an_unchanged_config() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args_polling_every(&device, &controller, "60000"));
    let mut config = app_config("1", &[]);
    config.config_items.push(proto::ConfigItem {
        key: cairn_config_agent::link::CONFIG_INTERVAL_ITEM.into(),
        value: "1".into(),
    });
    controller.set_config(SERIAL, config);
    device.start("config-agent", None);
    app(&device, |a| a.uuid_and_version.version == "1").await;
    controller
        .wait_for(SERIAL, WITHIN, "polls at the controller's interval", |d| {
            d.config_requests >= 3
        })
        .await
        .unwrap();

    device.kill("config-agent");
    let before = controller.device(SERIAL).unwrap().config_requests;
    device.start("config-agent", None);
    // Three polls after the restart: with the device's own interval only the first would come.
    let seen = controller
        .wait_for(
            SERIAL,
            WITHIN,
            "polls at the controller's interval again",
            |d| d.config_requests >= before + 3,
        )
        .await
        .unwrap();
    assert_eq!(
        seen.configs_sent, 1,
        "the restart found the config unchanged"
    );
}

/// Back in slot B after slot A's trial boot never committed: the baseos-manager records the
/// failed update and the config-agent reports both slots as EVE's `ZInfoDevSW`, the failed one
/// with its reason. The boot disk's partitions are files here (`<disk>1` to `<disk>3`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_reports_both_root_slots_and_why_the_update_failed() {
    use cairn_baseos_manager::bootstate::{BootState, SECTOR, Slot};
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    let disk = device.persist_dir().parent().unwrap().join("disk");
    let failed = BootState::initial()
        .commit(Slot::B)
        .mark_trial(Slot::A, 0)
        .fail_trial(Slot::A);
    let mut sectors = vec![0u8; 2 * SECTOR];
    sectors[..SECTOR].copy_from_slice(&BootState { seq: 4, ..failed }.encode());
    std::fs::write(format!("{}1", disk.display()), sectors).unwrap();
    for part in [2, 3] {
        std::fs::write(format!("{}{part}", disk.display()), [0u8; 4096]).unwrap();
    }
    for (key, value) in [
        ("CAIRN_BOOT_DISK", disk.to_str().unwrap()),
        ("CAIRN_BOOT_SLOT", "B"),
        ("CAIRN_BOOT_MODE", "fallback"),
    ] {
        device.set_agent_env("baseos-manager", key, value);
    }
    device.follow_controller(link_args(&device, &controller));
    controller.set_config(SERIAL, app_config("1", &[]));
    device.start("baseos-manager", None);
    device.start("config-agent", None);

    let seen = controller
        .wait_for(SERIAL, WITHIN, "both slots in a device report", |d| {
            d.device_info().is_some_and(|i| i.sw_list.len() == 2)
        })
        .await
        .unwrap();
    let info = seen.device_info().unwrap();
    let slot = |label: &str| {
        info.sw_list
            .iter()
            .find(|s| s.partition_label == label)
            .unwrap()
    };
    let (a, b) = (slot("IMGA"), slot("IMGB"));
    assert!(b.activated && b.partition_state == "active", "{b:?}");
    assert_eq!(b.user_status, proto::BaseOsStatus::Updated as i32);
    assert!(!a.activated && a.partition_state == "unused", "{a:?}");
    assert_eq!(a.user_status, proto::BaseOsStatus::Failed as i32);
    let error = a.sw_err.as_ref().unwrap();
    assert!(
        error.description.contains("slot IMGA did not commit"),
        "{error:?}"
    );
    assert!(a.partition_device.ends_with("disk2"), "{a:?}");
}

/// The device reports itself as EVE's `ZInfoDevice` at start: machine facts, the agent as the
/// active image and the API capability Cairn claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_reports_zinfodevice_at_start() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    device.follow_controller(link_args(&device, &controller));
    controller.set_config(SERIAL, app_config("1", &[]));
    device.start("config-agent", None);

    let seen = controller
        .wait_for(SERIAL, WITHIN, "a device report", |d| {
            d.device_info().is_some()
        })
        .await
        .unwrap();
    let info = seen.device_info().unwrap();
    let msg = seen
        .infos
        .iter()
        .find(|i| matches!(i.info_content, Some(proto::InfoContent::Dinfo(_))))
        .unwrap();
    assert_eq!(msg.dev_id, seen.uuid.to_string());
    assert_eq!(msg.ztype, proto::ZInfoTypes::ZiDevice as i32);
    assert!(info.ncpu > 0 && info.memory > 0 && info.storage > 0);
    assert_eq!(info.state, proto::ZDeviceState::ZdeviceStateOnline as i32);
    // A controller gating its snapshot UI on VOLUME_SNAPSHOTS offers it (and no more).
    assert_eq!(
        info.api_capability,
        proto::ApiCapability::VolumeSnapshots as i32
    );
    assert_eq!(info.sw_list.len(), 1);
    assert_eq!(info.sw_list[0].partition_label, "IMGA");
    assert!(info.sw_list[0].activated && !info.sw_list[0].short_version.is_empty());
    // Facts that do not change are not sent again at every poll.
    controller
        .wait_for(SERIAL, WITHIN, "a few polls", |d| d.config_requests >= 5)
        .await
        .unwrap();
    let reports = controller
        .device(SERIAL)
        .unwrap()
        .infos
        .iter()
        .filter(|i| matches!(i.info_content, Some(proto::InfoContent::Dinfo(_))))
        .count();
    assert_eq!(reports, 1);
}

/// `n` process apps, each on its own directory volume, as [`app_config`] makes one.
fn apps_config(n: usize) -> EdgeDevConfig {
    let one = app_config("1", &[]);
    let mut config = EdgeDevConfig::default();
    for i in 0..n {
        let mut app = one.apps[0].clone();
        let mut volume = one.volumes[0].clone();
        let app_uuid = format!("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0{i:02}");
        volume.uuid = format!("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c{i:02}");
        app.uuidandversion.as_mut().unwrap().uuid = app_uuid;
        app.displayname = format!("sensor-{i}");
        app.volume_ref_list[0].uuid = volume.uuid.clone();
        config.apps.push(app);
        config.volumes.push(volume);
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_volume_infos_reach_the_controller_at_eves_endpoint() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    let mut args = link_args(&device, &controller);
    args.extend(["--metric-interval-ms", "500"].map(String::from));
    device.follow_controller(args);
    let config = apps_config(3);
    controller.set_config(SERIAL, config.clone());
    device.start_all();
    let settle = Duration::from_secs(60);

    // Every volume is reported once made, by its UUID, as EVE's ZInfoVolume.
    let created = proto::ZSwState::CreatedVolume as i32;
    let seen = controller
        .wait_for(SERIAL, settle, "ZInfoVolume of the three volumes", |d| {
            let volumes = d.volumes();
            config
                .volumes
                .iter()
                .all(|v| volumes.get(&v.uuid).is_some_and(|i| i.state == created))
        })
        .await
        .unwrap();
    let info = &seen.volumes()[&config.volumes[0].uuid];
    assert_eq!(info.display_name, "data");
    assert_eq!(info.progress_percentage, 100);
    assert_eq!(
        info.resources.as_ref().map(|r| r.max_size_bytes),
        Some(16 << 20)
    );
    let metrics_post = format!("POST /api/v2/edgedevice/id/{}/metrics", seen.uuid);
    let requests = controller.requests();
    assert!(
        requests
            .iter()
            .any(|(line, status)| line == &metrics_post && *status == 201),
        "metrics go to EVE's endpoint: {requests:?}"
    );

    // A report once each app's processes were measured by the domain-manager.
    let measured = |m: &proto::ZMetricMsg| {
        m.am.len() == 3
            && m.am.iter().all(|a| {
                a.app_memory.as_ref().is_some_and(|mem| mem.used_mb > 0) && a.disk.len() == 1
            })
            && m.vm.len() == 3
    };
    let seen = controller
        .wait_for(
            SERIAL,
            settle,
            "a metrics report with three measured apps",
            |d| d.metrics.iter().any(|m| measured(&m.report)),
        )
        .await
        .unwrap();
    let report = seen
        .metrics
        .iter()
        .rev()
        .find(|m| measured(&m.report))
        .unwrap();
    assert_eq!(report.report.dev_id, seen.uuid.to_string());
    let Some(proto::MetricContent::Dm(dm)) = &report.report.metric_content else {
        panic!("no device metrics: {:?}", report.report)
    };
    assert!(
        dm.memory
            .as_ref()
            .is_some_and(|m| m.used_mem > 0 && m.avail_mem > 0)
    );
    assert!(dm.cpu_metric.as_ref().is_some_and(|c| c.total_ns > 0));
    assert_eq!(
        dm.disk[0].mount_path,
        device.persist_dir().display().to_string()
    );
    let mut names: Vec<&str> = report
        .report
        .am
        .iter()
        .map(|a| a.app_name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["sensor-0", "sensor-1", "sensor-2"]);
    eprintln!(
        "metrics report, 3 apps and 3 volumes: {} bytes ZMetricMsg, {} bytes signed body",
        report.payload_bytes, report.body_bytes
    );

    // The third app and its volume leave the config: the volume, kept for the deletion grace,
    // is reported again with a notice that says until when.
    controller.set_config(SERIAL, apps_config(2));
    let third = config.volumes[2].uuid.clone();
    let notice = proto::Severity::Notice as i32;
    let seen = controller
        .wait_for(
            SERIAL,
            settle,
            "the removed volume's pending deletion",
            |d| {
                d.volumes()
                    .get(&third)
                    .and_then(|v| v.volume_err.as_ref())
                    .is_some_and(|e| e.severity == notice)
            },
        )
        .await
        .unwrap();
    let err = seen.volumes()[&third].volume_err.clone().unwrap();
    assert!(err.retry_condition.starts_with("deleted at "), "{err:?}");
}

/// The bytes a metrics report gives the volume `uuid` as used.
fn volume_used(metrics: &cairn_test_controller::Metrics, uuid: &str) -> Option<u64> {
    metrics
        .report
        .vm
        .iter()
        .find(|v| v.uuid == uuid)
        .map(|v| v.used_bytes)
}

/// A directory volume's usage is measured again (EVE's volumemgr disk scan, every
/// `timer.metric.diskscan.interval`): 8 MiB written into it show in a later metrics report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_into_a_directory_volume_shows_in_the_metrics() {
    let controller = TestController::start().await.unwrap();
    let mut device = Device::new();
    let mut args = link_args(&device, &controller);
    args.extend(["--metric-interval-ms", "500"].map(String::from));
    device.follow_controller(args);
    let mut config = app_config("1", &[]);
    config.config_items.push(proto::ConfigItem {
        key: "timer.metric.diskscan.interval".into(),
        value: "5".into(),
    });
    controller.set_config(SERIAL, config);
    device.start_all();
    let settle = Duration::from_secs(60);
    let seen = controller
        .wait_for(SERIAL, settle, "the volume in a metrics report", |d| {
            d.metrics.iter().any(|m| volume_used(m, VOLUME).is_some())
        })
        .await
        .unwrap();
    let before = seen
        .metrics
        .iter()
        .rev()
        .find_map(|m| volume_used(m, VOLUME))
        .unwrap();
    let reports = seen.metrics.len();

    let written: u64 = 8 << 20;
    let dir = device.dir_volume(VOLUME.parse().unwrap(), 0);
    std::fs::write(
        dir.join("written-by-the-test"),
        vec![0x5a; written as usize],
    )
    .unwrap();
    let seen = controller
        .wait_for(SERIAL, settle, "the write in a metrics report", |d| {
            d.metrics
                .iter()
                .skip(reports)
                .any(|m| volume_used(m, VOLUME).is_some_and(|used| used >= before + written))
        })
        .await
        .unwrap();
    let after = seen
        .metrics
        .iter()
        .skip(reports)
        .find_map(|m| volume_used(m, VOLUME).filter(|used| *used >= before + written))
        .unwrap();
    eprintln!("directory volume used: {before} bytes, then {after} after an 8 MiB write");
}

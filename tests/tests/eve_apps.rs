//! A stock EVE controller's app (issue 18): the config carries only EVE's fields, no Cairn
//! extension. A VM described by `fixedresources` (kernel, ramdisk, extraargs, memory in KiB)
//! boots, is snapshotted and rolled back, and so does one without a kernel that boots its
//! first disk through the BIOS; an app in a mode Cairn cannot run is reported to the
//! controller as ERROR with an `appErr` naming the field.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, EdgeDevConfig, InstanceOpsCmd, SnapshotConfig,
    SnapshotDesc, UuidAndVersion, VmConfig, VmMode, Volume, VolumeRef, ZInfoApp,
};
use cairn_e2e::{
    BOOT_DISK_COUNTER_OFFSET, Device, console_counters, guest_dir, sector_counter,
    sector_counter_at,
};
use cairn_test_controller::TestController;
use cairn_types::DomainStatus;

const SERIAL: &str = "CAIRN-EVE-APP-0001";
const APP: &str = "e7ea0000-0000-4000-8000-00000000a001";
const VOLUME: &str = "e7ea0000-0000-4000-8000-00000000b001";
const S1: &str = "e7ea0000-0000-4000-8000-00000000c001";
const SETTLE: Duration = Duration::from_secs(120);

/// What EVE's controller sends: the test guest as a direct-kernel-boot VM, one blank disk.
fn eve_config(mode: VmMode, snapshots: &[&str], rollback: u32, active: &str) -> EdgeDevConfig {
    let guest = guest_dir();
    EdgeDevConfig {
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: "1".into(),
            }),
            displayname: "counter".into(),
            activate: true,
            fixedresources: Some(VmConfig {
                kernel: guest.join("vmlinuz").display().to_string(),
                ramdisk: guest.join("initramfs.cpio.gz").display().to_string(),
                extraargs: "console=ttyS0 cryptomgr.notests panic=-1 cairn.workload=counter".into(),
                memory: 128 * 1024,
                vcpus: 1,
                virtualization_mode: mode as i32,
                ..Default::default()
            }),
            restart: Some(InstanceOpsCmd::default()),
            purge: Some(InstanceOpsCmd::default()),
            volume_ref_list: vec![VolumeRef {
                uuid: VOLUME.into(),
                ..Default::default()
            }],
            snapshot: Some(SnapshotConfig {
                active_snapshot: active.into(),
                rollback_cmd: Some(InstanceOpsCmd {
                    counter: rollback,
                    ops_time: String::new(),
                }),
                max_snapshots: 2,
                snapshots: snapshots
                    .iter()
                    .map(|id| SnapshotDesc {
                        id: id.to_string(),
                        r#type: proto::SnapshotType::Immediate as i32,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        volumes: vec![Volume {
            uuid: VOLUME.into(),
            maxsizebytes: 1 << 20,
            display_name: "counter-disk".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The same app as EVE describes a VM that boots from its disk: no kernel, ramdisk or
/// extraargs, the first volume (large enough for the test guest's 34 MiB `disk.qcow2`) is the
/// boot disk. `activate` false lets the test fill the volume before the first boot.
fn eve_disk_boot_config(
    activate: bool,
    snapshots: &[&str],
    rollback: u32,
    active: &str,
) -> EdgeDevConfig {
    let mut config = eve_config(VmMode::Hvm, snapshots, rollback, active);
    let app = &mut config.apps[0];
    app.activate = activate;
    if let Some(vm) = app.fixedresources.as_mut() {
        vm.kernel.clear();
        vm.ramdisk.clear();
        vm.extraargs.clear();
    }
    config.volumes[0].maxsizebytes = 64 << 20;
    config
}

async fn follow(controller: &TestController, config: EdgeDevConfig) -> Device {
    let mut device = Device::new();
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(
        [
            "--config-interval-ms",
            "200",
            "--retry-ms",
            "100",
            "--metric-interval-ms",
            "500",
        ]
        .map(String::from),
    );
    device.follow_controller(args);
    controller.set_config(SERIAL, config);
    device.start_all();
    device
}

/// The controller's latest `ZInfoApp` of the app once `done` holds.
async fn reported(
    controller: &TestController,
    what: &str,
    done: impl Fn(&ZInfoApp) -> bool,
) -> ZInfoApp {
    let device = controller
        .wait_for(SERIAL, SETTLE, what, |d| {
            d.apps().get(APP).is_some_and(&done)
        })
        .await
        .unwrap();
    device.apps()[APP].clone()
}

fn running(app: &ZInfoApp) -> bool {
    app.state == proto::ZSwState::Running as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_described_only_by_eves_fields_boots_is_snapshotted_and_rolled_back() {
    let controller = TestController::start().await.unwrap();
    let hvm = VmMode::Hvm;
    let device = follow(&controller, eve_config(hvm, &[], 0, "")).await;
    let app = reported(&controller, "the EVE-described VM running", running).await;
    assert!(app.app_err.is_empty(), "{:?}", app.app_err);

    // The guest counts on its disk, so the snapshot has something to return to.
    let file = device.volume(SETTLE).await.file_location;
    device
        .until(SETTLE, "the guest counts on its disk", || {
            sector_counter(&file, None) >= 2
        })
        .await;

    controller.set_config(SERIAL, eve_config(hvm, &[S1], 0, ""));
    reported(&controller, "S1 taken and the VM running again", |a| {
        running(a)
            && a.snapshots
                .iter()
                .any(|s| s.id == S1 && s.snap_err.is_none())
    })
    .await;
    let at_snapshot = sector_counter(&file, Some(S1));
    device
        .until(SETTLE, "the counter moves past the snapshot", || {
            sector_counter(&file, None) > at_snapshot + 3
        })
        .await;

    // Rollback: the VM starts again from the snapshot's disk; its console log starts afresh,
    // so its first count is the snapshot's next.
    controller.set_config(SERIAL, eve_config(hvm, &[S1], 1, S1));
    let log = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
            !d.log_path.as_os_str().is_empty()
        })
        .await
        .unwrap()
        .log_path;
    device
        .until(SETTLE, "the guest counts from the snapshot", || {
            console_counters(&log).first() == Some(&(at_snapshot + 1))
        })
        .await;
    reported(&controller, "the VM running after the rollback", running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_in_a_mode_cairn_cannot_run_is_reported_as_error_naming_the_field() {
    let controller = TestController::start().await.unwrap();
    let _device = follow(&controller, eve_config(VmMode::Nohyper, &[], 0, "")).await;
    let app = reported(&controller, "the NOHYPER app in ERROR", |a| {
        a.state == proto::ZSwState::Error as i32 && !a.app_err.is_empty()
    })
    .await;
    assert!(
        app.app_err[0]
            .description
            .contains("fixedresources.virtualizationMode NOHYPER"),
        "{:?}",
        app.app_err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hvm_vm_without_a_kernel_boots_its_disk_through_the_bios_and_survives_a_rollback() {
    let controller = TestController::start().await.unwrap();
    let disk = guest_dir().join("disk.qcow2");
    assert!(
        disk.is_file(),
        "{} is missing: run images/test-guest/build",
        disk.display()
    );
    let device = follow(&controller, eve_disk_boot_config(false, &[], 0, "")).await;

    // No content tree yet: the test writes the bootable disk into the blank volume the
    // volume-manager made, in place (-n), before the app is first activated.
    let file = device.volume(SETTLE).await.file_location;
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "qcow2"])
        .arg(&disk)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    controller.set_config(SERIAL, eve_disk_boot_config(true, &[], 0, ""));
    let app = reported(&controller, "the disk-booted VM running", running).await;
    assert!(app.app_err.is_empty(), "{:?}", app.app_err);
    let log = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
            !d.log_path.as_os_str().is_empty()
        })
        .await
        .unwrap()
        .log_path;
    // SeaBIOS ran syslinux from the disk (its banner), which passed the kernel BOOT_IMAGE.
    device
        .until(SETTLE, "the guest booted from its disk", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("SYSLINUX") && text.contains("boot=/vmlinuz")
        })
        .await;
    // The controller's metrics show the VM's memory: its 128 MiB allotment, some of it in use.
    controller
        .wait_for(SERIAL, SETTLE, "the VM's memory in a metrics report", |d| {
            d.metrics.iter().any(|m| {
                m.report.am.iter().any(|a| {
                    a.app_id == APP
                        && a.app_memory
                            .as_ref()
                            .is_some_and(|mem| mem.allocated_mb == 128 && mem.used_mb > 0)
                })
            })
        })
        .await
        .unwrap();
    let counter = |snapshot| sector_counter_at(&file, snapshot, BOOT_DISK_COUNTER_OFFSET);
    device
        .until(SETTLE, "the guest counts on its data partition", || {
            counter(None) >= 2
        })
        .await;

    controller.set_config(SERIAL, eve_disk_boot_config(true, &[S1], 0, ""));
    reported(&controller, "S1 taken and the VM running again", |a| {
        running(a)
            && a.snapshots
                .iter()
                .any(|s| s.id == S1 && s.snap_err.is_none())
    })
    .await;
    let at_snapshot = counter(Some(S1));
    assert!(
        at_snapshot >= 2,
        "the snapshot holds the count: {at_snapshot}"
    );
    device
        .until(SETTLE, "the counter moves past the snapshot", || {
            counter(None) > at_snapshot + 3
        })
        .await;

    // Rollback: the VM boots its disk again as the snapshot left it and counts on from there.
    controller.set_config(SERIAL, eve_disk_boot_config(true, &[S1], 1, S1));
    device
        .until(
            SETTLE,
            "the disk-booted guest counts from the snapshot",
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.contains("SYSLINUX")
                    && console_counters(&log).first() == Some(&(at_snapshot + 1))
            },
        )
        .await;
    reported(&controller, "the VM running after the rollback", running).await;
}

//! A stock EVE controller's app (issue 18): the config carries only EVE's fields, no Cairn
//! extension. A VM described by `fixedresources` (kernel, ramdisk, extraargs, memory in KiB)
//! boots, is snapshotted and rolled back, and so does one without a kernel that boots its
//! first disk, a content tree on an HTTPS datastore, through the BIOS, and is then deleted;
//! an app in a mode Cairn cannot run is reported to the controller as ERROR with an `appErr`
//! naming the field.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use std::path::Path;
use std::time::Instant;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, ContentTree, DatastoreConfig, EdgeDevConfig,
    InstanceOpsCmd, SnapshotConfig, SnapshotDesc, VmConfig, VmMode, Volume, VolumeContentOrigin,
    VolumeContentOriginType, ZInfoApp,
};
use cairn_e2e::{
    BOOT_DISK_COUNTER_OFFSET, Device, console_counters, guest_dir, sector_counter,
    sector_counter_at,
};
use cairn_test_controller::TestController;
use cairn_test_controller::datastore::TestDatastore;
use cairn_types::{ContentTreeStatus, DomainStatus};
use common::eve_app;
use sha2::Digest;

const SERIAL: &str = "CAIRN-EVE-APP-0001";
const APP: &str = "e7ea0000-0000-4000-8000-00000000a001";
const VOLUME: &str = "e7ea0000-0000-4000-8000-00000000b001";
const S1: &str = "e7ea0000-0000-4000-8000-00000000c001";
const STORE: &str = "e7ea0000-0000-4000-8000-00000000d001";
const TREE: &str = "e7ea0000-0000-4000-8000-00000000e001";
const SETTLE: Duration = Duration::from_secs(120);

/// What EVE's controller sends: the test guest as a direct-kernel-boot VM, one blank disk.
fn eve_config(mode: VmMode, snapshots: &[&str], rollback: u32, active: &str) -> EdgeDevConfig {
    let guest = guest_dir();
    let resources = VmConfig {
        kernel: guest.join("vmlinuz").display().to_string(),
        ramdisk: guest.join("initramfs.cpio.gz").display().to_string(),
        extraargs: "console=ttyS0 cryptomgr.notests panic=-1 cairn.workload=counter".into(),
        memory: 128 * 1024,
        vcpus: 1,
        virtualization_mode: mode as i32,
        ..Default::default()
    };
    EdgeDevConfig {
        apps: vec![ProtoApp {
            restart: Some(InstanceOpsCmd::default()),
            purge: Some(InstanceOpsCmd::default()),
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
            ..eve_app(APP, "counter", resources, &[VOLUME])
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

/// The test guest's bootable disk as a stock EVE controller serves it: one content tree
/// (`disk.qcow2` on an HTTPS datastore with its own CA, its real sha256).
struct GuestDisk {
    store: TestDatastore,
    sha256: String,
}

impl GuestDisk {
    async fn serve() -> Self {
        let disk = guest_dir().join("disk.qcow2");
        let bytes = std::fs::read(&disk)
            .unwrap_or_else(|e| panic!("{}: {e}: run images/test-guest/build", disk.display()));
        let sha256 = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let store = TestDatastore::start(true).await.unwrap();
        store.put("images/disk.qcow2", bytes);
        Self { store, sha256 }
    }

    fn datastore(&self) -> DatastoreConfig {
        DatastoreConfig {
            id: STORE.into(),
            d_type: proto::DsType::DsHttps as i32,
            fqdn: self.store.url(),
            dpath: "images".into(),
            ds_cert_pem: vec![self.store.ca_pem().as_bytes().to_vec()],
            ..Default::default()
        }
    }

    fn content_tree(&self) -> ContentTree {
        ContentTree {
            uuid: TREE.into(),
            ds_id: STORE.into(),
            url: "disk.qcow2".into(),
            iformat: proto::Format::Qcow2 as i32,
            sha256: self.sha256.clone(),
            max_size_bytes: 256 << 20,
            display_name: "test-guest-disk".into(),
            ..Default::default()
        }
    }
}

/// The same app as EVE describes a VM that boots from its disk: no kernel, ramdisk or
/// extraargs; the first volume, made from the guest's content tree (`VCOT_DOWNLOAD`) and grown
/// to 64 MiB, is the boot disk.
fn eve_disk_boot_config(
    disk: &GuestDisk,
    snapshots: &[&str],
    rollback: u32,
    active: &str,
) -> EdgeDevConfig {
    let mut config = eve_config(VmMode::Hvm, snapshots, rollback, active);
    if let Some(vm) = config.apps[0].fixedresources.as_mut() {
        vm.kernel.clear();
        vm.ramdisk.clear();
        vm.extraargs.clear();
    }
    config.volumes[0].maxsizebytes = 64 << 20;
    config.volumes[0].origin = Some(VolumeContentOrigin {
        r#type: VolumeContentOriginType::VcotDownload as i32,
        download_content_tree_id: TREE.into(),
    });
    config.datastores = vec![disk.datastore()];
    config.content_info = vec![disk.content_tree()];
    config
}

async fn follow(controller: &TestController, config: EdgeDevConfig) -> Device {
    common::follow(controller, SERIAL, config).await
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
    // so its first count is the snapshot's next. The start after the snapshot began a log
    // counting from there too: the count is looked at only once another qemu runs.
    let before_rollback = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| d.pid.is_some())
        .await
        .unwrap()
        .pid;
    controller.set_config(SERIAL, eve_config(hvm, &[S1], 1, S1));
    let log = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
            !d.log_path.as_os_str().is_empty() && d.pid.is_some() && d.pid != before_rollback
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
    // FML: EVE's machine-learning mode (GPU passthrough), which Cairn does not run.
    let _device = follow(&controller, eve_config(VmMode::Fml, &[], 0, "")).await;
    let app = reported(&controller, "the FML app in ERROR", |a| {
        a.state == proto::ZSwState::Error as i32 && !a.app_err.is_empty()
    })
    .await;
    assert!(
        app.app_err[0]
            .description
            .contains("fixedresources.virtualizationMode FML"),
        "{:?}",
        app.app_err
    );
}

/// EVE's `start_delay_in_seconds`: the app is reported START_DELAYED, not started, until its
/// delay after the device came up has passed; then it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eve_start_delay_is_reported_start_delayed_and_the_app_runs_after_it() {
    let controller = TestController::start().await.unwrap();
    let mut config = eve_config(VmMode::Hvm, &[], 0, "");
    config.apps[0].start_delay_in_seconds = 10;
    let device = follow(&controller, config).await;
    reported(&controller, "the app START_DELAYED", |a| {
        a.state == proto::ZSwState::StartDelayed as i32
    })
    .await;
    let started = device
        .wait_for::<DomainStatus>("domain-manager", Duration::from_secs(2), |d| {
            d.pid.is_some()
        })
        .await;
    assert!(
        started.is_err(),
        "the VM was started inside its delay: {started:?}"
    );
    let app = reported(&controller, "the app running after its delay", running).await;
    assert!(app.app_err.is_empty(), "{:?}", app.app_err);
}

/// EVE's `shutdown` command (`EdgeDevConfig.shutdown`, a `DeviceOpsCmd`): the first counter
/// is only noted; a new one stops every app, the device reports PREPARED_POWEROFF once they
/// have halted, a restarted config-agent keeps them stopped, and a reboot ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eve_shutdown_command_stops_every_app_until_the_next_boot() {
    let controller = TestController::start().await.unwrap();
    let with_shutdown = |counter: u32| EdgeDevConfig {
        shutdown: Some(proto::DeviceOpsCmd {
            counter,
            ..Default::default()
        }),
        ..eve_config(VmMode::Hvm, &[], 0, "")
    };
    let mut device = follow(&controller, with_shutdown(1)).await;
    reported(
        &controller,
        "the VM running: a first counter is only noted",
        running,
    )
    .await;
    let online = |state: proto::ZDeviceState, counter: u32| {
        move |d: &cairn_test_controller::Device| {
            d.device_info()
                .is_some_and(|i| i.state == state as i32 && i.shutdown_config_counter == counter)
        }
    };
    controller
        .wait_for(
            SERIAL,
            SETTLE,
            "the device ONLINE, counter 1",
            online(proto::ZDeviceState::ZdeviceStateOnline, 1),
        )
        .await
        .unwrap();

    controller.set_config(SERIAL, with_shutdown(2));
    controller
        .wait_for(
            SERIAL,
            SETTLE,
            "the device PREPARED_POWEROFF, counter 2",
            online(proto::ZDeviceState::ZdeviceStatePreparedPoweroff, 2),
        )
        .await
        .unwrap();
    let halted = |a: &ZInfoApp| a.state == proto::ZSwState::Halted as i32;
    reported(&controller, "the VM halted by the shutdown", halted).await;
    device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| d.pid.is_none())
        .await
        .unwrap();

    // The same boot: a restarted config-agent puts the same config in force, apps stopped.
    device.kill("config-agent");
    device.start("config-agent", None);
    let started = device
        .wait_for::<DomainStatus>("domain-manager", Duration::from_secs(5), |d| {
            d.pid.is_some()
        })
        .await;
    assert!(
        started.is_err(),
        "a restarted config-agent forgot the shutdown: {started:?}"
    );

    // A reboot ends the shutdown; the counter is the same, so it is not asked again.
    device.power_cycle();
    reported(&controller, "the VM running after the reboot", running).await;
    controller
        .wait_for(
            SERIAL,
            SETTLE,
            "the device ONLINE again",
            online(proto::ZDeviceState::ZdeviceStateOnline, 2),
        )
        .await
        .unwrap();
}

/// The whole life of a VM app a stock EVE controller deploys: its disk is a content tree on
/// an HTTPS datastore, downloaded, verified and made into its volume; the VM boots that disk
/// through the BIOS, is snapshotted and rolled back, and when the controller removes it its
/// domain stops, its volume is kept for the deletion grace and the content tree is collected
/// once the config no longer names it. The controller hears of all of it: ZInfoDevice,
/// ZInfoContentTree, ZInfoVolume, ZInfoApp and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hvm_vm_from_a_content_tree_boots_its_disk_through_the_bios_is_rolled_back_and_deleted()
{
    let controller = TestController::start().await.unwrap();
    let disk = GuestDisk::serve().await;
    let started = Instant::now();
    let device = follow(&controller, eve_disk_boot_config(&disk, &[], 0, "")).await;

    let seen = controller
        .wait_for(SERIAL, SETTLE, "the content tree DELIVERED", |d| {
            d.content_trees()
                .get(TREE)
                .is_some_and(|t| t.state == proto::ZSwState::Delivered as i32)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(30)));
    let delivered = started.elapsed();
    let tree = &seen.content_trees()[TREE];
    assert_eq!(
        (tree.sha256.as_str(), tree.progress_percentage),
        (disk.sha256.as_str(), 100)
    );
    assert!(tree.err.is_none(), "{:?}", tree.err);
    let app = reported(&controller, "the disk-booted VM running", running).await;
    let to_running = started.elapsed();
    assert!(app.app_err.is_empty(), "{:?}", app.app_err);
    assert_eq!(app.volume_refs, [VOLUME]);
    assert!(
        app.boot_time.as_ref().is_some_and(|t| t.seconds > 0),
        "a running app reports when it booted: {:?}",
        app.boot_time
    );
    println!(
        "figure: config to RUNNING for the test guest VM from a content tree ({} MiB qcow2 over \
         HTTPS): {:.2} s (content tree DELIVERED at {:.2} s; agents started with the config waiting)",
        std::fs::metadata(guest_dir().join("disk.qcow2"))
            .map(|m| m.len() >> 20)
            .unwrap_or(0),
        to_running.as_secs_f64(),
        delivered.as_secs_f64()
    );
    let seen = controller.device(SERIAL).unwrap();
    assert!(seen.device_info().is_some(), "a ZInfoDevice came");
    let volume = &seen.volumes()[VOLUME];
    assert_eq!(volume.state, proto::ZSwState::CreatedVolume as i32);
    assert!(
        volume
            .resources
            .as_ref()
            .is_some_and(|r| r.max_size_bytes == 64 << 20),
        "{volume:?}"
    );

    let domain = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
            !d.log_path.as_os_str().is_empty() && d.pid.is_some()
        })
        .await
        .unwrap();
    let log = domain.log_path;
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
    let file = device.volume(SETTLE).await.file_location;
    let counter = |snapshot| sector_counter_at(&file, snapshot, BOOT_DISK_COUNTER_OFFSET);
    device
        .until(SETTLE, "the guest counts on its data partition", || {
            counter(None) >= 2
        })
        .await;

    controller.set_config(SERIAL, eve_disk_boot_config(&disk, &[S1], 0, ""));
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
    // Its console log starts afresh at each start, the one after the snapshot too, so the
    // count is looked at only once another qemu runs.
    let before_rollback = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| d.pid.is_some())
        .await
        .unwrap()
        .pid;
    controller.set_config(SERIAL, eve_disk_boot_config(&disk, &[S1], 1, S1));
    let qemu = device
        .wait_for::<DomainStatus>("domain-manager", SETTLE, |d| {
            d.pid.is_some() && d.pid != before_rollback
        })
        .await
        .unwrap()
        .pid
        .unwrap();
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

    // The controller removes the app; its volume and content tree stay in the config.
    let blob = device
        .wait_for::<ContentTreeStatus>("downloader", SETTLE, ContentTreeStatus::is_loaded)
        .await
        .unwrap()
        .file_location;
    let mut without_app = eve_disk_boot_config(&disk, &[], 0, "");
    without_app.apps.clear();
    controller.set_config(SERIAL, without_app.clone());
    // Cairn keeps a removed app halted with its snapshots (EVE would delete it and send its
    // bare id): the controller hears it HALTED.
    controller
        .wait_for(SERIAL, SETTLE, "the removed app reported halted", |d| {
            d.apps()
                .get(APP)
                .is_some_and(|a| a.state == proto::ZSwState::Halted as i32)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(40)));
    device
        .until(SETTLE, "the VM's qemu ended", || {
            !Path::new(&format!("/proc/{qemu}")).exists()
        })
        .await;
    assert!(
        Path::new(&blob).is_file(),
        "the content tree is still configured: its blob {blob} stays"
    );

    // Then the volume and the content tree: the volume waits out the deletion grace with its
    // data (EVE's default would delete it at once), the content tree nothing names any more
    // is collected.
    without_app.volumes.clear();
    without_app.content_info.clear();
    controller.set_config(SERIAL, without_app);
    controller
        .wait_for(SERIAL, SETTLE, "the content tree reported gone", |d| {
            d.content_trees()
                .get(TREE)
                .is_some_and(|t| t.display_name.is_empty() && t.state == 0)
        })
        .await
        .unwrap();
    device
        .until(SETTLE, "the content tree's blob removed", || {
            !Path::new(&blob).exists()
        })
        .await;
    let seen = controller
        .wait_for(
            SERIAL,
            SETTLE,
            "the volume reported pending deletion",
            |d| {
                d.volumes().get(VOLUME).is_some_and(|v| {
                    v.volume_err
                        .as_ref()
                        .is_some_and(|e| e.severity == proto::Severity::Notice as i32)
                })
            },
        )
        .await
        .unwrap();
    let notice = seen.volumes()[VOLUME].volume_err.clone().unwrap();
    assert!(
        notice.retry_condition.starts_with("deleted at "),
        "{notice:?}"
    );
    assert!(file.is_file(), "the volume's data is kept during the grace");
}

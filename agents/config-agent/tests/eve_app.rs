//! Apps described only with EVE's fields (issue 18): `fixedresources` and `volumeRefList` make
//! the domain with no Cairn extension, and what EVE can express but Cairn cannot run yet is
//! accepted as an app that reports why, not a refused config.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use cairn_config_agent::model::from_proto;
use cairn_config_agent::proto::{
    self, AppInstanceConfig, CairnDomain, EdgeDevConfig, UuidAndVersion, VmConfig, VmMode, Volume,
    VolumeRef,
};
use cairn_types::{DomainSpec, VmSpec};
use prost::Message;

const APP: &str = "e7e00000-0000-4000-8000-000000000001";
const OTHER: &str = "e7e00000-0000-4000-8000-000000000002";
const ROOT: &str = "e7e00000-0000-4000-8000-0000000000b1";
const DATA: &str = "e7e00000-0000-4000-8000-0000000000b2";

fn vm_resources() -> VmConfig {
    VmConfig {
        kernel: "/guest/vmlinuz".into(),
        ramdisk: "/guest/initramfs.cpio.gz".into(),
        extraargs: "console=ttyS0 panic=-1".into(),
        // KiB, as EVE sends it: 100000 KiB is 97.7 MiB, rounded up.
        memory: 100_000,
        vcpus: 2,
        virtualization_mode: VmMode::Hvm as i32,
        ..Default::default()
    }
}

fn eve_app(uuid: &str, resources: Option<VmConfig>) -> AppInstanceConfig {
    AppInstanceConfig {
        uuidandversion: Some(UuidAndVersion {
            uuid: uuid.into(),
            version: "1".into(),
        }),
        displayname: "vm".into(),
        activate: true,
        fixedresources: resources,
        ..Default::default()
    }
}

/// `apps`, with the two volumes, through the wire as a controller sends it.
fn config(apps: Vec<AppInstanceConfig>) -> cairn_config_agent::model::DeviceConfig {
    let volume = |uuid: &str| Volume {
        uuid: uuid.into(),
        maxsizebytes: 1 << 20,
        ..Default::default()
    };
    let edge = EdgeDevConfig {
        apps,
        volumes: vec![volume(ROOT), volume(DATA)],
        ..Default::default()
    };
    from_proto(&EdgeDevConfig::decode(edge.encode_to_vec().as_slice()).unwrap()).unwrap()
}

#[test]
fn eves_fixedresources_make_a_direct_kernel_boot_vm_with_disks_in_volume_ref_list_order() {
    let mut app = eve_app(APP, Some(vm_resources()));
    // DATA first: the order is the controller's, not the volumes' order in the config.
    app.volume_ref_list = [DATA, ROOT]
        .map(|uuid| VolumeRef {
            uuid: uuid.into(),
            ..Default::default()
        })
        .to_vec();
    let device = config(vec![app]);
    let app = &device.apps[0];
    assert_eq!(app.unrunnable, None);
    assert_eq!(
        app.domain,
        Some(DomainSpec::Vm(VmSpec {
            kernel: "/guest/vmlinuz".into(),
            initrd: "/guest/initramfs.cpio.gz".into(),
            append: "console=ttyS0 panic=-1".into(),
            memory_mib: 98,
            cpus: 2,
            guest_agent: false,
        }))
    );
    let disks: Vec<String> = app
        .volume_ref_config_list
        .iter()
        .map(|v| v.volume_id.to_string())
        .collect();
    assert_eq!(disks, [DATA, ROOT]);

    // PV, EVE's default mode (0), runs the same way; no vcpus is EVE's one.
    let mut pv = vm_resources();
    pv.virtualization_mode = VmMode::Pv as i32;
    pv.vcpus = 0;
    let device = config(vec![eve_app(APP, Some(pv))]);
    let Some(DomainSpec::Vm(vm)) = &device.apps[0].domain else {
        panic!("PV is not a VM: {:?}", device.apps[0]);
    };
    assert_eq!(vm.cpus, 1);
}

#[test]
fn hvm_or_pv_without_a_kernel_boots_its_first_disk_through_the_bios() {
    for (mode, bootloader) in [
        (VmMode::Hvm, ""),
        (VmMode::Pv, ""),
        // EVE's own SeaBIOS path and the pygrub EVE drops mean the same firmware.
        (VmMode::Hvm, "/usr/lib/xen/boot/seabios.bin"),
        (VmMode::Hvm, "/usr/bin/pygrub"),
    ] {
        let mut vm = vm_resources();
        vm.kernel.clear();
        vm.ramdisk.clear();
        vm.extraargs.clear();
        vm.virtualization_mode = mode as i32;
        vm.bootloader = bootloader.into();
        let mut app = eve_app(APP, Some(vm));
        app.volume_ref_list = [ROOT, DATA]
            .map(|uuid| VolumeRef {
                uuid: uuid.into(),
                ..Default::default()
            })
            .to_vec();
        let device = config(vec![app]);
        let app = &device.apps[0];
        assert_eq!(app.unrunnable, None, "{mode:?} {bootloader:?}");
        assert_eq!(
            app.domain,
            Some(DomainSpec::Vm(VmSpec {
                kernel: "".into(),
                initrd: "".into(),
                append: String::new(),
                memory_mib: 98,
                cpus: 2,
                guest_agent: false,
            })),
            "{mode:?} {bootloader:?}"
        );
        // The boot disk is the first of volumeRefList.
        assert_eq!(app.volume_ref_config_list[0].volume_id.to_string(), ROOT);
    }
}

#[test]
fn what_cairn_cannot_run_is_an_accepted_app_that_names_the_field_and_the_reason() {
    let with = |edit: fn(&mut VmConfig)| {
        let mut vm = vm_resources();
        edit(&mut vm);
        Some(vm)
    };
    let cases: Vec<(&str, Option<VmConfig>, Vec<proto::Drive>, &str)> = vec![
        (
            "a disk boot without a disk",
            with(|vm| {
                vm.kernel.clear();
                vm.ramdisk.clear();
                vm.extraargs.clear();
            }),
            vec![],
            "fixedresources.virtualizationMode HVM without fixedresources.kernel boots from the first disk, and volumeRefList is empty",
        ),
        (
            "a ramdisk without its kernel",
            with(|vm| vm.kernel.clear()),
            vec![],
            "fixedresources.ramdisk \"/guest/initramfs.cpio.gz\" without fixedresources.kernel",
        ),
        (
            "UEFI by boot mode",
            with(|vm| vm.boot_mode = proto::VmBootMode::Uefi as i32),
            vec![],
            "fixedresources.bootMode VM_BOOT_MODE_UEFI: UEFI firmware (OVMF) is not supported yet",
        ),
        (
            "NOHYPER without a volume for its image",
            with(|vm| vm.virtualization_mode = VmMode::Nohyper as i32),
            vec![],
            "fixedresources.virtualizationMode NOHYPER: volumeRefList is empty; the first volume is the container's image",
        ),
        (
            "FML",
            with(|vm| vm.virtualization_mode = VmMode::Fml as i32),
            vec![],
            "fixedresources.virtualizationMode FML",
        ),
        (
            "LEGACY",
            with(|vm| vm.virtualization_mode = VmMode::Legacy as i32),
            vec![],
            "fixedresources.virtualizationMode LEGACY",
        ),
        (
            "a mode EVE does not define",
            with(|vm| vm.virtualization_mode = 42),
            vec![],
            "fixedresources.virtualizationMode 42",
        ),
        (
            "no memory",
            with(|vm| vm.memory = 0),
            vec![],
            "fixedresources.memory 0",
        ),
        (
            "UEFI by EVE's OVMF boot loader",
            with(|vm| vm.bootloader = "/usr/lib/xen/boot/ovmf.bin".into()),
            vec![],
            "fixedresources.bootloader \"/usr/lib/xen/boot/ovmf.bin\": UEFI firmware (OVMF) is not supported yet",
        ),
        (
            "a boot loader Cairn does not know",
            with(|vm| vm.bootloader = "/boot/grub.efi".into()),
            vec![],
            "fixedresources.bootloader \"/boot/grub.efi\": not a firmware Cairn knows",
        ),
        ("no fixedresources", None, vec![], "fixedresources: missing"),
        (
            "drives only",
            Some(vm_resources()),
            vec![proto::Drive::default()],
            "drives: EVE's deprecated drives",
        ),
    ];
    for (what, resources, drives, reason) in cases {
        let mut app = eve_app(APP, resources);
        app.drives = drives;
        // A runnable app beside it: one app Cairn cannot run does not refuse the config.
        let device = config(vec![app, eve_app(OTHER, Some(vm_resources()))]);
        let app = &device.apps[0];
        assert_eq!(app.domain, None, "{what}");
        assert!(
            app.unrunnable
                .as_deref()
                .is_some_and(|r| r.starts_with(reason)),
            "{what}: {:?}",
            app.unrunnable
        );
        assert!(
            matches!(device.apps[1].domain, Some(DomainSpec::Vm(_))),
            "{what}"
        );
    }
}

#[test]
fn cairns_extension_wins_over_eves_fields() {
    let mut app = eve_app(APP, Some(vm_resources()));
    app.cairn_domain = Some(CairnDomain {
        kind: "process".into(),
        command: "/bin/true".into(),
        ..Default::default()
    });
    let device = config(vec![app]);
    assert!(
        matches!(&device.apps[0].domain, Some(DomainSpec::Process(p)) if p.command.to_str() == Some("/bin/true")),
        "{:?}",
        device.apps[0].domain
    );
    assert_eq!(device.apps[0].unrunnable, None);

    // An extension Cairn cannot run is still the extension's fault: the config is refused.
    let mut app = eve_app(APP, None);
    app.cairn_domain = Some(CairnDomain {
        kind: "vm".into(),
        kernel: "/k".into(),
        ..Default::default()
    });
    let edge = EdgeDevConfig {
        apps: vec![app],
        ..Default::default()
    };
    assert_eq!(
        from_proto(&edge).unwrap_err().path,
        "apps[0].domain.memory_mib"
    );
}

//! The controller's `EdgeDevConfig` into a [`DeviceConfig`](super::DeviceConfig).

use std::collections::BTreeMap;

use cairn_types::{
    AppInstanceConfig, AppInstanceOpsCmd, ConsistencyGroup, ContentFormat, ContentTreeConfig,
    DatastoreConfig, DirRestoreMode, DomainSpec, ProcessSpec, Retention, SnapshotConfig,
    SnapshotDesc, SnapshotPolicy, SnapshotType, UUIDandVersion, VmSpec, VolumeConfig, VolumeFormat,
    VolumeOrigin, VolumeRefConfig,
};
use uuid::Uuid;

use crate::proto;

use super::clones::{CloneSpec, apply_clones};
use super::groups::apply_groups;
use super::local::{QuiesceText, check_tenant, content_tree, quiesce_hooks, unique_datastores};
use super::validate::{mark_unusable_volumes, restart_policy, snapshot_mode, validate};
use super::{ConfigError, DeviceConfig};

/// Converts and validates the controller's config.
pub fn from_proto(config: &proto::EdgeDevConfig) -> Result<DeviceConfig, ConfigError> {
    let mut apps = Vec::new();
    let mut clones = Vec::new();
    let mut exports = Vec::new();
    for (i, app) in config.apps.iter().enumerate() {
        let made = proto_app(app, &format!("apps[{i}]"))?;
        for (j, request) in app.cairn_export_requests.iter().enumerate() {
            let at = format!("apps[{i}].cairn_export_requests[{j}]");
            let text = super::remotes::ExportRequestText {
                id: parse_uuid(&request.id, &format!("{at}.id"))?,
                snapshot: parse_uuid(&request.snapshot, &format!("{at}.snapshot"))?,
                remote: &request.remote,
                prefix: &request.prefix,
                incremental: request.incremental,
            };
            let export = super::remotes::export_request(made.uuid_and_version.uuid, text, &at)?;
            exports.push((at, export));
        }
        apps.push(made);
        if let Some(clone) = &app.cairn_clone {
            let at = format!("apps[{i}].cairn_clone");
            clones.push(CloneSpec {
                app: i,
                field: "cairn_clone",
                source: parse_uuid(&clone.app, &format!("{at}.app"))?,
                snapshot: parse_uuid(&clone.snapshot, &format!("{at}.snapshot"))?,
            });
        }
    }
    let mut volumes = Vec::new();
    for (i, volume) in config.volumes.iter().enumerate() {
        volumes.push(proto_volume(volume, &format!("volumes[{i}]"))?);
    }
    let mut groups = Vec::new();
    for (i, group) in config.cairn_groups.iter().enumerate() {
        groups.push(proto_group(group, &format!("cairn_groups[{i}]"))?);
    }
    let mut datastores = Vec::new();
    for (i, ds) in config.datastores.iter().enumerate() {
        datastores.push(DatastoreConfig {
            uuid: parse_uuid(&ds.id, &format!("datastores[{i}].id"))?,
            // EVE publishes `DType.String()`; an unknown number stays visible as its number.
            ds_type: proto::DsType::try_from(ds.d_type)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| format!("DsType({})", ds.d_type)),
            fqdn: ds.fqdn.clone(),
            dpath: ds.dpath.clone(),
            ds_cert_pem: ds
                .ds_cert_pem
                .iter()
                .map(|pem| String::from_utf8_lossy(pem).into_owned())
                .collect(),
            api_key: ds.api_key.clone(),
            password: ds.password.clone(),
        });
    }
    let datastores = unique_datastores(datastores, "datastores")?;
    let mut content_trees = Vec::new();
    for (i, tree) in config.content_info.iter().enumerate() {
        content_trees.push(proto_content_tree(
            tree,
            &datastores,
            &format!("contentInfo[{i}]"),
        )?);
    }
    let baseos = config.baseos.as_ref().map(|b| {
        super::baseos_config(
            &b.content_tree_uuid,
            &b.base_os_version,
            b.retry_update.as_ref().map_or(0, |cmd| cmd.counter),
            b.activate,
            &content_trees,
        )
    });
    let mut config = DeviceConfig {
        apps,
        volumes,
        content_trees,
        baseos,
        config_items: config
            .config_items
            .iter()
            .map(|item| (item.key.clone(), item.value.clone()))
            .collect(),
        edgeview: config.edgeview.as_ref().map(proto_edgeview),
        shutdown_counter: config.shutdown.as_ref().map(|cmd| cmd.counter),
        device_name: config.device_name.clone(),
        remotes: config
            .cairn_remotes
            .iter()
            .map(|r| cairn_types::RemoteConfig {
                id: r.id.clone(),
                endpoint: r.endpoint.clone(),
                region: r.region.clone(),
                bucket: r.bucket.clone(),
                prefix: r.prefix.clone(),
                credentials_file: r.credentials_file.clone().into(),
                ca_cert_file: r.ca_cert_file.clone().into(),
                bandwidth_limit: r.bandwidth_limit,
                encryption_key_file: r.encryption_key_file.clone().into(),
            })
            .collect(),
        exports: Vec::new(),
    };
    super::remotes::settle_exports(&mut config, exports, "cairn_export", "cairn_remotes")?;
    crate::container::image_volumes_are_dirs(&mut config);
    mark_unusable_volumes(&mut config);
    validate(&config)?;
    apply_groups(&mut config, groups, "cairn_groups")?;
    apply_clones(&mut config, &clones)?;
    Ok(config)
}

fn proto_group(group: &proto::CairnGroup, path: &str) -> Result<ConsistencyGroup, ConfigError> {
    let members = group
        .members
        .iter()
        .enumerate()
        .map(|(j, m)| parse_uuid(m, &format!("{path}.members[{j}]")))
        .collect::<Result<_, _>>()?;
    let policy = policy(
        PolicyText {
            schedule: &group.schedule,
            time_zone: &group.time_zone,
            when_stopped: false,
            expiry: &group.expiry,
            retention: group
                .retention
                .as_ref()
                .map(proto_retention)
                .unwrap_or_default(),
            pattern: &group.pattern,
            // A group snapshot stops its members (they meet at stop barriers).
            mode: cairn_types::SnapshotMode::Stopped,
            export: None,
        },
        path,
    )?;
    Ok(ConsistencyGroup {
        id: parse_uuid(&group.id, &format!("{path}.id"))?,
        name: group.name.clone(),
        members,
        policy,
    })
}

/// A snapshot policy as either source spells it.
pub(super) struct PolicyText<'a> {
    pub(super) schedule: &'a str,
    pub(super) time_zone: &'a str,
    pub(super) when_stopped: bool,
    pub(super) expiry: &'a str,
    pub(super) retention: Retention,
    pub(super) pattern: &'a str,
    pub(super) mode: cairn_types::SnapshotMode,
    /// Checked by the source (its remote against the config's remotes).
    pub(super) export: Option<cairn_types::ScheduledExport>,
}

/// Checks every part of a policy, naming the field at fault.
pub(super) fn policy(
    text: PolicyText<'_>,
    path: &str,
) -> Result<Option<Box<SnapshotPolicy>>, ConfigError> {
    let wrong = |field: &str, e: cairn_types::policy::PolicyError| {
        ConfigError::at(format!("{path}.{field}"), e.to_string())
    };
    cairn_types::policy::parse_zone(text.time_zone).map_err(|e| wrong("time_zone", e))?;
    if !text.schedule.trim().is_empty() {
        cairn_types::policy::Schedule::parse(text.schedule, text.time_zone)
            .map_err(|e| wrong("schedule", e))?;
    }
    let expiry_seconds = if text.expiry.trim().is_empty() {
        0
    } else {
        cairn_types::policy::parse_duration(text.expiry).map_err(|e| wrong("expiry", e))?
    };
    cairn_types::policy::check_pattern(text.pattern).map_err(|e| wrong("pattern", e))?;
    let policy = SnapshotPolicy {
        schedule: text.schedule.trim().to_string(),
        time_zone: text.time_zone.trim().to_string(),
        schedule_when_stopped: text.when_stopped,
        mode: text.mode,
        expiry_seconds,
        retention: text.retention,
        pattern: text.pattern.to_string(),
        export: text.export,
    };
    Ok((policy != SnapshotPolicy::default()).then(|| Box::new(policy)))
}

pub(super) fn proto_retention(r: &proto::CairnRetention) -> Retention {
    Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
    }
}

/// A per-snapshot expiry: empty is 0 (as the policy says).
pub(super) fn expiry(text: &str, path: &str) -> Result<u64, ConfigError> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    cairn_types::policy::parse_duration(text).map_err(|e| ConfigError::at(path, e.to_string()))
}

pub(super) fn parse_uuid(text: &str, path: &str) -> Result<Uuid, ConfigError> {
    text.parse()
        .map_err(|e| ConfigError::at(path, format!("{text:?} is not a UUID: {e}")))
}

fn proto_counter(cmd: &Option<proto::InstanceOpsCmd>) -> AppInstanceOpsCmd {
    let cmd = cmd.clone().unwrap_or_default();
    AppInstanceOpsCmd {
        counter: cmd.counter,
        apply_time: cmd.ops_time,
    }
}

fn proto_app(app: &proto::AppInstanceConfig, path: &str) -> Result<AppInstanceConfig, ConfigError> {
    let id = app
        .uuidandversion
        .as_ref()
        .ok_or_else(|| ConfigError::at(format!("{path}.uuidandversion"), "missing"))?;
    let snapshot = app.snapshot.clone().unwrap_or_default();
    let mut snapshots = Vec::new();
    for (i, desc) in snapshot.snapshots.iter().enumerate() {
        let at = format!("{path}.snapshot.snapshots[{i}]");
        snapshots.push(SnapshotDesc {
            snapshot_id: parse_uuid(&desc.id, &format!("{at}.id"))?,
            snapshot_type: match proto::SnapshotType::try_from(desc.r#type) {
                Ok(proto::SnapshotType::AppUpdate) => SnapshotType::AppUpdate,
                Ok(proto::SnapshotType::Immediate) => SnapshotType::Immediate,
                Ok(proto::SnapshotType::Unspecified) => SnapshotType::Unspecified,
                Err(_) => {
                    return Err(ConfigError::at(
                        format!("{at}.type"),
                        format!("unknown snapshot type {}", desc.r#type),
                    ));
                }
            },
            name: desc.cairn_name.clone(),
            description: desc.cairn_description.clone(),
            expiry_seconds: expiry(&desc.cairn_expiry, &format!("{at}.cairn_expiry"))?,
            group_id: if desc.cairn_group.trim().is_empty() {
                Uuid::nil()
            } else {
                parse_uuid(desc.cairn_group.trim(), &format!("{at}.cairn_group"))?
            },
            mode: snapshot_mode(&desc.cairn_mode, &format!("{at}.cairn_mode"))?,
            scheduled: false,
        });
    }
    let mut refs = Vec::new();
    for (i, volume) in app.volume_ref_list.iter().enumerate() {
        refs.push(VolumeRefConfig {
            volume_id: parse_uuid(&volume.uuid, &format!("{path}.volume_ref_list[{i}].uuid"))?,
            generation_counter: volume.generation_count,
            local_generation_counter: 0,
            mount_dir: volume.mount_dir.clone(),
        });
    }
    // Cairn's extension wins over EVE's fields: only a Cairn-aware controller sends it, and it
    // can say more (a process, a guest agent). EVE's fields alone describe a VM.
    let (domain, unrunnable) = match &app.cairn_domain {
        Some(d) => (
            Some(proto_domain(d, &format!("{path}.cairn_domain"))?),
            None,
        ),
        None => match eve_domain(app) {
            Ok(spec) => (Some(spec), None),
            Err(reason) => (None, Some(reason)),
        },
    };
    check_tenant(&app.cairn_tenant, &format!("{path}.tenant"))?;
    Ok(AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: parse_uuid(&id.uuid, &format!("{path}.uuidandversion.uuid"))?,
            version: id.version.clone(),
        },
        display_name: app.displayname.clone(),
        activate: app.activate,
        volume_ref_config_list: refs,
        restart_cmd: proto_counter(&app.restart),
        purge_cmd: proto_counter(&app.purge),
        snapshot: SnapshotConfig {
            active_snapshot: snapshot.active_snapshot,
            max_snapshots: snapshot.max_snapshots,
            rollback_cmd: proto_counter(&snapshot.rollback_cmd),
            snapshots,
            policy: policy(
                PolicyText {
                    schedule: &snapshot.cairn_schedule,
                    time_zone: &snapshot.cairn_time_zone,
                    when_stopped: snapshot.cairn_schedule_when_stopped,
                    expiry: &snapshot.cairn_expiry,
                    retention: snapshot
                        .cairn_retention
                        .as_ref()
                        .map(proto_retention)
                        .unwrap_or_default(),
                    pattern: &snapshot.cairn_pattern,
                    mode: snapshot_mode(
                        &snapshot.cairn_schedule_mode,
                        &format!("{path}.snapshot.cairn_schedule_mode"),
                    )?,
                    export: match &snapshot.cairn_export {
                        None => None,
                        Some(e) => Some(super::remotes::scheduled_export(
                            &e.remote,
                            &e.prefix,
                            e.full_every,
                            e.keep_exports,
                            &format!("{path}.snapshot.cairn_export"),
                        )?),
                    },
                },
                &format!("{path}.snapshot"),
            )?,
        },
        domain,
        unrunnable,
        // The mode as EVE names it, whatever Cairn makes of it (PV and HVM run alike).
        virtualization_mode: app
            .fixedresources
            .as_ref()
            .and_then(|vm| proto::VmMode::try_from(vm.virtualization_mode).ok())
            .map(|mode| mode.as_str_name().to_string())
            .unwrap_or_default(),
        tenant: app.cairn_tenant.clone(),
        start_delay_seconds: app.start_delay_in_seconds,
        restart_policy: restart_policy(
            &app.cairn_restart_policy,
            &format!("{path}.cairn_restart_policy"),
        )?,
        quiesce: match &app.cairn_quiesce {
            None => None,
            // Protobuf cannot tell an empty list or a 0 from an absent one: empty is no hook,
            // 0 the default timeout.
            Some(q) => Some(quiesce_hooks(
                QuiesceText {
                    pre: (!q.pre.is_empty()).then(|| q.pre.clone()),
                    post: (!q.post.is_empty()).then(|| q.post.clone()),
                    timeout_seconds: (q.timeout_seconds != 0).then_some(q.timeout_seconds),
                    proceed_without_guest_agent: q.proceed_without_guest_agent,
                },
                parse_uuid(&id.uuid, &format!("{path}.uuidandversion.uuid"))?,
                &format!("{path}.cairn_quiesce"),
            )?),
        },
        ..Default::default()
    })
}

/// The domain of an app described only with EVE's fields: a VM from `fixedresources`, its
/// disks in `volumeRefList` order, booted from `kernel` directly or, without one, from its first
/// disk through the BIOS (EVE's KVM on amd64: no `bootloader` means qemu's SeaBIOS). What EVE
/// can express and Cairn cannot run yet is not a fault of the config: `Err` says which field and why, and the app is
/// accepted and reported broken with it (EVE's field names, as the controller knows them).
fn eve_domain(app: &proto::AppInstanceConfig) -> Result<DomainSpec, String> {
    // EVE: "VolumeRefs ... will supersede drives"; drives name images, not volumes.
    if app.volume_ref_list.is_empty() && !app.drives.is_empty() {
        return Err(
            "drives: EVE's deprecated drives (images, not volumes) are not supported; list the app's volumes in volumeRefList"
                .into(),
        );
    }
    let Some(vm) = &app.fixedresources else {
        return Err(
            "fixedresources: missing: nothing says how to run the app (give fixedresources with memory, kernel and ramdisk)"
                .into(),
        );
    };
    let mode = match proto::VmMode::try_from(vm.virtualization_mode) {
        // On KVM, EVE runs PV and HVM alike as a q35 VM, from a kernel or from the first disk.
        Ok(mode @ (proto::VmMode::Pv | proto::VmMode::Hvm)) => mode.as_str_name(),
        Ok(proto::VmMode::Legacy) => {
            return Err(
                "fixedresources.virtualizationMode LEGACY: emulated IDE disks and e1000 network are not supported; use HVM or PV (virtio)"
                    .into(),
            );
        }
        Ok(proto::VmMode::Fml) => {
            return Err(
                "fixedresources.virtualizationMode FML: the machine-learning mode (GPU passthrough) is not supported; use HVM or PV"
                    .into(),
            );
        }
        Ok(proto::VmMode::Nohyper) => return crate::container::eve_container(app),
        Ok(proto::VmMode::Filler) => {
            return Err(
                "fixedresources.virtualizationMode 2 (PVH): not supported; use HVM or PV".into(),
            );
        }
        Err(_) => {
            return Err(format!(
                "fixedresources.virtualizationMode {}: not a mode EVE defines; use HVM or PV",
                vm.virtualization_mode
            ));
        }
    };
    firmware(vm)?;
    if vm.kernel.is_empty() {
        if !vm.ramdisk.is_empty() {
            return Err(format!(
                "fixedresources.ramdisk {:?} without fixedresources.kernel: a ramdisk needs the kernel it belongs to; give kernel, or neither to boot from the first disk",
                vm.ramdisk
            ));
        }
        // qemu takes a command line only with -kernel; a disk's boot loader has its own.
        if !vm.extraargs.is_empty() {
            return Err(format!(
                "fixedresources.extraargs {:?} without fixedresources.kernel: a disk boot takes its command line from the disk's boot loader; drop extraargs or give kernel",
                vm.extraargs
            ));
        }
        if app.volume_ref_list.is_empty() {
            return Err(format!(
                "fixedresources.virtualizationMode {mode} without fixedresources.kernel boots from the first disk, and volumeRefList is empty: give the app a bootable volume or a kernel"
            ));
        }
    }
    if vm.memory == 0 {
        return Err("fixedresources.memory 0: a VM needs memory (KiB > 0)".into());
    }
    Ok(DomainSpec::Vm(VmSpec {
        // Empty: the domain-manager boots the first disk through SeaBIOS.
        kernel: vm.kernel.clone().into(),
        initrd: vm.ramdisk.clone().into(),
        append: vm.extraargs.clone(),
        // EVE's memory is in KiB, rounded up to whole MiB as EVE's KVM does.
        memory_mib: vm.memory.div_ceil(1024),
        // EVE's default is one VCPU.
        cpus: vm.vcpus.max(1),
        guest_agent: false,
    }))
}

/// EVE's firmware choice for a KVM VM on amd64 (zedmanager's `MaybeAddDomainConfig`): no
/// `bootloader` (or the `pygrub` EVE drops) is qemu's default SeaBIOS, as is EVE's own
/// `seabios.bin`; OVMF (`ovmf.bin`, `OVMF_CODE.fd`) is UEFI. `boot_mode` is read by EVE's
/// kubevirt only; Cairn refuses UEFI there too rather than boot a UEFI disk through a BIOS.
fn firmware(vm: &proto::VmConfig) -> Result<(), String> {
    const UEFI: &str = "UEFI firmware (OVMF) is not supported yet: Cairn boots disks through SeaBIOS (legacy BIOS, MBR disks); use a BIOS-bootable disk or give fixedresources.kernel";
    match vm.bootloader.as_str() {
        "" | "/usr/bin/pygrub" | "/usr/lib/xen/boot/seabios.bin" => {}
        loader if loader.to_ascii_lowercase().contains("ovmf") => {
            return Err(format!("fixedresources.bootloader {loader:?}: {UEFI}"));
        }
        loader => {
            return Err(format!(
                "fixedresources.bootloader {loader:?}: not a firmware Cairn knows (EVE's /usr/lib/xen/boot/seabios.bin or none boots through SeaBIOS)"
            ));
        }
    }
    if vm.boot_mode == proto::VmBootMode::Uefi as i32 {
        return Err(format!("fixedresources.bootMode VM_BOOT_MODE_UEFI: {UEFI}"));
    }
    Ok(())
}

fn proto_domain(d: &proto::CairnDomain, path: &str) -> Result<DomainSpec, ConfigError> {
    match d.kind.as_str() {
        "vm" => Ok(DomainSpec::Vm(VmSpec {
            kernel: d.kernel.clone().into(),
            initrd: d.initrd.clone().into(),
            append: d.append.clone(),
            memory_mib: d.memory_mib,
            cpus: d.cpus.max(1),
            guest_agent: d.guest_agent,
        })),
        "process" => Ok(DomainSpec::Process(ProcessSpec {
            command: d.command.clone().into(),
            args: d.args.clone(),
            env: d.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: (!d.working_dir.is_empty()).then(|| d.working_dir.clone().into()),
        })),
        other => Err(ConfigError::at(
            format!("{path}.kind"),
            format!("{other:?} is not a domain kind (vm or process)"),
        )),
    }
}

fn proto_content_tree(
    tree: &proto::ContentTree,
    datastores: &BTreeMap<Uuid, DatastoreConfig>,
    path: &str,
) -> Result<ContentTreeConfig, ConfigError> {
    // EVE: `ds_ids_list` supersedes the deprecated `dsId`.
    let ids = if tree.ds_ids_list.is_empty() {
        vec![tree.ds_id.clone()]
    } else {
        tree.ds_ids_list.clone()
    };
    let datastore_id_list = ids
        .iter()
        .enumerate()
        .map(|(j, id)| {
            let at = if tree.ds_ids_list.is_empty() {
                format!("{path}.dsId")
            } else {
                format!("{path}.ds_ids_list[{j}]")
            };
            parse_uuid(id, &at)
        })
        .collect::<Result<_, _>>()?;
    let format = match proto::Format::try_from(tree.iformat) {
        Ok(proto::Format::Raw) => ContentFormat::Raw,
        Ok(proto::Format::Qcow) => ContentFormat::Qcow,
        Ok(proto::Format::Qcow2) => ContentFormat::Qcow2,
        Ok(proto::Format::Vhd) => ContentFormat::Vhd,
        Ok(proto::Format::Vmdk) => ContentFormat::Vmdk,
        Ok(proto::Format::Ova) => ContentFormat::Ova,
        Ok(proto::Format::Vhdx) => ContentFormat::Vhdx,
        Ok(proto::Format::Container) => ContentFormat::Container,
        Ok(proto::Format::Iso) => ContentFormat::Iso,
        Ok(proto::Format::Pvc) => ContentFormat::Pvc,
        Ok(proto::Format::FmtUnknown) | Err(_) => ContentFormat::Unknown,
    };
    Ok(content_tree(
        ContentTreeConfig {
            content_id: parse_uuid(&tree.uuid, &format!("{path}.uuid"))?,
            datastore_id_list,
            relative_url: tree.url.clone(),
            format,
            content_sha256: tree.sha256.trim().to_ascii_lowercase(),
            max_download_size: tree.max_size_bytes,
            generation_counter: tree.generation_count,
            display_name: tree.display_name.clone(),
            datastores: Vec::new(),
        },
        datastores,
    ))
}

fn proto_volume(volume: &proto::Volume, path: &str) -> Result<VolumeConfig, ConfigError> {
    let format = match volume.cairn_format.as_str() {
        "" | "qcow2" => VolumeFormat::Qcow2,
        "raw" => VolumeFormat::Raw,
        "dir" => VolumeFormat::Dir,
        other => {
            return Err(ConfigError::at(
                format!("{path}.cairn_format"),
                format!("{other:?} is not a volume format (qcow2, raw or dir)"),
            ));
        }
    };
    let restore_mode = match volume.cairn_restore_mode.as_str() {
        "" | "auto" => DirRestoreMode::Auto,
        "btrfs_swap" => DirRestoreMode::BtrfsSwap,
        "squashfs_overlay" => DirRestoreMode::SquashfsOverlay,
        "rsync" => DirRestoreMode::Rsync,
        "copy" => DirRestoreMode::Copy,
        other => {
            return Err(ConfigError::at(
                format!("{path}.cairn_restore_mode"),
                format!(
                    "{other:?} is not a restore mode (auto, btrfs_swap, squashfs_overlay, rsync or copy)"
                ),
            ));
        }
    };
    let max_vol_size = u64::try_from(volume.maxsizebytes).map_err(|_| {
        ConfigError::at(
            format!("{path}.maxsizebytes"),
            format!("{} is negative", volume.maxsizebytes),
        )
    })?;
    Ok(VolumeConfig {
        volume_id: parse_uuid(&volume.uuid, &format!("{path}.uuid"))?,
        generation_counter: volume.generation_count,
        display_name: volume.display_name.clone(),
        max_vol_size,
        format,
        origin: proto_origin(volume, path)?,
        purgeable: volume.cairn_purgeable,
        restore_mode,
        ..Default::default()
    })
}

/// A volume's origin: EVE's `VCOT_DOWNLOAD` names a content tree; Cairn's base image is the
/// other origin a controller can give, not together with a download.
fn proto_origin(volume: &proto::Volume, path: &str) -> Result<VolumeOrigin, ConfigError> {
    let download = volume
        .origin
        .as_ref()
        .filter(|o| o.r#type == proto::VolumeContentOriginType::VcotDownload as i32);
    match (download, volume.cairn_base_image.is_empty()) {
        (Some(_), false) => Err(ConfigError::at(
            format!("{path}.origin"),
            format!(
                "volume {} is VCOT_DOWNLOAD and has a cairn_base_image: give one origin",
                volume.uuid
            ),
        )),
        (Some(origin), true) => Ok(VolumeOrigin::ContentTree {
            id: parse_uuid(
                &origin.download_content_tree_id,
                &format!("{path}.origin.downloadContentTreeID"),
            )?,
        }),
        (None, false) => Ok(VolumeOrigin::BaseImage {
            path: volume.cairn_base_image.clone().into(),
            sha256: volume.cairn_base_sha256.clone(),
        }),
        (None, true) => Ok(VolumeOrigin::Blank),
    }
}

/// EVE's `parseEvConfig`: the token, the dispatcher certificates and the three policies as
/// given (an absent policy allows nothing).
fn proto_edgeview(ev: &proto::EdgeViewConfig) -> cairn_types::EdgeviewConfig {
    let policy = |allowed: Option<bool>| cairn_types::EvPolicy {
        enabled: allowed.unwrap_or(false),
    };
    cairn_types::EdgeviewConfig {
        jw_token: ev.token.clone(),
        disp_cert_pem: ev
            .disp_cert_pem
            .iter()
            .map(|pem| String::from_utf8_lossy(pem).into_owned())
            .collect(),
        dev_policy: policy(ev.dev_policy.as_ref().map(|p| p.allow_dev)),
        app_policy: policy(ev.app_policy.as_ref().map(|p| p.allow_app)),
        ext_policy: policy(ev.ext_policy.as_ref().map(|p| p.allow_ext)),
        gen_id: ev.generation_id,
        ..Default::default()
    }
}

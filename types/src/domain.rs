//! Domains: how the domain-manager is asked to run an app, and what it reports.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_persist::Persist;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::common::{ErrorDescription, UUIDandVersion, go_time, null_as_default};
use crate::volume::VolumeFormat;

/// A qemu VM booted from a kernel and initrd, or from its first disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct VmSpec {
    /// Empty: no direct kernel boot; the BIOS (SeaBIOS) boots the first disk, and `initrd`
    /// and `append` must be empty too (the disk's boot loader has its own).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    #[serde(rename = "MemoryMiB")]
    pub memory_mib: u32,
    pub cpus: u32,
    /// Cairn: the guest runs qemu-guest-agent. The VM gets its virtio-serial port
    /// (`org.qemu.guest_agent.0`, socket `qga.sock` in the app's run directory), and live
    /// snapshots freeze the guest's filesystems through it.
    pub guest_agent: bool,
}

/// A plain process; its volumes are directories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ProcessSpec {
    pub command: PathBuf,
    #[serde(deserialize_with = "null_as_default")]
    pub args: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
}

/// An OCI container (EVE's NOHYPER apps) run by an OCI runtime: its first disk is the root
/// filesystem volume made from the image (`rootfs/` and `image-config.json`), the others are
/// mounted at their `MountDir`. Entrypoint, command, env, working dir and user come from the
/// image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ContainerSpec {
    /// The cgroup memory limit; 0: none.
    #[serde(rename = "MemoryMiB")]
    pub memory_mib: u32,
    /// The CPU limit in whole CPUs (cgroup CPU quota); 0: none.
    pub cpus: u32,
    /// Added to (and overriding) the image's environment.
    #[serde(deserialize_with = "null_as_default")]
    pub env: BTreeMap<String, String>,
}

/// A container's name: unique per run directory and app, so two device roots on one host never
/// share one, nor their cgroups (the domain-manager names it, the app-manager freezes it).
pub fn container_id(run_dir: &std::path::Path, app: Uuid) -> String {
    let digest = Uuid::new_v5(&Uuid::NAMESPACE_URL, run_dir.as_os_str().as_encoded_bytes());
    format!("cairn-{}-{app}", &digest.simple().to_string()[..8])
}

/// A container's cgroup path, as its runtime spec names it (`linux.cgroupsPath`).
pub fn container_cgroup(run_dir: &std::path::Path, app: Uuid) -> String {
    format!("/cairn/{}", container_id(run_dir, app))
}

/// How an app runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(tag = "Kind")]
pub enum DomainSpec {
    Vm(VmSpec),
    Process(ProcessSpec),
    Container(ContainerSpec),
}

/// A volume as the domain sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct DiskConfig {
    #[serde(rename = "VolumeKey")]
    #[persist(mandatory)]
    pub volume_key: String,
    pub file_location: PathBuf,
    pub format: VolumeFormat,
    pub read_only: bool,
    /// For process apps: where the directory appears to the app.
    pub mount_dir: String,
}

/// app-manager → domain-manager. Key: app UUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(rename_all = "PascalCase")]
#[persist(record = "DomainConfig", version = 1)]
pub struct DomainConfig {
    #[serde(rename = "UUIDandVersion")]
    #[persist(mandatory)]
    pub uuid_and_version: UUIDandVersion,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub activate: bool,
    #[persist(mandatory)]
    pub spec: DomainSpec,
    #[serde(default, deserialize_with = "null_as_default")]
    pub disk_config_list: Vec<DiskConfig>,
    #[serde(default)]
    pub restart_counter: u32,
    #[serde(default)]
    pub purge_counter: u32,
    /// Cairn: start the VM from the memory and device state saved under this internal snapshot
    /// tag (`-loadvm`), after a rollback to a stateful snapshot; empty: boot.
    #[serde(default)]
    pub load_state_tag: String,
}

impl DomainConfig {
    pub fn app_uuid(&self) -> Uuid {
        self.uuid_and_version.uuid
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum DomainState {
    #[default]
    Halted,
    Booting,
    Running,
    Halting,
    /// Died on its own or failed to start; see the error. Restarting is the app-manager's call.
    Broken,
}

/// domain-manager → app-manager, cli. Key: app UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "DomainStatus", version = 1)]
pub struct DomainStatus {
    #[serde(rename = "UUIDandVersion")]
    #[persist(mandatory)]
    pub uuid_and_version: UUIDandVersion,
    pub display_name: String,
    pub state: DomainState,
    pub activated: bool,
    pub pid: Option<u32>,
    #[serde(with = "go_time")]
    pub boot_time: Option<DateTime<Utc>>,
    pub restart_counter: u32,
    pub purge_counter: u32,
    pub error: ErrorDescription,
    /// The qemu accelerator in use (`kvm` or `tcg`); empty for a process.
    pub accel: String,
    /// How the domain last ended (`exit status 0`, `killed by signal 9`, or why it is unknown);
    /// empty while it has not ended.
    pub exit_status: String,
    /// A running VM stopped by a `Pause` live operation.
    pub paused: bool,
    /// QMP socket of a VM (empty for a process).
    pub qmp_socket: PathBuf,
    /// The VM's serial console, or the process's stdout and stderr.
    pub log_path: PathBuf,
}

/// A live operation on a running domain (VMs only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum DomainLiveOp {
    /// Stop the guest's CPUs (QMP `stop`).
    #[default]
    Pause,
    /// Continue a paused guest (QMP `cont`).
    Resume,
    /// Disk-only internal snapshot `Tag` of every writable qcow2 disk, atomically
    /// (`transaction` of `blockdev-snapshot-internal-sync`).
    DiskSnapshotCreate,
    /// Delete the disk-only internal snapshot `Tag` from every writable qcow2 disk.
    DiskSnapshotDelete,
    /// Memory and disks: QMP `snapshot-save` job; vmstate goes into the first writable qcow2 disk.
    StateSave,
    /// Revert memory and disks to `Tag` (`snapshot-load` job); a paused VM stays paused.
    StateLoad,
    /// Delete the stateful snapshot `Tag` (`snapshot-delete` job).
    StateDelete,
}

/// app-manager → domain-manager: run one live operation. Key: request UUID. Executed at most
/// once per request UUID; repeating an operation takes a new request UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "DomainLiveOpConfig", version = 1)]
pub struct DomainLiveOpConfig {
    #[serde(rename = "RequestID")]
    #[persist(mandatory)]
    pub request_id: Uuid,
    #[serde(rename = "AppUUID")]
    #[persist(mandatory)]
    pub app_uuid: Uuid,
    pub op: DomainLiveOp,
    /// Snapshot name for the snapshot operations.
    pub tag: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
pub enum DomainLiveOpState {
    #[default]
    InProgress,
    Done,
    Failed,
}

/// domain-manager → app-manager: the outcome of a [`DomainLiveOpConfig`]. Key: request UUID.
/// Unpublished when the request is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "DomainLiveOpStatus", version = 1)]
pub struct DomainLiveOpStatus {
    #[serde(rename = "RequestID")]
    #[persist(mandatory)]
    pub request_id: Uuid,
    #[serde(rename = "AppUUID")]
    pub app_uuid: Uuid,
    pub op: DomainLiveOp,
    pub tag: String,
    pub state: DomainLiveOpState,
    pub error: ErrorDescription,
    #[serde(with = "go_time")]
    pub started: Option<DateTime<Utc>>,
    /// Wall time of the operation in milliseconds, once finished.
    pub duration_ms: u64,
    /// How long the guest's CPUs were stopped by the operation, in milliseconds.
    pub pause_ms: u64,
}

/// domain-manager → config-agent: what an app's processes use, gathered from `/proc` every
/// few seconds (EVE's `DomainMetric`, published by domainmgr for zedagent's metrics). Key: app
/// UUID. Memory in MiB; CPU in nanoseconds since the domain started, divided by its VCPUs as
/// EVE does (`CPUScaled` says by how many).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "DomainMetric", version = 1)]
pub struct DomainMetric {
    #[serde(rename = "UUIDandVersion")]
    #[persist(mandatory)]
    pub uuid_and_version: UUIDandVersion,
    #[serde(rename = "CPUTotalNs")]
    pub cpu_total_ns: u64,
    #[serde(rename = "CPUScaled")]
    pub cpu_scaled: u32,
    /// The VM's memory (`VmSpec.MemoryMiB`); 0 for a process, which has no allotment.
    #[serde(rename = "AllocatedMB")]
    pub allocated_mb: u32,
    /// Resident memory of all the app's processes (qemu's own included for a VM).
    pub used_memory: u32,
    /// The highest `used_memory` seen (the processes' peak resident sets).
    pub max_used_memory: u32,
    /// `allocated_mb - used_memory` for a VM; the host's available memory for a process.
    pub available_memory: u32,
    pub used_memory_percent: f64,
    #[serde(with = "go_time")]
    pub last_heard: Option<DateTime<Utc>>,
    /// Some process of the app runs.
    pub activated: bool,
    /// Cairn: how many processes were counted.
    pub processes: u32,
}

crate::topic!(DomainMetric, |v| v.uuid_and_version.uuid.to_string());
crate::topic!(DomainLiveOpConfig, |v| v.request_id.to_string());
crate::topic!(DomainLiveOpStatus, |v| v.request_id.to_string());
crate::topic!(DomainConfig, |v| v.uuid_and_version.uuid.to_string());
crate::topic!(DomainStatus, |v| v.uuid_and_version.uuid.to_string());

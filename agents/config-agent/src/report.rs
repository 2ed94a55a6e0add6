//! What the device tells the controller: `ZInfoDevice` (the machine and the agent), about
//! its apps `ZInfoApp` with `ZInfoSnapshot` entries, built from the app-manager's
//! `AppInstanceStatus`, and about its volumes `ZInfoVolume` from the volume-manager's
//! `VolumeStatus`, and about its content trees `ZInfoContentTree` from the downloader's
//! `ContentTreeStatus`; queued per object so that the newest report replaces one not sent
//! yet, and retried with backoff while the controller is away.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cairn_types::{
    AppInstanceStatus, ContentTreeState, ContentTreeStatus, ErrorDescription, ErrorSeverity,
    ExportState, ExportStatus, SnapshotInstanceStatus, SnapshotType, SwState, VolumeState,
    VolumeStatus,
};
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::proto::{
    self, ApiCapability, ContentResources, ErrorInfo, InfoContent, Severity, UsageInfo,
    VolumeResources, ZDeviceState, ZInfoApp, ZInfoContentTree, ZInfoDevSw, ZInfoDevice,
    ZInfoManufacturer, ZInfoMsg, ZInfoSnapshot, ZInfoTypes, ZInfoVolume, ZSwState,
};

/// The queue's key of the device's own report (app keys are UUIDs).
pub const DEVICE_KEY: &str = "device";

/// Before a volume's UUID in the queue's key of its report, so that it never meets an app's key.
const VOLUME_KEY_PREFIX: &str = "volume/";

/// The queue's key of a volume's report.
pub fn volume_key(volume: &str) -> String {
    format!("{VOLUME_KEY_PREFIX}{volume}")
}

/// The volume UUID of a queue key made by [`volume_key`].
pub fn volume_of_key(key: &str) -> &str {
    key.strip_prefix(VOLUME_KEY_PREFIX).unwrap_or(key)
}

/// Before a content tree's UUID in the queue's key of its report.
const CONTENT_TREE_KEY_PREFIX: &str = "content/";

/// The queue's key of a content tree's report.
pub fn content_tree_key(tree: &str) -> String {
    format!("{CONTENT_TREE_KEY_PREFIX}{tree}")
}

/// The content tree UUID of a queue key made by [`content_tree_key`].
pub fn content_tree_of_key(key: &str) -> &str {
    key.strip_prefix(CONTENT_TREE_KEY_PREFIX).unwrap_or(key)
}

/// What Cairn tells the controller through `api_capability`. EVE's values are ordinal ("a
/// larger number indicates all lower numbers are also supported"): Cairn has
/// `BaseOs.retry_update` (1, the baseos-manager retries a failed update of the same version
/// when `BaseOS.retry_update.counter` changes), the shutdown command (2),
/// `start_delay_in_seconds` (3), EdgeView (4, the edgeview agent) and volume snapshots (5).
/// Immediate snapshots (13) it has too, but not 6 to 12 (network instances, boot modes, MTU,
/// ...), so 5 is the highest value it may claim; a controller that gates its snapshot UI on
/// VOLUME_SNAPSHOTS offers it.
pub const API_CAPABILITY: ApiCapability = ApiCapability::VolumeSnapshots;

/// One report waiting for the controller.
// At most one per app is queued, so the app variant's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The app's newest status; `None`: the app is gone.
    App(Option<AppInstanceStatus>),
    Device(Box<ZInfoDevice>),
    /// The volume's newest status; `None`: the volume is gone.
    Volume(Option<Box<VolumeStatus>>),
    /// The content tree's newest status; `None`: the tree is gone.
    ContentTree(Option<Box<ContentTreeStatus>>),
    /// The edgeview agent's newest status.
    Edgeview(Box<cairn_types::EdgeviewStatus>),
}

/// The queue key of the edgeview report (EVE queues it under `global`).
pub const EDGEVIEW_KEY: &str = "edgeview";

/// The device's facts as far as the machine tells them; what cannot be read stays empty.
/// Blocking (reads `/proc`, `/sys` and `statvfs` of `persist`).
pub fn device_facts(persist: &Path) -> ZInfoDevice {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpuinfo = read("/proc/cpuinfo");
    let ncpu = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let ncpu = if ncpu > 0 {
        ncpu
    } else {
        std::thread::available_parallelism().map_or(0, usize::from)
    };
    let memory_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let storage = nix::sys::statvfs::statvfs(persist)
        .map(|s| (s.blocks() * s.fragment_size()) >> 20)
        .unwrap_or(0);
    let boot_time = read("/proc/stat")
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 });
    let minfo = ZInfoManufacturer {
        manufacturer: read("/sys/class/dmi/id/sys_vendor"),
        product_name: read("/sys/class/dmi/id/product_name"),
        version: read("/sys/class/dmi/id/product_version"),
        serial_number: read(crate::apply::PRODUCT_SERIAL),
        ..Default::default()
    };
    ZInfoDevice {
        machine_arch: std::env::consts::ARCH.to_string(),
        cpu_arch: std::env::consts::ARCH.to_string(),
        ncpu: ncpu as u32,
        memory: memory_kib >> 10,
        storage,
        // EVE's "SMART is not available".
        power_cycle_counter: -1,
        minfo: (minfo != ZInfoManufacturer::default()).then_some(minfo),
        boot_time,
        host_name: read("/proc/sys/kernel/hostname"),
        sw_list: vec![software(
            std::fs::read_to_string(IMAGE_RELEASE).ok().as_deref(),
        )],
        state: ZDeviceState::ZdeviceStateOnline as i32,
        api_capability: API_CAPABILITY as i32,
        ..last_reboot(persist)
    }
}

/// The last reboot as `cairn up` judged it at its start (`<persist>/boot/last-boot.json`);
/// nothing when no `cairn up` ran (agents started by hand) or its record is unusable.
#[allow(clippy::disallowed_methods)] // blocking: part of `device_facts`, run on the blocking pool
fn last_reboot(persist: &Path) -> ZInfoDevice {
    let path = cairn_types::layout::last_boot(persist);
    let boot = match cairn_persist::load_with_backup::<cairn_types::LastBoot>(&path) {
        Ok(loaded) => loaded.record,
        Err(e) => {
            if !matches!(e.kind, cairn_persist::ErrorKind::NotFound) {
                tracing::warn!(error = %e, "the last reboot reason is not reported");
            }
            return ZInfoDevice::default();
        }
    };
    ZInfoDevice {
        last_reboot_reason: boot.reason,
        last_reboot_time: boot.reboot_time.map(timestamp),
        last_boot_reason: boot.boot_reason as i32,
        restart_counter: boot.restart_counter,
        ..Default::default()
    }
}

/// What the device image says of itself (`images/build` writes it: `NAME=`, `VERSION=`,
/// `SOURCE_DATE_EPOCH=`); absent when the agents run outside the image.
const IMAGE_RELEASE: &str = "/etc/cairn/release";

/// The software list's one entry: Cairn has no A/B image, so the running image (or, outside
/// one, the agent) is the one "partition", active, with the version the image records.
fn software(release: Option<&str>) -> ZInfoDevSw {
    let field = |key: &str| {
        release?.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
    };
    let (short_version, long_version) = match field("VERSION") {
        Some(version) => {
            let name = field("NAME").unwrap_or_else(|| "Cairn device image".into());
            let built = field("SOURCE_DATE_EPOCH")
                .map(|epoch| format!(" (SOURCE_DATE_EPOCH {epoch})"))
                .unwrap_or_default();
            (version.clone(), format!("{name} {version}{built}"))
        }
        None => (
            env!("CARGO_PKG_VERSION").to_string(),
            format!("cairn {}", env!("CARGO_PKG_VERSION")),
        ),
    };
    ZInfoDevSw {
        activated: true,
        partition_label: "IMGA".into(),
        partition_state: "active".into(),
        status: ZSwState::Running as i32,
        short_version,
        long_version,
        ..Default::default()
    }
}

/// The software list from the baseos-manager's root slots and the configured update, as
/// EVE's zedagent makes it (`getSwInfo`, `addUserSwInfo`): the running slot first, then the
/// other, each from the update when it is assigned to that slot (its state, version, progress
/// and error), else from the slot itself; an update not yet assigned to a slot (downloading,
/// verified but not activated, refused) follows as a third entry with no partition. The running
/// entry keeps the long version `device_facts` read from the release file.
pub fn software_list(
    baseos: &cairn_types::BaseOsStatus,
    running: &[ZInfoDevSw],
) -> Vec<ZInfoDevSw> {
    let mut slots: Vec<&cairn_types::BaseOsSlot> = baseos.slots.iter().collect();
    slots.sort_by_key(|s| !s.activated);
    let update = baseos.update.as_ref();
    let mut list: Vec<ZInfoDevSw> = slots
        .into_iter()
        .map(|slot| {
            let long_version = running
                .iter()
                .find(|r| slot.activated && r.activated)
                .map(|r| r.long_version.clone())
                .unwrap_or_else(|| slot.version.clone());
            match update.filter(|u| u.partition_label == slot.partition_label) {
                Some(update) => {
                    let mut info = update_info(update);
                    info.partition_device = slot.partition_device.clone();
                    info.partition_state = slot.partition_state.clone();
                    if slot.activated {
                        info.long_version = long_version;
                    }
                    add_user_status(&mut info, update.too_early);
                    info
                }
                None => {
                    let mut info = ZInfoDevSw {
                        activated: slot.activated,
                        partition_label: slot.partition_label.clone(),
                        partition_device: slot.partition_device.clone(),
                        partition_state: slot.partition_state.clone(),
                        short_version: slot.version.clone(),
                        long_version,
                        ..Default::default()
                    };
                    (info.status, info.download_progress) = if slot.version.is_empty() {
                        (ZSwState::Initial as i32, 0)
                    } else {
                        (ZSwState::Installed as i32, 100)
                    };
                    if !slot.error.is_empty() {
                        info.sw_err = Some(ErrorInfo {
                            description: slot.error.clone(),
                            severity: Severity::Error as i32,
                            ..Default::default()
                        });
                    }
                    add_user_status(&mut info, false);
                    info
                }
            }
        })
        .collect();
    if let Some(update) = update.filter(|u| {
        !baseos
            .slots
            .iter()
            .any(|s| s.partition_label == u.partition_label)
    }) {
        let mut info = update_info(update);
        info.partition_label = String::new();
        add_user_status(&mut info, update.too_early);
        list.push(info);
    }
    list
}

/// The update's own fields of its `ZInfoDevSW` (EVE's `getSwInfo` from a `BaseOsStatus`).
fn update_info(update: &cairn_types::BaseOsUpdateStatus) -> ZInfoDevSw {
    use cairn_types::BaseOsUpdateState as S;
    let status = match update.state {
        _ if update.base_os_version.is_empty() => ZSwState::Initial,
        S::Initial => ZSwState::Initial,
        S::Downloading => ZSwState::DownloadStarted,
        S::Downloaded => ZSwState::Downloaded,
        S::Verifying => ZSwState::Verifying,
        S::Verified => ZSwState::Verified,
        S::Loading => ZSwState::Loading,
        // EVE's `SwState.ZSwState()`: LOADED is reported as DELIVERED.
        S::Loaded => ZSwState::Delivered,
        S::Installed => ZSwState::Installed,
    };
    ZInfoDevSw {
        activated: update.activated,
        partition_label: update.partition_label.clone(),
        status: status as i32,
        short_version: update.base_os_version.clone(),
        download_progress: if status == ZSwState::Initial {
            0
        } else {
            update.progress
        },
        sw_err: update.error.is_error().then(|| error_info(&update.error)),
        sub_status_str: update.step.clone(),
        ..Default::default()
    }
}

/// EVE's `addUserSwInfo`: what the controller's user reads of an entry.
fn add_user_status(info: &mut ZInfoDevSw, too_early: bool) {
    use crate::proto::{BaseOsStatus as User, BaseOsSubStatus as Sub};
    let (user, sub, progress, text): (User, Sub, u32, String) =
        match ZSwState::try_from(info.status).unwrap_or(ZSwState::Initial) {
            ZSwState::Initial
                if info.short_version.is_empty()
                    || (info.partition_state == "unused" && !info.partition_label.is_empty()) =>
            {
                (User::None, Sub::NoneSubstatus, 0, String::new())
            }
            ZSwState::Initial => (
                User::Updating,
                Sub::UpdateInitializing,
                0,
                "Initializing update".into(),
            ),
            ZSwState::DownloadStarted => (
                User::Downloading,
                Sub::DownloadInprogress,
                info.download_progress,
                format!("Download {}% done", info.download_progress),
            ),
            ZSwState::Downloaded if info.activated => (
                User::Downloading,
                Sub::DownloadInprogress,
                100,
                "Download 100% done".into(),
            ),
            ZSwState::Delivered if info.activated => (
                User::DownloadDone,
                Sub::NoneSubstatus,
                0,
                "Downloaded and verified".into(),
            ),
            ZSwState::Delivered if too_early => (
                User::Updating,
                Sub::UpdateDeferred,
                0,
                "Waiting for current image to finish testing before updating again".into(),
            ),
            ZSwState::Installed => match info.partition_state.as_str() {
                "active" if info.activated => (User::Updated, Sub::NoneSubstatus, 0, String::new()),
                "active" => (User::Fallback, Sub::NoneSubstatus, 0, String::new()),
                "updating" => (
                    User::Updating,
                    Sub::UpdateRebooting,
                    0,
                    "About to reboot".into(),
                ),
                "inprogress" if info.activated => (
                    User::Updating,
                    Sub::UpdateTesting,
                    0,
                    "Testing the new image before committing it".into(),
                ),
                "inprogress" => (User::Failed, Sub::NoneSubstatus, 0, String::new()),
                _ => (User::None, Sub::NoneSubstatus, 0, String::new()),
            },
            _ => (User::None, Sub::NoneSubstatus, 0, String::new()),
        };
    info.user_status = user as i32;
    info.sub_status = sub as i32;
    info.sub_status_progress = progress;
    // Cairn's step in words (verifying, writing into the slot) where EVE has no words.
    if !text.is_empty() || info.sub_status_str.is_empty() {
        info.sub_status_str = text;
    }
    if info
        .sw_err
        .as_ref()
        .is_some_and(|e| !e.description.is_empty())
    {
        info.user_status = User::Failed as i32;
    }
}

/// The info message for the device.
pub fn device_info(device: uuid::Uuid, info: ZInfoDevice) -> ZInfoMsg {
    ZInfoMsg {
        ztype: ZInfoTypes::ZiDevice as i32,
        dev_id: device.to_string(),
        info_content: Some(InfoContent::Dinfo(info)),
        at_time_stamp: Some(timestamp(Utc::now())),
    }
}

/// EVE's `PublishEdgeviewToZedCloud`: the token's expiry, when the sessions started and the
/// commands counted.
pub fn edgeview_info(device: uuid::Uuid, status: &cairn_types::EdgeviewStatus) -> ZInfoMsg {
    let expire = DateTime::<Utc>::from_timestamp(status.expire_on as i64, 0);
    ZInfoMsg {
        ztype: ZInfoTypes::ZiEdgeview as i32,
        dev_id: device.to_string(),
        info_content: Some(InfoContent::Evinfo(crate::proto::ZInfoEdgeview {
            expire_time: expire.map(timestamp),
            started_time: status.started_on.map(timestamp),
            count_dev: status.cmd_count_dev,
            count_app: status.cmd_count_app,
            count_ext: status.cmd_count_ext,
        })),
        at_time_stamp: Some(timestamp(Utc::now())),
    }
}

/// The info message for one app. `None` status: the app is gone (EVE sends the bare app id).
/// `volume_refs`: the app's volume ids in the config in force (the app-manager's status does
/// not carry them). `exports`: the volume-manager's export jobs of the app.
pub fn app_info(
    device: uuid::Uuid,
    app: &str,
    status: Option<&AppInstanceStatus>,
    volume_refs: &[String],
    exports: &[&ExportStatus],
) -> ZInfoMsg {
    let mut info = ZInfoApp {
        app_id: app.to_string(),
        ..Default::default()
    };
    if let Some(status) = status {
        info.app_version = status.uuid_and_version.version.clone();
        info.app_name = status.display_name.clone();
        info.boot_time = status.boot_time.map(timestamp);
        info.state = sw_state(status.state) as i32;
        info.volume_refs = volume_refs.to_vec();
        if !status.error.error.is_empty() {
            info.app_err.push(error_info(&status.error));
        }
        info.cairn_restarts = status.restarts;
        if !status.last_failure.error.is_empty() {
            info.cairn_last_failure = Some(error_info(&status.last_failure));
        }
        let snap = &status.snap_status;
        // EVE reports the available snapshots; a failed one is reported too, with its error,
        // so that the controller learns why a requested snapshot never appears.
        info.snapshots = snap
            .available_snapshots
            .iter()
            .chain(
                snap.requested_snapshots
                    .iter()
                    .filter(|s| !s.error.error.is_empty()),
            )
            .map(snapshot_info)
            .collect();
        info.cairn_exports = exports.iter().map(|job| export_job(job)).collect();
    }
    ZInfoMsg {
        ztype: ZInfoTypes::ZiApp as i32,
        dev_id: device.to_string(),
        info_content: Some(InfoContent::Ainfo(info)),
        at_time_stamp: Some(timestamp(Utc::now())),
    }
}

/// The info message for one volume (EVE's `PublishVolumeToZedCloud`). `None` status: the volume
/// is gone (EVE sends the bare UUID).
pub fn volume_info(device: uuid::Uuid, volume: &str, status: Option<&VolumeStatus>) -> ZInfoMsg {
    let mut info = ZInfoVolume {
        uuid: volume.to_string(),
        ..Default::default()
    };
    if let Some(status) = status {
        info.display_name = status.display_name.clone();
        info.generation_count = status.generation_counter;
        info.state = match status.state {
            VolumeState::Creating => ZSwState::CreatingVolume,
            // EVE keeps CREATED_VOLUME while it deletes; Cairn's volume exists until it is gone.
            VolumeState::Ready | VolumeState::Deleting => ZSwState::CreatedVolume,
            VolumeState::Failed => ZSwState::Error,
        } as i32;
        info.progress_percentage = match status.state {
            VolumeState::Creating => 0,
            _ => 100,
        };
        info.resources = Some(VolumeResources {
            max_size_bytes: status.max_vol_size,
            cur_size_bytes: status.current_size,
        });
        if !status.error.error.is_empty() {
            info.volume_err = Some(error_info(&status.error));
        } else if let Some(pending) = &status.pending_deletion {
            // Cairn's deletion grace: the controller learns the volume is detached and when it goes.
            info.volume_err = Some(ErrorInfo {
                description: pending.reason.clone(),
                timestamp: pending.since.map(timestamp),
                severity: Severity::Notice as i32,
                retry_condition: pending
                    .delete_at
                    .map(|at| format!("deleted at {}", at.to_rfc3339()))
                    .unwrap_or_default(),
                ..Default::default()
            });
        }
    }
    ZInfoMsg {
        ztype: ZInfoTypes::ZiVolume as i32,
        dev_id: device.to_string(),
        info_content: Some(InfoContent::Vinfo(info)),
        at_time_stamp: Some(timestamp(Utc::now())),
    }
}

/// The info message for one content tree (EVE's `PublishContentInfoToZedCloud`). `None`
/// status: the tree is gone (EVE sends the bare UUID).
pub fn content_tree_info(
    device: uuid::Uuid,
    tree: &str,
    status: Option<&ContentTreeStatus>,
) -> ZInfoMsg {
    let mut info = ZInfoContentTree {
        uuid: tree.to_string(),
        ..Default::default()
    };
    if let Some(status) = status {
        info.display_name = status.display_name.clone();
        info.sha256 = status.content_sha256.clone();
        // EVE reports the state the tree is in and the error beside it, not ERROR: a tree
        // that failed is still one that will be retried from where it stands.
        info.state = content_tree_state(status.state) as i32;
        info.progress_percentage = status.progress;
        if status.error.is_error() {
            info.err = Some(error_info(&status.error));
        }
        // EVE: the size the server announced, as the tree's disk usage.
        info.resources = Some(ContentResources {
            cur_size_bytes: u64::try_from(status.total_size).unwrap_or(0),
        });
        // EVE reports a reference count of 1 whatever holds the tree (its "XXX RefCount").
        info.usage = Some(UsageInfo {
            create_time: status.create_time.map(timestamp),
            ref_count: 1,
            last_refcount_change_time: status.create_time.map(timestamp),
        });
        info.component_sha_list = status.blobs.clone();
        info.generation_count = status.generation_counter;
    }
    ZInfoMsg {
        ztype: ZInfoTypes::ZiContentTree as i32,
        dev_id: device.to_string(),
        info_content: Some(InfoContent::Cinfo(info)),
        at_time_stamp: Some(timestamp(Utc::now())),
    }
}

/// A content tree's state as EVE's `SwState.ZSwState()` maps it (LOADED is DELIVERED there).
fn content_tree_state(state: ContentTreeState) -> ZSwState {
    match state {
        ContentTreeState::Initial => ZSwState::Initial,
        ContentTreeState::Downloading => ZSwState::DownloadStarted,
        ContentTreeState::Downloaded => ZSwState::Downloaded,
        ContentTreeState::Verifying => ZSwState::Verifying,
        ContentTreeState::Verified => ZSwState::Verified,
        ContentTreeState::Loading => ZSwState::Loading,
        ContentTreeState::Loaded => ZSwState::Delivered,
    }
}

/// At most this many export jobs per app in its `ZInfoApp`: a schedule adds one per snapshot.
pub const EXPORTS_REPORTED: usize = 16;

/// App `app`'s export jobs to report: running ones first, then the latest to end.
pub fn app_exports<'a>(
    jobs: impl Iterator<Item = &'a ExportStatus>,
    app: &str,
) -> Vec<&'a ExportStatus> {
    let mut mine: Vec<&ExportStatus> = jobs.filter(|j| j.app_uuid.to_string() == app).collect();
    mine.sort_by_key(|j| {
        (
            j.state != ExportState::Running,
            std::cmp::Reverse(j.finished),
            j.job_id,
        )
    });
    mine.truncate(EXPORTS_REPORTED);
    mine
}

/// One export job as `ZInfoApp.cairn_exports` carries it.
fn export_job(job: &ExportStatus) -> proto::CairnExportJob {
    proto::CairnExportJob {
        id: job.job_id.to_string(),
        snapshot: job.snapshot_id.to_string(),
        state: match job.state {
            ExportState::Running => "RUNNING",
            ExportState::Done => "DONE",
            ExportState::Failed => "FAILED",
            ExportState::Cancelled => "CANCELLED",
        }
        .to_string(),
        bytes_done: job.bytes_done,
        bytes_total: job.bytes_total,
        bytes_uploaded: job.bytes_uploaded,
        export: job.remote_export.clone(),
        last_success: job
            .finished
            .filter(|_| job.state == ExportState::Done)
            .map(timestamp),
        error: job.error.clone(),
        removed: job.removed_exports.clone(),
    }
}

fn snapshot_info(snapshot: &SnapshotInstanceStatus) -> ZInfoSnapshot {
    ZInfoSnapshot {
        id: snapshot.snapshot.snapshot_id.to_string(),
        config_id: snapshot.config_version.uuid.to_string(),
        config_version: snapshot.config_version.version.clone(),
        create_time: snapshot.time_created.map(timestamp),
        r#type: match snapshot.snapshot.snapshot_type {
            SnapshotType::AppUpdate => proto::SnapshotType::AppUpdate,
            SnapshotType::Immediate => proto::SnapshotType::Immediate,
            _ => proto::SnapshotType::Unspecified,
        } as i32,
        snap_err: (!snapshot.error.error.is_empty()).then(|| error_info(&snapshot.error)),
        cairn_name: snapshot.snapshot.name.clone(),
        cairn_description: snapshot.snapshot.description.clone(),
        cairn_pause_ms: snapshot.pause_ms,
    }
}

fn error_info(error: &ErrorDescription) -> ErrorInfo {
    ErrorInfo {
        description: error.error.clone(),
        timestamp: error.error_time.map(timestamp),
        severity: match error.error_severity {
            ErrorSeverity::Notice => Severity::Notice,
            ErrorSeverity::Warning => Severity::Warning,
            ErrorSeverity::Error => Severity::Error,
            _ => Severity::Unspecified,
        } as i32,
        retry_condition: error.error_retry_condition.clone(),
        ..Default::default()
    }
}

/// Cairn's (EVE pillar's) app states onto the API's `ZSwState`.
fn sw_state(state: SwState) -> ZSwState {
    match state {
        SwState::Initial => ZSwState::Initial,
        SwState::CreatingVolume | SwState::CreatedVolume | SwState::Installed => {
            ZSwState::Installed
        }
        SwState::StartDelayed => ZSwState::StartDelayed,
        SwState::Booting => ZSwState::Booting,
        SwState::Running | SwState::Pausing | SwState::Paused => ZSwState::Running,
        SwState::Halting => ZSwState::Halting,
        SwState::Halted => ZSwState::Halted,
        SwState::Pending => ZSwState::Pending,
        SwState::Broken | SwState::Unknown | SwState::Failed => ZSwState::Error,
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// Reports waiting to be sent: one per app, the newest. A failed send waits `backoff`,
/// doubling up to `max_backoff`; a success resets it.
pub struct Queue {
    pending: BTreeMap<String, Report>,
    first_backoff: Duration,
    max_backoff: Duration,
    backoff: Duration,
    not_before: Instant,
}

impl Queue {
    pub fn new(first_backoff: Duration, max_backoff: Duration) -> Self {
        Self {
            pending: BTreeMap::new(),
            first_backoff,
            max_backoff,
            backoff: first_backoff,
            not_before: Instant::now(),
        }
    }

    /// The object's newest report replaces any unsent one.
    pub fn put(&mut self, key: String, report: Report) {
        self.pending.insert(key, report);
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the next send may be tried, if anything waits.
    pub fn due(&self) -> Option<Instant> {
        (!self.pending.is_empty()).then_some(self.not_before)
    }

    /// The next report to send (it stays queued until [`Queue::sent`]).
    pub fn next(&self) -> Option<(String, Report)> {
        self.pending
            .iter()
            .next()
            .map(|(key, report)| (key.clone(), report.clone()))
    }

    /// `report` reached the controller: it leaves the queue unless a newer one replaced it.
    pub fn sent(&mut self, key: &str, report: &Report) {
        if self.pending.get(key) == Some(report) {
            self.pending.remove(key);
        }
        self.backoff = self.first_backoff;
        self.not_before = Instant::now();
    }

    /// The send failed: everything waits, longer each time.
    pub fn failed(&mut self) -> Duration {
        let wait = self.backoff;
        self.not_before = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::{SnapshotDesc, SnapshottingStatus, UUIDandVersion};

    fn status(version: &str, error: &str) -> AppInstanceStatus {
        let app: uuid::Uuid = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".parse().unwrap();
        let snapshot = |id: &str, error: &str| SnapshotInstanceStatus {
            snapshot: SnapshotDesc {
                snapshot_id: id.parse().unwrap(),
                snapshot_type: SnapshotType::Immediate,
                ..Default::default()
            },
            time_created: (error.is_empty()).then(Utc::now),
            app_instance_id: app,
            config_version: UUIDandVersion {
                uuid: app,
                version: "1".into(),
            },
            error: if error.is_empty() {
                ErrorDescription::default()
            } else {
                ErrorDescription::new(error, ErrorSeverity::Error, Utc::now())
            },
            ..Default::default()
        };
        AppInstanceStatus {
            uuid_and_version: UUIDandVersion {
                uuid: app,
                version: version.into(),
            },
            display_name: "sensor".into(),
            state: SwState::Running,
            snap_status: SnapshottingStatus {
                available_snapshots: vec![snapshot("11111111-1111-4111-8111-111111111111", "")],
                requested_snapshots: vec![
                    snapshot("22222222-2222-4222-8222-222222222222", ""),
                    snapshot("33333333-3333-4333-8333-333333333333", error),
                ],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_broken_app_is_an_error_with_its_reason_retry_condition_and_restarts() {
        let mut broken = status("2", "");
        broken.state = SwState::Broken;
        broken.error = ErrorDescription {
            error_retry_condition: "restarting at 2026-12-07T10:00:00Z".into(),
            ..ErrorDescription::new(
                "process of app a ended on its own: killed by signal 9",
                ErrorSeverity::Error,
                Utc::now(),
            )
        };
        broken.restarts = 3;
        broken.last_failure = broken.error.clone();
        let msg = app_info(uuid::Uuid::new_v4(), "a", Some(&broken), &[], &[]);
        let Some(InfoContent::Ainfo(app)) = msg.info_content else {
            panic!("an app info")
        };
        assert_eq!(app.state, ZSwState::Error as i32);
        let err = &app.app_err[0];
        assert!(err.description.contains("killed by signal 9"));
        assert_eq!(err.severity, Severity::Error as i32);
        assert_eq!(err.retry_condition, "restarting at 2026-12-07T10:00:00Z");
        assert_eq!(app.cairn_restarts, 3);
        assert!(app.cairn_last_failure.is_some());
    }

    #[test]
    fn an_apps_export_jobs_are_reported_running_first_then_the_latest_ended_with_their_fields() {
        let app = uuid::Uuid::new_v4();
        let job = |n: u128, state: ExportState, minute: i64| ExportStatus {
            job_id: uuid::Uuid::from_u128(n),
            app_uuid: app,
            state,
            bytes_done: 10,
            bytes_total: 20,
            bytes_uploaded: 5,
            remote_export: format!("backups:k/{n}"),
            finished: (state != ExportState::Running)
                .then(|| DateTime::from_timestamp(minute * 60, 0).unwrap_or_default()),
            error: if state == ExportState::Failed {
                "remote backups: access denied".into()
            } else {
                String::new()
            },
            ..ExportStatus::default()
        };
        let mut jobs = vec![
            job(1, ExportState::Done, 1),
            job(2, ExportState::Failed, 2),
            job(3, ExportState::Running, 0),
            ExportStatus {
                app_uuid: uuid::Uuid::new_v4(),
                ..job(4, ExportState::Done, 3)
            },
        ];
        jobs.extend((10..40).map(|n| job(n, ExportState::Done, -(n as i64))));
        let picked = app_exports(jobs.iter(), &app.to_string());
        assert_eq!(picked.len(), EXPORTS_REPORTED);
        let ids: Vec<u128> = picked.iter().take(3).map(|j| j.job_id.as_u128()).collect();
        assert_eq!(
            ids,
            [3, 2, 1],
            "running first, then the latest ended; not another app's"
        );
        let msg = app_info(
            uuid::Uuid::new_v4(),
            &app.to_string(),
            Some(&status("1", "")),
            &[],
            &picked,
        );
        let Some(InfoContent::Ainfo(info)) = msg.info_content else {
            panic!("an app info")
        };
        let done = &info.cairn_exports[2];
        assert_eq!(done.state, "DONE");
        assert_eq!(
            (done.bytes_done, done.bytes_total, done.bytes_uploaded),
            (10, 20, 5)
        );
        assert_eq!(done.export, "backups:k/1");
        assert_eq!(done.last_success.as_ref().map(|t| t.seconds), Some(60));
        let failed = &info.cairn_exports[1];
        assert_eq!(failed.state, "FAILED");
        assert!(failed.last_success.is_none());
        assert_eq!(failed.error, "remote backups: access denied");
        assert_eq!(info.cairn_exports[0].state, "RUNNING");
    }

    #[test]
    fn available_and_failed_snapshots_are_reported_with_their_fields() {
        let device = uuid::Uuid::new_v4();
        let volume = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".to_string();
        let msg = app_info(
            device,
            "a",
            Some(&status("2", "disk full")),
            std::slice::from_ref(&volume),
            &[],
        );
        let Some(InfoContent::Ainfo(app)) = msg.info_content else {
            panic!("an app info")
        };
        assert_eq!(msg.dev_id, device.to_string());
        assert_eq!(app.app_version, "2");
        assert_eq!(app.state, ZSwState::Running as i32);
        assert_eq!(app.volume_refs, [volume]);
        let ids: Vec<&str> = app.snapshots.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "11111111-1111-4111-8111-111111111111",
                "33333333-3333-4333-8333-333333333333"
            ]
        );
        let available = &app.snapshots[0];
        assert_eq!(available.config_version, "1");
        assert_eq!(available.r#type, proto::SnapshotType::Immediate as i32);
        assert!(available.create_time.is_some() && available.snap_err.is_none());
        let failed = &app.snapshots[1];
        assert_eq!(failed.snap_err.as_ref().unwrap().description, "disk full");
    }

    #[test]
    fn a_volume_is_reported_with_its_state_sizes_generation_and_error() {
        let device = uuid::Uuid::new_v4();
        let volume = VolumeStatus {
            volume_id: "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".parse().unwrap(),
            generation_counter: 2,
            display_name: "data".into(),
            state: VolumeState::Ready,
            max_vol_size: 64 << 20,
            current_size: 3 << 20,
            ..Default::default()
        };
        let uuid = volume.volume_id.to_string();
        let msg = volume_info(device, &uuid, Some(&volume));
        assert_eq!(msg.ztype, ZInfoTypes::ZiVolume as i32);
        let Some(InfoContent::Vinfo(info)) = msg.info_content else {
            panic!("a volume info")
        };
        assert_eq!(
            (info.uuid.as_str(), info.display_name.as_str()),
            (uuid.as_str(), "data")
        );
        assert_eq!(info.state, ZSwState::CreatedVolume as i32);
        assert_eq!((info.progress_percentage, info.generation_count), (100, 2));
        assert_eq!(
            info.resources,
            Some(VolumeResources {
                max_size_bytes: 64 << 20,
                cur_size_bytes: 3 << 20
            })
        );
        assert!(info.volume_err.is_none());

        let failed = VolumeStatus {
            state: VolumeState::Failed,
            error: ErrorDescription::new(
                "qemu-img create failed",
                ErrorSeverity::Error,
                Utc::now(),
            ),
            ..volume.clone()
        };
        let Some(InfoContent::Vinfo(info)) = volume_info(device, &uuid, Some(&failed)).info_content
        else {
            panic!("a volume info")
        };
        assert_eq!(info.state, ZSwState::Error as i32);
        assert_eq!(
            info.volume_err.unwrap().description,
            "qemu-img create failed"
        );

        let Some(InfoContent::Vinfo(gone)) = volume_info(device, &uuid, None).info_content else {
            panic!("a volume info")
        };
        assert_eq!(
            gone,
            ZInfoVolume {
                uuid,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_content_tree_is_reported_in_eves_states_with_progress_and_its_error() {
        let device = uuid::Uuid::new_v4();
        let tree = ContentTreeStatus {
            content_id: "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4e".parse().unwrap(),
            display_name: "disk.qcow2".into(),
            content_sha256: "ab".repeat(32),
            generation_counter: 4,
            state: ContentTreeState::Downloading,
            total_size: 34 << 20,
            current_size: 17 << 20,
            progress: 50,
            ..Default::default()
        };
        let uuid = tree.content_id.to_string();
        let msg = content_tree_info(device, &uuid, Some(&tree));
        assert_eq!(msg.ztype, ZInfoTypes::ZiContentTree as i32);
        let Some(InfoContent::Cinfo(info)) = msg.info_content else {
            panic!("a content tree info")
        };
        assert_eq!(
            (info.uuid.as_str(), info.display_name.as_str()),
            (uuid.as_str(), "disk.qcow2")
        );
        assert_eq!(info.sha256, "ab".repeat(32));
        assert_eq!(info.state, ZSwState::DownloadStarted as i32);
        assert_eq!((info.progress_percentage, info.generation_count), (50, 4));
        assert_eq!(info.resources.unwrap().cur_size_bytes, 34 << 20);
        assert!(info.err.is_none());

        let failed = ContentTreeStatus {
            error: ErrorDescription {
                error_retry_condition: "will retry in 10s".into(),
                ..ErrorDescription::new(
                    "content tree disk.qcow2: HTTP 404 Not Found",
                    ErrorSeverity::Error,
                    Utc::now(),
                )
            },
            ..tree.clone()
        };
        let Some(InfoContent::Cinfo(info)) =
            content_tree_info(device, &uuid, Some(&failed)).info_content
        else {
            panic!("a content tree info")
        };
        // As EVE: the state it stands in, the error beside it.
        assert_eq!(info.state, ZSwState::DownloadStarted as i32);
        let err = info.err.unwrap();
        assert_eq!(
            (err.description.as_str(), err.retry_condition.as_str()),
            (
                "content tree disk.qcow2: HTTP 404 Not Found",
                "will retry in 10s"
            )
        );
        assert_eq!(err.severity, Severity::Error as i32);
        assert!(err.timestamp.is_some());

        let loaded = ContentTreeStatus {
            state: ContentTreeState::Loaded,
            progress: 100,
            blobs: vec!["ab".repeat(32)],
            create_time: Some(Utc::now()),
            ..tree
        };
        let Some(InfoContent::Cinfo(info)) =
            content_tree_info(device, &uuid, Some(&loaded)).info_content
        else {
            panic!("a content tree info")
        };
        assert_eq!(info.state, ZSwState::Delivered as i32, "EVE's LOADED");
        assert_eq!(info.component_sha_list, ["ab".repeat(32)]);
        assert!(info.usage.unwrap().create_time.is_some());

        let Some(InfoContent::Cinfo(gone)) = content_tree_info(device, &uuid, None).info_content
        else {
            panic!("a content tree info")
        };
        assert_eq!(
            gone,
            ZInfoContentTree {
                uuid,
                ..Default::default()
            }
        );
    }

    #[test]
    fn the_software_list_is_the_images_release_or_else_the_agents_version() {
        let image = software(Some(
            "NAME=\"Cairn device image\"\nVERSION=\"0.1.0\"\nSOURCE_DATE_EPOCH=1700000000\n",
        ));
        assert_eq!(image.short_version, "0.1.0");
        assert_eq!(
            image.long_version,
            "Cairn device image 0.1.0 (SOURCE_DATE_EPOCH 1700000000)"
        );
        assert!(image.activated);
        let bare = software(None);
        assert_eq!(bare.short_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            bare.long_version,
            format!("cairn {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn the_newest_report_replaces_an_unsent_one_and_failures_back_off() {
        let mut queue = Queue::new(Duration::from_millis(100), Duration::from_millis(350));
        queue.put("a".into(), Report::App(Some(status("1", ""))));
        let (app, first) = queue.next().unwrap();
        // While the first is on the wire, a newer status arrives: it is kept.
        queue.put("a".into(), Report::App(Some(status("2", ""))));
        queue.sent(&app, &first);
        assert_eq!(queue.len(), 1);
        let (_, second) = queue.next().unwrap();
        let Report::App(Some(second)) = second else {
            panic!("an app report")
        };
        assert_eq!(second.uuid_and_version.version, "2");

        let waits: Vec<u128> = (0..4).map(|_| queue.failed().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        assert!(queue.due().unwrap() > Instant::now());
        let (app, report) = queue.next().unwrap();
        queue.sent(&app, &report);
        assert!(queue.is_empty() && queue.due().is_none());
        assert_eq!(
            queue.failed().as_millis(),
            100,
            "success resets the backoff"
        );
    }

    #[test]
    fn the_edgeview_report_is_eves_zinfo_edgeview() {
        use prost::Message;
        let device: uuid::Uuid = "6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse().unwrap();
        let started = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let status = cairn_types::EdgeviewStatus {
            expire_on: 1_700_003_600,
            started_on: Some(started),
            cmd_count_dev: 3,
            connected: 1,
            instances: 1,
            ..Default::default()
        };
        let bytes = edgeview_info(device, &status).encode_to_vec();
        let msg = ZInfoMsg::decode(bytes.as_slice()).unwrap();
        assert_eq!(msg.ztype, ZInfoTypes::ZiEdgeview as i32);
        assert_eq!(msg.dev_id, device.to_string());
        let Some(InfoContent::Evinfo(ev)) = msg.info_content else {
            panic!("evinfo: {msg:?}");
        };
        assert_eq!(ev.expire_time.unwrap().seconds, 1_700_003_600);
        assert_eq!(ev.started_time.unwrap().seconds, 1_700_000_000);
        assert_eq!((ev.count_dev, ev.count_app, ev.count_ext), (3, 0, 0));
    }
}

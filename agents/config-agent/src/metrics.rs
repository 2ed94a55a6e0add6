//! The metrics report (`ZMetricMsg`, EVE's zedagent `publishMetrics`): the device's CPU,
//! memory and the disk under `<persist>`; each app's CPU and memory from the domain-manager's
//! `DomainMetric` and its disks; each volume's size from the volume-manager's `VolumeStatus`.
//! Sent every `timer.metric.interval`, never queued: a report that does not get through is
//! replaced by the next one, as in EVE.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cairn_types::{AppInstanceStatus, DomainMetric, SwState, VolumeFormat, VolumeStatus};
use chrono::{DateTime, Utc};

use crate::proto::{
    AppCpuMetric, AppDiskMetric, AppMemoryMetric, AppMetric, DeviceMemoryMetric, DeviceMetric,
    DiskMetric, MemoryMetric, MetricContent, ZMetricMsg, ZMetricVolume,
};

/// EVE's config item for the metrics interval, in seconds.
pub const METRIC_INTERVAL_ITEM: &str = "timer.metric.interval";
/// EVE's default and bounds for it (pillar `types/global.go`: 60 s, 5 s to 1 h).
pub const METRIC_INTERVAL_DEFAULT: Duration = Duration::from_secs(60);
const METRIC_INTERVAL_MIN_S: u64 = 5;
const METRIC_INTERVAL_MAX_S: u64 = 3600;

/// `/proc/stat` counts in USER_HZ ticks, which Linux fixes at 100 for user space.
const USER_HZ: u64 = 100;
const MIB: u64 = 1 << 20;

/// The interval `timer.metric.interval` asks for (clamped to EVE's bounds), else `default`.
pub fn interval(items: &BTreeMap<String, String>, default: Duration) -> Duration {
    items
        .get(METRIC_INTERVAL_ITEM)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(default, |s| {
            Duration::from_secs(s.clamp(METRIC_INTERVAL_MIN_S, METRIC_INTERVAL_MAX_S))
        })
}

/// What the machine says about itself right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceUsage {
    pub uptime_s: u64,
    /// Busy CPU time since boot (all but idle and iowait), divided by the CPUs as EVE does.
    pub cpu_busy_ns: u64,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    pub persist_total_mib: u64,
    pub persist_used_mib: u64,
    pub persist_free_mib: u64,
}

/// Reads `/proc/uptime`, `/proc/stat`, `/proc/meminfo` and `statvfs(persist)`. Blocking.
pub fn device_usage(persist: &Path) -> DeviceUsage {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let uptime_s = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |s| s as u64);
    let stat = read("/proc/stat");
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count()
        .max(1) as u64;
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy_ticks: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .take(8)
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4)
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let meminfo = read("/proc/meminfo");
    let kib = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Free is what a non-root writer may still use, as df shows it.
    let (persist_total_mib, persist_used_mib, persist_free_mib) =
        nix::sys::statvfs::statvfs(persist)
            .map(|s| {
                let unit = s.fragment_size();
                (
                    s.blocks() * unit / MIB,
                    s.blocks().saturating_sub(s.blocks_free()) * unit / MIB,
                    s.blocks_available() * unit / MIB,
                )
            })
            .unwrap_or((0, 0, 0));
    DeviceUsage {
        uptime_s,
        cpu_busy_ns: busy_ticks * (1_000_000_000 / USER_HZ) / cpus,
        memory_total_mib: kib("MemTotal:") / 1024,
        memory_available_mib: kib("MemAvailable:") / 1024,
        persist_total_mib,
        persist_used_mib,
        persist_free_mib,
    }
}

/// What the report is made of besides the machine's own figures.
pub struct Inputs<'a> {
    pub persist: &'a Path,
    pub usage: &'a DeviceUsage,
    pub apps: &'a [AppInstanceStatus],
    /// The domain-manager's `DomainMetric` by app UUID.
    pub domains: &'a BTreeMap<String, DomainMetric>,
    pub volumes: &'a [VolumeStatus],
    /// Each app's volume ids in the config in force.
    pub volume_refs: &'a BTreeMap<String, Vec<String>>,
}

/// The metrics report of `device` at `now`.
pub fn report(device: uuid::Uuid, inputs: &Inputs<'_>, now: DateTime<Utc>) -> ZMetricMsg {
    let usage = inputs.usage;
    let used_mem = usage
        .memory_total_mib
        .saturating_sub(usage.memory_available_mib);
    let volumes_mib: u64 = inputs.volumes.iter().map(|v| v.current_size / MIB).sum();
    let device_metric = DeviceMetric {
        memory: Some(memory(
            used_mem,
            usage.memory_available_mib,
            usage.memory_total_mib,
        )),
        disk: vec![DiskMetric {
            mount_path: inputs.persist.display().to_string(),
            total: usage.persist_total_mib,
            used: usage.persist_used_mib,
            free: usage.persist_free_mib,
            ..Default::default()
        }],
        cpu_metric: Some(AppCpuMetric {
            // EVE's quirk: the uptime as a timestamp that many seconds after the epoch.
            up_time: Some(prost_types::Timestamp {
                seconds: usage.uptime_s as i64,
                nanos: 0,
            }),
            total: usage.cpu_busy_ns / 1_000_000_000,
            total_ns: usage.cpu_busy_ns,
            ..Default::default()
        }),
        device_memory: Some(DeviceMemoryMetric {
            memory_mb: usage.memory_total_mib as u32,
            allocated_apps_mb: inputs.domains.values().map(|d| d.allocated_mb).sum(),
            ..Default::default()
        }),
        // What the apps' volumes take under <persist>, and the rest of what is used there.
        app_run_time_storage_mb: volumes_mib,
        runtime_storage_overhead_mb: usage.persist_used_mib.saturating_sub(volumes_mib),
        ..Default::default()
    };
    let am = inputs
        .apps
        .iter()
        .map(|app| app_metric(app, inputs, now))
        .collect();
    let vm = inputs
        .volumes
        .iter()
        .map(|v| ZMetricVolume {
            uuid: v.volume_id.to_string(),
            display_name: v.display_name.clone(),
            total_bytes: v.max_vol_size,
            used_bytes: v.current_size,
            free_bytes: v.max_vol_size.saturating_sub(v.current_size),
            ..Default::default()
        })
        .collect();
    ZMetricMsg {
        dev_id: device.to_string(),
        at_time_stamp: Some(timestamp(now)),
        metric_content: Some(MetricContent::Dm(device_metric)),
        am,
        vm,
        ..Default::default()
    }
}

fn app_metric(app: &AppInstanceStatus, inputs: &Inputs<'_>, now: DateTime<Utc>) -> AppMetric {
    let id = app.uuid_and_version.uuid.to_string();
    let mut metric = AppMetric {
        app_id: id.clone(),
        app_version: app.uuid_and_version.version.clone(),
        app_name: app.display_name.clone(),
        cpu: Some(AppCpuMetric::default()),
        ..Default::default()
    };
    let running = matches!(
        app.state,
        SwState::Running | SwState::Pausing | SwState::Paused
    );
    if let (Some(boot), true) = (app.boot_time, running) {
        // EVE's quirk again: the time since boot as a timestamp after the epoch.
        let up = (now - boot).to_std().unwrap_or_default();
        metric.cpu = Some(AppCpuMetric {
            up_time: Some(prost_types::Timestamp {
                seconds: up.as_secs() as i64,
                nanos: up.subsec_nanos() as i32,
            }),
            ..Default::default()
        });
    }
    if let Some(dm) = inputs.domains.get(&id) {
        if let Some(cpu) = metric.cpu.as_mut() {
            cpu.total = dm.cpu_total_ns / 1_000_000_000;
            cpu.total_ns = dm.cpu_total_ns;
        }
        metric.app_memory = Some(AppMemoryMetric {
            allocated_mb: dm.allocated_mb,
            used_mb: dm.used_memory,
        });
        metric.memory = Some(MemoryMetric {
            used_mem: dm.used_memory,
            avail_mem: dm.available_memory,
            used_percentage: dm.used_memory_percent,
            avail_percentage: 100.0 - dm.used_memory_percent,
        });
    }
    let refs = inputs.volume_refs.get(&id).map_or(&[][..], Vec::as_slice);
    metric.disk = refs
        .iter()
        .filter_map(|volume| in_use(inputs.volumes, volume))
        .map(|v| AppDiskMetric {
            disk: v.file_location.display().to_string(),
            provisioned: v.max_vol_size / MIB,
            used: v.current_size / MIB,
            disk_type: match v.format {
                VolumeFormat::Qcow2 => "QCOW2",
                VolumeFormat::Raw => "RAW",
                VolumeFormat::Dir => "DIR",
            }
            .into(),
            dirty: false,
        })
        .collect();
    metric
}

/// The newest generation of volume `uuid` that is not waiting for deletion.
fn in_use<'a>(volumes: &'a [VolumeStatus], uuid: &str) -> Option<&'a VolumeStatus> {
    volumes
        .iter()
        .filter(|v| v.volume_id.to_string() == uuid && v.pending_deletion.is_none())
        .max_by_key(|v| (v.generation_counter, v.local_generation_counter))
}

fn memory(used: u64, available: u64, total: u64) -> MemoryMetric {
    let used_percentage = if total > 0 {
        100.0 * used as f64 / total as f64
    } else {
        0.0
    };
    MemoryMetric {
        used_mem: used as u32,
        avail_mem: available as u32,
        used_percentage,
        avail_percentage: 100.0 - used_percentage,
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::UUIDandVersion;

    #[test]
    fn the_interval_is_eves_item_within_eves_bounds() {
        let items = |v: &str| BTreeMap::from([(METRIC_INTERVAL_ITEM.to_string(), v.to_string())]);
        let default = METRIC_INTERVAL_DEFAULT;
        assert_eq!(interval(&BTreeMap::new(), default), default);
        assert_eq!(interval(&items("30"), default), Duration::from_secs(30));
        assert_eq!(interval(&items("1"), default), Duration::from_secs(5));
        assert_eq!(
            interval(&items("99999"), default),
            Duration::from_secs(3600)
        );
        assert_eq!(interval(&items("soon"), default), default);
    }

    #[test]
    fn the_machine_reports_its_cpu_memory_and_persist_disk() {
        let usage = device_usage(Path::new("/"));
        assert!(usage.uptime_s > 0 && usage.cpu_busy_ns > 0);
        assert!(usage.memory_total_mib >= usage.memory_available_mib);
        assert!(usage.memory_total_mib > 0 && usage.persist_total_mib > 0);
    }

    #[test]
    fn apps_carry_their_domain_metric_and_disks_and_volumes_their_sizes() {
        let app: uuid::Uuid = "6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".parse().unwrap();
        let volume: uuid::Uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".parse().unwrap();
        let now = Utc::now();
        let status = AppInstanceStatus {
            uuid_and_version: UUIDandVersion {
                uuid: app,
                version: "3".into(),
            },
            display_name: "sensor".into(),
            state: SwState::Running,
            boot_time: Some(now - chrono::Duration::seconds(90)),
            ..Default::default()
        };
        let dm = DomainMetric {
            cpu_total_ns: 2_500_000_000,
            allocated_mb: 256,
            used_memory: 64,
            available_memory: 192,
            used_memory_percent: 25.0,
            ..Default::default()
        };
        let vs = VolumeStatus {
            volume_id: volume,
            display_name: "data".into(),
            file_location: "/p/volumes/v.qcow2".into(),
            max_vol_size: 64 * MIB,
            current_size: 3 * MIB,
            ..Default::default()
        };
        let usage = DeviceUsage {
            memory_total_mib: 1000,
            memory_available_mib: 250,
            persist_used_mib: 10,
            ..Default::default()
        };
        let inputs = Inputs {
            persist: Path::new("/p"),
            usage: &usage,
            apps: std::slice::from_ref(&status),
            domains: &BTreeMap::from([(app.to_string(), dm)]),
            volumes: std::slice::from_ref(&vs),
            volume_refs: &BTreeMap::from([(app.to_string(), vec![volume.to_string()])]),
        };
        let msg = report(uuid::Uuid::nil(), &inputs, now);
        let Some(MetricContent::Dm(device)) = &msg.metric_content else {
            panic!("device metrics")
        };
        let memory = device.memory.as_ref().unwrap();
        assert_eq!((memory.used_mem, memory.avail_mem), (750, 250));
        assert_eq!(device.disk[0].mount_path, "/p");
        assert_eq!(
            (
                device.app_run_time_storage_mb,
                device.runtime_storage_overhead_mb
            ),
            (3, 7)
        );
        let am = &msg.am[0];
        assert_eq!(
            (am.app_id.as_str(), am.app_version.as_str()),
            (app.to_string().as_str(), "3")
        );
        let cpu = am.cpu.as_ref().unwrap();
        assert_eq!((cpu.total, cpu.total_ns), (2, 2_500_000_000));
        assert_eq!(cpu.up_time.as_ref().unwrap().seconds, 90);
        assert_eq!(
            am.app_memory,
            Some(AppMemoryMetric {
                allocated_mb: 256,
                used_mb: 64
            })
        );
        assert_eq!(
            (
                am.disk[0].provisioned,
                am.disk[0].used,
                am.disk[0].disk_type.as_str()
            ),
            (64, 3, "QCOW2")
        );
        let vm = &msg.vm[0];
        assert_eq!(
            (vm.total_bytes, vm.used_bytes, vm.free_bytes),
            (64 * MIB, 3 * MIB, 61 * MIB)
        );
    }
}

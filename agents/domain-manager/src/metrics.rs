//! What each app's processes use, read from `/proc`: EVE's `DomainMetric`, which domainmgr
//! publishes for zedagent's metrics report. An app's processes are the ones carrying its marker
//! (`procfs::scan`): qemu for a VM, the process and every child that kept its environment.

use std::collections::HashMap;
use std::path::Path;

use cairn_types::{DomainConfig, DomainMetric, DomainSpec, UUIDandVersion};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100 for user space
/// whatever the kernel's own HZ.
const USER_HZ: u64 = 100;

/// What one app's marked processes use right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// User and system time of all its processes.
    pub cpu_ns: u64,
    /// Sum of their resident sets (`VmRSS`).
    pub rss_kib: u64,
    /// Sum of their peak resident sets (`VmHWM`).
    pub peak_kib: u64,
    pub processes: u32,
}

/// Usage per app (by UUID text) of the processes the domain-manager of `run_dir` marked, and
/// the host's available memory in KiB. Blocking: walks `/proc`.
pub fn gather(run_dir: &Path) -> (HashMap<String, Usage>, u64) {
    let mut apps: HashMap<String, Usage> = HashMap::new();
    for (app, marked) in crate::procfs::scan(run_dir) {
        let pid = marked.id.pid;
        // A process that ended between the scan and here counts for nothing.
        let Some(cpu_ticks) = cpu_ticks(pid) else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let usage = apps.entry(app).or_default();
        usage.cpu_ns += cpu_ticks * (1_000_000_000 / USER_HZ);
        usage.rss_kib += kib_field(&status, "VmRSS:");
        usage.peak_kib += kib_field(&status, "VmHWM:");
        usage.processes += 1;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    (apps, kib_field(&meminfo, "MemAvailable:"))
}

/// utime + stime (fields 14 and 15 of `/proc/<pid>/stat`, counted after the command's `)`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Name:   1234 kB` line's number.
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The metric of `app` from its usage (none: nothing of it runs), its config (for the VM's
/// memory and VCPUs) and the previous metric (for the peak). A stopped app keeps its CPU total
/// and reports no memory in use, as EVE's domainmgr does.
pub fn metric(
    app: Uuid,
    config: Option<&DomainConfig>,
    usage: Option<&Usage>,
    previous: Option<&DomainMetric>,
    host_available_kib: u64,
    now: DateTime<Utc>,
) -> DomainMetric {
    let (allocated_mb, vcpus) = match config.map(|c| &c.spec) {
        Some(DomainSpec::Vm(vm)) => (vm.memory_mib, vm.cpus.max(1)),
        _ => (0, 1),
    };
    let mut metric = DomainMetric {
        uuid_and_version: UUIDandVersion {
            uuid: app,
            version: config
                .map(|c| c.uuid_and_version.version.clone())
                .unwrap_or_default(),
        },
        cpu_scaled: vcpus,
        allocated_mb,
        last_heard: Some(now),
        ..DomainMetric::default()
    };
    let Some(usage) = usage.filter(|u| u.processes > 0) else {
        metric.cpu_total_ns = previous.map_or(0, |p| p.cpu_total_ns);
        metric.available_memory = allocated_mb;
        return metric;
    };
    let mib = |kib: u64| u32::try_from(kib.div_ceil(1024)).unwrap_or(u32::MAX);
    metric.activated = true;
    metric.processes = usage.processes;
    metric.cpu_total_ns = usage.cpu_ns / u64::from(vcpus);
    metric.used_memory = mib(usage.rss_kib);
    metric.max_used_memory = mib(usage.peak_kib)
        .max(metric.used_memory)
        .max(previous.map_or(0, |p| p.max_used_memory));
    // A VM's bound is its memory; a process has none but the host's.
    let bound = if allocated_mb > 0 {
        allocated_mb
    } else {
        metric.used_memory.saturating_add(mib(host_available_kib))
    };
    metric.available_memory = bound.saturating_sub(metric.used_memory);
    if bound > 0 {
        metric.used_memory_percent = 100.0 * f64::from(metric.used_memory) / f64::from(bound);
    }
    metric
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::VmSpec;

    #[test]
    fn this_process_is_counted_in_ticks_and_kib() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        let status = std::fs::read_to_string(format!("/proc/{me}/status")).expect("status");
        assert!(kib_field(&status, "VmRSS:") > 0);
        assert_eq!(kib_field("VmRSS:\t  2048 kB\n", "VmRSS:"), 2048);
    }

    #[test]
    fn a_vm_is_scaled_by_its_vcpus_bounded_by_its_memory_and_keeps_its_peak() {
        let app = Uuid::new_v4();
        let config = DomainConfig {
            uuid_and_version: UUIDandVersion {
                uuid: app,
                version: "1".into(),
            },
            display_name: "vm".into(),
            activate: true,
            spec: DomainSpec::Vm(VmSpec {
                memory_mib: 256,
                cpus: 2,
                ..VmSpec::default()
            }),
            disk_config_list: Vec::new(),
            restart_counter: 0,
            purge_counter: 0,
            load_state_tag: String::new(),
        };
        let usage = Usage {
            cpu_ns: 4_000_000_000,
            rss_kib: 64 * 1024,
            peak_kib: 70 * 1024,
            processes: 1,
        };
        let previous = DomainMetric {
            max_used_memory: 100,
            ..DomainMetric::default()
        };
        let m = metric(
            app,
            Some(&config),
            Some(&usage),
            Some(&previous),
            0,
            Utc::now(),
        );
        assert!(m.activated);
        assert_eq!((m.cpu_total_ns, m.cpu_scaled), (2_000_000_000, 2));
        assert_eq!(
            (m.allocated_mb, m.used_memory, m.available_memory),
            (256, 64, 192)
        );
        assert_eq!(m.max_used_memory, 100);
        assert_eq!(m.used_memory_percent, 25.0);

        let stopped = metric(app, Some(&config), None, Some(&m), 0, Utc::now());
        assert!(!stopped.activated);
        assert_eq!(
            stopped.cpu_total_ns, m.cpu_total_ns,
            "the CPU total is kept"
        );
        assert_eq!(stopped.used_memory, 0);
    }
}

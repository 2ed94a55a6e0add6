//! Crash safety across the real agents: for each operation (create, rollback, delete) and each
//! named crash point of the app-manager and the volume-manager, the agent is SIGKILLed at that
//! point, restarted, and the device must converge — the app's status lists the right
//! snapshots and runs the right version, `qemu-img snapshot -l` on the volume matches, and the
//! snapshot directories under /persist match. Nothing leaked, nothing lost. The app is a VM on
//! the test guest (TCG) with a qcow2 volume, its counter workload writing to the disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_e2e::{Device, qcow2_snapshots};
use uuid::Uuid;

const APP: &str = "e2e0c0de-0000-4000-8000-00000000a001";
const VOLUME: &str = "e2e0c0de-0000-4000-8000-00000000b001";
const S1: &str = "e2e0c0de-0000-4000-8000-00000000c001";

const POINTS: [(&str, &str); 7] = [
    ("app-manager", "app-manager:after-persist-intent"),
    ("app-manager", "app-manager:after-volumes-request"),
    ("volume-manager", "volume-manager:after-intent-write"),
    ("volume-manager", "volume-manager:after-backend-create"),
    ("volume-manager", "volume-manager:after-backend-rollback"),
    ("volume-manager", "volume-manager:after-record-write"),
    ("volume-manager", "volume-manager:after-backend-delete"),
];

const SETTLE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Config {
    version: &'static str,
    snapshot: bool,
    rollback: u32,
    restart: u32,
}

fn config(_device: &Device, c: &Config) -> String {
    let snapshots = if c.snapshot {
        format!(r#"{{"id": "{S1}", "type": "immediate"}}"#)
    } else {
        String::new()
    };
    let guest = cairn_e2e::guest_dir();
    format!(
        r#"{{
  "apps": [{{
    "uuid": "{APP}", "version": "{version}", "display_name": "e2e", "restart": {restart},
    "volume_refs": [{{"uuid": "{VOLUME}"}}],
    "snapshot": {{"max_snapshots": 3, "active_snapshot": "{S1}", "rollback_counter": {rollback},
                  "snapshots": [{snapshots}]}},
    "domain": {{"kind": "vm", "kernel": "{kernel}", "initrd": "{initrd}", "memory_mib": 128,
                "append": "console=ttyS0 cryptomgr.notests panic=-1 cairn.workload=counter"}}
  }}],
  "volumes": [{{"uuid": "{VOLUME}", "format": "qcow2", "max_size_bytes": 1048576}}]
}}"#,
        version = c.version,
        kernel = guest.join("vmlinuz").display(),
        initrd = guest.join("initramfs.cpio.gz").display(),
        restart = c.restart,
        rollback = c.rollback,
    )
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Rollback,
    Delete,
}

/// Runs `op` with `agent` set to die at `point`; returns whether the point was reached, and
/// the convergence verdict.
async fn case(op: Op, agent: &str, point: &str) -> (bool, Result<(), String>) {
    let mut device = Device::new();
    let id: Uuid = S1.parse().unwrap();
    let base = Config {
        version: "1",
        snapshot: !matches!(op, Op::Create),
        ..Default::default()
    };
    device.write_config(&config(&device, &base));
    device.start_all();
    let ready = device
        .app_status(SETTLE, |s| {
            s.activated
                && (matches!(op, Op::Create) || !s.snap_status.available_snapshots.is_empty())
        })
        .await;
    if let Err(e) = ready {
        return (false, Err(format!("setup: {e}")));
    }
    if matches!(op, Op::Rollback) {
        // Upgrade first, so that the rollback has a version to return from.
        device.write_config(&config(
            &device,
            &Config {
                version: "2",
                ..base
            },
        ));
        if let Err(e) = device
            .app_status(SETTLE, |s| s.activated && s.uuid_and_version.version == "2")
            .await
        {
            return (false, Err(format!("upgrade: {e}")));
        }
    }

    device.kill(agent);
    device.start(agent, Some(point));
    let change = match op {
        Op::Create => Config {
            version: "1",
            snapshot: true,
            ..Default::default()
        },
        Op::Rollback => Config {
            version: "2",
            snapshot: true,
            rollback: 1,
            ..Default::default()
        },
        Op::Delete => Config {
            version: "1",
            snapshot: false,
            restart: 1,
            ..Default::default()
        },
    };
    device.write_config(&config(&device, &change));

    // Until the device converges: if the agent dies at its point, start it again (without it).
    let expect_snapshot = !matches!(op, Op::Delete);
    let expect_version = if matches!(op, Op::Rollback) {
        "1"
    } else {
        change.version
    };
    let converged = |s: &cairn_types::AppInstanceStatus| {
        let available: BTreeSet<Uuid> = s
            .snap_status
            .available_snapshots
            .iter()
            .map(|a| a.snapshot.snapshot_id)
            .collect();
        s.activated
            && s.uuid_and_version.version == expect_version
            && s.snap_status.requested_snapshots.is_empty()
            && s.snap_status.snapshots_to_be_deleted.is_empty()
            && available
                == if expect_snapshot {
                    BTreeSet::from([id])
                } else {
                    BTreeSet::new()
                }
    };
    let mut statuses = device.app_statuses();
    let deadline = std::time::Instant::now() + SETTLE;
    let mut reached = false;
    loop {
        if !reached && device.has_died(agent) {
            reached = true;
            device.start(agent, None);
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), statuses.recv()).await;
        if statuses.get(APP).is_some_and(converged) {
            break;
        }
        if std::time::Instant::now() > deadline {
            return (
                reached,
                Err(format!(
                    "status did not converge within {SETTLE:?}: {:#?}",
                    statuses.get(APP)
                )),
            );
        }
    }
    let volume = device.volume(SETTLE).await;
    let on_volume = qcow2_snapshots(&volume.file_location);
    let expected: BTreeSet<String> = if expect_snapshot {
        BTreeSet::from([S1.to_string()])
    } else {
        BTreeSet::new()
    };
    if on_volume != expected {
        return (
            reached,
            Err(format!(
                "qemu-img snapshot -l shows {on_volume:?}, expected {expected:?}"
            )),
        );
    }
    let dirs = device.snapshot_dirs();
    let expected_dirs = if expect_snapshot {
        BTreeSet::from([id])
    } else {
        BTreeSet::new()
    };
    if dirs != expected_dirs {
        return (
            reached,
            Err(format!(
                "snapshot directories {dirs:?}, expected {expected_dirs:?}"
            )),
        );
    }
    (reached, Ok(()))
}

async fn matrix(op: Op) {
    let mut table = Vec::new();
    let only = std::env::var("CAIRN_E2E_ONLY").ok();
    for (agent, point) in POINTS {
        if only.as_deref().is_some_and(|o| o != point) {
            continue;
        }
        let (reached, verdict) = case(op, agent, point).await;
        table.push((point, reached, verdict));
    }
    eprintln!("\ncrash points × {op:?}:");
    for (point, reached, verdict) in &table {
        eprintln!(
            "  {point:<40} {:<12} {}",
            if *reached {
                "killed there"
            } else {
                "not on path"
            },
            match verdict {
                Ok(()) => "converged".to_string(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
    }
    let failed: Vec<_> = table.iter().filter(|(_, _, v)| v.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases did not converge",
        failed.len(),
        table.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_during_create_converges() {
    matrix(Op::Create).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_during_rollback_converges() {
    matrix(Op::Rollback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_during_delete_converges() {
    matrix(Op::Delete).await;
}

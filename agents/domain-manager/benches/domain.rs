//! Figures for the domain-manager with the real test guest: activate (config published →
//! `CAIRN-GUEST-BOOTED` on the console) and deactivate (→ Halted) times, QMP round trip,
//! stateful save/load times, and the agent's RSS with 3 VMs running. Prints; never fails on
//! timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cairn_domain_manager::qmp::Qmp;
use cairn_types::DomainState;
use cairn_types::domain::{DomainLiveOp, DomainLiveOpState};
use common::*;
use uuid::Uuid;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    become_subreaper();
    let mut h = Harness::new().await;
    let apps: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let disks: Vec<_> = (0..3).map(|i| h.qcow2(&format!("disk{i}.qcow2"))).collect();

    let mut consoles = Vec::new();
    for (app, disk) in apps.iter().zip(&disks) {
        let t = Instant::now();
        h.configs
            .publish(vm_config(*app, Some(disk), true))
            .await
            .unwrap();
        let s = h
            .wait_status(*app, "Running", |s| s.state == DomainState::Running)
            .await;
        let running = t.elapsed();
        wait_console(&s.log_path, "CAIRN-GUEST-BOOTED", |t| {
            t.contains("CAIRN-GUEST-BOOTED")
        })
        .await;
        println!(
            "activate vm {} (accel {}): Running after {}, CAIRN-GUEST-BOOTED after {}",
            consoles.len() + 1,
            s.accel,
            ms(running),
            ms(t.elapsed())
        );
        consoles.push(s.log_path.clone());
    }

    let manager = h.manager_pid();
    println!(
        "domain-manager RSS with 3 VMs running: {:.1} MiB (target < 10 MiB)",
        rss_kib(manager) as f64 / 1024.0
    );

    let socket = h
        .statuses
        .get(&apps[0].to_string())
        .unwrap()
        .qmp_socket
        .clone();
    let mut qmp = Qmp::connect(&socket, Duration::from_secs(5)).await.unwrap();
    let mut rtts = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        qmp.query_status().await.unwrap();
        rtts.push(t.elapsed());
    }
    rtts.sort();
    // qemu serves one QMP client at a time: close the first before timing a fresh connect.
    drop(qmp);
    let t = Instant::now();
    Qmp::connect(&socket, Duration::from_secs(5)).await.unwrap();
    println!(
        "QMP round trip (query-status, open connection, guest under load): p50 {:.0} µs, p99 {:.0} µs; connect+negotiate {:.1} ms",
        percentile(&rtts, 0.5).as_secs_f64() * 1e6,
        percentile(&rtts, 0.99).as_secs_f64() * 1e6,
        t.elapsed().as_secs_f64() * 1e3
    );

    // Stateful snapshots of a 256 MiB guest: agent-measured duration and bus round trip.
    for round in 1..=3 {
        let t = Instant::now();
        let save = h.live_op(apps[0], DomainLiveOp::StateSave, "bench").await;
        let save_rt = t.elapsed();
        assert_eq!(save.state, DomainLiveOpState::Done, "{save:?}");
        let t = Instant::now();
        let load = h.live_op(apps[0], DomainLiveOp::StateLoad, "bench").await;
        let load_rt = t.elapsed();
        assert_eq!(load.state, DomainLiveOpState::Done, "{load:?}");
        let t = Instant::now();
        let del = h.live_op(apps[0], DomainLiveOp::StateDelete, "bench").await;
        assert_eq!(del.state, DomainLiveOpState::Done, "{del:?}");
        println!(
            "stateful round {round}: save {} ms (request→result {}), load {} ms (request→result {}), delete {}",
            save.duration_ms,
            ms(save_rt),
            load.duration_ms,
            ms(load_rt),
            ms(t.elapsed())
        );
    }

    for (i, (app, disk)) in apps.iter().zip(&disks).enumerate() {
        let pid = h.statuses.get(&app.to_string()).unwrap().pid.unwrap();
        let t = Instant::now();
        h.configs
            .publish(vm_config(*app, Some(disk), false))
            .await
            .unwrap();
        h.wait_status(*app, "Halted", |s| s.state == DomainState::Halted)
            .await;
        println!(
            "deactivate vm {} (ACPI powerdown → Halted): {}",
            i + 1,
            ms(t.elapsed())
        );
        reap(pid);
    }
    assert!(qemus_under(h.tmp.path()).is_empty(), "no qemu left");
}

//! Figures for snapshot modes (issue 11) on the real test guest (256 MiB, TCG when no KVM):
//! - live: how long `DiskSnapshotCreate` stops the guest's CPUs (the pause the app-manager
//!   reports), the operation's own time, and request→result over the bus;
//! - stateful: `StateSave` (the guest is stopped for all of it), `StateLoad` on the running
//!   guest, and a cold start with `-loadvm` (config published → first counter on the console).
//!
//! Prints; never fails on timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cairn_types::DomainState;
use cairn_types::domain::{DomainLiveOp, DomainLiveOpState};
use common::*;
use uuid::Uuid;

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn summary(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    let p50 = v[v.len() / 2];
    format!(
        "min {} ms, p50 {p50} ms, max {} ms (n={})",
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let disk = h.qcow2("disk.qcow2");
    h.configs
        .publish(vm_config(app, Some(&disk), true))
        .await
        .unwrap();
    let s = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    wait_console(&s.log_path, "CAIRN-COUNTER", |t| {
        t.contains("CAIRN-COUNTER 3")
    })
    .await;
    println!("guest running (accel {})", s.accel);

    // Live: disk-only internal snapshots of the running guest.
    let (mut pauses, mut durations, mut round_trips) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..10 {
        let tag = format!("live-{i}");
        let t = Instant::now();
        let done = h.live_op(app, DomainLiveOp::DiskSnapshotCreate, &tag).await;
        round_trips.push(u64::try_from(t.elapsed().as_millis()).unwrap());
        assert_eq!(done.state, DomainLiveOpState::Done, "{done:?}");
        pauses.push(done.pause_ms);
        durations.push(done.duration_ms);
    }
    println!(
        "live snapshot pause (guest CPUs stopped): {}",
        summary(pauses)
    );
    println!("live snapshot operation: {}", summary(durations));
    println!("live snapshot request→result: {}", summary(round_trips));
    for i in 0..10 {
        let del = h
            .live_op(app, DomainLiveOp::DiskSnapshotDelete, &format!("live-{i}"))
            .await;
        assert_eq!(del.state, DomainLiveOpState::Done, "{del:?}");
    }

    // Stateful: save (pause = the whole save), load on the running guest.
    let (mut saves, mut loads) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let tag = format!("state-{round}");
        let save = h.live_op(app, DomainLiveOp::StateSave, &tag).await;
        assert_eq!(save.state, DomainLiveOpState::Done, "{save:?}");
        saves.push(save.pause_ms);
        let load = h.live_op(app, DomainLiveOp::StateLoad, &tag).await;
        assert_eq!(load.state, DomainLiveOpState::Done, "{load:?}");
        loads.push(load.duration_ms);
    }
    println!(
        "stateful save (guest paused throughout): {}",
        summary(saves)
    );
    println!("stateful load into the running guest: {}", summary(loads));

    // A cold start from saved state, as after a rollback to a stateful snapshot.
    let pid = h.statuses.get(&app.to_string()).unwrap().pid.unwrap();
    h.configs
        .publish(vm_config(app, Some(&disk), false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    reap(pid);
    let mut config = vm_config(app, Some(&disk), true);
    config.load_state_tag = "state-2".into();
    let t = Instant::now();
    h.configs.publish(config).await.unwrap();
    let s = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    let running = t.elapsed();
    wait_console(&s.log_path, "CAIRN-COUNTER", |t| {
        t.contains("CAIRN-COUNTER ")
    })
    .await;
    let text = std::fs::read_to_string(&s.log_path).unwrap_or_default();
    println!(
        "start with -loadvm: Running after {}, first counter after {} (resumed from memory: {})",
        ms(running),
        ms(t.elapsed()),
        !text.contains("CAIRN-COUNTER-START")
    );

    let pid = h.statuses.get(&app.to_string()).unwrap().pid.unwrap();
    h.configs
        .publish(vm_config(app, Some(&disk), false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    reap(pid);
    assert!(qemus_under(h.tmp.path()).is_empty(), "no qemu left");
}

//! The domain-manager binary against the real test guest under TCG and real processes.
//! Needs qemu-system-x86_64 and qemu-utils (scripts/install-deps): without them these fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::time::{Duration, Instant};

use cairn_types::DomainState;
use cairn_types::domain::{DomainLiveOp, DomainLiveOpState};
use common::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_boots_is_readopted_after_manager_kill_and_stops_with_disk_synced() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let disk = h.qcow2("disk.qcow2");
    let started = Instant::now();
    h.configs
        .publish(vm_config(app, Some(&disk), true))
        .await
        .unwrap();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    let console = running.log_path.clone();
    wait_console(&console, "CAIRN-GUEST-BOOTED", |t| {
        t.contains("CAIRN-GUEST-BOOTED")
    })
    .await;
    eprintln!("boot to marker: {:?}", started.elapsed());
    let expected_accel = if std::path::Path::new("/dev/kvm").exists() {
        running.accel.clone()
    } else {
        "tcg".into()
    };
    assert_eq!(running.accel, expected_accel);
    assert!(running.activated && running.boot_time.is_some());
    let pid = running.pid.expect("a running VM has a pid");
    assert_eq!(qemus_under(h.tmp.path()), vec![pid]);

    // Crash the domain-manager; the VM must go on and be re-adopted, not started again.
    h.kill_manager();
    let before = counters(&console, 0).last().copied().unwrap_or(0);
    h.start_manager();
    h.wait_restarted().await;
    let adopted = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    assert_eq!(adopted.pid, Some(pid), "re-adopted, same qemu");
    assert!(h.manager_log().contains("re-adopted running domain"));
    assert_eq!(
        qemus_under(h.tmp.path()),
        vec![pid],
        "still exactly one qemu"
    );
    wait_console(&console, "the counter going on", |_| {
        counters(&console, 0).last().copied().unwrap_or(0) >= before + 2
    })
    .await;

    // Graceful stop through the adopted QMP socket: powerdown, the guest syncs its disk.
    let stopping = Instant::now();
    h.configs
        .publish(vm_config(app, Some(&disk), false))
        .await
        .unwrap();
    let halted = h
        .wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    let took = stopping.elapsed();
    eprintln!("graceful stop: {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "graceful stop took {took:?}"
    );
    assert!(!halted.activated && halted.pid.is_none());
    reap(pid);
    assert!(qemus_under(h.tmp.path()).is_empty());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("CAIRN-POWERDOWN"),
        "guest saw the power button"
    );
    let last = *counters(&console, 0).last().unwrap();
    assert_eq!(
        disk_counter(&disk),
        Some(last),
        "the guest synced its last counter to disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_without_a_kernel_boots_its_first_disk_through_the_bios_and_keeps_its_counter_there() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let disk = boot_disk_copy(h.tmp.path());
    let started = Instant::now();
    h.configs
        .publish(disk_boot_config(app, &disk, true))
        .await
        .unwrap();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    let console = running.log_path.clone();
    // SeaBIOS ran syslinux from the disk, which started the kernel: its banner, then the
    // BOOT_IMAGE it passes (qemu -kernel passes none).
    wait_console(&console, "the guest booted by syslinux", |t| {
        t.contains("SYSLINUX") && t.contains("CAIRN-GUEST-BOOTED") && t.contains("boot=/vmlinuz")
    })
    .await;
    eprintln!("BIOS boot to marker: {:?}", started.elapsed());
    let pid = running.pid.expect("a running VM has a pid");
    wait_console(&console, "the counter going", |_| {
        counters(&console, 0).last().copied().unwrap_or(0) >= 2
    })
    .await;

    h.configs
        .publish(disk_boot_config(app, &disk, false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    reap(pid);
    let last = *counters(&console, 0).last().unwrap();
    assert_eq!(
        disk_counter_at(&disk, BOOT_DISK_COUNTER_OFFSET),
        Some(last),
        "the guest synced its last counter to its data partition"
    );
    let mbr = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x55 510 1"])
        .arg(&disk)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&mbr.stdout);
    assert!(
        mbr.status.success() && said.contains("read 1/1") && !said.contains("verification failed"),
        "the boot sector's signature is intact: {}",
        String::from_utf8_lossy(&mbr.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_live_ops_stateful_load_reverts_counter_and_disk_and_outside_kill_breaks() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let disk = h.qcow2("disk.qcow2");
    h.configs
        .publish(vm_config(app, Some(&disk), true))
        .await
        .unwrap();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    let console = running.log_path.clone();
    wait_console(&console, "two counter ticks", |_| {
        counters(&console, 0).len() >= 2
    })
    .await;

    // Pause: the counter stops; what the guest printed last is (at most one tick behind) on disk.
    let op = h.live_op(app, DomainLiveOp::Pause, "").await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    assert!(h.wait_status(app, "paused", |s| s.paused).await.paused);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let saved = *counters(&console, 0).last().unwrap();
    let saved_disk = disk_counter(&disk).expect("the guest wrote its counter");
    assert!(
        saved_disk == saved || saved_disk == saved + 1,
        "disk {saved_disk}, console {saved}"
    );

    // Disk-only internal snapshot of the running VM, and its deletion.
    let op = h
        .live_op(app, DomainLiveOp::DiskSnapshotCreate, "disk-only")
        .await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    assert!(snapshot_names(&disk).contains("disk-only"));
    let op = h
        .live_op(app, DomainLiveOp::DiskSnapshotDelete, "disk-only")
        .await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    assert!(!snapshot_names(&disk).contains("disk-only"));

    // Stateful snapshot, then let the guest count on.
    let op = h.live_op(app, DomainLiveOp::StateSave, "mem").await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    eprintln!("state save: {} ms", op.duration_ms);
    assert!(snapshot_names(&disk).contains("mem"));
    let op = h.live_op(app, DomainLiveOp::Resume, "").await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    wait_console(&console, "four more ticks", |_| {
        counters(&console, 0).last().copied().unwrap_or(0) >= saved + 4
    })
    .await;

    // Load while paused: stays paused, the disk is back at the saved value.
    assert_eq!(
        h.live_op(app, DomainLiveOp::Pause, "").await.state,
        DomainLiveOpState::Done
    );
    assert!(disk_counter(&disk).unwrap() >= saved + 3);
    let op = h.live_op(app, DomainLiveOp::StateLoad, "mem").await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    eprintln!("state load: {} ms", op.duration_ms);
    assert!(h.wait_status(app, "paused", |s| s.paused).await.paused);
    assert_eq!(
        disk_counter(&disk),
        Some(saved_disk),
        "disk sector reverted"
    );
    let mark = console_len(&console);
    assert_eq!(
        h.live_op(app, DomainLiveOp::Resume, "").await.state,
        DomainLiveOpState::Done
    );
    wait_console(&console, "a tick after the load", |_| {
        !counters(&console, mark).is_empty()
    })
    .await;
    assert_eq!(
        counters(&console, mark)[0],
        saved + 1,
        "the guest's memory continued from the snapshot"
    );

    let op = h.live_op(app, DomainLiveOp::StateDelete, "mem").await;
    assert_eq!(op.state, DomainLiveOpState::Done, "{op:?}");
    assert!(!snapshot_names(&disk).contains("mem"));

    // A live op on a missing snapshot fails with the reason.
    let op = h.live_op(app, DomainLiveOp::StateLoad, "nope").await;
    assert_eq!(op.state, DomainLiveOpState::Failed);
    assert!(op.error.error.contains("nope"), "{}", op.error.error);

    // qemu killed from outside: Broken, with its exit status.
    let pid = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await
        .pid
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let broken = h
        .wait_status(app, "Broken", |s| s.state == DomainState::Broken)
        .await;
    assert_eq!(broken.exit_status, "killed by signal 9");
    assert!(
        broken.error.error.contains("ended on its own"),
        "{}",
        broken.error.error
    );
    assert!(!broken.activated && broken.pid.is_none());
    assert!(qemus_under(h.tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_app_logs_is_readopted_stops_on_sigterm_and_breaks_when_killed() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let volume = h.tmp.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let script = "echo \"hello $GREETING in $PWD vol=$CAIRN_VOLUME_0\"; \
                  trap 'echo got-term; exit 0' TERM; while :; do sleep 0.05; done";
    h.configs
        .publish(process_config(app, script, &volume, true))
        .await
        .unwrap();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    let pid = running.pid.unwrap();
    let log = running.log_path.clone();
    let expected = format!("hello cairn in {0} vol={0}", volume.display());
    wait_console(&log, "the greeting", |t| t.contains(&expected)).await;

    h.kill_manager();
    h.start_manager();
    h.wait_restarted().await;
    let adopted = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    assert_eq!(adopted.pid, Some(pid), "re-adopted, not started again");

    let stopping = Instant::now();
    h.configs
        .publish(process_config(app, script, &volume, false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    assert!(stopping.elapsed() < Duration::from_secs(5));
    wait_console(&log, "the SIGTERM trap", |t| t.contains("got-term")).await;
    reap(pid);

    // Started again by this domain-manager, then killed from outside.
    h.configs
        .publish(process_config(app, script, &volume, true))
        .await
        .unwrap();
    let again = h
        .wait_status(app, "Running again", |s| {
            s.state == DomainState::Running && s.pid != Some(pid)
        })
        .await;
    let pid2 = again.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid2 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let broken = h
        .wait_status(app, "Broken", |s| s.state == DomainState::Broken)
        .await;
    assert_eq!(broken.exit_status, "killed by signal 9");

    // Deactivating a broken domain halts it; deleting the config removes its status.
    h.configs
        .publish(process_config(app, script, &volume, false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    h.configs.unpublish(&app.to_string()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while h.statuses.get(&app.to_string()).is_some() {
        assert!(Instant::now() < deadline, "status not unpublished");
        let _ = tokio::time::timeout(Duration::from_millis(200), h.statuses.recv()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_right_after_starting_qemu_readopts_it_and_never_starts_a_second() {
    become_subreaper();
    let mut h = Harness::new_crashing_at("domain-manager:vm-spawned").await;
    let app = Uuid::new_v4();
    let disk = h.qcow2("disk.qcow2");
    h.configs
        .publish(vm_config(app, Some(&disk), true))
        .await
        .unwrap();
    h.wait_manager_exit();
    let orphan = qemus_under(h.tmp.path());
    assert_eq!(orphan.len(), 1, "the crash left its qemu: {orphan:?}");
    h.start_manager();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    assert_eq!(running.pid, Some(orphan[0]), "the orphan was adopted");
    wait_console(&running.log_path, "CAIRN-GUEST-BOOTED", |t| {
        t.contains("CAIRN-GUEST-BOOTED")
    })
    .await;
    assert_eq!(
        qemus_under(h.tmp.path()),
        orphan,
        "no second qemu on the same disk"
    );
    h.configs
        .publish(vm_config(app, Some(&disk), false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    reap(orphan[0]);
    assert!(qemus_under(h.tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_ignoring_powerdown_is_ended_with_quit_after_the_stop_timeout() {
    let mut h = Harness::new().await;
    h.kill_manager();
    h.stop_timeout = "1".into();
    h.start_manager();
    let app = Uuid::new_v4();
    // Without ACPI the guest has no power button: system_powerdown goes unheard.
    let mut config = vm_config(app, None, true);
    if let cairn_types::DomainSpec::Vm(vm) = &mut config.spec {
        vm.append =
            "console=ttyS0 quiet panic=-1 cryptomgr.notests acpi=off cairn.workload=idle".into();
    }
    h.configs.publish(config.clone()).await.unwrap();
    let running = h
        .wait_status(app, "Running", |s| s.state == DomainState::Running)
        .await;
    wait_console(&running.log_path, "CAIRN-GUEST-BOOTED", |t| {
        t.contains("CAIRN-GUEST-BOOTED")
    })
    .await;
    config.activate = false;
    let stopping = Instant::now();
    h.configs.publish(config).await.unwrap();
    let halted = h
        .wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "stop took {took:?}"
    );
    assert_eq!(
        halted.exit_status, "exit status 0",
        "qemu ended by QMP quit"
    );
    assert!(
        h.manager_log().contains("guest ignored powerdown"),
        "{}",
        h.manager_log()
    );
    assert!(qemus_under(h.tmp.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_volume_is_found_through_volume_status() {
    let mut h = Harness::new().await;
    let bus = cairn_pubsub::Bus::new("volume-manager", &h.run, &h.persist);
    let volumes = bus
        .publish::<cairn_types::VolumeStatus>(Default::default())
        .await
        .unwrap();
    let dir = h.tmp.path().join("vol-from-status");
    std::fs::create_dir(&dir).unwrap();
    let volume_id = Uuid::new_v4();
    volumes
        .publish(cairn_types::VolumeStatus {
            volume_id,
            state: cairn_types::VolumeState::Ready,
            format: cairn_types::VolumeFormat::Dir,
            file_location: dir.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let app = Uuid::new_v4();
    let mut config = process_config(app, "echo \"at $PWD\"; exec sleep 30", &dir, true);
    config.disk_config_list[0].volume_key = cairn_types::volume_key(volume_id, 0);
    config.disk_config_list[0].file_location = Default::default();
    // The volume-manager's table reaches the domain-manager asynchronously: retry by restart.
    let deadline = Instant::now() + WAIT;
    let running = loop {
        h.configs.publish(config.clone()).await.unwrap();
        // Only a status for this try counts: an older Broken one would restart it again.
        let attempt = config.restart_counter;
        let s = h
            .wait_status(app, "Running or Broken", move |s| {
                s.restart_counter == attempt
                    && matches!(s.state, DomainState::Running | DomainState::Broken)
            })
            .await;
        if s.state == DomainState::Running {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "never resolved: {}\nmanager log:\n{}",
            s.error.error,
            h.manager_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        config.restart_counter += 1;
    };
    wait_console(&running.log_path, "the volume as working directory", |t| {
        t.contains(&format!("at {}", dir.display()))
    })
    .await;
    config.activate = false;
    h.configs.publish(config).await.unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_report_clear_errors_and_start_nothing() {
    let mut h = Harness::new().await;
    let missing_kernel = Uuid::new_v4();
    let mut c = vm_config(missing_kernel, None, true);
    if let cairn_types::DomainSpec::Vm(vm) = &mut c.spec {
        vm.kernel = h.tmp.path().join("no-such-vmlinuz");
    }
    h.configs.publish(c).await.unwrap();
    let zero_memory = Uuid::new_v4();
    let mut c = vm_config(zero_memory, None, true);
    if let cairn_types::DomainSpec::Vm(vm) = &mut c.spec {
        vm.memory_mib = 0;
    }
    h.configs.publish(c).await.unwrap();
    let unknown_volume = Uuid::new_v4();
    let mut c = vm_config(unknown_volume, None, true);
    c.disk_config_list = vec![cairn_types::DiskConfig {
        volume_key: "11111111-2222-3333-4444-555555555555#0".into(),
        ..Default::default()
    }];
    h.configs.publish(c).await.unwrap();

    for (app, words) in [
        (missing_kernel, "no-such-vmlinuz does not exist"),
        (zero_memory, "MemoryMiB is 0"),
        (
            unknown_volume,
            "volume 11111111-2222-3333-4444-555555555555#0 is unknown",
        ),
    ] {
        let s = h
            .wait_status(app, "Broken", |s| s.state == DomainState::Broken)
            .await;
        assert!(s.error.error.contains(words), "{app}: {}", s.error.error);
        assert!(s.pid.is_none() && !s.activated);
    }
    assert!(qemus_under(h.tmp.path()).is_empty(), "nothing started");
}

/// The accelerator probe boots a guest (seconds where /dev/kvm opens but stalls); its answer is
/// kept under /persist and reused after a reboot (run root wiped) on the same host, and probed
/// again when what it depends on changed.
#[test]
fn the_accelerator_probed_on_an_earlier_boot_is_reused_and_a_stale_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let persist = tmp.path().join("persist");
    let remembered = persist.join("domain-manager").join("accel");
    // One boot: start with --accel auto until the answer is known, then stop.
    let boot = |n: u32| -> String {
        let log = tmp.path().join(format!("boot-{n}.log"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-domain-manager"))
            .arg("--run-dir")
            .arg(&run)
            .arg("--persist-dir")
            .arg(&persist)
            .args(["--accel", "auto"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // The supervisor logs the choice once it is made ("accelerator accel=…").
        let chosen = |text: &str| text.lines().any(|l| l.contains("supervisor: accelerator"));
        let mut text = String::new();
        while Instant::now() < deadline && !chosen(&text) {
            std::thread::sleep(Duration::from_millis(50));
            text = std::fs::read_to_string(&log).unwrap_or_default();
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&run);
        assert!(chosen(&text), "no accelerator chosen:\n{text}");
        text
    };
    let first = boot(1);
    assert!(!first.contains("earlier boot"), "{first}");
    let kept = std::fs::read_to_string(&remembered).unwrap();
    let accel = kept.split_whitespace().next().unwrap().to_string();
    assert!(matches!(accel.as_str(), "kvm" | "tcg"), "{kept}");
    assert!(kept.contains("kernel=") && kept.contains("kvm="), "{kept}");

    let second = boot(2);
    assert!(
        second.contains("earlier boot"),
        "reused after a reboot:\n{second}"
    );

    // A remembered answer for another kernel is not trusted: probed again, and replaced.
    std::fs::write(&remembered, "kvm kernel=0.0.0-other qemu=x kvm=true\n").unwrap();
    let third = boot(3);
    assert!(!third.contains("earlier boot"), "{third}");
    assert_eq!(std::fs::read_to_string(&remembered).unwrap(), kept);
}

/// The next `DomainMetric` of `app` that satisfies `pred`, within `WAIT`.
async fn wait_metric(
    metrics: &mut cairn_pubsub::Subscription<cairn_types::DomainMetric>,
    app: Uuid,
    what: &str,
    pred: impl Fn(&cairn_types::DomainMetric) -> bool,
) -> cairn_types::DomainMetric {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(m) = metrics.get(&app.to_string())
            && pred(m)
        {
            return m.clone();
        }
        let got = tokio::time::timeout_at(deadline, metrics.recv()).await;
        assert!(
            got.is_ok(),
            "no DomainMetric `{what}` for {app} within {WAIT:?}; last: {:#?}",
            metrics.get(&app.to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_cpu_and_memory_are_published_as_its_domain_metric() {
    let mut h = Harness::new().await;
    let mut metrics = cairn_pubsub::Bus::new("config-agent", &h.run, &h.persist)
        .subscribe::<cairn_types::DomainMetric>("domain-manager");
    let app = Uuid::new_v4();
    let volume = h.tmp.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    // Some CPU time first (a busy loop of a few hundred milliseconds), then a child that
    // keeps the marker: both processes count.
    let script = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 600 & wait";
    h.configs
        .publish(process_config(app, script, &volume, true))
        .await
        .unwrap();
    let running = wait_metric(&mut metrics, app, "busy and two processes", |m| {
        m.activated && m.processes == 2 && m.cpu_total_ns >= 100_000_000
    })
    .await;
    assert!(running.used_memory > 0 && running.max_used_memory >= running.used_memory);
    assert!(running.last_heard.is_some());
    eprintln!("metric of the running app: {running:?}");

    h.configs
        .publish(process_config(app, script, &volume, false))
        .await
        .unwrap();
    h.wait_status(app, "Halted", |s| s.state == DomainState::Halted)
        .await;
    let stopped = wait_metric(&mut metrics, app, "stopped", |m| !m.activated).await;
    assert_eq!(stopped.used_memory, 0);
    assert!(
        stopped.cpu_total_ns >= running.cpu_total_ns,
        "the CPU total is kept"
    );
}

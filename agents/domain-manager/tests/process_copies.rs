//! At most one copy of a process app, whatever instruction the domain-manager is killed at:
//! the real binary, real process apps, real SIGKILLs (crash points and from outside). Each test
//! counts the app's running copies (group leaders whose command line names the app) after the
//! domain-manager is back: exactly one when the config says activate, none when it says stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_types::{DomainConfig, DomainState, DomainStatus};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

/// A process app that names itself (its UUID) on its command line, stops on SIGTERM (or, with
/// `ignore_term`, only on SIGKILL), and ends with status 3 while `<volume>/fail` exists. Once its
/// trap is set it creates `<volume>/ready`: a SIGTERM before that would end it whatever the trap.
fn app_config(h: &Harness, app: Uuid, ignore_term: bool, activate: bool) -> DomainConfig {
    let volume = h.tmp.path().join(format!("volume-{app}"));
    std::fs::create_dir_all(&volume).unwrap();
    let trap = if ignore_term {
        "trap '' TERM"
    } else {
        "trap 'exit 0' TERM"
    };
    let script = format!(
        "[ -e \"$CAIRN_VOLUME_0/fail\" ] && exit 3; {trap}; : > \"$CAIRN_VOLUME_0/ready\"; while :; do sleep 0.05; done # app {app} in {}",
        // The directory names the test, so that the harness ends what a failed test left.
        volume.display()
    );
    process_config(app, &script, &volume, activate)
}

fn copies(app: Uuid) -> Vec<u32> {
    process_apps_mentioning(&format!("# app {app}"))
}

/// Publishes `config` under a fresh display name and waits for the status that answers it, so
/// that every earlier config was carried out (a start included) before the caller counts.
async fn settle(
    h: &mut Harness,
    mut config: DomainConfig,
    what: &str,
    state: DomainState,
) -> DomainStatus {
    let app = config.uuid_and_version.uuid;
    let name = format!("check-{}", Uuid::new_v4());
    config.display_name = name.clone();
    h.configs.publish(config).await.unwrap();
    h.wait_status(app, what, |s| s.display_name == name && s.state == state)
        .await
}

/// After a restart: exactly one copy, the one the status names; then a stop leaves none.
async fn one_copy_then_none(h: &mut Harness, app: Uuid, ignore_term: bool) -> u32 {
    let config = app_config(h, app, ignore_term, true);
    let running = settle(h, config, "Running", DomainState::Running).await;
    let found = copies(app);
    assert_eq!(
        found.len(),
        1,
        "copies of app {app} running: {found:?}\nmanager log:\n{}",
        h.manager_log()
    );
    assert_eq!(running.pid, Some(found[0]), "the status names the copy");
    let config = app_config(h, app, ignore_term, false);
    settle(h, config, "Halted", DomainState::Halted).await;
    assert_eq!(
        copies(app),
        Vec::<u32>::new(),
        "a stopped app leaves no copy"
    );
    reap(found[0]);
    found[0]
}

/// Waits until `app` has set its SIGTERM trap (it created `ready`).
fn wait_ready(h: &Harness, app: Uuid) {
    let ready = h.tmp.path().join(format!("volume-{app}/ready"));
    let deadline = Instant::now() + WAIT;
    while !ready.exists() {
        assert!(Instant::now() < deadline, "app {app} never set its trap");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `app` has a running copy, polling `/proc` as fast as it can.
fn wait_first_copy(app: Uuid) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = copies(app).first() {
            return *pid;
        }
        assert!(Instant::now() < deadline, "app {app} never started");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_at_each_step_of_a_start_leaves_exactly_one_copy() {
    become_subreaper();
    let mut h = Harness::new().await;
    for point in [
        "domain-manager:process-spawned",
        "domain-manager:process-pidfile",
        "domain-manager:process-running",
    ] {
        h.kill_manager();
        h.start_manager_crashing_at(point);
        let app = Uuid::new_v4();
        h.configs
            .publish(app_config(&h, app, false, true))
            .await
            .unwrap();
        h.wait_manager_exit();
        let orphan = copies(app);
        assert_eq!(
            orphan.len(),
            1,
            "{point}: the crash left its process: {orphan:?}"
        );
        h.start_manager();
        h.wait_restarted().await;
        let kept = one_copy_then_none(&mut h, app, false).await;
        assert_eq!(kept, orphan[0], "{point}: the orphan was adopted");
        println!("{point}: orphan {kept} re-adopted, then stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_sigkilled_as_the_app_appears_leaves_exactly_one_copy() {
    become_subreaper();
    let mut h = Harness::new().await;
    let rounds = 8;
    let mut before_pidfile = 0;
    for round in 0..rounds {
        let app = Uuid::new_v4();
        h.configs
            .publish(app_config(&h, app, false, true))
            .await
            .unwrap();
        let first = wait_first_copy(app);
        h.kill_manager();
        let pidfile = h.run.join(format!("domain-manager/apps/{app}/process.pid"));
        if !pidfile.exists() {
            before_pidfile += 1;
        }
        h.start_manager();
        h.wait_restarted().await;
        let kept = one_copy_then_none(&mut h, app, false).await;
        assert_eq!(kept, first, "round {round}: the first copy was adopted");
        h.configs.unpublish(&app.to_string()).await.unwrap();
    }
    println!("{rounds} kills as the app appeared, {before_pidfile} before its pidfile was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_while_stopping_leaves_no_copy() {
    become_subreaper();
    let mut h = Harness::new().await;
    h.kill_manager();
    h.stop_timeout = "1".into();
    h.start_manager_crashing_at("domain-manager:process-stop-signalled");
    let app = Uuid::new_v4();
    // Ignores SIGTERM: still running when the domain-manager dies after sending it.
    let cfg = app_config(&h, app, true, true);
    let running = settle(&mut h, cfg, "Running", DomainState::Running).await;
    wait_ready(&h, app);
    h.configs
        .publish(app_config(&h, app, true, false))
        .await
        .unwrap();
    h.wait_manager_exit();
    assert_eq!(
        copies(app),
        vec![running.pid.unwrap()],
        "it outlived the crash"
    );
    h.start_manager();
    h.wait_restarted().await;
    let cfg = app_config(&h, app, true, false);
    settle(&mut h, cfg, "Halted", DomainState::Halted).await;
    assert_eq!(copies(app), Vec::<u32>::new(), "stopped after the restart");
    reap(running.pid.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_domains_on_exit_stops_an_app_started_just_before_a_crash() {
    become_subreaper();
    let mut h = Harness::new_crashing_at("domain-manager:process-spawned").await;
    let app = Uuid::new_v4();
    h.configs
        .publish(app_config(&h, app, false, true))
        .await
        .unwrap();
    h.wait_manager_exit();
    let orphan = copies(app);
    assert_eq!(orphan.len(), 1, "the crash left its process: {orphan:?}");
    h.extra_args = vec!["--stop-domains-on-exit".into()];
    h.start_manager();
    h.wait_restarted().await;
    let cfg = app_config(&h, app, false, true);
    settle(&mut h, cfg, "Running", DomainState::Running).await;
    kill(Pid::from_raw(h.manager_pid() as i32), Signal::SIGTERM).unwrap();
    h.wait_manager_exit();
    assert_eq!(
        copies(app),
        Vec::<u32>::new(),
        "every copy stopped with the device\nmanager log:\n{}",
        h.manager_log()
    );
    reap(orphan[0]);
}

/// Waits until the status key file on disk holds `needle` (it is written behind).
fn wait_on_disk(run: &Path, app: Uuid, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !status_on_disk(run, app).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle} never written: {}",
            status_on_disk(run, app)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The status key file on disk, as a restarted domain-manager reads it (its `DomainMetric`
/// has a key file of the same name in its own topic directory).
fn status_on_disk(run: &Path, app: Uuid) -> String {
    let file = run
        .join("domain-manager")
        .join("DomainStatus")
        .join(format!("{app}.json"));
    std::fs::read_to_string(file).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_process_app_starts_again_only_on_a_new_restart_counter() {
    become_subreaper();
    let mut h = Harness::new().await;
    let app = Uuid::new_v4();
    let config = app_config(&h, app, false, true);
    let fail = config.disk_config_list[0].file_location.join("fail");
    std::fs::write(&fail, "").unwrap();

    // Ends on its own: Broken, with its exit status and an error naming the app.
    let broken = settle(&mut h, config.clone(), "Broken", DomainState::Broken).await;
    assert_eq!(broken.exit_status, "exit status 3");
    assert!(
        broken.error.error.contains(&app.to_string())
            && broken
                .error
                .error
                .contains("ended on its own: exit status 3"),
        "{}",
        broken.error.error
    );
    assert!(!broken.activated && broken.pid.is_none());
    std::fs::remove_file(&fail).unwrap();

    // The same generation is not started again, also not by a restarted domain-manager.
    settle(&mut h, config.clone(), "still Broken", DomainState::Broken).await;
    assert_eq!(copies(app), Vec::<u32>::new());
    wait_on_disk(&h.run, app, "\"Broken\"");
    h.kill_manager();
    h.start_manager();
    h.wait_restarted().await;
    settle(
        &mut h,
        config.clone(),
        "Broken after a restart",
        DomainState::Broken,
    )
    .await;
    assert_eq!(
        copies(app),
        Vec::<u32>::new(),
        "not started again by a restart"
    );

    // A new restart counter starts it.
    let mut bumped = config.clone();
    bumped.restart_counter = 1;
    let running = settle(&mut h, bumped.clone(), "Running", DomainState::Running).await;
    assert_eq!(copies(app), vec![running.pid.unwrap()]);

    // Ended while the domain-manager was down: Broken, and again a bump starts it.
    wait_on_disk(&h.run, app, "\"Running\"");
    wait_on_disk(&h.run, app, &format!("{}", running.pid.unwrap()));
    h.kill_manager();
    kill(Pid::from_raw(running.pid.unwrap() as i32), Signal::SIGKILL).unwrap();
    reap(running.pid.unwrap());
    h.start_manager();
    h.wait_restarted().await;
    let down = settle(&mut h, bumped.clone(), "Broken", DomainState::Broken).await;
    assert!(
        down.error
            .error
            .contains("ended while the domain-manager was down")
    );
    assert_eq!(copies(app), Vec::<u32>::new());
    bumped.restart_counter = 2;
    let again = settle(&mut h, bumped.clone(), "Running", DomainState::Running).await;
    assert_eq!(copies(app), vec![again.pid.unwrap()]);
    bumped.activate = false;
    settle(&mut h, bumped, "Halted", DomainState::Halted).await;
    assert_eq!(copies(app), Vec::<u32>::new());
    reap(again.pid.unwrap());
}

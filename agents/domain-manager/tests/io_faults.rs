//! The domain-manager's own file calls failing as it starts a process app: the real agent runs
//! under libfiu's POSIX preload (`fiu-run -x`, Debian `fiu-utils`), and `fiu-ctrl` makes its
//! next call of one kind fail once with EIO or ENOSPC, just before the app is asked to run.
//! Whatever step of the start it hits (a `/proc` read, the console log, the pidfile), the
//! agent stays up and the start either completes with exactly one copy of the app or fails
//! with an error naming the app and the fault and leaves no copy running; a new restart
//! counter then starts exactly one. Either way a domain-manager SIGKILLed afterwards adopts
//! that copy and starts no second one (the pidfile is only a shortcut: a copy whose pidfile
//! could not be written is found by its marker). Prints one line per fault for the README.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::time::Duration;

use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
use cairn_types::{DomainConfig, DomainState, DomainStatus};
use common::*;
use uuid::Uuid;

fn app_config(h: &Harness, app: Uuid, activate: bool, restart_counter: u32) -> DomainConfig {
    let volume = h.tmp.path().join(format!("volume-{app}"));
    std::fs::create_dir_all(&volume).unwrap();
    let script = format!(
        "trap 'exit 0' TERM; while :; do sleep 0.05; done # app {app} in {}",
        volume.display()
    );
    let mut config = process_config(app, &script, &volume, activate);
    config.restart_counter = restart_counter;
    config
}

fn copies(app: Uuid) -> Vec<u32> {
    process_apps_mentioning(&format!("# app {app}"))
}

/// Publishes `config` and waits until its generation is either running or has failed.
async fn outcome(h: &mut Harness, config: DomainConfig) -> DomainStatus {
    let app = config.uuid_and_version.uuid;
    let counter = config.restart_counter;
    h.configs.publish(config).await.unwrap();
    h.wait_status(app, "Running or failed", |s| {
        s.restart_counter == counter && (s.state == DomainState::Running || s.error.is_error())
    })
    .await
}

async fn fault_case(point: &str, errno: i32) -> String {
    let case = format!("{point} errno={errno}");
    let mut h = Harness::new().await;
    h.kill_manager();
    let fiu = Fiu::new(h.tmp.path());
    h.launcher = fiu.launcher();
    h.start_manager();
    h.wait_restarted().await;

    // Another app first, so that the agent is settled and idle when the fault is armed.
    let other = Uuid::new_v4();
    let config = app_config(&h, other, true, 0);
    let status = outcome(&mut h, config).await;
    assert_eq!(status.state, DomainState::Running, "{case}: {status:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let app = Uuid::new_v4();
    fiu.fail_once(h.manager_pid(), point, errno);
    let config = app_config(&h, app, true, 0);
    let first = outcome(&mut h, config).await;
    let running = copies(app);
    let (said, counter) = if first.state == DomainState::Running {
        assert_eq!(running, vec![first.pid.unwrap()], "{case}: one copy");
        let warned: Vec<String> = h
            .manager_log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| l.split_once(": ").map_or(l, |(_, said)| said).to_string())
            .collect();
        (format!("started regardless; warned: {warned:?}"), 0)
    } else {
        assert_eq!(
            running,
            Vec::<u32>::new(),
            "{case}: a failed start left a copy"
        );
        let text = first.error.error.clone();
        assert!(
            text.to_lowercase().contains(fault_words(errno)) && text.contains(&app.to_string()),
            "{case}: the error names neither the fault nor the app: {text}"
        );
        let config = app_config(&h, app, true, 1);
        let again = outcome(&mut h, config).await;
        assert_eq!(again.state, DomainState::Running, "{case}: {again:?}");
        assert_eq!(copies(app), vec![again.pid.unwrap()], "{case}: one copy");
        (text, 1)
    };

    let kept = copies(app);
    h.kill_manager();
    h.launcher.clear();
    h.start_manager();
    h.wait_restarted().await;
    let config = app_config(&h, app, true, counter);
    let adopted = outcome(&mut h, config).await;
    assert_eq!(adopted.state, DomainState::Running, "{case}: {adopted:?}");
    assert_eq!(
        copies(app),
        kept,
        "{case}: the copy was adopted, no second one started"
    );

    for (id, counter) in [(app, counter), (other, 0)] {
        let config = app_config(&h, id, false, counter);
        h.configs.publish(config).await.unwrap();
        h.wait_status(id, "Halted", |s| s.state == DomainState::Halted)
            .await;
        assert_eq!(copies(id), Vec::<u32>::new(), "{case}: stopped");
    }
    for pid in kept {
        reap(pid);
    }
    format!("{case}: {}", said.chars().take(160).collect::<String>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_open_or_rename_as_a_process_app_starts_leaves_one_copy_or_none() {
    become_subreaper();
    for (point, errno) in [
        ("posix/io/oc/open", ENOSPC),
        ("posix/io/oc/open", EIO),
        ("posix/io/dir/rename", ENOSPC),
        ("posix/io/sync/fsync", EIO),
    ] {
        println!("fiu domain-manager {}", fault_case(point, errno).await);
    }
}

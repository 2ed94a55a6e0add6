//! The restart policy (issue 17) against a simulated domain-manager that behaves like the real
//! one: it starts a domain for each new generation (version, restart counter) it is asked to
//! activate, never again a generation that broke, and reports a domain that ended on its own or
//! failed to start as Broken with the generation it had.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::collections::{BTreeSet, VecDeque};

use cairn_app_manager::app_status;
use cairn_app_manager::machine::restart::{
    FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS, STABLE_SECONDS, backoff,
};
use cairn_app_manager::machine::{
    Action, AppState, Input, Phase, SnapshotState, domain_restart_counter, next_wakeup, step,
};
use cairn_types::{
    AppInstanceConfig, ProcessSpec, RestartPolicy, SnapshotConfig, SnapshotDesc, SnapshotType,
    SwState, UUIDandVersion, VolumeRefConfig, VolumesSnapshotStatus,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;

const APP: u128 = 0xa11;

fn config(version: &str, command: &str) -> AppInstanceConfig {
    AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: Uuid::from_u128(APP),
            version: version.into(),
        },
        display_name: "sensor".into(),
        activate: true,
        volume_ref_config_list: vec![VolumeRefConfig {
            volume_id: Uuid::from_u128(0xb0b),
            ..Default::default()
        }],
        snapshot: SnapshotConfig {
            max_snapshots: 4,
            ..Default::default()
        },
        domain: Some(cairn_types::DomainSpec::Process(ProcessSpec {
            command: command.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The command the simulated domain-manager cannot start.
const MISSING: &str = "/no/such/command";

/// The device around one app's machine.
struct Device {
    state: AppState,
    persisted: AppState,
    now: DateTime<Utc>,
    inbox: VecDeque<Input>,
    /// The generation the domain runs, if it runs.
    running: Option<(String, u32)>,
    /// Generations that broke: never started again (the domain-manager's rule).
    broken: BTreeSet<(String, u32)>,
    /// Every start the domain-manager made.
    starts: Vec<(String, u32)>,
}

impl Device {
    fn new(first: AppInstanceConfig) -> Self {
        Self::booted(first, None)
    }

    /// A device whose boot's first config was in hand at `ready_at` (the start delay's base).
    fn booted(first: AppInstanceConfig, ready_at: Option<DateTime<Utc>>) -> Self {
        let state = AppState::new(first.clone());
        let mut device = Self {
            persisted: state.clone(),
            state,
            now: Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap(),
            inbox: VecDeque::new(),
            running: None,
            broken: BTreeSet::new(),
            starts: Vec::new(),
        };
        if let Some(ready_at) = ready_at {
            device.input(Input::Boot { ready_at });
        }
        device.input(Input::Config(first));
        device.input(Input::Volumes { ready: true });
        device.settle();
        device
    }

    fn input(&mut self, input: Input) {
        let (state, actions) = step(self.state.clone(), input, self.now);
        self.state = state;
        for action in actions {
            match action {
                Action::Persist => self.persisted = self.state.clone(),
                Action::Domain { activate, config } => self.domain(activate, &config),
                Action::Volumes(request) => {
                    assert!(self.running.is_none(), "volume step while the domain runs");
                    self.inbox
                        .push_back(Input::VolumesResult(VolumesSnapshotStatus {
                            snapshot_id: request.snapshot_id,
                            app_uuid: request.app_uuid,
                            request_counter: request.request_counter,
                            result_of_action: request.action,
                            time_created: Some(self.now),
                            ..Default::default()
                        }));
                }
                _ => {}
            }
        }
    }

    /// The domain-manager's side of a DomainConfig.
    fn domain(&mut self, activate: bool, config: &AppInstanceConfig) {
        let generation = (
            config.uuid_and_version.version.clone(),
            domain_restart_counter(config, self.state.restarts),
        );
        if activate && config.domain.is_none() {
            // The executor cannot make a DomainConfig of it, and says why.
            self.inbox.push_back(Input::CannotStart {
                reason: "app has no domain spec (vm or process): nothing to run".into(),
            });
            return;
        }
        if !activate {
            self.running = None;
            self.broken.clear();
            self.inbox.push_back(Input::Domain { active: false });
            return;
        }
        if self.running.as_ref() == Some(&generation) || self.broken.contains(&generation) {
            return;
        }
        self.starts.push(generation.clone());
        let command = match &config.domain {
            Some(cairn_types::DomainSpec::Process(p)) => p.command.clone(),
            _ => Default::default(),
        };
        if command.as_os_str() == MISSING {
            self.broken.insert(generation.clone());
            self.inbox.push_back(Input::DomainBroken {
                version: generation.0,
                restart_counter: generation.1,
                reason: format!("cannot start {MISSING}: No such file or directory"),
                clean_exit: false,
            });
        } else {
            self.running = Some(generation);
            self.inbox.push_back(Input::Domain { active: true });
        }
    }

    /// The app's process is killed: the domain-manager reports it Broken.
    fn kill_app(&mut self) {
        let generation = self.running.take().expect("the app runs");
        self.broken.insert(generation.clone());
        self.inbox.push_back(Input::DomainBroken {
            version: generation.0,
            restart_counter: generation.1,
            reason: "process of app ended on its own: killed by signal 9".into(),
            clean_exit: false,
        });
        self.settle();
    }

    fn settle(&mut self) {
        while let Some(input) = self.inbox.pop_front() {
            self.now += Duration::milliseconds(10);
            self.input(input);
        }
    }

    fn config(&mut self, config: AppInstanceConfig) {
        self.input(Input::Config(config));
        self.settle();
    }

    /// Time passes: the executor ticks at each wake-up the machine asks for, up to `until`.
    fn wait(&mut self, seconds: i64) {
        let until = self.now + Duration::seconds(seconds);
        while let Some(at) = next_wakeup(&self.state, self.now).filter(|at| *at <= until) {
            self.now = at.max(self.now);
            self.input(Input::Tick {
                new_id: Uuid::new_v4(),
            });
            self.settle();
        }
        self.now = until;
    }

    fn status(&self) -> cairn_types::AppInstanceStatus {
        app_status(&self.state)
    }
}

#[test]
fn a_killed_app_is_broken_with_its_reason_then_restarted_after_the_first_backoff() {
    let mut device = Device::new(config("1", "/bin/sleep"));
    assert_eq!(device.starts.len(), 1);
    let first_boot = device
        .status()
        .boot_time
        .expect("a running app has a boot time");
    device.kill_app();
    assert_eq!(device.status().boot_time, None, "not running: no boot time");

    let status = device.status();
    assert_eq!(status.state, SwState::Broken);
    assert!(
        status.error.error.contains("killed by signal 9"),
        "{status:?}"
    );
    assert!(
        status.error.error_retry_condition.contains("restarting at"),
        "{status:?}"
    );
    assert_eq!(device.starts.len(), 1, "no restart before the backoff");

    device.wait(FIRST_BACKOFF_SECONDS);
    assert_eq!(device.starts.len(), 2, "restarted once the backoff passed");
    assert_ne!(device.starts[0], device.starts[1], "as a new generation");
    let status = device.status();
    assert_eq!(status.state, SwState::Running);
    assert!(status.error.error.is_empty());
    assert_eq!(status.restarts, 1);
    assert!(status.last_failure.error.contains("killed by signal 9"));
    assert!(status.boot_time.is_some_and(|t| t > first_boot));
}

#[test]
fn failures_in_a_row_back_off_doubling_up_to_the_limit_and_a_stable_run_ends_the_row() {
    assert_eq!(backoff(1), Duration::seconds(1));
    assert_eq!(backoff(2), Duration::seconds(2));
    assert_eq!(backoff(5), Duration::seconds(16));
    assert_eq!(backoff(40), Duration::seconds(MAX_BACKOFF_SECONDS));

    let mut device = Device::new(config("1", "/bin/sleep"));
    for n in 1..=4u32 {
        device.wait(1);
        device.kill_app();
        assert_eq!(device.state.failure.as_ref().unwrap().consecutive, n);
        let wait = backoff(n).num_seconds();
        device.wait(wait - 1);
        assert!(device.running.is_none(), "failure {n}: not before {wait} s");
        device.wait(1);
        assert!(
            device.running.is_some(),
            "failure {n}: restarted after {wait} s"
        );
    }
    // A long healthy run: the next failure is the first of a new row.
    device.wait(STABLE_SECONDS);
    device.kill_app();
    assert_eq!(device.state.failure.as_ref().unwrap().consecutive, 1);
    assert_eq!(device.status().restarts, 4);
}

#[test]
fn restart_policy_never_keeps_the_app_broken_until_the_controller_restarts_it() {
    let mut c = config("1", "/bin/sleep");
    c.restart_policy = RestartPolicy::Never;
    let mut device = Device::new(c.clone());
    device.kill_app();
    device.wait(3600);
    assert_eq!(device.starts.len(), 1, "never restarted by the device");
    let status = device.status();
    assert_eq!(status.state, SwState::Broken);
    assert!(
        status
            .error
            .error_retry_condition
            .contains("restart counter"),
        "{status:?}"
    );

    c.restart_cmd.counter += 1;
    device.config(c);
    assert_eq!(
        device.starts.len(),
        2,
        "the restart command starts it at once"
    );
    assert_eq!(device.status().state, SwState::Running);
}

#[test]
fn on_failure_restarts_a_crash_but_not_a_clean_exit() {
    let mut c = config("1", "/bin/sleep");
    c.restart_policy = RestartPolicy::OnFailure;
    let mut device = Device::new(c);
    let generation = device.running.take().unwrap();
    device.input(Input::DomainBroken {
        version: generation.0,
        restart_counter: generation.1,
        reason: "process of app ended on its own: exit status 0".into(),
        clean_exit: true,
    });
    device.settle();
    device.wait(3600);
    assert_eq!(device.starts.len(), 1, "a clean exit is not restarted");
    assert_eq!(device.status().state, SwState::Broken);
}

#[test]
fn a_restart_command_for_a_crashed_app_starts_it_at_once() {
    let mut c = config("1", "/bin/sleep");
    let mut device = Device::new(c.clone());
    for _ in 0..6 {
        device.kill_app();
        device.wait(backoff(device.state.failure.as_ref().unwrap().consecutive).num_seconds());
    }
    device.kill_app(); // the 7th in a row: 64 s to wait
    let starts = device.starts.len();
    c.restart_cmd.counter += 1;
    device.config(c);
    assert_eq!(device.starts.len(), starts + 1);
    assert_eq!(device.status().state, SwState::Running);
}

#[test]
fn a_bad_version_is_broken_and_a_good_version_after_it_runs_at_once() {
    let mut device = Device::new(config("1", "/bin/sleep"));
    device.config(config("2", MISSING));
    let status = device.status();
    assert_eq!(status.state, SwState::Broken, "{status:?}");
    assert!(status.error.error.contains(MISSING), "{status:?}");
    // It is tried again by the policy, and fails again: still broken, not starting.
    device.wait(10);
    assert_eq!(device.status().state, SwState::Broken);
    assert!(device.starts.len() > 2, "retried: {:?}", device.starts);

    device.config(config("3", "/bin/sleep"));
    let status = device.status();
    assert_eq!(status.state, SwState::Running, "{status:?}");
    assert_eq!(status.uuid_and_version.version, "3");
    assert!(status.error.error.is_empty());

    // Back to the previous good version works the same way.
    device.config(config("4", MISSING));
    device.config(config("1", "/bin/sleep"));
    assert_eq!(device.status().state, SwState::Running);
    assert_eq!(device.status().uuid_and_version.version, "1");
}

#[test]
fn a_snapshot_requested_while_the_app_is_broken_is_taken() {
    let mut c = config("1", "/bin/sleep");
    c.restart_policy = RestartPolicy::Never;
    let mut device = Device::new(c.clone());
    device.kill_app();
    let snapshot = Uuid::from_u128(0x5);
    c.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: snapshot,
        snapshot_type: SnapshotType::Immediate,
        ..Default::default()
    });
    device.config(c);
    assert_eq!(
        device.state.snapshot(snapshot).map(|s| s.state),
        Some(SnapshotState::Available)
    );
    assert_eq!(device.state.phase, Phase::Idle);
    assert_eq!(
        device.status().state,
        SwState::Broken,
        "still broken, and says so"
    );
}

#[test]
fn the_same_end_seen_again_after_an_app_manager_restart_is_counted_once() {
    let mut device = Device::new(config("1", "/bin/sleep"));
    let generation = device.running.clone().unwrap();
    device.kill_app();
    let failure = device.state.failure.clone();
    // Restart: the persisted state, and the domain-manager's table with the same Broken.
    device.state = device.persisted.clone();
    device.input(Input::Resume);
    device.input(Input::DomainBroken {
        version: generation.0,
        restart_counter: generation.1,
        reason: "process of app ended on its own: killed by signal 9".into(),
        clean_exit: false,
    });
    assert_eq!(device.state.failure, failure);
}

#[test]
fn an_older_generation_s_end_does_not_count_against_the_new_start() {
    let mut device = Device::new(config("1", "/bin/sleep"));
    let old = device.running.clone().unwrap();
    device.kill_app();
    device.wait(FIRST_BACKOFF_SECONDS);
    assert!(device.running.is_some());
    // A late copy of the first end (the table before the restart was seen).
    device.input(Input::DomainBroken {
        version: old.0,
        restart_counter: old.1,
        reason: "late".into(),
        clean_exit: false,
    });
    assert_eq!(device.status().state, SwState::Running);
    assert_eq!(device.state.failure.as_ref().unwrap().consecutive, 1);
}

#[test]
fn an_app_that_cannot_be_asked_to_start_is_broken_with_the_reason_not_booting() {
    let mut c = config("1", "/bin/sleep");
    c.domain = None;
    let mut device = Device::new(config("1", "/bin/sleep"));
    c.uuid_and_version.version = "2".into();
    device.config(c);
    let status = device.status();
    assert_eq!(status.state, SwState::Broken, "{status:?}");
    assert!(status.error.error.contains("no domain spec"));
    device.wait(3600);
    assert_eq!(
        device.status().state,
        SwState::Broken,
        "no retry of the same config"
    );
    device.config(config("3", "/bin/sleep"));
    assert_eq!(device.status().state, SwState::Running);
}

#[test]
fn a_config_that_stops_the_app_forgets_its_failure() {
    let mut c = config("1", "/bin/sleep");
    let mut device = Device::new(c.clone());
    device.kill_app();
    c.activate = false;
    device.config(c.clone());
    assert_eq!(device.status().state, SwState::Halted);
    assert!(device.status().error.error.is_empty());
    device.wait(3600);
    assert!(
        device.running.is_none(),
        "not restarted while the config stops it"
    );
    c.activate = true;
    device.config(c);
    assert_eq!(device.status().state, SwState::Running);
}

#[test]
fn max_snapshots_zero_keeps_no_snapshot_as_in_eve() {
    let mut c = config("1", "/bin/sleep");
    c.snapshot.max_snapshots = 0;
    c.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: Uuid::from_u128(0x51),
        snapshot_type: SnapshotType::AppUpdate,
        ..Default::default()
    });
    let device = Device::new(c);
    assert_eq!(
        device
            .state
            .snapshot(Uuid::from_u128(0x51))
            .map(|s| s.state),
        Some(SnapshotState::Dropped)
    );
    let status = device.status();
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("max_snapshots is 0")),
        "{:?}",
        status.warnings
    );
}

fn delayed(version: &str, command: &str, seconds: u32) -> AppInstanceConfig {
    AppInstanceConfig {
        start_delay_seconds: seconds,
        ..config(version, command)
    }
}

#[test]
fn a_start_delay_holds_the_first_start_of_the_boot_start_delayed_until_it_has_passed() {
    let boot = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let mut device = Device::booted(delayed("1", "/bin/sleep", 30), Some(boot));
    assert!(device.starts.is_empty(), "started inside its delay");
    assert_eq!(device.status().state, SwState::StartDelayed);
    assert_eq!(
        next_wakeup(&device.state, device.now),
        Some(boot + Duration::seconds(30)),
        "the machine must wake when the delay ends"
    );
    // The state on disk says so too: a restarted app-manager reports the same.
    assert_eq!(app_status(&device.persisted).state, SwState::StartDelayed);
    device.wait(29);
    assert!(device.starts.is_empty(), "started before its delay ended");
    device.wait(2);
    assert_eq!(device.starts.len(), 1, "not started once its delay ended");
    assert_eq!(device.status().state, SwState::Running);
}

#[test]
fn a_start_delay_counts_from_the_boot_not_from_the_config() {
    let boot = Utc.with_ymd_and_hms(2026, 3, 1, 11, 59, 0).unwrap();
    // The boot was 60 s ago: a 30 s delay has passed, the app starts at once.
    let device = Device::booted(delayed("1", "/bin/sleep", 30), Some(boot));
    assert_eq!(device.starts.len(), 1);
    assert_eq!(device.status().state, SwState::Running);
    // 90 s: 30 s are left.
    let mut device = Device::booted(delayed("1", "/bin/sleep", 90), Some(boot));
    assert!(device.starts.is_empty());
    device.wait(29);
    assert!(device.starts.is_empty());
    device.wait(2);
    assert_eq!(device.starts.len(), 1);
}

#[test]
fn a_crash_after_the_window_restarts_by_the_policy_alone_and_a_start_inside_it_waits() {
    let boot = Utc.with_ymd_and_hms(2026, 3, 1, 11, 59, 59).unwrap();
    let mut device = Device::booted(delayed("1", "/bin/sleep", 1), Some(boot));
    device.wait(2);
    assert_eq!(device.starts.len(), 1);
    // Well after the window: the restart policy's 1 s backoff is all the wait.
    device.wait(60);
    device.kill_app();
    device.wait(FIRST_BACKOFF_SECONDS + 1);
    assert_eq!(
        device.starts.len(),
        2,
        "the start delay held a restart after its window"
    );

    // A halted app given a longer delay in the same boot is back inside the window: its
    // next start waits, as a start after a crash inside the window would.
    let mut device = Device::booted(delayed("1", "/bin/sleep", 0), Some(boot));
    assert_eq!(device.starts.len(), 1);
    device.config(AppInstanceConfig {
        activate: false,
        ..delayed("1", "/bin/sleep", 0)
    });
    device.config(delayed("2", "/bin/sleep", 600));
    assert_eq!(
        device.starts.len(),
        1,
        "started inside the new delay's window"
    );
    assert_eq!(device.status().state, SwState::StartDelayed);
}

#[test]
fn an_app_without_a_known_boot_or_delay_starts_at_once() {
    let device = Device::booted(delayed("1", "/bin/sleep", 0), Some(Utc::now()));
    assert_eq!(device.starts.len(), 1);
    let device = Device::new(delayed("1", "/bin/sleep", 30));
    assert_eq!(device.starts.len(), 1);
}

#[test]
fn after_a_reboot_a_running_app_with_a_start_delay_is_brought_back_only_once_it_has_passed() {
    let first_boot = Utc.with_ymd_and_hms(2026, 3, 1, 11, 0, 0).unwrap();
    let mut device = Device::booted(delayed("1", "/bin/sleep", 30), Some(first_boot));
    assert_eq!(
        device.starts.len(),
        1,
        "runs, the first boot's window long past"
    );
    assert_eq!(device.state.domain_request().map(|(on, _)| on), Some(true));

    // A reboot: the domain is gone and a new boot's first config is in hand now.
    device.running = None;
    device.broken.clear();
    device.now += Duration::hours(1);
    let boot = device.now;
    device.input(Input::Boot { ready_at: boot });
    device.input(Input::Resume);
    // The executor publishes the request in force at a start-up, before the domain-manager
    // has said anything of the new boot.
    assert_eq!(
        device.state.domain_request().map(|(on, _)| on),
        Some(false),
        "the domain request brings the app back inside its delay"
    );
    device.input(Input::Domain { active: false });
    device.settle();
    assert_eq!(device.status().state, SwState::StartDelayed);
    assert_eq!(device.starts.len(), 1);
    device.wait(31);
    assert_eq!(
        device.starts.len(),
        2,
        "not brought back once its delay passed"
    );
    assert_eq!(device.status().state, SwState::Running);

    // The same boot told again (an app-manager restart): nothing is delayed anew.
    device.input(Input::Boot { ready_at: boot });
    device.settle();
    assert_eq!(device.state.domain_request().map(|(on, _)| on), Some(true));
}

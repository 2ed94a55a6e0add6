//! The snapshot state machine against a simulated device: a domain that settles when asked, a
//! volume backend that keeps a set of snapshots (and can be told to fail), snapshot files.
//! One test per rule of EVE's snapshot semantics (docs/design.md), tests for EVE's gaps 2–4, and a property test over random
//! sequences of config changes, failures and restarts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::collections::{BTreeSet, VecDeque};

use cairn_app_manager::app_status;
use cairn_app_manager::machine::shared::sharing;
use cairn_app_manager::machine::{
    Action, AppState, FoundSnapshot, Input, Phase, SharedConfig, SnapshotState, next_wakeup, step,
    volume_keys,
};
use cairn_types::{
    AppInstanceConfig, ErrorDescription, ErrorSeverity, SnapshotConfig, SnapshotDesc,
    SnapshotPolicy, SnapshotType, UUIDandVersion, VolumeRefConfig, VolumesSnapshotAction,
    VolumesSnapshotStatus,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

const APP: u128 = 0xa11;
const VOLUME: u128 = 0xb0b;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn config(version: &str) -> AppInstanceConfig {
    AppInstanceConfig {
        uuid_and_version: UUIDandVersion {
            uuid: id(APP),
            version: version.into(),
        },
        display_name: "sensor".into(),
        activate: true,
        volume_ref_config_list: vec![VolumeRefConfig {
            volume_id: id(VOLUME),
            ..Default::default()
        }],
        snapshot: SnapshotConfig {
            max_snapshots: 4,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn with_snapshot(mut c: AppInstanceConfig, n: u128, kind: SnapshotType) -> AppInstanceConfig {
    c.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: id(n),
        snapshot_type: kind,
        ..Default::default()
    });
    c
}

fn without_snapshot(mut c: AppInstanceConfig, n: u128) -> AppInstanceConfig {
    c.snapshot.snapshots.retain(|d| d.snapshot_id != id(n));
    c
}

/// The device around one app's state machine.
struct World {
    state: AppState,
    /// The last persisted state: what a restart would load.
    persisted: AppState,
    now: DateTime<Utc>,
    domain_active: bool,
    domain_config_version: Option<String>,
    /// The volume keys the domain was last started on.
    domain_volumes: BTreeSet<String>,
    /// Whether the volume-manager has every volume a config names ready (the executor feeds
    /// readiness after each step that changes the volumes in force).
    volumes_exist: bool,
    backend: BTreeSet<Uuid>,
    files: BTreeSet<Uuid>,
    inbox: VecDeque<Input>,
    log: Vec<Action>,
    fail_next_volume_op: bool,
    volume_ops_while_active: usize,
    /// The fresh ids the executor hands to ticks.
    next_id: u128,
}

impl World {
    fn new(first: AppInstanceConfig) -> Self {
        let state = AppState::new(first.clone());
        let mut world = Self {
            persisted: state.clone(),
            state,
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            domain_active: false,
            domain_config_version: None,
            domain_volumes: BTreeSet::new(),
            volumes_exist: true,
            backend: BTreeSet::new(),
            files: BTreeSet::new(),
            inbox: VecDeque::new(),
            log: Vec::new(),
            fail_next_volume_op: false,
            volume_ops_while_active: 0,
            next_id: 0x5c4e_0000,
        };
        world.input(Input::Config(first));
        world.input(Input::Volumes { ready: true });
        world.settle();
        world
    }

    /// A world around a state made elsewhere, nothing fed to it yet.
    fn around(state: AppState) -> Self {
        let mut world = Self::new(config("0"));
        world.take_log();
        world.domain_active = false;
        world.state = state.clone();
        world.persisted = state;
        world
    }

    fn input(&mut self, input: Input) {
        self.now += Duration::seconds(1);
        let (state, actions) = step(self.state.clone(), input, self.now);
        self.state = state;
        for action in actions {
            self.carry_out(action);
        }
        if !self.state.volumes_ready && self.volumes_exist {
            self.inbox.push_back(Input::Volumes { ready: true });
        }
    }

    fn carry_out(&mut self, action: Action) {
        match &action {
            Action::Persist => self.persisted = self.state.clone(),
            Action::Domain { activate, config } => {
                // The domain settles at once (as seen by the app-manager, later).
                self.domain_active = *activate;
                if *activate {
                    self.domain_config_version = Some(config.uuid_and_version.version.clone());
                    self.domain_volumes = volume_keys(config);
                }
                self.inbox.push_back(Input::Domain { active: *activate });
            }
            Action::Volumes(request) => {
                if self.domain_active {
                    self.volume_ops_while_active += 1;
                }
                let mut result = VolumesSnapshotStatus {
                    snapshot_id: request.snapshot_id,
                    app_uuid: request.app_uuid,
                    request_counter: request.request_counter,
                    result_of_action: request.action,
                    time_created: Some(self.now),
                    ..Default::default()
                };
                if std::mem::take(&mut self.fail_next_volume_op) {
                    result.error =
                        ErrorDescription::new("disk full", ErrorSeverity::Error, self.now);
                    // The volume-manager's contract: a failed create leaves nothing of that
                    // snapshot on any volume (all or nothing), even one an earlier, lost
                    // answer had reported made.
                    if request.action == VolumesSnapshotAction::Create {
                        self.backend.remove(&request.snapshot_id);
                    }
                } else {
                    match request.action {
                        VolumesSnapshotAction::Create => {
                            self.backend.insert(request.snapshot_id);
                        }
                        VolumesSnapshotAction::Delete => {
                            self.backend.remove(&request.snapshot_id);
                        }
                        VolumesSnapshotAction::Rollback => {
                            assert!(
                                self.backend.contains(&request.snapshot_id),
                                "rollback to a missing snapshot"
                            );
                        }
                        VolumesSnapshotAction::Unspecified => panic!("unspecified action"),
                    }
                }
                self.inbox.push_back(Input::VolumesResult(result));
            }
            Action::WriteSnapshot(snapshot) => {
                self.files.insert(*snapshot);
            }
            Action::RemoveSnapshot(snapshot) => {
                self.files.remove(snapshot);
            }
            Action::Status => {}
            // Hooks end when a test says how ([`Input::Hook`]).
            Action::RunHook(_) => {}
        }
        self.log.push(action);
    }

    fn settle(&mut self) {
        while let Some(input) = self.inbox.pop_front() {
            self.input(input);
        }
    }

    fn config(&mut self, config: AppInstanceConfig) {
        self.input(Input::Config(config));
        self.settle();
    }

    /// The app-manager restarts: in-flight answers are lost, the persisted state is reloaded.
    fn restart(&mut self) {
        self.inbox.clear();
        self.state = self.persisted.clone();
        self.input(Input::Resume);
        self.settle();
    }

    /// The executor's timer: a tick with a fresh id, at the world's clock plus one second.
    /// Returns the id it offered.
    fn tick(&mut self) -> Uuid {
        self.next_id += 1;
        let new_id = id(self.next_id);
        self.input(Input::Tick { new_id });
        new_id
    }

    /// A tick at exactly `at`, then everything it sets off.
    fn tick_at(&mut self, at: DateTime<Utc>) -> Uuid {
        assert!(at > self.now, "the clock only moves forward");
        self.now = at - Duration::seconds(1);
        let new_id = self.tick();
        self.settle();
        new_id
    }

    /// The scheduled snapshots the machine tracks, oldest first.
    fn scheduled(&self) -> Vec<&cairn_app_manager::machine::SnapshotRecord> {
        self.state
            .snapshots
            .iter()
            .filter(|s| s.scheduled)
            .collect()
    }

    fn state_of(&self, n: u128) -> Option<SnapshotState> {
        self.state.snapshot(id(n)).map(|s| s.state)
    }

    fn stops(&self) -> usize {
        self.log
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Domain {
                        activate: false,
                        ..
                    }
                )
            })
            .count()
    }

    fn take_log(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.log)
    }
}

fn kinds(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Domain { activate: true, .. } => Some("start"),
            Action::Domain {
                activate: false, ..
            } => Some("stop"),
            Action::Volumes(r) => Some(match r.action {
                VolumesSnapshotAction::Create => "create",
                VolumesSnapshotAction::Delete => "delete",
                VolumesSnapshotAction::Rollback => "rollback",
                VolumesSnapshotAction::Unspecified => "?",
            }),
            Action::WriteSnapshot(_) => Some("write-files"),
            Action::RemoveSnapshot(_) => Some("remove-files"),
            Action::RunHook(r) => Some(match r.kind {
                cairn_app_manager::machine::HookKind::Pre => "pre-hook",
                cairn_app_manager::machine::HookKind::Post => "post-hook",
            }),
            Action::Persist | Action::Status => None,
        })
        .collect()
}

#[test]
fn the_app_starts_once_its_volumes_are_ready() {
    let world = World::new(config("1"));
    assert!(world.domain_active);
    assert_eq!(world.state.phase, Phase::Idle);
    assert_eq!(app_status(&world.state).uuid_and_version.version, "1");
}

#[test]
fn every_step_persists_first_and_reports_last() {
    let mut world = World::new(config("1"));
    world.take_log();
    world.input(Input::Config(with_snapshot(
        config("1"),
        1,
        SnapshotType::Immediate,
    )));
    let log = world.take_log();
    assert_eq!(log.first(), Some(&Action::Persist));
    assert_eq!(log.last(), Some(&Action::Status));
}

#[test]
fn an_immediate_snapshot_stops_takes_and_starts_again() {
    let mut world = World::new(config("1"));
    world.take_log();
    world.config(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    assert_eq!(
        kinds(&world.take_log()),
        vec!["stop", "create", "write-files", "start"]
    );
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.backend.contains(&id(1)) && world.files.contains(&id(1)));
    assert!(world.domain_active);
}

#[test]
fn time_triggered_and_time_created_are_recorded() {
    // EVE gap 4: time triggered was set on a copy and never recorded.
    let mut world = World::new(config("1"));
    world.config(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    let record = world.state.snapshot(id(1)).unwrap();
    let (triggered, created) = (record.time_triggered.unwrap(), record.time_created.unwrap());
    assert!(triggered < created);
    let status = app_status(&world.state);
    assert_eq!(
        status.snap_status.available_snapshots[0].time_triggered,
        Some(triggered)
    );
}

#[test]
fn an_app_update_snapshot_waits_for_the_upgrade_and_keeps_the_old_config() {
    let mut world = World::new(config("1"));
    world.config(with_snapshot(config("1"), 1, SnapshotType::AppUpdate));
    assert_eq!(world.state_of(1), Some(SnapshotState::Requested));
    assert_eq!(
        world.stops(),
        0,
        "requesting an APP_UPDATE snapshot does not stop the app"
    );
    world.take_log();

    world.config(with_snapshot(config("2"), 1, SnapshotType::AppUpdate));
    assert_eq!(
        kinds(&world.take_log()),
        vec!["stop", "create", "write-files", "start"]
    );
    let record = world.state.snapshot(id(1)).unwrap();
    assert_eq!(record.state, SnapshotState::Available);
    assert_eq!(
        record.config.as_ref().unwrap().uuid_and_version.version,
        "1"
    );
    assert_eq!(world.domain_config_version.as_deref(), Some("2"));
}

#[test]
fn a_purge_takes_the_waiting_app_update_snapshot() {
    let mut world = World::new(with_snapshot(config("1"), 1, SnapshotType::AppUpdate));
    let mut purged = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    purged.purge_cmd.counter = 1;
    world.config(purged);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
}

#[test]
fn a_restart_command_stops_and_starts_without_a_snapshot() {
    let mut world = World::new(config("1"));
    world.take_log();
    let mut restarted = config("1");
    restarted.restart_cmd.counter = 1;
    world.config(restarted);
    assert_eq!(kinds(&world.take_log()), vec!["stop", "start"]);
}

#[test]
fn deletion_waits_for_the_next_deactivation_and_is_reported_pending() {
    let mut world = World::new(config("1"));
    let with = with_snapshot(config("1"), 1, SnapshotType::Immediate);
    world.config(with.clone());
    world.take_log();

    world.config(without_snapshot(with, 1));
    assert_eq!(
        world.stops(),
        0,
        "a deletion is never a reason to stop the app"
    );
    assert!(kinds(&world.take_log()).is_empty());
    assert_eq!(world.state_of(1), Some(SnapshotState::PendingDeletion));
    let status = app_status(&world.state);
    assert_eq!(
        status.snap_status.snapshots_to_be_deleted[0].snapshot_id,
        id(1)
    );
    assert!(
        world.backend.contains(&id(1)),
        "not deleted while the app runs"
    );

    // The next deactivation (here a restart command) carries the deletion out.
    let mut restarted = config("1");
    restarted.restart_cmd.counter = 1;
    world.config(restarted);
    assert_eq!(
        kinds(&world.take_log()),
        vec!["stop", "delete", "remove-files", "start"]
    );
    assert_eq!(world.state_of(1), None);
    assert!(!world.backend.contains(&id(1)) && !world.files.contains(&id(1)));
}

#[test]
fn a_failed_deletion_is_reported_failed_and_retried_at_the_next_deactivation() {
    // EVE gap 2: a failed deletion was lost.
    let mut world = World::new(config("1"));
    let with = with_snapshot(config("1"), 1, SnapshotType::Immediate);
    world.config(with.clone());
    world.config(without_snapshot(with, 1));
    world.fail_next_volume_op = true;
    let mut restarted = config("1");
    restarted.restart_cmd.counter = 1;
    world.config(restarted.clone());
    assert_eq!(world.state_of(1), Some(SnapshotState::DeletionFailed));
    assert!(
        world
            .state
            .snapshot(id(1))
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("disk full")
    );
    let status = app_status(&world.state);
    assert_eq!(status.snap_status.snapshots_to_be_deleted.len(), 1);
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains(&id(1).to_string()) && w.contains("disk full")),
        "the failure is in the status: {:?}",
        status.warnings
    );

    restarted.restart_cmd.counter = 2;
    world.config(restarted);
    assert_eq!(world.state_of(1), None);
    assert!(!world.backend.contains(&id(1)));
}

#[test]
fn max_snapshots_deletes_the_oldest_available_then_drops_the_newest_requests() {
    let mut c = config("1");
    c.snapshot.max_snapshots = 2;
    let mut world = World::new(c.clone());
    c = with_snapshot(c, 1, SnapshotType::Immediate);
    world.config(c.clone());
    c = with_snapshot(c, 2, SnapshotType::Immediate);
    world.config(c.clone());
    // A third immediate snapshot: the oldest available one goes.
    c = with_snapshot(c, 3, SnapshotType::Immediate);
    world.config(c.clone());
    assert_eq!(
        world.state_of(1),
        None,
        "deleted at the deactivation that took 3"
    );
    assert_eq!(world.state_of(2), Some(SnapshotState::Available));
    assert_eq!(world.state_of(3), Some(SnapshotState::Available));
    assert!(
        world
            .state
            .warnings
            .iter()
            .any(|w| w.contains(&id(1).to_string()))
    );

    // Two APP_UPDATE requests at once beyond the limit: the newest requests are dropped.
    let mut many = c.clone();
    many = with_snapshot(many, 4, SnapshotType::AppUpdate);
    many = with_snapshot(many, 5, SnapshotType::AppUpdate);
    world.config(many);
    assert_eq!(world.state_of(5), Some(SnapshotState::Dropped));
    assert!(world.state.warnings.iter().any(|w| w.contains("dropped")));
    let available = world
        .state
        .snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Available)
        .count();
    assert!(available <= 2);
}

fn rollback_to(mut c: AppInstanceConfig, n: u128, counter: u32) -> AppInstanceConfig {
    c.snapshot.active_snapshot = id(n).to_string();
    c.snapshot.rollback_cmd.counter = counter;
    c
}

#[test]
fn a_rollback_runs_the_snapshot_config_and_reports_its_version() {
    let mut world = World::new(with_snapshot(config("1"), 1, SnapshotType::AppUpdate));
    world.config(with_snapshot(config("2"), 1, SnapshotType::AppUpdate));
    world.take_log();

    world.config(rollback_to(
        with_snapshot(config("2"), 1, SnapshotType::AppUpdate),
        1,
        1,
    ));
    assert_eq!(kinds(&world.take_log()), vec!["stop", "rollback", "start"]);
    assert_eq!(world.domain_config_version.as_deref(), Some("1"));
    assert_eq!(app_status(&world.state).uuid_and_version.version, "1");
    // The local config keeps the controller's snapshot list.
    let local = world.state.local.as_ref().unwrap();
    assert_eq!(local.snapshot.snapshots.len(), 1);

    // The controller's next version ends the override.
    world.config(rollback_to(
        with_snapshot(config("3"), 1, SnapshotType::AppUpdate),
        1,
        1,
    ));
    assert!(world.state.local.is_none());
    assert_eq!(world.domain_config_version.as_deref(), Some("3"));
}

#[test]
fn a_second_rollback_to_the_same_snapshot_is_a_new_request() {
    // EVE gap 3: the equal VolumesSnapshotConfig was suppressed and the rollback hung.
    let mut world = World::new(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    let base = with_snapshot(config("1"), 1, SnapshotType::Immediate);
    world.config(rollback_to(base.clone(), 1, 1));
    world.config(rollback_to(base, 1, 2));
    let counters: Vec<u64> = world
        .log
        .iter()
        .filter_map(|a| match a {
            Action::Volumes(r) if r.action == VolumesSnapshotAction::Rollback => {
                Some(r.request_counter)
            }
            _ => None,
        })
        .collect();
    assert_eq!(counters.len(), 2);
    assert_ne!(counters[0], counters[1]);
    assert_eq!(
        world.state.phase,
        Phase::Idle,
        "the second rollback completed"
    );
    assert!(world.domain_active);
}

#[test]
fn a_rollback_to_an_unknown_snapshot_is_refused_with_a_warning() {
    let mut world = World::new(config("1"));
    world.take_log();
    world.config(rollback_to(config("1"), 9, 1));
    assert_eq!(world.stops(), 0);
    assert!(world.state.warnings.iter().any(|w| w.contains("refused")));
}

#[test]
fn a_failed_snapshot_is_reported_and_the_app_runs_again() {
    let mut world = World::new(config("1"));
    world.fail_next_volume_op = true;
    world.config(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    assert_eq!(world.state_of(1), Some(SnapshotState::Failed));
    assert!(world.domain_active);
    assert!(!world.files.contains(&id(1)));
}

#[test]
fn a_stale_volume_answer_is_ignored() {
    let mut world = World::new(config("1"));
    world.input(Input::Config(with_snapshot(
        config("1"),
        1,
        SnapshotType::Immediate,
    )));
    // Deliver only the domain's answer, then a forged old answer.
    let domain = world.inbox.pop_front().unwrap();
    world.input(domain);
    world.inbox.clear();
    let before = world.state.clone();
    world.input(Input::VolumesResult(VolumesSnapshotStatus {
        snapshot_id: id(1),
        request_counter: 0,
        ..Default::default()
    }));
    assert_eq!(world.state.phase, before.phase);
    assert_eq!(world.state_of(1), Some(SnapshotState::Triggered));
}

#[test]
fn a_restart_mid_snapshot_asks_again_and_completes() {
    // EVE gap 1: in-progress state lived in /run and was lost.
    let mut world = World::new(config("1"));
    world.input(Input::Config(with_snapshot(
        config("1"),
        1,
        SnapshotType::Immediate,
    )));
    let domain = world.inbox.pop_front().unwrap();
    world.input(domain); // stopped; the create request is out, its answer is lost
    assert!(matches!(world.state.phase, Phase::Volume { .. }));
    world.restart();
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.domain_active);
    assert_eq!(world.files, BTreeSet::from([id(1)]));
}

#[test]
fn a_restart_with_a_pending_deletion_deletes_at_the_next_deactivation() {
    let mut world = World::new(config("1"));
    let with = with_snapshot(config("1"), 1, SnapshotType::Immediate);
    world.config(with.clone());
    world.config(without_snapshot(with, 1));
    world.restart();
    assert_eq!(world.state_of(1), Some(SnapshotState::PendingDeletion));
    let mut stop = config("1");
    stop.activate = false;
    world.config(stop);
    assert_eq!(world.state_of(1), None);
    assert!(!world.backend.contains(&id(1)));
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Change {
    Immediate(u8),
    AppUpdate(u8),
    Remove(u8),
    Upgrade,
    Purge,
    Restart,
    Rollback(u8),
    Max(u8),
    Activate(bool),
    FailNext,
    RestartManager,
    DeliverSome(u8),
    /// The controller's purge by a new volume generation.
    Regenerate,
    /// The executor's timer after this many minutes (the policy's schedule and expiry).
    Tick(u8),
    /// An IMMEDIATE snapshot with its own expiry of 30 minutes.
    ImmediateExpiring(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        1 => (0u8..6).prop_map(Change::Immediate),
        1 => (0u8..6).prop_map(Change::AppUpdate),
        1 => (0u8..6).prop_map(Change::Remove),
        1 => Just(Change::Upgrade),
        1 => Just(Change::Purge),
        1 => Just(Change::Restart),
        1 => (0u8..6).prop_map(Change::Rollback),
        1 => (1u8..4).prop_map(Change::Max),
        1 => any::<bool>().prop_map(Change::Activate),
        1 => Just(Change::FailNext),
        1 => Just(Change::RestartManager),
        1 => (0u8..3).prop_map(Change::DeliverSome),
        1 => Just(Change::Regenerate),
        4 => (1u8..90).prop_map(Change::Tick),
        1 => (0u8..6).prop_map(Change::ImmediateExpiring),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_histories_keep_the_invariants(
        changes in prop::collection::vec(change(), 1..40),
        when_stopped in any::<bool>(),
    ) {
        let mut controller = config("1");
        controller.snapshot.max_snapshots = 2;
        // Every 20 minutes, keeping the newest 2, each expiring after 3 hours.
        controller.snapshot.policy = Some(Box::new(SnapshotPolicy {
            schedule: "*/20 * * * *".into(),
            schedule_when_stopped: when_stopped,
            expiry_seconds: 3 * 3_600,
            retention: cairn_types::Retention { keep_last: 2, ..Default::default() },
            ..Default::default()
        }));
        let mut world = World::new(controller.clone());
        let mut version = 1;
        for change in changes {
            // A bare purge (the controller's generation the app runs on unchanged, or it runs
            // on nothing) must move the config in force to new volume keys.
            let bare_purge = matches!(change, Change::Purge) && {
                let effective = world.state.effective();
                world.state.running.as_ref().is_none_or(|r| {
                    r.volume_ref_config_list.iter().map(|v| v.generation_counter).collect::<Vec<_>>()
                        == effective.volume_ref_config_list.iter().map(|v| v.generation_counter).collect::<Vec<_>>()
                })
            };
            let keys_before = volume_keys(world.state.effective());
            let locals_before = world.state.local_generations.clone();
            match change {
                Change::Immediate(n) => controller = with_snapshot(without_snapshot(controller, 100 + n as u128), 100 + n as u128, SnapshotType::Immediate),
                Change::AppUpdate(n) => controller = with_snapshot(without_snapshot(controller, 100 + n as u128), 100 + n as u128, SnapshotType::AppUpdate),
                Change::Remove(n) => controller = without_snapshot(controller, 100 + n as u128),
                Change::Upgrade => { version += 1; controller.uuid_and_version.version = version.to_string(); }
                Change::Purge => controller.purge_cmd.counter += 1,
                Change::Regenerate => controller.volume_ref_config_list[0].generation_counter += 1,
                Change::Restart => controller.restart_cmd.counter += 1,
                Change::Rollback(n) => {
                    controller.snapshot.active_snapshot = id(100 + n as u128).to_string();
                    controller.snapshot.rollback_cmd.counter += 1;
                }
                Change::Max(m) => controller.snapshot.max_snapshots = m as u32,
                Change::Activate(on) => controller.activate = on,
                Change::FailNext => world.fail_next_volume_op = true,
                Change::RestartManager => { world.restart(); continue; }
                Change::DeliverSome(k) => {
                    for _ in 0..k { if let Some(i) = world.inbox.pop_front() { world.input(i); } }
                    continue;
                }
                Change::Tick(minutes) => {
                    world.now += Duration::minutes(minutes as i64);
                    world.tick();
                    // The executor never spins: a tick moves the next wake-up past now.
                    let next = next_wakeup(&world.state, world.now);
                    prop_assert!(next.is_none_or(|w| w > world.now), "wake-up {:?} not after {}", next, world.now);
                    continue;
                }
                Change::ImmediateExpiring(n) => {
                    let n = 100 + n as u128;
                    controller = with_snapshot(without_snapshot(controller, n), n, SnapshotType::Immediate);
                    if let Some(d) = controller.snapshot.snapshots.last_mut() { d.expiry_seconds = 1_800; }
                }
            }
            world.input(Input::Config(controller.clone()));
            // Sometimes leave answers in flight; a later restart may lose them.
            if bare_purge {
                let keys_after = volume_keys(world.state.effective());
                prop_assert!(keys_after.is_disjoint(&keys_before), "a purge kept {:?} (now {:?})", keys_before, keys_after);
                // Persisted with the step that made it, before any action.
                prop_assert_eq!(&world.persisted.local_generations, &world.state.local_generations);
            }
            // Local generations only grow within a controller generation: a key once left is
            // never handed out fresh again.
            for (volume, before) in &locals_before {
                let now = world.state.local_generations.get(volume);
                prop_assert!(now.is_some_and(|n| n.generation != before.generation || n.local >= before.local),
                    "local generation of {} went from {:?} to {:?}", volume, before, now);
            }
        }
        world.settle();

        prop_assert_eq!(world.volume_ops_while_active, 0, "a volume operation ran while the domain was active");
        // Quiescent: nothing in flight.
        prop_assert_eq!(&world.state.phase, &Phase::Idle);
        let max = controller.snapshot.max_snapshots as usize;
        let available: BTreeSet<Uuid> = world.state.snapshots.iter()
            .filter(|s| s.state == SnapshotState::Available).map(|s| s.id()).collect();
        prop_assert!(available.len() <= max, "{} available > max {}", available.len(), max);
        // The retention (keep_last 2) holds for the scheduled ones.
        let scheduled = world.state.snapshots.iter()
            .filter(|s| s.scheduled && s.state == SnapshotState::Available).count();
        prop_assert!(scheduled <= 2, "{} scheduled available", scheduled);
        // Nothing available is past its expiry for longer than until the next tick.
        let policy = world.state.policy().cloned();
        let next = next_wakeup(&world.state, world.now);
        for s in world.state.snapshots.iter().filter(|s| s.state == SnapshotState::Available) {
            if let Some(expires) = s.expires_at(policy.as_ref()) {
                prop_assert!(next.is_some_and(|w| w <= expires), "no wake-up for the expiry of {}", s.id());
            }
        }
        // Each snapshot id appears once.
        let ids: Vec<Uuid> = world.state.snapshots.iter().map(|s| s.id()).collect();
        let unique: BTreeSet<Uuid> = ids.iter().copied().collect();
        prop_assert_eq!(ids.len(), unique.len());
        // Files, records and the backend agree. Nothing leaked: what the backend holds is
        // available or awaiting deletion. Nothing lost: every available or pending snapshot is
        // on the backend; only after a failed deletion may it be gone already (the record says
        // so and the next deactivation tries again). Files go exactly with the records.
        let kept: BTreeSet<Uuid> = world.state.snapshots.iter()
            .filter(|s| matches!(s.state, SnapshotState::Available | SnapshotState::PendingDeletion | SnapshotState::DeletionFailed))
            .map(|s| s.id()).collect();
        let certain: BTreeSet<Uuid> = world.state.snapshots.iter()
            .filter(|s| matches!(s.state, SnapshotState::Available | SnapshotState::PendingDeletion))
            .map(|s| s.id()).collect();
        prop_assert!(world.backend.is_subset(&kept), "leaked: backend {:?}, records {:?}", world.backend, kept);
        prop_assert!(certain.is_subset(&world.backend), "lost: records {:?}, backend {:?}", certain, world.backend);
        prop_assert_eq!(&world.files, &kept);
        // The app runs when it should, on the volumes of the config in force, and holds those
        // only: an old generation is released once nothing needs it.
        prop_assert_eq!(world.domain_active, world.state.effective().activate);
        let in_force = volume_keys(world.state.effective());
        if world.domain_active {
            prop_assert_eq!(&world.domain_volumes, &in_force);
        }
        let expected_holds = if world.domain_active { in_force } else { BTreeSet::new() };
        prop_assert_eq!(world.state.volumes_in_use(), expected_holds);
    }
}

#[test]
fn a_snapshot_being_rolled_back_to_is_deleted_only_after_the_rollback() {
    // Found by the property test: deletions run first in an inactive window, and used to
    // remove the very snapshot a queued rollback needed.
    let mut c = config("1");
    c.snapshot.max_snapshots = 1;
    let mut world = World::new(c.clone());
    world.config(with_snapshot(c.clone(), 1, SnapshotType::Immediate));
    world.take_log();
    // One config both rolls back to 1 and asks for a new immediate snapshot 2, which pushes 1
    // out under max_snapshots = 1.
    let both = rollback_to(
        with_snapshot(
            with_snapshot(c, 1, SnapshotType::Immediate),
            2,
            SnapshotType::Immediate,
        ),
        1,
        1,
    );
    world.config(both);
    let order = kinds(&world.take_log());
    let rollback = order.iter().position(|k| *k == "rollback").unwrap();
    let delete = order.iter().position(|k| *k == "delete");
    assert!(delete.is_none_or(|d| d > rollback), "{order:?}");
    assert!(world.domain_active);
}

// ---- purges by volume generation, and snapshots found on disk ----

fn generation(mut c: AppInstanceConfig, g: i64) -> AppInstanceConfig {
    c.volume_ref_config_list[0].generation_counter = g;
    c
}

fn key(g: i64) -> String {
    cairn_types::volume_key(id(VOLUME), g)
}

fn volume_requests(log: &[Action]) -> Vec<cairn_types::VolumesSnapshotConfig> {
    log.iter()
        .filter_map(|a| match a {
            Action::Volumes(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_volume_generation_snapshots_the_old_one_then_runs_on_the_new() {
    let base = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    let mut world = World::new(base.clone());
    assert_eq!(world.domain_volumes, BTreeSet::from([key(0)]));
    world.take_log();

    // Same version, new generation: a purge. Step by step, to see the holds while it runs.
    world.input(Input::Config(generation(base, 1)));
    assert_eq!(world.state_of(1), Some(SnapshotState::Triggered));
    assert!(
        world.state.volumes_in_use().contains(&key(0)),
        "the old generation is held while the app runs on it and its snapshot is due"
    );
    world.settle();
    let log = world.take_log();
    assert_eq!(kinds(&log), vec!["stop", "create", "write-files", "start"]);
    let create = &volume_requests(&log)[0];
    assert_eq!(
        create.volume_keys.get(&id(VOLUME)),
        Some(&key(0)),
        "the purge's snapshot is of the pre-purge generation"
    );
    assert_eq!(world.domain_volumes, BTreeSet::from([key(1)]));
    assert_eq!(world.state.volumes_in_use(), BTreeSet::from([key(1)]));
    let record = world.state.snapshot(id(1)).unwrap();
    assert_eq!(record.state, SnapshotState::Available);
    assert_eq!(
        volume_keys(record.config.as_ref().unwrap()),
        BTreeSet::from([key(0)])
    );
}

#[test]
fn the_app_restarts_on_a_new_generation_only_once_it_is_ready() {
    let mut world = World::new(config("1"));
    world.volumes_exist = false;
    world.take_log();
    world.config(generation(config("1"), 1));
    assert_eq!(kinds(&world.take_log()), vec!["stop"]);
    assert!(!world.domain_active);
    world.volumes_exist = true;
    world.input(Input::Volumes { ready: true });
    world.settle();
    assert_eq!(kinds(&world.take_log()), vec!["start"]);
    assert_eq!(world.domain_volumes, BTreeSet::from([key(1)]));
}

#[test]
fn a_rollback_after_a_purge_points_the_app_back_at_the_old_generation() {
    let base = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    let mut world = World::new(base.clone());
    let purged = generation(with_snapshot(config("2"), 1, SnapshotType::AppUpdate), 1);
    world.config(purged.clone());
    assert_eq!(world.domain_volumes, BTreeSet::from([key(1)]));
    world.take_log();

    world.config(rollback_to(purged, 1, 1));
    let log = world.take_log();
    assert_eq!(kinds(&log), vec!["stop", "rollback", "start"]);
    assert_eq!(
        volume_requests(&log)[0].volume_keys.get(&id(VOLUME)),
        Some(&key(0))
    );
    assert_eq!(world.domain_config_version.as_deref(), Some("1"));
    assert_eq!(
        world.domain_volumes,
        BTreeSet::from([key(0)]),
        "the app runs on the kept pre-purge volume"
    );
    assert_eq!(world.state.volumes_in_use(), BTreeSet::from([key(0)]));
    assert_eq!(
        world.state_of(1),
        Some(SnapshotState::Available),
        "a rollback is not an APP_UPDATE trigger"
    );
}

fn found(n: u128, version: &str, created: DateTime<Utc>) -> FoundSnapshot {
    FoundSnapshot {
        desc: SnapshotDesc {
            snapshot_id: id(n),
            snapshot_type: SnapshotType::Immediate,
            ..Default::default()
        },
        config: config(version),
        time_triggered: Some(created - Duration::seconds(2)),
        time_created: Some(created),
    }
}

#[test]
fn a_listed_snapshot_found_on_disk_is_imported_as_available_and_not_taken_again() {
    // A lost state file: the fresh state knows the config, not its snapshots.
    let listed = with_snapshot(config("2"), 1, SnapshotType::Immediate);
    let created = Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap();
    let state = AppState::new(listed.clone());
    let (state, actions) = step(
        state,
        Input::Import(Box::new(found(1, "1", created))),
        created,
    );
    assert!(kinds(&actions).is_empty(), "{actions:?}");
    let record = state.snapshot(id(1)).unwrap();
    assert_eq!(record.state, SnapshotState::Available);
    assert_eq!(record.time_created, Some(created));
    assert_eq!(
        record.config.as_ref().unwrap().uuid_and_version.version,
        "1",
        "a rollback restores the config saved with it"
    );
    // The config that lists it then finds it taken: no stop, no create.
    let mut world = World::around(state);
    world.config(listed);
    assert_eq!(kinds(&world.take_log()), vec!["start"]);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
}

#[test]
fn an_unlisted_snapshot_found_on_disk_is_left_alone_with_a_warning() {
    let world = World::new(config("1"));
    let (state, actions) = step(
        world.state,
        Input::Import(Box::new(found(9, "1", world.now))),
        world.now,
    );
    assert!(kinds(&actions).is_empty());
    assert!(state.snapshot(id(9)).is_none());
    assert!(
        state
            .warnings
            .iter()
            .any(|w| w.contains(&id(9).to_string()) && w.contains("not imported")),
        "{:?}",
        state.warnings
    );
}

#[test]
fn an_imported_snapshot_counts_against_max_snapshots_oldest_first() {
    let mut c = with_snapshot(config("1"), 2, SnapshotType::Immediate);
    c.snapshot.max_snapshots = 1;
    let mut world = World::new(c.clone());
    assert_eq!(world.state_of(2), Some(SnapshotState::Available));
    // The config lists an older snapshot 1 as well, found on disk.
    world.state.controller = with_snapshot(c, 1, SnapshotType::Immediate).into();
    let older = world.now - Duration::days(1);
    world.input(Input::Import(Box::new(found(1, "1", older))));
    assert_eq!(world.state_of(1), Some(SnapshotState::PendingDeletion));
    assert_eq!(world.state_of(2), Some(SnapshotState::Available));
    assert!(world.state.warnings.iter().any(|w| w.contains("at most 1")));
}

#[test]
fn a_domain_found_running_by_a_state_that_never_started_it_is_adopted_not_restarted() {
    // A lost state file: the fresh state learns the domain runs.
    let state = AppState::new(config("1"));
    let (state, _) = step(state, Input::Config(config("1")), Utc::now());
    let (state, a) = step(state, Input::Domain { active: true }, Utc::now());
    let (state, b) = step(state, Input::Volumes { ready: true }, Utc::now());
    assert!(kinds(&a).is_empty() && kinds(&b).is_empty(), "{a:?} {b:?}");
    assert_eq!(
        state.domain_request().map(|(on, c)| (on, c.clone())),
        Some((true, config("1"))),
        "the running domain's request is published again"
    );
}

// ---- purges by the counter: local generations ----

fn purge(mut c: AppInstanceConfig, counter: u32) -> AppInstanceConfig {
    c.purge_cmd.counter = counter;
    c
}

/// The key of the volume at the controller's generation `g` and the local generation `l`.
fn local_key(g: i64, l: i64) -> String {
    cairn_types::volume::volume_key_local(id(VOLUME), g, l)
}

#[test]
fn a_purge_counter_increase_gives_the_volume_a_new_local_generation_persisted_before_any_action() {
    let base = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    let mut world = World::new(base.clone());
    assert_eq!(world.domain_volumes, BTreeSet::from([key(0)]));
    world.take_log();

    world.input(Input::Config(purge(base.clone(), 1)));
    let log = world.take_log();
    assert_eq!(log.first(), Some(&Action::Persist), "{log:?}");
    assert_eq!(
        kinds(&log),
        vec!["stop"],
        "nothing but the stop before the snapshot"
    );
    let intent = &world.persisted;
    assert_eq!(
        intent
            .local_generations
            .get(&id(VOLUME))
            .map(|l| (l.generation, l.local)),
        Some((0, 1)),
        "the new local generation is on disk before anything acts on it"
    );
    assert_eq!(
        volume_keys(intent.effective()),
        BTreeSet::from([local_key(0, 1)])
    );
    assert_eq!(intent.phase, Phase::Stopping);
    // Held: the old volume (running, its snapshot due) and the new one (asked for).
    assert_eq!(
        world.state.volumes_in_use(),
        BTreeSet::from([key(0), local_key(0, 1)])
    );
    assert!(
        !world.state.volumes_ready,
        "the new volume is not there yet"
    );
    assert_eq!(world.state_of(1), Some(SnapshotState::Triggered));

    world.settle();
    let log = world.take_log();
    assert_eq!(kinds(&log), vec!["create", "write-files", "start"]);
    assert_eq!(
        volume_requests(&log)[0].volume_keys.get(&id(VOLUME)),
        Some(&key(0)),
        "the APP_UPDATE snapshot is of the old volume"
    );
    assert_eq!(
        world.domain_volumes,
        BTreeSet::from([local_key(0, 1)]),
        "restarted on the new volume"
    );
    assert_eq!(
        world.state.volumes_in_use(),
        BTreeSet::from([local_key(0, 1)]),
        "the old volume is released once the app left it"
    );
    let record = world.state.snapshot(id(1)).unwrap();
    assert_eq!(record.state, SnapshotState::Available);
    assert_eq!(
        volume_keys(record.config.as_ref().unwrap()),
        BTreeSet::from([key(0)])
    );
}

#[test]
fn each_purge_takes_a_new_local_generation_and_a_new_controller_generation_starts_again() {
    let mut world = World::new(config("1"));
    world.config(purge(config("1"), 1));
    world.config(purge(config("1"), 2));
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 2)]));
    // The controller's config itself does not change with a purge: the same config again is
    // no purge, and the app stays on its local generation.
    world.take_log();
    world.config(purge(config("1"), 2));
    assert!(kinds(&world.take_log()).is_empty());
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 2)]));
    // Purge counter and a new generation at once: the new generation is fresh already.
    world.config(purge(generation(config("1"), 1), 3));
    assert_eq!(world.domain_volumes, BTreeSet::from([key(1)]));
    assert_eq!(world.state.volumes_in_use(), BTreeSet::from([key(1)]));
    world.config(purge(generation(config("1"), 1), 4));
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(1, 1)]));
}

#[test]
fn a_purge_of_a_stopped_app_waits_for_its_new_volume_to_start_it() {
    let mut world = World::new(config("1"));
    world.volumes_exist = false;
    world.take_log();
    world.config(purge(config("1"), 1));
    assert_eq!(kinds(&world.take_log()), vec!["stop"]);
    assert!(
        !world.domain_active,
        "not started on a volume that is not there"
    );
    world.volumes_exist = true;
    world.input(Input::Volumes { ready: true });
    world.settle();
    assert_eq!(kinds(&world.take_log()), vec!["start"]);
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 1)]));
}

#[test]
fn a_restart_right_after_the_purge_intent_was_persisted_converges() {
    let base = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    let mut world = World::new(base.clone());
    world.input(Input::Config(purge(base, 1)));
    // app-manager:after-persist-intent: the stop may or may not have gone out; the domain's
    // answer is lost with the process.
    world.restart();
    assert!(world.domain_active);
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 1)]));
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert_eq!(
        volume_keys(
            world
                .state
                .snapshot(id(1))
                .unwrap()
                .config
                .as_ref()
                .unwrap()
        ),
        BTreeSet::from([key(0)])
    );
    assert_eq!(
        world.state.volumes_in_use(),
        BTreeSet::from([local_key(0, 1)])
    );
    // The reloaded state does not purge again.
    world.take_log();
    world.restart();
    assert!(kinds(&world.take_log()).is_empty());
}

#[test]
fn a_rollback_after_a_bare_purge_points_the_app_back_at_the_old_volume_and_a_new_purge_is_fresh() {
    let base = with_snapshot(config("1"), 1, SnapshotType::AppUpdate);
    let mut world = World::new(base.clone());
    let purged = purge(with_snapshot(config("2"), 1, SnapshotType::AppUpdate), 1);
    world.config(purged.clone());
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 1)]));
    world.take_log();

    world.config(rollback_to(purged.clone(), 1, 1));
    let log = world.take_log();
    assert_eq!(kinds(&log), vec!["stop", "rollback", "start"]);
    assert_eq!(
        volume_requests(&log)[0].volume_keys.get(&id(VOLUME)),
        Some(&key(0))
    );
    assert_eq!(world.domain_config_version.as_deref(), Some("1"));
    assert_eq!(world.domain_volumes, BTreeSet::from([key(0)]));
    assert_eq!(world.state.volumes_in_use(), BTreeSet::from([key(0)]));

    // A purge now (the rolled-back config in force) never reuses local generation 1.
    world.config(purge(rollback_to(purged, 1, 1), 2));
    assert_eq!(world.domain_volumes, BTreeSet::from([local_key(0, 2)]));
    assert_eq!(world.domain_config_version.as_deref(), Some("1"));
}

#[test]
fn a_state_written_before_local_generations_existed_loads() {
    let world = World::new(config("1"));
    let mut json = serde_json::to_value(&world.state).unwrap();
    json.as_object_mut().unwrap().remove("local_generations");
    let state: AppState = serde_json::from_value(json).unwrap();
    assert!(state.local_generations.is_empty());
    assert_eq!(volume_keys(state.effective()), BTreeSet::from([key(0)]));
}

// ---- the snapshot policy: schedule, expiry, retention (issue 10) ----

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// `config("1")` with a policy and a limit it never reaches (the policy's own rules are under test).
fn scheduled_config(schedule: &str, zone: &str) -> AppInstanceConfig {
    let mut c = config("1");
    c.snapshot.max_snapshots = 1000;
    c.snapshot.policy = Some(Box::new(SnapshotPolicy {
        schedule: schedule.into(),
        time_zone: zone.into(),
        pattern: "auto-%Y%m%d-%H%M-%n-%a".into(),
        ..Default::default()
    }));
    c
}

fn with_policy(mut c: AppInstanceConfig, f: impl FnOnce(&mut SnapshotPolicy)) -> AppInstanceConfig {
    f(c.snapshot.policy.as_mut().unwrap());
    c
}

/// A running app whose hourly schedule started counting at 2026-01-01 00:00:0x UTC.
fn hourly_world(f: impl FnOnce(&mut SnapshotPolicy)) -> (World, AppInstanceConfig) {
    let c = with_policy(scheduled_config("0 * * * *", "UTC"), f);
    let mut world = World::new(c.clone());
    world.take_log();
    (world, c)
}

#[test]
fn a_due_schedule_takes_a_named_snapshot_with_the_fresh_id_like_an_immediate_one() {
    let (mut world, _) = hourly_world(|_| {});
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T01:00:00Z"))
    );
    // Not due yet: a tick changes nothing.
    world.tick_at(at("2026-01-01T00:30:00Z"));
    assert!(kinds(&world.take_log()).is_empty());
    assert!(world.scheduled().is_empty());

    let new_id = world.tick_at(at("2026-01-01T01:00:00Z"));
    assert_eq!(
        kinds(&world.take_log()),
        vec!["stop", "create", "write-files", "start"]
    );
    let record = world.state.snapshot(new_id).unwrap();
    assert!(record.scheduled);
    assert_eq!(record.state, SnapshotState::Available);
    assert_eq!(record.desc.name, "auto-20260101-0100-1-sensor");
    assert_eq!(record.time_triggered, Some(at("2026-01-01T01:00:00Z")));
    assert!(world.backend.contains(&new_id) && world.files.contains(&new_id));
    assert!(world.domain_active);
    // Reported like any snapshot, with its name.
    let status = app_status(&world.state);
    assert_eq!(status.snap_status.available_snapshots.len(), 1);
    assert_eq!(
        status.snap_status.available_snapshots[0].snapshot.name,
        "auto-20260101-0100-1-sensor"
    );
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T02:00:00Z"))
    );
}

#[test]
fn due_times_missed_while_off_give_one_snapshot_not_a_burst() {
    let (mut world, _) = hourly_world(|_| {});
    world.tick_at(at("2026-01-01T01:00:00Z"));
    // Off from 01:00:10 until 05:10: four due times passed. The state is reloaded.
    world.now = at("2026-01-01T05:10:00Z");
    world.restart();
    assert!(
        world.scheduled().len() == 1,
        "a restart alone takes nothing"
    );
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T02:00:00Z")),
        "overdue: the executor ticks at once"
    );
    world.take_log();
    world.tick_at(at("2026-01-01T05:10:05Z"));
    let log = world.take_log();
    assert_eq!(kinds(&log).iter().filter(|k| **k == "create").count(), 1);
    assert_eq!(world.scheduled().len(), 2);
    assert_eq!(
        world.scheduled()[1].desc.name,
        "auto-20260101-0510-2-sensor"
    );
    assert_eq!(
        world.state.schedule.last_due,
        Some(at("2026-01-01T05:00:00Z")),
        "the last due time passed is the one handled"
    );
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T06:00:00Z"))
    );
    // Another tick before 06:00 takes nothing more.
    world.tick_at(at("2026-01-01T05:30:00Z"));
    assert_eq!(world.scheduled().len(), 2);
}

#[test]
fn a_fresh_state_starts_counting_from_now() {
    // A new app with a schedule: nothing at once, the first snapshot at the first due time.
    let (mut world, c) = hourly_world(|_| {});
    world.tick();
    world.settle();
    assert!(world.scheduled().is_empty());

    // A schedule that arrives with a config change starts counting then, too.
    let mut plain = config("1");
    plain.snapshot.max_snapshots = 1000;
    let mut world = World::new(plain);
    world.now = at("2026-01-01T03:20:00Z");
    world.config(c.clone());
    world.tick();
    world.settle();
    assert!(world.scheduled().is_empty());
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T04:00:00Z"))
    );

    // A state written before schedules existed (no schedule fields) counts from its first step.
    let mut json = serde_json::to_value(&world.state).unwrap();
    json.as_object_mut().unwrap().remove("schedule");
    json.as_object_mut().unwrap().remove("expired");
    let state: AppState = serde_json::from_value(json).unwrap();
    let mut world = World::around(state);
    world.now = at("2026-01-02T10:20:00Z");
    world.input(Input::Resume);
    world.settle();
    world.tick();
    world.settle();
    assert!(world.scheduled().is_empty());
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-02T11:00:00Z"))
    );
}

#[test]
fn a_state_written_before_scheduled_snapshots_existed_loads() {
    let mut world = World::new(config("1"));
    world.config(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    let mut json = serde_json::to_value(&world.state).unwrap();
    for record in json["snapshots"].as_array_mut().unwrap() {
        record.as_object_mut().unwrap().remove("scheduled");
    }
    let state: AppState = serde_json::from_value(json).unwrap();
    assert!(!state.snapshot(id(1)).unwrap().scheduled);
}

#[test]
fn a_scheduled_snapshot_survives_configs_that_do_not_list_it() {
    let (mut world, c) = hourly_world(|_| {});
    let s = world.tick_at(at("2026-01-01T01:00:00Z"));
    // The controller's list changes (a snapshot added, then removed) and a new version comes.
    let with = with_snapshot(c.clone(), 1, SnapshotType::Immediate);
    world.config(with.clone());
    world.config(without_snapshot(with, 1));
    let mut upgraded = c;
    upgraded.uuid_and_version.version = "2".into();
    world.config(upgraded);
    assert_eq!(
        world.state.snapshot(s).unwrap().state,
        SnapshotState::Available
    );
    assert_eq!(
        world.state_of(1),
        None,
        "the controller's one went as usual"
    );
    assert!(world.backend.contains(&s) && world.files.contains(&s));
}

#[test]
fn expiry_marks_pending_deletion_without_stopping_the_app() {
    // Daily at 01:00, expiring after an hour.
    let c = with_policy(scheduled_config("0 1 * * *", "UTC"), |p| {
        p.expiry_seconds = 3_600
    });
    let mut world = World::new(c.clone());
    let s = world.tick_at(at("2026-01-01T01:00:00Z"));
    let created = world.state.snapshot(s).unwrap().time_created.unwrap();
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(created + Duration::hours(1)),
        "the executor wakes for the expiry, before the next due time"
    );
    world.take_log();
    world.tick_at(created + Duration::hours(1));
    assert_eq!(
        world.state.snapshot(s).unwrap().state,
        SnapshotState::PendingDeletion
    );
    assert_eq!(world.stops(), 0, "expiry is never a reason to stop the app");
    assert!(world.domain_active && world.backend.contains(&s));
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-02T01:00:00Z"))
    );
    // Deleted at the next deactivation.
    let mut restarted = c.clone();
    restarted.restart_cmd.counter = 1;
    world.config(restarted.clone());
    assert_eq!(world.state.snapshot(s), None);
    assert!(!world.backend.contains(&s) && !world.files.contains(&s));

    // A controller snapshot expires by its own expiry only, and is not taken again while the
    // config still lists it.
    let mut listed = with_snapshot(restarted, 1, SnapshotType::Immediate);
    listed.snapshot.snapshots[0].expiry_seconds = 600;
    world.config(listed.clone());
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    let expires = world
        .state
        .snapshot(id(1))
        .unwrap()
        .expires_at(None)
        .unwrap();
    world.tick_at(expires);
    assert_eq!(world.state_of(1), Some(SnapshotState::PendingDeletion));
    listed.restart_cmd.counter = 2;
    world.config(listed.clone());
    assert_eq!(world.state_of(1), None);
    listed.uuid_and_version.version = "2".into();
    world.take_log();
    world.config(listed);
    assert_eq!(world.state_of(1), None, "not requested again");
    assert!(!kinds(&world.take_log()).contains(&"create"));

    // A controller snapshot without its own expiry never expires, policy or not.
    let mut forever = with_snapshot(c, 2, SnapshotType::Immediate);
    forever.uuid_and_version.version = "3".into();
    world.config(forever);
    world.tick_at(at("2026-03-01T00:30:00Z"));
    assert_eq!(world.state_of(2), Some(SnapshotState::Available));
}

#[test]
fn retention_deletes_before_the_create_in_the_same_stop_window() {
    let (mut world, _) = hourly_world(|p| p.retention.keep_last = 2);
    let first = world.tick_at(at("2026-01-01T01:00:00Z"));
    let second = world.tick_at(at("2026-01-01T02:00:00Z"));
    world.take_log();
    let third = world.tick_at(at("2026-01-01T03:00:00Z"));
    let log = world.take_log();
    assert_eq!(
        kinds(&log),
        vec![
            "stop",
            "delete",
            "remove-files",
            "create",
            "write-files",
            "start"
        ],
        "one stop window, the deletion first"
    );
    let deleted = log.iter().find_map(|a| match a {
        Action::Volumes(r) if r.action == VolumesSnapshotAction::Delete => Some(r.snapshot_id),
        _ => None,
    });
    assert_eq!(deleted, Some(first));
    let kept: Vec<Uuid> = world.scheduled().iter().map(|s| s.id()).collect();
    assert_eq!(kept, vec![second, third]);
    assert_eq!(world.backend, BTreeSet::from([second, third]));
}

#[test]
fn max_snapshots_holds_for_scheduled_snapshots_too() {
    let (mut world, c) = hourly_world(|_| {});
    let mut limited = c;
    limited.snapshot.max_snapshots = 2;
    world.config(limited);
    let first = world.tick_at(at("2026-01-01T01:00:00Z"));
    world.tick_at(at("2026-01-01T02:00:00Z"));
    world.tick_at(at("2026-01-01T03:00:00Z"));
    world.tick_at(at("2026-01-01T04:00:00Z"));
    let available = world
        .state
        .snapshots
        .iter()
        .filter(|s| s.state == SnapshotState::Available)
        .count();
    assert_eq!(available, 2);
    assert_eq!(world.state.snapshot(first), None, "the oldest went first");
}

#[test]
fn a_stopped_app_is_snapshotted_only_with_schedule_when_stopped_and_without_a_start() {
    let (mut world, c) = hourly_world(|_| {});
    let mut stopped = c.clone();
    stopped.activate = false;
    world.config(stopped.clone());
    assert!(!world.domain_active);
    world.take_log();
    world.tick_at(at("2026-01-01T01:00:00Z"));
    assert!(world.scheduled().is_empty(), "skipped while stopped");
    assert!(kinds(&world.take_log()).is_empty());
    assert_eq!(
        next_wakeup(&world.state, world.now),
        Some(at("2026-01-01T02:00:00Z")),
        "a skipped due time is handled"
    );

    world.config(with_policy(stopped, |p| p.schedule_when_stopped = true));
    let s = world.tick_at(at("2026-01-01T02:00:00Z"));
    assert_eq!(kinds(&world.take_log()), vec!["create", "write-files"]);
    assert_eq!(
        world.state.snapshot(s).unwrap().state,
        SnapshotState::Available
    );
    assert!(!world.domain_active);
}

#[test]
fn a_due_time_waits_for_the_volumes_and_then_takes_one() {
    let (mut world, _) = hourly_world(|_| {});
    world.volumes_exist = false;
    world.input(Input::Volumes { ready: false });
    world.settle();
    world.take_log();
    world.tick_at(at("2026-01-01T01:00:00Z"));
    assert!(world.scheduled().is_empty());
    assert_eq!(
        next_wakeup(&world.state, world.now),
        None,
        "nothing to wake for until the volumes are ready"
    );
    world.volumes_exist = true;
    world.input(Input::Volumes { ready: true });
    world.settle();
    let due = next_wakeup(&world.state, world.now).unwrap();
    assert!(due <= world.now, "overdue once the volumes are ready");
    world.tick();
    world.settle();
    assert_eq!(world.scheduled().len(), 1);
}

/// The scheduled snapshots taken between `from` and `until` with ticks every 15 minutes, by
/// day in Berlin.
fn berlin_days(from: &str, until: &str) -> Vec<u32> {
    use chrono::Datelike;
    let berlin = cairn_types::policy::parse_zone("Europe/Berlin").unwrap();
    let c = scheduled_config("30 2 * * *", "Europe/Berlin");
    let mut world = World::new(config("0"));
    world.now = at(from);
    world.config(c);
    let mut t = at(from);
    while t < at(until) {
        t += Duration::minutes(15);
        world.tick_at(t);
        assert!(next_wakeup(&world.state, world.now).is_none_or(|w| w > world.now));
    }
    world
        .scheduled()
        .iter()
        .map(|s| s.time_triggered.unwrap().with_timezone(&berlin).day())
        .collect()
}

#[test]
fn a_daily_schedule_takes_one_a_day_across_daylight_saving_changes() {
    // 2026-03-29: 02:00 → 03:00, so 02:30 does not exist that day; it is due just after.
    assert_eq!(
        berlin_days("2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z"),
        vec![28, 29, 30, 31]
    );
    // 2026-10-25: 03:00 → 02:00, so 02:30 happens twice; it is taken once.
    assert_eq!(
        berlin_days("2026-10-23T12:00:00Z", "2026-10-27T12:00:00Z"),
        vec![24, 25, 26, 27]
    );
}

// ---- consistency groups (issue 10): two worlds and the executor's coordination ----

const GROUP: u128 = 0x6209;

/// Member app `app` at `version`, listing its snapshot `snapshot` of the group when given.
fn member(app: u128, version: &str, snapshot: Option<u128>) -> AppInstanceConfig {
    let mut c = config(version);
    c.uuid_and_version.uuid = id(app);
    if let Some(n) = snapshot {
        c.snapshot.snapshots.push(SnapshotDesc {
            snapshot_id: id(n),
            snapshot_type: SnapshotType::Immediate,
            group_id: id(GROUP),
            ..Default::default()
        });
    }
    c
}

/// The executor's coordination over the worlds' states, until nothing moves.
fn coordinate(worlds: &mut [World]) {
    for _ in 0..20 {
        let states = worlds
            .iter()
            .map(|w| (w.state.app, w.state.clone()))
            .collect();
        let now = worlds.iter().map(|w| w.now).max().unwrap();
        let inputs = cairn_app_manager::machine::coordinate(&states, now);
        if inputs.is_empty() {
            return;
        }
        for (app, input) in inputs {
            let world = worlds.iter_mut().find(|w| w.state.app == app).unwrap();
            world.input(input);
            world.settle();
        }
    }
    panic!("the group never settled");
}

fn two_members() -> Vec<World> {
    vec![
        World::new(member(0xa1, "1", None)),
        World::new(member(0xa2, "1", None)),
    ]
}

fn waiting(world: &World) -> bool {
    matches!(world.state.phase, Phase::Group { done: false, .. }) && !world.domain_active
}

#[test]
fn a_group_snapshot_waits_for_every_member_then_takes_all_at_one_time() {
    let mut worlds = two_members();
    worlds[0].config(member(0xa1, "1", Some(0xc1)));
    // Stopped, nothing asked of the volume-manager: member 2 is not stopped yet.
    assert!(waiting(&worlds[0]));
    assert!(worlds[0].backend.is_empty());
    worlds[1].config(member(0xa2, "1", Some(0xc2)));
    assert!(waiting(&worlds[1]));
    coordinate(&mut worlds);
    let times: Vec<_> = [(0, 0xc1), (1, 0xc2)]
        .iter()
        .map(|&(w, n)| {
            let world = &worlds[w];
            assert_eq!(world.state_of(n), Some(SnapshotState::Available));
            assert!(world.backend.contains(&id(n)) && world.files.contains(&id(n)));
            assert!(world.domain_active, "member {w} runs again");
            assert_eq!(world.state.phase, Phase::Idle);
            world.state.snapshot(id(n)).unwrap().time_created.unwrap()
        })
        .collect();
    assert_eq!(times[0], times[1], "one logical time");
}

#[test]
fn a_group_snapshot_failing_at_one_member_is_undone_on_every_member() {
    let mut worlds = two_members();
    worlds[0].config(member(0xa1, "1", Some(0xc1)));
    worlds[1].config(member(0xa2, "1", Some(0xc2)));
    worlds[1].fail_next_volume_op = true;
    coordinate(&mut worlds);
    for (w, n) in [(0, 0xc1), (1, 0xc2)] {
        let world = &worlds[w];
        assert_eq!(world.state_of(n), Some(SnapshotState::Failed), "member {w}");
        let error = world.state.snapshot(id(n)).unwrap().error.clone().unwrap();
        assert!(
            error.contains(&id(GROUP).to_string()) && error.contains(&id(0xa2).to_string()),
            "names the group and the failed member: {error}"
        );
        assert!(world.backend.is_empty(), "member {w}: nothing left taken");
        assert!(world.files.is_empty(), "member {w}: no records");
        assert!(world.domain_active, "member {w} runs again");
        // Reported with its error, like any failed snapshot.
        let status = app_status(&world.state);
        assert!(status.snap_status.available_snapshots.is_empty());
        assert!(status.snap_status.requested_snapshots[0].error.is_error());
    }
    // Not taken again: the config still lists it, failed.
    worlds[0].config(member(0xa1, "1", Some(0xc1)));
    coordinate(&mut worlds);
    assert!(worlds[0].backend.is_empty());
}

#[test]
fn a_group_resumes_at_its_barrier_after_a_restart() {
    let mut worlds = two_members();
    worlds[0].config(member(0xa1, "1", Some(0xc1)));
    worlds[1].config(member(0xa2, "1", Some(0xc2)));
    // Both go, both take theirs; member 1 restarts before being told the group is done.
    let at = worlds[1].now;
    for world in worlds.iter_mut() {
        world.input(Input::GroupGo { at });
        world.settle();
        assert!(matches!(world.state.phase, Phase::Group { done: true, .. }));
        assert!(!world.domain_active);
    }
    worlds[0].restart();
    assert!(!worlds[0].domain_active, "still held at the second barrier");
    coordinate(&mut worlds);
    for (w, n) in [(0, 0xc1), (1, 0xc2)] {
        assert_eq!(worlds[w].state_of(n), Some(SnapshotState::Available));
        assert_eq!(
            worlds[w].state.snapshot(id(n)).unwrap().time_created,
            Some(at)
        );
        assert!(worlds[w].domain_active);
    }
}

#[test]
fn a_group_rollback_restarts_no_member_before_every_member_is_rolled_back() {
    let mut worlds = two_members();
    worlds[0].config(member(0xa1, "1", Some(0xc1)));
    worlds[1].config(member(0xa2, "1", Some(0xc2)));
    coordinate(&mut worlds);
    worlds[0].config(member(0xa1, "2", Some(0xc1)));
    worlds[1].config(member(0xa2, "2", Some(0xc2)));
    let rollback = |app: u128, n: u128| {
        let mut c = member(app, "2", Some(n));
        c.snapshot.active_snapshot = id(n).to_string();
        c.snapshot.rollback_cmd.counter = 1;
        c
    };
    // Member 1 is told first: stopped, its volumes not rolled back until member 2 is stopped
    // too (the executor coordinates after each input; here, after both).
    worlds[0].config(rollback(0xa1, 0xc1));
    assert!(waiting(&worlds[0]));
    assert!(worlds[1].domain_active);
    worlds[1].config(rollback(0xa2, 0xc2));
    assert!(waiting(&worlds[1]));
    // One round: both roll back; neither starts before both are done.
    let states = worlds
        .iter()
        .map(|w| (w.state.app, w.state.clone()))
        .collect();
    let inputs = cairn_app_manager::machine::coordinate(&states, worlds[1].now);
    assert_eq!(inputs.len(), 2);
    worlds[0].input(inputs[0].1.clone());
    worlds[0].settle();
    assert!(matches!(
        worlds[0].state.phase,
        Phase::Group { done: true, .. }
    ));
    assert!(
        !worlds[0].domain_active,
        "held until member 2 is rolled back"
    );
    coordinate(&mut worlds);
    for world in &worlds {
        assert!(world.domain_active);
        assert_eq!(world.domain_config_version.as_deref(), Some("1"));
        assert_eq!(world.state.phase, Phase::Idle);
        assert!(world.state.error.is_none());
    }
}

// ---- quiesce hooks (issue 11) ----

use cairn_app_manager::machine::{HookKind, SnapshotOutcome};

fn hooked(mut c: AppInstanceConfig) -> AppInstanceConfig {
    c.quiesce = Some(cairn_types::app::QuiesceHooks {
        pre: vec!["/usr/bin/flush".into()],
        post: vec!["/usr/bin/resume".into()],
        timeout_seconds: 5,
        ..Default::default()
    });
    c
}

/// The hook the machine waits for, as the executor asked for it.
fn running_hook(world: &World) -> (Uuid, HookKind, u64) {
    match world.state.phase {
        Phase::Hook {
            snapshot,
            kind,
            counter,
        } => (snapshot, kind, counter),
        ref other => panic!("no hook running: {other:?}"),
    }
}

/// The running hook ends (`failure: None`: it succeeded), and everything it sets off.
fn hook_ends(world: &mut World, kind: HookKind, failure: Option<&str>) {
    let (snapshot, running, counter) = running_hook(world);
    assert_eq!(running, kind);
    world.input(Input::Hook {
        snapshot,
        kind,
        counter,
        failure: failure.map(str::to_string),
        note: None,
    });
    world.settle();
}

fn hook_requests(log: &[Action]) -> Vec<cairn_app_manager::machine::HookRequest> {
    log.iter()
        .filter_map(|a| match a {
            Action::RunHook(r) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_pre_hook_runs_before_the_stop_and_the_volume_request_and_the_post_hook_after() {
    let mut world = World::new(hooked(config("1")));
    world.take_log();
    world.config(with_snapshot(
        hooked(config("1")),
        1,
        SnapshotType::Immediate,
    ));
    // The app still runs while its pre hook flushes it; nothing else is asked yet.
    let log = world.take_log();
    assert_eq!(kinds(&log), ["pre-hook"]);
    assert!(world.domain_active);
    assert_eq!(
        app_status(&world.state).state,
        cairn_types::SwState::Running
    );
    let pre = &hook_requests(&log)[0];
    assert_eq!(
        (
            pre.snapshot,
            pre.argv.clone(),
            pre.timeout_seconds,
            pre.outcome
        ),
        (id(1), vec!["/usr/bin/flush".to_string()], 5, None)
    );
    assert_eq!(pre.volume_keys, [key(0)]);
    // The hook is an intent on disk before the executor runs it.
    assert!(matches!(world.persisted.phase, Phase::Hook { .. }));

    hook_ends(&mut world, HookKind::Pre, None);
    let log = world.take_log();
    assert_eq!(kinds(&log), ["stop", "create", "write-files", "post-hook"]);
    assert_eq!(hook_requests(&log)[0].outcome, Some(SnapshotOutcome::Taken));
    // The post hook runs before the app starts again.
    assert!(!world.domain_active);
    hook_ends(&mut world, HookKind::Post, None);
    assert_eq!(kinds(&world.take_log()), ["start"]);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.state.quiesced.is_empty());
    assert!(world.state.warnings.is_empty());
}

#[test]
fn a_failing_pre_hook_takes_nothing_fails_the_snapshot_and_still_runs_the_post_hook() {
    let mut world = World::new(hooked(config("1")));
    world.config(with_snapshot(
        hooked(config("1")),
        1,
        SnapshotType::Immediate,
    ));
    world.take_log();
    let reason = "pre hook /usr/bin/flush failed: exit 3: cannot flush";
    hook_ends(&mut world, HookKind::Pre, Some(reason));
    let log = world.take_log();
    // No stop, no volume request: only the thaw, told the snapshot failed.
    assert_eq!(kinds(&log), ["post-hook"]);
    assert_eq!(
        hook_requests(&log)[0].outcome,
        Some(SnapshotOutcome::Failed)
    );
    assert!(world.backend.is_empty());
    assert_eq!(world.state_of(1), Some(SnapshotState::Failed));
    assert_eq!(
        world.state.snapshot(id(1)).unwrap().error.as_deref(),
        Some(reason)
    );
    hook_ends(&mut world, HookKind::Post, None);
    // The app kept running all along.
    assert!(kinds(&world.take_log()).is_empty());
    assert!(world.domain_active);
    let status = app_status(&world.state);
    assert_eq!(status.state, cairn_types::SwState::Running);
    let failed = &status.snap_status.requested_snapshots[0];
    assert_eq!(failed.error.error, reason);
}

#[test]
fn a_failing_pre_hook_while_the_app_is_down_for_another_snapshot_starts_it_again() {
    let mut world = World::new(hooked(config("1")));
    let two = with_snapshot(
        with_snapshot(hooked(config("1")), 1, SnapshotType::Immediate),
        2,
        SnapshotType::Immediate,
    );
    world.config(two);
    hook_ends(&mut world, HookKind::Pre, None); // snapshot 1: stop, create, then its post
    hook_ends(&mut world, HookKind::Post, None);
    world.take_log();
    // Snapshot 2's pre hook runs with the app down, before its volume request.
    assert_eq!(running_hook(&world).0, id(2));
    assert!(!world.domain_active);
    hook_ends(
        &mut world,
        HookKind::Pre,
        Some("pre hook x timed out after 5s"),
    );
    assert_eq!(kinds(&world.take_log()), ["post-hook"]);
    hook_ends(&mut world, HookKind::Post, None);
    assert_eq!(kinds(&world.take_log()), ["start"]);
    assert!(world.domain_active);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert_eq!(world.state_of(2), Some(SnapshotState::Failed));
    assert_eq!(world.backend, BTreeSet::from([id(1)]));
}

#[test]
fn a_failing_post_hook_keeps_the_snapshot_and_warns() {
    let mut world = World::new(hooked(config("1")));
    world.config(with_snapshot(
        hooked(config("1")),
        1,
        SnapshotType::Immediate,
    ));
    hook_ends(&mut world, HookKind::Pre, None);
    hook_ends(
        &mut world,
        HookKind::Post,
        Some("post hook /usr/bin/resume failed: exit 1: busy"),
    );
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.domain_active);
    let warnings = app_status(&world.state).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("post hook /usr/bin/resume failed: exit 1: busy")),
        "{warnings:?}"
    );
}

#[test]
fn a_restart_during_the_pre_hook_fails_the_snapshot_cleanly_and_runs_the_post_hook() {
    let mut world = World::new(hooked(config("1")));
    world.config(with_snapshot(
        hooked(config("1")),
        1,
        SnapshotType::Immediate,
    ));
    assert_eq!(running_hook(&world).1, HookKind::Pre);
    world.take_log();
    world.restart();
    let log = world.take_log();
    assert_eq!(kinds(&log), ["post-hook"]);
    assert_eq!(world.state_of(1), Some(SnapshotState::Failed));
    let error = world.state.snapshot(id(1)).unwrap().error.clone().unwrap();
    assert!(error.contains("interrupted by a restart"), "{error}");
    assert!(world.backend.is_empty());
    hook_ends(&mut world, HookKind::Post, None);
    assert!(world.domain_active);
}

#[test]
fn a_restart_during_the_post_hook_runs_it_again() {
    let mut world = World::new(hooked(config("1")));
    world.config(with_snapshot(
        hooked(config("1")),
        1,
        SnapshotType::Immediate,
    ));
    hook_ends(&mut world, HookKind::Pre, None);
    let (_, kind, counter) = running_hook(&world);
    assert_eq!(kind, HookKind::Post);
    world.take_log();
    world.restart();
    let log = world.take_log();
    assert_eq!(kinds(&log), ["post-hook"]);
    assert_eq!(hook_requests(&log)[0].counter, counter);
    hook_ends(&mut world, HookKind::Post, None);
    assert_eq!(kinds(&world.take_log()), ["start"]);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
}

#[test]
fn a_post_hook_alone_runs_after_the_snapshot() {
    let mut c = hooked(config("1"));
    c.quiesce.as_mut().unwrap().pre.clear();
    let mut world = World::new(c.clone());
    world.take_log();
    world.config(with_snapshot(c, 1, SnapshotType::Immediate));
    assert_eq!(
        kinds(&world.take_log()),
        ["stop", "create", "write-files", "post-hook"]
    );
    hook_ends(&mut world, HookKind::Post, None);
    assert!(world.domain_active);
}

#[test]
fn a_failing_pre_hook_of_one_group_member_aborts_the_group_and_thaws_the_other() {
    let mut worlds = vec![
        World::new(hooked(member(0xa1, "1", None))),
        World::new(hooked(member(0xa2, "1", None))),
    ];
    worlds[0].config(hooked(member(0xa1, "1", Some(0xc1))));
    worlds[1].config(hooked(member(0xa2, "1", Some(0xc2))));
    // Member 1 flushed and waits, stopped, at the barrier; member 2's pre hook fails.
    hook_ends(&mut worlds[0], HookKind::Pre, None);
    assert!(waiting(&worlds[0]));
    hook_ends(
        &mut worlds[1],
        HookKind::Pre,
        Some("pre hook /usr/bin/flush failed: exit 3: cannot flush"),
    );
    coordinate(&mut worlds);
    for (world, snapshot) in worlds.iter_mut().zip([0xc1, 0xc2]) {
        assert_eq!(world.state_of(snapshot), Some(SnapshotState::Failed));
        assert!(world.backend.is_empty());
        hook_ends(world, HookKind::Post, None);
        assert!(
            world.domain_active,
            "member {:?} not running",
            world.state.app
        );
    }
    let error = worlds[0].state.snapshot(id(0xc1)).unwrap().error.clone();
    assert!(error.unwrap().contains("cannot flush"));
}

// ---- declared consistency groups and their schedules (issue 10) ----

const DECLARED: u128 = 0x6d00;

/// The group `DECLARED` with `members`, and its hourly schedule with keep-last 2 when
/// `scheduled`.
fn declared(members: &[u128], scheduled: bool) -> cairn_types::ConsistencyGroup {
    cairn_types::ConsistencyGroup {
        id: id(DECLARED),
        name: "plant".into(),
        members: members.iter().map(|&m| id(m)).collect(),
        policy: scheduled.then(|| {
            Box::new(SnapshotPolicy {
                schedule: "@hourly".into(),
                pattern: "plant-%H%M-%a".into(),
                retention: cairn_types::Retention {
                    keep_last: 2,
                    ..Default::default()
                },
                ..Default::default()
            })
        }),
    }
}

/// Member `app` of `group`, listing its snapshot `snapshot` of the group snapshot `GROUP`.
fn declared_member(
    app: u128,
    snapshot: Option<u128>,
    group: &cairn_types::ConsistencyGroup,
) -> AppInstanceConfig {
    let mut c = member(app, "1", snapshot);
    c.group = Some(Box::new(group.clone()));
    c
}

fn group_snapshots(world: &World) -> Vec<&cairn_app_manager::machine::SnapshotRecord> {
    world
        .state
        .snapshots
        .iter()
        .filter(|s| !s.desc.group_id.is_nil())
        .collect()
}

#[test]
fn a_group_schedule_takes_every_member_under_one_group_snapshot_and_keeps_its_retention() {
    let group = declared(&[0xa1, 0xa2], true);
    let mut worlds = vec![
        World::new(declared_member(0xa1, None, &group)),
        World::new(declared_member(0xa2, None, &group)),
    ];
    for hour in 1..=3 {
        let due = at(&format!("2026-01-01T0{hour}:00:00Z"));
        for world in &worlds {
            assert_eq!(
                next_wakeup(&world.state, world.now),
                Some(due),
                "hour {hour}"
            );
        }
        // The executor ticks the apps one after the other, coordinating after each.
        worlds[0].tick_at(due);
        coordinate(&mut worlds);
        assert!(
            waiting(&worlds[0]),
            "member 1 waits for member 2 to take its due time"
        );
        worlds[1].tick_at(due);
        coordinate(&mut worlds);
        let group_snapshot = group.scheduled_snapshot(due);
        let mut times = BTreeSet::new();
        for world in &worlds {
            let taken = world
                .state
                .snapshots
                .iter()
                .find(|s| s.desc.group_id == group_snapshot)
                .unwrap_or_else(|| {
                    panic!(
                        "each member took its snapshot of the due time: {:#?}",
                        world.state.snapshots
                    )
                });
            assert_eq!(taken.state, SnapshotState::Available);
            assert!(taken.scheduled);
            assert_eq!(taken.due, Some(due));
            assert!(taken.desc.name.starts_with(&format!("plant-0{hour}00-")));
            assert_eq!(
                taken.id(),
                cairn_types::ConsistencyGroup::member_snapshot(group_snapshot, world.state.app)
            );
            times.insert(taken.time_created.unwrap());
            assert!(world.domain_active);
        }
        assert_eq!(times.len(), 1, "one logical time for the group");
    }
    // keep-last 2 on every member: the 01:00 group snapshot is gone everywhere.
    for world in &worlds {
        let kept: Vec<_> = group_snapshots(world)
            .iter()
            .map(|s| s.due.unwrap())
            .collect();
        assert_eq!(
            kept,
            [at("2026-01-01T02:00:00Z"), at("2026-01-01T03:00:00Z")],
            "member {}",
            world.state.app
        );
        assert_eq!(world.backend.len(), 2);
    }
}

#[test]
fn a_group_schedule_takes_a_stopped_member_too() {
    let group = declared(&[0xa1, 0xa2], true);
    let mut stopped = declared_member(0xa2, None, &group);
    stopped.activate = false;
    let mut worlds = vec![
        World::new(declared_member(0xa1, None, &group)),
        World::new(stopped),
    ];
    let due = at("2026-01-01T01:00:00Z");
    worlds[0].tick_at(due);
    worlds[1].tick_at(due);
    coordinate(&mut worlds);
    for world in &worlds {
        assert_eq!(group_snapshots(world)[0].state, SnapshotState::Available);
    }
    assert!(worlds[0].domain_active);
    assert!(!worlds[1].domain_active, "a stopped member stays stopped");
}

#[test]
fn a_member_whose_group_schedule_started_after_the_due_time_fails_the_group_instead_of_holding_it()
{
    let group = declared(&[0xa1, 0xa2], true);
    let mut first = World::new(declared_member(0xa1, None, &group));
    // Member 2's config arrives 30 s after the due time: it counts from then on.
    let mut late = World::new(member(0xa2, "1", None));
    late.now = at("2026-01-01T01:00:30Z");
    late.config(declared_member(0xa2, None, &group));
    first.tick_at(at("2026-01-01T01:00:00Z"));
    let mut worlds = vec![first, late];
    coordinate(&mut worlds);
    let taken = group_snapshots(&worlds[0])[0];
    assert_eq!(taken.state, SnapshotState::Failed);
    let error = taken.error.clone().unwrap();
    assert!(
        error.contains("plant") && error.contains(&id(0xa2).to_string()) && error.contains("due"),
        "names the group, the member and why: {error}"
    );
    assert!(worlds[0].backend.is_empty(), "nothing left taken");
    assert!(worlds[0].domain_active, "member 1 runs again");
    // The next due time is taken by both.
    let due = at("2026-01-01T02:00:00Z");
    worlds[0].tick_at(due);
    worlds[1].tick_at(due);
    coordinate(&mut worlds);
    for world in &worlds {
        let latest = *group_snapshots(world).last().unwrap();
        assert_eq!(latest.due, Some(due));
        assert_eq!(latest.state, SnapshotState::Available);
    }
}

#[test]
fn a_requested_group_snapshot_waits_for_a_declared_member_whose_request_has_not_arrived() {
    let group = declared(&[0xa1, 0xa2], false);
    let mut worlds = vec![
        World::new(declared_member(0xa1, None, &group)),
        World::new(declared_member(0xa2, None, &group)),
    ];
    worlds[0].config(declared_member(0xa1, Some(0xc1), &group));
    coordinate(&mut worlds);
    assert!(waiting(&worlds[0]), "held at the barrier, not taken alone");
    assert!(worlds[0].backend.is_empty());
    worlds[1].config(declared_member(0xa2, Some(0xc2), &group));
    coordinate(&mut worlds);
    assert_eq!(worlds[0].state_of(0xc1), Some(SnapshotState::Available));
    assert_eq!(worlds[1].state_of(0xc2), Some(SnapshotState::Available));
}

#[test]
fn a_declared_member_missing_from_the_device_fails_the_group() {
    let group = declared(&[0xa1, 0xa2, 0xa3], false);
    let mut worlds = vec![
        World::new(declared_member(0xa1, Some(0xc1), &group)),
        World::new(declared_member(0xa2, Some(0xc2), &group)),
    ];
    coordinate(&mut worlds);
    for (w, n) in [(0, 0xc1), (1, 0xc2)] {
        let record = worlds[w].state.snapshot(id(n)).unwrap();
        assert_eq!(record.state, SnapshotState::Failed, "member {w}");
        let error = record.error.clone().unwrap();
        assert!(
            error.contains(&id(0xa3).to_string()) && error.contains("not on this device"),
            "{error}"
        );
        assert!(worlds[w].backend.is_empty());
        assert!(worlds[w].domain_active);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    /// All or nothing, whatever member fails and whichever members restart between the
    /// executor's coordination rounds: every member ends with its snapshot of the group
    /// available at one time, or every member with it failed and nothing of it on any
    /// volume; every member runs again.
    #[test]
    fn a_group_snapshot_is_all_or_nothing_across_failures_and_restarts(
        size in 2usize..=4,
        failing in proptest::option::of(0usize..4),
        order in Just(()).prop_perturb(|_, mut rng| {
            let mut order: Vec<usize> = (0..4).collect();
            for i in (1..order.len()).rev() {
                let j = (rng.next_u32() as usize) % (i + 1);
                order.swap(i, j);
            }
            order
        }),
        restarts in proptest::collection::vec((0usize..4, 0usize..6), 0..4),
        scheduled in any::<bool>(),
    ) {
        let apps: Vec<u128> = (0..size as u128).map(|i| 0xa1 + i).collect();
        let group = declared(&apps, scheduled);
        let mut worlds: Vec<World> = apps
            .iter()
            .map(|&a| World::new(declared_member(a, None, &group)))
            .collect();
        let failing = failing.filter(|f| *f < size);
        if let Some(f) = failing {
            worlds[f].fail_next_volume_op = true;
        }
        let due = at("2026-01-01T01:00:00Z");
        // The members get their request (a tick or a config) in `order`, with restarts and
        // coordination rounds in between.
        for (round, &w) in order.iter().filter(|&&w| w < size).enumerate() {
            if scheduled {
                worlds[w].tick_at(due);
            } else {
                let app = apps[w];
                worlds[w].config(declared_member(app, Some(0xc0 + app), &group));
            }
            for &(r, when) in &restarts {
                if r < size && when == round {
                    worlds[r].restart();
                }
            }
            let states = worlds.iter().map(|w| (w.state.app, w.state.clone())).collect();
            let now = worlds.iter().map(|w| w.now).max().unwrap();
            for (app, input) in cairn_app_manager::machine::coordinate(&states, now) {
                let world = worlds.iter_mut().find(|w| w.state.app == app).unwrap();
                world.input(input);
                world.settle();
            }
        }
        coordinate(&mut worlds);
        let records: Vec<_> = worlds.iter().map(|w| group_snapshots(w)[0].clone()).collect();
        let available = records.iter().filter(|r| r.state == SnapshotState::Available).count();
        if failing.is_some() {
            prop_assert_eq!(available, 0, "a failing member leaves no snapshot on any");
            for (world, record) in worlds.iter().zip(&records) {
                prop_assert_eq!(record.state, SnapshotState::Failed);
                prop_assert!(world.backend.is_empty(), "member {} keeps nothing", world.state.app);
            }
        } else {
            prop_assert_eq!(available, size, "every member took it");
            let times: BTreeSet<_> = records.iter().map(|r| r.time_created).collect();
            prop_assert_eq!(times.len(), 1, "one logical time");
            for (world, record) in worlds.iter().zip(&records) {
                prop_assert!(world.backend.contains(&record.id()));
            }
        }
        for world in &worlds {
            prop_assert!(world.domain_active, "member {} runs again", world.state.app);
            prop_assert_eq!(&world.state.phase, &Phase::Idle);
        }
    }
}

// ---- issue 11: live and stateful snapshots ----

fn vm_config(version: &str) -> AppInstanceConfig {
    let mut c = config(version);
    c.domain = Some(cairn_types::DomainSpec::Vm(cairn_types::VmSpec::default()));
    c
}

fn with_mode(
    mut c: AppInstanceConfig,
    n: u128,
    mode: cairn_types::SnapshotMode,
) -> AppInstanceConfig {
    c.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: id(n),
        snapshot_type: SnapshotType::Immediate,
        mode,
        ..Default::default()
    });
    c
}

/// The domain-manager's answer to the live request in force.
fn live_answer(world: &World, pause_ms: u64, ok: bool) -> Input {
    use cairn_types::domain::{DomainLiveOpState, DomainLiveOpStatus};
    let request = cairn_app_manager::live::live_request(&world.state).expect("a live request");
    Input::LiveOpResult(DomainLiveOpStatus {
        request_id: request.request_id,
        app_uuid: request.app_uuid,
        op: request.op,
        tag: request.tag,
        state: if ok {
            DomainLiveOpState::Done
        } else {
            DomainLiveOpState::Failed
        },
        error: if ok {
            ErrorDescription::default()
        } else {
            ErrorDescription::new("QMP transaction failed", ErrorSeverity::Error, world.now)
        },
        pause_ms,
        ..Default::default()
    })
}

#[test]
fn a_live_snapshot_of_a_vm_is_taken_without_a_stop_and_records_its_pause() {
    use cairn_app_manager::live::live_request;
    use cairn_types::domain::DomainLiveOp;
    let mut world = World::new(vm_config("1"));
    world.take_log();
    world.config(with_mode(
        vm_config("1"),
        1,
        cairn_types::SnapshotMode::Live,
    ));
    // The domain-manager is asked first, under the tag the volume-manager names it by.
    let request = live_request(&world.state).expect("a live request");
    assert_eq!(request.op, DomainLiveOp::DiskSnapshotCreate);
    assert_eq!(request.tag, id(1).to_string());
    assert_eq!(world.stops(), 0, "no stop for a live snapshot");
    assert_eq!(world.state_of(1), Some(SnapshotState::Triggered));
    assert_eq!(
        world.persisted.live, world.state.live,
        "the live step is persisted first"
    );

    world.input(live_answer(&world, 42, true));
    world.settle();
    let log = world.take_log();
    let recorded: Vec<_> = log
        .iter()
        .filter_map(|a| match a {
            Action::Volumes(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(recorded.len(), 1);
    assert!(
        recorded[0].live,
        "the volume-manager records it, it does not take it"
    );
    assert_eq!(
        kinds(&log),
        vec!["create", "write-files"],
        "no stop, no start"
    );
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.domain_active);
    assert!(world.state.live.is_none());
    let status = app_status(&world.state);
    assert_eq!(status.snap_status.available_snapshots[0].pause_ms, 42);
    assert_eq!(status.state, cairn_types::SwState::Running);
}

#[test]
fn a_live_step_survives_a_restart_and_the_domain_stays_wanted() {
    use cairn_app_manager::live::live_request;
    let mut world = World::new(vm_config("1"));
    world.config(with_mode(
        vm_config("1"),
        1,
        cairn_types::SnapshotMode::Live,
    ));
    let before = live_request(&world.state).unwrap();
    world.take_log();
    world.restart();
    assert_eq!(
        live_request(&world.state).map(|r| r.request_id),
        Some(before.request_id),
        "the same request is asked again (the domain-manager runs it at most once)"
    );
    assert_eq!(world.stops(), 0);
    assert!(matches!(world.state.domain_request(), Some((true, _))));
    world.input(live_answer(&world, 5, true));
    world.settle();
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
}

#[test]
fn a_failed_live_operation_fails_the_snapshot_and_leaves_the_app_running() {
    let mut world = World::new(vm_config("1"));
    world.config(with_mode(
        vm_config("1"),
        1,
        cairn_types::SnapshotMode::Live,
    ));
    world.take_log();
    world.input(live_answer(&world, 0, false));
    world.settle();
    assert_eq!(world.state_of(1), Some(SnapshotState::Failed));
    let error = world.state.snapshot(id(1)).unwrap().error.clone().unwrap();
    assert!(error.contains("QMP transaction failed"), "{error}");
    assert!(
        kinds(&world.take_log()).is_empty(),
        "nothing stopped, nothing asked"
    );
    assert!(world.domain_active);
}

#[test]
fn a_live_snapshot_of_a_process_goes_straight_to_the_volume_manager() {
    let mut process = config("1");
    process.domain = Some(cairn_types::DomainSpec::Process(
        cairn_types::ProcessSpec::default(),
    ));
    let mut world = World::new(process.clone());
    world.take_log();
    world.config(with_mode(process, 1, cairn_types::SnapshotMode::Live));
    assert!(cairn_app_manager::live::live_request(&world.state).is_none());
    let log = world.take_log();
    assert_eq!(kinds(&log), vec!["create", "write-files"]);
    assert!(
        log.iter()
            .any(|a| matches!(a, Action::Volumes(r) if r.live))
    );
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
}

#[test]
fn a_rollback_to_a_stateful_snapshot_starts_the_vm_from_its_memory() {
    let mut world = World::new(vm_config("1"));
    world.config(with_mode(
        vm_config("1"),
        1,
        cairn_types::SnapshotMode::Stateful,
    ));
    assert_eq!(
        cairn_app_manager::live::live_request(&world.state)
            .unwrap()
            .op,
        cairn_types::domain::DomainLiveOp::StateSave
    );
    world.input(live_answer(&world, 180, true));
    world.settle();
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    world.take_log();

    let mut rollback = with_mode(vm_config("1"), 1, cairn_types::SnapshotMode::Stateful);
    rollback.snapshot.active_snapshot = id(1).to_string();
    rollback.snapshot.rollback_cmd.counter = 1;
    world.input(Input::Config(rollback));
    // Step by step, to see what the start is asked with.
    let mut load_at_start = None;
    while let Some(input) = world.inbox.pop_front() {
        world.input(input);
        if load_at_start.is_none()
            && world
                .log
                .iter()
                .any(|a| matches!(a, Action::Domain { activate: true, .. }))
        {
            load_at_start = Some(cairn_app_manager::live::load_state_tag(&world.state));
        }
    }
    assert_eq!(kinds(&world.take_log()), vec!["stop", "rollback", "start"]);
    assert_eq!(
        load_at_start.as_deref(),
        Some(id(1).to_string().as_str()),
        "the start loads the saved memory state"
    );
    assert!(
        world.state.load_state.is_none(),
        "once running, later starts boot"
    );
}

#[test]
fn a_rollback_to_a_live_snapshot_boots() {
    let mut world = World::new(vm_config("1"));
    world.config(with_mode(
        vm_config("1"),
        1,
        cairn_types::SnapshotMode::Live,
    ));
    world.input(live_answer(&world, 3, true));
    world.settle();
    let mut rollback = with_mode(vm_config("1"), 1, cairn_types::SnapshotMode::Live);
    rollback.snapshot.active_snapshot = id(1).to_string();
    rollback.snapshot.rollback_cmd.counter = 1;
    world.input(Input::Config(rollback));
    let mut loads = Vec::new();
    while let Some(input) = world.inbox.pop_front() {
        world.input(input);
        loads.push(cairn_app_manager::live::load_state_tag(&world.state));
    }
    assert!(
        loads.iter().all(String::is_empty),
        "disk state only: {loads:?}"
    );
}

#[test]
fn a_scheduled_snapshot_runs_the_hooks_with_its_name() {
    let c = hooked(scheduled_config("0 * * * *", "UTC"));
    let mut world = World::new(c);
    world.take_log();
    let new_id = world.tick_at(at("2026-01-01T01:00:00Z"));
    let log = world.take_log();
    assert_eq!(kinds(&log), ["pre-hook"]);
    let pre = &hook_requests(&log)[0];
    assert_eq!(
        (
            pre.snapshot,
            pre.snapshot_name.as_str(),
            pre.app_name.as_str()
        ),
        (new_id, "auto-20260101-0100-1-sensor", "sensor")
    );
    hook_ends(&mut world, HookKind::Pre, None);
    hook_ends(&mut world, HookKind::Post, None);
    assert_eq!(
        world.state.snapshot(new_id).map(|s| s.state),
        Some(SnapshotState::Available)
    );
    assert!(world.domain_active);
}

#[test]
fn the_post_hook_of_a_live_vm_snapshot_waits_until_the_snapshot_is_recorded() {
    let mut c = hooked(config("1"));
    c.domain = Some(cairn_types::DomainSpec::Vm(Default::default()));
    let mut world = World::new(c.clone());
    world.take_log();
    let mut live = with_snapshot(c, 1, SnapshotType::Immediate);
    live.snapshot.snapshots[0].mode = cairn_types::SnapshotMode::Live;
    world.config(live);
    assert_eq!(kinds(&world.take_log()), ["pre-hook"]);
    hook_ends(&mut world, HookKind::Pre, None);
    // The domain-manager snapshots the running VM: no stop, and no thaw yet.
    let log = world.take_log();
    assert!(kinds(&log).is_empty(), "{log:#?}\n{:#?}", world.state.phase);
    assert!(world.domain_active);
    let request = world.state.live.as_ref().unwrap().request;
    world.input(Input::LiveOpResult(
        cairn_types::domain::DomainLiveOpStatus {
            request_id: request,
            app_uuid: world.state.app,
            state: cairn_types::domain::DomainLiveOpState::Done,
            ..Default::default()
        },
    ));
    world.settle();
    let log = world.take_log();
    assert_eq!(kinds(&log), ["create", "write-files", "post-hook"]);
    assert_eq!(hook_requests(&log)[0].outcome, Some(SnapshotOutcome::Taken));
    hook_ends(&mut world, HookKind::Post, None);
    assert_eq!(world.state_of(1), Some(SnapshotState::Available));
    assert!(world.domain_active);
}

#[test]
fn a_guest_agent_vm_is_frozen_for_a_live_snapshot_only_and_thawed_after_it() {
    let vm = cairn_types::DomainSpec::Vm(cairn_types::VmSpec {
        guest_agent: true,
        ..Default::default()
    });
    let mut c = config("1");
    c.domain = Some(vm);
    let mut world = World::new(c.clone());
    world.take_log();
    // Stopped: no freeze (the shutdown flushes; a frozen guest could not shut down), and no
    // hooks configured: nothing runs.
    world.config(with_snapshot(c.clone(), 1, SnapshotType::Immediate));
    assert_eq!(
        kinds(&world.take_log()),
        ["stop", "create", "write-files", "start"]
    );
    // Live: the freeze is the pre step, the thaw the post step.
    let mut live = with_snapshot(
        with_snapshot(c.clone(), 1, SnapshotType::Immediate),
        2,
        SnapshotType::Immediate,
    );
    live.snapshot.snapshots[1].mode = cairn_types::SnapshotMode::Live;
    world.config(live.clone());
    let log = world.take_log();
    assert_eq!(kinds(&log), ["pre-hook"]);
    let pre = &hook_requests(&log)[0];
    assert!(pre.guest && pre.argv.is_empty());
    hook_ends(&mut world, HookKind::Pre, None);
    let request = world.state.live.as_ref().unwrap().request;
    world.input(Input::LiveOpResult(
        cairn_types::domain::DomainLiveOpStatus {
            request_id: request,
            app_uuid: world.state.app,
            state: cairn_types::domain::DomainLiveOpState::Done,
            ..Default::default()
        },
    ));
    world.settle();
    let log = world.take_log();
    assert_eq!(kinds(&log), ["create", "write-files", "post-hook"]);
    assert!(hook_requests(&log)[0].guest);
    hook_ends(&mut world, HookKind::Post, None);
    // A freeze that fails fails the snapshot; the executor undid it, so no thaw is asked.
    live.snapshot.snapshots.push(SnapshotDesc {
        snapshot_id: id(3),
        snapshot_type: SnapshotType::Immediate,
        mode: cairn_types::SnapshotMode::Live,
        ..Default::default()
    });
    world.config(live);
    hook_ends(
        &mut world,
        HookKind::Pre,
        Some("guest fsfreeze failed: no guest agent answered within 2s on x"),
    );
    assert_eq!(world.state_of(3), Some(SnapshotState::Failed));
    assert!(
        world.state.quiesced.is_empty(),
        "{:?}",
        world.state.quiesced
    );
    assert!(world.domain_active);
}

#[test]
fn a_scheduled_snapshot_is_taken_in_the_policy_mode() {
    let (mut world, _) = hourly_world(|p| p.mode = cairn_types::SnapshotMode::Live);
    let id = world.tick_at(at("2026-01-01T01:00:00Z"));
    let record = world.state.snapshot(id).unwrap();
    assert_eq!(record.desc.mode, cairn_types::SnapshotMode::Live);
    assert_eq!(record.state, SnapshotState::Available);
    // Live on a process app: straight to the volume-manager, the app never stopped.
    assert_eq!(world.stops(), 0);
}

#[test]
fn a_post_hook_warning_is_about_the_latest_snapshot_only() {
    let mut world = World::new(hooked(config("1")));
    let mut c = hooked(config("1"));
    let post_warnings = |world: &World| {
        world
            .state
            .warnings
            .iter()
            .filter(|w| w.contains("post hook"))
            .cloned()
            .collect::<Vec<_>>()
    };
    for (n, failure) in [
        (1, Some("post hook x failed: exit 1")),
        (2, Some("post hook x failed: exit 2")),
        (3, None),
    ] {
        c = with_snapshot(c, n, SnapshotType::Immediate);
        world.config(c.clone());
        hook_ends(&mut world, HookKind::Pre, None);
        hook_ends(&mut world, HookKind::Post, failure);
        let warnings = post_warnings(&world);
        match failure {
            Some(reason) => {
                assert_eq!(warnings.len(), 1, "{warnings:?}");
                assert!(warnings[0].contains(reason) && warnings[0].contains(&id(n).to_string()));
            }
            None => assert!(warnings.is_empty(), "{warnings:?}"),
        }
    }
}

/// Every config a state holds: the controller's, a rollback's, the running one, its snapshots'.
fn configs_of(state: &AppState) -> Vec<&SharedConfig> {
    [
        Some(&state.controller),
        state.local.as_ref(),
        state.running.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(state.snapshots.iter().filter_map(|s| s.config.as_ref()))
    .collect()
}

/// A state as a build that kept a copy of the config per holder wrote it: nothing shared.
fn unshared(mut state: AppState) -> AppState {
    fn copy(c: &SharedConfig) -> SharedConfig {
        SharedConfig::new(AppInstanceConfig::clone(c))
    }
    state.controller = copy(&state.controller);
    state.local = state.local.as_ref().map(copy);
    state.running = state.running.as_ref().map(copy);
    for s in &mut state.snapshots {
        s.config = s.config.as_ref().map(copy);
    }
    state
}

#[test]
fn equal_configs_of_a_loaded_state_are_one_and_written_as_before() {
    let mut world = World::new(config("1"));
    let mut listed = config("1");
    for n in 1..=3 {
        listed = with_snapshot(listed, n, SnapshotType::Immediate);
    }
    world.config(listed);
    world.settle();
    let state = unshared(world.state.clone());
    let bytes = cairn_persist::encode(&state).unwrap();

    let loaded = sharing(|| cairn_persist::decode::<AppState>(&bytes))
        .unwrap()
        .record;
    assert_eq!(loaded, state);
    assert_eq!(
        cairn_persist::encode(&loaded).unwrap(),
        bytes,
        "the file is written as before"
    );
    let configs = configs_of(&loaded);
    assert_eq!(configs.len(), 5, "controller, running, three snapshots");
    let mut shared = 0;
    for (i, a) in configs.iter().enumerate() {
        for b in &configs[i + 1..] {
            assert_eq!(
                ***a == ***b,
                a.ptr_eq(b),
                "equal configs are one, others apart"
            );
            shared += usize::from(a.ptr_eq(b));
        }
    }
    assert!(shared > 0, "some configs are equal: {configs:?}");

    // Outside a load nothing is kept between decodings.
    let again = cairn_persist::decode::<AppState>(&bytes).unwrap().record;
    assert!(!again.controller.ptr_eq(&loaded.controller));
}

#[test]
fn a_mistyped_field_of_a_snapshots_config_is_named_by_its_path() {
    let mut world = World::new(config("1"));
    world.config(with_snapshot(config("1"), 1, SnapshotType::Immediate));
    let mut value = serde_json::to_value(&world.state).unwrap();
    value["snapshots"][0]["config"]["DisplayName"] = serde_json::json!(7);
    let error = sharing(|| cairn_persist::deserialize_value::<AppState>(value)).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("snapshots[0].config") && text.contains("DisplayName"),
        "{text}"
    );
}

#[test]
fn each_available_scheduled_snapshot_asks_for_its_export_when_the_policy_names_a_remote() {
    let (mut world, _) = hourly_world(|p| {
        p.export = Some(cairn_types::ScheduledExport {
            remote: "backups".into(),
            prefix: "site-a".into(),
            full_every: 3,
            keep_exports: 5,
        });
    });
    assert!(cairn_app_manager::machine::scheduled_exports(&world.state).is_empty());
    let first = world.tick_at(at("2026-01-01T01:00:00Z"));
    let second = world.tick_at(at("2026-01-01T02:00:00Z"));
    let asked = cairn_app_manager::machine::scheduled_exports(&world.state);
    let snapshots: Vec<Uuid> = asked.iter().map(|c| c.snapshot_id).collect();
    assert_eq!(snapshots, [first, second]);
    let request = &asked[1];
    assert_eq!(
        request.job_id,
        cairn_types::ScheduledExport::job_id(second),
        "the same job whoever asks again"
    );
    assert_eq!(request.app_uuid, id(APP));
    assert_eq!(
        (request.remote.as_str(), request.remote_prefix.as_str()),
        ("backups", "site-a")
    );
    assert!(request.incremental && request.once);
    assert_eq!((request.full_every, request.keep_exports), (3, 5));

    // A snapshot asked for by the config is not the schedule's to export.
    let mut c = (*world.state.controller).clone();
    c = with_snapshot(c, 7, SnapshotType::Immediate);
    world.input(Input::Config(c));
    assert_eq!(
        cairn_app_manager::machine::scheduled_exports(&world.state).len(),
        2
    );
    // Every export full: not incremental.
    let (mut world, _) = hourly_world(|p| {
        p.export = Some(cairn_types::ScheduledExport {
            remote: "backups".into(),
            full_every: 1,
            ..Default::default()
        });
    });
    world.tick_at(at("2026-01-01T01:00:00Z"));
    let asked = cairn_app_manager::machine::scheduled_exports(&world.state);
    assert!(!asked[0].incremental);
    // No export in the policy: nothing asked.
    let (mut world, _) = hourly_world(|_| {});
    world.tick_at(at("2026-01-01T01:00:00Z"));
    assert!(cairn_app_manager::machine::scheduled_exports(&world.state).is_empty());
}

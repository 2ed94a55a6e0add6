//! The app's state as persisted (`<persist>/app-manager/apps/<uuid>.json`), the inputs that
//! change it and the actions a step asks for: the nouns of [`super::step`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cairn_persist::Persist;
use cairn_types::policy::{ConsistencyGroup, SnapshotPolicy};
use cairn_types::{
    AppInstanceConfig, SnapshotDesc, UUIDandVersion, VolumesSnapshotAction, VolumesSnapshotConfig,
    VolumesSnapshotStatus,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::shared::SharedConfig;
use super::{Failure, HookKind, HookRequest, QuiesceStage, Which, volume_keys};

/// Where a snapshot stands. Each snapshot the app-manager knows is in exactly one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum SnapshotState {
    /// In the config, not taken yet (APP_UPDATE waits for the next upgrade or purge).
    Requested,
    /// Taking it: queued or in progress at the volume-manager.
    Triggered,
    Available,
    /// To be deleted at the next deactivation of the app.
    PendingDeletion,
    /// A deletion failed; retried at the next deactivation, reported with its error.
    DeletionFailed,
    /// Taking it failed; the error says why. Nothing of it is left on the volumes.
    Failed,
    /// Refused because `max_snapshots` was reached.
    Dropped,
}

/// One snapshot of the app, as the app-manager tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Persist)]
pub struct SnapshotRecord {
    #[persist(mandatory)]
    pub desc: SnapshotDesc,
    #[persist(mandatory)]
    pub state: SnapshotState,
    pub time_triggered: Option<DateTime<Utc>>,
    pub time_created: Option<DateTime<Utc>>,
    /// The config the snapshot belongs to: what a rollback restores.
    pub config: Option<SharedConfig>,
    pub error: Option<String>,
    /// Device-originated: taken by the app's schedule, not listed by the controller. Its
    /// expiry and the retention delete it, never its absence from the controller's list.
    /// Absent in states written before schedules existed.
    #[serde(default)]
    pub scheduled: bool,
    /// Scheduled snapshots: the due time they stand for (every member of a group takes the
    /// same one). Absent in states written before it existed.
    #[serde(default)]
    pub due: Option<DateTime<Utc>>,
}

impl SnapshotRecord {
    pub fn id(&self) -> Uuid {
        self.desc.snapshot_id
    }

    /// When this snapshot expires: its own `expiry_seconds`, else (scheduled ones only) the
    /// policy's. `None`: never, or not taken yet.
    pub fn expires_at(&self, policy: Option<&SnapshotPolicy>) -> Option<DateTime<Utc>> {
        // A group's scheduled snapshot: `policy` is the group's (see `AppState::policy_for`).
        let seconds = match self.desc.expiry_seconds {
            0 if self.scheduled => policy.map_or(0, |p| p.expiry_seconds),
            own => own,
        };
        if seconds == 0 {
            return None;
        }
        let seconds = i64::try_from(seconds).ok()?;
        self.time_created?
            .checked_add_signed(chrono::TimeDelta::try_seconds(seconds)?)
    }

    /// Counts against `max_snapshots`.
    pub(super) fn counts(&self) -> bool {
        matches!(
            self.state,
            SnapshotState::Requested | SnapshotState::Triggered | SnapshotState::Available
        )
    }
}

/// A volume operation; runs only while the domain is inactive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum Step {
    Create(Uuid),
    Delete(Uuid),
    Rollback(Uuid),
}

impl Step {
    pub(super) fn snapshot(self) -> Uuid {
        match self {
            Step::Create(id) | Step::Delete(id) | Step::Rollback(id) => id,
        }
    }

    pub(super) fn action(self) -> VolumesSnapshotAction {
        match self {
            Step::Create(_) => VolumesSnapshotAction::Create,
            Step::Delete(_) => VolumesSnapshotAction::Delete,
            Step::Rollback(_) => VolumesSnapshotAction::Rollback,
        }
    }
}

/// What the app is doing now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Persist)]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// Asked the domain to stop; waiting for it to be inactive.
    Stopping,
    /// Waiting for the volume-manager's answer to `step`, asked with `counter`.
    Volume { step: Step, counter: u64 },
    /// Asked the domain to start; waiting for it to be active.
    Starting,
    /// A step of a consistency group's snapshot (its create, or a rollback to it), domain
    /// inactive: waiting for the other members. `done: false`: at the first barrier, until every
    /// member is stopped ([`Input::GroupGo`]); `done: true`: the step succeeded, at the second
    /// barrier, until every member's has ([`Input::GroupDone`]) or the group failed
    /// ([`Input::GroupAbort`]). The domain stays down meanwhile.
    Group { step: Step, done: bool },
    /// A quiesce hook of `snapshot` runs on the device ([`quiesce`]): waiting for its
    /// end ([`Input::Hook`] with `counter`). The domain stays as it is meanwhile.
    Hook {
        snapshot: Uuid,
        kind: HookKind,
        counter: u64,
    },
}

/// A volume's local generation: `local` counts the bare purges of the controller's
/// `generation` of it (a new controller generation starts again at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub struct LocalGeneration {
    pub generation: i64,
    pub local: i64,
}

/// How far the policy's schedule has run. Persisted with the app's state, so due
/// times survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub struct ScheduleState {
    /// The schedule (`<expression> @ <zone>`) the due times are counted for; a different one
    /// starts counting afresh. Empty: no schedule.
    pub key: String,
    /// Due times up to this instant are handled (taken, or skipped); the next one is the
    /// schedule's first due time after it. `None`: not counting.
    pub last_due: Option<DateTime<Utc>>,
    /// Scheduled snapshots taken so far: `%n` in their names.
    pub counter: u64,
}

/// Everything the app-manager must remember about one app across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Persist)]
#[persist(record = "AppManagerState", version = 1)]
pub struct AppState {
    #[persist(mandatory)]
    pub app: Uuid,
    /// The controller's latest config.
    #[persist(mandatory)]
    pub controller: SharedConfig,
    /// A rollback's config, in force instead of the controller's while the controller still
    /// sends the version `local_over`.
    pub local: Option<SharedConfig>,
    pub local_over: Option<String>,
    /// The config the domain was last started with: "the config in use".
    pub running: Option<SharedConfig>,
    pub domain_active: bool,
    pub volumes_ready: bool,
    /// In the order they were requested.
    pub snapshots: Vec<SnapshotRecord>,
    pub phase: Phase,
    /// Volume steps waiting for the domain to be inactive.
    pub steps: VecDeque<Step>,
    /// Stop the domain (and start it again if the config says so) even with no steps queued.
    pub restart_wanted: bool,
    pub handled_rollback: u32,
    pub handled_restart: u32,
    pub handled_purge: u32,
    pub request_counter: u64,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    /// Per volume id, the local generation bare purges gave it; stamped on the controller's
    /// volume refs as `LocalGenerationCounter`. Absent in states written before it existed.
    #[serde(default)]
    pub local_generations: BTreeMap<Uuid, LocalGeneration>,
    /// The snapshot policy's schedule. Absent in states written before schedules existed.
    #[serde(default)]
    pub schedule: ScheduleState,
    /// The schedule of the app's consistency group, counted by every member alike.
    #[serde(default)]
    pub group_schedule: ScheduleState,
    /// Controller-listed snapshots deleted by their own expiry while the config still lists
    /// them: not requested (taken) again. Forgotten once the config drops them.
    #[serde(default)]
    pub expired: BTreeSet<Uuid>,
    /// The live or stateful create in progress (see [`crate::live`]).
    #[serde(default)]
    pub live: Option<crate::live::LiveStep>,
    /// Pause time and saved memory of each live or stateful snapshot taken.
    #[serde(default)]
    pub live_snapshots: BTreeMap<Uuid, crate::live::LiveRecord>,
    /// Start the domain by loading this snapshot's memory state (a rollback to a
    /// stateful snapshot), until it runs.
    #[serde(default)]
    pub load_state: Option<Uuid>,
    /// Snapshots past their `pre` hook point whose `post` hook is still owed.
    #[serde(default)]
    pub quiesced: BTreeMap<Uuid, QuiesceStage>,
    /// The last unasked end or failed start of the domain, and whether it holds
    /// the next start ([`restart`]).
    #[serde(default)]
    pub failure: Option<Failure>,
    /// Starts made by the restart policy; part of the domain's restart counter.
    #[serde(default)]
    pub restarts: u32,
    /// When the domain was last seen running after a start.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When this boot's first config was in hand: the app's start delay counts from it
    /// ([`super::delay`]). Given anew by the executor at each start-up.
    #[serde(default)]
    pub boot_ready_at: Option<DateTime<Utc>>,
    /// The start waits for the app's start delay until then (START_DELAYED).
    #[serde(default)]
    pub start_delayed_until: Option<DateTime<Utc>>,
}

// One input lives at a time, moved straight into `step`: its size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The controller's config for this app, new or changed.
    Config(AppInstanceConfig),
    /// The domain settled: active (running) or inactive (halted).
    Domain {
        active: bool,
    },
    /// The domain ended without being asked to, or could not be started: the
    /// generation it had (version, restart counter), why, and whether it exited cleanly.
    DomainBroken {
        version: String,
        restart_counter: u32,
        reason: String,
        clean_exit: bool,
    },
    /// The executor cannot even ask for the domain (the config has nothing to run): the app
    /// cannot start until its config changes.
    CannotStart {
        reason: String,
    },
    /// Whether every volume the effective config refers to is ready.
    Volumes {
        ready: bool,
    },
    VolumesResult(VolumesSnapshotStatus),
    /// The app-manager restarted with this state: re-issue what the current phase waits for.
    Resume,
    /// When this boot's first config was in hand (the start delay's base); fed at every
    /// start-up before [`Input::Resume`], and to a new app before its first config.
    Boot {
        ready_at: DateTime<Utc>,
    },
    /// A complete snapshot found on disk at start that this state does not track: EVE's
    /// records, or ones left behind by a lost state file. Its volume record is complete.
    Import(Box<FoundSnapshot>),
    /// The clock reached [`next_wakeup`]: apply expiry, and take a scheduled snapshot if one is
    /// due, as `new_id` (a fresh v4 UUID from the executor; unused when nothing is due).
    Tick {
        new_id: Uuid,
    },
    /// Consistency groups: every member is stopped at the first barrier; take (or roll back)
    /// now. A create records `at` as its time: one logical time for the whole group.
    GroupGo {
        at: DateTime<Utc>,
    },
    /// Every member's step succeeded: the group snapshot is available (or the rollback done);
    /// start again.
    GroupDone,
    /// The group snapshot `snapshot` of this app failed at some member: it is Failed with
    /// `reason`, and deleted from the volumes if it was taken already.
    GroupAbort {
        snapshot: Uuid,
        reason: String,
    },
    /// The domain-manager's answer to a live operation.
    LiveOpResult(cairn_types::domain::DomainLiveOpStatus),
    /// A quiesce hook the executor ran for `snapshot` ended: `failure` says why it failed
    /// (exit status, timeout, not runnable, with its last output), `None` if it succeeded.
    Hook {
        snapshot: Uuid,
        kind: HookKind,
        counter: u64,
        failure: Option<String>,
        /// Something the app's status should say although the hook succeeded (a guest
        /// freeze given up on, as configured).
        note: Option<String>,
    },
}

/// A snapshot's records as found under `/persist/snapshots/<id>/`.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSnapshot {
    pub desc: SnapshotDesc,
    /// `appInstanceConfig.json`: what a rollback to it restores.
    pub config: AppInstanceConfig,
    pub time_triggered: Option<DateTime<Utc>>,
    pub time_created: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write the state durably before carrying out the rest.
    Persist,
    /// Publish the app's DomainConfig.
    Domain {
        activate: bool,
        config: Box<AppInstanceConfig>,
    },
    /// Publish (again, even if equal) a request to the volume-manager.
    Volumes(VolumesSnapshotConfig),
    /// Write `appInstanceConfig.json` and `snapshotInstanceStatus.json` of an available snapshot.
    WriteSnapshot(Uuid),
    /// Remove `/persist/snapshots/<id>/`.
    RemoveSnapshot(Uuid),
    /// Publish the AppInstanceStatus.
    Status,
    /// Run a quiesce hook on the device and answer with [`Input::Hook`]; never blocks the
    /// machine's other apps.
    RunHook(Box<HookRequest>),
}

impl AppState {
    /// The state for an app first seen with `config`: counters already in the config are not
    /// requests (they were handled before this device knew the app).
    pub fn new(config: AppInstanceConfig) -> Self {
        Self {
            app: config.app_uuid(),
            handled_rollback: config.snapshot.rollback_cmd.counter,
            handled_restart: config.restart_cmd.counter,
            handled_purge: config.purge_cmd.counter,
            controller: SharedConfig::new(config),
            local: None,
            local_over: None,
            running: None,
            domain_active: false,
            volumes_ready: false,
            snapshots: Vec::new(),
            phase: Phase::Idle,
            steps: VecDeque::new(),
            restart_wanted: false,
            request_counter: 0,
            warnings: Vec::new(),
            error: None,
            local_generations: BTreeMap::new(),
            schedule: ScheduleState::default(),
            group_schedule: ScheduleState::default(),
            expired: BTreeSet::new(),
            live: None,
            live_snapshots: BTreeMap::new(),
            load_state: None,
            quiesced: BTreeMap::new(),
            failure: None,
            restarts: 0,
            started_at: None,
            boot_ready_at: None,
            start_delayed_until: None,
        }
    }

    /// The controller's snapshot policy (a rollback's config carries the same one).
    pub fn policy(&self) -> Option<&SnapshotPolicy> {
        self.controller.snapshot.policy.as_deref()
    }

    /// The consistency group the controller's config makes this app a member of.
    pub fn group(&self) -> Option<&ConsistencyGroup> {
        self.controller.group.as_deref()
    }

    /// The policy that governs `record`'s expiry: its group's for a group's scheduled
    /// snapshot, else the app's.
    pub fn policy_for(&self, record: &SnapshotRecord) -> Option<&SnapshotPolicy> {
        if record.scheduled && !record.desc.group_id.is_nil() {
            self.group().and_then(|g| g.policy.as_deref())
        } else {
            self.policy()
        }
    }

    pub(super) fn policy_of(&self, which: Which) -> Option<&SnapshotPolicy> {
        match which {
            Which::Own => self.policy(),
            Which::Group => self.group().and_then(|g| g.policy.as_deref()),
        }
    }

    pub(super) fn schedule_of(&self, which: Which) -> &ScheduleState {
        match which {
            Which::Own => &self.schedule,
            Which::Group => &self.group_schedule,
        }
    }

    pub(super) fn schedule_of_mut(&mut self, which: Which) -> &mut ScheduleState {
        match which {
            Which::Own => &mut self.schedule,
            Which::Group => &mut self.group_schedule,
        }
    }

    /// The config in force: a rollback's local config, else the controller's.
    pub fn effective(&self) -> &AppInstanceConfig {
        self.effective_shared()
    }

    /// [`Self::effective`], to share.
    pub fn effective_shared(&self) -> &SharedConfig {
        self.local.as_ref().unwrap_or(&self.controller)
    }

    /// The version the app reports: what it runs, else what it will run.
    pub fn version(&self) -> &UUIDandVersion {
        &self
            .running
            .as_deref()
            .unwrap_or_else(|| self.effective())
            .uuid_and_version
    }

    /// The domain request in force: what the last `Action::Domain` asked for, so that a
    /// restarted app-manager can publish it again. `None` before the app was ever started.
    pub fn domain_request(&self) -> Option<(bool, &AppInstanceConfig)> {
        let config = self.running.as_deref().unwrap_or_else(|| self.effective());
        // A live snapshot is taken while the domain runs.
        if self.live.is_some() && self.domain_active {
            return Some((true, config));
        }
        match self.phase {
            Phase::Stopping | Phase::Volume { .. } | Phase::Group { .. } => Some((false, config)),
            Phase::Starting => Some((true, config)),
            // Brought back after a reboot only once its start delay has passed.
            Phase::Idle if self.start_delayed_until.is_some() => Some((false, config)),
            Phase::Idle => self.running.as_deref().map(|running| (true, running)),
            // A hook runs beside the domain as it is: running (a `pre` before the stop), or
            // stopped for the snapshot.
            Phase::Hook { .. } if self.domain_active => {
                self.running.as_deref().map(|running| (true, running))
            }
            Phase::Hook { .. } => Some((false, config)),
        }
    }

    pub fn snapshot(&self, id: Uuid) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.id() == id)
    }

    /// The volume keys this app holds: the ones its domain was started on, the ones the config
    /// in force will start it on, and the ones of snapshots still to be taken or rolled back to.
    /// The volume-manager releases no volume an app holds, so an old generation outlives its
    /// config for as long as the app runs on it or a queued snapshot step needs it.
    pub fn volumes_in_use(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        if let Some(running) = &self.running {
            keys.extend(volume_keys(running));
        }
        if self.effective().activate {
            keys.extend(volume_keys(self.effective()));
        }
        for step in &self.steps {
            if let Step::Create(id) | Step::Rollback(id) = step
                && let Some(config) = self.snapshot(*id).and_then(|s| s.config.as_ref())
            {
                keys.extend(volume_keys(config));
            }
        }
        keys
    }

    pub(super) fn snapshot_mut(&mut self, id: Uuid) -> Option<&mut SnapshotRecord> {
        self.snapshots.iter_mut().find(|s| s.id() == id)
    }
}

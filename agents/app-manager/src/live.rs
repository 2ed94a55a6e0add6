//! Live and stateful snapshots: the part of the machine's decisions that takes a
//! snapshot without stopping the app, and rolls a VM back into its saved memory state.
//!
//! - A create whose snapshot asks for mode `live` or `stateful`, at the head of the queue while
//!   the domain runs, is not a reason to stop it. For a VM, the domain-manager first snapshots
//!   the qcow2 disks under the snapshot id's tag (`DiskSnapshotCreate`: the guest's CPUs are
//!   stopped only for the atomic transaction) or saves memory, devices and disks
//!   (`StateSave`); then the volume-manager is asked to record that snapshot (`live: true`: it
//!   reads the image's snapshot list and writes nothing, the VM holding the image). A process
//!   goes straight to the volume-manager, whose copy-on-write backends (btrfs, zfs) snapshot a
//!   running tree; it refuses the others, naming the volume and its backend. A container
//!   goes the same way, its cgroup named in the request (`freeze_cgroup`, set by the
//!   executor): the volume-manager freezes it around the snapshots and reports the pause.
//! - The step in progress is [`AppState::live`], persisted before anything acts on it. The
//!   executor publishes the domain request it names ([`live_request`]) after each step and
//!   after a restart; the domain-manager runs one request id at most once and keeps its
//!   answer, so asking again is safe.
//! - Pause times and whether memory was saved are kept per snapshot
//!   ([`AppState::live_snapshots`]) and reported in its status.
//! - A rollback to a snapshot whose memory was saved stops the VM, rolls the disks back as for
//!   any snapshot, then starts the VM loading that state ([`AppState::load_state`], which the
//!   executor puts in the `DomainConfig`), so it resumes where it was.
//! - Group snapshots keep their barriers: a grouped live snapshot is taken stopped.

use cairn_persist::Persist;
use cairn_types::domain::{
    DomainLiveOp, DomainLiveOpConfig, DomainLiveOpState, DomainLiveOpStatus,
};
use cairn_types::{AppInstanceConfig, DomainSpec, SnapshotMode, VolumesSnapshotStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::machine::{AppState, Phase, SnapshotState, Step, group_of};

/// Where a live create stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum LiveStage {
    /// The domain-manager runs `op` under request `request`.
    Domain,
    /// The domain-manager took it; the volume-manager is to record it.
    Record,
    /// The volume-manager records (VM) or takes (process) the snapshot: the machine is in
    /// [`Phase::Volume`] for its create.
    Volume,
}

/// The live create in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub struct LiveStep {
    #[persist(mandatory)]
    pub snapshot: Uuid,
    #[persist(mandatory)]
    pub stage: LiveStage,
    /// The domain request (`Uuid::nil()` for a process: no domain step).
    pub request: Uuid,
    pub op: DomainLiveOp,
}

/// What a live or stateful snapshot cost, reported in its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub struct LiveRecord {
    /// How long the guest's CPUs were stopped, in milliseconds.
    pub pause_ms: u64,
    /// The VM's memory and device state were saved with the disks: a rollback loads them.
    pub memory: bool,
}

/// Whether the config runs a VM.
fn is_vm(config: &AppInstanceConfig) -> bool {
    matches!(config.domain, Some(DomainSpec::Vm(_)))
}

/// The mode a snapshot asks for (stopped when unknown).
pub fn mode_of(state: &AppState, snapshot: Uuid) -> SnapshotMode {
    state
        .snapshot(snapshot)
        .map_or(SnapshotMode::Stopped, |s| s.desc.mode)
}

/// The tag the domain-manager snapshots under: the volume-manager's qcow2 snapshot name for
/// this snapshot id, so that it finds and records the same internal snapshot.
pub fn tag(snapshot: Uuid) -> String {
    snapshot.to_string()
}

/// What `advance` does about live creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing live: go on as usual.
    Usual,
    /// A live step waits for the domain-manager: no stop, no other step meanwhile.
    Wait,
    /// Ask the volume-manager for this step (`live` set).
    Volume(Step),
}

/// Called by `advance` when nothing else is in progress: goes on with the live create in
/// progress, if any.
pub fn go_on(state: &mut AppState) -> Next {
    let Some(live) = state.live.clone() else {
        return Next::Usual;
    };
    match live.stage {
        LiveStage::Domain => Next::Wait,
        LiveStage::Record | LiveStage::Volume => {
            if let Some(l) = state.live.as_mut() {
                l.stage = LiveStage::Volume;
            }
            Next::Volume(Step::Create(live.snapshot))
        }
    }
}

/// Called by `advance` while the domain runs, instead of stopping it: starts the live create
/// at the head of the queue, if that is what it is.
pub fn take(state: &mut AppState) -> Next {
    if state.live.is_some() || !state.domain_active || state.phase != Phase::Idle {
        return Next::Usual;
    }
    let Some(Step::Create(id)) = state.steps.front().copied() else {
        return Next::Usual;
    };
    let mode = mode_of(state, id);
    if mode == SnapshotMode::Stopped || group_of(state, Step::Create(id)).is_some() {
        return Next::Usual;
    }
    state.steps.pop_front();
    if state.running.as_deref().is_some_and(is_vm) {
        state.request_counter += 1;
        let op = if mode == SnapshotMode::Stateful {
            DomainLiveOp::StateSave
        } else {
            DomainLiveOp::DiskSnapshotCreate
        };
        let name = format!("{op:?}-{}", state.request_counter);
        state.live = Some(LiveStep {
            snapshot: id,
            stage: LiveStage::Domain,
            request: Uuid::new_v5(&id, name.as_bytes()),
            op,
        });
        Next::Wait
    } else {
        // A process: its volumes' backend takes the snapshot of the running tree.
        state.live = Some(LiveStep {
            snapshot: id,
            stage: LiveStage::Volume,
            request: Uuid::nil(),
            op: DomainLiveOp::DiskSnapshotCreate,
        });
        Next::Volume(Step::Create(id))
    }
}

/// Whether the volume request for `step` is the live one in progress.
pub fn is_live_step(state: &AppState, step: Step) -> bool {
    matches!(step, Step::Create(id) if state.live.as_ref().is_some_and(|l| l.snapshot == id && l.stage == LiveStage::Volume))
}

/// The domain-manager's answer to the live request in progress.
pub fn on_result(state: &mut AppState, result: DomainLiveOpStatus) {
    let Some(live) = state.live.clone() else {
        return;
    };
    if live.stage != LiveStage::Domain || result.request_id != live.request {
        return; // stale or repeated
    }
    match result.state {
        DomainLiveOpState::InProgress => {}
        DomainLiveOpState::Done => {
            state.live_snapshots.insert(
                live.snapshot,
                LiveRecord {
                    pause_ms: result.pause_ms,
                    memory: live.op == DomainLiveOp::StateSave,
                },
            );
            state.live = Some(LiveStep {
                stage: LiveStage::Record,
                ..live
            });
        }
        DomainLiveOpState::Failed => {
            state.live = None;
            if let Some(record) = state.snapshots.iter_mut().find(|s| s.id() == live.snapshot) {
                record.state = SnapshotState::Failed;
                record.error = Some(format!(
                    "{} snapshot {} not taken: {}",
                    if live.op == DomainLiveOp::StateSave {
                        "stateful"
                    } else {
                        "live"
                    },
                    live.snapshot,
                    result.error.error
                ));
            }
        }
    }
}

/// The volume-manager took the live step's snapshot: the time it kept a container frozen for
/// it is that snapshot's pause (a process is not paused, a VM's pause came from its domain).
pub fn volumes_taken(state: &mut AppState, step: Step, result: &VolumesSnapshotStatus) {
    if result.pause_ms > 0
        && let Step::Create(id) = step
        && is_live_step(state, step)
    {
        state.live_snapshots.insert(
            id,
            LiveRecord {
                pause_ms: result.pause_ms,
                memory: false,
            },
        );
    }
}

/// After each input: a live step whose volume answer came is over; a load-state request is
/// over once the domain runs; records of snapshots no longer tracked are dropped.
pub fn settle(state: &mut AppState) {
    if let Some(live) = &state.live
        && live.stage == LiveStage::Volume
    {
        let waiting = matches!(state.phase, Phase::Volume { step, .. } if step == Step::Create(live.snapshot));
        if !waiting {
            state.live = None;
        }
    }
    if state.load_state.is_some()
        && state.domain_active
        && matches!(state.phase, Phase::Idle | Phase::Starting)
    {
        state.load_state = None;
    }
    let known: Vec<Uuid> = state.snapshots.iter().map(|s| s.id()).collect();
    state.live_snapshots.retain(|id, _| known.contains(id));
}

/// A rollback to `snapshot` succeeded on the volumes: if its memory was saved, the next start
/// loads it.
pub fn rolled_back(state: &mut AppState, snapshot: Uuid) {
    let memory = state
        .live_snapshots
        .get(&snapshot)
        .is_some_and(|r| r.memory);
    state.load_state = memory.then_some(snapshot);
}

/// The domain request the live step in progress needs, if any: the executor publishes it
/// (again after a restart) and withdraws the others.
pub fn live_request(state: &AppState) -> Option<DomainLiveOpConfig> {
    let live = state.live.as_ref()?;
    (live.stage == LiveStage::Domain).then(|| DomainLiveOpConfig {
        request_id: live.request,
        app_uuid: state.app,
        op: live.op,
        tag: tag(live.snapshot),
    })
}

/// The tag a start must load memory state from (empty: boot).
pub fn load_state_tag(state: &AppState) -> String {
    state.load_state.map(tag).unwrap_or_default()
}

/// The pause time reported for a snapshot.
pub fn pause_ms(state: &AppState, snapshot: Uuid) -> u64 {
    state
        .live_snapshots
        .get(&snapshot)
        .map_or(0, |r| r.pause_ms)
}

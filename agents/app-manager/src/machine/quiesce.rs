//! Quiesce hooks: the app's `pre` command runs before a snapshot of it is taken and
//! its `post` command after, on the device, carried out by the executor ([`crate::hooks`]).
//!
//! - `pre` runs right before the stop when the snapshot stops the app (so the app can still
//!   flush), else right before the volume request. It runs once per snapshot: a snapshot whose
//!   `pre` succeeded is *frozen* ([`QuiesceStage::Frozen`]) until it is taken or fails.
//! - A failing `pre` (non-zero exit, timeout, command not found) fails the snapshot before
//!   anything is asked of the volumes; the app keeps running (or starts again).
//! - `post` runs once the snapshot is settled (taken, failed, or its group done), before the
//!   app starts again, whenever a `pre` ran or would have: like a thaw, it is never skipped. A
//!   failing `post` leaves the snapshot as it is and becomes a warning of the app.
//! - A hook in progress is a [`Phase::Hook`], persisted before the executor runs it. After a
//!   restart a `pre` that was interrupted fails its snapshot (it may have half-run, and the
//!   machine does not know whether the app is quiesced), then `post` runs; an interrupted
//!   `post` runs again. Hooks should therefore tolerate running twice.
//! - A VM whose spec says `guest_agent` has its filesystems frozen through qemu-guest-agent for
//!   a live or stateful snapshot (a stopped one needs none, and a frozen guest could not shut
//!   down): after `pre`, as part of the same step, and thawed before `post`. A freeze that
//!   fails fails the snapshot like a failing `pre`, unless `proceed_without_guest_agent` (then
//!   it is a warning, and nothing is thawed).
//! - The hooks of the config in force apply; a hook's latest failure is one warning of the
//!   app, replaced by the next snapshot's outcome.

use cairn_persist::Persist;
use cairn_types::app::QuiesceHooks;
use cairn_types::{DomainSpec, SnapshotMode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Action, AppState, Phase, SnapshotState, Step};

/// Which of an app's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum HookKind {
    Pre,
    Post,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Pre => "pre",
            HookKind::Post => "post",
        }
    }
}

/// How a snapshot ended, as its `post` hook is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum SnapshotOutcome {
    Taken,
    Failed,
}

impl SnapshotOutcome {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotOutcome::Taken => "taken",
            SnapshotOutcome::Failed => "failed",
        }
    }
}

/// Where a snapshot's hooks stand, once its `pre` point has passed. `guest`: the guest's
/// filesystems were frozen (or may be), so the `post` step thaws them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Persist)]
pub enum QuiesceStage {
    /// `pre` succeeded (or there is none): the snapshot may be taken; `post` is owed.
    Frozen { guest: bool },
    /// The snapshot is settled: `post` is due, told the outcome.
    Thaw {
        outcome: SnapshotOutcome,
        guest: bool,
    },
}

/// What the executor runs: one hook of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRequest {
    pub app: Uuid,
    pub app_name: String,
    pub snapshot: Uuid,
    pub snapshot_name: String,
    pub kind: HookKind,
    /// Answered with the same counter ([`super::Input::Hook`]).
    pub counter: u64,
    pub argv: Vec<String>,
    pub timeout_seconds: u32,
    /// `post` only.
    pub outcome: Option<SnapshotOutcome>,
    /// The volume keys of the snapshot's config, for the hook's environment.
    pub volume_keys: Vec<String>,
    /// Freeze (`pre`, after the command) or thaw (`post`, before it) the guest's filesystems
    /// through its guest agent.
    pub guest: bool,
    /// A freeze that fails does not fail the snapshot (it is taken without, with a note).
    pub proceed_without_guest_agent: bool,
}

/// The hooks that apply to a snapshot: those of the config in force now, not of the config
/// the snapshot records (the one the app was started with), so that hooks added or fixed
/// with the snapshot request apply to it without restarting the app.
fn hooks_of(state: &AppState, _snapshot: Uuid) -> Option<&QuiesceHooks> {
    state.effective().quiesce.as_ref().filter(|h| !h.is_empty())
}

/// Whether snapshot `id` freezes the guest: a live or stateful snapshot (not in a group: those
/// are taken stopped) of a running VM whose guest runs an agent.
fn guest_freeze(state: &AppState, id: Uuid) -> bool {
    let agent = matches!(&state.effective().domain, Some(DomainSpec::Vm(vm)) if vm.guest_agent);
    agent
        && state.domain_active
        && crate::live::mode_of(state, id) != SnapshotMode::Stopped
        && super::group_of(state, Step::Create(id)).is_none()
}

/// A snapshot is still to be taken: triggered, and its create queued or in progress (at the
/// volume-manager, at a group barrier, or a live create at the domain-manager).
fn pending(state: &AppState, id: Uuid) -> bool {
    let create = Step::Create(id);
    let in_progress = match state.phase {
        Phase::Volume { step, .. } | Phase::Group { step, .. } => step == create,
        _ => false,
    } || state.live.as_ref().is_some_and(|l| l.snapshot == id);
    state
        .snapshot(id)
        .is_some_and(|s| s.state == SnapshotState::Triggered)
        && (in_progress || state.steps.contains(&create))
}

/// The executor's request for `kind` of `snapshot`, with a new counter; sets the phase.
fn run_hook(state: &mut AppState, snapshot: Uuid, kind: HookKind, actions: &mut Vec<Action>) {
    state.request_counter += 1;
    state.phase = Phase::Hook {
        snapshot,
        kind,
        counter: state.request_counter,
    };
    if let Some(request) = hook_request(state) {
        actions.push(Action::RunHook(Box::new(request)));
    }
}

/// The request of the hook the phase waits for.
pub(super) fn hook_request(state: &AppState) -> Option<HookRequest> {
    let Phase::Hook {
        snapshot,
        kind,
        counter,
    } = state.phase
    else {
        return None;
    };
    // The block's options count even when it names no command (a guest agent's timeout).
    let hooks = state.effective().quiesce.clone().unwrap_or_default();
    let config = state
        .snapshot(snapshot)
        .and_then(|s| s.config.as_deref())
        .unwrap_or_else(|| state.effective());
    let (outcome, thaw_guest) = match state.quiesced.get(&snapshot) {
        Some(QuiesceStage::Thaw { outcome, guest }) => (Some(*outcome), *guest),
        _ => (None, false),
    };
    Some(HookRequest {
        app: state.app,
        app_name: state.effective().display_name.clone(),
        snapshot,
        snapshot_name: state
            .snapshot(snapshot)
            .map(|s| s.desc.name.clone())
            .unwrap_or_default(),
        kind,
        counter,
        argv: match kind {
            HookKind::Pre => hooks.pre.clone(),
            HookKind::Post => hooks.post.clone(),
        },
        timeout_seconds: hooks.timeout_seconds(),
        outcome: (kind == HookKind::Post).then(|| outcome.unwrap_or(SnapshotOutcome::Failed)),
        volume_keys: config
            .volume_ref_config_list
            .iter()
            .map(super::ref_key)
            .collect(),
        guest: match kind {
            HookKind::Pre => guest_freeze(state, snapshot),
            HookKind::Post => thaw_guest,
        },
        proceed_without_guest_agent: hooks.proceed_without_guest_agent,
    })
}

/// Frozen snapshots that are settled owe their `post`; the first one due runs now. Returns
/// whether a hook was started (the caller waits for it).
pub(super) fn thaw(state: &mut AppState, actions: &mut Vec<Action>) -> bool {
    let frozen: Vec<(Uuid, bool)> = state
        .quiesced
        .iter()
        .filter_map(|(id, stage)| match stage {
            QuiesceStage::Frozen { guest } => Some((*id, *guest)),
            QuiesceStage::Thaw { .. } => None,
        })
        .collect();
    for (id, guest) in frozen {
        if pending(state, id) {
            continue;
        }
        let taken = state.snapshot(id).is_some_and(|s| {
            matches!(
                s.state,
                SnapshotState::Available | SnapshotState::PendingDeletion
            )
        });
        let outcome = if taken {
            SnapshotOutcome::Taken
        } else {
            SnapshotOutcome::Failed
        };
        state
            .quiesced
            .insert(id, QuiesceStage::Thaw { outcome, guest });
    }
    loop {
        let Some((id, guest)) = state.quiesced.iter().find_map(|(id, stage)| match stage {
            QuiesceStage::Thaw { guest, .. } => Some((*id, *guest)),
            QuiesceStage::Frozen { .. } => None,
        }) else {
            return false;
        };
        if guest || hooks_of(state, id).is_some_and(|h| !h.post.is_empty()) {
            run_hook(state, id, HookKind::Post, actions);
            return true;
        }
        state.quiesced.remove(&id);
    }
}

/// Before the volumes of snapshot `id` are asked for (or the app is stopped for it): its `pre`
/// runs, once. Returns whether a hook was started.
fn freeze(state: &mut AppState, id: Uuid, actions: &mut Vec<Action>) -> bool {
    if state.quiesced.contains_key(&id) || !pending(state, id) {
        return false;
    }
    let guest = guest_freeze(state, id);
    let pre = hooks_of(state, id).map(|h| !h.pre.is_empty());
    if !guest && pre != Some(true) {
        if pre.is_some() {
            // Nothing to run before; `post` is still owed after.
            state
                .quiesced
                .insert(id, QuiesceStage::Frozen { guest: false });
        }
        return false;
    }
    run_hook(state, id, HookKind::Pre, actions);
    true
}

/// The app runs and has work: the first snapshot to be taken runs its `pre` before the stop.
pub(super) fn freeze_before_stop(state: &mut AppState, actions: &mut Vec<Action>) -> bool {
    let first = state.steps.iter().find_map(|s| match s {
        Step::Create(id) => Some(*id),
        _ => None,
    });
    first.is_some_and(|id| freeze(state, id, actions))
}

/// The app is down and `step` is next: a create runs its `pre` first.
pub(super) fn freeze_before_step(
    state: &mut AppState,
    step: Step,
    actions: &mut Vec<Action>,
) -> bool {
    match step {
        Step::Create(id) => freeze(state, id, actions),
        _ => false,
    }
}

/// A hook ended: `failure` says why it failed, `None` if it succeeded.
pub(super) fn on_hook_result(
    state: &mut AppState,
    snapshot: Uuid,
    kind: HookKind,
    counter: u64,
    failure: Option<String>,
    note: Option<String>,
) {
    let waited = Phase::Hook {
        snapshot,
        kind,
        counter,
    };
    if state.phase != waited {
        return; // a stale answer (from before a restart)
    }
    state.phase = Phase::Idle;
    // The only note: a guest freeze given up on; nothing to thaw then.
    let frozen_guest = note.is_none();
    if kind == HookKind::Pre && failure.is_none() {
        warn(state, FREEZE_WARNING, snapshot, note);
    }
    match (kind, failure) {
        (HookKind::Pre, None) => {
            let guest = frozen_guest && guest_freeze(state, snapshot);
            state
                .quiesced
                .insert(snapshot, QuiesceStage::Frozen { guest });
        }
        // The executor undid a freeze it asked for and did not see done.
        (HookKind::Pre, Some(reason)) => fail_before_taking(state, snapshot, reason, false),
        (HookKind::Post, failure) => {
            state.quiesced.remove(&snapshot);
            let failure = failure.map(|reason| format!("{reason} (the snapshot is kept)"));
            warn(state, POST_WARNING, snapshot, failure);
        }
    }
}

const FREEZE_WARNING: &str = "quiesce (guest freeze)";
const POST_WARNING: &str = "quiesce (post hook)";

/// The app's warning of one kind (`what`) is about the latest snapshot only: replaced by the
/// next one's, dropped when the next one went well. A hook failing at every scheduled snapshot
/// so gives one warning, not one per snapshot.
fn warn(state: &mut AppState, what: &str, snapshot: Uuid, text: Option<String>) {
    let prefix = format!("{what}: ");
    state.warnings.retain(|w| !w.starts_with(&prefix));
    if let Some(text) = text {
        state
            .warnings
            .push(format!("{prefix}snapshot {snapshot}: {text}"));
    }
}

/// The snapshot fails before anything was asked of its volumes; `post` is still owed (and
/// thaws the guest when `guest`).
fn fail_before_taking(state: &mut AppState, snapshot: Uuid, reason: String, guest: bool) {
    let create = Step::Create(snapshot);
    state.steps.retain(|s| *s != create);
    if let Some(record) = state.snapshot_mut(snapshot) {
        record.state = SnapshotState::Failed;
        record.time_created = None;
        record.error = Some(reason);
    }
    state.quiesced.insert(
        snapshot,
        QuiesceStage::Thaw {
            outcome: SnapshotOutcome::Failed,
            guest,
        },
    );
}

/// After a restart: an interrupted `pre` fails its snapshot (then `post` runs); an interrupted
/// `post` is asked again by [`super::resume`].
pub(super) fn on_resume(state: &mut AppState) {
    if let Phase::Hook {
        snapshot,
        kind: HookKind::Pre,
        ..
    } = state.phase
    {
        state.phase = Phase::Idle;
        let command = hooks_of(state, snapshot)
            .map(|h| h.pre.join(" "))
            .unwrap_or_default();
        // The guest may have been frozen when the step was cut short: thaw it.
        let guest = guest_freeze(state, snapshot);
        fail_before_taking(
            state,
            snapshot,
            format!(
                "pre hook {command} was interrupted by a restart of the app-manager: the snapshot was not taken"
            ),
            guest,
        );
    }
}

//! The update the controller asks for (EVE's `BaseOS`, baseosmgr's `doBaseOsStatusUpdate`):
//! what to do next is a pure function of the request, its content tree, the record of what
//! was done before and the boot state ([`decide`]); the agent carries the action out.
//!
//! The record (`<persist>/baseos/update.json`) is written before each slot-changing action:
//! `installing` (with the boot state's sequence number) before the slot is written, `installed`
//! after the trial mark, `failed` with the reason. After a kill, an `installing` record whose
//! slot carries a trial mark newer than the record is finished without writing again (the mark
//! is the install's last step, made only after the slot read back right); otherwise the slot is
//! written again from its first byte.

use std::path::{Path, PathBuf};

use cairn_persist::Persist;
use cairn_types::{
    BaseOsConfig, BaseOsUpdateState, BaseOsUpdateStatus, ContentFormat, ContentTreeState,
    ContentTreeStatus, ErrorDescription, ErrorEntityType, ErrorSeverity,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bootstate::{BootState, Slot};

/// `<persist>/baseos/update.json`
pub fn record_path(persist: &Path) -> PathBuf {
    persist.join("baseos").join("update.json")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The slot is being written (or was, when the agent was killed).
    #[default]
    Installing,
    /// Written, read back and marked for its trial boot.
    Installed,
    /// Refused or failed; tried again only when `retry_update.counter` changes.
    Failed,
}

/// What the baseos-manager did for a request, kept across restarts and reboots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "BaseOsUpdateRecord", version = 1)]
pub struct UpdateRecord {
    #[serde(rename = "ContentTreeUUID")]
    #[persist(mandatory)]
    pub content_tree_uuid: Uuid,
    pub content_sha256: String,
    pub version: String,
    pub phase: Phase,
    /// The slot written (`IMGA`/`IMGB`); empty for a bundle refused before any slot was chosen.
    pub partition_label: String,
    /// The boot state's sequence number when the install started.
    pub boot_seq: u64,
    pub error: String,
    /// EVE's saved `config_retry_update_counter`: the counter of the request acted on.
    pub retry_update_counter: u32,
    #[serde(with = "cairn_types::common::go_time")]
    pub time: Option<DateTime<Utc>>,
}

impl UpdateRecord {
    /// The record is about this request (same tree, content and version).
    pub fn is_for(&self, config: &BaseOsConfig, tree: Option<&ContentTreeStatus>) -> bool {
        self.content_tree_uuid == config.content_tree_uuid
            && self.version == config.base_os_version
            && tree.is_none_or(|t| t.content_sha256 == self.content_sha256)
    }

    pub fn slot(&self) -> Option<Slot> {
        Slot::parse(&self.partition_label)
    }
}

/// What the device booted and what its boot state says.
#[derive(Debug, Clone)]
pub struct BootView {
    pub running: Slot,
    pub mode: String,
    pub state: BootState,
}

pub struct Inputs<'a> {
    pub config: &'a BaseOsConfig,
    pub tree: Option<&'a ContentTreeStatus>,
    pub record: Option<&'a UpdateRecord>,
    /// None: not booted from an A/B boot disk.
    pub boot: Option<&'a BootView>,
    pub running_version: &'a str,
    /// Why the last trial boot of a slot failed (`last-update.json`), by slot label.
    pub trial_failure: Option<(&'a str, &'a str)>,
    /// The bundle of this request was verified during this run (activate false).
    pub verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Check the bundle's signature, hashes and version; write nothing.
    Verify {
        bundle: PathBuf,
    },
    /// Write the bundle into `target` (again, from its first byte) and mark it for trial.
    Install {
        bundle: PathBuf,
        target: Slot,
    },
    /// The install was complete when the agent was killed: record it, write nothing.
    FinishInstall {
        target: Slot,
    },
    /// `retry_update`: mark the slot that failed its trial for one more trial boot.
    Retrial {
        target: Slot,
    },
    /// Boot the slot marked for trial (activate true).
    Reboot {
        target: Slot,
    },
}

/// The request's status and the next action.
pub fn decide(inputs: &Inputs) -> (BaseOsUpdateStatus, Action) {
    let config = inputs.config;
    let mut status = BaseOsUpdateStatus {
        content_tree_uuid: config.content_tree_uuid,
        base_os_version: config.base_os_version.clone(),
        activate: config.activate,
        ..Default::default()
    };
    let error = |message: String| {
        ErrorDescription::new(message, ErrorSeverity::Error, Utc::now())
            .about(ErrorEntityType::BaseOs, config.content_tree_uuid)
    };
    if !config.unusable.is_empty() {
        status.error = error(config.unusable.clone());
        return (status, Action::Nothing);
    }
    // EVE: a version the device runs already is INSTALLED and activated; nothing to do.
    if config.base_os_version == inputs.running_version {
        status.state = BaseOsUpdateState::Installed;
        status.partition_label = inputs
            .boot
            .map_or(Slot::A.label(), |b| b.running.label())
            .to_string();
        status.activated = true;
        status.progress = 100;
        return (status, Action::Nothing);
    }
    let Some(boot) = inputs.boot else {
        status.error = error(format!(
            "base OS {}: this device was not booted from an A/B boot disk, so it has no other \
             slot to install into",
            config.base_os_version
        ));
        return (status, Action::Nothing);
    };
    let state = &boot.state;
    let tree = inputs.tree;
    if let Some(tree) = tree {
        status.state = tree_state(tree.state);
        status.progress = tree.progress;
    }
    let record = inputs.record.filter(|r| r.is_for(config, tree));
    let retry_asked = record.is_some_and(|r| r.retry_update_counter != config.retry_update_counter);
    let loaded = tree.filter(|t| t.is_loaded());
    if let Some(record) = record {
        let slot = record.slot();
        match (record.phase, slot) {
            (Phase::Installing, Some(target)) => {
                status.partition_label = target.label().into();
                status.state = BaseOsUpdateState::Loaded;
                if state.trial == Some(target) && state.seq > record.boot_seq {
                    return (status, Action::FinishInstall { target });
                }
                status.step = format!(
                    "the install into slot {} was interrupted; writing it again",
                    target.label()
                );
                if let Some(tree) = loaded {
                    return (
                        status,
                        Action::Install {
                            bundle: tree.file_location.clone().into(),
                            target,
                        },
                    );
                }
                return (status, Action::Nothing);
            }
            (Phase::Installed, Some(target)) => {
                status.partition_label = target.label().into();
                status.state = BaseOsUpdateState::Installed;
                status.progress = 100;
                if state.trial == Some(target) {
                    return (
                        status,
                        if config.activate {
                            Action::Reboot { target }
                        } else {
                            Action::Nothing
                        },
                    );
                }
                if state.failed == Some(target) {
                    let reason = inputs
                        .trial_failure
                        .filter(|(label, _)| *label == target.label())
                        .map_or_else(
                            || format!("the trial boot of slot {} failed", target.label()),
                            |(_, reason)| reason.to_string(),
                        );
                    if retry_asked && config.activate && can_start_update(boot) {
                        return (status, Action::Retrial { target });
                    }
                    status.error = error(format!(
                        "base OS {} in slot {}: {reason}; change retry_update's counter to try \
                         it again",
                        config.base_os_version,
                        target.label()
                    ));
                    return (status, Action::Nothing);
                }
                // The trial mark is gone without a verdict (another install cleared it): the
                // slot is not what the record says any more; write it again when asked to.
            }
            (Phase::Failed, _) if !retry_asked => {
                status.partition_label = String::new();
                status.error = error(record.error.clone());
                return (status, Action::Nothing);
            }
            _ => {}
        }
    }
    let Some(tree) = tree else {
        status.step = format!(
            "waiting for content tree {} from the downloader",
            config.content_tree_uuid
        );
        return (status, Action::Nothing);
    };
    if tree.error.is_error() {
        status.error = tree
            .error
            .clone()
            .about(ErrorEntityType::ContentTree, tree.content_id);
        return (status, Action::Nothing);
    }
    if !tree.is_loaded() {
        return (status, Action::Nothing);
    }
    if tree.format == ContentFormat::Container {
        status.error = error(format!(
            "base OS {}: content tree {} is a CONTAINER image; Cairn's update bundle is one file \
             (give the tree another format, e.g. RAW)",
            config.base_os_version, tree.content_id
        ));
        return (status, Action::Nothing);
    }
    let bundle = PathBuf::from(&tree.file_location);
    if !config.activate {
        // EVE: downloaded and verified, not installed (doBaseOsInactivate).
        if inputs.verified {
            status.step = "downloaded and verified; not installed (activate is false)".into();
            return (status, Action::Nothing);
        }
        return (status, Action::Verify { bundle });
    }
    if !can_start_update(boot) {
        // EVE's TooEarly: the running slot is still on trial.
        status.too_early = true;
        return (status, Action::Nothing);
    }
    (
        status,
        Action::Install {
            bundle,
            target: boot.running.other(),
        },
    )
}

/// An update may start only from a committed slot (not while the running one is on trial).
fn can_start_update(boot: &BootView) -> bool {
    boot.state.committed == boot.running && boot.state.trial != Some(boot.running)
}

fn tree_state(state: ContentTreeState) -> BaseOsUpdateState {
    match state {
        ContentTreeState::Initial => BaseOsUpdateState::Initial,
        ContentTreeState::Downloading => BaseOsUpdateState::Downloading,
        ContentTreeState::Downloaded => BaseOsUpdateState::Downloaded,
        ContentTreeState::Verifying => BaseOsUpdateState::Verifying,
        ContentTreeState::Verified => BaseOsUpdateState::Verified,
        ContentTreeState::Loading => BaseOsUpdateState::Loading,
        ContentTreeState::Loaded => BaseOsUpdateState::Loaded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(activate: bool, counter: u32) -> BaseOsConfig {
        BaseOsConfig {
            content_tree_uuid: Uuid::from_u128(7),
            base_os_version: "2.0".into(),
            retry_update_counter: counter,
            activate,
            unusable: String::new(),
        }
    }

    fn loaded() -> ContentTreeStatus {
        ContentTreeStatus {
            content_id: Uuid::from_u128(7),
            content_sha256: "ab".into(),
            state: ContentTreeState::Loaded,
            progress: 100,
            file_location: "/p/content/blobs/ab".into(),
            ..Default::default()
        }
    }

    fn boot(state: BootState) -> BootView {
        BootView {
            running: Slot::A,
            mode: "committed".into(),
            state,
        }
    }

    fn record(phase: Phase, seq: u64, counter: u32) -> UpdateRecord {
        UpdateRecord {
            content_tree_uuid: Uuid::from_u128(7),
            content_sha256: "ab".into(),
            version: "2.0".into(),
            phase,
            partition_label: "IMGB".into(),
            boot_seq: seq,
            retry_update_counter: counter,
            ..Default::default()
        }
    }

    fn run(
        config: &BaseOsConfig,
        record: Option<&UpdateRecord>,
        boot: &BootView,
    ) -> (BaseOsUpdateStatus, Action) {
        let tree = loaded();
        decide(&Inputs {
            config,
            tree: Some(&tree),
            record,
            boot: Some(boot),
            running_version: "1.0",
            trial_failure: None,
            verified: false,
        })
    }

    #[test]
    fn an_interrupted_install_is_finished_only_when_its_own_trial_mark_is_there() {
        let c = config(true, 0);
        let marked = BootState {
            seq: 5,
            ..BootState::initial().mark_trial(Slot::B, 1)
        };
        // Marked after the record (seq 3 then): done, nothing is written again.
        let r = record(Phase::Installing, 3, 0);
        assert_eq!(
            run(&c, Some(&r), &boot(marked.clone())).1,
            Action::FinishInstall { target: Slot::B }
        );
        // A mark as old as the record belongs to an earlier install: write again.
        let r = record(Phase::Installing, 5, 0);
        assert!(matches!(
            run(&c, Some(&r), &boot(marked)).1,
            Action::Install {
                target: Slot::B,
                ..
            }
        ));
    }

    #[test]
    fn a_failed_trial_is_tried_again_only_when_the_retry_counter_changes() {
        let failed = BootState::initial()
            .mark_trial(Slot::B, 0)
            .fail_trial(Slot::B);
        let r = record(Phase::Installed, 1, 4);
        let (status, action) = run(&config(true, 4), Some(&r), &boot(failed.clone()));
        assert_eq!(action, Action::Nothing);
        assert!(status.error.is_error());
        let (_, action) = run(&config(true, 5), Some(&r), &boot(failed));
        assert_eq!(action, Action::Retrial { target: Slot::B });
    }

    #[test]
    fn activate_false_verifies_and_never_installs() {
        let (_, action) = run(&config(false, 0), None, &boot(BootState::initial()));
        assert!(matches!(action, Action::Verify { .. }));
    }

    #[test]
    fn no_update_starts_while_the_running_slot_is_on_trial() {
        let trial = BootState::initial().mark_trial(Slot::B, 0);
        let view = BootView {
            running: Slot::B,
            mode: "trial".into(),
            state: trial,
        };
        let (status, action) = run(&config(true, 0), None, &view);
        assert_eq!(action, Action::Nothing);
        assert!(status.too_early);
    }
}

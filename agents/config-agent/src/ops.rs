//! The controller's device operation commands (EVE's `DeviceOpsCmd`): `shutdown`.
//!
//! As in EVE's zedagent, a command acts when its counter changes from the one of the config in
//! force before; the first counter ever seen (a new device, or a controller that starts
//! sending the field) is only taken note of. A shutdown stops every app gracefully and keeps
//! them stopped until the device boots again: the power is then the technician's (EVE has no
//! remote power-on either). The device reports PREPARING_POWEROFF while apps still run, then
//! PREPARED_POWEROFF, and the counter as `shutdownConfigCounter`.
//!
//! The shutdown in force is kept in the run directory, written before the config carrying it
//! is checkpointed: a config-agent restarted in the same boot keeps it, a reboot (a fresh run
//! directory) ends it, and a crash between the two finds the counter still new at the next
//! poll.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use cairn_types::{AppInstanceStatus, SwState};

use crate::model::DeviceConfig;
use crate::proto::ZDeviceState;

/// `<run>/config-agent.shutdown`: the counter of the shutdown in force.
const SHUTDOWN_FILE: &str = "config-agent.shutdown";

/// The shutdown command in force in this boot, if any.
#[derive(Debug)]
pub struct Shutdown {
    file: PathBuf,
    in_force: Option<u32>,
}

impl Shutdown {
    /// The shutdown an earlier run of the config-agent put in force in this boot.
    pub async fn load(run: &Path) -> Self {
        let file = run.join(SHUTDOWN_FILE);
        let in_force = match tokio::fs::read_to_string(&file).await {
            Ok(text) => match text.trim().parse() {
                Ok(counter) => Some(counter),
                Err(e) => {
                    // Written only by us: a torn write still means a shutdown was asked.
                    tracing::warn!(file = %file.display(), "unreadable shutdown counter, the shutdown stays: {e}");
                    Some(0)
                }
            },
            Err(_) => None,
        };
        Self { file, in_force }
    }

    /// Whether `new` (the counter of a config just received) asks for a shutdown after
    /// `before` (the one of the config in force before it; `None`: none seen).
    pub fn asked(before: Option<u32>, new: Option<u32>) -> bool {
        matches!((before, new), (Some(b), Some(n)) if b != n)
    }

    /// Puts the shutdown of `counter` in force, on disk first.
    pub async fn begin(&mut self, counter: u32) -> std::io::Result<()> {
        tracing::warn!(
            counter,
            "the controller asked for a shutdown: every app is stopped until the next boot"
        );
        self.in_force = Some(counter);
        tokio::fs::write(&self.file, counter.to_string()).await
    }

    pub fn in_force(&self) -> Option<u32> {
        self.in_force
    }

    /// `config` as it is put in force: while a shutdown holds, no app is activated.
    pub fn apply<'a>(&self, config: &'a DeviceConfig) -> Cow<'a, DeviceConfig> {
        if self.in_force.is_none() {
            return Cow::Borrowed(config);
        }
        let mut config = config.clone();
        for app in &mut config.apps {
            app.activate = false;
        }
        Cow::Owned(config)
    }

    /// The device's state as EVE reports it (`getDeviceState`).
    pub fn device_state<'a>(
        &self,
        apps: impl IntoIterator<Item = &'a AppInstanceStatus>,
    ) -> ZDeviceState {
        if self.in_force.is_none() {
            return ZDeviceState::ZdeviceStateOnline;
        }
        let halted = |a: &AppInstanceStatus| {
            !a.activated
                && !matches!(
                    a.state,
                    SwState::Running | SwState::Booting | SwState::Halting
                )
        };
        if apps.into_iter().all(halted) {
            ZDeviceState::ZdeviceStatePreparedPoweroff
        } else {
            ZDeviceState::ZdeviceStatePreparingPoweroff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_changed_counter_after_a_known_one_asks_for_a_shutdown() {
        assert!(!Shutdown::asked(None, Some(1)), "first sight: noted only");
        assert!(!Shutdown::asked(Some(1), Some(1)));
        assert!(!Shutdown::asked(Some(1), None));
        assert!(Shutdown::asked(Some(1), Some(2)));
        assert!(Shutdown::asked(Some(0), Some(1)));
    }
}

//! Which agent lines go to the controller (EVE's newlogd `shouldSendToRemote`): a line is
//! uploaded when its level is at least as severe as its agent's remote level,
//! `agent.<agent>.debug.remote.loglevel`, else `debug.default.remote.loglevel` (EVE's default:
//! `info`). Levels are logrus's names plus EVE's `none` and `all`. An app's output is never
//! filtered (EVE has no knob for it). Lines held back stay in the agents' own log files.

use std::collections::BTreeMap;

use cairn_types::ConfigItemValueMap;

/// EVE's global item for every agent's remote level.
pub const DEFAULT_REMOTE_ITEM: &str = "debug.default.remote.loglevel";
/// EVE's per-agent item is `agent.<name>.debug.remote.loglevel`.
const AGENT_PREFIX: &str = "agent.";
const REMOTE_SUFFIX: &str = ".debug.remote.loglevel";
/// EVE's default (`configItemSpecMap.AddStringItem(DefaultRemoteLogLevel, "info", ...)`).
const DEFAULT_LEVEL: Rank = 4;

/// logrus's order: panic 0, fatal 1, error 2, warning 3, info 4, debug 5, trace 6.
type Rank = u8;

/// A level's rank, as EVE parses it (`parseAgentLogLevel`: `none` is logrus's panic level,
/// which no Cairn line has, `all` is trace); `None` for a name EVE refuses.
fn rank(level: &str) -> Option<Rank> {
    Some(match level.trim().to_ascii_lowercase().as_str() {
        "none" | "panic" => 0,
        "fatal" => 1,
        "error" => 2,
        "warn" | "warning" => 3,
        "info" => 4,
        "debug" => 5,
        "trace" | "all" => 6,
        _ => return None,
    })
}

/// The remote levels in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLevels {
    default: Rank,
    agents: BTreeMap<String, Rank>,
    /// As the config items said them, for the status.
    named: BTreeMap<String, String>,
}

impl Default for RemoteLevels {
    fn default() -> Self {
        Self {
            default: DEFAULT_LEVEL,
            agents: BTreeMap::new(),
            named: BTreeMap::from([("default".to_string(), "info".to_string())]),
        }
    }
}

impl RemoteLevels {
    /// From the config items; a level EVE would refuse is left at its default, with a warning
    /// (EVE's `validateLogLevel` refuses the item, so its default stays).
    pub fn from_items(items: &ConfigItemValueMap) -> Self {
        let mut levels = Self::default();
        let parsed = |key: &str, value: &str| {
            let level = rank(value);
            if level.is_none() {
                tracing::warn!(
                    item = key,
                    value,
                    "not a log level (none, panic, fatal, error, warning, info, debug, trace, all); its default applies"
                );
            }
            level
        };
        for (key, value) in &items.items {
            if key == DEFAULT_REMOTE_ITEM {
                if let Some(level) = parsed(key, value) {
                    levels.default = level;
                    levels.named.insert("default".into(), value.trim().into());
                }
            } else if let Some(agent) = key
                .strip_prefix(AGENT_PREFIX)
                .and_then(|k| k.strip_suffix(REMOTE_SUFFIX))
                && let Some(level) = parsed(key, value)
            {
                levels.agents.insert(agent.to_string(), level);
                levels.named.insert(agent.to_string(), value.trim().into());
            }
        }
        levels
    }

    /// Whether a line of `agent` at `severity` (a `LogEntry.severity`) is uploaded.
    pub fn sends(&self, agent: &str, severity: &str) -> bool {
        let limit = self.agents.get(agent).copied().unwrap_or(self.default);
        // An unknown severity is kept: a line nobody can rank is not silently lost.
        rank(severity).is_none_or(|level| level <= limit)
    }

    /// `default` and each agent named, with the level given, for `LogManagerStatus`.
    pub fn named(&self) -> &BTreeMap<String, String> {
        &self.named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(pairs: &[(&str, &str)]) -> ConfigItemValueMap {
        ConfigItemValueMap {
            items: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn eves_default_sends_info_and_above() {
        let levels = RemoteLevels::default();
        assert!(levels.sends("config-agent", "error"));
        assert!(levels.sends("config-agent", "warning"));
        assert!(levels.sends("config-agent", "info"));
        assert!(!levels.sends("config-agent", "debug"));
        assert!(!levels.sends("config-agent", "trace"));
    }

    #[test]
    fn an_agents_own_level_overrides_the_default_and_none_and_all_are_eves() {
        let levels = RemoteLevels::from_items(&items(&[
            (DEFAULT_REMOTE_ITEM, "warning"),
            ("agent.volume-manager.debug.remote.loglevel", "debug"),
            ("agent.app-manager.debug.remote.loglevel", "none"),
            ("agent.downloader.debug.remote.loglevel", "all"),
            ("agent.domain-manager.debug.remote.loglevel", "loud"),
        ]));
        assert!(!levels.sends("config-agent", "info"));
        assert!(levels.sends("config-agent", "warning"));
        assert!(levels.sends("volume-manager", "debug"));
        assert!(!levels.sends("app-manager", "error"));
        assert!(levels.sends("downloader", "trace"));
        // A level EVE refuses leaves the agent on the default.
        assert!(!levels.sends("domain-manager", "info"));
        assert_eq!(levels.named()["default"], "warning");
        assert!(!levels.named().contains_key("domain-manager"));
    }
}

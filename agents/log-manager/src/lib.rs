//! cairn-log-manager: EVE's newlogd and loguploader in one agent. `collect` follows the agents'
//! log files and the apps' console output and writes `entry::LogEntry` lines into gzip files
//! in the bounded on-disk `queue`; `upload` sends them, oldest first, to the controller's log
//! endpoints over the device's TLS (`cairn-controller-client`); `agent` wires them together.

pub mod agent;
pub mod collect;
pub mod entry;
pub mod levels;
pub mod queue;
pub mod upload;

pub const AGENT: &str = "log-manager";

//! cairn-controller-client: what any agent needs to talk to the device's controller. `https` is
//! the client pinned to the device's root certificate (no system roots, as in EVE's API v2);
//! `link` reads the controller's address and root as set-up left them under `<persist>/config/`.
//! The config-agent owns those files (onboarding, device keys, object signing); other agents,
//! like the log-manager (EVE's loguploader, which posts its bodies unsigned), only read them.

pub mod https;
pub mod link;

//! cairn-config-agent: the controller link (EVE API v2 subset) and the local config source.
//!
//! `proto` holds the API messages and `model` turns either source into the bus messages,
//! validated as a whole. `apply` publishes them and follows the local file (woken by `watch`, an inotify watch); `link` follows the
//! controller through `controller` (the API exchanges), `https` (TLS pinned to the device's
//! root), `identity` (the device's keys and certificates), `auth` (object signing),
//! `checkpoint` (the last good config) and `report` (app status to `ZInfoApp`, queued).

pub mod apply;
pub mod auth;
pub mod checkpoint;
pub mod controller;
pub mod https;
pub mod identity;
pub mod link;
pub mod model;
pub mod proto;
pub mod report;
pub mod watch;

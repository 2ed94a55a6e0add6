//! cairn-config-agent: the controller link (EVE API v2 subset) and the local config source.
//!
//! `proto` holds the API messages, `model` turns either source into the bus messages and
//! validates them as a whole. The controller client, checkpoint and reporting come next.

pub mod apply;
pub mod auth;
pub mod checkpoint;
pub mod model;
pub mod proto;

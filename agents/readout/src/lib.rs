//! The one read-out model of a Cairn device: the CLI's `status`/`snapshots` and the web page
//! (`cairn-web`) print the same values, so they cannot tell a technician different things.
//! Read-only: it subscribes to the agents' status topics and reads records on disk.

pub mod problems;
pub mod readout;
pub mod supervision;

//! cairn-volume-manager: volumes and their snapshot backends (qcow2, btrfs, ZFS, purgeable,
//! copy), crash-safe. The core ([`manager::VolumeManager`]) turns `VolumeConfig` and
//! `VolumesSnapshotConfig` into actions and statuses; `main.rs` only wires it to the bus.

pub mod backend;
pub mod content;
pub mod disk_scan;
pub mod error;
pub mod export;
pub mod freeze;
pub mod image;
pub mod manager;
pub mod process;
pub mod queue;
pub mod volumes;
pub mod work;

pub use backend::{Backends, SnapshotBackend, VolumeRef};
pub use backend::{Tools, tools};
pub use error::VolumeError;
pub use manager::{Publish, SnapshotEvent, VolumeManager};

//! cairn-domain-manager: runs apps as qemu VMs (driven over QMP), plain processes or OCI
//! containers (an OCI runtime, `container.rs`).
//!
//! `DomainConfig` (from the app-manager) → one [`domain::Domain`] task per app → `DomainStatus`.
//! Live operations on running VMs (pause, resume, disk-only and memory snapshots) are requested
//! with `DomainLiveOpConfig` and answered with `DomainLiveOpStatus`, both keyed by request id.
//! Domains outlive the agent: a restarted domain-manager re-adopts them (pidfile, `/proc`, QMP).

pub mod container;
pub mod domain;
pub mod launch;
pub mod metrics;
pub mod procfs;
pub mod qmp;
pub mod supervisor;

pub use domain::Timeouts;
pub use supervisor::{AGENT, Settings, Supervisor, SupervisorError};

//! Cairn's base OS update (EVE's baseosmgr and zboot): the signed update bundle
//! ([`bundle`]), the boot disk with two root slots ([`disk`]), their boot state with the
//! trial's try counter ([`bootstate`]) and the crash-safe install into the inactive slot
//! ([`install`]).

pub mod agent;
pub mod bootstate;
pub mod bundle;
pub mod disk;
pub mod install;
pub mod update;

/// Where the device image holds the key it accepts bundles from.
pub const UPDATE_KEY: &str = "/etc/cairn/update-key.pub";

//! What the long-run tools (`cairn-torture`, `cairn-powercut`) share: their seed, ids and how
//! they print them, the snapshots as the app-manager reports them, the leak check of records
//! and volume snapshots against those, and their exit status.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// A seed from the clock, for a run not given one (it is printed, so the run can be repeated).
pub fn time_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A v4-shaped uuid from the run's seeded generator: the same seed makes the same ids.
pub fn random_uuid(rng: &mut fastrand::Rng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes()).into_uuid()
}

/// The first eight digits of an id, as the tools print it.
pub fn short_id(id: &Uuid) -> String {
    id.to_string()[..8].to_string()
}

/// A set of ids as the tools print it: `[0a1b2c3d 4e5f6a7b]`.
pub fn short(ids: &BTreeSet<Uuid>) -> String {
    let parts: Vec<String> = ids.iter().map(short_id).collect();
    format!("[{}]", parts.join(" "))
}

/// The snapshots as the app-manager reports them.
#[derive(Debug, Default, Clone)]
pub struct Snapshots {
    /// Those that ended Failed, with their error.
    pub failed: BTreeMap<Uuid, String>,
    /// The available ones by app.
    pub available: BTreeMap<Uuid, BTreeSet<Uuid>>,
    /// Deleted from the config, waiting for the app's next deactivation (EVE).
    pub pending: BTreeSet<Uuid>,
    /// Available, listed by nobody: scheduled ones.
    pub scheduled: usize,
}

/// The snapshot records (`records`) and each app's volume snapshots (`volumes`: the app's
/// index, uuid and the snapshots found on its volume) against the available snapshots; a
/// failed snapshot may keep its record, never its volume data; a pending deletion keeps both
/// until the app stops. Returns each leak, described.
pub fn snapshot_leaks<'a>(
    records: &BTreeSet<Uuid>,
    volumes: impl IntoIterator<Item = (usize, Uuid, &'a BTreeSet<Uuid>)>,
    snapshots: &Snapshots,
) -> Vec<String> {
    let mut leaks = Vec::new();
    let all_available: BTreeSet<Uuid> = snapshots.available.values().flatten().copied().collect();
    for id in records.difference(&all_available) {
        if !snapshots.failed.contains_key(id) && !snapshots.pending.contains(id) {
            leaks.push(format!("record {id} without an available snapshot"));
        }
    }
    for id in all_available.difference(records) {
        leaks.push(format!("available snapshot {id} without a record"));
    }
    for (i, app, on_volume) in volumes {
        let Some(want) = snapshots.available.get(&app) else {
            continue;
        };
        for id in on_volume.difference(want) {
            if !snapshots.pending.contains(id) {
                leaks.push(format!("app {i}: volume snapshot {id} not available"));
            }
        }
        for id in want.difference(on_volume) {
            leaks.push(format!(
                "app {i}: available snapshot {id} not on the volume"
            ));
        }
    }
    leaks
}

/// A tool's exit: 0 when the run was clean, 1 when it saw faults, 2 when it could not run.
pub fn exit(tool: &str, run: anyhow::Result<bool>) -> ExitCode {
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaks_are_counted_both_ways_and_a_failed_or_pending_snapshot_is_none() {
        let [app, a, b, failed, pending, stray] = [1u128, 2, 3, 4, 5, 6].map(Uuid::from_u128);
        let snapshots = Snapshots {
            failed: BTreeMap::from([(failed, "why".to_string())]),
            available: BTreeMap::from([(app, BTreeSet::from([a, b]))]),
            pending: BTreeSet::from([pending]),
            scheduled: 0,
        };
        let records = BTreeSet::from([a, failed, pending, stray]);
        let on_volume = BTreeSet::from([a, pending, stray]);
        let leaks = snapshot_leaks(&records, [(0, app, &on_volume)], &snapshots);
        assert_eq!(
            leaks,
            vec![
                format!("record {stray} without an available snapshot"),
                format!("available snapshot {b} without a record"),
                format!("app 0: volume snapshot {stray} not available"),
                format!("app 0: available snapshot {b} not on the volume"),
            ]
        );
    }
}

//! Exports kept at a remote: a full export every N links of a chain, the newest K exports of an
//! app kept under a prefix with every export they build on, the others deleted.
//!
//! Deletion order, so that a kill at any instruction leaves nothing that looks complete and is
//! not: unneeded exports go newest first (an incremental always before its base, which is
//! older), and within one export the manifest first, then its volume files. The manifest is
//! the commit point every reader goes by (a base search, a restore, this listing): once it is
//! gone the export is not one, whatever of its files remain. So a killed run leaves at most one
//! manifest-less directory, never a complete export whose base or files are missing; the next
//! run deletes manifest-less directories no job is writing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cairn_objstore::{Remote, join_key};
use cairn_types::export::{ExportJobRecord, ExportKind, ExportManifest, MANIFEST_FILE};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Crash point: retention deleted an unneeded export's manifest, not yet its volume files.
pub const CRASH_MID_RETENTION: &str = "volume-manager:mid-retention";

/// One export directory of an app under a prefix, as a listing finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub dir: String,
    /// The manifest's export time; none: no manifest (an export never completed, or one
    /// retention began deleting).
    pub complete: Option<DateTime<Utc>>,
    pub snapshot: Uuid,
    pub snapshot_time: Option<DateTime<Utc>>,
    /// The directories this export's incremental volumes build on.
    pub bases: BTreeSet<String>,
}

impl Listed {
    fn from_manifest(dir: String, manifest: &ExportManifest) -> Self {
        Self {
            dir,
            complete: Some(manifest.export_time.unwrap_or_default()),
            snapshot: manifest.snapshot_id,
            snapshot_time: manifest.snapshot_time,
            bases: bases_of(manifest),
        }
    }
}

fn bases_of(manifest: &ExportManifest) -> BTreeSet<String> {
    manifest
        .volumes
        .iter()
        .filter(|v| v.kind == ExportKind::Incremental)
        .filter_map(|v| v.base.as_ref().map(|b| b.dir.clone()))
        .collect()
}

/// What retention deletes, in order: first the directories without a manifest (nothing uses
/// them), then the complete exports neither among the newest `keep` nor built on by one of
/// those, newest first. `keep` 0 deletes nothing.
pub fn plan(listed: &[Listed], keep: u32) -> Vec<String> {
    if keep == 0 {
        return Vec::new();
    }
    let mut complete: Vec<&Listed> = listed.iter().filter(|l| l.complete.is_some()).collect();
    // Newest first; the name (which ends in the export's time) breaks ties.
    complete.sort_by(|a, b| b.complete.cmp(&a.complete).then(b.dir.cmp(&a.dir)));
    let by_dir: BTreeMap<&str, &Listed> = complete.iter().map(|l| (l.dir.as_str(), *l)).collect();
    let mut needed: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = complete
        .iter()
        .take(keep as usize)
        .map(|l| l.dir.as_str())
        .collect();
    while let Some(dir) = stack.pop() {
        if !needed.insert(dir) {
            continue;
        }
        if let Some(l) = by_dir.get(dir) {
            stack.extend(l.bases.iter().map(String::as_str));
        }
    }
    let mut out: Vec<String> = listed
        .iter()
        .filter(|l| l.complete.is_none())
        .map(|l| l.dir.clone())
        .collect();
    out.extend(
        complete
            .iter()
            .filter(|l| !needed.contains(l.dir.as_str()))
            .map(|l| l.dir.clone()),
    );
    out
}

/// The export directories of `app` under `prefix`: one delimiter listing, one manifest read
/// per directory of the app (their names start with its UUID). A manifest that is there but
/// does not parse fails the listing: without it, which bases are needed is unknown, and
/// retention must delete nothing.
pub async fn list(remote: &Remote, prefix: &str, app: Uuid) -> Result<Vec<Listed>, String> {
    let dirs = remote.list_dirs(prefix).await.map_err(|e| e.to_string())?;
    let mine = format!("{app}-");
    let mut out = Vec::new();
    for dir in dirs.into_iter().filter(|d| d.starts_with(&mine)) {
        let listed = match read_manifest(remote, prefix, &dir).await? {
            None => Listed {
                dir,
                complete: None,
                snapshot: Uuid::nil(),
                snapshot_time: None,
                bases: BTreeSet::new(),
            },
            Some(Ok(manifest)) => Listed::from_manifest(dir, &manifest),
            Some(Err(e)) => {
                return Err(format!(
                    "the manifest of {} cannot be read ({e}); nothing is removed while the chains are unknown",
                    remote.full_key(&join_key(&[prefix, &dir]))
                ));
            }
        };
        out.push(listed);
    }
    Ok(out)
}

/// `None`: no manifest; `Some(Err)`: one that does not parse. Every manifest this module reads
/// comes through here.
async fn read_manifest(
    remote: &Remote,
    prefix: &str,
    dir: &str,
) -> Result<Option<Result<ExportManifest, serde_json::Error>>, String> {
    match remote.get(&join_key(&[prefix, dir, MANIFEST_FILE])).await {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes))),
        Err(e) if e.kind == cairn_objstore::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading the manifest of {dir}: {e}")),
    }
}

/// Whether an incremental export over `base` (a directory under `prefix`, its manifest given)
/// is allowed by "a full export every `full_every`": `Err(why)` when the base's chain already
/// has that many links. Reads one manifest per link.
pub async fn check_chain(
    remote: &Remote,
    prefix: &str,
    base: &str,
    manifest: &ExportManifest,
    full_every: u32,
) -> Result<(), String> {
    if full_every == 0 {
        return Ok(());
    }
    let mut links: u32 = 1;
    let mut parents = bases_of(manifest);
    let mut seen = BTreeSet::from([base.to_string()]);
    while let Some(parent) = parents.pop_first() {
        if links >= full_every {
            break;
        }
        if !seen.insert(parent.clone()) {
            continue;
        }
        links += 1;
        // A broken chain is the restore's to report; it does not lengthen this one.
        if let Some(Ok(m)) = read_manifest(remote, prefix, &parent).await? {
            parents.extend(bases_of(&m));
        }
    }
    if links >= full_every {
        Err(format!(
            "a full export every {full_every}: the chain of {base} already has {links} links"
        ))
    } else {
        Ok(())
    }
}

/// The export directories jobs of this device are writing now (their records), other than
/// `job`'s: retention leaves those and, while one of them is of the same app, deletes nothing
/// (its base is not in a manifest yet). Blocking: run on the blocking pool.
#[allow(clippy::disallowed_methods)]
pub fn in_progress(persist: &Path, job: Uuid) -> BTreeSet<String> {
    let dir = persist.join("volume-manager").join("exports");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| cairn_persist::load::<ExportJobRecord>(&p).ok())
        .map(|loaded| loaded.record)
        .filter(|r| r.job_id != job && !r.remote_dir.is_empty())
        .map(|r| r.remote_dir)
        .collect()
}

/// Applies retention to `app`'s exports under `prefix` after job `job` completed one; returns
/// the full keys of the exports removed.
pub async fn apply(
    persist: &Path,
    remote: &Remote,
    prefix: &str,
    app: Uuid,
    job: Uuid,
    keep: u32,
) -> Result<Vec<String>, String> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let listed = list(remote, prefix, app).await?;
    // Read after the listing: a job writing a listed directory recorded it before its first
    // object, and one that finished since has its manifest (checked again below).
    let persist_owned = persist.to_path_buf();
    let busy = tokio::task::spawn_blocking(move || in_progress(&persist_owned, job))
        .await
        .unwrap_or_default();
    let mine = format!("{app}-");
    if let Some(dir) = busy
        .iter()
        .filter_map(|d| d.strip_prefix(prefix).map(|r| r.trim_start_matches('/')))
        .find(|d| d.starts_with(&mine))
    {
        tracing::info!(%app, export = %dir, "retention waits: another export of the app is being written");
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for dir in plan(&listed, keep) {
        let key = join_key(&[prefix, &dir]);
        let manifest = join_key(&[&key, MANIFEST_FILE]);
        let was_complete = listed.iter().any(|l| l.dir == dir && l.complete.is_some());
        if !was_complete && remote.exists(&manifest).await.map_err(|e| e.to_string())? {
            // Completed since the listing: not a leftover.
            continue;
        }
        if was_complete {
            remote
                .delete(&manifest)
                .await
                .map_err(|e| format!("deleting {}: {e}", remote.full_key(&manifest)))?;
            cairn_persist::crash_point(CRASH_MID_RETENTION);
        }
        let deleted = remote
            .delete_under(&key)
            .await
            .map_err(|e| format!("deleting {}: {e}", remote.full_key(&key)))?;
        // A store with real directories (SeaweedFS) lists an emptied one until it goes.
        if !was_complete && deleted == 0 {
            continue;
        }
        tracing::info!(%app, export = %remote.full_key(&key), "retention: export removed from the remote");
        removed.push(remote.full_key(&key));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u32) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(i64::from(minute) * 60, 0)
    }

    fn export(dir: &str, minute: u32, bases: &[&str]) -> Listed {
        Listed {
            dir: dir.into(),
            complete: at(minute),
            snapshot: Uuid::nil(),
            snapshot_time: None,
            bases: bases.iter().map(|b| b.to_string()).collect(),
        }
    }

    #[test]
    fn a_kept_incremental_keeps_its_whole_chain_and_unneeded_chains_go_newest_first() {
        // f1 ← i2 ← i3, f4 ← i5: keep the newest 1 (i5) needs f4; the older chain goes, its
        // incrementals before its full export.
        let listed = [
            export("f1", 1, &[]),
            export("i2", 2, &["f1"]),
            export("i3", 3, &["i2"]),
            export("f4", 4, &[]),
            export("i5", 5, &["f4"]),
        ];
        assert_eq!(plan(&listed, 1), ["i3", "i2", "f1"]);
        // Keeping 2 (i5, f4) is the same; keeping 3 adds i3, which needs i2 and f1.
        assert_eq!(plan(&listed, 2), ["i3", "i2", "f1"]);
        assert!(plan(&listed, 3).is_empty());
        assert!(plan(&listed, 0).is_empty());
    }

    #[test]
    fn leftovers_without_a_manifest_go_first() {
        let listed = [
            export("f1", 1, &[]),
            Listed {
                dir: "half".into(),
                complete: None,
                snapshot: Uuid::nil(),
                snapshot_time: None,
                bases: BTreeSet::new(),
            },
            export("f2", 2, &[]),
        ];
        assert_eq!(plan(&listed, 1), ["half", "f1"]);
    }

    #[test]
    fn a_base_needed_by_a_kept_export_stays_even_when_it_is_oldest() {
        let listed = [
            export("f1", 1, &[]),
            export("f2", 2, &[]),
            export("i3", 3, &["f1"]),
        ];
        assert_eq!(plan(&listed, 1), ["f2"]);
    }
}

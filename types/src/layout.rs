//! Where things live under the persist and run roots. Paths only, no I/O.

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub const DEFAULT_PERSIST_DIR: &str = "/persist";
pub const DEFAULT_RUN_DIR: &str = "/run/cairn";
pub const PERSIST_DIR_ENV: &str = "CAIRN_PERSIST_DIR";
pub const RUN_DIR_ENV: &str = "CAIRN_RUN_DIR";

/// EVE's file names inside a snapshot directory.
pub const APP_INSTANCE_CONFIG_FILE: &str = "appInstanceConfig.json";
pub const SNAPSHOT_INSTANCE_STATUS_FILE: &str = "snapshotInstanceStatus.json";
pub const VOLUMES_SNAPSHOT_STATUS_FILE: &str = "volumesSnapshotStatus.json";

/// `<persist>/snapshots`.
pub fn snapshots_dir(persist: &Path) -> PathBuf {
    persist.join("snapshots")
}

/// `<persist>/snapshots/<id>`.
pub fn snapshot_dir(persist: &Path, snapshot_id: Uuid) -> PathBuf {
    snapshots_dir(persist).join(snapshot_id.to_string())
}

/// `<persist>/status/<agent>/<Topic>`: persistent publications, one file per key.
pub fn persistent_topic_dir(persist: &Path, agent: &str, topic: &str) -> PathBuf {
    persist.join("status").join(agent).join(topic)
}

/// `<persist>/checkpoint/lastconfig`.
pub fn last_config_checkpoint(persist: &Path) -> PathBuf {
    persist.join("checkpoint").join("lastconfig")
}

/// `<persist>/volumes`.
pub fn volumes_dir(persist: &Path) -> PathBuf {
    persist.join("volumes")
}

/// `<persist>/content`: the content store (`partial/<sha256>` while downloading,
/// `blobs/<sha256>` once verified, `refs.json` the content trees holding each blob).
pub fn content_dir(persist: &Path) -> PathBuf {
    persist.join("content")
}

/// `<persist>/content/blobs/<sha256>`: a verified blob, read-only.
pub fn content_blob(persist: &Path, sha256: &str) -> PathBuf {
    content_dir(persist).join("blobs").join(sha256)
}

/// `<persist>/boot/stop-reason.json`: why the last run stopped, if it stopped deliberately.
pub fn stop_reason(persist: &Path) -> PathBuf {
    persist.join("boot").join("stop-reason.json")
}

/// `<persist>/boot/last-boot.json`: why this run started (`cairn up` writes it at its start).
pub fn last_boot(persist: &Path) -> PathBuf {
    persist.join("boot").join("last-boot.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_sit_where_eve_puts_them() {
        let id = Uuid::nil();
        let dir = snapshot_dir(Path::new("/persist"), id);
        assert_eq!(
            dir.join(SNAPSHOT_INSTANCE_STATUS_FILE),
            Path::new(
                "/persist/snapshots/00000000-0000-0000-0000-000000000000/snapshotInstanceStatus.json"
            )
        );
    }
}

//! Export fixtures shared by the export tests: `cairn`'s side of the bus, volumes with data,
//! snapshots.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_types::export::{ExportAction, ExportConfig, ExportState, ExportStatus};
use cairn_types::snapshot::VolumesSnapshotAction;
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use uuid::Uuid;

use super::*;

/// Plays `cairn`: publishes export requests, follows their statuses.
pub struct Cli {
    pub configs: Publication<ExportConfig>,
    pub statuses: Subscription<ExportStatus>,
}

impl Cli {
    pub async fn new(h: &Harness) -> Self {
        let bus = Bus::new("cli", &h.run, &h.persist);
        let configs = bus.publish(PublishOptions::default()).await.unwrap();
        configs.signal_restarted().await.unwrap();
        Self {
            configs,
            statuses: Bus::new("test-cli", &h.run, &h.persist).subscribe("volume-manager"),
        }
    }

    pub async fn start(
        &mut self,
        action: ExportAction,
        snapshot: Uuid,
        target: &Path,
        incremental: bool,
    ) -> ExportConfig {
        let config = ExportConfig {
            job_id: Uuid::new_v4(),
            action,
            snapshot_id: snapshot,
            target_dir: target.to_path_buf(),
            incremental,
            ..ExportConfig::default()
        };
        self.configs.publish(config.clone()).await.unwrap();
        config
    }

    /// An export of `snapshot` to `remote` under `prefix`.
    pub async fn start_remote(
        &mut self,
        snapshot: Uuid,
        remote: &str,
        prefix: &str,
        incremental: bool,
    ) -> ExportConfig {
        let config = ExportConfig {
            job_id: Uuid::new_v4(),
            action: ExportAction::Export,
            snapshot_id: snapshot,
            remote: remote.into(),
            remote_prefix: prefix.into(),
            incremental,
            ..ExportConfig::default()
        };
        self.configs.publish(config.clone()).await.unwrap();
        config
    }

    pub async fn wait(&mut self, job: Uuid, pred: impl Fn(&ExportStatus) -> bool) -> ExportStatus {
        let key = job.to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.statuses.get(&key)
                && pred(s)
            {
                return s.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "job {job}: no matching status; last {:?}",
                self.statuses.get(&key)
            );
            let _ = tokio::time::timeout(left, self.statuses.recv()).await;
        }
    }

    pub async fn run(
        &mut self,
        action: ExportAction,
        snapshot: Uuid,
        target: &Path,
        incremental: bool,
    ) -> ExportStatus {
        let config = self.start(action, snapshot, target, incremental).await;
        self.wait(config.job_id, |s| s.state != ExportState::Running)
            .await
    }
}

/// A qcow2 volume of `virtual_mib` holding `data_mib` of random data at offset 0.
pub async fn volume_with_data(
    h: &mut Harness,
    virtual_mib: u64,
    data_mib: u64,
) -> (VolumeConfig, PathBuf) {
    let config = volume(VolumeFormat::Qcow2, virtual_mib * MIB);
    h.volume_configs.publish(config.clone()).await.unwrap();
    h.ready(&config).await;
    let file = h.volume_file(&config);
    let random = h.root.path().join("random.bin");
    sh(
        "sh",
        &[
            "-c",
            &format!("head -c {}M /dev/urandom > {}", data_mib, random.display()),
        ],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} 0 {}M", random.display(), data_mib),
            file.to_str().unwrap(),
        ],
    );
    (config, file)
}

pub async fn snapshot(h: &mut Harness, config: &VolumeConfig, counter: u64) -> Uuid {
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(
            id,
            VolumesSnapshotAction::Create,
            &[config],
            counter,
        ))
        .await
        .unwrap();
    let status = h.answer(id, VolumesSnapshotAction::Create, counter).await;
    assert!(!status.error.is_error(), "{:?}", status.error);
    id
}

/// Asserts that `image` holds exactly what snapshot `tag` of the qcow2 `file` held: the
/// snapshot converted to a plain image, then `qemu-img compare`.
pub fn assert_same_as_snapshot(h: &Harness, image: &Path, file: &Path, tag: Uuid) {
    let expected = h.root.path().join("expected.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "qcow2",
            "-l",
            &format!("snapshot.name={tag}"),
            file.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    let compare = sh(
        "qemu-img",
        &[
            "compare",
            image.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");
}

//! Issue 17, the deletion grace: a volume whose uuid leaves the config is detached and kept,
//! reported pending deletion with its deadline, given back with its data (and the snapshots
//! living in it) when it comes back, deleted once the grace has passed (0: at once, as EVE), and
//! a volume-manager SIGKILLed during the grace keeps counting from the same time.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn_types::snapshot::VolumesSnapshotAction::Create;
use cairn_types::volume::{VolumeFormat, VolumeState, VolumeStatus};
use common::*;
use uuid::Uuid;

/// Waits until the volume `key` is deleted: no status, no file.
async fn deleted(h: &mut Harness, key: &str, file: &std::path::Path) {
    let deadline = Instant::now() + WAIT;
    while file.exists() || h.volume_statuses.get(key).is_some() {
        assert!(Instant::now() < deadline, "volume {key} not deleted");
        let _ = tokio::time::timeout(Duration::from_millis(50), h.volume_statuses.recv()).await;
    }
}

fn pending(s: &VolumeStatus) -> bool {
    s.pending_deletion.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_removed_from_the_config_is_kept_pending_deletion_and_given_back_with_its_data() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = h.ready(&a).await.file_location;
    qcow2_write(&file, 0xaa, MIB);
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(id, Create, &[&a], 1))
        .await
        .unwrap();
    assert!(!h.answer(id, Create, 1).await.error.is_error());
    qcow2_write(&file, 0xbb, MIB);

    let removed = chrono::Utc::now();
    h.volume_configs.unpublish(&a.key()).await.unwrap();
    let s = h.volume_where(&a.key(), pending).await;
    let p = s.pending_deletion.unwrap();
    let since = p.since.unwrap();
    assert!(since >= removed - chrono::Duration::seconds(1), "{since}");
    assert_eq!(
        p.delete_at,
        Some(since + chrono::Duration::hours(24)),
        "default grace: a day"
    );
    assert!(p.reason.contains("no longer in the config"), "{}", p.reason);
    // The old code deleted it within milliseconds; give it well over that.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain(&mut h.volume_statuses).await;
    assert!(h.volume_statuses.get(&a.key()).is_some_and(pending));
    assert!(file.exists(), "the volume is kept during its grace");
    assert_eq!(qcow2_tags(&file), vec![id.to_string()], "its snapshot too");

    // Back in the config: the same volume, with what was written after the snapshot.
    h.volume_configs.publish(a.clone()).await.unwrap();
    let s = h.volume_where(&a.key(), |s| !pending(s)).await;
    assert_eq!(s.state, VolumeState::Ready);
    assert_eq!(s.file_location, file);
    assert!(
        qcow2_reads(&file, 0xbb, MIB),
        "the data is the kept volume's"
    );
    assert_eq!(qcow2_tags(&file), vec![id.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_removed_from_the_config_is_deleted_once_the_grace_has_passed() {
    let mut h = Harness::new().await;
    h.set_delete_grace(2).await;
    let _agent = h.agent(None);
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = h.ready(&a).await.file_location;
    h.volume_configs.unpublish(&a.key()).await.unwrap();
    let p = h
        .volume_where(&a.key(), pending)
        .await
        .pending_deletion
        .unwrap();
    assert_eq!(
        p.delete_at,
        Some(p.since.unwrap() + chrono::Duration::seconds(2))
    );
    deleted(&mut h, &a.key(), &file).await;
    assert!(
        chrono::Utc::now() >= p.delete_at.unwrap(),
        "deleted before its deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_of_zero_deletes_a_removed_volume_at_once_as_eve_does() {
    let mut h = Harness::new().await;
    h.set_delete_grace(0).await;
    let _agent = h.agent(None);
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = h.ready(&a).await.file_location;
    h.volume_configs.unpublish(&a.key()).await.unwrap();
    deleted(&mut h, &a.key(), &file).await;

    // A volume already pending goes as soon as the grace becomes 0.
    h.set_delete_grace(3600).await;
    let b = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(b.clone()).await.unwrap();
    let file = h.ready(&b).await.file_location;
    h.volume_configs.unpublish(&b.key()).await.unwrap();
    h.volume_where(&b.key(), pending).await;
    h.set_delete_grace(0).await;
    deleted(&mut h, &b.key(), &file).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_manager_killed_during_the_grace_keeps_the_deadline_and_deletes_after_it() {
    let mut h = Harness::new().await;
    h.set_delete_grace(3600).await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    let (file, before) = {
        let _agent = h.agent(None);
        h.volume_configs.publish(a.clone()).await.unwrap();
        let file = h.ready(&a).await.file_location;
        qcow2_write(&file, 0xcc, MIB);
        h.volume_configs.unpublish(&a.key()).await.unwrap();
        let p = h
            .volume_where(&a.key(), pending)
            .await
            .pending_deletion
            .unwrap();
        (file, p)
        // dropped: SIGKILL
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    {
        let _agent = h.agent(None);
        // A volume made after the restart shows the agent has its tables.
        let marker = volume(VolumeFormat::Qcow2, MIB);
        h.volume_configs.publish(marker.clone()).await.unwrap();
        h.ready(&marker).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        drain(&mut h.volume_statuses).await;
        let s = h.volume_statuses.get(&a.key()).cloned().unwrap();
        assert_eq!(
            s.pending_deletion.as_ref(),
            Some(&before),
            "the same since and deadline after a restart"
        );
        assert!(file.exists() && qcow2_reads(&file, 0xcc, MIB));
    }
    // Killed again; while it is down the grace becomes 2 s, which has passed since the
    // volume left the config: the next start deletes it.
    h.set_delete_grace(2).await;
    let _agent = h.agent(None);
    deleted(&mut h, &a.key(), &file).await;
}

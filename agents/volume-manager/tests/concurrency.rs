//! Operations on different volumes run concurrently in the real binary, and operations on the
//! same volume keep their arrival order. The slow operation is real: a copy-mode snapshot of a
//! directory volume holding thousands of files. Orders are read from the sequence of answers on
//! the snapshot status topic (one publication, so one order), never from durations.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Instant;

use cairn_pubsub::Event;
use cairn_types::snapshot::VolumesSnapshotAction::{self, Create, Delete};
use cairn_types::snapshot::VolumesSnapshotStatus;
use cairn_types::volume::{
    DirRestoreMode, SnapshotBackendKind, VolumeConfig, VolumeFormat, VolumeOrigin, VolumeState,
};
use common::*;
use uuid::Uuid;

/// Files in the slow volume: its copy takes seconds where a qcow2 snapshot takes milliseconds.
const FILES: usize = 6000;
const FILE_SIZE: usize = 16 << 10;
/// Two copies of the large volume follow each other in one test: on a loaded 2-core machine
/// (the whole suite beside it) they took over the harness's 30 s; bounded all the same.
const SLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(180);

fn copy_volume() -> VolumeConfig {
    VolumeConfig {
        restore_mode: DirRestoreMode::Copy,
        ..volume(VolumeFormat::Dir, 0)
    }
}

fn fill(dir: &Path) {
    let buf = vec![0x5au8; FILE_SIZE];
    for d in 0..16 {
        std::fs::create_dir_all(dir.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..FILES {
        std::fs::write(dir.join(format!("d{:02}/f{i:05}", i % 16)), &buf).unwrap();
    }
}

/// Waits until the intent record of `id` is on disk: the agent is working on it.
async fn in_flight(h: &Harness, id: Uuid) {
    let deadline = Instant::now() + WAIT;
    while !h.record(id).is_some_and(|r| r.is_in_progress()) {
        assert!(Instant::now() < deadline, "snapshot {id}: no intent record");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The snapshot ids in the order their answers (to `wanted`) were published, until all came.
async fn answer_order(h: &mut Harness, wanted: &[(Uuid, VolumesSnapshotAction, u64)]) -> Vec<Uuid> {
    let deadline = Instant::now() + SLOW_WAIT;
    let mut order: Vec<Uuid> = Vec::new();
    while order.len() < wanted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "answers so far {order:?} of {wanted:?}");
        let Ok(event) = tokio::time::timeout(left, h.snapshot_statuses.recv()).await else {
            continue;
        };
        let status: VolumesSnapshotStatus = match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => value,
            _ => continue,
        };
        let answers = wanted.iter().any(|(id, action, counter)| {
            status.snapshot_id == *id
                && status.result_of_action == *action
                && status.request_counter == *counter
                && !status.is_in_progress()
        });
        if answers && !order.contains(&status.snapshot_id) {
            assert!(!status.error.is_error(), "{status:?}");
            order.push(status.snapshot_id);
        }
    }
    order
}

/// A large copy-mode directory volume (app A) and a small qcow2 volume (app B), both Ready.
async fn two_apps(h: &mut Harness) -> (VolumeConfig, VolumeConfig) {
    let (a, b) = (copy_volume(), volume(VolumeFormat::Qcow2, 16 * MIB));
    h.volume_configs.publish(a.clone()).await.unwrap();
    h.volume_configs.publish(b.clone()).await.unwrap();
    let s = h.ready(&a).await;
    assert_eq!(s.state, VolumeState::Ready, "{s:?}");
    assert_eq!(s.backend, SnapshotBackendKind::Copy, "{s:?}");
    assert_eq!(h.ready(&b).await.state, VolumeState::Ready);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_apps_snapshot_is_answered_while_a_large_copy_of_another_app_runs() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let (a, b) = two_apps(&mut h).await;
    fill(&h.volume_file(&a));

    let (slow, quick) = (Uuid::new_v4(), Uuid::new_v4());
    let mut slow_request = request(slow, Create, &[&a], 1);
    slow_request.app_uuid = Uuid::from_u128(0xa);
    let mut quick_request = request(quick, Create, &[&b], 1);
    quick_request.app_uuid = Uuid::from_u128(0xb);
    h.snapshot_configs.publish(slow_request).await.unwrap();
    in_flight(&h, slow).await;
    h.snapshot_configs.publish(quick_request).await.unwrap();

    let order = answer_order(&mut h, &[(slow, Create, 1), (quick, Create, 1)]).await;
    assert_eq!(
        order,
        vec![quick, slow],
        "app B's snapshot must not wait for app A's copy (B = {quick}, A = {slow})"
    );
    assert_eq!(qcow2_tags(&h.volume_file(&b)), vec![quick.to_string()]);
    let record = h.record(slow).unwrap();
    assert!(
        !record.is_in_progress() && !record.error.is_error(),
        "{record:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_the_same_volume_are_answered_in_arrival_order() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let (a, b) = two_apps(&mut h).await;
    // S0 of the nearly empty volume: deleting it later is quick.
    std::fs::write(h.volume_file(&a).join("first"), b"1").unwrap();
    let old = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(old, Create, &[&a], 1))
        .await
        .unwrap();
    assert!(!h.answer(old, Create, 1).await.error.is_error());
    fill(&h.volume_file(&a));

    // A slow snapshot of A, then the quick delete of A's old snapshot, then B's snapshot.
    let (slow, quick) = (Uuid::new_v4(), Uuid::new_v4());
    h.snapshot_configs
        .publish(request(slow, Create, &[&a], 1))
        .await
        .unwrap();
    in_flight(&h, slow).await;
    h.snapshot_configs
        .publish(request(old, Delete, &[&a], 2))
        .await
        .unwrap();
    h.snapshot_configs
        .publish(request(quick, Create, &[&b], 1))
        .await
        .unwrap();

    let order = answer_order(
        &mut h,
        &[(slow, Create, 1), (old, Delete, 2), (quick, Create, 1)],
    )
    .await;
    let at = |id: Uuid| order.iter().position(|o| *o == id).unwrap();
    assert!(
        at(slow) < at(old),
        "the delete on volume A was answered before the earlier create on A: {order:?} (create {slow}, delete {old})"
    );
    assert!(h.record(old).is_none(), "the old snapshot is deleted");
    let record = h.record(slow).unwrap();
    assert!(
        !record.is_in_progress() && !record.error.is_error(),
        "{record:?}"
    );
    let copy = cairn_types::volume::VolumeSnapshotMeta::from_value(
        record.volume_snapshot_meta.values().next().unwrap(),
    )
    .snapshot_location;
    assert!(
        copy.join("first").is_file() && copy.join("d15").is_dir(),
        "the slow snapshot holds the whole tree: {}",
        copy.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_came_before_a_volumes_removal_still_finds_the_volume() {
    let mut h = Harness::new().await;
    h.set_delete_grace(0).await;
    let _agent = h.agent(None);
    let (a, _b) = two_apps(&mut h).await;
    fill(&h.volume_file(&a));

    // A slow snapshot of A; a second one waits behind it; then A leaves the config.
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    h.snapshot_configs
        .publish(request(first, Create, &[&a], 1))
        .await
        .unwrap();
    in_flight(&h, first).await;
    let mut waiting = request(second, Create, &[&a], 1);
    waiting.volume_keys.insert(a.volume_id, a.key());
    h.snapshot_configs.publish(waiting).await.unwrap();
    h.volume_configs.unpublish(&a.key()).await.unwrap();

    answer_order(&mut h, &[(first, Create, 1), (second, Create, 1)]).await;
    // Copy snapshots do not keep their volume: it goes once nothing claims it.
    let deadline = Instant::now() + WAIT;
    while h.volume_statuses.get(&a.key()).is_some() {
        assert!(Instant::now() < deadline, "volume {} not removed", a.key());
        let _ = tokio::time::timeout(WAIT, h.volume_statuses.recv()).await;
    }
    assert!(!h.volume_file(&a).exists());
}

/// The keys of `wanted` in the order their first status past Creating was published, until all
/// came; each must be Ready.
async fn ready_order(h: &mut Harness, wanted: &[&VolumeConfig]) -> Vec<String> {
    let deadline = Instant::now() + SLOW_WAIT;
    let mut order: Vec<String> = Vec::new();
    while order.len() < wanted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "volumes ready so far {order:?}");
        let Ok(event) = tokio::time::timeout(left, h.volume_statuses.recv()).await else {
            continue;
        };
        let status = match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => value,
            _ => continue,
        };
        let key = status.key();
        if status.state != VolumeState::Creating
            && wanted.iter().any(|c| c.key() == key)
            && !order.contains(&key)
        {
            assert_eq!(status.state, VolumeState::Ready, "{status:?}");
            order.push(key);
        }
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_apps_volume_is_made_while_a_slow_clone_is_copied() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let a = copy_volume();
    h.volume_configs.publish(a.clone()).await.unwrap();
    assert_eq!(h.ready(&a).await.state, VolumeState::Ready);
    fill(&h.volume_file(&a));
    let snapshot = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(snapshot, Create, &[&a], 1))
        .await
        .unwrap();
    answer_order(&mut h, &[(snapshot, Create, 1)]).await;

    // App C is a clone of A's snapshot: making it copies the whole tree. App B's small volume
    // comes after it on the same topic.
    let clone = VolumeConfig {
        volume_id: Uuid::new_v4(),
        display_name: "clone".into(),
        origin: VolumeOrigin::Snapshot {
            snapshot,
            volume: a.volume_id,
        },
        ..a.clone()
    };
    let b = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(clone.clone()).await.unwrap();
    h.volume_configs.publish(b.clone()).await.unwrap();

    let order = ready_order(&mut h, &[&clone, &b]).await;
    assert_eq!(
        order,
        vec![b.key(), clone.key()],
        "app B's volume must not wait for app C's clone to be copied"
    );
    let made = h.volume_file(&clone);
    assert!(
        made.join("d15").is_dir() && made.join("d00/f00000").is_file(),
        "the clone holds the whole tree: {}",
        made.display()
    );
}

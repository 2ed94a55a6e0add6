//! The real binary over the bus, with real qemu-img: the snapshot cycle, repeated requests, and
//! a SIGKILL at each named crash point followed by a restart that must converge with nothing
//! leaked or lost (`qemu-img snapshot -l` matches the records).
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn_types::snapshot::VolumesSnapshotAction::{Create, Delete, Rollback};
use cairn_types::volume::{VolumeFormat, VolumeState};
use cairn_volume_manager::manager::{
    CRASH_AFTER_BACKEND_CREATE, CRASH_AFTER_BACKEND_DELETE, CRASH_AFTER_INTENT_WRITE,
    CRASH_AFTER_RECORD_WRITE,
};
use common::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rollback_delete_over_the_bus_restores_the_data() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let (a, b) = (
        volume(VolumeFormat::Qcow2, 64 * MIB),
        volume(VolumeFormat::Qcow2, 64 * MIB),
    );
    h.volume_configs.publish(a.clone()).await.unwrap();
    h.volume_configs.publish(b.clone()).await.unwrap();
    for v in [&a, &b] {
        let s = h.ready(v).await;
        assert_eq!(s.state, VolumeState::Ready, "{s:?}");
        assert_eq!(s.backend, cairn_types::volume::SnapshotBackendKind::Qcow2);
        qcow2_write(&s.file_location, 0xaa, MIB);
    }
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(id, Create, &[&a, &b], 1))
        .await
        .unwrap();
    let s = h.answer(id, Create, 1).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(s.time_created.is_some());
    assert_eq!(s.volume_snapshot_meta.len(), 2);
    assert_eq!(
        h.record(id).unwrap(),
        s,
        "the published status is the record on disk"
    );
    for v in [&a, &b] {
        assert_eq!(qcow2_tags(&h.volume_file(v)), vec![id.to_string()]);
        qcow2_write(&h.volume_file(v), 0xbb, MIB);
    }

    h.snapshot_configs
        .publish(request(id, Rollback, &[&a, &b], 2))
        .await
        .unwrap();
    let s = h.answer(id, Rollback, 2).await;
    assert!(!s.error.is_error(), "{s:?}");
    for v in [&a, &b] {
        assert!(
            qcow2_reads(&h.volume_file(v), 0xaa, MIB),
            "rolled back content"
        );
        qcow2_write(&h.volume_file(v), 0xcc, MIB);
    }
    // The same rollback again (new counter) is executed again, not ignored.
    h.snapshot_configs
        .publish(request(id, Rollback, &[&a, &b], 3))
        .await
        .unwrap();
    let s = h.answer(id, Rollback, 3).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(
        qcow2_reads(&h.volume_file(&a), 0xaa, MIB),
        "second rollback ran"
    );

    h.snapshot_configs
        .publish(request(id, Delete, &[&a, &b], 4))
        .await
        .unwrap();
    let s = h.answer(id, Delete, 4).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(
        h.record(id).is_none(),
        "a deleted snapshot leaves no record"
    );
    for v in [&a, &b] {
        assert!(qcow2_tags(&h.volume_file(v)).is_empty());
    }
    // A delete of something already gone succeeds.
    h.snapshot_configs
        .publish(request(id, Delete, &[&a, &b], 5))
        .await
        .unwrap();
    let s = h.answer(id, Delete, 5).await;
    assert!(!s.error.is_error(), "{s:?}");
}

/// Creates two volumes and asks for a snapshot of both with the agent set to die at `point`;
/// then restarts it and checks that status, record and qcow2 files agree.
async fn crash_during_create_then_converge(point: &str) {
    let mut h = Harness::new().await;
    let (a, b) = (
        volume(VolumeFormat::Qcow2, 64 * MIB),
        volume(VolumeFormat::Qcow2, 64 * MIB),
    );
    {
        let _agent = h.agent(None);
        h.volume_configs.publish(a.clone()).await.unwrap();
        h.volume_configs.publish(b.clone()).await.unwrap();
        h.ready(&a).await;
        h.ready(&b).await;
    }
    let id = Uuid::new_v4();
    let mut agent = h.agent(Some(point));
    h.snapshot_configs
        .publish(request(id, Create, &[&a, &b], 1))
        .await
        .unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    let _agent = h.agent(None);
    let s = h.answer(id, Create, 1).await;
    assert!(!s.error.is_error(), "{point}: {s:?}");
    assert_eq!(
        h.record(id).unwrap(),
        s,
        "{point}: record == published status"
    );
    for v in [&a, &b] {
        assert_eq!(
            qcow2_tags(&h.volume_file(v)),
            vec![id.to_string()],
            "{point}: exactly one backend snapshot per volume"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_intent_write_then_restart_converges() {
    crash_during_create_then_converge(CRASH_AFTER_INTENT_WRITE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_backend_snapshot_and_record_write_adopts_the_snapshot() {
    crash_during_create_then_converge(CRASH_AFTER_BACKEND_CREATE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_record_write_and_publish_publishes_after_restart() {
    crash_during_create_then_converge(CRASH_AFTER_RECORD_WRITE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_backend_create_with_the_request_withdrawn_leaks_nothing() {
    let mut h = Harness::new().await;
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    let id = Uuid::new_v4();
    h.volume_configs.publish(a.clone()).await.unwrap();
    let mut agent = h.agent(Some(CRASH_AFTER_BACKEND_CREATE));
    h.ready(&a).await;
    h.snapshot_configs
        .publish(request(id, Create, &[&a], 1))
        .await
        .unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    assert_eq!(qcow2_tags(&h.volume_file(&a)), vec![id.to_string()]);
    assert!(
        h.record(id).unwrap().is_in_progress(),
        "the intent was persisted"
    );
    // The app-manager gave up on the snapshot while the agent was down.
    h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
    let _agent = h.agent(None);
    let deadline = std::time::Instant::now() + WAIT;
    while h.record(id).is_some() || !qcow2_tags(&h.volume_file(&a)).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the unfinished create was not undone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A live create of a container killed while its cgroup is frozen, then withdrawn while the
/// agent is down: nobody asks for it again, so the restarted agent thaws the cgroup as it undoes
/// the create (the writer in it goes on), not only when the same create is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_cgroup_is_frozen_with_the_request_withdrawn_thaws_it() {
    let mut h = Harness::new().await;
    let _fs = LoopFs::new("btrfs", &cairn_types::layout::volumes_dir(&h.persist), 300);
    let a = volume(VolumeFormat::Dir, 0);
    let id = Uuid::new_v4();
    h.volume_configs.publish(a.clone()).await.unwrap();
    let mut agent = h.agent(Some(CRASH_AFTER_BACKEND_CREATE));
    let path = h.ready(&a).await.file_location;
    let cgroup = FreezerCgroup::with_writer(&path);
    let mut live = request(id, Create, &[&a], 1);
    live.live = true;
    live.freeze_cgroup = cgroup.name.clone();
    h.snapshot_configs.publish(live).await.unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    assert_eq!(cgroup.state(), "FROZEN", "the killed agent left it frozen");
    // The app-manager gave up on the snapshot while the agent was down.
    h.snapshot_configs.unpublish(&id.to_string()).await.unwrap();
    let _agent = h.agent(None);
    let deadline = std::time::Instant::now() + WAIT;
    while h.record(id).is_some() || cgroup.state() != "THAWED" {
        assert!(
            std::time::Instant::now() < deadline,
            "the withdrawn create was not undone or its container not thawed: {}",
            cgroup.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let len = || std::fs::metadata(path.join("log")).unwrap().len();
    let at = len();
    while len() == at {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer runs again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A live create of a container killed while its cgroup is frozen, then asked to be deleted
/// (not withdrawn) while the agent is down: the restarted agent thaws the cgroup before it
/// deletes what the create made (the writer in it goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_cgroup_is_frozen_then_a_delete_of_the_create_thaws_it() {
    let mut h = Harness::new().await;
    let _fs = LoopFs::new("btrfs", &cairn_types::layout::volumes_dir(&h.persist), 300);
    let a = volume(VolumeFormat::Dir, 0);
    let id = Uuid::new_v4();
    h.volume_configs.publish(a.clone()).await.unwrap();
    let mut agent = h.agent(Some(CRASH_AFTER_BACKEND_CREATE));
    let path = h.ready(&a).await.file_location;
    let cgroup = FreezerCgroup::with_writer(&path);
    let mut live = request(id, Create, &[&a], 1);
    live.live = true;
    live.freeze_cgroup = cgroup.name.clone();
    h.snapshot_configs.publish(live).await.unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    assert_eq!(cgroup.state(), "FROZEN", "the killed agent left it frozen");
    let snapshot = h.record(id).unwrap().meta_of(a.volume_id).unwrap();
    assert!(snapshot.snapshot_location.exists(), "the create made it");
    // The app-manager asked for the snapshot's delete while the agent was down.
    h.snapshot_configs
        .publish(request(id, Delete, &[&a], 2))
        .await
        .unwrap();
    let _agent = h.agent(None);
    let s = h.answer(id, Delete, 2).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(h.record(id).is_none());
    assert!(
        !snapshot.snapshot_location.exists(),
        "the delete removed it"
    );
    assert_eq!(cgroup.state(), "THAWED", "the delete thawed the container");
    let len = || std::fs::metadata(path.join("log")).unwrap().len();
    let at = len();
    let deadline = std::time::Instant::now() + WAIT;
    while len() == at {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer runs again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_backend_delete_finishes_the_delete_after_restart() {
    let mut h = Harness::new().await;
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    let id = Uuid::new_v4();
    h.volume_configs.publish(a.clone()).await.unwrap();
    {
        let _agent = h.agent(None);
        h.ready(&a).await;
        h.snapshot_configs
            .publish(request(id, Create, &[&a], 1))
            .await
            .unwrap();
        h.answer(id, Create, 1).await;
    }
    let mut agent = h.agent(Some(CRASH_AFTER_BACKEND_DELETE));
    h.snapshot_configs
        .publish(request(id, Delete, &[&a], 2))
        .await
        .unwrap();
    agent.wait_killed(WAIT);
    drop(agent);
    assert!(qcow2_tags(&h.volume_file(&a)).is_empty());
    assert!(h.record(id).is_some(), "killed before the record went");
    let _agent = h.agent(None);
    let s = h.answer(id, Delete, 2).await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(h.record(id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_file_deleted_behind_the_agents_back_is_reported() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let status = h.ready(&a).await;
    std::fs::remove_file(&status.file_location).unwrap();
    let id = Uuid::new_v4();
    h.snapshot_configs
        .publish(request(id, Create, &[&a], 1))
        .await
        .unwrap();
    let s = h.answer(id, Create, 1).await;
    assert!(s.error.error.contains("is missing"), "{}", s.error.error);
    assert!(s.volume_errors.contains_key(&a.volume_id));
    let v = h
        .volume_where(&a.key(), |v| v.state == VolumeState::Failed)
        .await;
    assert!(v.error.error.contains("is missing"), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_replaces_the_volume_and_deletes_the_old_generation() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let gen0 = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(gen0.clone()).await.unwrap();
    let old = h.ready(&gen0).await;
    let mut gen1 = gen0.clone();
    gen1.generation_counter = 1;
    h.volume_configs.publish(gen1.clone()).await.unwrap();
    let new = h.ready(&gen1).await;
    assert_eq!(new.state, VolumeState::Ready);
    h.volume_configs.unpublish(&gen0.key()).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while old.file_location.exists() || h.volume_statuses.get(&gen0.key()).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "old generation not deleted"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), h.volume_statuses.recv()).await;
    }
    assert!(new.file_location.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_file_deleted_while_the_agent_was_down_is_not_silently_recreated() {
    let mut h = Harness::new().await;
    let a = volume(VolumeFormat::Qcow2, 16 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = {
        let _agent = h.agent(None);
        h.ready(&a).await.file_location
    };
    std::fs::remove_file(&file).unwrap();
    let _agent = h.agent(None);
    let v = h
        .volume_where(&a.key(), |v| v.state == VolumeState::Failed)
        .await;
    assert!(v.error.error.contains("is missing"), "{v:?}");
    assert!(!file.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_the_config_agent_marks_unusable_is_failed_with_its_reason_and_waits_once_fixed() {
    let mut h = Harness::new().await;
    let _agent = h.agent(None);
    let tree = Uuid::new_v4();
    let mut v = volume(VolumeFormat::Qcow2, 8 * MIB);
    v.origin = cairn_types::volume::VolumeOrigin::ContentTree { id: tree };
    v.unusable = Some(format!(
        "volume {} is made from content tree {tree}, which is not in the config's content trees",
        v.volume_id
    ));
    h.volume_configs.publish(v.clone()).await.unwrap();
    let s = h.ready(&v).await;
    assert_eq!(s.state, VolumeState::Failed, "{s:?}");
    assert!(
        s.error.error.contains(&tree.to_string()) && s.error.error.contains("not in the config"),
        "the error names the content tree and the fault: {s:?}"
    );
    assert!(!h.volume_file(&v).exists(), "nothing was made");

    // The controller fixes its config (adds the content tree): the volume now waits for it,
    // no longer failed.
    let fixed = cairn_types::volume::VolumeConfig {
        unusable: None,
        ..v.clone()
    };
    h.volume_configs.publish(fixed.clone()).await.unwrap();
    let s = h
        .volume_where(&fixed.key(), |s| s.state == VolumeState::Creating)
        .await;
    assert!(!s.error.is_error(), "{s:?}");
    assert!(
        s.warnings.iter().any(|w| w.contains(&tree.to_string())),
        "it says which content tree it waits for: {s:?}"
    );
}

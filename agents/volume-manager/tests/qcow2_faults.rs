//! qcow2 metadata writes that fail during snapshot create, apply and delete: qemu's `blkdebug`
//! driver fails the write a rule names (EIO or ENOSPC), through the test-only `qemu-img` in
//! `tests/blkdebug/` put first on PATH (the product calls qemu-img by name, as always). After
//! each fault: the status names the volume and the fault, `qemu-img check` is clean, and the
//! image's tags and the snapshot's record agree; the same request, asked again once the fault
//! is gone, succeeds. Prints one line per fault for the README's figures.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_types::snapshot::VolumesSnapshotAction::{self, Create, Delete, Rollback};
use cairn_types::volume::{VolumeConfig, VolumeFormat};
use common::*;
use uuid::Uuid;

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// The real agent with the test-only qemu-img first on its PATH, reading rules from `rules`.
fn agent(h: &Harness, rules: &Path) -> Agent {
    Agent::start_with_tools(
        &h.persist,
        &h.run,
        "blkdebug",
        &[("CAIRN_TEST_BLKDEBUG", OsString::from(rules))],
    )
}

/// A blkdebug rule on one image's snapshot operations while it lives; removed on drop.
struct Fault {
    rule: PathBuf,
}

impl Fault {
    fn new(rules: &Path, image: &Path, event: &str, errno: i32, once: bool) -> Self {
        std::fs::create_dir_all(rules).unwrap();
        let rule = rules.join(image.file_name().unwrap());
        std::fs::write(
            &rule,
            format!(r#"[{{"event":"{event}","errno":{errno},"once":{once}}}]"#),
        )
        .unwrap();
        Self { rule }
    }

    fn log(&self) -> PathBuf {
        PathBuf::from(format!("{}.log", self.rule.display()))
    }

    /// How many qemu-img calls went through blkdebug.
    fn injected(&self) -> usize {
        std::fs::read_to_string(self.log())
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.log());
        let _ = std::fs::remove_file(&self.rule);
    }
}

/// Asks for `action` on snapshot `id` of volume `a` and waits for the answer.
async fn ask(
    h: &mut Harness,
    id: Uuid,
    action: VolumesSnapshotAction,
    a: &VolumeConfig,
    counter: u64,
) -> cairn_types::snapshot::VolumesSnapshotStatus {
    h.snapshot_configs
        .publish(request(id, action, &[a], counter))
        .await
        .unwrap();
    h.answer(id, action, counter).await
}

/// `qemu-img check`'s verdict: None when clean, else what it printed.
fn check(file: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(file)
        .output()
        .unwrap();
    (!out.status.success()).then(|| {
        format!(
            "exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or(""),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })
}

/// A volume with data, snapshot `kept` taken of it, then newer data: every operation below
/// has metadata to write.
async fn prepared(h: &mut Harness) -> (VolumeConfig, PathBuf, Uuid) {
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = h.ready(&a).await.file_location;
    qcow2_write(&file, 1, 4 * MIB);
    let kept = Uuid::new_v4();
    let s = ask(h, kept, Create, &a, 1).await;
    assert!(!s.error.is_error(), "{s:?}");
    qcow2_write(&file, 2, 4 * MIB);
    (a, file, kept)
}

/// One fault on one operation, checked; returns the figure line.
async fn fault_case(action: VolumesSnapshotAction, event: &str, errno: i32, once: bool) -> String {
    let mut h = Harness::new().await;
    let rules = h.root.path().join("blkdebug");
    let _agent = agent(&h, &rules);
    let (a, file, kept) = prepared(&mut h).await;
    // Create makes a new snapshot; rollback and delete act on the one kept.
    let id = if action == Create {
        Uuid::new_v4()
    } else {
        kept
    };
    let case = format!("{action:?} {event} errno={errno} once={once}");
    let fault = Fault::new(&rules, &file, event, errno, once);
    let s = ask(&mut h, id, action, &a, 2).await;
    assert!(
        fault.injected() > 0,
        "{case}: the rule reached no qemu-img call"
    );
    let text = format!("{} {:?}", s.error.error, s.volume_errors);
    drop(fault);

    assert_eq!(
        check(&file),
        None,
        "{case}: the image is left inconsistent ({text})"
    );
    let tags = qcow2_tags(&file);
    let record = h.record(id);
    let recorded = record
        .as_ref()
        .is_some_and(|r| r.volume_snapshot_meta.contains_key(&a.volume_id));
    assert_eq!(
        tags.contains(&id.to_string()),
        recorded,
        "{case}: tags {tags:?} and record {record:?} disagree ({text})"
    );
    let reason = if s.error.is_error() {
        let fault_words = match errno {
            EIO => "Input/output error",
            _ => "No space left on device",
        };
        assert!(
            text.contains(fault_words),
            "{case}: the fault is not named: {text}"
        );
        assert!(
            text.contains(&a.volume_id.to_string()),
            "{case}: the volume is not named: {text}"
        );
        assert!(
            !text.contains("does not exist"),
            "{case}: an I/O fault reported as a missing snapshot: {text}"
        );
        let repaired = if text.contains("refcounts repaired") {
            ", image repaired"
        } else {
            ", nothing to repair"
        };
        format!("failed, the volume and the fault named{repaired}")
    } else {
        // A delete whose tag went before the failing write (or that met no such write): the
        // snapshot is gone, so is its record.
        assert_eq!(action, Delete, "{case}: a fault that failed nothing");
        assert!(
            record.is_none(),
            "{case}: a record left for a deleted snapshot"
        );
        "deleted: the tag was gone, the record removed".into()
    };
    // Asked again without the fault (a new request counter), the operation succeeds.
    let again = ask(&mut h, id, action, &a, 3).await;
    assert!(
        !again.error.is_error(),
        "{case}: the retry failed: {again:?}"
    );
    assert_eq!(check(&file), None, "{case}: after the retry");
    assert_eq!(
        qcow2_tags(&file).contains(&id.to_string()),
        action != Delete,
        "{case}: after the retry"
    );
    format!("{case}: {reason}")
}

async fn run(action: VolumesSnapshotAction, cases: &[(&str, i32, bool)]) {
    for (event, errno, once) in cases {
        let line = fault_case(action, event, *errno, *once).await;
        println!("blkdebug {line}");
    }
}

#[tokio::test]
async fn a_failed_qcow2_metadata_write_during_create_leaves_no_tag_no_record_and_a_clean_image() {
    run(
        Create,
        &[
            ("l2_update", EIO, true),
            ("l2_update", ENOSPC, false),
            ("refblock_update_part", EIO, true),
            ("flush_to_os", ENOSPC, true),
            ("cluster_alloc", ENOSPC, true),
            ("l2_load", EIO, true),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failed_qcow2_metadata_write_during_rollback_is_reported_as_such_and_leaves_a_clean_image()
 {
    run(
        Rollback,
        &[
            ("flush_to_os", EIO, true),
            ("pwritev", ENOSPC, true),
            ("refblock_update_part", EIO, true),
            ("l2_load", EIO, false),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_failed_qcow2_metadata_write_during_delete_leaves_the_record_and_the_tags_agreeing() {
    run(
        Delete,
        &[
            ("l2_update", EIO, true),
            ("l2_update", ENOSPC, false),
            ("refblock_update_part", EIO, true),
            ("cluster_free", EIO, false),
            ("cluster_alloc", ENOSPC, true),
            ("pwritev", EIO, true),
        ],
    )
    .await;
}

/// Leaked clusters left by a writer that stopped half-way while the agent was down (here a
/// `qemu-img snapshot -c` whose refcount write failed, as a power cut under it leaves them) are
/// repaired when the agent takes the volume up again, and the data is untouched. An image a
/// running VM holds is another case: its lock keeps the check away (`mend_leaks`).
#[tokio::test]
async fn leaked_clusters_left_while_the_agent_was_down_are_repaired_when_it_takes_the_volume_up() {
    let mut h = Harness::new().await;
    let agent = h.agent(None);
    let a = volume(VolumeFormat::Qcow2, 64 * MIB);
    h.volume_configs.publish(a.clone()).await.unwrap();
    let file = h.ready(&a).await.file_location;
    qcow2_write(&file, 1, 4 * MIB);
    drop(agent);

    let wrapped = format!(
        r#"json:{{"file":{{"driver":"blkdebug","inject-error":[{{"event":"refblock_update_part","errno":{EIO},"once":true}}],"image":{{"driver":"file","filename":"{}"}}}}}}"#,
        file.display()
    );
    let cut = Command::new("qemu-img")
        .args(["snapshot", "-c", "cut-short", &wrapped])
        .output()
        .unwrap();
    assert!(!cut.status.success(), "the faulted snapshot went through");
    // Leaked clusters (refcounts above the references), and with them copied-flags that no
    // longer match the refcounts: what leak repair mends.
    let leaked = check(&file).expect("the cut-short snapshot left the image clean");
    assert!(leaked.contains("Leaked cluster"), "{leaked}");

    let _agent = h.agent(None);
    let deadline = std::time::Instant::now() + WAIT;
    while let Some(found) = check(&file) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not repair the leaks: {found}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(qcow2_reads(&file, 1, 4 * MIB), "the data changed");
    assert!(
        !qcow2_tags(&file).contains(&"cut-short".to_string()),
        "the cut-short snapshot is there"
    );
}

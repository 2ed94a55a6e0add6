//! A full disk: a real, tiny tmpfs. The write fails with an error that says the disk is full,
//! names the record, and loses nothing: the previous record still loads and no temp file stays.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_persist::{ErrorKind, Persist, load, store, store_with_backup};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "Blob", version = 1)]
struct Blob {
    #[persist(mandatory)]
    generation: u32,
    data: String,
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount(8) runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        TinyFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
}

#[test]
fn full_disk_fails_clearly_and_keeps_the_previous_record() {
    let fs = TinyFs::mount("64k");
    let path = fs.path().join("status.json");
    let small = Blob {
        generation: 1,
        data: "a".repeat(1000),
    };
    store(&path, &small).unwrap();

    let huge = Blob {
        generation: 2,
        data: "b".repeat(256 * 1024),
    };
    let err = store(&path, &huge).unwrap_err();
    match &err.kind {
        ErrorKind::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(28)),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("Blob record")
            && text.contains("status.json")
            && text.contains("disk is full"),
        "{text}"
    );
    assert_eq!(load::<Blob>(&path).unwrap().record, small);
    assert_eq!(entries(fs.path()), vec![path.clone()]);

    // With a backup, the failed write must not disturb the primary or leave staging files.
    let err = store_with_backup(&path, &huge).unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Io { .. }), "{err}");
    assert_eq!(load::<Blob>(&path).unwrap().record, small);
    assert_eq!(entries(fs.path()), vec![path]);
}

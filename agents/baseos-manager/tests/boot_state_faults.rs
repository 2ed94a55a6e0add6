//! The trial mark written on a disk that fails: the boot state lives on the lazy file system
//! (`cairn-lazyfs`, FUSE), where a failed fsync leaves the write in the page cache, read by
//! everyone but not durable, as on a real disk. Each request the install makes there is failed
//! with EIO in turn, and then the power is cut: whatever the install answered, the boot state
//! read before and after the cut agrees with it (installed: slot B marked for trial; failed:
//! not marked). Before, a failed fsync of the mark answered "failed" while the mark read back,
//! and a reboot could boot the slot the device had reported as failed.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

use std::path::Path;

use cairn_baseos_manager::bootstate::{BootState, SECTOR, Slot};
use cairn_baseos_manager::bundle::{self, Reading, SigningKey};
use cairn_baseos_manager::disk::BootDisk;
use cairn_baseos_manager::install;
use cairn_lazyfs::{LazyFs, fuse_unusable};

fn initial_state(path: &Path, fs: &LazyFs) {
    let mut bytes = vec![0u8; 2 * SECTOR];
    bytes[SECTOR..].copy_from_slice(&BootState::initial().encode());
    std::fs::write(path, bytes).unwrap();
    fs.sync();
}

#[test]
fn a_failed_write_of_the_trial_mark_leaves_a_boot_state_that_agrees_with_the_answer() {
    if let Some(why) = fuse_unusable() {
        eprintln!("SKIPPED: needs FUSE: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    std::fs::create_dir_all(&disk).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = LazyFs::mount(&disk, &mnt).unwrap();
    let boot = BootDisk {
        state: mnt.join("state"),
        slot_a: dir.path().join("slot-a"),
        slot_b: dir.path().join("slot-b"),
    };
    for slot in [&boot.slot_a, &boot.slot_b] {
        std::fs::File::create(slot)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
    }
    let key_path = dir.path().join("signing.pem");
    std::fs::write(&key_path, SigningKey::generate_pem().unwrap()).unwrap();
    let key = SigningKey::load(&key_path).unwrap();
    let root: Vec<u8> = (0..1_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(dir.path().join("root"), &root).unwrap();
    std::fs::write(dir.path().join("manifest"), "manifest\n").unwrap();
    let bundle_path = dir.path().join("update.bundle");
    bundle::create(
        &key,
        "0.2.0",
        1,
        &dir.path().join("manifest"),
        &dir.path().join("root"),
        &bundle_path,
    )
    .unwrap();
    let run = || {
        install::install(
            &bundle_path,
            Reading::File,
            &key.public_key(),
            &boot,
            Slot::A,
            None,
            &mut |_| {},
        )
    };

    // Once without a fault: the requests the install makes on the boot state.
    initial_state(&boot.state, &fs);
    fs.reset_ops();
    run().unwrap();
    let requests = fs.ops();
    println!(
        "the install's requests on the boot state: {:?}",
        fs.op_log()
    );
    assert!(requests >= 2, "{:?}", fs.op_log());

    for n in 1..=requests {
        initial_state(&boot.state, &fs);
        fs.fail_at(n);
        let answer = run();
        let marked = |state: BootState| state.trial == Some(Slot::B);
        let read = BootState::read(&boot.state).unwrap();
        fs.crash_now();
        fs.reboot().unwrap();
        let after_cut = BootState::read(&boot.state).unwrap();
        match &answer {
            Ok(done) => {
                assert!(
                    marked(read.clone()),
                    "request {n}: installed, but read {read:?}"
                );
                assert!(
                    marked(after_cut.clone()),
                    "request {n}: installed, but after a power cut {after_cut:?}"
                );
                assert_eq!(done.state, after_cut, "request {n}");
            }
            Err(e) => {
                assert!(
                    !marked(read.clone()),
                    "request {n}: failed ({e}), but the mark reads back: {read:?}"
                );
                assert!(
                    !marked(after_cut.clone()),
                    "request {n}: failed ({e}), but after a power cut {after_cut:?}"
                );
            }
        }
        println!(
            "request {n} failed with EIO: {}",
            answer.map_or_else(|e| format!("install failed: {e}"), |_| "installed".into())
        );
    }
    fs.unmount().unwrap();
}

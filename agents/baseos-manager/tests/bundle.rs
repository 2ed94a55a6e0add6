#![allow(clippy::disallowed_methods, clippy::unwrap_used)]
//! Bundles signed with a throwaway key in a temporary directory, installed into slot files:
//! what is refused is refused before a byte of the slot or the boot state changes.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cairn_baseos_manager::bootstate::{BootState, SECTOR, Slot};
use cairn_baseos_manager::bundle::{self, BundleError, PublicKey, Reading, SigningKey};
use cairn_baseos_manager::disk::{self, BootDisk};
use cairn_baseos_manager::install::{self, InstallError};

struct Fixture {
    dir: tempfile::TempDir,
    key: SigningKey,
    disk: BootDisk,
}

const SLOT_BYTES: u64 = 4 << 20;

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("signing.pem");
    std::fs::write(&key_path, SigningKey::generate_pem().unwrap()).unwrap();
    let key = SigningKey::load(&key_path).unwrap();
    let disk = BootDisk {
        state: dir.path().join("state"),
        slot_a: dir.path().join("slot-a"),
        slot_b: dir.path().join("slot-b"),
    };
    let mut state = vec![0u8; 2 * SECTOR];
    state[SECTOR..].copy_from_slice(&BootState::initial().encode());
    std::fs::write(&disk.state, state).unwrap();
    for slot in [&disk.slot_a, &disk.slot_b] {
        let f = std::fs::File::create(slot).unwrap();
        f.set_len(SLOT_BYTES).unwrap();
    }
    // Slot B holds an older image: its bytes must survive a refused install.
    std::fs::write(&disk.slot_b, vec![0x5a; SLOT_BYTES as usize]).unwrap();
    Fixture { dir, key, disk }
}

/// A root image of `len` pseudo-random bytes and a manifest, bundled and signed.
fn make_bundle(f: &Fixture, key: &SigningKey, len: usize) -> (PathBuf, Vec<u8>) {
    let root: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let root_path = f.dir.path().join("root.squashfs");
    let manifest_path = f.dir.path().join("manifest.txt");
    std::fs::write(&root_path, &root).unwrap();
    std::fs::write(&manifest_path, "Cairn device image manifest\n").unwrap();
    let out = f.dir.path().join("update.bundle");
    bundle::create(key, "0.2.0", 42, &manifest_path, &root_path, &out).unwrap();
    (out, root)
}

fn flip_byte(path: &Path, offset_from_end: u64) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = file.seek(SeekFrom::End(0)).unwrap();
    let at = len - offset_from_end;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut file, &mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ 0x01]).unwrap();
}

fn run_install(f: &Fixture, path: &Path) -> Result<install::Installed, InstallError> {
    install::install(
        path,
        Reading::File,
        &f.key.public_key(),
        &f.disk,
        Slot::A,
        None,
        &mut |_| {},
    )
}

/// The slot B and boot state bytes, to compare before and after a refused install.
fn untouched(f: &Fixture) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(&f.disk.slot_b).unwrap(),
        std::fs::read(&f.disk.state).unwrap(),
    )
}

#[test]
fn a_signed_bundle_installs_into_the_other_slot_and_marks_it_for_one_trial() {
    let f = fixture();
    let (path, root) = make_bundle(&f, &f.key, 1_500_000);
    let done = run_install(&f, &path).unwrap();
    assert_eq!(done.slot, Slot::B);
    let slot = std::fs::read(&f.disk.slot_b).unwrap();
    assert_eq!(&slot[..root.len()], &root[..]);
    let state = BootState::read(&f.disk.state).unwrap();
    assert_eq!(
        (state.committed, state.trial, state.tries),
        (Slot::A, Some(Slot::B), 1)
    );
    assert_eq!(done.verified.header.version, "0.2.0");
}

#[test]
fn a_bundle_signed_by_another_key_is_refused_before_a_byte_is_written() {
    let f = fixture();
    let stranger_path = f.dir.path().join("stranger.pem");
    std::fs::write(&stranger_path, SigningKey::generate_pem().unwrap()).unwrap();
    let stranger = SigningKey::load(&stranger_path).unwrap();
    let (path, _) = make_bundle(&f, &stranger, 100_000);
    let before = untouched(&f);
    let err = run_install(&f, &path).unwrap_err();
    assert!(
        matches!(err, InstallError::Bundle(BundleError::BadSignature { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("update.bundle"), "{err}");
    assert_eq!(untouched(&f), before);
}

#[test]
fn one_corrupted_byte_in_the_root_image_is_refused_before_a_byte_is_written() {
    let f = fixture();
    let (path, _) = make_bundle(&f, &f.key, 1_500_000);
    flip_byte(&path, 1000);
    let before = untouched(&f);
    let err = run_install(&f, &path).unwrap_err();
    match &err {
        InstallError::Bundle(BundleError::WrongHash { part, .. }) => {
            assert_eq!(*part, "root image")
        }
        other => panic!("not a hash error: {other}"),
    }
    assert_eq!(untouched(&f), before);
}

#[test]
fn a_changed_header_byte_breaks_the_signature() {
    let f = fixture();
    let (path, _) = make_bundle(&f, &f.key, 10_000);
    let len = std::fs::metadata(&path).unwrap().len();
    // The header's last byte (its closing brace) sits right before the signature and payloads.
    flip_byte(&path, 10_000 + 28 + 64 + 1);
    let err = bundle::verify(&path, &f.key.public_key(), Reading::File).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[test]
fn a_truncated_or_extended_bundle_is_refused() {
    let f = fixture();
    let (path, _) = make_bundle(&f, &f.key, 10_000);
    let key = f.key.public_key();
    let bytes = std::fs::read(&path).unwrap();
    let short = f.dir.path().join("short.bundle");
    std::fs::write(&short, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        bundle::verify(&short, &key, Reading::File),
        Err(BundleError::WrongLength { .. })
    ));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(bytes.len() as u64 + 512).unwrap();
    assert!(matches!(
        bundle::verify(&path, &key, Reading::File),
        Err(BundleError::WrongLength { .. })
    ));
    // On a block device, zeros after the bundle are the device's, not the bundle's.
    bundle::verify(&path, &key, Reading::Device).unwrap();
}

#[test]
fn the_committed_slot_is_never_the_target() {
    let f = fixture();
    let (path, _) = make_bundle(&f, &f.key, 10_000);
    let before = std::fs::read(&f.disk.slot_a).unwrap();
    // Running B while A is committed: B must be on trial, so no second update.
    let err = install::install(
        &path,
        Reading::File,
        &f.key.public_key(),
        &f.disk,
        Slot::B,
        None,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, InstallError::TargetCommitted { .. }), "{err}");
    assert_eq!(std::fs::read(&f.disk.slot_a).unwrap(), before);
}

#[test]
fn a_public_key_file_must_be_64_hex_digits() {
    let key = fixture().key.public_key();
    assert_eq!(PublicKey::parse(&key.to_hex(), "k").unwrap(), key);
    assert!(PublicKey::parse("abcd", "k").is_err());
    assert!(PublicKey::parse(&"zz".repeat(32), "k").is_err());
}

#[test]
fn a_torn_boot_state_write_leaves_the_previous_state() {
    let f = fixture();
    let state = BootState::read(&f.disk.state).unwrap();
    let marked = state
        .mark_trial(Slot::B, 1)
        .write_next(&f.disk.state, state.seq)
        .unwrap();
    assert_eq!(BootState::read(&f.disk.state).unwrap(), marked);
    // A cut in the middle of the next write: half of its sector new, half old.
    let next = marked.commit(Slot::B);
    let mut bytes = std::fs::read(&f.disk.state).unwrap();
    let copy = ((marked.seq + 1) % 2) as usize * SECTOR;
    let encoded = BootState {
        seq: marked.seq + 1,
        ..next
    }
    .encode();
    bytes[copy..copy + 40].copy_from_slice(&encoded[..40]);
    std::fs::write(&f.disk.state, &bytes).unwrap();
    assert_eq!(BootState::read(&f.disk.state).unwrap(), marked);
}

#[test]
fn a_boot_disk_image_has_three_partitions_and_slot_a_committed() {
    let f = fixture();
    let root = f.dir.path().join("root.img");
    std::fs::write(&root, b"hsqs and the rest of a root image").unwrap();
    let image = f.dir.path().join("disk.img");
    disk::make_image(&image, &root, 2).unwrap();
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len(), 6 << 20);
    assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
    let lba = |i: usize| u32::from_le_bytes(bytes[454 + 16 * i..458 + 16 * i].try_into().unwrap());
    assert_eq!((lba(0), lba(1), lba(2)), (2048, 4096, 8192));
    let state_at = 1 << 20;
    let state = std::fs::write(f.dir.path().join("p1"), &bytes[state_at..state_at + 1024]);
    state.unwrap();
    let state = BootState::read(&f.dir.path().join("p1")).unwrap();
    assert_eq!((state.committed, state.trial), (Slot::A, None));
    assert_eq!(&bytes[2 << 20..(2 << 20) + 4], b"hsqs");
    assert!(disk::make_image(&image, &f.dir.path().join("missing"), 2).is_err());
}

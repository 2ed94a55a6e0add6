//! Installing a bundle into the inactive slot, crash-safely:
//!
//! 1. the bundle's signature and both hashes are checked (`bundle::verify`): nothing is
//!    written before;
//! 2. a trial still pointing at the target slot is cleared in the boot state, so a slot that is
//!    about to be half-written is never booted;
//! 3. the root image is copied into the slot (hashed again on the way: the bundle file may have
//!    changed since step 1) and synced;
//! 4. the slot is read back and hashed;
//! 5. only then the boot state marks the slot for trial.
//!
//! A power cut before 5 leaves the committed slot as the one that boots, and the install can
//! simply run again; the running slot is never opened for writing.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::bootstate::{BootState, BootStateError, Slot};
use crate::bundle::{self, BundleError, PublicKey, Reading, Verified};
use crate::disk::BootDisk;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    BootState(#[from] BootStateError),
    #[error("slot {slot} is the committed slot: an update goes to the other one")]
    TargetCommitted { slot: &'static str },
    #[error(
        "slot {running} is on trial: commit it or let it roll back before installing another update"
    )]
    RunningOnTrial { running: &'static str },
    #[error(
        "bundle {path}: its root image ({size} bytes) is larger than slot {slot} ({slot_size} bytes)"
    )]
    TooLarge {
        path: String,
        size: u64,
        slot: &'static str,
        slot_size: u64,
    },
    #[error(
        "bundle {path} holds version {actual}, the update asks for {expected}: nothing was written"
    )]
    WrongVersion {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("writing slot {slot} ({device}): {source}")]
    Write {
        slot: &'static str,
        device: String,
        source: io::Error,
    },
    #[error("slot {slot} ({device}) reads back with sha256 {actual}, the bundle says {expected}")]
    ReadBack {
        slot: &'static str,
        device: String,
        expected: String,
        actual: String,
    },
}

/// What an install did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub slot: Slot,
    pub verified: Verified,
    pub state: BootState,
    pub verify_time: Duration,
    pub write_time: Duration,
}

/// Installs the bundle at `bundle_path` into the slot that is not `running`, and marks it for
/// one trial boot. `expect_version`: the bundle's signed version must be this one (the
/// controller's `base_os_version`), checked before anything is written. `progress` hears each
/// step (for the log and the status).
pub fn install(
    bundle_path: &Path,
    reading: Reading,
    key: &PublicKey,
    disk: &BootDisk,
    running: Slot,
    expect_version: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<Installed, InstallError> {
    let target = running.other();
    let state = BootState::read(&disk.state)?;
    if state.committed == target {
        return Err(InstallError::TargetCommitted {
            slot: target.label(),
        });
    }
    if state.trial == Some(running) {
        return Err(InstallError::RunningOnTrial {
            running: running.label(),
        });
    }
    progress("verifying the bundle's signature and hashes");
    let started = Instant::now();
    let verified = bundle::verify(bundle_path, key, reading)?;
    let verify_time = started.elapsed();
    if let Some(expected) = expect_version
        && verified.header.version != expected
    {
        return Err(InstallError::WrongVersion {
            path: bundle_path.display().to_string(),
            expected: expected.into(),
            actual: verified.header.version.clone(),
        });
    }
    let device = disk.slot(target);
    let device_name = device.display().to_string();
    let write_err = |source| InstallError::Write {
        slot: target.label(),
        device: device_name.clone(),
        source,
    };
    let slot_size = File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(write_err)?;
    if verified.header.root.size > slot_size {
        return Err(InstallError::TooLarge {
            path: bundle_path.display().to_string(),
            size: verified.header.root.size,
            slot: target.label(),
            slot_size,
        });
    }

    let state = if state.trial == Some(target) {
        progress("clearing the earlier trial of the target slot");
        state.clear_trial().write_next(&disk.state, state.seq)?
    } else {
        state
    };

    progress(&format!(
        "writing {} bytes into slot {} ({device_name})",
        verified.header.root.size,
        target.label()
    ));
    let started = Instant::now();
    let written = copy_root(bundle_path, &verified, device).map_err(write_err)?;
    let expected = &verified.header.root.sha256;
    if &written != expected {
        // The bundle changed under us after its check: nothing is marked, the slot is junk.
        return Err(InstallError::Bundle(BundleError::WrongHash {
            path: bundle_path.display().to_string(),
            part: "root image (while writing)",
            expected: expected.clone(),
            actual: written,
        }));
    }
    let (_, back) = File::open(device)
        .and_then(|mut f| bundle::hash_stream(&mut f, verified.header.root.size))
        .map_err(write_err)?;
    if &back != expected {
        return Err(InstallError::ReadBack {
            slot: target.label(),
            device: device_name,
            expected: expected.clone(),
            actual: back,
        });
    }
    let write_time = started.elapsed();

    progress(&format!(
        "marking slot {} for one trial boot",
        target.label()
    ));
    let state = match state
        .mark_trial(target, 1)
        .write_next(&disk.state, state.seq)
    {
        Ok(state) => state,
        Err(first) => {
            // A failed fsync can leave the mark in the page cache: read (and perhaps booted)
            // though never made durable. Written once more, so that what is read is synced;
            // failing again, the mark is taken back so that a failed install marks nothing.
            progress(&format!(
                "{first}; writing the boot state again to mark slot {}",
                target.label()
            ));
            mark_again(&disk.state, target)?
        }
    };
    Ok(Installed {
        slot: target,
        verified,
        state,
        verify_time,
        write_time,
    })
}

/// The trial mark of `target` written over whatever the boot state reads now; if that fails
/// too, a mark that reads back is cleared (best effort) and the second error returned.
fn mark_again(device: &Path, target: Slot) -> Result<BootState, BootStateError> {
    let now = BootState::read(device)?;
    match now.mark_trial(target, 1).write_next(device, now.seq) {
        Ok(state) => Ok(state),
        Err(e) => {
            if let Ok(now) = BootState::read(device)
                && now.trial == Some(target)
            {
                let _ = now.clear_trial().write_next(device, now.seq);
            }
            Err(e)
        }
    }
}

/// Copies the root image from the bundle into the slot; returns the sha256 of what was written.
fn copy_root(bundle_path: &Path, verified: &Verified, device: &Path) -> io::Result<String> {
    let mut from = File::open(bundle_path)?;
    from.seek(SeekFrom::Start(
        verified.header.root_offset(verified.header_len),
    ))?;
    let mut to = OpenOptions::new().write(true).open(device)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let total = verified.header.root.size;
    let mut left = total;
    while left > 0 {
        if left <= total / 2 && left + buf.len() as u64 > total / 2 {
            // A kill with half the slot written: a restarted install must write it all again.
            cairn_persist::crash_point("baseos-manager:slot-half-written");
        }
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        from.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        to.write_all(&buf[..want])?;
        left -= want as u64;
    }
    #[allow(clippy::disallowed_methods)] // sync by design: callers run it on the blocking pool
    to.sync_all()?;
    Ok(bundle::hex(&hasher.finalize()))
}

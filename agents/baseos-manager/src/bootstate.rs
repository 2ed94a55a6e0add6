//! The boot state: which root slot is committed, which one (if any) is on trial with how many
//! boots left, and which one last failed its trial. EVE keeps this in GPT partition attributes
//! (zboot/cgpt: priority, tries, successful); Cairn keeps it in the boot disk's first
//! partition, read by the initramfs's selector (`images/device/initramfs-init`) before any
//! root is mounted, and written by it (the try counter) and by the baseos-manager.
//!
//! Two copies, one per 512-byte sector; each is text ending in a sha256 line:
//!
//! ```text
//! CAIRN-BOOT 1
//! seq 7
//! committed A
//! trial B
//! tries 1
//! failed -
//! sum <sha256 of the lines above, newlines included>
//! ```
//!
//! then zeros to 512 bytes. A writer writes copy `seq % 2` with `seq` one above the newest
//! valid copy, so the other copy is always the previous good state: a write torn by a power cut
//! fails its sum and the reader takes the other one.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

pub const SECTOR: usize = 512;
const MAGIC_LINE: &str = "CAIRN-BOOT 1";

/// A root slot: EVE's partition labels IMGA and IMGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// EVE's partition label.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "IMGA",
            Slot::B => "IMGB",
        }
    }

    pub fn parse(text: &str) -> Option<Slot> {
        match text.trim() {
            "A" | "IMGA" => Some(Slot::A),
            "B" | "IMGB" => Some(Slot::B),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    pub seq: u64,
    pub committed: Slot,
    pub trial: Option<Slot>,
    /// Boots left for the trial slot; the selector takes one before booting it.
    pub tries: u32,
    /// The slot whose last trial failed (cleared by a commit).
    pub failed: Option<Slot>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootStateError {
    #[error("cannot access the boot state on {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the boot state on {path} has no valid copy (both sums wrong or blank)")]
    NoValidCopy { path: String },
}

fn slot_or_dash(slot: Option<Slot>) -> &'static str {
    slot.map_or("-", Slot::letter)
}

impl BootState {
    /// A fresh disk: slot A committed, nothing on trial.
    pub fn initial() -> Self {
        BootState {
            seq: 1,
            committed: Slot::A,
            trial: None,
            tries: 0,
            failed: None,
        }
    }

    /// The sector's bytes.
    pub fn encode(&self) -> [u8; SECTOR] {
        let body = format!(
            "{MAGIC_LINE}\nseq {}\ncommitted {}\ntrial {}\ntries {}\nfailed {}\n",
            self.seq,
            self.committed.letter(),
            slot_or_dash(self.trial),
            self.tries,
            slot_or_dash(self.failed),
        );
        let text = format!("{body}sum {}\n", crate::bundle::hex(&Sha256::digest(&body)));
        let mut sector = [0u8; SECTOR];
        sector[..text.len()].copy_from_slice(text.as_bytes());
        sector
    }

    /// One copy, or `None` when blank, torn or not ours.
    pub fn decode(sector: &[u8]) -> Option<Self> {
        let end = sector.iter().position(|&b| b == 0).unwrap_or(sector.len());
        let text = std::str::from_utf8(&sector[..end]).ok()?;
        let (body, sum_line) = text.trim_end_matches('\n').rsplit_once('\n')?;
        let body = format!("{body}\n");
        let sum = sum_line.strip_prefix("sum ")?;
        if sum != crate::bundle::hex(&Sha256::digest(&body)) {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != MAGIC_LINE {
            return None;
        }
        let mut field = |name: &str| -> Option<String> {
            Some(
                lines
                    .next()?
                    .strip_prefix(name)?
                    .strip_prefix(' ')?
                    .to_string(),
            )
        };
        let seq = field("seq")?.parse().ok()?;
        let committed = Slot::parse(&field("committed")?)?;
        let trial = field("trial")?;
        let tries = field("tries")?.parse().ok()?;
        let failed = field("failed")?;
        Some(BootState {
            seq,
            committed,
            trial: Slot::parse(&trial),
            tries,
            failed: Slot::parse(&failed),
        })
    }

    /// The newest valid copy of the two sectors at the start of `device`.
    pub fn read(device: &Path) -> Result<Self, BootStateError> {
        let path = device.display().to_string();
        let io = |source| BootStateError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(device).map_err(io)?;
        let mut sectors = [0u8; 2 * SECTOR];
        file.read_exact(&mut sectors).map_err(io)?;
        let copies = [
            Self::decode(&sectors[..SECTOR]),
            Self::decode(&sectors[SECTOR..]),
        ];
        copies
            .into_iter()
            .flatten()
            .max_by_key(|state| state.seq)
            .ok_or(BootStateError::NoValidCopy { path })
    }

    /// Writes `self` with the next sequence number into the older copy's sector and syncs it;
    /// returns what was written.
    pub fn write_next(mut self, device: &Path, current_seq: u64) -> Result<Self, BootStateError> {
        self.seq = current_seq + 1;
        let path = device.display().to_string();
        let io = |source| BootStateError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new().write(true).open(device).map_err(io)?;
        file.seek(SeekFrom::Start((self.seq % 2) * SECTOR as u64))
            .map_err(io)?;
        file.write_all(&self.encode()).map_err(io)?;
        #[allow(clippy::disallowed_methods)] // sync by design: callers run it on the blocking pool
        file.sync_all().map_err(io)?;
        Ok(self)
    }

    /// Marks `slot` for trial: the selector boots it `tries` times at most, then the committed
    /// slot again unless a commit came first.
    pub fn mark_trial(&self, slot: Slot, tries: u32) -> Self {
        BootState {
            trial: Some(slot),
            tries,
            failed: None,
            ..self.clone()
        }
    }

    /// Nothing on trial (before a slot is rewritten, so a half-written slot is never booted).
    pub fn clear_trial(&self) -> Self {
        BootState {
            trial: None,
            tries: 0,
            ..self.clone()
        }
    }

    /// `slot` becomes the committed one.
    pub fn commit(&self, slot: Slot) -> Self {
        BootState {
            committed: slot,
            trial: None,
            tries: 0,
            failed: None,
            ..self.clone()
        }
    }

    /// The trial of `slot` failed: back to the committed slot at the next boot.
    pub fn fail_trial(&self, slot: Slot) -> Self {
        BootState {
            trial: None,
            tries: 0,
            failed: Some(slot),
            ..self.clone()
        }
    }
}

//! The boot disk's layout: an MBR with three partitions, the boot state and two root slots
//! (EVE's IMGA and IMGB). `/persist` stays on its own disk, untouched by an update.
//!
//! ```text
//! partition 1  boot state   1 MiB at 1 MiB   (crate::bootstate)
//! partition 2  slot A       SLOT MiB         a squashfs root image (IMGA)
//! partition 3  slot B       SLOT MiB         the other one (IMGB)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::bootstate::{BootState, SECTOR, Slot};

const MIB: u64 = 1 << 20;
/// The MBR partition type of all three: Linux.
const LINUX: u8 = 0x83;

/// Where the boot state and the two slots are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    pub state: PathBuf,
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
}

impl BootDisk {
    /// The partitions of a whole disk: `/dev/vda` gives `/dev/vda1` to `/dev/vda3` (a name
    /// ending in a digit, as nvme0n1, takes a `p`).
    pub fn partitions_of(disk: &Path) -> Self {
        let name = disk.display().to_string();
        let sep = if name.ends_with(|c: char| c.is_ascii_digit()) {
            "p"
        } else {
            ""
        };
        let part = |n: u32| PathBuf::from(format!("{name}{sep}{n}"));
        BootDisk {
            state: part(1),
            slot_a: part(2),
            slot_b: part(3),
        }
    }

    pub fn slot(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.slot_a,
            Slot::B => &self.slot_b,
        }
    }
}

/// Makes a boot disk image file: the partition table, slot A holding `root`, slot B empty,
/// the boot state "A committed". The file is sparse.
pub fn make_image(out: &Path, root: &Path, slot_mib: u64) -> io::Result<()> {
    let root_len = std::fs::metadata(root)?.len();
    if root_len > slot_mib * MIB {
        return Err(io::Error::other(format!(
            "{} is {root_len} bytes, over the {slot_mib} MiB slot",
            root.display()
        )));
    }
    let parts = [
        (MIB, MIB),
        (2 * MIB, slot_mib * MIB),
        ((2 + slot_mib) * MIB, slot_mib * MIB),
    ];
    let total = (2 + 2 * slot_mib) * MIB;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)?;
    file.set_len(total)?;
    let mut mbr = [0u8; SECTOR];
    for (i, (start, len)) in parts.iter().enumerate() {
        let entry = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
        // CHS fields unused (LBA only): the kernel reads start and length.
        entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[4] = LINUX;
        entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        let sectors = |bytes: u64| u32::try_from(bytes / SECTOR as u64).unwrap_or(u32::MAX);
        entry[8..12].copy_from_slice(&sectors(*start).to_le_bytes());
        entry[12..16].copy_from_slice(&sectors(*len).to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    file.write_all(&mbr)?;
    let state = BootState::initial();
    file.seek(SeekFrom::Start(
        parts[0].0 + (state.seq % 2) * SECTOR as u64,
    ))?;
    file.write_all(&state.encode())?;
    file.seek(SeekFrom::Start(parts[1].0))?;
    io::copy(&mut File::open(root)?, &mut file)?;
    file.flush()
}

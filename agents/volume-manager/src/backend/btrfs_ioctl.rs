//! The btrfs calls Cairn makes without the `btrfs` CLI: `BTRFS_IOC_SNAP_CREATE_V2` (the
//! ioctl `btrfs subvolume snapshot [-r]` makes) and `BTRFS_IOC_SNAP_DESTROY` (that of `btrfs
//! subvolume delete`). A live snapshot's pause makes the first, so the frozen container does not
//! wait for a process to be spawned and loaded; a rollback makes all three of its subvolume
//! operations this way (a writable snapshot, then the old content deleted), and a snapshot's
//! delete its one, each process spawned being the largest part of the step on a busy device.
//!
//! Their arguments are defined here from the kernel's uapi header (`include/uapi/linux/btrfs.h`,
//! a stable ABI since 2.6.37): libbtrfsutil's bindings would need libclang to build and a
//! shared library beside the agent in the device image, for two structs and two calls.
//! Creating a subvolume and a clone's snapshot keep the CLI: neither is on a path anyone waits
//! on twice.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

/// `BTRFS_SUBVOL_NAME_MAX`: the longest subvolume name, without its NUL.
const SUBVOL_NAME_MAX: usize = 4039;

/// `BTRFS_SUBVOL_RDONLY`: the snapshot is read-only from its first moment.
const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args_v2`, its two unions as the members this call uses: the
/// qgroup-inherit part as the `unused[4]` it shares room with (zero: no qgroup inherit), and
/// `name` (the other members of that union, `devid` and `subvolid`, fit inside it).
#[repr(C)]
struct VolArgsV2 {
    /// An open descriptor of the subvolume to snapshot.
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    /// The new snapshot's name in the directory the ioctl is called on, NUL-terminated.
    name: [u8; SUBVOL_NAME_MAX + 1],
}

// The kernel reads exactly this many bytes (the size is part of the request number).
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::align_of::<VolArgsV2>() == 8);

/// `BTRFS_PATH_NAME_MAX`: the longest name `struct btrfs_ioctl_vol_args` holds, without its NUL.
const PATH_NAME_MAX: usize = 4087;

/// `struct btrfs_ioctl_vol_args`: the subvolume to delete, by its name in the directory the
/// ioctl is called on (`fd` is unused by this call).
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::align_of::<VolArgs>() == 8);

/// Whether this architecture encodes ioctl requests the generic way
/// (`include/uapi/asm-generic/ioctl.h`: direction in bits 30-31, write = 1; size in 16-29; type
/// in 8-15; number in 0-7). Architectures with another encoding use the CLI.
const GENERIC_IOCTL_ENCODING: bool = cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
));

/// `_IOW(BTRFS_IOCTL_MAGIC, nr, <a struct of size bytes>)`, where the encoding is the generic one.
const fn btrfs_iow(nr: u64, size: usize) -> Option<u64> {
    if GENERIC_IOCTL_ENCODING {
        Some((1 << 30) | ((size as u64) << 16) | (0x94 << 8) | nr)
    } else {
        None
    }
}

/// `_IOW(BTRFS_IOCTL_MAGIC, 23, struct btrfs_ioctl_vol_args_v2)`.
const SNAP_CREATE_V2: Option<u64> = btrfs_iow(23, std::mem::size_of::<VolArgsV2>());

/// `_IOW(BTRFS_IOCTL_MAGIC, 15, struct btrfs_ioctl_vol_args)`.
const SNAP_DESTROY: Option<u64> = btrfs_iow(15, std::mem::size_of::<VolArgs>());

/// A name the kernel takes for a subvolume in a directory: not empty, no `/`, no NUL, at most
/// `max` bytes.
fn check_name(name: &OsStr, max: usize) -> Result<&[u8], Errno> {
    let bytes = name.as_bytes();
    if bytes.len() > max {
        return Err(Errno::ENAMETOOLONG);
    }
    if bytes.is_empty() || bytes.contains(&0) || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(bytes)
}

/// Makes `name` in the directory `parent` a read-only snapshot of the subvolume `source`; when
/// the call returns, the snapshot is committed (the kernel commits the transaction for it).
/// Blocking. `Err(ENOTTY)` also when this build has no encoding for the request.
pub fn snapshot_read_only(source: &File, parent: &File, name: &OsStr) -> Result<(), Errno> {
    snapshot(source, parent, name, SUBVOL_RDONLY)
}

/// Makes `name` in the directory `parent` a writable snapshot of the subvolume `source` (what
/// a rollback puts in the volume's place), committed when the call returns. Blocking.
pub fn snapshot_writable(source: &File, parent: &File, name: &OsStr) -> Result<(), Errno> {
    snapshot(source, parent, name, 0)
}

fn snapshot(source: &File, parent: &File, name: &OsStr, flags: u64) -> Result<(), Errno> {
    let Some(request) = SNAP_CREATE_V2 else {
        return Err(Errno::ENOTTY);
    };
    let bytes = check_name(name, SUBVOL_NAME_MAX)?;
    let mut args = VolArgsV2 {
        fd: i64::from(source.as_raw_fd()),
        transid: 0,
        flags,
        unused: [0; 4],
        name: [0; SUBVOL_NAME_MAX + 1],
    };
    args.name[..bytes.len()].copy_from_slice(bytes);
    #[allow(unsafe_code)] // a system call nix has no wrapper for
    // SAFETY: `parent` is an open descriptor for the call's duration, and `args` is a
    // `btrfs_ioctl_vol_args_v2` laid out as the kernel reads it (size checked above), alive
    // and not moved while the kernel reads it; the kernel only reads it (an `_IOW` request).
    let done = unsafe {
        nix::libc::ioctl(
            parent.as_raw_fd(),
            request as _,
            std::ptr::from_mut(&mut args),
        )
    };
    Errno::result(done).map(drop)
}

/// Deletes the subvolume `name` in the directory `parent`, as `btrfs subvolume delete` does
/// (the kernel unlinks it at once and frees its extents in the background; no commit waited
/// for). Blocking. `Err(EINVAL)` for a name that is no subvolume (the kernel's answer too),
/// `Err(ENOTTY)` when this build has no encoding for the request.
pub fn destroy(parent: &File, name: &OsStr) -> Result<(), Errno> {
    let Some(request) = SNAP_DESTROY else {
        return Err(Errno::ENOTTY);
    };
    let bytes = check_name(name, PATH_NAME_MAX)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    };
    args.name[..bytes.len()].copy_from_slice(bytes);
    #[allow(unsafe_code)] // a system call nix has no wrapper for
    // SAFETY: `parent` is an open descriptor for the call's duration, and `args` is a
    // `btrfs_ioctl_vol_args` laid out as the kernel reads it (size checked above), alive and
    // not moved while the kernel reads it; the kernel only reads it (an `_IOW` request).
    let done = unsafe {
        nix::libc::ioctl(
            parent.as_raw_fd(),
            request as _,
            std::ptr::from_mut(&mut args),
        )
    };
    Errno::result(done).map(drop)
}

/// Whether an error of these calls says the call itself is not there (no btrfs
/// ioctl on this file, a kernel or filter without it, a flag it does not know), so that the
/// `btrfs` CLI should be tried; any other error is the snapshot's own and reported as is.
pub fn unavailable(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOTTY | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_request_number_is_the_kernels() {
        // BTRFS_IOC_SNAP_CREATE_V2 as the kernel headers evaluate it on x86_64.
        assert_eq!(SNAP_CREATE_V2, Some(0x5000_9417));
        // BTRFS_IOC_SNAP_DESTROY likewise.
        assert_eq!(SNAP_DESTROY, Some(0x5000_940f));
    }

    #[test]
    fn a_name_the_kernel_would_refuse_is_refused_before_the_call() {
        let dir = File::open(std::env::temp_dir()).unwrap();
        let long = "a".repeat(SUBVOL_NAME_MAX + 1);
        assert_eq!(
            snapshot_read_only(&dir, &dir, OsStr::new(&long)),
            Err(Errno::ENAMETOOLONG)
        );
        assert_eq!(
            snapshot_read_only(&dir, &dir, OsStr::new("a/b")),
            Err(Errno::EINVAL)
        );
        let long = "a".repeat(PATH_NAME_MAX + 1);
        assert_eq!(destroy(&dir, OsStr::new(&long)), Err(Errno::ENAMETOOLONG));
        assert_eq!(destroy(&dir, OsStr::new("a/b")), Err(Errno::EINVAL));
    }

    #[test]
    fn off_btrfs_the_call_is_unavailable_not_a_failure() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        if super::super::btrfs::is_btrfs(b.path()) {
            return; // the temporary directory is itself on btrfs: nothing to show here
        }
        let source = File::open(a.path()).unwrap();
        let parent = File::open(b.path()).unwrap();
        let e = snapshot_read_only(&source, &parent, OsStr::new("s")).unwrap_err();
        assert!(unavailable(e), "{e}");
        assert!(!b.path().join("s").exists());
    }
}

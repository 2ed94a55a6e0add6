//! Directory volumes in exports: the snapshot's tree as one zstd-compressed tar (the `tar`
//! crate: GNU headers for long names, PAX records for xattrs as `SCHILY.xattr.*` and for
//! nanosecond mtimes). Owners, modes, mtimes, symlinks, hard links (one `Link` entry per further
//! name of an inode, the tar crate does not find them itself) and xattrs survive; sockets are
//! skipped (a listener makes them again). The unpack sets ownership, modes and xattrs through the
//! tar crate, then every mtime (nanoseconds, directories after their content) itself: the crate
//! sets whole seconds only.

// Blocking file work: called on the blocking pool.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

/// The file name suffix of a tree in an export.
pub const TREE_SUFFIX: &str = ".tar.zst";
/// The PAX record carrying a nanosecond mtime (`<seconds>.<nanoseconds>`).
const PAX_MTIME: &str = "mtime";

/// Bytes of file data under `root` (what a tree's export reads; progress).
pub fn data_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

/// Writes the tree at `root` into `out` as a zstd tar. `progress` gets the file bytes read so
/// far and stops the write by returning false.
pub fn write(root: &Path, out: &Path, progress: &mut dyn FnMut(u64) -> bool) -> io::Result<()> {
    let file = std::fs::File::create(out)?;
    let encoder = zstd::Encoder::new(io::BufWriter::with_capacity(1 << 20, file), 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut writer = TreeWriter {
        builder,
        links: HashMap::new(),
        done: 0,
        progress,
    };
    writer.entry(root, Path::new("."))?;
    writer.dir(root, Path::new(""))?;
    let encoder = writer.builder.into_inner()?;
    let mut file = encoder.finish()?;
    file.flush()?;
    Ok(())
}

struct TreeWriter<'p, W: Write> {
    builder: tar::Builder<W>,
    /// The first name (relative) of each inode with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
    done: u64,
    progress: &'p mut dyn FnMut(u64) -> bool,
}

impl<W: Write> TreeWriter<'_, W> {
    fn dir(&mut self, path: &Path, rel: &Path) -> io::Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let child = path.join(&name);
            let child_rel = rel.join(&name);
            if self.entry(&child, &child_rel)? {
                self.dir(&child, &child_rel)?;
            }
        }
        Ok(())
    }

    /// Appends one entry; returns whether it is a directory to descend into.
    fn entry(&mut self, path: &Path, rel: &Path) -> io::Result<bool> {
        let meta = std::fs::symlink_metadata(path)?;
        let kind = meta.file_type();
        if kind.is_socket() {
            tracing::info!(path = %path.display(), "socket not exported");
            return Ok(false);
        }
        let mut pax: Vec<(String, Vec<u8>)> = vec![(
            PAX_MTIME.into(),
            format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()).into_bytes(),
        )];
        for name in xattr::list(path)? {
            if let Some(value) = xattr::get(path, &name)? {
                let key = format!("SCHILY.xattr.{}", name.to_string_lossy());
                pax.push((key, value));
            }
        }
        self.builder
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        if !kind.is_dir() && meta.nlink() > 1 {
            let inode = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&inode) {
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                let first = first.clone();
                self.builder.append_link(&mut header, rel, first)?;
                return Ok(false);
            }
            self.links.insert(inode, rel.to_path_buf());
        }
        if kind.is_symlink() {
            let target = std::fs::read_link(path)?;
            self.builder.append_link(&mut header, rel, target)?;
        } else if kind.is_file() {
            let file = std::fs::File::open(path)?;
            let reader = Counted {
                inner: file,
                writer_done: &mut self.done,
                progress: &mut *self.progress,
            };
            self.builder.append_data(&mut header, rel, reader)?;
        } else {
            header.set_size(0);
            self.builder.append_data(&mut header, rel, io::empty())?;
        }
        Ok(kind.is_dir())
    }
}

/// A file being read into the tar, counting its bytes for the progress.
struct Counted<'a, R> {
    inner: R,
    writer_done: &'a mut u64,
    progress: &'a mut dyn FnMut(u64) -> bool,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.writer_done += n as u64;
        if !(self.progress)(*self.writer_done) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
        }
        Ok(n)
    }
}

/// Unpacks the zstd tar `archive` into the existing directory `dest` (the root's own owner,
/// mode, mtime and xattrs included).
pub fn unpack(archive: &Path, dest: &Path) -> io::Result<()> {
    let file = std::fs::File::open(archive)?;
    let decoder = zstd::Decoder::new(file)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_unpack_xattrs(true);
    tar.set_overwrite(true);
    let mut times: Vec<(PathBuf, TimeSpec)> = Vec::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let mtime = entry
            .pax_extensions()?
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.key().ok() == Some(PAX_MTIME))
            .and_then(|e| e.value().ok().and_then(parse_time));
        let is_root = rel.components().all(|c| c == std::path::Component::CurDir);
        let kind = entry.header().entry_type();
        if is_root {
            // The tar crate skips the root: its metadata is set here.
            root_metadata(&mut entry, dest)?;
        } else if kind.is_fifo() || kind.is_character_special() || kind.is_block_special() {
            // The tar crate writes these as empty files: made here.
            special(&mut entry, &rel, dest)?;
        } else if !entry.unpack_in(dest)? {
            return Err(io::Error::other(format!(
                "{}: a path outside the tree",
                rel.display()
            )));
        } else if entry.header().entry_type().is_dir() {
            // The tar crate sets no xattrs on directories.
            set_xattrs(&mut entry, &dest.join(&rel))?;
        }
        let mtime = mtime.or_else(|| {
            entry
                .header()
                .mtime()
                .ok()
                .map(|s| TimeSpec::new(s as i64, 0))
        });
        if let Some(mtime) = mtime {
            times.push((dest.join(&rel), mtime));
        }
    }
    // Children first: setting a child's time does not change its directory's, but creating
    // it did.
    for (path, mtime) in times.iter().rev() {
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &TimeSpec::UTIME_OMIT,
            mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io::Error::other(format!("setting the mtime of {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Makes the FIFO or device node `entry` at `rel` under `dest` with its owner, mode and xattrs.
fn special<R: Read>(entry: &mut tar::Entry<R>, rel: &Path, dest: &Path) -> io::Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    if !rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(io::Error::other(format!(
            "{}: a path outside the tree",
            rel.display()
        )));
    }
    let header = entry.header();
    let kind = header.entry_type();
    let mode = header.mode()?;
    let (uid, gid) = (header.uid()?, header.gid()?);
    let device = makedev(
        header.device_major()?.unwrap_or(0).into(),
        header.device_minor()?.unwrap_or(0).into(),
    );
    let flag = if kind.is_fifo() {
        SFlag::S_IFIFO
    } else if kind.is_character_special() {
        SFlag::S_IFCHR
    } else {
        SFlag::S_IFBLK
    };
    let path = dest.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&path);
    mknod(&path, flag, Mode::from_bits_truncate(0o600), device)
        .map_err(|e| io::Error::other(format!("making {}: {e}", path.display())))?;
    std::os::unix::fs::lchown(&path, Some(uid as u32), Some(gid as u32))?;
    std::fs::set_permissions(
        &path,
        std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
    )?;
    set_xattrs(entry, &path)
}

fn root_metadata<R: Read>(entry: &mut tar::Entry<R>, dest: &Path) -> io::Result<()> {
    let header = entry.header();
    let (uid, gid, mode) = (header.uid()?, header.gid()?, header.mode()?);
    std::os::unix::fs::lchown(dest, Some(uid as u32), Some(gid as u32))?;
    std::fs::set_permissions(
        dest,
        std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
    )?;
    set_xattrs(entry, dest)
}

/// Sets the xattrs `entry`'s PAX records carry on `path`.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<R>, path: &Path) -> io::Result<()> {
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions.flatten() {
            if let Some(name) = extension
                .key()
                .ok()
                .and_then(|k| k.strip_prefix("SCHILY.xattr."))
            {
                xattr::set(path, name, extension.value_bytes()).map_err(|e| {
                    io::Error::other(format!("setting xattr {name} on {}: {e}", path.display()))
                })?;
            }
        }
    }
    Ok(())
}

fn parse_time(text: &str) -> Option<TimeSpec> {
    let (seconds, nanos) = text.split_once('.').unwrap_or((text, "0"));
    let nanos = format!("{nanos:0<9}");
    Some(TimeSpec::new(
        seconds.parse().ok()?,
        nanos[..9].parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_to_nanoseconds() {
        let t = parse_time("1700000000.5").map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t, Some((1_700_000_000, 500_000_000)));
        let t = parse_time("12").map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t, Some((12, 0)));
    }
}

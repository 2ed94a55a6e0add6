//! A container image's root unpacked by the volume-manager (`cairn_volume_manager::image`)
//! compared with `umoci unpack` of the same image: whiteouts, an opaque directory, modes
//! (setuid included), owners, mtimes, symlinks, hard links and xattrs. Images are built with
//! umoci from busybox-static (`cairn_test_controller::registry`), plus a raw layer made here
//! for what umoci never writes itself. Root is needed (owners, xattrs), as for umoci.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_test_controller::registry::{OciImage, busybox_image};
use sha2::Digest;

/// One path of a tree as compared: kind, mode, owner, size and content (or link target),
/// file mtime, xattrs, and the first path of its hard-link group.
fn describe_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let mut children: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .flatten()
            .map(|e| rel.join(e.file_name()))
            .collect();
        children.sort();
        for child in children {
            let p = root.join(&child);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut line = format!(
                "mode {:o} owner {}:{}",
                m.permissions().mode() & 0o7777,
                m.uid(),
                m.gid()
            );
            if ft.is_dir() {
                line = format!("dir {line}");
                stack.push(child.clone());
            } else if ft.is_symlink() {
                line = format!("symlink -> {}", std::fs::read_link(&p).unwrap().display());
            } else {
                let sha: String = sha2::Sha256::digest(std::fs::read(&p).unwrap())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                line = format!("file {line} size {} sha {sha} mtime {}", m.len(), m.mtime());
                if m.nlink() > 1 {
                    let first = inodes.entry(m.ino()).or_insert_with(|| child.clone());
                    line.push_str(&format!(" linked-with {}", first.display()));
                }
            }
            if !ft.is_symlink() {
                let mut names: Vec<String> = xattr::list(&p)
                    .unwrap()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("user."))
                    .collect();
                names.sort();
                for n in names {
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    line.push_str(&format!(" xattr {n}={}", String::from_utf8_lossy(&v)));
                }
            }
            out.insert(child, line);
        }
    }
    out
}

/// A PAX extended header record: `<len> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A layer umoci would not write: an opaque directory, a whiteout of a directory, a file with
/// an xattr (PAX `SCHILY.xattr.`), a hard link to a file of a lower layer's path rewritten here.
fn raw_layer(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(file);
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h
    };
    // opaque: /opaque keeps only what this layer puts there.
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    b.append_data(&mut h, "opaque/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0, 0o644);
    b.append_data(&mut h, "opaque/.wh..wh..opq", &[][..])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 4, 0o640);
    b.append_data(&mut h, "opaque/new", &b"new\n"[..]).unwrap();
    // whiteout of a whole directory.
    let mut h = header(tar::EntryType::Regular, 0, 0o644);
    b.append_data(&mut h, ".wh.gone-dir", &[][..]).unwrap();
    // xattr through a PAX header.
    let pax = pax_record("SCHILY.xattr.user.cairn", "kept");
    let mut h = header(tar::EntryType::XHeader, pax.len() as u64, 0o644);
    b.append_data(&mut h, "PaxHeaders/xattr-file", &pax[..])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 6, 0o600);
    b.append_data(&mut h, "xattr-file", &b"xattr\n"[..])
        .unwrap();
    // a hard link to a file of this layer.
    let mut h = header(tar::EntryType::Regular, 5, 0o755);
    b.append_data(&mut h, "bin/tool", &b"tool\n"[..]).unwrap();
    let mut h = header(tar::EntryType::Link, 0, 0o755);
    b.append_link(&mut h, "bin/tool-alias", "bin/tool").unwrap();
    b.finish().unwrap();
}

/// The store as the downloader leaves it: every blob of the layout under `blobs/<sha256>`.
fn store_from_layout(image: &OciImage, blobs: &Path) -> String {
    std::fs::create_dir_all(blobs).unwrap();
    for e in std::fs::read_dir(image.layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string()
}

#[test]
fn an_unpacked_image_equals_umocis_unpack_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("image"), "t").unwrap();
    image
        .layer(|r| {
            std::fs::create_dir_all(r.join("opaque/old"))?;
            std::fs::write(r.join("opaque/old-file"), "old\n")?;
            std::fs::create_dir_all(r.join("gone-dir/sub"))?;
            std::fs::write(r.join("gone-dir/sub/f"), "f\n")?;
            std::fs::write(r.join("etc/removed"), "x\n")?;
            std::fs::write(r.join("setuid"), "s\n")?;
            std::fs::set_permissions(r.join("setuid"), std::fs::Permissions::from_mode(0o4755))?;
            std::fs::create_dir_all(r.join("private"))?;
            std::fs::set_permissions(r.join("private"), std::fs::Permissions::from_mode(0o700))?;
            std::fs::write(r.join("private/owned"), "o\n")?;
            std::os::unix::fs::chown(r.join("private/owned"), Some(1000), Some(1000))?;
            std::fs::write(r.join("data-a"), "shared\n")?;
            std::fs::hard_link(r.join("data-a"), r.join("data-b"))?;
            std::os::unix::fs::symlink("../etc/passwd", r.join("bin/passwd-link"))?;
            Ok(())
        })
        .unwrap();
    image
        .layer(|r| {
            // A whiteout (umoci writes .wh.removed), a file turned into a directory and a
            // changed mode.
            std::fs::remove_file(r.join("etc/removed"))?;
            std::fs::remove_file(r.join("data-a"))?;
            std::fs::create_dir(r.join("data-a"))?;
            std::fs::write(r.join("data-a/inside"), "in\n")?;
            std::fs::set_permissions(r.join("etc/group"), std::fs::Permissions::from_mode(0o600))?;
            Ok(())
        })
        .unwrap();
    let tar = dir.path().join("raw.tar");
    raw_layer(&tar);
    image.raw_layer(&tar).unwrap();

    let started = Instant::now();
    let reference = image.umoci_unpack(&dir.path().join("umoci")).unwrap();
    let umoci_time = started.elapsed();

    let blobs = dir.path().join("store/blobs");
    let manifest = store_from_layout(&image, &blobs);
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let started = Instant::now();
    cairn_volume_manager::image::unpack_image(&blobs, &manifest, &volume)
        .unwrap_or_else(|e| panic!("{e}"));
    let ours = started.elapsed();
    println!("figure: unpack of the test image: cairn {ours:?}, umoci unpack {umoci_time:?}");

    let (want, got) = (
        describe_tree(&reference),
        describe_tree(&volume.join("rootfs")),
    );
    for (path, line) in &want {
        assert_eq!(
            got.get(path),
            Some(line),
            "{} differs from umoci's unpack",
            path.display()
        );
    }
    for path in got.keys() {
        assert!(
            want.contains_key(path),
            "{} is not in umoci's unpack",
            path.display()
        );
    }
    // What the comparison covers is really there.
    for (path, needle) in [
        ("opaque/new", "file"),
        ("xattr-file", "xattr user.cairn=kept"),
        ("bin/tool-alias", "linked-with bin/tool"),
        ("setuid", "mode 4755"),
        ("private/owned", "owner 1000:1000"),
        ("bin/passwd-link", "symlink -> ../etc/passwd"),
        ("data-a", "dir"),
    ] {
        assert!(
            got[Path::new(path)].contains(needle),
            "{path}: {}",
            got[Path::new(path)]
        );
    }
    for gone in ["opaque/old", "opaque/old-file", "gone-dir", "etc/removed"] {
        assert!(!got.contains_key(Path::new(gone)), "{gone} was whited out");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(volume.join("image-config.json")).unwrap()).unwrap();
    assert_eq!(config["rootfs"]["type"], "layers");
}

#[test]
fn a_whiteout_through_a_symlink_is_refused_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep\n").unwrap();
    let image = OciImage::new(&dir.path().join("image"), "t").unwrap();
    let out = outside.clone();
    image
        .layer(move |r| {
            std::os::unix::fs::symlink(&out, r.join("escape"))?;
            Ok(())
        })
        .unwrap();
    let tar = dir.path().join("evil.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, "escape/.wh.precious", &[][..])
            .unwrap();
        b.finish().unwrap();
    }
    image.raw_layer(&tar).unwrap();
    let blobs = dir.path().join("store/blobs");
    let manifest = store_from_layout(&image, &blobs);
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let err = cairn_volume_manager::image::unpack_image(&blobs, &manifest, &volume)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let layer = {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(blobs.join(&manifest)).unwrap()).unwrap();
        m["layers"][1]["digest"].as_str().unwrap().to_string()
    };
    assert!(err.contains(&layer) && err.contains("symlink"), "{err}");
    assert!(
        outside.join("precious").exists(),
        "nothing outside the root is touched"
    );
}

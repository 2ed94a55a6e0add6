//! The sha256 digests Cairn writes down (content, exports, configs, records), spelled one way:
//! lower-case hex, as EVE's `sha256` fields and OCI digests spell them.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// The sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The sha256 of a file, lower-case hex, read in 1 MiB pieces (blocking).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_file_with_progress(path, &mut |_| true)
}

/// [`sha256_file`], telling `progress` the bytes read so far after each piece; a `false` from it
/// stops the read with [`std::io::ErrorKind::Interrupted`] ("cancelled").
pub fn sha256_file_with_progress(
    path: &Path,
    progress: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        if !progress(done) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "cancelled",
            ));
        }
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_digest_of_a_known_text_is_spelled_in_lower_case_hex() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(sha256_file(&file).unwrap(), abc);
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    }

    #[test]
    fn a_file_larger_than_one_piece_is_hashed_whole_and_its_progress_told() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        let data: Vec<u8> = (0..(3u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let mut told = Vec::new();
        let sha = sha256_file_with_progress(&file, &mut |n| {
            told.push(n);
            true
        })
        .unwrap();
        assert_eq!(sha, sha256_hex(&data));
        assert_eq!(told.last().copied(), Some(data.len() as u64));
        assert!(told.len() >= 4, "{told:?}");
    }

    #[test]
    fn a_progress_that_says_stop_cancels_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, vec![7u8; 3 << 20]).unwrap();
        let err = sha256_file_with_progress(&file, &mut |n| n < (1 << 20)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    }
}

//! Client-side encryption of a remote's objects: each object is one STREAM (Hoang, Reyhanitabar,
//! Rogaway and Vizár's online AEAD construction, `aead-stream`'s big-endian 32-bit counter) of
//! XChaCha20-Poly1305 chunks, so bytes are sealed as they go up and opened as they come down,
//! with no full copy anywhere.
//!
//! Object layout:
//!
//! ```text
//! header (44 bytes): "CAIRNENC" | version 1 | key check (16) | nonce prefix (19, random)
//! chunk 0 … chunk n: CHUNK bytes of plaintext + 16-byte tag each; the last one (flagged
//!                    last in its nonce) holds 0 ..= CHUNK bytes
//! ```
//!
//! Every chunk's associated data is the header followed by the object's binding (the last two
//! components of its key: the export's directory and file name), so a header edited, an object
//! swapped with another export's, chunks reordered, dropped or cut short all fail to open. The
//! key check (a hash of the key, not the key) tells a wrong key from a damaged object. Object
//! keys, sizes and times stay visible to whoever can list the bucket.

use aead_stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Plaintext bytes per chunk; a multipart part's plaintext is a whole number of chunks.
pub const CHUNK: usize = 64 << 10;
pub const TAG: usize = 16;
const MAGIC: &[u8; 8] = b"CAIRNENC";
const VERSION: u8 = 1;
const CHECK: usize = 16;
const NONCE_PREFIX: usize = 19;
pub const HEADER: usize = MAGIC.len() + 1 + CHECK + NONCE_PREFIX;
/// Bytes of a key, as the key file holds them (raw, or as 64 hex digits).
pub const KEY_LEN: usize = 32;

/// Why an object cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "it is not encrypted, but the remote has an encryption key: refused (anyone able to write the bucket could have put it there)"
    )]
    NotEncrypted,
    #[error("it was encrypted with format version {0}, this device reads version {VERSION}")]
    Version(u8),
    #[error("wrong key: it was encrypted with another key than the remote's encryption key")]
    WrongKey,
    #[error(
        "its ciphertext fails authentication at chunk {chunk} (bytes from {offset}): it was tampered with, truncated or damaged"
    )]
    Tampered { chunk: u64, offset: u64 },
}

/// A remote's encryption key. Its Debug shows nothing of it.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    check: [u8; CHECK],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key in a key file's content: 32 raw bytes, or 64 hex digits (surrounding white
    /// space ignored). The error never quotes the content.
    pub fn parse(content: &[u8]) -> Result<Self, String> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        if content.len() == KEY_LEN {
            bytes.copy_from_slice(content);
        } else {
            let text = content.trim_ascii();
            if text.len() != 2 * KEY_LEN || !text.iter().all(u8::is_ascii_hexdigit) {
                return Err(format!(
                    "it holds {} bytes: a key is {KEY_LEN} raw bytes or {} hex digits",
                    content.len(),
                    2 * KEY_LEN
                ));
            }
            for (out, pair) in bytes.iter_mut().zip(text.chunks(2)) {
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                *out = digit(pair[0]) << 4 | digit(pair[1]);
            }
        }
        let mut hash = Sha256::new();
        hash.update(b"cairn export key check v1\0");
        hash.update(&bytes[..]);
        let mut check = [0u8; CHECK];
        check.copy_from_slice(&hash.finalize()[..CHECK]);
        Ok(Self { bytes, check })
    }

    fn stream(&self, nonce_prefix: &[u8; NONCE_PREFIX]) -> StreamBE32<XChaCha20Poly1305> {
        let key: &[u8; KEY_LEN] = &self.bytes;
        let aead = XChaCha20Poly1305::new(key.into());
        StreamBE32::from_aead(aead, nonce_prefix.into())
    }

    /// A sealer for a new object (a fresh random nonce prefix) bound to `key` (the object's
    /// key at the remote).
    pub fn sealer(&self, key: &str) -> Result<Sealer, String> {
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.extend_from_slice(&self.check);
        let mut prefix = [0u8; NONCE_PREFIX];
        getrandom::fill(&mut prefix).map_err(|e| format!("no random nonce: {e}"))?;
        header.extend_from_slice(&prefix);
        let stream = self.stream(&prefix);
        let aad = associated_data(&header, key);
        Ok(Sealer {
            stream,
            header,
            aad,
        })
    }

    /// An opener of the object at `key`.
    pub fn opener(&self, key: &str) -> Opener {
        Opener {
            key: self.clone(),
            binding: binding(key).to_string(),
            stream: None,
            aad: Vec::new(),
            pending: Vec::new(),
            chunk: 0,
        }
    }
}

/// What an object is bound to: its export directory and file name (the remote's prefix and
/// the export's parent may change, e.g. when a bucket is copied; the export itself may not).
fn binding(key: &str) -> &str {
    let key = key.trim_matches('/');
    match key.rmatch_indices('/').nth(1) {
        Some((at, _)) => &key[at + 1..],
        None => key,
    }
}

fn associated_data(header: &[u8], key: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(binding(key).as_bytes());
    aad
}

/// Whether `bytes` starts like an encrypted object.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Seals one object's plaintext, a part at a time; parts are independent (each knows its
/// first chunk's position) and may be sealed in parallel.
pub struct Sealer {
    stream: StreamBE32<XChaCha20Poly1305>,
    header: Vec<u8>,
    aad: Vec<u8>,
}

/// `Vec` seen from `start` on: the in-place AEAD appends its tag to one chunk of a part.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

impl AsRef<[u8]> for Tail<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl AsMut<[u8]> for Tail<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..]
    }
}

impl aead_stream::aead::Buffer for Tail<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aead_stream::aead::Result<()> {
        self.vec.extend_from_slice(other);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.vec.truncate(self.start + len);
    }
}

impl Sealer {
    /// The ciphertext of the part whose plaintext starts at chunk `first_chunk` (the header
    /// before it for chunk 0). Only the `last` part's plaintext may end in a partial chunk
    /// (or be empty); it ends the stream.
    pub fn seal(&self, plaintext: &[u8], first_chunk: u64, last: bool) -> Result<Vec<u8>, String> {
        let chunks = plaintext.len().div_ceil(CHUNK).max(usize::from(last));
        let mut out = Vec::with_capacity(HEADER + plaintext.len() + chunks * TAG);
        if first_chunk == 0 {
            out.extend_from_slice(&self.header);
        }
        for index in 0..chunks {
            let piece = &plaintext
                [(index * CHUNK).min(plaintext.len())..((index + 1) * CHUNK).min(plaintext.len())];
            let position = u32::try_from(first_chunk + index as u64)
                .map_err(|_| "the object is too large to encrypt (2^32 chunks)".to_string())?;
            let start = out.len();
            out.extend_from_slice(piece);
            self.stream
                .encrypt_in_place(
                    position,
                    last && index + 1 == chunks,
                    &self.aad,
                    &mut Tail {
                        vec: &mut out,
                        start,
                    },
                )
                .map_err(|_| "encryption failed".to_string())?;
        }
        Ok(out)
    }

    /// A whole (small) object sealed at once.
    pub fn seal_all(&self, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        self.seal(plaintext, 0, true)
    }
}

/// Opens one object's ciphertext as it arrives, in pieces of any size: each chunk is
/// released once it authenticates (the one that may be last is held until the end).
pub struct Opener {
    key: Key,
    binding: String,
    stream: Option<StreamBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    /// Ciphertext not opened yet.
    pending: Vec<u8>,
    chunk: u64,
}

impl Opener {
    /// Takes the next ciphertext; returns the plaintext of the chunks it completed.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, OpenError> {
        self.pending.extend_from_slice(data);
        if self.stream.is_none() {
            if self.pending.len() < HEADER {
                if !MAGIC.starts_with(&self.pending[..self.pending.len().min(MAGIC.len())]) {
                    return Err(OpenError::NotEncrypted);
                }
                return Ok(Vec::new());
            }
            self.read_header()?;
        }
        let sealed = CHUNK + TAG;
        // A full chunk followed by more bytes is not the last one.
        let ready = if self.pending.len() > sealed {
            (self.pending.len() - 1) / sealed
        } else {
            0
        };
        let mut out = Vec::with_capacity(ready * CHUNK);
        for index in 0..ready {
            let start = out.len();
            out.extend_from_slice(&self.pending[index * sealed..(index + 1) * sealed]);
            self.open_chunk(&mut out, start, false)?;
        }
        self.pending.drain(..ready * sealed);
        Ok(out)
    }

    /// The end of the object: opens the last chunk.
    pub fn finish(mut self) -> Result<Vec<u8>, OpenError> {
        if self.stream.is_none() {
            if !is_encrypted(&self.pending) {
                return Err(OpenError::NotEncrypted);
            }
            if self.pending.len() < HEADER {
                return Err(OpenError::Tampered {
                    chunk: 0,
                    offset: 0,
                });
            }
            self.read_header()?;
        }
        if self.pending.len() > CHUNK + TAG {
            // `push` keeps at most one sealed chunk: unreachable, but refused, not trusted.
            return Err(self.tampered());
        }
        let mut out = std::mem::take(&mut self.pending);
        self.open_chunk(&mut out, 0, true)?;
        Ok(out)
    }

    fn read_header(&mut self) -> Result<(), OpenError> {
        let header: Vec<u8> = self.pending.drain(..HEADER).collect();
        if !header.starts_with(MAGIC) {
            return Err(OpenError::NotEncrypted);
        }
        if header[MAGIC.len()] != VERSION {
            return Err(OpenError::Version(header[MAGIC.len()]));
        }
        let check = &header[MAGIC.len() + 1..MAGIC.len() + 1 + CHECK];
        if check != self.key.check {
            return Err(OpenError::WrongKey);
        }
        let mut prefix = [0u8; NONCE_PREFIX];
        prefix.copy_from_slice(&header[HEADER - NONCE_PREFIX..]);
        self.stream = Some(self.key.stream(&prefix));
        self.aad = header;
        self.aad.extend_from_slice(self.binding.as_bytes());
        Ok(())
    }

    fn tampered(&self) -> OpenError {
        OpenError::Tampered {
            chunk: self.chunk,
            offset: HEADER as u64 + self.chunk * (CHUNK + TAG) as u64,
        }
    }

    /// Opens the sealed chunk at `out[start..]` in place (its tag dropped).
    fn open_chunk(&mut self, out: &mut Vec<u8>, start: usize, last: bool) -> Result<(), OpenError> {
        let position = u32::try_from(self.chunk).map_err(|_| self.tampered())?;
        let opened = match &self.stream {
            Some(stream) => stream
                .decrypt_in_place(position, last, &self.aad, &mut Tail { vec: out, start })
                .is_ok(),
            None => false,
        };
        if !opened {
            return Err(self.tampered());
        }
        self.chunk += 1;
        Ok(())
    }
}

/// Opens a whole (small) object at once.
pub fn open_all(key: &Key, object_key: &str, ciphertext: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut opener = key.opener(object_key);
    let mut out = opener.push(ciphertext)?;
    out.extend(opener.finish()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::parse(&[byte; KEY_LEN]).unwrap()
    }

    /// Seals `data` in parts of `part` bytes, as an upload does.
    fn seal_in_parts(key: &Key, object: &str, data: &[u8], part: usize) -> Vec<u8> {
        let sealer = key.sealer(object).unwrap();
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let end = (offset + part).min(data.len());
            let last = end - offset < part;
            out.extend(
                sealer
                    .seal(&data[offset..end], (offset / CHUNK) as u64, last)
                    .unwrap(),
            );
            offset = end;
            if last {
                return out;
            }
        }
    }

    /// Opens `sealed` fed in pieces of `piece` bytes.
    fn open_in_pieces(
        key: &Key,
        object: &str,
        sealed: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, OpenError> {
        let mut opener = key.opener(object);
        let mut out = Vec::new();
        for bytes in sealed.chunks(piece) {
            out.extend(opener.push(bytes)?);
        }
        out.extend(opener.finish()?);
        Ok(out)
    }

    #[test]
    fn objects_of_any_size_round_trip_through_parts_and_pieces_of_any_size() {
        let k = key(7);
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 4 * CHUNK + 17] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal_in_parts(&k, "e/v.qcow2", &data, 2 * CHUNK);
            assert!(sealed.len() > data.len());
            for piece in [1, 100, CHUNK + TAG, 1 << 20] {
                assert_eq!(
                    open_in_pieces(&k, "p/e/v.qcow2", &sealed, piece).unwrap(),
                    data,
                    "size {size} piece {piece}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_key_is_told_from_a_tampered_or_cut_object() {
        let k = key(1);
        let data = vec![9u8; 3 * CHUNK + 5];
        let sealed = seal_in_parts(&k, "e/v", &data, 2 * CHUNK);
        assert_eq!(open_all(&key(2), "e/v", &sealed), Err(OpenError::WrongKey));
        let mut flipped = sealed.clone();
        flipped[HEADER + CHUNK + TAG + 10] ^= 1;
        assert_eq!(
            open_all(&k, "e/v", &flipped),
            Err(OpenError::Tampered {
                chunk: 1,
                offset: (HEADER + CHUNK + TAG) as u64
            })
        );
        // Cut at a chunk boundary: the chunk now last was not sealed as last.
        let cut = &sealed[..HEADER + 2 * (CHUNK + TAG)];
        assert!(matches!(
            open_all(&k, "e/v", cut),
            Err(OpenError::Tampered { chunk: 1, .. })
        ));
        // Another object's name (or another export's): refused.
        assert!(matches!(
            open_all(&k, "other/v", &sealed),
            Err(OpenError::Tampered { .. })
        ));
        // The header's nonce edited: refused.
        let mut nonce = sealed.clone();
        nonce[HEADER - 1] ^= 1;
        assert!(matches!(
            open_all(&k, "e/v", &nonce),
            Err(OpenError::Tampered { .. })
        ));
        assert_eq!(open_all(&k, "e/v", &data), Err(OpenError::NotEncrypted));
        assert_eq!(open_all(&k, "e/v", b""), Err(OpenError::NotEncrypted));
    }

    #[test]
    fn the_same_plaintext_seals_differently_each_time_and_holds_no_plaintext() {
        let k = key(3);
        let data = b"the marker the marker the marker".repeat(4096);
        let a = seal_in_parts(&k, "e/v", &data, 2 * CHUNK);
        let b = seal_in_parts(&k, "e/v", &data, 2 * CHUNK);
        assert_ne!(a, b);
        assert!(!a.windows(10).any(|w| w == b"the marker"));
    }

    #[test]
    fn key_files_hold_raw_bytes_or_hex_digits() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\n";
        let from_hex = Key::parse(hex.as_bytes()).unwrap();
        let raw: Vec<u8> = (0..32u8)
            .map(|i| {
                [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ][usize::from(i % 16)]
            })
            .collect();
        assert_eq!(*from_hex.bytes, *Key::parse(&raw).unwrap().bytes);
        let short = Key::parse(b"0011").err().unwrap();
        assert!(
            short.contains("holds 4 bytes") && !short.contains("0011"),
            "{short}"
        );
        assert!(Key::parse(&[b'g'; 64]).is_err());
        assert_eq!(format!("{from_hex:?}"), "Key(..)");
    }

    #[test]
    fn binding_is_the_export_directory_and_file() {
        assert_eq!(binding("fleet/dev/site/exp-1/v.qcow2"), "exp-1/v.qcow2");
        assert_eq!(binding("exp-1/v.qcow2"), "exp-1/v.qcow2");
        assert_eq!(binding("v"), "v");
    }
}

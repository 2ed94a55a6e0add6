//! The signed update bundle: one file holding a root image and its manifest, with a header
//! that names both by size and sha256 and an ed25519 signature over that header.
//!
//! ```text
//! "CAIRN-BUNDLE\0v1\n"      16 bytes, the format
//! header length             u32 little endian (at most MAX_HEADER)
//! header                    JSON, `Header`
//! signature                 64 bytes: ed25519 over magic + length + header
//! manifest                  `Header::manifest.size` bytes
//! root image                `Header::root.size` bytes (a squashfs)
//! ```
//!
//! The signature covers only the header, and the header fixes the payloads' hashes: a device
//! checks the signature before it parses a byte of JSON, then the hashes of the whole file,
//! before it writes anything (`crate::install`). Trailing bytes are refused, except zeros
//! after the end when the bundle is read from a block device (`Reading::Device`).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first bytes of every bundle; the version is part of it.
pub const MAGIC: &[u8; 16] = b"CAIRN-BUNDLE\0v1\n";
/// A header is a few hundred bytes; anything near this is not a bundle.
pub const MAX_HEADER: u32 = 64 * 1024;
pub const SIGNATURE_LEN: usize = 64;
pub const PUBLIC_KEY_LEN: usize = 32;

/// One payload of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// What the signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The image's version (`/etc/cairn/release` VERSION), as the controller's
    /// `BaseOS.base_os_version` names it.
    pub version: String,
    /// The image build's SOURCE_DATE_EPOCH: two builds of one version differ here.
    pub source_date_epoch: u64,
    pub manifest: Part,
    pub root: Part,
    /// The first 8 bytes of the signing key's sha256, hex: says which key, never trusted.
    pub key_id: String,
}

impl Header {
    /// Where the root image starts in the bundle file.
    pub fn root_offset(&self, header_len: u32) -> u64 {
        payload_offset(header_len) + self.manifest.size
    }

    /// The bundle's length in bytes.
    pub fn bundle_len(&self, header_len: u32) -> u64 {
        self.root_offset(header_len) + self.root.size
    }
}

fn payload_offset(header_len: u32) -> u64 {
    (MAGIC.len() + 4) as u64 + u64::from(header_len) + SIGNATURE_LEN as u64
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read the bundle {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is not a Cairn update bundle (no CAIRN-BUNDLE v1 magic)")]
    NotABundle { path: String },
    #[error("bundle {path}: header length {len} is over {MAX_HEADER} bytes")]
    HeaderTooLong { path: String, len: u32 },
    #[error("bundle {path}: the signature does not verify with the device's update key {key_id}")]
    BadSignature { path: String, key_id: String },
    #[error("bundle {path}: signed header is not valid JSON: {source}")]
    BadHeader {
        path: String,
        source: serde_json::Error,
    },
    #[error("bundle {path}: is {actual} bytes, its header says {expected}")]
    WrongLength {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("bundle {path}: the {part}'s sha256 is {actual}, the signed header says {expected}")]
    WrongHash {
        path: String,
        part: &'static str,
        expected: String,
        actual: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is not an ed25519 private key (PKCS#8, PEM or DER): {reason}")]
    NotAKey { path: String, reason: String },
    #[error("{path} is not an ed25519 public key (64 hex digits)")]
    NotAPublicKey { path: String },
    #[error("cannot make a key: {0}")]
    Generate(String),
}

/// The signing key, read from a file kept outside the repository.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A PKCS#8 file, PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
    /// ed25519` writes it) or DER.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
            path: name.clone(),
            source,
        })?;
        let der = match std::str::from_utf8(&bytes) {
            Ok(text) if text.contains("-----BEGIN") => pem_body(text).ok_or(KeyError::NotAKey {
                path: name.clone(),
                reason: "no base64 body between the PEM lines".into(),
            })?,
            _ => bytes,
        };
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|e| KeyError::NotAKey {
                path: name,
                reason: e.to_string(),
            })
    }

    /// A new key as PEM text (PKCS#8 v2, with the public key).
    pub fn generate_pem() -> Result<String, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(pem)
    }

    pub fn public_key(&self) -> PublicKey {
        let mut key = [0u8; PUBLIC_KEY_LEN];
        key.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(key)
    }
}

fn pem_body(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// The key a device accepts bundles from (`/etc/cairn/update-key.pub` in its image: one line,
/// 64 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    pub fn parse(text: &str, path: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::NotAPublicKey { path: path.into() };
        let text = text.trim();
        if text.len() != PUBLIC_KEY_LEN * 2 {
            return Err(bad());
        }
        let mut key = [0u8; PUBLIC_KEY_LEN];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self(key))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 8 bytes of the key's sha256, hex (the header's `key_id`).
    pub fn id(&self) -> String {
        hex(&Sha256::digest(self.0)[..8])
    }
}

pub use cairn_persist::digest::hex;

/// Writes a bundle of `root` and `manifest` signed by `key` to `out`.
pub fn create(
    key: &SigningKey,
    version: &str,
    source_date_epoch: u64,
    manifest: &Path,
    root: &Path,
    out: &Path,
) -> Result<Header, BundleError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BundleError::Io { path, source }
    };
    let part = |path: &Path| -> Result<Part, BundleError> {
        let mut file = File::open(path).map_err(io(path))?;
        let (size, sha256) = hash_stream(&mut file, u64::MAX).map_err(io(path))?;
        Ok(Part { size, sha256 })
    };
    let header = Header {
        version: version.into(),
        source_date_epoch,
        manifest: part(manifest)?,
        root: part(root)?,
        key_id: key.public_key().id(),
    };
    let json = serde_json::to_vec(&header).map_err(|source| BundleError::BadHeader {
        path: out.display().to_string(),
        source,
    })?;
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    let mut signed = Vec::with_capacity(MAGIC.len() + 4 + json.len());
    signed.extend_from_slice(MAGIC);
    signed.extend_from_slice(&len.to_le_bytes());
    signed.extend_from_slice(&json);
    let signature = key.0.sign(&signed);

    let mut file = File::create(out).map_err(io(out))?;
    file.write_all(&signed).map_err(io(out))?;
    file.write_all(signature.as_ref()).map_err(io(out))?;
    for path in [manifest, root] {
        let mut part = File::open(path).map_err(io(path))?;
        io::copy(&mut part, &mut file).map_err(io(out))?;
    }
    file.flush().map_err(io(out))?;
    Ok(header)
}

/// Where a bundle is read from: a file is exactly its length; a block device (the bundle
/// written to a disk) may carry zeros after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    File,
    Device,
}

/// A bundle whose signature and hashes were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    pub header_len: u32,
}

/// Checks `path` against `key`: the signature over the header first (nothing unsigned is
/// parsed), then the length, then both payloads' sha256. Reads the whole bundle once.
pub fn verify(path: &Path, key: &PublicKey, reading: Reading) -> Result<Verified, BundleError> {
    let name = path.display().to_string();
    let io = |source| BundleError::Io {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let (header, header_len) = read_header(&mut file, key, &name)?;
    let actual_len = file.seek(SeekFrom::End(0)).map_err(io)?;
    let expected = header.bundle_len(header_len);
    let too_short = actual_len < expected;
    if too_short || (reading == Reading::File && actual_len != expected) {
        return Err(BundleError::WrongLength {
            path: name,
            expected,
            actual: actual_len,
        });
    }
    file.seek(SeekFrom::Start(payload_offset(header_len)))
        .map_err(io)?;
    for (part, expected) in [("manifest", &header.manifest), ("root image", &header.root)] {
        let (size, sha256) = hash_stream(&mut file, expected.size).map_err(io)?;
        if size != expected.size || sha256 != expected.sha256 {
            return Err(BundleError::WrongHash {
                path: name,
                part,
                expected: expected.sha256.clone(),
                actual: sha256,
            });
        }
    }
    Ok(Verified { header, header_len })
}

/// Reads and authenticates the header at the start of `file`.
pub fn read_header(
    file: &mut File,
    key: &PublicKey,
    name: &str,
) -> Result<(Header, u32), BundleError> {
    let io = |source| BundleError::Io {
        path: name.into(),
        source,
    };
    let not_a_bundle = || BundleError::NotABundle { path: name.into() };
    let mut lead = [0u8; MAGIC.len() + 4];
    file.read_exact(&mut lead).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => not_a_bundle(),
        _ => io(e),
    })?;
    if &lead[..MAGIC.len()] != MAGIC {
        return Err(not_a_bundle());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&lead[MAGIC.len()..]);
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(BundleError::HeaderTooLong {
            path: name.into(),
            len,
        });
    }
    let mut signed = lead.to_vec();
    signed.resize(lead.len() + len as usize, 0);
    let mut signature = [0u8; SIGNATURE_LEN];
    let bad_signature = || BundleError::BadSignature {
        path: name.into(),
        key_id: key.id(),
    };
    // A bundle cut inside its header or signature cannot be vouched for.
    file.read_exact(&mut signed[lead.len()..])
        .and_then(|()| file.read_exact(&mut signature))
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => bad_signature(),
            _ => io(e),
        })?;
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(&signed, &signature)
        .map_err(|_| bad_signature())?;
    let header =
        serde_json::from_slice(&signed[lead.len()..]).map_err(|source| BundleError::BadHeader {
            path: name.into(),
            source,
        })?;
    Ok((header, len))
}

/// sha256 of at most `limit` bytes from `reader`: (bytes read, hex digest).
pub fn hash_stream(reader: &mut impl Read, limit: u64) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while total < limit {
        let want = usize::try_from((limit - total).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

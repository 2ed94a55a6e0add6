//! Group commit for persistent topics. The updates of a group are appended to the topic's
//! journal and one `fdatasync` makes all of them durable; only then are they delivered and
//! acknowledged. The key files are written after that without fsync, and a checkpoint makes
//! them durable all at once (one fsync per key touched since the last one, one for the
//! directory) before it empties the journal. A publisher that opens replays the journal over
//! the key files, so a key file a power cut took back or left torn is never what it serves.
//!
//! A record: `CJ1\n`, body length (u32 LE), body, the first 16 bytes of sha256(body). The body:
//! generation (u64), sequence (u64), kind (1 put, 2 remove), key length (u16), key, and for a
//! put the record's envelope exactly as a key file holds it. The journal is read up to the
//! first record that is torn, fails its checksum, or does not continue the generation and
//! sequence of the records before it: that is the tail of an append the power cut.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"CJ1\n";
const DIGEST_LEN: usize = 16;
const PUT: u8 = 1;
const REMOVE: u8 = 2;
/// A record body is small (one key's envelope); anything larger is garbage.
const MAX_BODY: usize = 64 << 20;

/// The journal's file name inside the topic directory; readers of key files skip dot-files.
pub const JOURNAL_FILE: &str = ".journal";

/// Journal bytes after which a group is followed by a checkpoint.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 1 << 20;

/// One update of a group: a key's new envelope, or its removal (`None`).
pub struct Change {
    pub key: String,
    pub envelope: Option<Vec<u8>>,
}

/// What the key files must still be told: the latest journaled state of a key and whether
/// its key file was written with it (without fsync).
struct Unsynced {
    envelope: Option<Vec<u8>>,
    written: bool,
}

pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    /// Opened (and its directory entry made durable) at the first append.
    file: Option<File>,
    /// End of the last durable record: the next append goes here.
    len: u64,
    generation: u64,
    next_seq: u64,
    /// An append failed: bytes past `len` may hold part of it, cut off before the next.
    torn: bool,
    checkpoint_bytes: u64,
    unsynced: BTreeMap<String, Unsynced>,
    /// Groups and updates appended, and checkpoints made, since the journal opened (for
    /// figures and tests).
    pub groups: u64,
    pub updates: u64,
    pub largest_group: u64,
    pub checkpoints: u64,
    /// The publication is gone: work the committer had already handed to the blocking pool
    /// does nothing, so nothing is written after the publication's drop returns.
    pub closed: bool,
}

impl Journal {
    /// Reads the journal in `dir` and returns it with the changes it holds, oldest first. The
    /// key files of those keys are rewritten (without fsync) so that a reader sees them; the
    /// journal keeps vouching for them until the next checkpoint.
    pub fn open(dir: &Path, checkpoint_bytes: u64) -> io::Result<(Self, Vec<Change>)> {
        let path = dir.join(JOURNAL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let chain = read_chain(&bytes);
        let mut journal = Self {
            dir: dir.to_path_buf(),
            path,
            file: None,
            len: chain.end as u64,
            generation: chain.generation.unwrap_or_else(new_generation),
            next_seq: chain.next_seq,
            torn: chain.end < bytes.len(),
            checkpoint_bytes,
            unsynced: BTreeMap::new(),
            groups: 0,
            updates: 0,
            largest_group: 0,
            checkpoints: 0,
            closed: false,
        };
        for change in &chain.changes {
            journal.unsynced.insert(
                change.key.clone(),
                Unsynced {
                    envelope: change.envelope.clone(),
                    written: false,
                },
            );
        }
        journal.write_key_files();
        Ok((journal, chain.changes))
    }

    fn key_path(&self, key: &str) -> PathBuf {
        key_file(&self.dir, key)
    }

    /// Appends `changes` and makes them durable with one `fdatasync`. On error none of them
    /// counts: the caller fails every publisher of the group.
    pub fn append(&mut self, changes: &[Change]) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::other("the publication closed"));
        }
        let mut buf = Vec::new();
        for (seq, change) in (self.next_seq..).zip(changes) {
            encode_record(&mut buf, self.generation, seq, change);
        }
        if let Err(e) = self.write_durably(&buf) {
            // Whatever part of the group reached the file is cut off before the next append,
            // which reuses these sequence numbers: the chain stays unbroken.
            self.torn = true;
            return Err(e);
        }
        self.next_seq += changes.len() as u64;
        self.len += buf.len() as u64;
        self.groups += 1;
        self.updates += changes.len() as u64;
        self.largest_group = self.largest_group.max(changes.len() as u64);
        Ok(())
    }

    fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            cairn_persist::create_dir_durable(&self.dir)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)?;
            // The journal's own entry must be durable before any record in it counts.
            file.sync_all()?;
            cairn_persist::sync_dir(&self.dir)?;
            self.file = Some(file);
        }
        let Some(file) = &self.file else {
            return Err(io::Error::other("journal not open"));
        };
        if self.torn {
            file.set_len(self.len)?;
            self.torn = false;
        }
        file.write_all_at(buf, self.len)?;
        file.sync_data()
    }

    /// After an acknowledged group: its key files, written without fsync (a reader sees the
    /// value at once), then a checkpoint if the journal has grown past its limit.
    pub fn settle(&mut self, changes: Vec<Change>) {
        if self.closed {
            return;
        }
        for change in changes {
            self.unsynced.insert(
                change.key,
                Unsynced {
                    envelope: change.envelope,
                    written: false,
                },
            );
        }
        self.write_key_files();
        if self.len >= self.checkpoint_bytes
            && let Err(e) = self.checkpoint()
        {
            // The journal keeps vouching for the keys; the next group tries again.
            tracing::warn!(dir = %self.dir.display(), "bus journal checkpoint failed: {e}");
        }
    }

    fn write_key_files(&mut self) {
        let dir = self.dir.clone();
        for (key, entry) in self.unsynced.iter_mut().filter(|(_, e)| !e.written) {
            let path = key_file(&dir, key);
            let result = match &entry.envelope {
                Some(bytes) => write_unsynced(&path, bytes),
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            match result {
                Ok(()) => entry.written = true,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "key file (the journal holds it): {e}")
                }
            }
        }
    }

    /// Makes every key file the journal vouches for durable, then empties the journal.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        for (key, entry) in &self.unsynced {
            let path = self.key_path(key);
            match (&entry.envelope, entry.written) {
                (Some(_), true) => File::open(&path)?.sync_all()?,
                (Some(bytes), false) => {
                    cairn_persist::write_atomic(&path, bytes, false).map_err(|(_, e)| e)?
                }
                (None, _) => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
        }
        cairn_persist::sync_dir(&self.dir)?;
        // Not synced: if the power takes the truncation back, the old records replay onto key
        // files that already hold their outcome. A new generation keeps them from continuing.
        if let Some(file) = &self.file {
            file.set_len(0)?;
        }
        self.len = 0;
        self.torn = false;
        self.generation = new_generation();
        self.next_seq = 0;
        self.unsynced.clear();
        self.checkpoints += 1;
        Ok(())
    }
}

fn key_file(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{}.json", crate::store::escape_key(key)))
}

/// Atomic against a crash of the process, not durable: the journal vouches for the content.
fn write_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

fn new_generation() -> u64 {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    high ^ low
}

fn encode_record(buf: &mut Vec<u8>, generation: u64, seq: u64, change: &Change) {
    let mut body =
        Vec::with_capacity(27 + change.key.len() + change.envelope.as_ref().map_or(0, Vec::len));
    body.extend_from_slice(&generation.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.push(if change.envelope.is_some() {
        PUT
    } else {
        REMOVE
    });
    // Keys are short (a UUID, a name); a longer one is cut, which only its own record sees.
    let key = &change.key.as_bytes()[..change.key.len().min(u16::MAX as usize)];
    body.extend_from_slice(&(key.len() as u16).to_le_bytes());
    body.extend_from_slice(key);
    if let Some(envelope) = &change.envelope {
        body.extend_from_slice(envelope);
    }
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    buf.extend_from_slice(&Sha256::digest(&body)[..DIGEST_LEN]);
}

struct Chain {
    changes: Vec<Change>,
    /// Where the valid records end.
    end: usize,
    generation: Option<u64>,
    next_seq: u64,
}

fn read_chain(bytes: &[u8]) -> Chain {
    let mut chain = Chain {
        changes: Vec::new(),
        end: 0,
        generation: None,
        next_seq: 0,
    };
    let mut at = 0;
    while let Some((record, next)) = read_record(bytes, at) {
        let continues = match chain.generation {
            None => true,
            Some(generation) => record.generation == generation && record.seq == chain.next_seq,
        };
        if !continues {
            break;
        }
        chain.generation = Some(record.generation);
        chain.next_seq = record.seq + 1;
        chain.changes.push(record.change);
        chain.end = next;
        at = next;
    }
    chain
}

struct Record {
    generation: u64,
    seq: u64,
    change: Change,
}

fn read_record(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let rest = bytes.get(at..)?;
    if rest.get(..4)? != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?) as usize;
    if !(19..=MAX_BODY).contains(&len) {
        return None;
    }
    let body = rest.get(8..8 + len)?;
    let digest = rest.get(8 + len..8 + len + DIGEST_LEN)?;
    if Sha256::digest(body)[..DIGEST_LEN] != *digest {
        return None;
    }
    let generation = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let seq = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let kind = body[16];
    let key_len = u16::from_le_bytes(body[17..19].try_into().ok()?) as usize;
    let key = String::from_utf8(body.get(19..19 + key_len)?.to_vec()).ok()?;
    let payload = &body[19 + key_len..];
    let envelope = match kind {
        PUT => Some(payload.to_vec()),
        REMOVE if payload.is_empty() => None,
        _ => return None,
    };
    Some((
        Record {
            generation,
            seq,
            change: Change { key, envelope },
        },
        at + 8 + len + DIGEST_LEN,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, body: &str) -> Change {
        Change {
            key: key.into(),
            envelope: Some(body.as_bytes().to_vec()),
        }
    }

    fn keys(changes: &[Change]) -> Vec<(String, Option<String>)> {
        changes
            .iter()
            .map(|c| {
                (
                    c.key.clone(),
                    c.envelope
                        .as_ref()
                        .map(|e| String::from_utf8_lossy(e).into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn a_torn_or_foreign_tail_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, replayed) = Journal::open(dir.path(), u64::MAX).unwrap();
        assert!(replayed.is_empty());
        journal.append(&[put("a", "1"), put("b", "2")]).unwrap();
        journal
            .append(&[Change {
                key: "a".into(),
                envelope: None,
            }])
            .unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let whole = std::fs::read(&path).unwrap();

        // Cut anywhere inside the last record: the first group alone replays.
        let first_group = {
            let mut buf = Vec::new();
            encode_record(&mut buf, 0, 0, &put("a", "1"));
            encode_record(&mut buf, 0, 0, &put("b", "2"));
            buf.len()
        };
        for cut in first_group..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (_, replayed) = Journal::open(dir.path(), u64::MAX).unwrap();
            assert_eq!(
                keys(&replayed),
                [
                    ("a".into(), Some("1".into())),
                    ("b".into(), Some("2".into()))
                ],
                "cut at {cut}"
            );
        }

        // A valid record of another generation after the chain is not part of it.
        let mut stale = whole.clone();
        encode_record(&mut stale, 7, 3, &put("c", "3"));
        std::fs::write(&path, &stale).unwrap();
        let (_, replayed) = Journal::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(replayed.len(), 3);
        assert_eq!(replayed[2].envelope, None);
    }

    #[test]
    fn a_failed_append_is_cut_off_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), u64::MAX).unwrap();
        journal.append(&[put("a", "1")]).unwrap();
        // What a failed append may leave: whole records of the failed group. The retry's
        // record is as long as the first, so the second would follow it in sequence.
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let seq = journal.next_seq;
        encode_record(&mut bytes, journal.generation, seq, &put("a", "9"));
        encode_record(&mut bytes, journal.generation, seq + 1, &put("c", "lost"));
        std::fs::write(&path, &bytes).unwrap();
        journal.torn = true;
        journal.append(&[put("b", "2")]).unwrap();
        let (_, replayed) = Journal::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(
            keys(&replayed),
            [
                ("a".into(), Some("1".into())),
                ("b".into(), Some("2".into()))
            ]
        );
    }
}

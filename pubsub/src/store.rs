//! One JSON file per key, so that a restarted publisher gets its table back and a technician can
//! read it with `cat`. Persistent topics write durably before they deliver; run-root topics are
//! written behind, coalesced per key, atomically but without fsync (a reboot wipes them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_persist::PersistError;
use cairn_types::Topic;

/// Where a publication keeps its key files.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub dir: PathBuf,
    pub durable: bool,
}

/// A key file that could not be loaded when the publisher started. It is reported, and left in
/// place for inspection until the key is published again.
#[derive(Debug)]
pub struct LoadProblem {
    pub path: PathBuf,
    pub error: PersistError,
}

impl KeyFiles {
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", escape_key(key)))
    }

    /// Reads every key file; unreadable ones are returned as problems, never dropped silently.
    pub fn load_all<T: Topic>(&self) -> std::io::Result<(BTreeMap<String, T>, Vec<LoadProblem>)> {
        let mut table = BTreeMap::new();
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((table, problems)),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            let is_record = path.extension().is_some_and(|e| e == "json")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !is_record {
                continue;
            }
            match cairn_persist::load::<T>(&path) {
                Ok(loaded) => {
                    table.insert(loaded.record.key(), loaded.record);
                }
                Err(error) => problems.push(LoadProblem { path, error }),
            }
        }
        Ok((table, problems))
    }

    pub fn write<T: Topic>(&self, value: &T) -> Result<(), PersistError> {
        let path = self.path_of(&value.key());
        if self.durable {
            cairn_persist::store(&path, value)
        } else {
            cairn_persist::store_unsynced(&path, value)
        }
    }

    pub fn remove(&self, key: &str) -> std::io::Result<()> {
        let path = self.path_of(key);
        if self.durable {
            cairn_persist::remove(&path)
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

/// Keys become file names: safe characters stay, everything else is `%XX`.
pub fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'#' => out.push(byte as char),
            b'.' if !out.is_empty() => out.push('.'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

pub fn run_topic_dir(run: &Path, agent: &str, topic: &str) -> PathBuf {
    run.join(agent).join(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_safe_file_names() {
        assert_eq!(escape_key("a1b2#3"), "a1b2#3");
        assert_eq!(escape_key("../etc/passwd"), "%2E.%2Fetc%2Fpasswd");
        assert_eq!(escape_key(""), "%00");
        assert_eq!(escape_key("ä"), "%C3%A4");
    }
}

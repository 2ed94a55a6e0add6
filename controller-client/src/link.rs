//! The controller's address and trust anchor, as set-up stores them like EVE's `/config`
//! partition: `<persist>/config/server` (host:port) and `root-certificate.pem`.

use std::path::{Path, PathBuf};

pub const SERVER: &str = "server";
pub const ROOT_CERT: &str = "root-certificate.pem";

/// `<persist>/config`.
pub fn dir(persist: &Path) -> PathBuf {
    persist.join("config")
}

#[derive(Debug, thiserror::Error)]
pub enum LinkFilesError {
    #[error(
        "controller link {path}: missing (the device follows no controller yet: set it up with `cairn up --controller URL ...`)"
    )]
    Missing { path: PathBuf },
    #[error("controller link {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The controller this device follows and the root its certificates chain to.
#[derive(Debug, Clone)]
pub struct ControllerLink {
    pub server: String,
    pub root_pem: Vec<u8>,
    pub root_path: PathBuf,
}

impl ControllerLink {
    /// Reads `server` and the root certificate (blocking: call from `spawn_blocking`).
    pub fn read(persist: &Path) -> Result<Self, LinkFilesError> {
        let dir = dir(persist);
        let read = |name: &str| -> Result<Vec<u8>, LinkFilesError> {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LinkFilesError::Missing { path },
                _ => LinkFilesError::File {
                    path,
                    reason: e.to_string(),
                },
            })
        };
        let server = String::from_utf8(read(SERVER)?)
            .map_err(|_| LinkFilesError::File {
                path: dir.join(SERVER),
                reason: "not UTF-8 text".into(),
            })?
            .trim()
            .to_string();
        if server.is_empty() {
            return Err(LinkFilesError::File {
                path: dir.join(SERVER),
                reason: "empty: it must hold the controller's host:port".into(),
            });
        }
        Ok(Self {
            server,
            root_pem: read(ROOT_CERT)?,
            root_path: dir.join(ROOT_CERT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_with_no_controller_is_told_how_to_set_one_up() {
        let root = std::env::temp_dir().join(format!("cairn-link-{}", std::process::id()));
        let err = ControllerLink::read(&root).unwrap_err().to_string();
        assert!(err.contains("config/server: missing"), "{err}");
        assert!(err.contains("cairn up --controller"), "{err}");
    }
}

//! Object-store remotes (issue 22), shared by both sources.

use std::collections::HashMap;

use cairn_types::RemoteConfig;

use super::ConfigError;

/// A remote has an id (unique, usable in `REMOTE:PREFIX`), an http(s) endpoint, a bucket and a
/// credentials file. `list` is the remotes' name in the source.
pub(super) fn check_remotes(remotes: &[RemoteConfig], list: &str) -> Result<(), ConfigError> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (i, remote) in remotes.iter().enumerate() {
        let at = format!("{list}[{i}]");
        let id = remote.id.as_str();
        if id.is_empty() || id.contains(':') || id.contains('/') {
            return Err(ConfigError::at(
                format!("{at}.id"),
                format!("remote id {id:?} must be a non-empty name without ':' or '/'"),
            ));
        }
        if let Some(first) = ids.insert(id, i) {
            return Err(ConfigError::at(
                format!("{at}.id"),
                format!("remote {id} appears twice (also {list}[{first}])"),
            ));
        }
        if !(remote.endpoint.starts_with("https://") || remote.endpoint.starts_with("http://")) {
            return Err(ConfigError::at(
                format!("{at}.endpoint"),
                format!(
                    "remote {id}: endpoint {:?} is not an http(s) URL",
                    remote.endpoint
                ),
            ));
        }
        if remote.bucket.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.bucket"),
                format!("remote {id} has no bucket"),
            ));
        }
        if remote.credentials_file.as_os_str().is_empty() {
            return Err(ConfigError::at(
                format!("{at}.credentials_file"),
                format!(
                    "remote {id} has no credentials file (a file under <persist>/config/, mode 0600, owned by root)"
                ),
            ));
        }
    }
    Ok(())
}

//! Object-store remotes (issue 22), shared by both sources.

use std::collections::HashMap;

use cairn_types::{ExportConfig, RemoteConfig, ScheduledExport};
use uuid::Uuid;

use super::{ConfigError, DeviceConfig};

/// A remote has an id (unique, usable in `REMOTE:PREFIX`), an http(s) endpoint, a bucket and a
/// credentials file. `list` is the remotes' name in the source.
fn check_remotes(remotes: &[RemoteConfig], list: &str) -> Result<(), ConfigError> {
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

/// A remote an export names must be one of the config's (`list` is their name in the source).
pub(super) fn check_named_remote(
    remotes: &[RemoteConfig],
    id: &str,
    path: &str,
    what: &str,
    list: &str,
) -> Result<(), ConfigError> {
    if remotes.iter().any(|r| r.id == id) {
        return Ok(());
    }
    Err(ConfigError::at(
        path,
        if id.is_empty() {
            format!("{what} names no remote")
        } else {
            format!("{what} names remote {id}, which is not configured (not in {list})")
        },
    ))
}

/// A scheduled export as either source gives it: a remote id is required, a prefix is a key.
pub(super) fn scheduled_export(
    remote: &str,
    prefix: &str,
    full_every: u32,
    keep_exports: u32,
    path: &str,
) -> Result<ScheduledExport, ConfigError> {
    if remote.trim().is_empty() {
        return Err(ConfigError::at(
            format!("{path}.remote"),
            "the scheduled export names no remote",
        ));
    }
    check_prefix(prefix, &format!("{path}.prefix"))?;
    Ok(ScheduledExport {
        remote: remote.trim().to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        full_every,
        keep_exports,
    })
}

/// A key prefix: no empty, `.` or `..` segment (a device never writes outside its prefix).
fn check_prefix(prefix: &str, path: &str) -> Result<(), ConfigError> {
    let trimmed = prefix.trim_matches('/');
    if !trimmed.is_empty()
        && trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(ConfigError::at(
            path,
            format!("prefix {prefix:?} has an empty, '.' or '..' part"),
        ));
    }
    Ok(())
}

/// The text of one export request, as either source gives it.
pub(super) struct ExportRequestText<'a> {
    pub(super) id: Uuid,
    pub(super) snapshot: Uuid,
    pub(super) remote: &'a str,
    pub(super) prefix: &'a str,
    pub(super) incremental: bool,
}

/// An app's export request as the bus request the volume-manager runs (once: a snapshot
/// already exported under the prefix is not exported again after a restart).
pub(super) fn export_request(
    app: Uuid,
    text: ExportRequestText<'_>,
    path: &str,
) -> Result<ExportConfig, ConfigError> {
    if text.id.is_nil() {
        return Err(ConfigError::at(
            format!("{path}.id"),
            "an export request needs an id (a UUID naming the job)",
        ));
    }
    check_prefix(text.prefix, &format!("{path}.prefix"))?;
    Ok(ExportConfig {
        job_id: text.id,
        snapshot_id: text.snapshot,
        app_uuid: app,
        remote: text.remote.trim().to_string(),
        remote_prefix: text.prefix.trim_matches('/').to_string(),
        incremental: text.incremental,
        once: true,
        ..ExportConfig::default()
    })
}

/// What both sources do once their apps are read: the remotes are checked, and every remote an
/// export names; then the export requests (each with its path) are put in the config.
/// `policy_field`: the source's name of an app's scheduled export (`export`, `cairn_export`);
/// `list`: the source's name of its remotes.
pub(super) fn settle_exports(
    config: &mut DeviceConfig,
    exports: Vec<(String, ExportConfig)>,
    policy_field: &str,
    list: &str,
) -> Result<(), ConfigError> {
    check_remotes(&config.remotes, list)?;
    let policies: Vec<(String, &ScheduledExport)> = config
        .apps
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let export = a.snapshot.policy.as_ref()?.export.as_ref()?;
            Some((format!("apps[{i}].snapshot.{policy_field}.remote"), export))
        })
        .collect();
    let requests: Vec<(String, &ExportConfig)> =
        exports.iter().map(|(at, e)| (at.clone(), e)).collect();
    check_export_remotes(&config.remotes, &requests, &policies, list)?;
    config.exports = exports.into_iter().map(|(_, e)| e).collect();
    Ok(())
}

/// Every remote an export names (a request, an app's scheduled export) is configured; job ids
/// are unique. `requests`: each request with its path; `policies`: each app's scheduled
/// export with the path of its `remote` field.
fn check_export_remotes(
    remotes: &[RemoteConfig],
    requests: &[(String, &ExportConfig)],
    policies: &[(String, &ScheduledExport)],
    list: &str,
) -> Result<(), ConfigError> {
    let mut ids = HashMap::new();
    for (path, request) in requests {
        check_named_remote(
            remotes,
            &request.remote,
            &format!("{path}.remote"),
            &format!("the export request {}", request.job_id),
            list,
        )?;
        if let Some(first) = ids.insert(request.job_id, path) {
            return Err(ConfigError::at(
                format!("{path}.id"),
                format!(
                    "export request {} appears twice (also {first})",
                    request.job_id
                ),
            ));
        }
    }
    for (path, export) in policies {
        check_named_remote(remotes, &export.remote, path, "the scheduled export", list)?;
    }
    Ok(())
}

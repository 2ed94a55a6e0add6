//! `cairn export`, `cairn verify`, `cairn import --print-config`: exports of snapshots.
//!
//! The jobs run in the volume-manager (it owns the volumes and the export format): `cairn`
//! publishes one `ExportConfig` as agent `cli` and follows the job's `ExportStatus`. Only one
//! `cairn export`/`verify` runs at a time (the bus allows one publisher per topic). Ctrl-C sets
//! `Cancel` on the request and waits for the volume-manager to report the job Cancelled (it
//! removes the unfinished export). An export writes only into the target directory: it changes
//! no volume, snapshot or app.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use cairn_pubsub::{Bus, BusError, PublishOptions};
use cairn_types::export::{
    ExportAction, ExportConfig, ExportKind, ExportManifest, ExportState, ExportStatus,
    MANIFEST_FILE,
};
use uuid::Uuid;

use crate::readout::Roots;

/// How long to wait for the volume-manager to take the job.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Exit status of a cancelled job (as a shell reports Ctrl-C).
const CANCELLED: u8 = 130;

pub struct JobRequest {
    pub action: ExportAction,
    pub snapshot: Uuid,
    pub target: PathBuf,
    /// An export to a remote: its id and the key prefix under the remote's own.
    pub remote: Option<(String, String)>,
    pub incremental: bool,
}

/// `--to`: a directory (a path starting with `/` or `.`, or an existing directory), else
/// `REMOTE[:PREFIX]`.
pub fn parse_target(to: &str) -> (PathBuf, Option<(String, String)>) {
    let path = Path::new(to);
    if to.starts_with('/') || to.starts_with('.') || path.is_dir() {
        return (path.to_path_buf(), None);
    }
    let (remote, prefix) = to.split_once(':').unwrap_or((to, ""));
    (
        PathBuf::new(),
        Some((remote.to_string(), prefix.to_string())),
    )
}

/// Publishes the job, shows its progress, returns 0 on Done, 1 on Failed, 130 on Cancelled,
/// 3 when the volume-manager does not answer.
pub async fn run(roots: &Roots, request: JobRequest, json: bool) -> anyhow::Result<ExitCode> {
    let target = if request.remote.is_some() {
        PathBuf::new()
    } else {
        std::path::absolute(&request.target)
            .with_context(|| format!("resolving {}", request.target.display()))?
    };
    let (remote, remote_prefix) = request.remote.clone().unwrap_or_default();
    let bus = Bus::new("cli", &roots.run, &roots.persist);
    let publication = bus
        .publish::<ExportConfig>(PublishOptions::for_requests())
        .await
        .map_err(|e| match e {
            BusError::AlreadyPublished { holder, .. } => anyhow!(
                "another `cairn export` or `cairn verify` is running ({holder}): one job at a time; wait for it, or press Ctrl-C in it to cancel it"
            ),
            other => anyhow!("cannot publish the export request under {}: {other}", roots.run.display()),
        })?;
    // Requests of earlier runs go; only this one is in force.
    publication.signal_restarted().await?;
    let mut config = ExportConfig {
        job_id: Uuid::new_v4(),
        action: request.action,
        snapshot_id: request.snapshot,
        app_uuid: Uuid::nil(),
        target_dir: target,
        incremental: request.incremental,
        cancel: false,
        remote,
        remote_prefix,
        // A job asked by hand: no chain limit, no retention, run even if done before.
        full_every: 0,
        keep_exports: 0,
        once: false,
    };
    let key = config.job_id.to_string();
    let mut statuses = bus.subscribe::<ExportStatus>("volume-manager");
    publication.publish(config.clone()).await?;
    let mut bar = Bar::new(json);
    let started = Instant::now();
    let mut cancelling = false;
    let status = loop {
        if let Some(status) = statuses.get(&key).cloned() {
            bar.show(&status);
            if status.state != ExportState::Running {
                break status;
            }
        } else if started.elapsed() > ANSWER_WAIT {
            bar.clear();
            eprintln!(
                "cairn: the volume-manager did not take the job within {} s: is the device running (`cairn up`)?",
                ANSWER_WAIT.as_secs()
            );
            return Ok(ExitCode::from(3));
        }
        tokio::select! {
            _ = statuses.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c(), if !cancelling => {
                cancelling = true;
                bar.clear();
                eprintln!("cairn: cancelling the job…");
                config.cancel = true;
                publication.publish(config.clone()).await?;
            }
        }
    };
    bar.clear();
    let _ = publication.unpublish(&key).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_outcome(&status);
    }
    Ok(match status.state {
        ExportState::Done => ExitCode::SUCCESS,
        ExportState::Cancelled => ExitCode::from(CANCELLED),
        _ => ExitCode::from(1),
    })
}

fn print_outcome(status: &ExportStatus) {
    match status.state {
        ExportState::Done => {
            let what = match status.action {
                ExportAction::Export => "exported to",
                ExportAction::Verify => "verified: every checksum matches in",
            };
            if status.remote_export.is_empty() {
                println!("{what} {}", status.export_dir.display());
            } else {
                println!(
                    "{what} {} ({} uploaded)",
                    status.remote_export,
                    mib(status.bytes_uploaded)
                );
            }
            for v in &status.volumes {
                let mut line = format!("  volume {} {} {:?}", v.volume_id, v.file, v.kind);
                if status.action == ExportAction::Export {
                    let carried = match v.kind {
                        ExportKind::Full => "disk",
                        ExportKind::Incremental => "changed",
                    };
                    line.push_str(&format!(
                        ", {} {carried} in a {} file",
                        mib(v.data_bytes),
                        mib(v.size)
                    ));
                }
                if !v.fallback_reason.is_empty() {
                    line.push_str(&format!(" (full: {})", v.fallback_reason));
                }
                println!("{line}");
            }
        }
        ExportState::Cancelled => eprintln!("cairn: cancelled: {}", status.error),
        _ => eprintln!("cairn: failed: {}", status.error),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// A progress bar on a terminal, a line per ~10 % otherwise, nothing with --json.
struct Bar {
    tty: bool,
    quiet: bool,
    shown: bool,
    last_decile: Option<u64>,
}

impl Bar {
    fn new(json: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            quiet: json,
            shown: false,
            last_decile: None,
        }
    }

    fn show(&mut self, status: &ExportStatus) {
        // Nothing to show until the job knows its size.
        if self.quiet || status.state != ExportState::Running || status.bytes_total == 0 {
            return;
        }
        let fraction = if status.bytes_total == 0 {
            0.0
        } else {
            status.bytes_done as f64 / status.bytes_total as f64
        };
        let mut text = format!(
            "{:>3.0}% {} / {}",
            fraction * 100.0,
            mib(status.bytes_done),
            mib(status.bytes_total)
        );
        if status.bytes_uploaded > 0 {
            text.push_str(&format!(", {} uploaded", mib(status.bytes_uploaded)));
        }
        if self.tty {
            let width = 30;
            let filled = ((fraction * width as f64) as usize).min(width);
            eprint!(
                "\r[{}{}] {text}",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else {
            let decile = (fraction * 10.0) as u64;
            if self.last_decile != Some(decile) {
                self.last_decile = Some(decile);
                eprintln!("{text}");
            }
        }
    }

    fn clear(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// `cairn import DIR --print-config`: per volume, the local config entry that makes it from
/// the export (`from_export`: verified, then converted by the volume-manager), and the app
/// config saved with the snapshot (EVE's form) to declare the app from.
pub fn print_config(dir: &Path) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: not a complete export (an unfinished one has no manifest)",
            path.display()
        )
    })?;
    let manifest: ExportManifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an export manifest", path.display()))?;
    // In the local config file's form (`cairn up --config`): paste into its `volumes`.
    let volumes: Vec<serde_json::Value> = manifest
        .volumes
        .iter()
        .map(|v| {
            serde_json::json!({
                "uuid": v.volume_id,
                "display_name": v.display_name,
                "max_size_bytes": v.virtual_size,
                "format": "qcow2",
                "from_export": { "dir": dir, "volume_uuid": v.volume_id },
            })
        })
        .collect();
    let out = serde_json::json!({
        "app_uuid": manifest.app_uuid,
        "app_name": manifest.app_name,
        "snapshot_id": manifest.snapshot_id,
        "volumes": volumes,
        "app_config_in_snapshot": manifest.app_config,
    });
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn to_is_a_directory_when_it_looks_like_a_path_else_a_remote_and_its_prefix() {
        assert_eq!(parse_target("/mnt/usb"), (PathBuf::from("/mnt/usb"), None));
        assert_eq!(parse_target("./out"), (PathBuf::from("./out"), None));
        assert_eq!(
            parse_target("backups:site-a/line-2"),
            (
                PathBuf::new(),
                Some(("backups".into(), "site-a/line-2".into()))
            )
        );
        assert_eq!(
            parse_target("backups"),
            (PathBuf::new(), Some(("backups".into(), String::new())))
        );
    }
}

//! External tools (qemu-img, btrfs, zfs) run through `tokio::process`, each with a timeout; a
//! failure carries the command line, the exit status and stderr.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

/// Default limit for one backend command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {secs} s and was killed")]
    Timeout { command: String, secs: u64 },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl CommandError {
    /// The tool's own words, for classifying the failure.
    pub fn stderr(&self) -> &str {
        match self {
            Self::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Runs `program args…`, waits at most `timeout`, and fails on a non-zero exit.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, CommandError> {
    let command = std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let started = std::time::Instant::now();
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(result) => result.map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?,
        Err(_) => {
            return Err(CommandError::Timeout {
                command,
                secs: timeout.as_secs(),
            });
        }
    };
    tracing::debug!(
        command,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "tool call"
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if output.status.success() {
        Ok(Output { stdout, stderr })
    } else {
        Err(CommandError::Failed {
            command,
            status: output.status.to_string(),
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_reports_status_and_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], COMMAND_TIMEOUT)
            .await
            .err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("exit status: 3") && text.contains("boom"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout() {
        let err = run("sleep", &["5"], Duration::from_millis(100)).await.err();
        assert!(matches!(err, Some(CommandError::Timeout { .. })), "{err:?}");
    }
}

//! A small typed QMP client: one Unix-socket connection, one command at a time, every wait
//! bounded by a timeout. Asynchronous events that arrive between replies are kept aside.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout};

/// Longest line accepted from qemu (a `query-*` answer on a big VM stays far below this).
const MAX_LINE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: no answer to `{command}` within {timeout:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        timeout: Duration,
    },
    #[error("QMP socket {path}: qemu closed the connection during `{command}`")]
    Closed { path: PathBuf, command: String },
    #[error("QMP socket {path}: unreadable message during `{command}`: {detail}")]
    Protocol {
        path: PathBuf,
        command: String,
        detail: String,
    },
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP job {job} ({command}) failed: {desc}")]
    Job {
        command: String,
        job: String,
        desc: String,
    },
}

/// An open QMP session, past capabilities negotiation.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: Vec<Value>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

/// What `query-status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRunState {
    pub running: bool,
    /// qemu's run state: `running`, `paused`, `shutdown`, `inmigrate`, ...
    pub status: String,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode; `timeout` bounds each step and
    /// every later command.
    pub async fn connect(path: &Path, timeout_each: Duration) -> Result<Self, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = timeout(timeout_each, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.to_path_buf(),
                command: "connect".into(),
                timeout: timeout_each,
            })?
            .map_err(io)?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            events: Vec::new(),
            timeout: timeout_each,
        };
        let greeting = timeout(timeout_each, qmp.read_message("greeting"))
            .await
            .map_err(|_| qmp.timed_out("greeting"))??;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let deadline = Instant::now() + self.timeout;
        let written =
            tokio::time::timeout_at(deadline, self.writer.write_all(line.as_bytes())).await;
        match written {
            Err(_) => return Err(self.timed_out(command)),
            Ok(Err(source)) => {
                return Err(QmpError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
            Ok(Ok(())) => {}
        }
        loop {
            let message = tokio::time::timeout_at(deadline, self.read_message(command))
                .await
                .map_err(|_| self.timed_out(command))??;
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(error) = message.get("error") {
                let text = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Ok(message.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    pub async fn query_status(&mut self) -> Result<VmRunState, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(VmRunState {
            running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }

    /// Starts a job command (its arguments must include `job-id`), waits until the job
    /// concludes (polling `query-jobs`), dismisses it, and fails with the job's error if any.
    pub async fn run_job(
        &mut self,
        command: &str,
        job_id: &str,
        args: Value,
        limit: Duration,
    ) -> Result<(), QmpError> {
        self.execute(command, Some(args)).await?;
        let deadline = Instant::now() + limit;
        loop {
            let jobs = self.execute("query-jobs", None).await?;
            let job = jobs
                .as_array()
                .and_then(|all| {
                    all.iter()
                        .find(|j| j.get("id").and_then(Value::as_str) == Some(job_id))
                })
                .cloned();
            let Some(job) = job else {
                return Err(QmpError::Job {
                    command: command.into(),
                    job: job_id.into(),
                    desc: "the job disappeared before it concluded".into(),
                });
            };
            if job.get("status").and_then(Value::as_str) == Some("concluded") {
                // Dismiss even on failure, so that the job id can be used again.
                self.execute("job-dismiss", Some(json!({ "id": job_id })))
                    .await?;
                if let Some(desc) = job.get("error").and_then(Value::as_str) {
                    return Err(QmpError::Job {
                        command: command.into(),
                        job: job_id.into(),
                        desc: desc.into(),
                    });
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Best effort: leave no job behind.
                let _ = self
                    .execute("job-cancel", Some(json!({ "id": job_id })))
                    .await;
                return Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: format!("{command} job {job_id}"),
                    timeout: limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Events received so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = AsyncReadExt::take(&mut self.reader, MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(QmpError::Closed {
                    path: self.path.clone(),
                    command: command.to_string(),
                });
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .map_err(|e| self.protocol(command, format!("{e}: {}", line.trim())));
        }
    }

    fn protocol(&self, command: &str, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            command: command.to_string(),
            detail,
        }
    }

    fn timed_out(&self, command: &str) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            command: command.to_string(),
            timeout: self.timeout,
        }
    }
}

/// Connects and runs one command: the common case for the domain-manager, which holds no
/// QMP connection between operations (qemu serves one client at a time).
pub async fn execute_once(
    path: &Path,
    command: &str,
    args: Option<Value>,
    limit: Duration,
) -> Result<Value, QmpError> {
    let mut qmp = Qmp::connect(path, limit).await?;
    qmp.execute(command, args).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted qemu: greeting, then for each request the given reply lines (`{id}` is
    /// replaced by the request's id).
    async fn fake_qemu(listener: UnixListener, replies: Vec<Vec<&'static str>>) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greeting");
        for reply in replies {
            let Ok(Some(line)) = lines.next_line().await else {
                return;
            };
            let request: Value = serde_json::from_str(&line).expect("json request");
            let id = request["id"].to_string();
            for r in reply {
                let text = r.replace("{id}", &id) + "\n";
                write.write_all(text.as_bytes()).await.expect("reply");
            }
        }
        // Stay connected but silent.
        while let Ok(Some(_)) = lines.next_line().await {}
    }

    #[tokio::test]
    async fn events_are_kept_aside_and_errors_carry_class_and_desc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_qemu(
            listener,
            vec![
                vec![r#"{"return": {}, "id": {id}}"#],
                vec![
                    r#"{"event": "STOP", "timestamp": {}}"#,
                    r#"{"return": {"running": false, "status": "paused"}, "id": {id}}"#,
                ],
                vec![
                    r#"{"error": {"class": "GenericError", "desc": "no such snapshot"}, "id": {id}}"#,
                ],
            ],
        ));
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2))
            .await
            .expect("connect");
        let state = qmp.query_status().await.expect("query-status");
        assert_eq!(
            state,
            VmRunState {
                running: false,
                status: "paused".into()
            }
        );
        assert_eq!(qmp.take_events().len(), 1);
        let err = qmp
            .execute("snapshot-load", None)
            .await
            .expect_err("error reply");
        assert!(
            matches!(&err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no such snapshot"),
            "{err}"
        );
        // The fake now stays silent: the timeout must fire.
        let silent = qmp
            .execute("query-status", None)
            .await
            .expect_err("timeout");
        assert!(matches!(silent, QmpError::Timeout { .. }), "{silent}");
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
            .await
            .expect_err("no server");
        assert!(matches!(err, QmpError::Io { .. }), "{err}");
    }
}

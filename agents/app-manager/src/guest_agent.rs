//! Talks to a VM's qemu-guest-agent over the virtio-serial port the domain-manager
//! gives a VM whose spec says `guest_agent` (`<run>/domain-manager/apps/<app>/qga.sock`): the
//! filesystem freeze and thaw around a live snapshot, run by the hook executor as part of the
//! `pre` and `post` steps, so they share the hooks' ordering and crash safety.
//!
//! The port is a byte stream with no framing and may hold stale answers (a previous client
//! that gave up), so every exchange starts with `guest-sync-delimited`: the agent answers with
//! a 0xFF byte, then `{"return": id}`; everything before is discarded. Every wait is bounded;
//! a guest without an agent never answers, which is reported as such.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Where the domain-manager puts the guest agent's port of `app`.
pub fn socket(run_dir: &Path, app: uuid::Uuid) -> PathBuf {
    run_dir
        .join("domain-manager")
        .join("apps")
        .join(app.to_string())
        .join("qga.sock")
}

#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    #[error("cannot reach the guest agent's port {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no guest agent answered within {}s on {}", within.as_secs(), socket.display())]
    NoAnswer { socket: PathBuf, within: Duration },
    #[error("the guest agent's port {} failed: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("the guest agent answered {command} with something else: {answer}")]
    Garbled { command: String, answer: String },
}

/// One connection to a guest agent, synchronized.
pub struct GuestAgent {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
    within: Duration,
}

impl GuestAgent {
    /// Connects and synchronizes; `within` bounds this and every later exchange.
    pub async fn connect(socket: &Path, within: Duration) -> Result<Self, GuestAgentError> {
        let stream = match tokio::time::timeout(within, UnixStream::connect(socket)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(GuestAgentError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                });
            }
            Err(_) => return Err(no_answer(socket, within)),
        };
        let mut agent = Self {
            socket: socket.to_path_buf(),
            stream: BufReader::new(stream),
            within,
        };
        agent.sync().await?;
        Ok(agent)
    }

    async fn sync(&mut self) -> Result<(), GuestAgentError> {
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_low());
        let request = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        self.send(&request).await?;
        let socket = self.socket.clone();
        let within = self.within;
        let wait = async {
            loop {
                // Anything before the delimiter is stale.
                let mut skipped = Vec::new();
                if self.stream.read_until(0xff, &mut skipped).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                let mut line = String::new();
                self.stream.read_line(&mut line).await?;
                let answer: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                if answer.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(GuestAgentError::Io { socket, source }),
            Err(_) => Err(no_answer(&socket, within)),
        }
    }

    async fn send(&mut self, request: &Value) -> Result<(), GuestAgentError> {
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        let write = self.stream.get_mut().write_all(&bytes);
        match tokio::time::timeout(self.within, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(GuestAgentError::Io {
                socket: self.socket.clone(),
                source,
            }),
            Err(_) => Err(no_answer(&self.socket, self.within)),
        }
    }

    /// Runs `command` (no arguments) and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value, GuestAgentError> {
        self.send(&json!({"execute": command})).await?;
        let mut line = String::new();
        let read = self.stream.read_line(&mut line);
        match tokio::time::timeout(self.within, read).await {
            Ok(Ok(0)) => {
                return Err(GuestAgentError::Io {
                    socket: self.socket.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Err(GuestAgentError::Io {
                    socket: self.socket.clone(),
                    source,
                });
            }
            Err(_) => return Err(no_answer(&self.socket, self.within)),
        }
        let answer: Value =
            serde_json::from_str(line.trim()).map_err(|_| GuestAgentError::Garbled {
                command: command.into(),
                answer: line.trim().into(),
            })?;
        if let Some(value) = answer.get("return") {
            return Ok(value.clone());
        }
        let message = answer
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .map(str::to_string);
        match message {
            Some(message) => Err(GuestAgentError::Refused {
                command: command.into(),
                message,
            }),
            None => Err(GuestAgentError::Garbled {
                command: command.into(),
                answer: line.trim().into(),
            }),
        }
    }
}

fn no_answer(socket: &Path, within: Duration) -> GuestAgentError {
    GuestAgentError::NoAnswer {
        socket: socket.to_path_buf(),
        within,
    }
}

/// Low bits for a sync id that differs between exchanges (no randomness needed, only change).
fn rand_low() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() & 0xf_ffff)
}

/// Freezes the guest's filesystems. If the freeze was asked but its answer did not come, a
/// thaw is tried at once (best effort), so a failed freeze leaves nothing frozen as far as
/// this side can tell.
pub async fn freeze(socket: &Path, within: Duration) -> Result<(), GuestAgentError> {
    let mut agent = GuestAgent::connect(socket, within).await?;
    match agent.execute("guest-fsfreeze-freeze").await {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Ok(mut again) = GuestAgent::connect(socket, within).await {
                let _ = again.execute("guest-fsfreeze-thaw").await;
            }
            Err(e)
        }
    }
}

pub async fn thaw(socket: &Path, within: Duration) -> Result<(), GuestAgentError> {
    let mut agent = GuestAgent::connect(socket, within).await?;
    agent.execute("guest-fsfreeze-thaw").await.map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A port nobody answers on: like a VM's virtio-serial port with no agent in the guest.
    #[tokio::test]
    async fn a_port_without_an_agent_is_reported_as_no_guest_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let silent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        });
        let e = freeze(&path, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no guest agent answered within 1s on {}", path.display())
        );
        silent.abort();
    }

    #[tokio::test]
    async fn a_missing_port_is_named() {
        let e = thaw(Path::new("/nonexistent/qga.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot reach the guest agent's port /nonexistent/qga.sock"),
            "{e}"
        );
    }
}

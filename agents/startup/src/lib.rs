//! The start-up every agent shares, so that they log, name their roots and stop alike:
//! [`start`] (logging, arguments, runtime), the [`CommonArgs`] flattened into each agent's
//! arguments, and [`StopSignals`] (SIGTERM from `cairn up` or init, SIGINT from a terminal).
//!
//! Each agent's `main.rs` stays a few lines: `start(threads, run)`, and in `run` open its bus
//! with [`CommonArgs::bus`] and run until [`StopSignals::recv`] (or [`StopSignals::stopped`]).

use std::future::Future;
use std::path::PathBuf;

use cairn_pubsub::Bus;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The arguments every agent takes (`#[command(flatten)]` them).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Persistent state root.
    #[arg(long, env = "CAIRN_PERSIST_DIR", default_value = "/persist")]
    pub persist_dir: PathBuf,
    /// Runtime root: bus sockets and volatile files.
    #[arg(long, env = "CAIRN_RUN_DIR", default_value = "/run/cairn")]
    pub run_dir: PathBuf,
    /// A group whose members may read this agent's status topics (technicians).
    #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
    pub technicians_gid: Option<u32>,
}

impl CommonArgs {
    /// `agent`'s handle on the bus under these roots.
    pub fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, &self.run_dir, &self.persist_dir)
    }
}

/// The threads of an agent's runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One: the agent waits on sockets, children and the blocking pool.
    One,
    /// This many workers (a download streams while the bus keeps answering).
    Workers(usize),
    /// tokio's default: one worker per CPU.
    PerCpu,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the tokio runtime")]
pub struct RuntimeError(#[source] std::io::Error);

/// What every agent's `main` does before its own work: logging ([`init_logging`]), its
/// arguments `A`, a runtime of `threads`; then `run(args)` on it, whose result is the agent's.
pub fn start<A, F, Fut, T, E>(threads: Threads, run: F) -> Result<T, E>
where
    A: clap::Parser,
    F: FnOnce(A) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<RuntimeError>,
{
    init_logging();
    let args = A::parse();
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Workers(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.max(1));
            builder
        }
        Threads::PerCpu => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build().map_err(RuntimeError)?;
    runtime.block_on(run(args))
}

/// Logs to stderr (the supervisor keeps it), filtered by `RUST_LOG` (default `info`), in colour
/// only on a terminal: under `cairn up` stderr is a pipe into a log file.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[derive(Debug, thiserror::Error)]
#[error("cannot handle {signal}: {source}")]
pub struct SignalError {
    signal: &'static str,
    source: std::io::Error,
}

/// SIGTERM and SIGINT, handled from the moment [`StopSignals::install`] returns: an agent
/// installs them before a long start (re-adoption, reconcile), so a stop asked meanwhile is
/// kept rather than killing it halfway.
pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    /// Needs a tokio runtime.
    pub fn install() -> Result<Self, SignalError> {
        let handle = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| SignalError {
                signal: name,
                source,
            })
        };
        Ok(Self {
            terminate: handle(SignalKind::terminate(), "SIGTERM")?,
            interrupt: handle(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Waits for a stop signal, then says what stopping means for this agent (`note`).
    pub async fn stopped(mut self, note: &'static str) {
        let signal = self.recv().await;
        tracing::info!(signal, "stopping; {note}");
    }

    /// Waits for the next stop signal and names it (cancel-safe).
    pub async fn recv(&mut self) -> &'static str {
        let name = tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
        name
    }
}

//! The start-up every agent shares, so that they log, name their roots and stop alike:
//! [`start`] (logging, arguments, runtime), the [`CommonArgs`] flattened into each agent's
//! arguments, [`StopSignals`] (SIGTERM from `cairn up` or init, SIGINT from a terminal), and
//! [`answer_record_check`] for the records only the agent knows.
//!
//! Each agent's `main.rs` stays a few lines: `start(threads, run)`, and in `run` open its bus
//! with [`CommonArgs::bus`] and run until [`StopSignals::recv`] (or [`StopSignals::stopped`]).

use std::ffi::OsStr;
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

/// Gives the heap freed by a burst of work (loading every record at start, a scan) back to the
/// system: glibc keeps freed heap mapped, in one arena per thread that allocated, unless asked,
/// and an agent then idles for months at its start-up peak.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
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

/// Checks one record's bytes against a schema: `Err` names the field or the damage.
pub type RecordCheck = fn(&[u8]) -> Result<(), String>;

/// The [`RecordCheck`] of records of type `T`: envelope, checksum, migrations, mandatory fields.
pub fn record_check<T: cairn_persist::Record>(bytes: &[u8]) -> Result<(), String> {
    cairn_persist::decode::<T>(bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The first argument that asks an agent to check a record: `AGENT --check-record FILE`.
pub const CHECK_RECORD_ARG: &str = "--check-record";
/// Exit status of `--check-record` for a schema the agent does not own.
pub const CHECK_RECORD_NOT_OWNED: i32 = 3;

/// Answers `AGENT --check-record FILE` and exits; returns when the agent was not asked.
///
/// Some records are private to the agent that writes them (its own state, its checkpoint), so
/// only that agent's build knows their fields: `cairn record check` asks it. Exit 0: the record
/// is sound; 1: the problem is on stdout; 2: bad arguments; 3: not a schema in `owned`.
pub fn answer_record_check(owned: &[(&str, RecordCheck)]) {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(CHECK_RECORD_ARG)) {
        return;
    }
    let (Some(file), None) = (args.next(), args.next()) else {
        eprintln!("usage: {CHECK_RECORD_ARG} FILE");
        std::process::exit(2);
    };
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) => {
            println!("cannot read it: {e}");
            std::process::exit(1);
        }
    };
    let schema = match cairn_persist::inspect(&bytes) {
        Ok(inspected) => inspected.schema,
        Err(e) => {
            println!("{e}");
            std::process::exit(1);
        }
    };
    let Some((_, check)) = owned
        .iter()
        .find(|(name, _)| Some(*name) == schema.as_deref())
    else {
        println!(
            "this agent does not own schema {}",
            schema.unwrap_or_default()
        );
        std::process::exit(CHECK_RECORD_NOT_OWNED);
    };
    match check(&bytes) {
        Ok(()) => std::process::exit(0),
        Err(problem) => {
            println!("{problem}");
            std::process::exit(1);
        }
    }
}

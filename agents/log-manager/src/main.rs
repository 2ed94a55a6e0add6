//! cairn-log-manager: the agent binary. Arguments, logging, bus; the rest is the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_log_manager::AGENT;
use cairn_log_manager::agent::{self, Settings};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cairn-log-manager",
    about = "Collects the device's logs into a bounded queue and uploads them to the controller"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The agents' log files (`cairn up` writes `<run>/logs/<agent>.log`).
    #[arg(long, env = "CAIRN_LOG_DIR")]
    logs_dir: Option<PathBuf>,
    /// The queue's cap in bytes: past it the oldest files are dropped (and counted).
    #[arg(long, env = "CAIRN_LOG_QUEUE_BYTES", default_value_t = 64 << 20)]
    queue_bytes: u64,
    /// How often the log files are read.
    #[arg(long, env = "CAIRN_LOG_COLLECT_MS", default_value_t = 1_000)]
    collect_ms: u64,
    /// Lines wait at most this long before they are written into a gzip file (EVE's newlogd:
    /// `logfileDelay`, 300 s). They wait in their source files, so a kill loses none of them.
    #[arg(long, env = "CAIRN_LOG_BATCH_MS", default_value_t = 300_000)]
    batch_ms: u64,
    /// The first retry delay after a failed upload (doubling from there).
    #[arg(long, env = "CAIRN_LOG_RETRY_MIN_MS", default_value_t = 1_000)]
    retry_min_ms: u64,
    /// The longest retry delay.
    #[arg(long, env = "CAIRN_LOG_RETRY_MAX_MS", default_value_t = 60_000)]
    retry_max_ms: u64,
}

fn main() -> anyhow::Result<()> {
    cairn_startup::answer_record_check(&[(
        "LogCursors",
        cairn_startup::record_check::<cairn_log_manager::collect::LogCursors>,
    )]);
    start(Threads::One, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bus = args.common.bus(AGENT);
    let signals = StopSignals::install()?;
    let settings = Settings {
        persist: args.common.persist_dir.clone(),
        run: args.common.run_dir.clone(),
        logs_dir: args
            .logs_dir
            .unwrap_or_else(|| args.common.run_dir.join("logs")),
        queue_bytes: args.queue_bytes,
        collect_every: Duration::from_millis(args.collect_ms.max(10)),
        batch_for: Duration::from_millis(args.batch_ms),
        retry_min: Duration::from_millis(args.retry_min_ms.max(1)),
        retry_max: Duration::from_millis(args.retry_max_ms.max(1)),
        upload_timeout: Duration::from_secs(30),
        technicians_gid: args.common.technicians_gid,
    };
    let shutdown = signals.stopped("unsent logs stay queued on disk");
    agent::run(&bus, settings, shutdown)
        .await
        .context("the log-manager failed")?;
    Ok(())
}

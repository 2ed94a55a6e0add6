//! cairn-edgeview: the agent binary. Arguments, logging, bus; the rest is the library.

use std::time::Duration;

use anyhow::Context;
use cairn_edgeview::AGENT;
use cairn_edgeview::agent::{self, Settings};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cairn-edgeview",
    about = "Answers EVE's EdgeView read-only commands through the controller's dispatcher"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The first reconnect delay after the dispatcher link drops (doubling from there).
    #[arg(long, env = "CAIRN_EDGEVIEW_RETRY_MIN_MS", default_value_t = 1_000)]
    retry_min_ms: u64,
    /// The longest reconnect delay (EVE: 120 s).
    #[arg(long, env = "CAIRN_EDGEVIEW_RETRY_MAX_MS", default_value_t = 120_000)]
    retry_max_ms: u64,
}

fn main() -> anyhow::Result<()> {
    start(Threads::One, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bus = args.common.bus(AGENT);
    let signals = StopSignals::install()?;
    // EVE names the device to the dispatcher by its host name.
    let hostname = tokio::fs::read_to_string("/proc/sys/kernel/hostname")
        .await
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "cairn".to_string());
    let settings = Settings {
        persist: args.common.persist_dir.clone(),
        run: args.common.run_dir.clone(),
        hostname,
        technicians_gid: args.common.technicians_gid,
        first_backoff: Duration::from_millis(args.retry_min_ms.max(1)),
        max_backoff: Duration::from_millis(args.retry_max_ms.max(1)),
    };
    let shutdown = signals.stopped("the edgeview sessions end");
    agent::run(&bus, settings, shutdown)
        .await
        .context("the edgeview agent failed")?;
    Ok(())
}

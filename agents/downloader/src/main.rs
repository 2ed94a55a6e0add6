//! cairn-downloader: the agent binary. Arguments, logging, bus; the rest is the library.

use std::time::Duration;

use anyhow::Context;
use cairn_downloader::AGENT;
use cairn_downloader::agent::{self, Settings};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cairn-downloader",
    about = "Downloads and verifies Cairn's content trees"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Milliseconds without data (connecting, waiting for the answer, or between bytes) after
    /// which a download attempt is abandoned; EVE's `timer.download.stalled` overrides it.
    #[arg(long, env = "CAIRN_DOWNLOAD_STALL_MS", default_value_t = 60_000)]
    stall_ms: u64,
    /// The wait after a failed attempt (every datastore tried) before the next: EVE's default
    /// `timer.download.retry`, which overrides it.
    #[arg(long, env = "CAIRN_DOWNLOAD_RETRY_MS", default_value_t = 600_000)]
    retry_ms: u64,
}

fn main() -> anyhow::Result<()> {
    cairn_startup::answer_record_check(&[(
        "ContentRefs",
        cairn_startup::record_check::<cairn_downloader::store::ContentRefs>,
    )]);
    // The registry client's TLS (reqwest's rustls without a provider of its own) uses ring, as
    // the rest of Cairn does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Two threads: a download streams while the bus keeps answering.
    start(Threads::Workers(2), run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bus = args.common.bus(AGENT);
    let signals = StopSignals::install()?;
    let settings = Settings {
        stall: Duration::from_millis(args.stall_ms.max(1)),
        retry: Duration::from_millis(args.retry_ms.max(1)),
        // EVE's default: a blob no tree holds goes at once unless the config says otherwise.
        defer_delete: Duration::ZERO,
    };
    let shutdown = signals.stopped("downloads resume at the next start");
    agent::run(
        &bus,
        &args.common.persist_dir,
        args.common.technicians_gid,
        settings,
        shutdown,
    )
    .await
    .context("the downloader failed")?;
    Ok(())
}

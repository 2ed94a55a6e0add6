//! cairn-domain-manager: the agent binary. Arguments, logging, bus; the rest is the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_domain_manager::{AGENT, Settings, Supervisor, Timeouts};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cairn-domain-manager",
    about = "Runs Cairn apps as qemu VMs and processes"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The qemu binary.
    #[arg(long, env = "CAIRN_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// `auto` (kvm when it works, else tcg), `kvm` or `tcg`.
    #[arg(long, env = "CAIRN_ACCEL", default_value = "auto")]
    accel: String,
    /// Seconds a domain gets to stop on ACPI powerdown or SIGTERM before harder steps.
    #[arg(long, env = "CAIRN_DOMAIN_STOP_TIMEOUT", default_value_t = 30.0)]
    stop_timeout: f64,
    /// Stop every domain when the agent is told to stop (the device is shutting down, as under
    /// `cairn up`); by default domains keep running and the next start re-adopts them.
    #[arg(long, env = "CAIRN_STOP_DOMAINS_ON_EXIT")]
    stop_domains_on_exit: bool,
    /// Milliseconds between two readings of each app's CPU and memory (`DomainMetric`); EVE's
    /// domainmgr reads four times per metrics report (60 s by default).
    #[arg(long, env = "CAIRN_METRIC_INTERVAL_MS", default_value_t = 5000)]
    metric_interval_ms: u64,
}

fn main() -> anyhow::Result<()> {
    // One thread: the agent waits on sockets and children; a small footprint matters more.
    start(Threads::One, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let stop = Duration::try_from_secs_f64(args.stop_timeout)
        .context("--stop-timeout must be a non-negative number of seconds")?;
    let stop_domains = args.stop_domains_on_exit;
    let bus = args.common.bus(AGENT);
    let settings = Settings {
        qemu: args.qemu,
        accel: args.accel,
        timeouts: Timeouts {
            stop,
            ..Timeouts::default()
        },
        technicians_gid: args.common.technicians_gid,
        metric_interval: Duration::from_millis(args.metric_interval_ms.max(100)),
    };
    // Before the re-adoption, which can take a while: a stop asked meanwhile still stops the
    // domains it adopts.
    let mut signals = StopSignals::install()?;
    let supervisor = Supervisor::open(&bus, settings)
        .await
        .context("cannot start the domain-manager")?;
    let shutdown = async move {
        signals.recv().await;
        if stop_domains {
            tracing::info!("shutting down with the device: stopping the domains");
        } else {
            tracing::info!(
                "shutting down; domains keep running and are re-adopted at the next start"
            );
        }
    };
    supervisor.run(shutdown, stop_domains).await?;
    Ok(())
}

//! `cairn-config-agent`: puts the device's config in force on the bus.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_config_agent::apply::{LOCAL_POLL, Publications, follow_local_file};
use cairn_pubsub::Bus;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn's config-agent: the controller link and the local config source"
)]
struct Args {
    /// Persistent state root.
    #[arg(long, env = "CAIRN_PERSIST_DIR", default_value = "/persist")]
    persist_dir: PathBuf,
    /// Runtime root: bus sockets and volatile files.
    #[arg(long, env = "CAIRN_RUN_DIR", default_value = "/run/cairn")]
    run_dir: PathBuf,
    /// A local JSON config file, applied at start and whenever it changes.
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// How often the local file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = LOCAL_POLL.as_millis() as u64)]
    poll_ms: u64,
    /// A group whose members may read the device status (technicians).
    #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
    technicians_gid: Option<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let bus = Bus::new("config-agent", &args.run_dir, &args.persist_dir);
    let publications = Publications::open(&bus, args.technicians_gid)
        .await
        .context("opening the config-agent's publications")?;
    let Some(config) = args.config else {
        anyhow::bail!(
            "no config source: give --config FILE (a controller link is not implemented yet)"
        );
    };
    let poll = Duration::from_millis(args.poll_ms.max(10));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = follow_local_file(&publications, &config, poll) => {
            result.context("publishing the config")?;
        }
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    for publication in [
        publications.apps.flush().await,
        publications.volumes.flush().await,
    ] {
        publication.context("writing the key files")?;
    }
    Ok(())
}

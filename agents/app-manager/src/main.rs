//! `cairn-app-manager`: application lifecycle and snapshots, driven by the bus.

use std::path::PathBuf;

use anyhow::Context;
use cairn_app_manager::agent::AppManager;
use cairn_pubsub::Bus;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn's app-manager: application lifecycle and the snapshot state machine"
)]
struct Args {
    /// Persistent state root.
    #[arg(long, env = "CAIRN_PERSIST_DIR", default_value = "/persist")]
    persist_dir: PathBuf,
    /// Runtime root: bus sockets and volatile files.
    #[arg(long, env = "CAIRN_RUN_DIR", default_value = "/run/cairn")]
    run_dir: PathBuf,
    /// A group whose members may read the app status (technicians).
    #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
    technicians_gid: Option<u32>,
    /// TENANT:GID: members of group GID are technicians of TENANT only (repeatable); they see
    /// that tenant's apps and snapshots and nothing of the others'.
    #[arg(
        long = "tenant-reader",
        value_name = "TENANT:GID",
        value_parser = cairn_pubsub::access::parse_tenant_reader
    )]
    tenant_readers: Vec<(String, u32)>,
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
    let bus = Bus::new("app-manager", &args.run_dir, &args.persist_dir);
    let manager = AppManager::open(&bus, args.technicians_gid, &args.tenant_readers)
        .await
        .context("starting the app-manager")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = manager.run() => result.context("app-manager stopped")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

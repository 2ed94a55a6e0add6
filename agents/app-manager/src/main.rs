//! `cairn-app-manager`: application lifecycle and snapshots, driven by the bus.

use anyhow::Context;
use cairn_app_manager::agent::AppManager;
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn's app-manager: application lifecycle and the snapshot state machine"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// TENANT:GID: members of group GID are technicians of TENANT only (repeatable); they see
    /// that tenant's apps and snapshots and nothing of the others'.
    #[arg(
        long = "tenant-reader",
        value_name = "TENANT:GID",
        value_parser = cairn_pubsub::access::parse_tenant_reader
    )]
    tenant_readers: Vec<(String, u32)>,
}

fn main() -> anyhow::Result<()> {
    cairn_startup::answer_record_check(&[(
        "AppManagerState",
        cairn_startup::record_check::<cairn_app_manager::machine::AppState>,
    )]);
    start(Threads::PerCpu, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut stop = StopSignals::install()?;
    let bus = args.common.bus("app-manager");
    let manager = AppManager::open(&bus, args.common.technicians_gid, &args.tenant_readers)
        .await
        .context("starting the app-manager")?;
    tokio::select! {
        result = manager.run() => result.context("app-manager stopped")?,
        _ = stop.recv() => {}
    }
    Ok(())
}

//! cairn-baseos-manager: the agent binary. Arguments, logging, bus; the rest is the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_baseos_manager::agent::{self, AGENT, Boot, Settings};
use cairn_baseos_manager::bootstate::Slot;
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "cairn-baseos-manager",
    about = "Reports the root slots, and commits or rolls back a trial boot of a new one"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The boot disk (the initramfs's CAIRN_BOOT_DISK); none: a bare root image.
    #[arg(long, env = "CAIRN_BOOT_DISK")]
    boot_disk: Option<PathBuf>,
    /// The slot booted (A or B).
    #[arg(long, env = "CAIRN_BOOT_SLOT")]
    boot_slot: Option<String>,
    /// committed, trial or fallback.
    #[arg(long, env = "CAIRN_BOOT_MODE", default_value = "committed")]
    boot_mode: String,
    /// A trial boot must be healthy within this many seconds, else it is rolled back.
    #[arg(long, env = "CAIRN_TRIAL_DEADLINE_S", default_value_t = 240)]
    trial_deadline_s: u64,
    /// Runs this shell command to reboot (after a failed trial, and into a newly installed
    /// slot); default on an A/B boot disk: SIGTERM to PID 1, the image's init.
    #[arg(long, env = "CAIRN_REBOOT_COMMAND")]
    reboot_command: Option<String>,
    /// The public key update bundles must be signed with.
    #[arg(long, env = "CAIRN_UPDATE_KEY", default_value = cairn_baseos_manager::UPDATE_KEY)]
    update_key: PathBuf,
    /// The image's release file.
    #[arg(long, env = "CAIRN_RELEASE_FILE", default_value = "/etc/cairn/release")]
    release: PathBuf,
}

fn main() -> anyhow::Result<()> {
    cairn_startup::answer_record_check(&[
        (
            "UpdateOutcome",
            cairn_startup::record_check::<cairn_types::UpdateOutcome>,
        ),
        (
            "BaseOsUpdateRecord",
            cairn_startup::record_check::<cairn_baseos_manager::update::UpdateRecord>,
        ),
    ]);
    start(Threads::One, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bus = args.common.bus(AGENT);
    let signals = StopSignals::install()?;
    let boot = match (args.boot_disk, args.boot_slot.as_deref()) {
        (Some(disk), Some(slot)) => Some(Boot {
            disk,
            slot: Slot::parse(slot)
                .with_context(|| format!("CAIRN_BOOT_SLOT '{slot}' is not A or B"))?,
            mode: args.boot_mode,
        }),
        _ => None,
    };
    let settings = Settings {
        persist: args.common.persist_dir.clone(),
        run: args.common.run_dir.clone(),
        // SIGTERM to PID 1 only on the device: there PID 1 is the image's init, which reboots.
        reboot: match (args.reboot_command, boot.is_some()) {
            (Some(command), _) => agent::Reboot::Command(command),
            (None, true) => agent::Reboot::Init,
            (None, false) => agent::Reboot::Nothing,
        },
        update_key: args.update_key,
        boot,
        trial_deadline: Duration::from_secs(args.trial_deadline_s),
        release: args.release,
        agents: [
            "config-agent",
            "app-manager",
            "volume-manager",
            "domain-manager",
            "downloader",
            "log-manager",
            "edgeview",
        ]
        .map(String::from)
        .to_vec(),
        technicians_gid: args.common.technicians_gid,
    };
    let shutdown = signals.stopped("the boot state stays as it is");
    agent::run(&bus, settings, shutdown)
        .await
        .context("the baseos-manager failed")?;
    Ok(())
}

//! `cairn-config-agent`: puts the device's config in force on the bus, from a local file or
//! from the controller.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_config_agent::apply::{LOCAL_SAFETY_NET, Publications, follow_local_file};
use cairn_config_agent::controller::Link;
use cairn_config_agent::https::{Https, server_of_url};
use cairn_config_agent::identity::{Identity, Seed};
use cairn_config_agent::link::{self, LinkOptions};
use cairn_startup::{CommonArgs, StopSignals, Threads, start};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn's config-agent: the controller link and the local config source",
    long_about = "Cairn's config-agent: the controller link and the local config source.\n\n\
        With --config FILE the device follows a local JSON file. Otherwise it follows the \
        controller named in <persist>/config/server (set up once with --controller, \
        --onboard-cert, --onboard-key, --serial and --root-cert; the files are kept under \
        <persist>/config/ like EVE's /config partition)."
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A local JSON config file, applied at start and whenever it changes.
    #[arg(long, env = "CAIRN_CONFIG", conflicts_with = "controller")]
    config: Option<PathBuf>,
    /// How often the local file is re-read besides the kernel's change events (a safety net),
    /// in milliseconds.
    #[arg(long, default_value_t = LOCAL_SAFETY_NET.as_millis() as u64)]
    poll_ms: u64,
    /// The controller, `https://host:port`; stored in <persist>/config/server.
    #[arg(long, env = "CAIRN_CONTROLLER")]
    controller: Option<String>,
    /// The onboarding certificate (PEM) used to register; copied to <persist>/config/.
    #[arg(long, requires = "onboard_key")]
    onboard_cert: Option<PathBuf>,
    /// The onboarding certificate's private key (PKCS#8 PEM).
    #[arg(long, requires = "onboard_cert")]
    onboard_key: Option<PathBuf>,
    /// The device's serial number, sent when registering.
    #[arg(long)]
    serial: Option<String>,
    /// The root certificate the controller's certificates must chain to; copied to
    /// <persist>/config/root-certificate.pem.
    #[arg(long, env = "CAIRN_ROOT_CERT")]
    root_cert: Option<PathBuf>,
    /// Between config polls, in milliseconds (jittered; the controller's
    /// `timer.config.interval` overrides it).
    #[arg(long, env = "CAIRN_CONFIG_INTERVAL_MS", default_value_t = 60_000)]
    config_interval_ms: u64,
    /// Milliseconds between two metrics reports to the controller (EVE's default; the
    /// config's `timer.metric.interval` overrides it, within EVE's 5 s to 1 h).
    #[arg(long, env = "CAIRN_METRIC_INTERVAL_MS", default_value_t = 60_000)]
    metric_interval_ms: u64,
    /// Deadline of one exchange with the controller, in milliseconds.
    #[arg(long, env = "CAIRN_CONTROLLER_TIMEOUT_MS", default_value_t = 15_000)]
    controller_timeout_ms: u64,
    /// First wait after a failed exchange, in milliseconds; it doubles each time.
    #[arg(long, env = "CAIRN_RETRY_MS", default_value_t = 1_000)]
    retry_ms: u64,
    /// The longest wait between report retries, in milliseconds.
    #[arg(long, env = "CAIRN_MAX_RETRY_MS", default_value_t = 60_000)]
    max_retry_ms: u64,
    /// TENANT:GID: members of group GID are technicians of TENANT only; they may read the
    /// device status too (repeatable).
    #[arg(long = "tenant-reader", value_name = "TENANT:GID", value_parser = cairn_pubsub::access::parse_tenant_reader)]
    tenant_readers: Vec<(String, u32)>,
}

fn main() -> anyhow::Result<()> {
    cairn_startup::answer_record_check(&[(
        "LastConfig",
        cairn_startup::record_check::<cairn_config_agent::checkpoint::LastConfig>,
    )]);
    start(Threads::PerCpu, run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut stop = StopSignals::install()?;
    let bus = args.common.bus("config-agent");
    let publications = Publications::open(&bus, args.common.technicians_gid, &args.tenant_readers)
        .await
        .context("opening the config-agent's publications")?;
    let source = async {
        match &args.config {
            Some(config) => {
                let safety_net = Duration::from_millis(args.poll_ms.max(10));
                follow_local_file(&publications, config, safety_net, &args.common.persist_dir)
                    .await
                    .context("publishing the config")
            }
            None => {
                let link = open_link(&args).await?;
                let options = LinkOptions {
                    persist: args.common.persist_dir.clone(),
                    interval: Duration::from_millis(args.config_interval_ms.max(10)),
                    metric_interval: Duration::from_millis(args.metric_interval_ms.max(10)),
                    first_backoff: Duration::from_millis(args.retry_ms.max(1)),
                    max_backoff: Duration::from_millis(args.max_retry_ms.max(args.retry_ms)),
                };
                link::run(&publications, &bus, link, options)
                    .await
                    .context("publishing the config")
            }
        }
    };
    tokio::select! {
        result = source => result?,
        _ = stop.recv() => {}
    }
    for publication in [
        publications.apps.flush().await,
        publications.volumes.flush().await,
        publications.items.flush().await,
    ] {
        publication.context("writing the key files")?;
    }
    Ok(())
}

async fn open_link(args: &Args) -> anyhow::Result<Link> {
    let seed = Seed {
        server: args
            .controller
            .as_deref()
            .map(server_of_url)
            .transpose()
            .context("--controller")?,
        root_cert: args.root_cert.clone(),
        onboard_cert: args.onboard_cert.clone(),
        onboard_key: args.onboard_key.clone(),
        serial: args.serial.clone(),
    };
    // Key generation and fsynced writes the first time: on the blocking pool, since the
    // publications already serve subscribers on this runtime.
    let persist = args.common.persist_dir.clone();
    let identity = tokio::task::spawn_blocking(move || Identity::open(&persist, &seed))
        .await
        .context("the identity's reader ended")?
        .context("no config source: give --config FILE, or set the device up for a controller")?;
    let https = Https::new(
        &identity.server,
        &identity.root_pem,
        &identity.root_path(),
        Duration::from_millis(args.controller_timeout_ms.max(1)),
    )?;
    tracing::info!(controller = %identity.server, serial = %identity.serial, "following the controller");
    Ok(Link::new(https, identity))
}

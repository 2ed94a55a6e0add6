//! `cairn`: start and supervise a device (`up`), and read its state as a technician. Nothing here
//! but `up` changes device state: the read-outs only subscribe.

mod readout;
mod record;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use readout::{DEMO_ROOT, DeviceView, Roots};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn: run a device's apps, keep them recoverable, read its state"
)]
struct Cli {
    /// The device root: DIR/run and DIR/persist. Default: CAIRN_RUN_DIR/CAIRN_PERSIST_DIR, else
    /// ./cairn-demo if it exists, else /run/cairn and /persist.
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the four agents and supervise them until Ctrl-C. With no --config (and no
    /// --root), runs a demo device under ./cairn-demo on an embedded example config.
    Up {
        /// A local JSON config file (see agents/cli/src/demo-config.json).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The device, its controller link, the agents' health and the apps.
    Status,
    /// The apps and their states.
    Apps,
    /// Snapshots of every app, or of one (UUID or name).
    Snapshots { app: Option<String> },
    /// The publications on the bus.
    Topics,
    /// Validates a persisted record: schema, version, mandatory fields, checksum.
    Record {
        #[command(subcommand)]
        action: RecordAction,
    },
}

#[derive(Debug, Subcommand)]
enum RecordAction {
    Check { file: PathBuf },
}

const WAIT: Duration = Duration::from_secs(2);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up { config } => {
            let root = cli.root.clone().unwrap_or_else(|| PathBuf::from(DEMO_ROOT));
            // Agents and apps get absolute paths: an app runs in its own working directory.
            std::fs::create_dir_all(&root)?;
            let root = std::path::absolute(&root)?;
            let roots = Roots::under(&root);
            let config = match config {
                Some(config) => config,
                None => {
                    let demo = root.join("config.json");
                    if !demo.exists() {
                        std::fs::write(&demo, up::DEMO_CONFIG)?;
                    }
                    demo
                }
            };
            let bin_dir = std::env::current_exe()?
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            up::up(up::UpOptions {
                roots,
                config,
                bin_dir,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Record {
            action: RecordAction::Check { file },
        } => {
            let verdict = record::check(&file);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
            } else if verdict.ok {
                println!(
                    "{}: OK — {} version {} ({})",
                    verdict.file,
                    verdict.schema.as_deref().unwrap_or("?"),
                    verdict.version.unwrap_or(0),
                    verdict.format.as_deref().unwrap_or("?")
                );
            } else {
                println!("{}: INVALID — {}", verdict.file, verdict.problem);
            }
            Ok(if verdict.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Topics => {
            let roots = Roots::resolve(cli.root.as_deref());
            let topics = readout::topics(&roots);
            if cli.json {
                let list: Vec<_> = topics
                    .iter()
                    .map(|(agent, topic, socket)| {
                        serde_json::json!({"publisher": agent, "topic": topic, "socket": socket})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if topics.is_empty() {
                println!(
                    "no publications under {}: agents not running — start them with `cairn up`",
                    roots.run.display()
                );
            } else {
                println!("{:<16} TOPIC", "PUBLISHER");
                for (agent, topic, _) in topics {
                    println!("{agent:<16} {topic}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status | Command::Apps | Command::Snapshots { .. } => {
            let roots = Roots::resolve(cli.root.as_deref());
            let view = readout::device_view(&roots, WAIT).await;
            let down = view.agents_down();
            if down.len() == readout::AGENTS.len() {
                eprintln!(
                    "cairn: agents not running under {} — start them with `cairn up`{}",
                    roots.run.display(),
                    if cli.root.is_none() {
                        " (or give --root DIR)"
                    } else {
                        ""
                    }
                );
                return Ok(ExitCode::from(3));
            }
            match cli.command {
                Command::Status => print_status(&view, cli.json)?,
                Command::Apps => print_apps(&view, cli.json)?,
                Command::Snapshots { app } => {
                    let rows = readout::snapshot_rows(&view, &roots.persist, app.as_deref());
                    print_snapshots(&rows, cli.json)?;
                }
                _ => {}
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(view: &DeviceView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
        return Ok(());
    }
    println!(
        "device   run {}  persist {}",
        view.run_dir, view.persist_dir
    );
    match &view.device {
        Some(d) => {
            println!(
                "config   {:?}  applied {}  hash {}  apps {}  volumes {}",
                d.config_source,
                d.last_config_time
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "never".into()),
                d.last_config_hash.get(..12).unwrap_or(&d.last_config_hash),
                d.apps,
                d.volumes
            );
            println!(
                "link     controller {}",
                if d.controller_reachable {
                    "reachable"
                } else {
                    "not reachable or not configured"
                }
            );
            if d.last_error.is_error() {
                println!("error    {}", d.last_error.error);
            }
        }
        None => println!("config   unknown (config-agent not answering)"),
    }
    let agents: Vec<String> = view
        .agents
        .iter()
        .map(|a| format!("{} {}", a.agent, a.state))
        .collect();
    println!("agents   {}", agents.join(" · "));
    print_apps(view, false)
}

fn print_apps(view: &DeviceView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&view.apps)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<36} {:<8} {:<9} {:>5} {:>5} {:>5}  ERROR",
        "APP", "UUID", "VERSION", "STATE", "AVAIL", "REQ", "DEL"
    );
    for app in &view.apps {
        let s = &app.snap_status;
        println!(
            "{:<20} {:<36} {:<8} {:<9} {:>5} {:>5} {:>5}  {}",
            app.display_name,
            app.uuid_and_version.uuid,
            app.uuid_and_version.version,
            format!("{:?}", app.state),
            s.available_snapshots.len(),
            s.requested_snapshots.len(),
            s.snapshots_to_be_deleted.len(),
            app.error.error
        );
    }
    Ok(())
}

fn print_snapshots(rows: &[readout::SnapshotRow], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<36} {:<10} {:<16} {:<7} {:<19} {:<19}  ERROR",
        "APP", "SNAPSHOT", "TYPE", "STATE", "CONFIG", "TRIGGERED", "CREATED"
    );
    for r in rows {
        println!(
            "{:<16} {:<36} {:<10} {:<16} {:<7} {:<19} {:<19}  {}",
            r.app_name,
            r.id,
            r.kind,
            r.state,
            r.config_version,
            r.time_triggered.as_deref().unwrap_or("-"),
            r.time_created.as_deref().unwrap_or("-"),
            r.error
        );
    }
    Ok(())
}

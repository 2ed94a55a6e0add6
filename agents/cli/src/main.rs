//! `cairn`: start and supervise a device (`up`), and read its state as a technician. Nothing here
//! but `up` changes device state: the read-outs only subscribe to the agents' publications (a
//! subscriber cannot write into a topic: the bus drops one that sends anything after its hello)
//! and read records on disk; they create, change and remove no file.

mod boot;
mod dbus;
mod export;
mod record;
mod up;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use std::time::Duration;

use cairn_readout::{readout, supervision};
use clap::{Parser, Subcommand};
use readout::{DEMO_ROOT, DeviceView, Roots};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cairn: run a device's apps, keep them recoverable, read its state",
    after_help = "Only `cairn up` changes the device. `cairn export` writes only into its target \
                  directory. Every other command is a read-out: it \
                  subscribes to the agents' publications or reads records, and cannot change \
                  any state. A non-root technician can run them when in the group given to \
                  `cairn up --technicians-gid`.\n\n\
                  Exit status: 0 ok, 1 invalid record (record check), 2 usage or other error, \
                  3 agents not running, 4 not allowed to read the device."
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
    /// Start the agents and supervise them until Ctrl-C (the only command that changes the
    /// device). With no --config and no --controller, follows the controller the device was
    /// set up for, else runs a demo device (under ./cairn-demo unless --root is given) on an
    /// embedded example config.
    Up(UpArgs),
    /// Read-out: the device, its controller link, the agents' health and the apps.
    Status,
    /// Read-out: the apps and their states.
    Apps,
    /// Read-out: snapshots of every app, or of one (UUID or name).
    Snapshots {
        /// Only this app's snapshots (its UUID or display name); every app's when omitted.
        app: Option<String>,
    },
    /// Read-out: live changes on the bus until Ctrl-C, one line per create, modify or delete
    /// (time, publisher, topic, key, summary); with --json one object per line.
    Watch {
        /// Topics to watch (see `cairn topics`); all known topics when none is given.
        topics: Vec<String>,
        /// Also print each topic's current table first, as `create` lines.
        #[arg(long)]
        initial: bool,
    },
    /// Read-out: the publications on the bus.
    Topics,
    /// Export snapshot SNAPSHOT (UUID) of an app to a directory or an object-store remote: zstd
    /// qcow2 per volume and a manifest with sha256s, made by the volume-manager. Writes only
    /// into DIR (a new `<app>-<snapshot>-<time>` directory there) or under the remote's prefix
    /// (the manifest last); changes no volume, snapshot or app. Ctrl-C cancels (the unfinished
    /// export is removed). Exit 0 done, 1 failed, 130 cancelled.
    Export {
        /// The snapshot's UUID, as `cairn snapshots` lists it.
        snapshot: uuid::Uuid,
        /// A directory to export into (a path starting with `/` or `.`, or an existing
        /// directory), else `REMOTE[:PREFIX]`: a remote of the device config, and a key prefix
        /// under the remote's own.
        #[arg(long = "to", value_name = "DIR|REMOTE[:PREFIX]")]
        to: String,
        /// Carry only what changed since the previous export of this app in DIR (falls back to
        /// a full export, saying why, when the change tracking cannot be trusted).
        #[arg(long)]
        incremental: bool,
    },
    /// Re-read an export directory (and the chain it builds on) and check every checksum.
    /// Read-only. Exit 0 when all match, 1 naming the damaged volume and file otherwise.
    Verify {
        /// The export directory (made by `cairn export`).
        dir: PathBuf,
    },
    /// Restore from an export: with --print-config, prints the app config saved in the export
    /// and the volumes to declare (origin `Export`) in the device config. Reads DIR only.
    Import {
        /// The export directory (made by `cairn export`).
        dir: PathBuf,
        /// Print the app config and the volumes to declare (the only mode so far).
        #[arg(long, required = true)]
        print_config: bool,
    },
    /// Prints the D-Bus daemon policy (for /etc/dbus-1/system.d/) of the read-out that
    /// `cairn up --dbus` serves: members of the technicians' group read every gateway, members
    /// of a tenant's group only that tenant's. Changes nothing.
    DbusPolicy {
        #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
        technicians_gid: Option<u32>,
        #[arg(long = "tenant-reader", value_name = "TENANT:GID", value_parser = cairn_pubsub::access::parse_tenant_reader)]
        tenant_readers: Vec<(String, u32)>,
    },
    /// Read-out: validates a persisted record: schema, version, mandatory fields, checksum.
    Record {
        #[command(subcommand)]
        action: RecordAction,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// A local JSON config file (see agents/cli/src/demo-config.json), applied again when it
    /// changes.
    #[arg(long, conflicts_with = "controller")]
    config: Option<PathBuf>,
    /// The controller's URL (EVE API v2); the config-agent onboards and follows it. The
    /// controller flags are kept under <persist>/config/, so a later `cairn up` without any
    /// source follows the same controller.
    #[arg(long)]
    controller: Option<String>,
    /// The onboarding certificate (PEM) that registers the device with the controller.
    #[arg(long, requires_all = ["controller", "onboard_key"])]
    onboard_cert: Option<PathBuf>,
    /// The onboarding certificate's private key (PKCS#8 PEM).
    #[arg(long, requires_all = ["controller", "onboard_cert"])]
    onboard_key: Option<PathBuf>,
    /// The device's serial number, sent at registration.
    #[arg(long, requires = "controller")]
    serial: Option<String>,
    /// The root certificate the controller's certificates must chain to.
    #[arg(long, requires = "controller")]
    root_cert: Option<PathBuf>,
    /// A group whose members (technicians) may read the device and app status with the
    /// read-outs, without being root.
    #[arg(long, env = "CAIRN_TECHNICIANS_GID")]
    technicians_gid: Option<u32>,
    /// TENANT:GID: members of group GID are technicians of TENANT only: they read that
    /// tenant's apps and snapshots and the device status, nothing of other tenants
    /// (repeatable; passed to the config-agent and the app-manager).
    #[arg(long = "tenant-reader", value_name = "TENANT:GID", value_parser = cairn_pubsub::access::parse_tenant_reader)]
    tenant_readers: Vec<(String, u32)>,
    /// Serve the read-only D-Bus read-out on the bus at this address (e.g.
    /// `unix:path=/run/dbus/system_bus_socket`): `org.cairn.Bus`, and
    /// `org.cairn.Tenant.<tenant>` for each --tenant-reader. Install the daemon's policy from
    /// `cairn dbus-policy` first.
    #[arg(long, value_name = "ADDRESS")]
    dbus: Option<String>,
    /// Serve the read-only web status page and JSON API (/api/v1/status, /api/v1/snapshots) on
    /// ADDR, e.g. 127.0.0.1:8080. A non-loopback address needs bearer tokens in
    /// <persist>/config/web-tokens (`device TOKEN` or `tenant:NAME TOKEN` lines, mode 600).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Serve --http over TLS with the device's own certificate and key
    /// (<persist>/config/device.cert.pem, device.key.pem, made when the device onboards).
    #[arg(long, requires = "http")]
    http_tls: bool,
}

#[derive(Debug, Subcommand)]
enum RecordAction {
    /// Check record files: one line each (with --json: one object, an array for several).
    Check {
        /// The record files (e.g. <persist>/snapshots/<id>/snapshotInstanceStatus.json); one
        /// process for all of them, which counts on a device that starts each one slowly.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
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
        Command::Up(args) => {
            // The gateways served in this process (web, D-Bus) log through tracing, beside
            // the agents' lines on stderr.
            cairn_startup::init_logging();
            let root = cli.root.clone().unwrap_or_else(|| PathBuf::from(DEMO_ROOT));
            // Agents and apps get absolute paths: an app runs in its own working directory.
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating the device root {}", root.display()))?;
            let root = std::path::absolute(&root)?;
            let roots = Roots::under(&root);
            let tenant_readers = args.tenant_readers.clone();
            let dbus = args.dbus.clone();
            let http = args.http.map(|addr| (addr, args.http_tls));
            let source = config_source(args, &root)?;
            let bin_dir = std::env::current_exe()?
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            up::up(up::UpOptions {
                roots,
                source: source.0,
                technicians_gid: source.1,
                tenant_readers,
                bin_dir,
                dbus,
                http,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DbusPolicy {
            technicians_gid,
            tenant_readers,
        } => {
            print!("{}", dbus::policy(technicians_gid, &tenant_readers)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { topics, initial } => {
            let topics = watch::select(&topics)?;
            let roots = Roots::resolve(cli.root.as_deref());
            let view = readout::device_view(&roots, WAIT).await;
            // A watch started before the device is there waits for it: its first lines are
            // what a technician came to see. Only a refusal ends it.
            if view.agents.iter().all(|a| a.state == "down") {
                eprintln!(
                    "cairn watch: agents not running under {} yet: waiting for them (start them \
                     with `cairn up`{}); Ctrl-C to stop",
                    roots.run.display(),
                    if cli.root.is_some() {
                        ""
                    } else {
                        " or give --root DIR"
                    }
                );
            } else if let Some(code) = unreadable(&view, &roots, cli.root.is_some()) {
                return Ok(code);
            }
            watch::watch(&roots, &topics, cli.json, initial).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Record {
            action: RecordAction::Check { files },
        } => {
            let verdicts: Vec<_> = files.iter().map(|file| record::check(file)).collect();
            match verdicts.as_slice() {
                [one] if cli.json => println!("{}", serde_json::to_string_pretty(one)?),
                all if cli.json => println!("{}", serde_json::to_string_pretty(all)?),
                all => {
                    for verdict in all {
                        print_verdict(verdict);
                    }
                }
            }
            Ok(if verdicts.iter().all(|v| v.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Export {
            snapshot,
            to,
            incremental,
        } => {
            let roots = Roots::resolve(cli.root.as_deref());
            let (target, remote) = export::parse_target(&to);
            let request = export::JobRequest {
                action: cairn_types::ExportAction::Export,
                snapshot,
                target,
                remote,
                incremental,
            };
            export::run(&roots, request, cli.json).await
        }
        Command::Verify { dir } => {
            let roots = Roots::resolve(cli.root.as_deref());
            let request = export::JobRequest {
                action: cairn_types::ExportAction::Verify,
                snapshot: uuid::Uuid::nil(),
                target: dir,
                remote: None,
                incremental: false,
            };
            export::run(&roots, request, cli.json).await
        }
        Command::Import { dir, .. } => export::print_config(&dir),
        Command::Topics => {
            let roots = Roots::resolve(cli.root.as_deref());
            let run = roots.clone();
            let topics = tokio::task::spawn_blocking(move || readout::topics(&run)).await?;
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
        Command::Snapshots { app } => {
            let roots = Roots::resolve(cli.root.as_deref());
            // The snapshot records are checked on the blocking pool while the bus is read.
            let persist = roots.persist.clone();
            let records =
                tokio::task::spawn_blocking(move || readout::unloadable_records(&persist));
            let apps = match readout::app_statuses(&roots, WAIT).await {
                Some(apps) => apps,
                // No app-manager to read: the whole device says why, or that the others run
                // (the records on disk are still listed then).
                None => {
                    let view = readout::device_view(&roots, WAIT).await;
                    if let Some(code) = unreadable(&view, &roots, cli.root.is_some()) {
                        return Ok(code);
                    }
                    view.apps
                }
            };
            let rows = readout::rows_from(&apps, records.await?, app.as_deref());
            print_snapshots(&rows, cli.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status | Command::Apps => {
            let roots = Roots::resolve(cli.root.as_deref());
            let view = readout::device_view(&roots, WAIT).await;
            if let Some(code) = unreadable(&view, &roots, cli.root.is_some()) {
                return Ok(code);
            }
            if matches!(cli.command, Command::Status) {
                print_status(&view, cli.json)?;
            } else {
                print_apps(&view, cli.json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The config-agent's arguments for the config source, checked, and the technicians' group.
fn config_source(args: UpArgs, root: &Path) -> anyhow::Result<(Vec<String>, Option<u32>)> {
    let existing = |what: &str, path: &Path| -> anyhow::Result<String> {
        anyhow::ensure!(
            path.is_file(),
            "{what} {} not found: give the path of an existing file",
            path.display()
        );
        Ok(std::path::absolute(path)?.display().to_string())
    };
    let mut source = Vec::new();
    match (args.config, args.controller) {
        (Some(config), _) => {
            source.push("--config".to_string());
            source.push(existing("config file", &config)?);
        }
        (None, Some(url)) => {
            source.push("--controller".to_string());
            source.push(url);
            if let Some(cert) = args.onboard_cert {
                source.push("--onboard-cert".to_string());
                source.push(existing("onboarding certificate", &cert)?);
            }
            if let Some(key) = args.onboard_key {
                source.push("--onboard-key".to_string());
                source.push(existing("onboarding key", &key)?);
            }
            if let Some(serial) = args.serial {
                source.push("--serial".to_string());
                source.push(serial);
            }
            if let Some(root_cert) = args.root_cert {
                source.push("--root-cert".to_string());
                source.push(existing("root certificate", &root_cert)?);
            }
        }
        // A device set up for a controller earlier follows it again.
        (None, None) if root.join("persist/config/server").is_file() => {}
        (None, None) => {
            let demo = root.join("config.json");
            if !demo.exists() {
                std::fs::write(&demo, up::DEMO_CONFIG)
                    .with_context(|| format!("writing the demo config {}", demo.display()))?;
            }
            source.push("--config".to_string());
            source.push(demo.display().to_string());
        }
    }
    Ok((source, args.technicians_gid))
}

/// The exit code and message when the device cannot be read: no agent answers (3), or this
/// user may read none of them (4).
fn unreadable(view: &DeviceView, roots: &Roots, root_given: bool) -> Option<ExitCode> {
    // An orphan's publications are still the device's state: readable.
    if view.agents.iter().any(|a| a.state.starts_with("up")) {
        return None;
    }
    let refused: Vec<&readout::AgentHealth> = view
        .agents
        .iter()
        .filter(|a| a.state.starts_with("refused"))
        .collect();
    if let Some(first) = refused.first() {
        eprintln!(
            "cairn: not allowed to read the device under {}: {} {}",
            roots.run.display(),
            first.agent,
            first.state
        );
        return Some(ExitCode::from(4));
    }
    eprintln!(
        "cairn: agents not running under {} — start them with `cairn up`{}",
        roots.run.display(),
        if root_given {
            ""
        } else {
            " (or give --root DIR)"
        }
    );
    Some(ExitCode::from(3))
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
    if let Some(fault) = &view.persist_fault {
        println!("persist  {fault}");
    }
    match &view.device {
        Some(d) => {
            let or_none = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            println!(
                "identity name {}  serial {}  machine serial {}  host {}  uuid {}",
                or_none(&d.device_name),
                or_none(&d.serial),
                or_none(&d.product_serial),
                or_none(&d.host_name),
                if d.device_uuid.is_empty() {
                    "not onboarded".to_string()
                } else {
                    d.device_uuid.clone()
                }
            );
            println!(
                "config   {}  applied {}  hash {}  apps {}  volumes {}",
                readout::config_source_text(&d.config_source),
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
            if let Some(counter) = d.shutdown_cmd {
                println!(
                    "shutdown the controller's shutdown command {counter} stopped every app until the next boot"
                );
            }
        }
        None => println!("config   unknown (config-agent not answering)"),
    }
    // Every error with its time and what to do: the device's own and each app's.
    for p in &view.problems {
        let at = p
            .time
            .map(|t| format!(" at {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default();
        println!("error    {}{at}: {}", p.object, p.error);
        println!("  to do  {}", p.what_to_do);
    }
    let agents: Vec<String> = view
        .agents
        .iter()
        .map(|a| {
            // A refusal's reason follows on its own line; an orphan's state is shown whole.
            let state = if a.state.starts_with("refused") {
                "refused"
            } else {
                &a.state
            };
            format!("{} {state}", a.agent)
        })
        .collect();
    println!("agents   {}", agents.join(" · "));
    // The root slots (EVE's IMGA/IMGB), and why the last update failed if it did.
    if let Some(b) = &view.baseos {
        let slots: Vec<String> = b
            .slots
            .iter()
            .map(|s| {
                let version = if s.version.is_empty() {
                    "-"
                } else {
                    &s.version
                };
                let running = if s.activated { " (running)" } else { "" };
                format!(
                    "{} {} {version}{running}",
                    s.partition_label, s.partition_state
                )
            })
            .collect();
        let mode = if b.boot_mode.is_empty() {
            String::new()
        } else {
            format!("  boot {}", b.boot_mode)
        };
        println!("slots    {}{mode}", slots.join(" · "));
        if let Some(u) = &b.last_update {
            println!(
                "update   {} to {} {}{}",
                u.version,
                u.partition_label,
                u.result,
                if u.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", u.reason)
                }
            );
        }
        // The update the config asks for (EVE's `baseos`), as far as it got.
        if let Some(u) = &b.update {
            let slot = if u.partition_label.is_empty() {
                String::new()
            } else {
                format!(" slot {}", u.partition_label)
            };
            let activate = if u.activate { "" } else { " (not activated)" };
            let detail = if u.error.is_error() {
                format!(": {}", u.error.error)
            } else if u.step.is_empty() {
                String::new()
            } else {
                format!(": {}", u.step)
            };
            println!(
                "baseos   {}{activate} {:?} {}%{slot}{detail}",
                u.base_os_version, u.state, u.progress
            );
        }
    }
    for a in view
        .agents
        .iter()
        .filter(|a| a.state.starts_with("refused"))
    {
        println!("         {} {}", a.agent, a.state);
    }
    // Each volume with the backend that snapshots it and why that one (a technician's first
    // question when a snapshot is slow or refused).
    for v in &view.volumes {
        let backend = if v.backend_reason.is_empty() {
            format!("{:?}", v.backend)
        } else {
            v.backend_reason.clone()
        };
        println!(
            "volume   {} {} {:?}  backend {backend}",
            v.display_name,
            v.key(),
            v.state
        );
        if v.error.is_error() {
            println!("         error: {}", v.error.error);
        }
    }
    // Content trees: how far each download got, or why it fails.
    for t in &view.content_trees {
        let size = if t.total_size > 0 {
            format!("{}/{} bytes {}%", t.current_size, t.total_size, t.progress)
        } else {
            format!("{} bytes", t.current_size)
        };
        println!(
            "content  {} {} {:?}  {size}",
            if t.display_name.is_empty() {
                &t.relative_url
            } else {
                &t.display_name
            },
            t.content_id,
            t.state
        );
        if t.error.is_error() {
            println!(
                "         error: {} ({})",
                t.error.error, t.error.error_retry_condition
            );
        }
    }
    // A volume that left the config is kept for its grace before it is deleted.
    for v in &view.volumes {
        if let Some(p) = &v.pending_deletion {
            println!(
                "volume   {} {} pending deletion at {}: {}",
                v.display_name,
                v.key(),
                p.delete_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_else(|| "(unknown)".into()),
                p.reason
            );
        }
    }
    print_apps(view, false)
}

fn print_apps(view: &DeviceView, json: bool) -> anyhow::Result<()> {
    if json {
        let apps = cairn_readout::readout::named::Apps(&view.apps);
        println!("{}", serde_json::to_string_pretty(&apps)?);
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
            app.state.name(),
            s.available_snapshots.len(),
            s.requested_snapshots.len(),
            s.snapshots_to_be_deleted.len(),
            app.error.error
        );
        // E.g. a quiesce hook that failed after its snapshot was taken.
        for warning in &app.warnings {
            println!("  warning: {warning}");
        }
    }
    Ok(())
}

fn print_snapshots(rows: &[readout::SnapshotRow], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<36} {:<10} {:<16} {:<7} {:<19} {:<19} {:<8} {:>8}  ERROR",
        "APP", "SNAPSHOT", "TYPE", "STATE", "CONFIG", "TRIGGERED", "CREATED", "MODE", "PAUSE"
    );
    for r in rows {
        // The pause of a live or stateful snapshot.
        let pause = if r.pause_ms > 0 {
            format!("{} ms", r.pause_ms)
        } else {
            "-".to_string()
        };
        println!(
            "{:<16} {:<36} {:<10} {:<16} {:<7} {:<19} {:<19} {:<8} {:>8}  {}",
            r.app_name,
            r.id,
            r.kind,
            r.state,
            r.config_version,
            r.time_triggered.as_deref().unwrap_or("-"),
            r.time_created.as_deref().unwrap_or("-"),
            r.mode,
            pause,
            r.error
        );
    }
    Ok(())
}

/// One line per record: what it is when it is usable, else its schema and stored version (when
/// known) and the fault, so that a newer build's record is refused by name.
fn print_verdict(verdict: &record::RecordCheck) {
    match (verdict.ok, &verdict.schema, verdict.version) {
        (true, schema, version) => println!(
            "{}: OK — {} version {} ({})",
            verdict.file,
            schema.as_deref().unwrap_or("?"),
            version.unwrap_or(0),
            verdict.format.as_deref().unwrap_or("?")
        ),
        (false, Some(schema), Some(version)) => println!(
            "{}: INVALID — {schema} version {version}: {}",
            verdict.file, verdict.problem
        ),
        (false, _, _) => println!("{}: INVALID — {}", verdict.file, verdict.problem),
    }
}

//! `cairn up`: starts the four agents as separate processes and keeps them running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::readout::{AGENTS, Roots};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An agent that ran this long before dying is restarted at once again.
const STABLE: Duration = Duration::from_secs(30);
/// Long enough for the domain-manager to power down its VMs (30 s stop timeout + quit + kill).
const STOP_GRACE: Duration = Duration::from_secs(45);

/// The demo device's config, used when `up` is given none.
pub const DEMO_CONFIG: &str = include_str!("demo-config.json");

pub struct UpOptions {
    pub roots: Roots,
    /// The config-agent's config source: `--config FILE`, or `--controller URL` with the
    /// onboarding flags, passed through as given.
    pub source: Vec<String>,
    /// Members of this group may read the status topics (config-agent, app-manager).
    pub technicians_gid: Option<u32>,
    /// `(tenant, gid)`: members of gid read that tenant's apps and the device status only
    /// (config-agent, app-manager).
    pub tenant_readers: Vec<(String, u32)>,
    /// Where the agent binaries are (next to `cairn`).
    pub bin_dir: PathBuf,
    /// The D-Bus bus to serve the read-out on (`--dbus`).
    pub dbus: Option<String>,
}

/// The agent binary's path, or what to do when it is missing.
pub fn agent_binary(bin_dir: &Path, agent: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir.join(format!("cairn-{agent}"));
    anyhow::ensure!(
        path.is_file(),
        "agent binary {} not found next to cairn: build all binaries with \
         `cargo build --workspace --bins` (or --release) and run cairn from the same target directory",
        path.display()
    );
    Ok(path)
}

pub async fn up(options: UpOptions) -> anyhow::Result<()> {
    let binaries: Vec<(String, PathBuf)> = AGENTS
        .iter()
        .map(|agent| Ok((agent.to_string(), agent_binary(&options.bin_dir, agent)?)))
        .collect::<anyhow::Result<_>>()?;
    let logs = options.roots.run.join("logs");
    tokio::fs::create_dir_all(&logs)
        .await
        .with_context(|| format!("creating {}", logs.display()))?;
    tokio::fs::create_dir_all(&options.roots.persist)
        .await
        .with_context(|| format!("creating {}", options.roots.persist.display()))?;
    eprintln!(
        "cairn up: run {} persist {} config source {} (logs in {})",
        options.roots.run.display(),
        options.roots.persist.display(),
        if options.source.is_empty() {
            "the controller in <persist>/config/".to_string()
        } else {
            options.source.join(" ")
        },
        logs.display()
    );

    let (stop, stopping) = watch::channel(false);
    let mut supervisors = Vec::new();
    for (agent, binary) in binaries {
        let mut args = Vec::new();
        if agent == "config-agent" {
            args.extend(options.source.iter().cloned());
        }
        if let Some(gid) = options.technicians_gid {
            // Every agent publishes a status a technician reads.
            args.push("--technicians-gid".to_string());
            args.push(gid.to_string());
        }
        if agent == "config-agent" || agent == "app-manager" {
            // The two that publish what a tenant technician reads (device and app status).
            for (tenant, gid) in &options.tenant_readers {
                args.push("--tenant-reader".to_string());
                args.push(format!("{tenant}:{gid}"));
            }
        }
        if agent == "domain-manager" {
            // Stopping the device stops its apps.
            args.push("--stop-domains-on-exit".to_string());
        }
        supervisors.push(tokio::spawn(supervise(
            agent,
            binary,
            args,
            options.roots.clone(),
            logs.clone(),
            stopping.clone(),
        )));
    }

    if let Some(address) = options.dbus.clone() {
        // One gateway per tenant, however many groups read it.
        let tenants: std::collections::BTreeSet<String> = options
            .tenant_readers
            .iter()
            .map(|(t, _)| t.clone())
            .collect();
        let tenants = tenants.into_iter().collect();
        supervisors.push(tokio::spawn(crate::dbus::serve(
            address,
            options.roots.clone(),
            tenants,
            stopping.clone(),
        )));
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("cairn up: stopping the agents");
    let _ = stop.send(true);
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    eprintln!("cairn up: stopped");
    Ok(())
}

/// Runs one agent, restarting it with backoff when it dies, until told to stop.
async fn supervise(
    agent: String,
    binary: PathBuf,
    args: Vec<String>,
    roots: Roots,
    logs: PathBuf,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let mut child = match start(&agent, &binary, &args, &roots, &logs) {
            Ok(child) => child,
            Err(e) => {
                eprintln!("[{agent}] cannot start: {e:#}");
                if wait_or_stop(&mut stopping, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stopping.wait_for(|stop| *stop) => None,
        };
        let Some(status) = exited else {
            stop(&agent, &mut child).await;
            return;
        };
        let how = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown exit ({e})"),
        };
        if started.elapsed() > STABLE {
            backoff = FIRST_BACKOFF;
        }
        eprintln!("[{agent}] exited ({how}); restarting in {backoff:?}");
        if wait_or_stop(&mut stopping, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sleeps `delay`; true if a stop was asked meanwhile.
async fn wait_or_stop(stopping: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stopping.wait_for(|stop| *stop) => true,
    };
    stopped || *stopping.borrow()
}

fn start(
    agent: &str,
    binary: &Path,
    args: &[String],
    roots: &Roots,
    logs: &Path,
) -> anyhow::Result<Child> {
    let mut child = Command::new(binary)
        .args(args)
        .env("CAIRN_RUN_DIR", &roots.run)
        .env("CAIRN_PERSIST_DIR", &roots.persist)
        // Their output is piped into logs: no terminal colors.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;
    let log = logs.join(format!("{agent}.log"));
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        tokio::spawn(forward(agent.to_string(), stream, log.clone()));
    }
    Ok(child)
}

/// Each line of an agent's output goes to stderr with the agent's name, and to its log file.
async fn forward(
    agent: String,
    stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    log: PathBuf,
) {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
        .ok();
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{agent}] {line}");
        if let Some(file) = file.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

async fn stop(agent: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => eprintln!("[{agent}] stopped"),
        Err(_) => {
            eprintln!("[{agent}] did not stop within {STOP_GRACE:?}; killing it");
            let _ = child.kill().await;
        }
    }
}

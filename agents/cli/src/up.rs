//! `cairn up`: starts the agents as separate processes and keeps them running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::readout::{AGENTS, Roots};
use crate::supervision::{self, ProcessId, UpLock};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An agent that ran this long before dying was healthy: it is restarted after FIRST_BACKOFF,
/// whatever happened before. Shorter runs are a crash loop and double the delay.
const STABLE: Duration = Duration::from_secs(10);
/// An agent SIGKILLed from outside after running this long is restarted after FIRST_BACKOFF.
const KILLED_AFTER_START: Duration = Duration::from_secs(1);
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
    /// The address to serve the web read-out on (`--http`), and whether over TLS.
    pub http: Option<(std::net::SocketAddr, bool)>,
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
    // One supervisor per device: a second one would start a second set of agents.
    let lock = UpLock::take(&options.roots.run)?;
    // Agents of a supervisor that died without stopping them hold the topics: they go first.
    stop_orphans(&options.roots.run).await;
    tokio::fs::create_dir_all(&options.roots.persist)
        .await
        .with_context(|| format!("creating {}", options.roots.persist.display()))?;
    // Before the config-agent starts: it reports this judgement in ZInfoDevice.
    let persist = options.roots.persist.clone();
    let boot = tokio::task::spawn_blocking(move || {
        crate::boot::record_start(&persist, chrono::Utc::now())
    })
    .await
    .context("judging the last reboot reason")?;
    eprintln!(
        "cairn up: start {} on this persist: {:?}, {}",
        boot.restart_counter + 1,
        boot.boot_reason,
        boot.reason
    );
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

    if let Some((addr, tls)) = options.http {
        let roots = options.roots.clone();
        let stopping = stopping.clone();
        supervisors.push(tokio::spawn(async move {
            let served = if tls {
                eprintln!("cairn up: web read-out on https://{addr}/");
                cairn_web::serve_tls(addr, roots, stopping).await
            } else {
                eprintln!("cairn up: web read-out on http://{addr}/");
                cairn_web::serve(addr, roots, stopping).await
            };
            if let Err(e) = served {
                // The agents run on without the page: the device does not depend on it.
                eprintln!("cairn up: {e}");
            }
        }));
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    eprintln!("cairn up: stopping the agents");
    let _ = stop.send(true);
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    // Only once the agents are down: a kill before this line is a stop nobody explained.
    let persist = options.roots.persist.clone();
    let reason = crate::boot::clean_stop(signal, boot.started, chrono::Utc::now());
    match tokio::task::spawn_blocking(move || crate::boot::record_stop(&persist, &reason)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("cairn up: the stop reason is not recorded: {e:#}"),
        Err(e) => eprintln!("cairn up: the stop reason is not recorded: {e}"),
    }
    lock.release();
    eprintln!("cairn up: stopped");
    Ok(())
}

/// Stops the agents no living supervisor started (an earlier `cairn up` killed in a way their
/// parent-death signal did not cover), saying which and why.
async fn stop_orphans(run: &Path) {
    let dir = run.to_path_buf();
    let orphans = tokio::task::spawn_blocking(move || supervision::orphans(&dir, &AGENTS))
        .await
        .unwrap_or_default();
    if orphans.is_empty() {
        return;
    }
    for orphan in &orphans {
        eprintln!(
            "cairn up: stopping orphan {} pid {} ({}), left by a cairn up that is gone",
            orphan.agent, orphan.process.pid, orphan.found_by
        );
    }
    supervision::stop_orphans(&orphans, STOP_GRACE).await;
    eprintln!("cairn up: {} orphan agent(s) stopped", orphans.len());
}

/// The delay before restarting an agent that ran for `ran_for` and died, given the delay used
/// before its previous restart (zero at first): a healthy run restarts quickly, a crash loop
/// doubles the delay up to MAX_BACKOFF. An agent SIGKILLed from outside (an operator, the OOM
/// killer) after it got going did not fail by itself: it restarts quickly too, so repeated
/// kills never stretch the time to converge.
pub fn restart_delay(previous: Duration, ran_for: Duration, sigkilled: bool) -> Duration {
    if ran_for >= STABLE || (sigkilled && ran_for >= KILLED_AFTER_START) {
        FIRST_BACKOFF
    } else {
        (previous * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF)
    }
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
    let mut backoff = Duration::ZERO;
    loop {
        let started = Instant::now();
        let held = Arc::new(Mutex::new(None));
        let (mut child, forwards) = match start(&agent, &binary, &args, &roots, &logs, &held) {
            Ok(started) => started,
            Err(e) => {
                backoff = restart_delay(backoff, Duration::ZERO, false);
                eprintln!("[{agent}] cannot start: {e:#}; retrying in {backoff:?}");
                if wait_or_stop(&mut stopping, backoff).await {
                    return;
                }
                continue;
            }
        };
        record_pid(&agent, &roots, &child).await;
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stopping.wait_for(|stop| *stop) => None,
        };
        let Some(status) = exited else {
            stop(&agent, &mut child).await;
            return;
        };
        let ran_for = started.elapsed();
        let sigkilled = status.as_ref().is_ok_and(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal() == Some(Signal::SIGKILL as i32)
        });
        let how = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown exit ({e})"),
        };
        // Its last words may name a process holding its topic; they are read to the end first
        // (bounded: a grandchild may keep the pipe open).
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for forward in forwards {
                let _ = forward.await;
            }
        })
        .await;
        let holder = held.lock().ok().and_then(|mut h| h.take());
        if let Some(holder) = holder {
            // Not a crash of the agent: a stranger holds its topic. Stop it and start again.
            eprintln!(
                "[{agent}] cannot start: its topic is held by pid {holder}, which this cairn up \
                 did not start; stopping it"
            );
            let (dir, name) = (roots.run.clone(), agent.clone());
            let orphans =
                tokio::task::spawn_blocking(move || supervision::orphans(&dir, &[name.as_str()]))
                    .await
                    .unwrap_or_default();
            supervision::stop_orphans(&orphans, STOP_GRACE).await;
            if wait_or_stop(&mut stopping, FIRST_BACKOFF).await {
                return;
            }
            continue;
        }
        backoff = restart_delay(backoff, ran_for, sigkilled);
        let why = if ran_for >= STABLE {
            "healthy run: quick restart"
        } else if sigkilled && ran_for >= KILLED_AFTER_START {
            "killed from outside: quick restart"
        } else {
            "crash loop: backing off"
        };
        eprintln!(
            "[{agent}] exited ({how}) after {:.1} s; restarting in {backoff:?} ({why})",
            ran_for.as_secs_f64()
        );
        if wait_or_stop(&mut stopping, backoff).await {
            return;
        }
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

/// Records the agent's pid, found again by the next `cairn up` should this one die without its
/// agents. A write and a rename: off the runtime the web gateway shares.
async fn record_pid(agent: &str, roots: &Roots, child: &Child) {
    let Some(process) = child.id().and_then(|pid| ProcessId::of(pid as i32)) else {
        return;
    };
    let record = supervision::agent_record_path(&roots.run, agent);
    let recorded = tokio::task::spawn_blocking(move || process.record(&record))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("its writer ended: {e}")));
    if let Err(e) = recorded {
        eprintln!("[{agent}] pid {} not recorded: {e:#}", process.pid);
    }
}

/// Where an agent's output names the process holding its topic (`BusError::AlreadyPublished`).
type Holder = Arc<Mutex<Option<i32>>>;

/// Starts the agent and records its pid; its output is forwarded by the returned tasks.
// pre_exec is the only way to set the parent-death signal in the child: std has no safe one.
#[allow(unsafe_code)]
fn start(
    agent: &str,
    binary: &Path,
    args: &[String],
    roots: &Roots,
    logs: &Path,
    held: &Holder,
) -> anyhow::Result<(Child, Vec<JoinHandle<()>>)> {
    // The parent-death signal is sent when the *thread* that forked ends, not the process: only
    // the main thread lives exactly as long as `cairn up` (main runs a current-thread runtime).
    let supervisor = nix::unistd::getpid();
    anyhow::ensure!(
        nix::unistd::gettid() == supervisor,
        "agents must be started from the main thread (the runtime is current-thread)"
    );
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("CAIRN_RUN_DIR", &roots.run)
        .env("CAIRN_PERSIST_DIR", &roots.persist)
        // Their output is piped into logs: no terminal colors.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // An agent's error is one cause chain, not a backtrace per restart (panics keep theirs).
        command.env("RUST_LIB_BACKTRACE", "0");
    }
    // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid), no allocation.
    unsafe {
        command.pre_exec(move || {
            // SIGKILL, not SIGTERM: the agent's stderr is a pipe to the dead supervisor, so a
            // graceful stop fails at its first log line (tracing's fallback eprintln panics on
            // EPIPE). A SIGKILL is a crash every agent survives; apps run on, re-adopted later.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The supervisor may have died before the line above: then nobody will signal.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;
    let log = logs.join(format!("{agent}.log"));
    let mut forwards = Vec::new();
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
        forwards.push(tokio::spawn(forward(
            agent.to_string(),
            stream,
            log.clone(),
            held.clone(),
        )));
    }
    Ok((child, forwards))
}

/// Each line of an agent's output goes to stderr with the agent's name, and to its log file.
async fn forward(
    agent: String,
    stream: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    log: PathBuf,
    held: Holder,
) {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
        .ok();
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(pid) = topic_holder(&line)
            && let Ok(mut held) = held.lock()
        {
            *held = Some(pid);
        }
        eprintln!("[{agent}] {line}");
        if let Some(file) = file.as_mut() {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

/// The pid in the bus's "topic … is already published by pid N" error line.
fn topic_holder(line: &str) -> Option<i32> {
    let (_, after) = line.split_once("already published by pid ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_death_after_a_healthy_run_restarts_quickly_and_a_crash_loop_backs_off() {
        // A crash loop: each quick exit doubles the delay, up to the cap.
        let mut delay = Duration::ZERO;
        let mut delays = Vec::new();
        for _ in 0..9 {
            delay = restart_delay(delay, Duration::from_millis(200), false);
            delays.push(delay.as_millis());
        }
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        // Then a healthy run and a single death: back to a quick restart, whatever came before.
        assert_eq!(restart_delay(delay, STABLE, false), FIRST_BACKOFF);
        // Killed every 12 s (a torture run): every death follows a healthy run.
        let mut delay = Duration::ZERO;
        for _ in 0..10 {
            delay = restart_delay(delay, Duration::from_secs(12), false);
            assert_eq!(delay, FIRST_BACKOFF);
        }
        // SIGKILLed from outside every 2 s: not a crash loop either.
        let mut delay = Duration::ZERO;
        for _ in 0..10 {
            delay = restart_delay(delay, Duration::from_secs(2), true);
            assert_eq!(delay, FIRST_BACKOFF);
        }
        // But SIGKILLed at once after each start is a loop like any other.
        let delay = restart_delay(FIRST_BACKOFF, Duration::from_millis(100), true);
        assert_eq!(delay, FIRST_BACKOFF * 2);
    }

    #[test]
    fn the_holder_of_a_topic_is_read_from_the_bus_error() {
        let line = "Error: publishing VolumeStatus\n";
        assert_eq!(topic_holder(line), None);
        let line = "    topic volume-manager/VolumeStatus is already published by pid 4242: \
                    one publisher per topic";
        assert_eq!(topic_holder(line), Some(4242));
    }
}

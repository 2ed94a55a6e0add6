//! One app's domain: a task that owns its qemu or process, carries out the config it is given,
//! notices when the domain dies on its own, and publishes `DomainStatus` at every change.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_pubsub::Publication;
use cairn_types::domain::{
    DomainLiveOp, DomainLiveOpConfig, DomainLiveOpState, DomainLiveOpStatus,
};
use cairn_types::{
    DomainConfig, DomainState, DomainStatus, ErrorDescription, ErrorEntityType, ErrorSeverity,
    VolumeStatus,
};
use chrono::Utc;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::launch::{AppDir, Launch, plan};
use crate::procfs::{self, ProcessId};
use crate::qmp::{Qmp, QmpError};

/// How often a VM being stopped gets its power button pressed again.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(2);

/// Limits of every wait the domain-manager makes.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// ACPI powerdown (VM) or SIGTERM (process) until the domain must be gone.
    pub stop: Duration,
    /// QMP `quit` until qemu must be gone.
    pub quit: Duration,
    /// SIGKILL until the process must be gone.
    pub kill: Duration,
    /// One QMP command.
    pub qmp: Duration,
    /// qemu started until QMP answers.
    pub boot: Duration,
    /// A snapshot job.
    pub job: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stop: Duration::from_secs(30),
            quit: Duration::from_secs(5),
            kill: Duration::from_secs(5),
            qmp: Duration::from_secs(5),
            boot: Duration::from_secs(30),
            job: Duration::from_secs(300),
        }
    }
}

/// What all domain tasks share.
pub struct Shared {
    pub run_dir: PathBuf,
    pub qemu: PathBuf,
    pub accel: String,
    pub timeouts: Timeouts,
    pub statuses: Publication<DomainStatus>,
    pub live_ops: Publication<DomainLiveOpStatus>,
    /// Latest `VolumeStatus` per key, from the volume-manager.
    pub volumes: Mutex<std::collections::HashMap<String, VolumeStatus>>,
    /// `/proc` walks shared by the tasks that look for their app's processes at one moment.
    pub census: procfs::Census,
}

/// Requests to a domain task.
#[derive(Debug)]
pub enum Command {
    Config(Box<DomainConfig>),
    /// The config is gone: stop the domain, unpublish its status, end the task.
    Delete,
    LiveOp(DomainLiveOpConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vm,
    Process,
}

/// A domain found running that this task did not start: left by a previous domain-manager, or
/// found before a start (never a second copy beside it).
struct Found {
    id: ProcessId,
    kind: Kind,
    /// From its marker; `None` for a process started before markers existed.
    restart_counter: Option<u32>,
    /// `None` when it can be driven; otherwise why it cannot (a qemu that answers no QMP and
    /// survived SIGKILL): kept tracked, Broken, so that nothing starts beside it.
    fault: Option<String>,
}

/// A live domain: its process and how its end is reported.
struct Running {
    id: ProcessId,
    kind: Kind,
    /// Resolves with a description of how it ended (`exit status 0`, ...).
    exit: oneshot::Receiver<String>,
    /// `(version, restart counter)` it was started for.
    generation: (String, u32),
}

pub struct Domain {
    app: Uuid,
    dir: AppDir,
    shared: Arc<Shared>,
    config: Option<DomainConfig>,
    status: DomainStatus,
    running: Option<Running>,
    /// The generation that broke: not started again until the config changes it.
    broken_generation: Option<(String, u32)>,
}

fn generation(c: &DomainConfig) -> (String, u32) {
    (c.uuid_and_version.version.clone(), c.restart_counter)
}

fn error_now(text: impl Into<String>, app: Uuid) -> ErrorDescription {
    ErrorDescription::new(text, ErrorSeverity::Error, Utc::now())
        .about(ErrorEntityType::AppInstance, app)
}

impl Domain {
    /// A domain task for `app`, re-adopting what a previous domain-manager left running.
    pub async fn start(
        app: Uuid,
        shared: Arc<Shared>,
        previous: Option<DomainStatus>,
    ) -> mpsc::Sender<Command> {
        let (tx, rx) = mpsc::channel(16);
        let dir = AppDir::new(&shared.run_dir, app);
        let mut status = previous.unwrap_or_default();
        status.uuid_and_version.uuid = app;
        let mut domain = Domain {
            app,
            dir,
            shared,
            config: None,
            status,
            running: None,
            broken_generation: None,
        };
        domain.adopt().await;
        tokio::spawn(domain.run(rx));
        tx
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let command = match &mut self.running {
                Some(running) => tokio::select! {
                    command = rx.recv() => command,
                    exit = &mut running.exit => {
                        let how = exit.unwrap_or_else(|_| "exit status unknown".into());
                        self.ended_on_its_own(how).await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match command {
                None => break,
                Some(Command::Config(config)) => {
                    self.config = Some(*config);
                    self.reconcile().await;
                }
                Some(Command::LiveOp(op)) => self.live_op(op).await,
                Some(Command::Delete) => {
                    self.stop().await;
                    if self.running.is_some() {
                        // Its directory is how the next domain-manager finds it: keep it.
                        tracing::error!(app = %self.app, "domain deleted while its process survives SIGKILL");
                        self.publish().await;
                        break;
                    }
                    if let Err(e) = self.shared.statuses.unpublish(&self.app.to_string()).await {
                        tracing::warn!(app = %self.app, error = %e, "could not unpublish DomainStatus");
                    }
                    let _ = tokio::fs::remove_dir_all(&self.dir.0).await;
                    tracing::info!(app = %self.app, "domain deleted");
                    break;
                }
            }
        }
    }

    async fn publish(&self) {
        if let Err(e) = self.shared.statuses.publish(self.status.clone()).await {
            tracing::error!(app = %self.app, error = %e, "could not publish DomainStatus");
        }
    }

    fn set_state(&mut self, state: DomainState) {
        if self.status.state != state {
            tracing::info!(app = %self.app, from = ?self.status.state, to = ?state, "domain state");
        }
        self.status.state = state;
    }

    /// Carries out the current config: start, stop, or restart on a new restart counter.
    async fn reconcile(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        self.status.uuid_and_version = config.uuid_and_version.clone();
        self.status.display_name = config.display_name.clone();
        self.status.restart_counter = config.restart_counter;
        self.status.purge_counter = config.purge_counter;
        let wanted = generation(&config);
        if config.activate {
            if let Some(running) = &self.running
                && running.generation.1 != wanted.1
            {
                tracing::info!(app = %self.app, "restart counter changed: restarting");
                self.stop().await;
            }
            if self.running.is_none() && self.broken_generation.as_ref() != Some(&wanted) {
                self.launch(&config).await;
            } else if let Some(running) = &mut self.running {
                // Adopted domains learn their generation from the first config.
                running.generation = wanted;
            }
        } else {
            self.broken_generation = None;
            if self.running.is_some() {
                self.stop().await;
            } else if self.status.state != DomainState::Halted {
                self.set_state(DomainState::Halted);
            }
        }
        self.publish().await;
    }

    fn fail_start(&mut self, config: &DomainConfig, text: String) {
        tracing::warn!(app = %self.app, error = %text, "domain not started");
        self.set_state(DomainState::Broken);
        self.status.activated = false;
        self.status.pid = None;
        self.status.error = error_now(text, self.app);
        self.broken_generation = Some(generation(config));
    }

    async fn launch(&mut self, config: &DomainConfig) {
        let plan = {
            let volumes = self
                .shared
                .volumes
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default();
            plan(config, &volumes, &self.dir, &self.shared.accel)
        };
        let launch = match plan {
            Ok(launch) => launch,
            Err(e) => {
                return self.fail_start(config, format!("domain {}: {e}", self.app));
            }
        };
        if let Err(e) = tokio::fs::create_dir_all(&self.dir.0).await {
            return self.fail_start(
                config,
                format!("cannot create {}: {e}", self.dir.0.display()),
            );
        }
        // The one place that starts a domain checks first that none of this app runs: whatever
        // lost track of it, a second copy never writes to the same volumes.
        if let Some(found) = self.find_live().await {
            tracing::error!(app = %self.app, pid = found.id.pid, kind = ?found.kind, "a domain of this app is running untracked: adopting it instead of starting a second");
            self.track(found, generation(config));
            return;
        }
        let spawned = match &launch {
            Launch::Vm {
                args,
                clear_bitmaps,
            } => match crate::launch::clear_export_bitmaps(clear_bitmaps).await {
                Ok(()) => self.spawn_vm(args, config.restart_counter).await,
                Err(e) => Err(e),
            },
            Launch::Process {
                spec,
                disks,
                working_dir,
            } => {
                self.spawn_process(spec, disks, working_dir.as_deref(), config.restart_counter)
                    .await
            }
            Launch::Container { spec, disks } => self.spawn_container(config, spec, disks).await,
        };
        let (id, kind, exit) = match spawned {
            Ok(s) => s,
            Err(text) => return self.fail_start(config, text),
        };
        self.status.pid = Some(id.pid);
        self.status.boot_time = Some(Utc::now());
        self.status.exit_status.clear();
        self.status.error = ErrorDescription::default();
        self.status.paused = false;
        self.status.activated = true;
        self.running = Some(Running {
            id,
            kind,
            exit,
            generation: generation(config),
        });
        match kind {
            Kind::Process => {
                self.status.accel.clear();
                self.status.qmp_socket = PathBuf::new();
                self.status.log_path = self.dir.process_log();
                self.set_state(DomainState::Running);
                self.publish().await;
                cairn_persist::crash_point("domain-manager:process-running");
            }
            Kind::Vm => {
                self.status.accel = self.shared.accel.clone();
                self.status.qmp_socket = self.dir.qmp_socket();
                self.status.log_path = self.dir.console_log();
                self.set_state(DomainState::Booting);
                self.publish().await;
                self.wait_qmp_running(config).await;
            }
        }
    }

    /// The environment that marks a process as this app's, from its first instruction on
    /// (see [`procfs::scan`]).
    fn marker(&self, restart_counter: u32) -> Vec<(&'static str, String)> {
        let mut vars = procfs::marker(&self.shared.run_dir, &self.app.to_string()).to_vec();
        vars.push((procfs::RESTART_VAR, restart_counter.to_string()));
        vars
    }

    async fn spawn_vm(
        &self,
        args: &[String],
        restart_counter: u32,
    ) -> Result<(ProcessId, Kind, oneshot::Receiver<String>), String> {
        for stale in [self.dir.qmp_socket(), self.dir.qemu_pidfile()] {
            let _ = tokio::fs::remove_file(stale).await;
        }
        let log = std::fs::File::create(self.dir.qemu_log())
            .map_err(|e| format!("cannot create {}: {e}", self.dir.qemu_log().display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", self.dir.qemu_log().display()))?;
        let child = tokio::process::Command::new(&self.shared.qemu)
            .args(args)
            .envs(self.marker(restart_counter))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.shared.qemu.display()))?;
        tracing::info!(app = %self.app, pid = ?child.id(), accel = %self.shared.accel, "qemu started");
        let (id, exit) = watch_child(child)?;
        cairn_persist::crash_point("domain-manager:vm-spawned");
        Ok((id, Kind::Vm, exit))
    }

    async fn spawn_process(
        &self,
        spec: &cairn_types::ProcessSpec,
        disks: &[crate::launch::Disk],
        working_dir: Option<&Path>,
        restart_counter: u32,
    ) -> Result<(ProcessId, Kind, oneshot::Receiver<String>), String> {
        let path = self.dir.process_log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", path.display()))?;
        let mut command = tokio::process::Command::new(&spec.command);
        command
            .args(&spec.args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group, so that stop signals reach its children too.
            .process_group(0);
        let volumes: Vec<String> = disks
            .iter()
            .map(|d| d.path.to_string_lossy().into_owned())
            .collect();
        command.env("CAIRN_VOLUMES", volumes.join(":"));
        for (i, d) in disks.iter().enumerate() {
            command.env(format!("CAIRN_VOLUME_{i}"), &d.path);
        }
        if let Some(wd) = working_dir {
            command.current_dir(wd);
        }
        // Set last: the app's own env cannot take the marker away.
        command.envs(self.marker(restart_counter));
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.command.display()))?;
        let (id, exit) = watch_child(child)?;
        cairn_persist::crash_point("domain-manager:process-spawned");
        self.write_pidfile(id).await;
        cairn_persist::crash_point("domain-manager:process-pidfile");
        tracing::info!(app = %self.app, pid = id.pid, "process started");
        Ok((id, Kind::Process, exit))
    }

    /// Starts the OCI runtime in the foreground as the app's process (see `crate::container`),
    /// after removing what a runtime killed earlier left of this container.
    async fn spawn_container(
        &self,
        config: &DomainConfig,
        spec: &cairn_types::ContainerSpec,
        disks: &[crate::launch::Disk],
    ) -> Result<(ProcessId, Kind, oneshot::Receiver<String>), String> {
        let runtime = crate::container::runtime();
        let state = crate::container::state_root(&self.shared.run_dir);
        let id = crate::container::container_id(&self.shared.run_dir, self.app);
        let marker = self.marker(config.restart_counter);
        let hostname = self.app.simple().to_string()[..12].to_string();
        let runtime_spec = crate::container::runtime_spec(spec, disks, &hostname, &id, &marker)
            .map_err(|e| format!("container of app {}: {e}", self.app))?;
        let bundle = self.dir.0.join("bundle");
        tokio::fs::create_dir_all(&bundle)
            .await
            .map_err(|e| format!("cannot create {}: {e}", bundle.display()))?;
        let text = serde_json::to_vec_pretty(&runtime_spec)
            .map_err(|e| format!("runtime spec of app {}: {e}", self.app))?;
        tokio::fs::write(bundle.join("config.json"), text)
            .await
            .map_err(|e| format!("cannot write {}: {e}", bundle.join("config.json").display()))?;
        // A container whose runtime was killed stays known to the runtime (its state directory
        // is left): it goes first. None left, no runtime run (it is a tenth of a start).
        if tokio::fs::try_exists(state.join(&id)).await.unwrap_or(true) {
            let _ =
                crate::container::runtime_command(&runtime, &state, &["delete", "-f", &id]).await;
        }
        let path = self.dir.process_log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", path.display()))?;
        let child = tokio::process::Command::new(&runtime)
            .arg("--root")
            .arg(&state)
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .envs(marker)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the OCI runtime {} (Debian package crun): {e}",
                    runtime.display()
                )
            })?;
        let (pid, exit) = watch_child(child)?;
        cairn_persist::crash_point("domain-manager:process-spawned");
        self.write_pidfile(pid).await;
        tracing::info!(app = %self.app, pid = pid.pid, container = %id, "container started");
        Ok((pid, Kind::Process, exit))
    }

    /// Booting → Running once QMP answers; Broken if qemu dies or stays silent.
    async fn wait_qmp_running(&mut self, config: &DomainConfig) {
        let deadline = Instant::now() + self.shared.timeouts.boot;
        let socket = self.dir.qmp_socket();
        loop {
            if let Some(running) = &mut self.running
                && let Ok(how) = running.exit.try_recv()
            {
                let tail = log_tail(&self.dir.qemu_log());
                self.running = None;
                self.status.pid = None;
                self.status.activated = false;
                self.status.exit_status = how.clone();
                return self
                    .fail_start(config, format!("qemu ended while starting ({how}): {tail}"));
            }
            if let Ok(mut qmp) = Qmp::connect(&socket, self.shared.timeouts.qmp).await
                && let Ok(state) = qmp.query_status().await
            {
                self.status.paused = !state.running;
                self.set_state(DomainState::Running);
                return;
            }
            if Instant::now() >= deadline {
                self.stop().await;
                return self.fail_start(
                    config,
                    format!(
                        "qemu's QMP at {} did not answer within {:?}",
                        socket.display(),
                        self.shared.timeouts.boot
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The domain ended without being asked to.
    async fn ended_on_its_own(&mut self, mut how: String) {
        let Some(running) = self.running.take() else {
            return;
        };
        if let Some(cairn_types::DomainSpec::Container(spec)) =
            self.config.as_ref().map(|c| c.spec.clone())
        {
            how = self.container_end(&spec, how).await;
        }
        let what = match running.kind {
            Kind::Vm => "qemu",
            Kind::Process => "process",
        };
        tracing::warn!(app = %self.app, pid = running.id.pid, %how, "{what} ended on its own");
        self.set_state(DomainState::Broken);
        self.status.activated = false;
        self.status.pid = None;
        self.status.paused = false;
        self.status.exit_status = how.clone();
        self.status.error = error_now(
            format!("{what} of app {} ended on its own: {how}", self.app),
            self.app,
        );
        self.broken_generation = Some(running.generation);
        self.publish().await;
    }

    /// How a container ended, with the OOM killer's part when it had one (the memory limit hit),
    /// and what the runtime kept of it removed.
    async fn container_end(&self, spec: &cairn_types::ContainerSpec, how: String) -> String {
        let id = crate::container::container_id(&self.shared.run_dir, self.app);
        let since = self.status.boot_time.unwrap_or_default();
        let i = id.clone();
        let kills = tokio::task::spawn_blocking(move || crate::container::oom_kills(&i, since))
            .await
            .unwrap_or_default();
        let state = crate::container::state_root(&self.shared.run_dir);
        let runtime = crate::container::runtime();
        let _ = crate::container::runtime_command(&runtime, &state, &["delete", "-f", &id]).await;
        if kills.is_empty() {
            return how;
        }
        let limit = if spec.memory_mib > 0 {
            format!("its memory limit of {} MiB", spec.memory_mib)
        } else {
            "the host's memory".to_string()
        };
        format!(
            "{how}: out of memory, the kernel's OOM killer ended {} as the container reached {limit}",
            kills.join(", ")
        )
    }

    /// Graceful stop. VM: `system_powerdown` (repeated), then `quit`, then SIGKILL; process: SIGTERM to its
    /// group, then SIGKILL. Each step waits its timeout. Ends Halted.
    async fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        self.set_state(DomainState::Halting);
        self.publish().await;
        // Statuses are written behind; this one is on file before the first signal, so that a
        // domain-manager killed mid-stop is followed by one that knows the stop was asked: a
        // domain gone by then is halted, not reported as ended on its own.
        if let Err(e) = self.shared.statuses.flush().await {
            tracing::warn!(app = %self.app, error = %e, "could not write the Halting DomainStatus");
        }
        let t = self.shared.timeouts.clone();
        let pid = running.id.pid;
        let socket = self.dir.qmp_socket();
        let mut how;
        match running.kind {
            Kind::Vm => {
                // A paused guest would not see the power button.
                if self.status.paused {
                    let _ = crate::qmp::execute_once(&socket, "cont", None, t.qmp).await;
                }
                // A guest still booting misses an ACPI press (its handler is not armed yet):
                // press again every POWERDOWN_REPEAT until the stop timeout.
                let deadline = tokio::time::Instant::now() + t.stop;
                how = None;
                let mut presses = 0u32;
                loop {
                    if let Err(e) =
                        crate::qmp::execute_once(&socket, "system_powerdown", None, t.qmp).await
                        && presses == 0
                    {
                        tracing::warn!(app = %self.app, error = %e, "system_powerdown failed");
                    }
                    presses += 1;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    how = wait_exit(&mut running.exit, left.min(POWERDOWN_REPEAT)).await;
                    if how.is_some() {
                        break;
                    }
                }
                if how.is_none() {
                    tracing::warn!(app = %self.app, "guest ignored powerdown for {:?}: quit", t.stop);
                    let _ = crate::qmp::execute_once(&socket, "quit", None, t.qmp).await;
                    how = wait_exit(&mut running.exit, t.quit).await;
                }
                if how.is_none() {
                    tracing::warn!(app = %self.app, "qemu ignored quit: SIGKILL");
                    procfs::signal(pid, Signal::SIGKILL);
                }
            }
            Kind::Process => {
                // A container frozen by a live snapshot cut short would not see the SIGTERM.
                if matches!(
                    self.config.as_ref().map(|c| &c.spec),
                    Some(cairn_types::DomainSpec::Container(_))
                ) {
                    crate::container::thaw(&cairn_types::domain::container_cgroup(
                        &self.shared.run_dir,
                        self.app,
                    ))
                    .await;
                }
                procfs::signal_group(pid, Signal::SIGTERM);
                cairn_persist::crash_point("domain-manager:process-stop-signalled");
                how = wait_exit(&mut running.exit, t.stop).await;
                if how.is_none() {
                    tracing::warn!(app = %self.app, "process ignored SIGTERM for {:?}: SIGKILL", t.stop);
                    procfs::signal_group(pid, Signal::SIGKILL);
                }
            }
        }
        if how.is_none() {
            how = wait_exit(&mut running.exit, t.kill).await;
        }
        let Some(how) = how else {
            // Stuck in the kernel: not Halted while it lives, and still tracked so that
            // nothing starts beside it; its end is reported when it comes.
            let text = format!("pid {pid} of app {} survived SIGKILL", self.app);
            tracing::error!(app = %self.app, pid, "{text}");
            self.set_state(DomainState::Broken);
            self.status.error = error_now(text, self.app);
            self.running = Some(running);
            self.publish().await;
            return;
        };
        if running.kind == Kind::Process {
            self.sweep_stragglers(pid).await;
            let _ = tokio::fs::remove_file(self.dir.process_pidfile()).await;
        }
        if matches!(
            self.config.as_ref().map(|c| &c.spec),
            Some(cairn_types::DomainSpec::Container(_))
        ) {
            // Its cgroup and the runtime's record of it.
            let id = crate::container::container_id(&self.shared.run_dir, self.app);
            let state = crate::container::state_root(&self.shared.run_dir);
            if let Err(e) = crate::container::runtime_command(
                &crate::container::runtime(),
                &state,
                &["delete", "-f", &id],
            )
            .await
            {
                tracing::warn!(app = %self.app, container = %id, "{e}");
            }
        }
        tracing::info!(app = %self.app, %how, "domain stopped");
        self.set_state(DomainState::Halted);
        self.status.activated = false;
        self.status.pid = None;
        self.status.paused = false;
        self.status.exit_status = how;
        self.publish().await;
    }

    /// Re-adopts a domain a previous domain-manager started (see [`Self::find_live`]). Never
    /// starts anything.
    async fn adopt(&mut self) {
        let was = self.status.state;
        let last = (
            self.status.uuid_and_version.version.clone(),
            self.status.restart_counter,
        );
        match self.find_live().await {
            Some(found) => {
                tracing::info!(app = %self.app, pid = found.id.pid, kind = ?found.kind, "re-adopted running domain");
                self.track(found, last);
                self.publish().await;
            }
            None if was == DomainState::Halting => {
                // It was being stopped and is gone: the stop is done.
                self.set_state(DomainState::Halted);
                self.status.activated = false;
                self.status.pid = None;
                self.status.exit_status =
                    "stopped while the domain-manager was down: exit status unknown".into();
                self.publish().await;
            }
            None if matches!(was, DomainState::Booting | DomainState::Running) => {
                self.set_state(DomainState::Broken);
                self.status.activated = false;
                self.status.pid = None;
                self.status.exit_status =
                    "ended while the domain-manager was down: exit status unknown".into();
                self.status.error = error_now(
                    format!(
                        "domain of app {} ended while the domain-manager was down",
                        self.app
                    ),
                    self.app,
                );
                self.broken_generation = Some(last);
                self.publish().await;
            }
            None => {
                if self.status.uuid_and_version.version.is_empty()
                    && self.status.display_name.is_empty()
                {
                    // Only a directory was left: nothing to report until a config comes.
                    return;
                }
                if was == DomainState::Broken {
                    // Broken stays broken across a restart: a new restart counter starts it.
                    self.broken_generation = Some(last);
                }
                self.publish().await;
            }
        }
    }

    /// The domain of this app running now, whoever started it: qemu by its pidfile or a
    /// `/proc` scan for its QMP socket; a process by its marker (group leaders marked with
    /// this run directory and app) or a pidfile of an older version. Of several copies the
    /// oldest is kept (a child of the app is always younger than the app, so the oldest is
    /// never one of its children) and the others are killed with their groups.
    async fn find_live(&mut self) -> Option<Found> {
        let walk = self.shared.census.since(Instant::now()).await;
        match self.find_vm(&walk).await {
            Some(found) => Some(found),
            None => self.find_process(&walk).await,
        }
    }

    /// Tracks a domain it did not start as Running (or Broken, when it cannot be driven).
    fn track(&mut self, found: Found, generation: (String, u32)) {
        let id = found.id;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            procfs::wait_gone(id, Duration::from_millis(100)).await;
            let _ = tx.send(
                "exited while not a child of this domain-manager: exit status unknown".into(),
            );
        });
        self.status.pid = Some(id.pid);
        self.status.activated = true;
        match found.kind {
            Kind::Process => {
                self.status.accel.clear();
                self.status.qmp_socket = PathBuf::new();
                self.status.log_path = self.dir.process_log();
            }
            Kind::Vm => {
                self.status.accel = self.shared.accel.clone();
                self.status.qmp_socket = self.dir.qmp_socket();
                self.status.log_path = self.dir.console_log();
            }
        }
        match found.fault {
            None => {
                self.status.error = ErrorDescription::default();
                self.set_state(DomainState::Running);
            }
            Some(text) => {
                self.status.error = error_now(text, self.app);
                self.set_state(DomainState::Broken);
            }
        }
        self.running = Some(Running {
            id,
            kind: found.kind,
            exit: rx,
            generation: (generation.0, found.restart_counter.unwrap_or(generation.1)),
        });
    }

    async fn find_vm(&mut self, walk: &procfs::Walk) -> Option<Found> {
        let socket = self.dir.qmp_socket();
        let from_pidfile = tokio::fs::read_to_string(self.dir.qemu_pidfile())
            .await
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        let mut qemus = walk.qemus_serving(&socket);
        if qemus.is_empty() {
            return None;
        }
        // qemu writes its pidfile itself once it holds its disks: that one is the real owner.
        let keep = qemus
            .iter()
            .position(|q| Some(q.pid) == from_pidfile)
            .unwrap_or(0);
        let id = qemus.remove(keep);
        for other in &qemus {
            tracing::error!(app = %self.app, pid = other.pid, kept = id.pid, "a second qemu of this app: killing it");
            procfs::signal(other.pid, Signal::SIGKILL);
        }
        self.wait_all_gone(&qemus).await;
        let restart_counter = procfs::restart_counter(id.pid);
        // It may have been started an instant before the previous instance died: give it the
        // boot timeout to open its QMP socket.
        let deadline = Instant::now() + self.shared.timeouts.boot;
        let error = loop {
            match Qmp::connect(&socket, self.shared.timeouts.qmp).await {
                Ok(mut qmp) => {
                    if let Ok(state) = qmp.query_status().await {
                        self.status.paused = !state.running;
                    }
                    return Some(Found {
                        id,
                        kind: Kind::Vm,
                        restart_counter,
                        fault: None,
                    });
                }
                Err(e) if Instant::now() >= deadline || !procfs::is_running(id) => break e,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // Ours but unreachable: end it rather than ever run a second qemu on its disks.
        tracing::error!(app = %self.app, pid = id.pid, error = %error, "our qemu does not answer QMP: killing it");
        procfs::signal(id.pid, Signal::SIGKILL);
        if self.wait_all_gone(&[id]).await {
            return None;
        }
        Some(Found {
            id,
            kind: Kind::Vm,
            restart_counter,
            fault: Some(format!(
                "qemu pid {} of app {} answers no QMP ({error}) and survived SIGKILL",
                id.pid, self.app
            )),
        })
    }

    async fn find_process(&mut self, walk: &procfs::Walk) -> Option<Found> {
        let from_pidfile = tokio::fs::read_to_string(self.dir.process_pidfile())
            .await
            .ok()
            .and_then(|text| {
                let mut fields = text.split_whitespace();
                Some(ProcessId {
                    pid: fields.next()?.parse().ok()?,
                    start_time: fields.next()?.parse().ok()?,
                })
            })
            .filter(|id| procfs::is_running(*id));
        let marked = walk.marked_for(&self.app.to_string());
        let mut leaders = procfs::leaders(&marked);
        if let Some(id) = from_pidfile
            && !leaders.iter().any(|l| l.id == id)
        {
            // Started by a domain-manager that did not mark its processes yet.
            leaders.push(procfs::Marked {
                id,
                ppid: 0,
                pgid: id.pid,
                restart_counter: None,
            });
            leaders.sort_by_key(|l| (l.id.start_time, l.id.pid));
        }
        let (keep, others) = leaders.split_first()?;
        for other in others {
            tracing::error!(app = %self.app, pid = other.id.pid, kept = keep.id.pid, "a second copy of this app's process: killing its group");
            procfs::signal_group(other.id.pid, Signal::SIGKILL);
        }
        let others: Vec<ProcessId> = others.iter().map(|o| o.id).collect();
        self.wait_all_gone(&others).await;
        if from_pidfile != Some(keep.id) {
            self.write_pidfile(keep.id).await;
        }
        Some(Found {
            id: keep.id,
            kind: Kind::Process,
            restart_counter: keep.restart_counter,
            fault: None,
        })
    }

    /// Waits up to the kill timeout for `ids` to end; whether they did.
    async fn wait_all_gone(&self, ids: &[ProcessId]) -> bool {
        let all = async {
            for id in ids {
                procfs::wait_gone(*id, Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(self.shared.timeouts.kill, all)
            .await
            .is_ok()
    }

    /// `<pid> <start time>`, replaced whole (a reader never sees half a record). Only a
    /// shortcut for re-adoption: the marker finds the process without it.
    async fn write_pidfile(&self, id: ProcessId) {
        let pidfile = self.dir.process_pidfile();
        let temporary = self.dir.0.join(".process.pid.new");
        let record = format!("{} {}\n", id.pid, id.start_time);
        let written = match tokio::fs::write(&temporary, record).await {
            Ok(()) => tokio::fs::rename(&temporary, &pidfile).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(app = %self.app, error = %e, "cannot write {}", pidfile.display());
        }
    }

    /// After the process stopped: processes of the app that escaped its group (a child with a
    /// group or session of its own) get SIGTERM, then SIGKILL after the kill timeout. A stopped
    /// app leaves nothing running on its volumes.
    async fn sweep_stragglers(&self, leader: u32) {
        let deadline = Instant::now() + self.shared.timeouts.kill;
        let mut termed = false;
        loop {
            let left = self
                .shared
                .census
                .since(Instant::now())
                .await
                .marked_for(&self.app.to_string());
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for m in &left {
                    tracing::warn!(app = %self.app, pid = m.id.pid, "process of the app outlived its stop: SIGKILL");
                    procfs::signal(m.id.pid, Signal::SIGKILL);
                }
                return;
            }
            if !termed {
                for m in left.iter().filter(|m| m.pgid != leader) {
                    procfs::signal(m.id.pid, Signal::SIGTERM);
                }
                termed = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs one live operation and publishes its outcome under the request's key.
    async fn live_op(&mut self, request: DomainLiveOpConfig) {
        let started = Instant::now();
        let mut status = DomainLiveOpStatus {
            request_id: request.request_id,
            app_uuid: request.app_uuid,
            op: request.op,
            tag: request.tag.clone(),
            state: DomainLiveOpState::InProgress,
            started: Some(Utc::now()),
            ..DomainLiveOpStatus::default()
        };
        let _ = self.shared.live_ops.publish(status.clone()).await;
        cairn_persist::crash_point("domain-manager:live-op-started");
        let result = self.run_live_op(&request).await;
        status.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(paused) => {
                status.state = DomainLiveOpState::Done;
                status.pause_ms = u64::try_from(paused.as_millis()).unwrap_or(u64::MAX);
                tracing::info!(app = %self.app, op = ?request.op, tag = %request.tag, ms = status.duration_ms, pause_ms = status.pause_ms, "live operation done");
            }
            Err(text) => {
                tracing::warn!(app = %self.app, op = ?request.op, error = %text, "live operation failed");
                status.state = DomainLiveOpState::Failed;
                status.error = error_now(text, self.app);
            }
        }
        if let Err(e) = self.shared.live_ops.publish(status).await {
            tracing::error!(app = %self.app, error = %e, "could not publish DomainLiveOpStatus");
        }
        self.publish().await;
    }

    /// Runs `request`; `Ok` holds how long it kept the guest's CPUs stopped.
    async fn run_live_op(&mut self, request: &DomainLiveOpConfig) -> Result<Duration, String> {
        let op = request.op;
        if !matches!(&self.running, Some(r) if r.kind == Kind::Vm) {
            return Err(format!("{op:?}: app {} is not a running VM", self.app));
        }
        let needs_tag = !matches!(op, DomainLiveOp::Pause | DomainLiveOp::Resume);
        if needs_tag && request.tag.is_empty() {
            return Err(format!("{op:?} needs a Tag"));
        }
        let t = self.shared.timeouts.clone();
        let fail = |e: QmpError| format!("{op:?} {} on app {}: {e}", request.tag, self.app);
        let mut qmp = Qmp::connect(&self.dir.qmp_socket(), t.qmp)
            .await
            .map_err(fail)?;
        let tag = request.tag.as_str();
        let job_id = format!("cairn-{}", request.request_id);
        let mut paused = Duration::ZERO;
        match op {
            DomainLiveOp::Pause => {
                qmp.execute("stop", None).await.map_err(fail)?;
            }
            DomainLiveOp::Resume => {
                qmp.execute("cont", None).await.map_err(fail)?;
            }
            DomainLiveOp::DiskSnapshotCreate | DomainLiveOp::DiskSnapshotDelete => {
                let nodes = writable_qcow2_nodes(&mut qmp).await.map_err(fail)?;
                if nodes.is_empty() {
                    return Err(format!(
                        "{op:?}: app {} has no writable qcow2 disk",
                        self.app
                    ));
                }
                if op == DomainLiveOp::DiskSnapshotCreate {
                    paused = disk_snapshot_paused(&mut qmp, &nodes, tag)
                        .await
                        .map_err(fail)?;
                } else {
                    for n in &nodes {
                        qmp.execute(
                            "blockdev-snapshot-delete-internal-sync",
                            Some(json!({"device": n, "name": tag})),
                        )
                        .await
                        .map_err(fail)?;
                    }
                }
            }
            DomainLiveOp::StateSave | DomainLiveOp::StateLoad | DomainLiveOp::StateDelete => {
                let nodes = writable_qcow2_nodes(&mut qmp).await.map_err(fail)?;
                let Some(first) = nodes.first() else {
                    return Err(format!(
                        "{op:?}: app {} has no writable qcow2 disk to hold the memory state",
                        self.app
                    ));
                };
                let (command, args) = match op {
                    DomainLiveOp::StateSave => (
                        "snapshot-save",
                        json!({"job-id": job_id, "tag": tag, "vmstate": first, "devices": nodes}),
                    ),
                    DomainLiveOp::StateLoad => (
                        "snapshot-load",
                        json!({"job-id": job_id, "tag": tag, "vmstate": first, "devices": nodes}),
                    ),
                    _ => (
                        "snapshot-delete",
                        json!({"job-id": job_id, "tag": tag, "devices": nodes}),
                    ),
                };
                let was_running = qmp.query_status().await.map_err(fail)?.running;
                let at = Instant::now();
                qmp.run_job(command, &job_id, args, t.job)
                    .await
                    .map_err(fail)?;
                // snapshot-save and -load stop the guest for the whole job.
                if was_running && op != DomainLiveOp::StateDelete {
                    paused = at.elapsed();
                }
            }
        }
        let state = qmp.query_status().await.map_err(fail)?;
        self.status.paused = !state.running;
        Ok(paused)
    }
}

/// One atomic internal snapshot `tag` of `nodes` with the guest's CPUs stopped around it (a
/// guest paused already stays paused); returns how long they were stopped.
async fn disk_snapshot_paused(
    qmp: &mut Qmp,
    nodes: &[String],
    tag: &str,
) -> Result<Duration, QmpError> {
    let running = qmp.query_status().await?.running;
    let actions: Vec<Value> = nodes
        .iter()
        .map(|n| json!({"type": "blockdev-snapshot-internal-sync", "data": {"device": n, "name": tag}}))
        .collect();
    if !running {
        qmp.execute("transaction", Some(json!({ "actions": actions })))
            .await?;
        return Ok(Duration::ZERO);
    }
    qmp.execute("stop", None).await?;
    let at = Instant::now();
    let taken = qmp
        .execute("transaction", Some(json!({ "actions": actions })))
        .await;
    // Resumed whatever the outcome: a failed snapshot must not leave the guest stopped.
    let resumed = qmp.execute("cont", None).await;
    let paused = at.elapsed();
    taken?;
    resumed?;
    Ok(paused)
}

/// Format nodes of writable qcow2 disks, in disk order.
async fn writable_qcow2_nodes(qmp: &mut Qmp) -> Result<Vec<String>, QmpError> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let mut names: Vec<String> = nodes
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|n| n.get("drv").and_then(Value::as_str) == Some("qcow2"))
                .filter(|n| n.get("ro").and_then(Value::as_bool) == Some(false))
                .filter_map(|n| n.get("node-name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| (n.len(), n.clone()));
    Ok(names)
}

/// Waits for a child in a task of its own (children are always reaped: PID 1 here does not).
fn watch_child(
    mut child: tokio::process::Child,
) -> Result<(ProcessId, oneshot::Receiver<String>), String> {
    let Some(pid) = child.id() else {
        return Err("the child ended before its pid could be read".into());
    };
    let id = procfs::identify(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let how = match child.wait().await {
            Ok(status) => procfs::describe_exit(status),
            Err(e) => format!("exit status unknown: {e}"),
        };
        let _ = tx.send(how);
    });
    Ok((id, rx))
}

async fn wait_exit(exit: &mut oneshot::Receiver<String>, limit: Duration) -> Option<String> {
    match tokio::time::timeout(limit, exit).await {
        Ok(Ok(how)) => Some(how),
        Ok(Err(_)) => Some("exit status unknown".into()),
        Err(_) => None,
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        format!("{} is empty", path.display())
    } else {
        tail.join(" / ")
    }
}

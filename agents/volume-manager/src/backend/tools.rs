//! Fail fast at startup: each backend's tool ([`super::SnapshotBackend::tool`]) is checked once.
//! A missing tool disables its backend with a message naming the Debian package; it never
//! crashes the agent.

use std::time::Duration;

use cairn_types::volume::SnapshotBackendKind;

use crate::process;

/// What a backend needs installed: the command, the Debian package holding it, and the
/// arguments of a harmless run that shows it works.
#[derive(Debug, Clone, Copy)]
pub struct ToolSpec {
    pub name: &'static str,
    pub package: &'static str,
    pub probe: &'static [&'static str],
}

/// Whether a backend's tool is there; `Err` holds the message for the status.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    pub available: Result<(), String>,
}

impl Tool {
    async fn probe(spec: ToolSpec) -> Self {
        let ToolSpec {
            name,
            package,
            probe,
        } = spec;
        // 60 s, not 10: on the device image under TCG with the host loaded, `qemu-img --version`
        // (some 30 shared libraries to load) once took longer than 10 s while the agents came
        // up, and the qcow2 backend was disabled for the whole boot.
        let available = process::run(name, probe, Duration::from_secs(60))
            .await
            .map(drop)
            .map_err(|e| {
                format!("{name} is not usable ({e}); install the Debian package {package}")
            });
        if let Err(reason) = &available {
            tracing::error!(tool = name, package, "backend disabled: {reason}");
        }
        Self {
            name,
            package,
            available,
        }
    }

    /// A tool known to be missing (tests).
    pub fn missing(name: &'static str, package: &'static str) -> Self {
        Self {
            name,
            package,
            available: Err(format!(
                "{name} is not installed; install the Debian package {package}"
            )),
        }
    }

    pub fn is_available(&self) -> bool {
        self.available.is_ok()
    }
}

/// The tools of the backends that need one, by backend.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    tools: Vec<(SnapshotBackendKind, Tool)>,
}

impl Tools {
    /// Probes the tool of every backend in the registry.
    pub async fn detect() -> Self {
        let mut tools = Self::default();
        for (kind, spec) in super::tool_specs() {
            tools.set(kind, Tool::probe(spec).await);
            // A backend with several drivers (ZFS) chooses and logs one now, not at first use.
            let _ = super::Backends::driver(kind);
        }
        tools
    }

    /// The tool backend `kind` needs; `None` when it needs none, or is not built in.
    pub fn of(&self, kind: SnapshotBackendKind) -> Option<&Tool> {
        self.tools.iter().find(|(k, _)| *k == kind).map(|(_, t)| t)
    }

    /// Whether backend `kind` has what it needs (a backend needing no tool always has).
    pub fn usable(&self, kind: SnapshotBackendKind) -> Result<(), String> {
        self.of(kind).map_or(Ok(()), |t| t.available.clone())
    }

    /// Replaces backend `kind`'s tool (tests: a tool known to be missing).
    pub fn set(&mut self, kind: SnapshotBackendKind, tool: Tool) {
        self.tools.retain(|(k, _)| *k != kind);
        self.tools.push((kind, tool));
    }
}

//! Named crash points for crash-safety tests: `CAIRN_CRASH_AT=<agent>:<point>` makes the process
//! SIGKILL itself when it reaches that point, exactly as an outside kill at that instruction
//! would (no destructors, no flushing). Unset, a crash point costs one environment lookup.

/// The environment variable naming the crash point to die at.
pub const CRASH_AT_ENV: &str = "CAIRN_CRASH_AT";

/// Dies by SIGKILL if `CAIRN_CRASH_AT` names `point` (e.g. `volume-manager:after-backend-create`).
pub fn crash_point(point: &str) {
    if std::env::var_os(CRASH_AT_ENV).is_some_and(|wanted| wanted == point) {
        eprintln!("crash point {point}: killing myself (SIGKILL)");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; if it somehow returned, still never go on.
        std::process::abort();
    }
}

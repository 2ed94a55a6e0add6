//! A technician who is not root: a member of the technicians' group given to `cairn up` reads
//! the device; anyone else is refused with a reason. Needs root to switch users (setpriv).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Ids no account on a test machine uses; the kernel needs no passwd entry for them.
const TECHNICIANS_GID: u32 = 47_311;
const TECHNICIAN_UID: u32 = 47_312;
const STRANGER_UID: u32 = 47_313;

/// `cairn --root ROOT ARGS…` as `uid` with primary group `uid` and supplementary `groups`.
fn cairn_as(
    uid: u32,
    groups: &[u32],
    root: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    command
        .arg("--")
        .arg(cairn_bin())
        .arg("--root")
        .arg(root)
        .args(args);
    output(&mut command)
}

#[test]
fn a_technician_in_the_group_reads_the_device_and_a_stranger_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to a non-root technician needs root (setpriv)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // The temporary root is 0700; technicians must be able to reach the sockets under it.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut up = Up::start_in(
        root,
        &cairn_bin(),
        &["--technicians-gid", &TECHNICIANS_GID.to_string()],
    );
    up.wait_status(Duration::from_secs(30), demo_ready);

    let (code, out, err) = cairn_as(
        TECHNICIAN_UID,
        &[TECHNICIANS_GID],
        up.path(),
        &["status", "--json"],
    );
    assert_eq!(code, 0, "the technician reads the status: {err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        demo_ready(&view),
        "the technician sees the app and its snapshot: {view}"
    );
    for agent in [
        "config-agent",
        "app-manager",
        "volume-manager",
        "domain-manager",
    ] {
        assert_eq!(
            agent_state(&view, agent),
            "up",
            "{agent} is readable: {view}"
        );
    }
    assert!(view["device"]["ConfigSource"]["Path"].is_string(), "{view}");
    let (code, out, err) = cairn_as(
        TECHNICIAN_UID,
        &[TECHNICIANS_GID],
        up.path(),
        &["snapshots"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(DEMO_SNAPSHOT) && out.contains("available"),
        "{out}"
    );

    for args in [&["status"][..], &["apps", "--json"], &["watch"]] {
        let (code, _, err) = cairn_as(STRANGER_UID, &[], up.path(), args);
        assert_eq!(code, 4, "cairn {args:?} as a stranger: {err}");
        assert!(
            err.contains("not allowed to read the device")
                && err.contains(&format!("uid {STRANGER_UID}"))
                && err.contains("technicians"),
            "the refusal says who and what to do: {err}"
        );
    }
    let status = up.stop(Signal::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

//! `cairn up --dbus`: the device's read-only D-Bus read-out, read with `busctl` from a private
//! `dbus-daemon`, the way a technician's tool reads it: the general gateway shows every app, a
//! tenant's gateway only that tenant's apps (and the device), and `cairn dbus-policy` prints the
//! daemon policy that gives each group its gateways.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;
#[path = "../../../dbus-gateway/tests/support/dbus_daemon.rs"]
mod dbus_daemon;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{NORTH_APP, SOUTH_APP, Up, output, two_tenants_config};
use dbus_daemon::PrivateDbusDaemon;

/// `busctl --address=ADDRESS tree --list NAME`, or its error output.
fn tree(address: &str, name: &str) -> Result<String, String> {
    let (code, out, err) = output(
        Command::new("busctl")
            .arg(format!("--address={address}"))
            .args(["--no-pager", "tree", "--list", name]),
    );
    if code == 0 { Ok(out) } else { Err(err) }
}

/// Polls `tree` of `name` until `done` holds; panics with the last tree and the log.
fn wait_tree(up: &Up, address: &str, name: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = tree(address, name);
        if let Ok(text) = &last
            && done(text)
        {
            return text.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name} not as expected; last: {last:?}\n--- cairn up log ---\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn app_object(app: &str) -> String {
    cairn_dbus::object_path("app-manager", "AppInstanceStatus", app)
}

/// The path under which `publisher`'s `topic` keys are objects.
fn topic_prefix(publisher: &str, topic: &str) -> String {
    let any = cairn_dbus::object_path(publisher, topic, "x");
    any.trim_end_matches('x').to_string()
}

#[test]
fn up_serves_every_status_on_dbus_and_each_tenant_only_its_own() {
    let daemon = PrivateDbusDaemon::start();
    let address = daemon.address().to_string();
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("device.json");
    std::fs::write(&config, two_tenants_config()).unwrap();
    let up = Up::start_in(
        root,
        &common::cairn_bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--dbus",
            &address,
            "--tenant-reader",
            "north:4242",
        ],
    );

    // The general gateway: both apps, their volumes and domains, and the device.
    let all = wait_tree(&up, &address, "org.cairn.Bus", |t| {
        t.contains(&app_object(NORTH_APP))
            && t.contains(&app_object(SOUTH_APP))
            && t.contains(&topic_prefix("config-agent", "DeviceStatus"))
            && t.contains(&topic_prefix("volume-manager", "VolumeStatus"))
            && t.contains(&topic_prefix("domain-manager", "DomainStatus"))
    });
    // North's gateway: its app and the device status, nothing of south.
    let north = wait_tree(&up, &address, "org.cairn.Tenant.north", |t| {
        t.contains(&app_object(NORTH_APP))
            && t.contains(&topic_prefix("config-agent", "DeviceStatus"))
    });
    assert!(
        !north.contains(&app_object(SOUTH_APP)),
        "north sees south's app:\n{north}"
    );
    assert!(
        !north.contains("VolumeStatus"),
        "north sees device-wide volumes:\n{north}"
    );
    // South has no reader: no gateway of its own.
    assert!(tree(&address, "org.cairn.Tenant.south").is_err());

    // The app's status as JSON, readable as a property.
    let (code, out, err) = output(Command::new("busctl").args([
        &format!("--address={address}"),
        "--no-pager",
        "get-property",
        "org.cairn.Bus",
        &app_object(NORTH_APP),
        "org.cairn.Topic1",
        "Json",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("pump"),
        "the app's status names it: {out}\n{all}"
    );
    // The read-outs' JSON: EVE's state by name (`cairn apps --json` prints the same), not 115.
    // busctl prints the string C-escaped.
    let state = out
        .split("State\\\":")
        .nth(1)
        .unwrap_or_else(|| panic!("no State in {out}"));
    assert!(state.starts_with("\\\""), "the state is not a name: {out}");
    drop(daemon);
}

#[test]
fn up_runs_on_when_the_dbus_bus_cannot_be_reached_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("no-such-bus");
    let address = format!("unix:path={}", missing.display());
    let up = Up::start_in(root, &common::cairn_bin(), &["--dbus", &address]);
    // The demo device comes up regardless.
    up.wait_status(Duration::from_secs(60), common::demo_ready);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !up.log().contains("D-Bus read-out on") {
        assert!(
            Instant::now() < deadline,
            "no word on the D-Bus read-out:\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = up.log();
    assert!(
        log.contains(&format!("D-Bus read-out on {address} unavailable")),
        "names the bus and says it is unavailable:\n{log}"
    );
}

#[test]
fn dbus_policy_gives_the_technicians_every_gateway_and_a_tenant_its_own() {
    // Group 0 is root's on every machine; the policy names groups, not ids.
    let (code, out, err) = common::cairn(
        std::path::Path::new("/nonexistent"),
        &[
            "dbus-policy",
            "--technicians-gid",
            "0",
            "--tenant-reader",
            "north:0",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("<busconfig>"), "{out}");
    assert!(out.contains("org.cairn.Tenant.north"), "{out}");
    assert!(out.contains(r#"group="root""#), "{out}");
    // A group that does not exist cannot be written into a policy.
    let (code, _, err) = common::cairn(
        std::path::Path::new("/nonexistent"),
        &["dbus-policy", "--tenant-reader", "north:4000000000"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("4000000000") && err.contains("groupadd"),
        "{err}"
    );
}

#[test]
fn the_read_out_comes_back_when_the_dbus_daemon_restarts() {
    let mut daemon = PrivateDbusDaemon::start();
    // The socket's address, not the GUID's: a restarted daemon has a new GUID.
    let address = daemon.path_address();
    let up = Up::start(&["--dbus", &address]);
    up.wait_status(Duration::from_secs(60), common::demo_ready);
    wait_tree(&up, &address, "org.cairn.Bus", |t| {
        t.contains(&topic_prefix("app-manager", "AppInstanceStatus"))
    });
    daemon.restart();
    // The supervisor notices, connects again and mirrors the whole table again.
    wait_tree(&up, &address, "org.cairn.Bus", |t| {
        t.contains(&topic_prefix("app-manager", "AppInstanceStatus"))
            && t.contains(&topic_prefix("config-agent", "DeviceStatus"))
    });
    assert!(
        up.log().contains("connection lost; connecting again"),
        "says what happened:\n{}",
        up.log()
    );
}

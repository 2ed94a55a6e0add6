//! The read-only D-Bus gateway against a private `dbus-daemon`: a publisher and the gateway in
//! this process, read from outside with `busctl` as a technician would, and watched for signals
//! with a second zbus connection.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

#[path = "support/dbus_daemon.rs"]
mod dbus_daemon;
#[path = "../benches/zbus_rtt.rs"]
mod zbus_rtt;

use std::collections::HashMap;
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::time::Duration;

use cairn_dbus::{self as dbus, Gateway, GatewayError, INTERFACE, ROOT_PATH};
use cairn_pubsub::{Bus, Publication, PublishOptions, Topic};
use cairn_types::VolumeStatus;
use dbus_daemon::PrivateDbusDaemon;
use futures_core::Stream;
use tokio::io::AsyncReadExt as _;
use uuid::Uuid;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

const BUS_NAME: &str = "org.cairn.Bus";
const PUBLISHER: &str = "volume-manager";
/// Bound on every wait; polls and signals normally take milliseconds.
const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// A private bus, a publication of `VolumeStatus`, and a gateway mirroring it.
struct Fixture {
    daemon: PrivateDbusDaemon,
    _roots: tempfile::TempDir,
    gateway_bus: Bus,
    gateway: Gateway,
    publication: Publication<VolumeStatus>,
    /// A second connection, to watch the gateway's signals.
    watcher: Connection,
}

impl Fixture {
    async fn new() -> Self {
        let daemon = PrivateDbusDaemon::start();
        let roots = tempfile::tempdir().unwrap();
        let run = roots.path().join("run");
        let persist = roots.path().join("persist");
        let publication = Bus::new(PUBLISHER, &run, &persist)
            .publish::<VolumeStatus>(PublishOptions::default())
            .await
            .unwrap();
        let gateway_bus = Bus::new("dbus-gateway", &run, &persist);
        let gateway = Gateway::connect(daemon.address(), BUS_NAME).await.unwrap();
        let watcher = zbus::connection::Builder::address(daemon.address())
            .build()
            .await
            .unwrap();
        Self {
            daemon,
            _roots: roots,
            gateway_bus,
            gateway,
            publication,
            watcher,
        }
    }

    /// Starts mirroring; call after `watch` where a test needs the signals of the first values.
    fn mirror(&mut self) {
        let sub = self.gateway_bus.subscribe::<VolumeStatus>(PUBLISHER);
        self.gateway.mirror(sub).unwrap();
    }

    async fn watch(&self, path: &str, interface: &str, member: &str) -> MessageStream {
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .path(path)
            .interface(interface)
            .member(member)
            .build()
            .unwrap();
        MessageStream::for_match_rule(rule, &self.watcher, None)
            .await
            .unwrap()
    }

    async fn busctl(&self, args: &[&str]) -> Output {
        busctl(self.daemon.address(), args).await
    }

    /// A property as `busctl --json=short` prints it: `{"type": ..., "data": ...}`.
    async fn property(&self, path: &str, name: &str) -> Option<serde_json::Value> {
        let out = self
            .busctl(&[
                "--json=short",
                "get-property",
                BUS_NAME,
                path,
                INTERFACE,
                name,
            ])
            .await;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    async fn string_property(&self, path: &str, name: &str) -> Option<String> {
        let value = self.property(path, name).await?;
        assert_eq!(value["type"], "s", "{name}: {value}");
        Some(value["data"].as_str().unwrap().to_string())
    }

    /// Polls until `name` at `path` reads `expected`.
    async fn until_property_is(&self, path: &str, name: &str, expected: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let read = self.string_property(path, name).await;
            if read.as_deref() == Some(expected) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} {name} is {read:?}, expected {expected}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn tree(&self) -> String {
        let out = self.busctl(&["tree", "--list", BUS_NAME]).await;
        assert!(
            out.status.success(),
            "busctl tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Runs `busctl --address=<address> args`.
async fn busctl(address: &str, args: &[&str]) -> Output {
    let address = format!("--address={address}");
    let mut all = vec![address.as_str(), "--no-pager"];
    all.extend_from_slice(args);
    command("busctl", &all).await
}

/// Runs `program args`, killing and reaping it if it overruns the deadline.
async fn command(program: &str, args: &[&str]) -> Output {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} does not start: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let run = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (status, _, _) = tokio::join!(
            child.wait(),
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err)
        );
        (status, out, err)
    };
    match tokio::time::timeout(DEADLINE, run).await {
        Ok((status, stdout, stderr)) => Output {
            status: status.unwrap(),
            stdout,
            stderr,
        },
        Err(_) => {
            // `kill` signals this child's PID and waits for it.
            let _ = child.kill().await;
            panic!("{program} {args:?} did not finish within {DEADLINE:?}");
        }
    }
}

/// The next signal on `stream`, failing the test after the deadline.
async fn next_signal(stream: &mut MessageStream) -> zbus::Message {
    let next = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
    tokio::time::timeout(DEADLINE, next)
        .await
        .expect("a signal within the deadline")
        .expect("the watcher's connection is open")
        .unwrap()
}

fn volume(id: u128, generation: i64, name: &str, size: u64) -> VolumeStatus {
    VolumeStatus {
        volume_id: Uuid::from_u128(id),
        generation_counter: generation,
        display_name: name.into(),
        current_size: size,
        ..Default::default()
    }
}

#[tokio::test]
async fn published_key_appears_as_an_object_with_its_json_and_key() {
    let mut fx = Fixture::new().await;
    let mut added = fx
        .watch(
            ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager",
            "InterfacesAdded",
        )
        .await;
    fx.mirror();
    let value = volume(
        0x6ba7b810_9dad_11d1_80b4_00c04fd430c8,
        3,
        "data disk",
        1 << 20,
    );
    let key = value.key();
    assert!(
        key.contains('#') && key.contains('-'),
        "{key} exercises escaping"
    );
    fx.publication.publish(value.clone()).await.unwrap();
    let path = dbus::object_path(PUBLISHER, VolumeStatus::NAME, &key);

    let signal = next_signal(&mut added).await;
    let (added_path, interfaces): (
        OwnedObjectPath,
        HashMap<String, HashMap<String, OwnedVariant>>,
    ) = signal.body().deserialize().unwrap();
    assert_eq!(added_path.as_str(), path);
    let announced_key: String = interfaces[INTERFACE]["Key"]
        .try_clone()
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(announced_key, key);

    let json = fx
        .string_property(&path, "Json")
        .await
        .expect("Json readable with busctl");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json, value.readout_json().unwrap());
    assert_eq!(
        fx.string_property(&path, "Key").await.as_deref(),
        Some(key.as_str())
    );
    assert_eq!(
        fx.string_property(&path, "Publisher").await.as_deref(),
        Some(PUBLISHER)
    );
    assert_eq!(
        fx.string_property(&path, "Topic").await.as_deref(),
        Some("VolumeStatus")
    );
    let fields = fx.property(&path, "Fields").await.unwrap();
    assert_eq!(fields["type"], "a{ss}");
    assert_eq!(fields["data"]["DisplayName"], "data disk");
    assert_eq!(fields["data"]["CurrentSize"], "1048576");
    assert_eq!(fields["data"]["GenerationCounter"], "3");
    assert!(
        fields["data"].get("Error").is_none(),
        "objects are not scalar fields: {fields}"
    );

    let tree = fx.tree().await;
    assert!(
        tree.lines().any(|line| line == path),
        "{path} not in the tree:\n{tree}"
    );
    assert_eq!(fx.gateway.object_count(), 1);
}

#[tokio::test]
async fn modified_value_emits_properties_changed_and_reads_back_new() {
    let mut fx = Fixture::new().await;
    fx.mirror();
    let value = volume(1, 0, "before", 1);
    let path = dbus::object_path(PUBLISHER, VolumeStatus::NAME, &value.key());
    fx.publication.publish(value.clone()).await.unwrap();
    fx.until_property_is(&path, "Key", &value.key()).await;

    let mut changes = fx
        .watch(
            &path,
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .await;
    let renamed = VolumeStatus {
        display_name: "after".into(),
        ..value
    };
    fx.publication.publish(renamed.clone()).await.unwrap();

    let signal = next_signal(&mut changes).await;
    let (interface, changed, invalidated): (String, HashMap<String, OwnedVariant>, Vec<String>) =
        signal.body().deserialize().unwrap();
    assert_eq!(interface, INTERFACE);
    assert!(invalidated.is_empty());
    let new_json: String = changed["Json"].try_clone().unwrap().try_into().unwrap();
    // The read-outs' JSON: what `cairn --json` prints (a time never set is null).
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&new_json).unwrap(),
        renamed.readout_json().unwrap()
    );
    assert!(
        changed.contains_key("Fields"),
        "DisplayName is a field: {changed:?}"
    );
    assert!(
        !changed.contains_key("Key"),
        "the key never changes: {changed:?}"
    );

    let read = fx.string_property(&path, "Json").await.unwrap();
    assert_eq!(read, new_json);
}

#[tokio::test]
async fn unpublished_key_leaves_the_tree_with_interfaces_removed() {
    let mut fx = Fixture::new().await;
    fx.mirror();
    let kept = volume(1, 0, "kept", 1);
    let gone = volume(2, 0, "gone", 2);
    let kept_path = dbus::object_path(PUBLISHER, VolumeStatus::NAME, &kept.key());
    let gone_path = dbus::object_path(PUBLISHER, VolumeStatus::NAME, &gone.key());
    fx.publication.publish(kept.clone()).await.unwrap();
    fx.publication.publish(gone.clone()).await.unwrap();
    fx.until_property_is(&gone_path, "Key", &gone.key()).await;

    let mut removed = fx
        .watch(
            ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager",
            "InterfacesRemoved",
        )
        .await;
    fx.publication.unpublish(&gone.key()).await.unwrap();

    let signal = next_signal(&mut removed).await;
    let (removed_path, interfaces): (OwnedObjectPath, Vec<String>) =
        signal.body().deserialize().unwrap();
    assert_eq!(removed_path.as_str(), gone_path);
    assert!(interfaces.iter().any(|i| i == INTERFACE), "{interfaces:?}");

    assert_eq!(fx.string_property(&gone_path, "Json").await, None);
    let tree = fx.tree().await;
    assert!(
        !tree.lines().any(|line| line == gone_path),
        "{gone_path} still in the tree:\n{tree}"
    );
    assert!(
        tree.lines().any(|line| line == kept_path),
        "{kept_path} missing:\n{tree}"
    );
    assert_eq!(fx.gateway.object_count(), 1);
}

#[tokio::test]
async fn properties_are_read_only() {
    let mut fx = Fixture::new().await;
    fx.mirror();
    let value = volume(1, 0, "disk", 1);
    let path = dbus::object_path(PUBLISHER, VolumeStatus::NAME, &value.key());
    fx.publication.publish(value.clone()).await.unwrap();
    let json = serde_json::to_string(&value.readout_json().unwrap()).unwrap();
    fx.until_property_is(&path, "Json", &json).await;

    let out = fx
        .busctl(&["set-property", BUS_NAME, &path, INTERFACE, "Json", "s", "x"])
        .await;
    assert!(!out.status.success(), "set-property succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("read-only"), "busctl said: {stderr}");
    assert_eq!(fx.string_property(&path, "Json").await, Some(json));

    let introspection = fx.busctl(&["introspect", BUS_NAME, &path, INTERFACE]).await;
    let introspection = String::from_utf8(introspection.stdout).unwrap();
    let json_line = introspection
        .lines()
        .find(|l| l.starts_with(".Json"))
        .unwrap();
    assert!(!json_line.contains("writable"), "{json_line}");
}

#[tokio::test]
async fn a_second_gateway_cannot_take_the_name_nor_mirror_twice() {
    let mut fx = Fixture::new().await;
    fx.mirror();
    let sub = fx.gateway_bus.subscribe::<VolumeStatus>(PUBLISHER);
    assert!(matches!(
        fx.gateway.mirror(sub),
        Err(GatewayError::AlreadyMirrored { .. })
    ));
    match Gateway::connect(fx.daemon.address(), BUS_NAME).await {
        Err(GatewayError::RequestName { .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a second gateway owns {BUS_NAME}"),
    }
}

#[tokio::test]
async fn gdbus_and_the_object_manager_see_the_published_keys() {
    let mut fx = Fixture::new().await;
    let values = [volume(1, 0, "a", 1), volume(2, 5, "b", 2)];
    for value in &values {
        fx.publication.publish(value.clone()).await.unwrap();
    }
    // Mirrored after publishing: the gateway starts from the whole table.
    fx.mirror();
    let paths: Vec<String> = values
        .iter()
        .map(|v| dbus::object_path(PUBLISHER, VolumeStatus::NAME, &v.key()))
        .collect();
    fx.until_property_is(&paths[1], "Key", &values[1].key())
        .await;

    let out = fx
        .busctl(&[
            "--json=short",
            "call",
            BUS_NAME,
            ROOT_PATH,
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let managed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let managed = &managed["data"][0];
    for (path, value) in paths.iter().zip(&values) {
        assert_eq!(
            managed[path][INTERFACE]["Key"]["data"],
            value.key(),
            "{managed}"
        );
    }

    let out = command(
        "gdbus",
        &[
            "introspect",
            "--address",
            fx.daemon.address(),
            "--dest",
            BUS_NAME,
            "--object-path",
            ROOT_PATH,
            "--recurse",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for (path, value) in paths.iter().zip(&values) {
        assert!(
            text.contains(&format!("node {path} {{")),
            "{path} missing:\n{text}"
        );
        assert!(
            text.contains(&format!("readonly s Key = '{}';", value.key())),
            "{text}"
        );
    }
}

#[tokio::test]
async fn zbus_round_trip_smoke() {
    let mut times = zbus_rtt::zbus_round_trips(10).await;
    assert_eq!(times.len(), 10);
    times.sort();
    println!(
        "zbus Echo(256 B) round trip via dbus-daemon: p50 {:?}, max {:?}",
        times[5], times[9]
    );
}

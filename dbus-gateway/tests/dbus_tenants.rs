//! The D-Bus read-out per tenant: one gateway per tenant, each mirroring its tenant's apps under
//! `org.cairn.Tenant.<tenant>`, behind a private `dbus-daemon` configured with the policy
//! [`dbus::tenant_policy`] generates. `busctl` runs as other uids (`setpriv`): a member of
//! tenant a's group reads a's apps and is denied b's gateway, and the other way round; a
//! technician of the device reads both; a stranger neither.
//!
//! Needs root (to run `busctl` as other uids); skipped with a message otherwise.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

#[path = "support/dbus_daemon.rs"]
mod dbus_daemon;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cairn_dbus::{self as dbus, Gateway, ROOT_PATH};
use cairn_pubsub::{Bus, PublishOptions};
use cairn_types::{AppInstanceStatus, UUIDandVersion};
use dbus_daemon::PrivateDbusDaemon;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);
const TECHNICIANS: u32 = 4242;
const TENANT_A: u32 = 4411;
const TENANT_B: u32 = 4412;
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

fn app(n: u128, tenant: &str) -> AppInstanceStatus {
    AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: Uuid::from_u128(n),
            version: "1".into(),
        },
        display_name: format!("app-{n}"),
        tenant: tenant.into(),
        ..Default::default()
    }
}

/// `busctl --address=… call <name> /org/cairn ObjectManager GetManagedObjects` as `uid` with
/// the supplementary `groups`.
async fn managed_objects_as(address: &str, uid: u32, groups: &[u32], name: &str) -> Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", list.join(","))
    };
    let args = [
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        groups,
        "busctl".into(),
        format!("--address={address}"),
        "--no-pager".into(),
        "--json=short".into(),
        "call".into(),
        name.into(),
        ROOT_PATH.into(),
        OBJECT_MANAGER.into(),
        "GetManagedObjects".into(),
    ];
    let child = tokio::process::Command::new("setpriv")
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, child)
        .await
        .unwrap_or_else(|_| panic!("setpriv {args:?} did not finish within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("setpriv does not start: {e}"))
}

/// The app UUIDs a successful `GetManagedObjects` listed; the error text otherwise.
fn apps_listed(out: &Output) -> Result<Vec<u128>, String> {
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found: Vec<u128> = (1..=9)
        .filter(|n| text.contains(&Uuid::from_u128(*n).to_string()))
        .collect();
    found.sort();
    Ok(found)
}

async fn until_objects(gateway: &Gateway, count: usize) {
    let start = Instant::now();
    while gateway.object_count() != count {
        assert!(
            start.elapsed() < DEADLINE,
            "the gateway has {} objects, not {count}",
            gateway.object_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_group_reads_its_own_gateway_only() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: this test runs busctl as other uids and needs root (CI runs as root)");
        return;
    }
    let namespaces = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status();
    if !namespaces.is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare --mount` is not permitted here (the daemon's user database)");
        return;
    }
    let policy = dbus::tenant_policy(
        Some(&TECHNICIANS.to_string()),
        &[("a", &TENANT_A.to_string()), ("b", &TENANT_B.to_string())],
    );
    // dbus-daemon takes group membership from the group database (not from the peer's
    // credentials): the users and groups exist there, in the daemon's mount namespace.
    let passwd: Vec<String> = [4401, 4402, 4403, 4404]
        .iter()
        .map(|uid| format!("cairn-test-{uid}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin"))
        .collect();
    let mut group: Vec<String> = [4401, 4402, 4403, 4404]
        .iter()
        .map(|gid| format!("cairn-test-{gid}:x:{gid}:"))
        .collect();
    group.push(format!("cairn-tenant-a:x:{TENANT_A}:cairn-test-4401"));
    group.push(format!("cairn-tenant-b:x:{TENANT_B}:cairn-test-4402"));
    group.push(format!("cairn-technicians:x:{TECHNICIANS}:cairn-test-4403"));
    let daemon = PrivateDbusDaemon::start_system_like(&policy, &passwd, &group);
    let roots = tempfile::tempdir().unwrap();
    let (run, persist) = (roots.path().join("run"), roots.path().join("persist"));
    let statuses = Bus::new("app-manager", &run, &persist)
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    for value in [app(1, "a"), app(2, "a"), app(3, "b")] {
        statuses.publish(value).await.unwrap();
    }
    let gateway_bus = Bus::new("dbus-gateway", &run, &persist);
    let mut gateways = Vec::new();
    for tenant in ["a", "b"] {
        let mut gateway = Gateway::connect(daemon.address(), &dbus::tenant_bus_name(tenant))
            .await
            .unwrap();
        gateway
            .mirror_tenant(
                gateway_bus.subscribe::<AppInstanceStatus>("app-manager"),
                tenant,
            )
            .unwrap();
        gateways.push(gateway);
    }
    until_objects(&gateways[0], 2).await;
    until_objects(&gateways[1], 1).await;

    let (a, b) = (dbus::tenant_bus_name("a"), dbus::tenant_bus_name("b"));
    let address = daemon.address();
    let read = |uid: u32, groups: &'static [u32], name: String| async move {
        apps_listed(&managed_objects_as(address, uid, groups, &name).await)
    };

    // Tenant a's technician: a's apps, and nothing of b.
    assert_eq!(read(4401, &[TENANT_A], a.clone()).await, Ok(vec![1, 2]));
    let denied = read(4401, &[TENANT_A], b.clone()).await.unwrap_err();
    assert!(denied.contains("denied"), "busctl said: {denied}");
    // Tenant b's technician: the other way round.
    assert_eq!(read(4402, &[TENANT_B], b.clone()).await, Ok(vec![3]));
    let denied = read(4402, &[TENANT_B], a.clone()).await.unwrap_err();
    assert!(denied.contains("denied"), "busctl said: {denied}");
    // The device's technician reads both; a stranger neither.
    assert_eq!(read(4403, &[TECHNICIANS], a.clone()).await, Ok(vec![1, 2]));
    assert_eq!(read(4403, &[TECHNICIANS], b.clone()).await, Ok(vec![3]));
    for name in [a.clone(), b.clone()] {
        let denied = read(4404, &[], name).await.unwrap_err();
        assert!(denied.contains("denied"), "busctl said: {denied}");
    }

    // An app that moves from a to b leaves a's gateway and appears in b's.
    statuses.publish(app(2, "b")).await.unwrap();
    until_objects(&gateways[0], 1).await;
    until_objects(&gateways[1], 2).await;
    assert_eq!(read(4401, &[TENANT_A], a).await, Ok(vec![1]));
    assert_eq!(read(4402, &[TENANT_B], b).await, Ok(vec![2, 3]));
}

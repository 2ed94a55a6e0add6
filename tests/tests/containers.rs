//! Issue 21 across the real agents: a container app (EVE's NOHYPER, the local file's
//! `{"kind": "container"}`) whose image is pulled by tag from Debian's `docker-registry`
//! (TLS with a test CA, htpasswd basic auth), unpacked into its root volume and run by `crun`;
//! it counts into a data volume. A stopped snapshot, then a rollback: the container starts
//! again on the snapshot's counter.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_e2e::Device;
use cairn_test_controller::registry::{TestRegistry, busybox_image};
use cairn_types::AppInstanceStatus;
use uuid::Uuid;

const APP: &str = "c21c0000-0000-4000-8000-00000000a001";
const ROOT_VOL: &str = "c21c0000-0000-4000-8000-00000000b001";
const DATA_VOL: &str = "c21c0000-0000-4000-8000-00000000b002";
const TREE: &str = "c21c0000-0000-4000-8000-00000000c001";
const DS: &str = "c21c0000-0000-4000-8000-00000000d001";
const S1: &str = "c21c0000-0000-4000-8000-00000000e001";

const SETTLE: Duration = Duration::from_secs(60);

/// The container: on start it logs the counter it found, then counts into /data/counter.
/// The device root as `$0` lets the harness find (and stop) the container's processes too.
const SCRIPT: &str = "trap 'exit 0' TERM; n=$(cat /data/counter 2>/dev/null || echo 0); \
    echo start $n pid $$; while :; do n=$((n+1)); echo $n > /data/counter; sync; sleep 0.2; done";

/// Stops what crun still runs for this device when the test ends, whatever happened.
struct Containers(PathBuf);

impl Drop for Containers {
    fn drop(&mut self) {
        let root = self.0.display().to_string();
        let listed = std::process::Command::new("crun")
            .args(["--root", &root, "list", "-q"])
            .output();
        for id in listed
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
        {
            let _ = std::process::Command::new("crun")
                .args(["--root", &root, "delete", "-f", id])
                .status();
        }
    }
}

fn config(registry: &TestRegistry, snapshot: bool, rollback: u32, password: &str) -> String {
    let snapshots = if snapshot {
        format!(r#"{{"id": "{S1}", "type": "immediate"}}"#)
    } else {
        String::new()
    };
    let ca = serde_json::to_string(registry.ca_pem()).unwrap();
    format!(
        r#"{{
  "datastores": [{{"id": "{DS}", "ds_type": "container_registry",
                   "fqdn": "docker://{host}", "dpath": "cairn", "ds_cert_pem": [{ca}],
                   "api_key": "{user}", "password": "{password}"}}],
  "content_trees": [{{"uuid": "{TREE}", "ds_id": "{DS}", "url": "counter:v1",
                      "format": "container", "sha256": ""}}],
  "apps": [{{
    "uuid": "{APP}", "version": "1", "display_name": "counter",
    "volume_refs": [{{"uuid": "{ROOT_VOL}"}}, {{"uuid": "{DATA_VOL}", "mount_dir": "/data"}}],
    "snapshot": {{"max_snapshots": 2, "active_snapshot": "{S1}", "rollback_counter": {rollback},
                  "snapshots": [{snapshots}]}},
    "domain": {{"kind": "container", "memory_mib": 64, "cpus": 1}}
  }}],
  "volumes": [{{"uuid": "{ROOT_VOL}", "format": "dir", "content_tree": "{TREE}"}},
              {{"uuid": "{DATA_VOL}", "format": "dir"}}]
}}"#,
        host = registry.host(),
        user = registry.user(),
    )
}

fn id(text: &str) -> Uuid {
    text.parse().unwrap()
}

fn settled(s: &AppInstanceStatus, snapshots: &[&str]) -> bool {
    s.activated
        && s.snap_status.requested_snapshots.is_empty()
        && s.snap_status.snapshots_to_be_deleted.is_empty()
        && s.snap_status
            .available_snapshots
            .iter()
            .map(|a| a.snapshot.snapshot_id)
            .collect::<BTreeSet<_>>()
            == snapshots.iter().map(|s| id(s)).collect()
}

fn counter(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("counter"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// The counters the container found at each start, from its log.
fn starts(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("start "))
        .filter_map(|n| n.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A registry with the counter image running `script`, and a device running it as a container
/// app that has counted to 3 (the domain-manager's stop timeout `stop_timeout` seconds).
async fn counting_container(
    script: &str,
    stop_timeout: &str,
) -> (Device, Containers, TestRegistry, PathBuf, PathBuf) {
    let mut device = Device::new();
    device.set_agent_env("domain-manager", "CAIRN_DOMAIN_STOP_TIMEOUT", stop_timeout);
    let containers = Containers(device.run_dir().join("domain-manager/oci"));
    let marker = device.root.path().display().to_string();
    let registry = TestRegistry::start(&device.root.path().join("registry")).unwrap();
    let image = busybox_image(&device.root.path().join("image"), "v1").unwrap();
    image
        .config(&[
            "--config.entrypoint=/bin/sh",
            "--config.cmd=-c",
            &format!("--config.cmd={script}"),
            &format!("--config.cmd={marker}"),
        ])
        .unwrap();
    registry.push(&image, "cairn/counter:v1").unwrap();
    let password = registry.password().to_string();
    device.write_config(&config(&registry, false, 0, &password));
    device.start_all();
    let data = device.dir_volume(id(DATA_VOL), 0);
    device
        .until(SETTLE, "the container counts into its data volume", || {
            counter(&data) >= 3
        })
        .await;
    let status = device
        .app_status(SETTLE, |s| settled(s, &[]))
        .await
        .unwrap();
    assert!(status.error.error.is_empty(), "{:?}", status.error);
    let log = device
        .run_dir()
        .join("domain-manager/apps")
        .join(APP)
        .join("app.log");
    (device, containers, registry, data, log)
}

/// The init processes (PID 1 of their PID namespace) of this device's containers (the device
/// root is their `$0`); a shell's short-lived forks are not counted.
fn container_processes(device: &Device) -> Vec<u32> {
    let marker = device.root.path().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let init = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ids| ids.split_whitespace().last() == Some("1"));
            init && text.starts_with("/bin/sh\0-c\0") && text.contains(&marker)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_from_a_registry_counts_into_its_volume_and_rolls_back_to_its_snapshot() {
    let (device, _containers, registry, data, log) = counting_container(SCRIPT, "30").await;
    let password = registry.password().to_string();
    assert_eq!(starts(&log), vec![0], "one start, on an empty data volume");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("start 0 pid 1\n"),
        "the container is PID 1 of its own PID namespace: {text}"
    );
    // Its limits are its cgroup's (cgroup v1 here; crun puts it under /cairn/<id>).
    let listed = std::process::Command::new("crun")
        .arg("--root")
        .arg(device.run_dir().join("domain-manager/oci"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&listed.stdout).into_owned();
    let container = ids
        .lines()
        .next()
        .unwrap_or_else(|| panic!("crun runs no container"));
    let limit = ["/sys/fs/cgroup/memory/cairn", "/sys/fs/cgroup/cairn"]
        .iter()
        .find_map(|base| {
            let dir = Path::new(base).join(container);
            std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                .ok()
        })
        .unwrap_or_else(|| panic!("no memory cgroup for {container}"));
    assert_eq!(limit.trim(), (64u64 << 20).to_string(), "memory_mib 64");

    // A stopped snapshot: the container is stopped (SIGTERM), both volumes are taken, it
    // starts again.
    device.write_config(&config(&registry, true, 0, &password));
    device
        .app_status(SETTLE, |s| settled(s, &[S1]))
        .await
        .unwrap();
    let at_snapshot = counter(
        &cairn_types::layout::volumes_dir(&device.persist_dir())
            .join(".snapshots")
            .join(cairn_types::volume_key(id(DATA_VOL), 0))
            .join(S1),
    );
    assert!(
        at_snapshot >= 3,
        "the snapshot holds the counter ({at_snapshot})"
    );
    device
        .until(SETTLE, "the container counts on past the snapshot", || {
            counter(&data) > at_snapshot + 3
        })
        .await;
    assert_eq!(starts(&log).len(), 2, "started again after the snapshot");

    // Rollback: the container starts on the snapshot's counter.
    device.write_config(&config(&registry, true, 1, &password));
    device
        .until(SETTLE, "the container started after the rollback", || {
            starts(&log).len() == 3
        })
        .await;
    assert_eq!(
        starts(&log)[2],
        at_snapshot,
        "after the rollback the container found the snapshot's counter"
    );
    device
        .app_status(SETTLE, |s| settled(s, &[S1]))
        .await
        .unwrap();
}

/// A container that ignores SIGTERM (PID 1 of its namespace without a handler) is stopped for a
/// snapshot all the same: crun is SIGKILLed after the stop timeout, the container's own
/// processes (marked) are swept, the snapshot is taken and exactly one container runs after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_ignoring_sigterm_is_killed_for_a_stopped_snapshot_and_runs_once_after() {
    let stubborn = SCRIPT.replace("trap 'exit 0' TERM; ", "");
    let (device, _containers, registry, data, log) = counting_container(&stubborn, "2").await;
    let password = registry.password().to_string();
    device.write_config(&config(&registry, true, 0, &password));
    device
        .app_status(SETTLE, |s| settled(s, &[S1]))
        .await
        .unwrap();
    let at_snapshot = counter(
        &cairn_types::layout::volumes_dir(&device.persist_dir())
            .join(".snapshots")
            .join(cairn_types::volume_key(id(DATA_VOL), 0))
            .join(S1),
    );
    device
        .until(SETTLE, "the container counts on after the snapshot", || {
            starts(&log).len() == 2 && counter(&data) > at_snapshot + 2
        })
        .await;
    assert_eq!(
        starts(&log)[1],
        at_snapshot,
        "the counter did not move between the kill and the snapshot"
    );
    let running = container_processes(&device);
    assert_eq!(running.len(), 1, "one container process runs: {running:?}");
}

/// Figure (by hand: `cargo nextest run -p cairn-e2e --test containers --run-ignored only
/// --no-capture`): an image with a 64 MiB layer, from the config written to its root volume in
/// place (downloader pull + volume-manager unpack), against `skopeo copy` + `umoci unpack` of
/// the same image from the same registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a figure, not a check"]
async fn figure_pull_and_unpack_against_skopeo_and_umoci() {
    let mut device = Device::new();
    let registry = TestRegistry::start(&device.root.path().join("registry")).unwrap();
    let image = busybox_image(&device.root.path().join("image"), "v1").unwrap();
    image
        .layer(|r| {
            let mut data = vec![0u8; 64 << 20];
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(r.join("big"), data)?;
            Ok(())
        })
        .unwrap();
    image
        .config(&[
            "--config.entrypoint=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=sleep 1",
        ])
        .unwrap();
    registry.push(&image, "cairn/counter:v1").unwrap();
    let password = registry.password().to_string();
    // Only the content tree and the root volume: no app.
    let full = config(&registry, false, 0, &password);
    let mut value: serde_json::Value = serde_json::from_str(&full).unwrap();
    value["apps"] = serde_json::json!([]);
    value["volumes"] = serde_json::json!([value["volumes"][0].clone()]);
    let started = std::time::Instant::now();
    device.write_config(&value.to_string());
    device.start_all();
    let root = device.dir_volume(id(ROOT_VOL), 0);
    device
        .until(Duration::from_secs(600), "the root volume is made", || {
            root.join("image-manifest").exists()
        })
        .await;
    let cairn = started.elapsed();
    let unpack_ms = std::fs::read_to_string(device.agent_log("volume-manager"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("unpacked from a container image"))
        .and_then(|l| l.split("elapsed_ms=").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or("?")
        .to_string();

    let reference = device.root.path().join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let started = std::time::Instant::now();
    cairn_test_controller::registry::run(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-cert-dir",
            &device
                .root
                .path()
                .join("registry/certs.d")
                .display()
                .to_string(),
            "--src-creds",
            &format!("{}:{password}", registry.user()),
            &format!("docker://{}/cairn/counter:v1", registry.host()),
            &format!("oci:{}:v1", reference.join("layout").display()),
        ],
    )
    .unwrap();
    cairn_test_controller::registry::run(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:v1", reference.join("layout").display()),
            &reference.join("bundle").display().to_string(),
        ],
    )
    .unwrap();
    let tools = started.elapsed();
    println!(
        "figure: 64 MiB image, pull + unpack: cairn {cairn:.2?} (agents' start included; unpack {unpack_ms} ms), skopeo copy + umoci unpack {tools:.2?}, ratio {:.2}",
        cairn.as_secs_f64() / tools.as_secs_f64()
    );
}

/// The domain-manager SIGKILLed while the container runs: the next one adopts it (crun found
/// by its marker), never starts a second one, and the container keeps counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_is_adopted_by_a_restarted_domain_manager_not_started_again() {
    let (mut device, _containers, _registry, data, log) = counting_container(SCRIPT, "30").await;
    let before = container_processes(&device);
    assert_eq!(before.len(), 1, "{before:?}");
    device.kill("domain-manager");
    device.start("domain-manager", None);
    let agent_log = device.agent_log("domain-manager");
    device
        .until(
            SETTLE,
            "the restarted domain-manager adopts the container",
            || {
                std::fs::read_to_string(&agent_log)
                    .unwrap_or_default()
                    .contains("re-adopted running domain")
            },
        )
        .await;
    let at = counter(&data);
    device
        .until(SETTLE, "the adopted container counts on", || {
            counter(&data) > at + 2
        })
        .await;
    assert_eq!(starts(&log).len(), 1, "never started a second time");
    assert_eq!(
        container_processes(&device),
        before,
        "the same container runs"
    );
}

/// A stock EVE controller's container app: a `DsContainerRegistry` datastore with `apiKey`,
/// `password` and `dsCertPEM`, a content tree of format CONTAINER named by tag (no sha256),
/// a volume downloaded from it (`VCOT_DOWNLOAD`, no Cairn format), and an app in
/// `virtualizationMode` NOHYPER whose `userData` is its environment. It runs (ZInfoApp
/// RUNNING) and the tree reports the manifest digest the tag resolved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nohyper_app_from_a_stock_eve_controller_runs_as_a_container() {
    use base64::Engine;
    use cairn_config_agent::proto::{
        self, AppInstanceConfig as ProtoApp, ContentTree, DatastoreConfig, EdgeDevConfig,
        UuidAndVersion, VmConfig, VmMode, Volume, VolumeContentOrigin, VolumeContentOriginType,
        VolumeRef,
    };
    const SERIAL: &str = "CAIRN-CONTAINER-0001";
    let controller = cairn_test_controller::TestController::start()
        .await
        .unwrap();
    let mut device = Device::new();
    let _containers = Containers(device.run_dir().join("domain-manager/oci"));
    let marker = device.root.path().display().to_string();
    let registry = TestRegistry::start(&device.root.path().join("registry")).unwrap();
    let image = busybox_image(&device.root.path().join("image"), "v1").unwrap();
    image
        .config(&[
            "--config.entrypoint=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=trap 'exit 0' TERM; echo greeting $GREETING; while :; do sleep 0.2; done",
            &format!("--config.cmd={marker}"),
        ])
        .unwrap();
    let digest = registry.push(&image, "cairn/counter:v1").unwrap();
    let config = EdgeDevConfig {
        datastores: vec![DatastoreConfig {
            id: DS.into(),
            d_type: proto::DsType::DsContainerRegistry as i32,
            fqdn: format!("docker://{}", registry.host()),
            dpath: "cairn".into(),
            api_key: registry.user().into(),
            password: registry.password().into(),
            ds_cert_pem: vec![registry.ca_pem().as_bytes().to_vec()],
            ..Default::default()
        }],
        content_info: vec![ContentTree {
            uuid: TREE.into(),
            ds_id: DS.into(),
            url: "counter:v1".into(),
            iformat: proto::Format::Container as i32,
            display_name: "counter-image".into(),
            ..Default::default()
        }],
        volumes: vec![Volume {
            uuid: ROOT_VOL.into(),
            display_name: "counter-root".into(),
            origin: Some(VolumeContentOrigin {
                r#type: VolumeContentOriginType::VcotDownload as i32,
                download_content_tree_id: TREE.into(),
            }),
            ..Default::default()
        }],
        apps: vec![ProtoApp {
            uuidandversion: Some(UuidAndVersion {
                uuid: APP.into(),
                version: "1".into(),
            }),
            displayname: "counter".into(),
            activate: true,
            fixedresources: Some(VmConfig {
                memory: 64 * 1024,
                vcpus: 1,
                virtualization_mode: VmMode::Nohyper as i32,
                ..Default::default()
            }),
            volume_ref_list: vec![VolumeRef {
                uuid: ROOT_VOL.into(),
                ..Default::default()
            }],
            user_data: base64::engine::general_purpose::STANDARD.encode("GREETING=from-eve\n"),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(["--config-interval-ms", "200", "--retry-ms", "100"].map(String::from));
    device.follow_controller(args);
    controller.set_config(SERIAL, config);
    device.start_all();
    let seen = controller
        .wait_for(SERIAL, SETTLE, "the container app RUNNING", |d| {
            d.apps()
                .get(APP)
                .is_some_and(|a| a.state == proto::ZSwState::Running as i32)
        })
        .await
        .unwrap();
    assert!(
        seen.apps()[APP].app_err.is_empty(),
        "{:?}",
        seen.apps()[APP].app_err
    );
    let log = device
        .run_dir()
        .join("domain-manager/apps")
        .join(APP)
        .join("app.log");
    device
        .until(SETTLE, "the container greets with its userData", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("greeting from-eve")
        })
        .await;
    let seen = controller
        .wait_for(SERIAL, SETTLE, "the tree DELIVERED", |d| {
            d.content_trees()
                .get(TREE)
                .is_some_and(|t| t.state == proto::ZSwState::Delivered as i32)
        })
        .await
        .unwrap();
    assert_eq!(
        seen.content_trees()[TREE].sha256,
        digest.trim_start_matches("sha256:"),
        "the tag's manifest digest is reported"
    );
}

/// Issue 21 item 3: an image update (version 2 on a new content tree and a new generation of
/// the root volume) with an APP_UPDATE snapshot, then a rollback: the container runs the old
/// image again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_update_rolls_back_to_the_old_image() {
    const TREE2: &str = "c21c0000-0000-4000-8000-00000000c002";
    let mut device = Device::new();
    let _containers = Containers(device.run_dir().join("domain-manager/oci"));
    let marker = device.root.path().display().to_string();
    let registry = TestRegistry::start(&device.root.path().join("registry")).unwrap();
    for tag in ["v1", "v2"] {
        let image = busybox_image(&device.root.path().join(format!("image-{tag}")), tag).unwrap();
        image
            .config(&[
                "--config.entrypoint=/bin/sh",
                "--config.cmd=-c",
                &format!(
                    "--config.cmd=trap 'exit 0' TERM; echo image {tag}; while :; do sleep 0.2; done"
                ),
                &format!("--config.cmd={marker}"),
            ])
            .unwrap();
        registry
            .push(&image, &format!("cairn/counter:{tag}"))
            .unwrap();
    }
    let ca = serde_json::to_string(registry.ca_pem()).unwrap();
    let config = |version: u32, rollback: u32| {
        let (tree, tag) = if version == 1 {
            (TREE, "v1")
        } else {
            (TREE2, "v2")
        };
        let generation = version - 1;
        format!(
            r#"{{
  "datastores": [{{"id": "{DS}", "ds_type": "container_registry",
                   "fqdn": "docker://{host}", "dpath": "cairn", "ds_cert_pem": [{ca}],
                   "api_key": "{user}", "password": "{password}"}}],
  "content_trees": [{{"uuid": "{tree}", "ds_id": "{DS}", "url": "counter:{tag}",
                      "format": "container", "sha256": ""}}],
  "apps": [{{
    "uuid": "{APP}", "version": "{version}", "display_name": "counter",
    "volume_refs": [{{"uuid": "{ROOT_VOL}", "generation_count": {generation}}}],
    "snapshot": {{"max_snapshots": 2, "active_snapshot": "{S1}", "rollback_counter": {rollback},
                  "snapshots": [{{"id": "{S1}", "type": "app_update"}}]}},
    "domain": {{"kind": "container"}}
  }}],
  "volumes": [{{"uuid": "{ROOT_VOL}", "generation_count": {generation}, "format": "dir",
                "content_tree": "{tree}"}}]
}}"#,
            host = registry.host(),
            user = registry.user(),
            password = registry.password(),
        )
    };
    let log = device
        .run_dir()
        .join("domain-manager/apps")
        .join(APP)
        .join("app.log");
    let images = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("image "))
            .map(str::to_string)
            .collect()
    };
    device.write_config(&config(1, 0));
    device.start_all();
    device
        .until(SETTLE, "the container runs image v1", || images() == ["v1"])
        .await;
    // The update: the APP_UPDATE snapshot is taken of version 1, then version 2 runs.
    device.write_config(&config(2, 0));
    device
        .app_status(SETTLE, |s| {
            s.uuid_and_version.version == "2" && settled(s, &[S1])
        })
        .await
        .unwrap();
    device
        .until(SETTLE, "the container runs image v2", || {
            images() == ["v1", "v2"]
        })
        .await;
    // Rollback to S1: the old root volume and config, so the old image.
    device.write_config(&config(2, 1));
    device
        .until(SETTLE, "the container runs image v1 again", || {
            images() == ["v1", "v2", "v1"]
        })
        .await;
    device
        .app_status(SETTLE, |s| settled(s, &[S1]))
        .await
        .unwrap();
}

/// A container over its memory limit: the kernel's OOM killer ends it, and the domain's error
/// says so, with the limit, rather than a bare "killed by signal".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_over_its_memory_limit_is_reported_out_of_memory() {
    let mut device = Device::new();
    let _containers = Containers(device.run_dir().join("domain-manager/oci"));
    let marker = device.root.path().display().to_string();
    let registry = TestRegistry::start(&device.root.path().join("registry")).unwrap();
    let image = busybox_image(&device.root.path().join("image"), "v1").unwrap();
    // The shell (PID 1) holds 200 MB of output in a variable; the limit is 64 MiB.
    image
        .config(&[
            "--config.entrypoint=/bin/sh",
            "--config.cmd=-c",
            "--config.cmd=x=$(/bin/busybox head -c 200000000 /dev/zero | /bin/busybox tr '\\0' a); echo survived; sleep 100",
            &format!("--config.cmd={marker}"),
        ])
        .unwrap();
    registry.push(&image, "cairn/counter:v1").unwrap();
    let password = registry.password().to_string();
    device.write_config(&config(&registry, false, 0, &password));
    device.start_all();
    let broken = device
        .wait_for::<cairn_types::DomainStatus>("domain-manager", SETTLE, |d| {
            d.state == cairn_types::DomainState::Broken && d.error.is_error()
        })
        .await
        .unwrap();
    let text = &broken.error.error;
    assert!(
        text.contains("out of memory") && text.contains("memory limit of 64 MiB"),
        "{text}"
    );
}

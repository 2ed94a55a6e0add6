//! Content trees from a stock EVE controller (issue 18): a config with EVE's fields only
//! (`datastores`, `contentInfo`, volumes with `VCOT_DOWNLOAD`), served over real HTTPS by a
//! datastore with its own CA (`dsCertPEM`). Volumes are made from the verified content; bad
//! content reaches the controller on the content tree (`ZInfoContentTree.err`) and in the
//! app's `appErr`, naming the content tree.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cairn_config_agent::proto::{
    self, AppInstanceConfig as ProtoApp, ContentTree, DatastoreConfig, EdgeDevConfig,
    UuidAndVersion, VmConfig, Volume, VolumeContentOrigin, VolumeContentOriginType, VolumeRef,
};
use cairn_e2e::Device;
use cairn_test_controller::TestController;
use cairn_test_controller::datastore::{DatastoreFault, TestDatastore};
use cairn_types::{ContentTreeStatus, VolumeState, VolumeStatus};

const SERIAL: &str = "CAIRN-EVE-CONTENT-0001";
const STORE: &str = "c0a70000-0000-4000-8000-0000000d5001";
const SETTLE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn id(kind: u32, n: u32) -> String {
    format!("c0a70000-0000-4000-8000-{kind:04x}{n:08x}")
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw disk image of `len` bytes with a pattern a wrong offset would break.
fn raw_image(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ (i >> 9) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn datastore(store: &TestDatastore) -> DatastoreConfig {
    DatastoreConfig {
        id: STORE.into(),
        d_type: proto::DsType::DsHttps as i32,
        fqdn: store.url(),
        dpath: "eve".into(),
        ds_cert_pem: vec![store.ca_pem().as_bytes().to_vec()],
        ..Default::default()
    }
}

fn tree(n: u32, url: &str, format: proto::Format, sha: &str) -> ContentTree {
    ContentTree {
        uuid: id(1, n),
        ds_id: STORE.into(),
        url: url.into(),
        iformat: format as i32,
        sha256: sha.into(),
        max_size_bytes: 64 * MIB,
        display_name: url.into(),
        ..Default::default()
    }
}

fn volume(n: u32, tree: u32) -> Volume {
    Volume {
        uuid: id(2, n),
        origin: Some(VolumeContentOrigin {
            r#type: VolumeContentOriginType::VcotDownload as i32,
            download_content_tree_id: id(1, tree),
        }),
        maxsizebytes: (8 * MIB) as i64,
        display_name: format!("disk-{n}"),
        ..Default::default()
    }
}

/// An app of EVE's fields on volume `n` (its kernel is never needed: the volume never comes).
fn app(n: u32) -> ProtoApp {
    ProtoApp {
        uuidandversion: Some(UuidAndVersion {
            uuid: id(3, n),
            version: "1".into(),
        }),
        displayname: format!("app-{n}"),
        activate: true,
        fixedresources: Some(VmConfig {
            kernel: "/nonexistent/vmlinuz".into(),
            ramdisk: "/nonexistent/initrd".into(),
            memory: 64 * 1024,
            vcpus: 1,
            virtualization_mode: proto::VmMode::Hvm as i32,
            ..Default::default()
        }),
        volume_ref_list: vec![VolumeRef {
            uuid: id(2, n),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn follow(controller: &TestController, config: EdgeDevConfig) -> Device {
    let mut device = Device::new();
    let mut args = controller
        .device_args(&device.root.path().join("setup"), SERIAL)
        .unwrap();
    args.extend(["--config-interval-ms", "200", "--retry-ms", "100"].map(String::from));
    device.follow_controller(args);
    // A stalled datastore is given up on after 1 s, a failed download tried again after 1 s.
    device.set_agent_env("downloader", "CAIRN_DOWNLOAD_STALL_MS", "1000");
    device.set_agent_env("downloader", "CAIRN_DOWNLOAD_RETRY_MS", "1000");
    controller.set_config(SERIAL, config);
    device.start_all();
    device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_volumes_are_made_from_eve_content_trees_raw_and_qcow2_with_their_data() {
    let store = TestDatastore::start(true).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("disk.raw");
    let raw_data = raw_image(&raw, (3 * MIB) as usize);
    let qcow2 = work.path().join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ],
    );
    let qcow2_data = std::fs::read(&qcow2).unwrap();
    store.put("eve/disk.raw", raw_data.clone());
    store.put("eve/disk.qcow2", qcow2_data.clone());
    let config = EdgeDevConfig {
        datastores: vec![datastore(&store)],
        content_info: vec![
            tree(1, "disk.raw", proto::Format::Raw, &sha256(&raw_data)),
            tree(2, "disk.qcow2", proto::Format::Qcow2, &sha256(&qcow2_data)),
        ],
        volumes: vec![volume(1, 1), volume(2, 2)],
        ..Default::default()
    };
    let controller = TestController::start().await.unwrap();
    let device = follow(&controller, config);
    for n in [1, 2] {
        let volume_id = id(2, n);
        let status = device
            .wait_for::<VolumeStatus>("volume-manager", SETTLE, |v| {
                v.volume_id.to_string() == volume_id && v.state != VolumeState::Creating
            })
            .await
            .unwrap_or_else(|e| panic!("volume {n}: {e}\n{}", device.log_tails(30)));
        assert_eq!(status.state, VolumeState::Ready, "{:?}", status.error);
        let file = status.file_location.to_str().unwrap().to_string();
        // The content, then zeros up to maxsizebytes (non-strict compare).
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                &file,
                raw.to_str().unwrap(),
            ],
        );
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", &file])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(8 * MIB),
            "grown to maxsizebytes"
        );
    }
    let trees = device
        .wait_for::<ContentTreeStatus>("downloader", SETTLE, |t| t.is_loaded())
        .await
        .unwrap();
    assert!(trees.file_location.contains("/content/blobs/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_content_reaches_the_controller_on_the_content_tree_and_in_app_err_naming_it() {
    let store = TestDatastore::start(true).await.unwrap();
    let cases: [(&str, Option<DatastoreFault>, &str); 4] = [
        (
            "wrong.raw",
            Some(DatastoreFault::WrongContent),
            "sha256 mismatch",
        ),
        (
            "missing.raw",
            Some(DatastoreFault::NotFound),
            "HTTP 404 Not Found",
        ),
        (
            "stalled.raw",
            Some(DatastoreFault::StallAfter(1000)),
            "no data for",
        ),
        (
            "cut.raw",
            Some(DatastoreFault::TruncateAfter(1000)),
            "bytes announced",
        ),
    ];
    let mut config = EdgeDevConfig {
        datastores: vec![datastore(&store)],
        ..Default::default()
    };
    for (n, (name, fault, _)) in cases.iter().enumerate() {
        let n = n as u32 + 1;
        // Content of its own: trees with one sha256 would share one download.
        let data: Vec<u8> = (0..(2 * MIB) as usize)
            .map(|i| (i % 251) as u8 ^ n as u8)
            .collect();
        let sha = sha256(&data);
        store.put(&format!("eve/{name}"), data);
        store.set_fault(&format!("eve/{name}"), fault.clone());
        config
            .content_info
            .push(tree(n, name, proto::Format::Raw, &sha));
        config.volumes.push(volume(n, n));
        config.apps.push(app(n));
    }
    let controller = TestController::start().await.unwrap();
    let device = follow(&controller, config);
    for (n, (name, _, reason)) in cases.iter().enumerate() {
        let (app, tree) = (id(3, n as u32 + 1), id(1, n as u32 + 1));
        let reported = controller
            .wait_for(
                SERIAL,
                SETTLE,
                &format!("{name}: appErr with {reason}"),
                |d| {
                    d.apps().get(&app).is_some_and(|a| {
                        a.app_err.iter().any(|e| {
                            e.description.contains(&tree) && e.description.contains(reason)
                        })
                    })
                },
            )
            .await;
        let reported = reported.unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(40)));
        let err = &reported.apps()[&app].app_err[0];
        assert_eq!(err.severity, proto::Severity::Error as i32, "{err:?}");
        let volume = format!("volume {}#0: ", id(2, n as u32 + 1));
        assert_eq!(
            err.description.matches(&volume).count(),
            1,
            "the volume is named once: {}",
            err.description
        );
        // The content tree's own report (ZInfoContentTree) carries the fault, never DELIVERED.
        let reported = controller
            .wait_for(
                SERIAL,
                SETTLE,
                &format!("{name}: ZInfoContentTree err with {reason}"),
                |d| {
                    d.content_trees().get(&tree).is_some_and(|t| {
                        t.err
                            .as_ref()
                            .is_some_and(|e| e.description.contains(reason))
                    })
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(40)));
        let info = &reported.content_trees()[&tree];
        assert_ne!(info.state, proto::ZSwState::Delivered as i32, "{info:?}");
        let err = info.err.as_ref().unwrap();
        assert_eq!(err.severity, proto::Severity::Error as i32, "{err:?}");
        assert!(err.timestamp.is_some(), "{err:?}");
    }
    let blobs = std::fs::read_dir(device.persist_dir().join("content/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "nothing unverified is ever in the store");
}

/// EVE recreates a purged volume from its content tree: here the fresh volume (a new local
/// generation) is made again from the blob in the store, not downloaded again, and holds the
/// content, not what the app wrote. The config comes from the local file (its content tree
/// and datastore in the file's own style).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_volume_is_made_again_from_its_content_tree_without_a_new_download() {
    let store = TestDatastore::start(false).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("base.raw");
    let data = raw_image(&raw, (2 * MIB) as usize);
    store.put("base.raw", data.clone());
    let (app, volume, tree) = (id(3, 9), id(2, 9), id(1, 9));
    let mut device = Device::new();
    let root = device.root.path().display().to_string();
    let config = |purge: u32| {
        format!(
            r#"{{
  "datastores": [{{"id": "{STORE}", "ds_type": "http", "fqdn": "{url}"}}],
  "content_trees": [{{"uuid": "{tree}", "ds_id": "{STORE}", "url": "base.raw", "format": "raw",
                      "sha256": "{sha}", "display_name": "base"}}],
  "volumes": [{{"uuid": "{volume}", "format": "qcow2", "max_size_bytes": {size},
                "content_tree": "{tree}"}}],
  "apps": [{{"uuid": "{app}", "version": "1", "purge": {purge},
             "volume_refs": [{{"uuid": "{volume}"}}],
             "domain": {{"kind": "process", "command": "/bin/sh",
                         "args": ["-c", "while :; do sleep 1; done", "{marker}"]}}}}]
}}"#,
            url = store.url(),
            sha = sha256(&data),
            size = 4 * MIB,
            // The device's root on the app's command line: the harness stops it at the end.
            marker = root,
        )
    };
    device.write_config(&config(0));
    device.start_all();
    let ready = |local: i64| {
        let volume = volume.clone();
        move |v: &VolumeStatus| {
            v.volume_id.to_string() == volume
                && v.local_generation_counter == local
                && v.state == VolumeState::Ready
        }
    };
    let first = device
        .wait_for::<VolumeStatus>("volume-manager", SETTLE, ready(0))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(30)));
    let file = first.file_location.to_str().unwrap().to_string();
    // The app's writes: the volume no longer equals its content.
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", &file],
    );
    let differs = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &file,
            raw.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(!differs.success(), "the write changed the volume");

    device.write_config(&config(1));
    let fresh = device
        .wait_for::<VolumeStatus>("volume-manager", SETTLE, ready(1))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", device.log_tails(30)));
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            fresh.file_location.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(
        store.seen().len(),
        1,
        "made from the stored blob, not downloaded again: {:?}",
        store.seen()
    );
}

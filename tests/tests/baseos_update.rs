//! Base OS updates driven like EVE: the controller's `baseos` block (EVE's fields only) names
//! a content tree on its HTTPS datastore; the downloader fetches and checks it by sha256, the
//! baseos-manager verifies the bundle's signature, writes it into the other slot, marks the
//! slot for trial and reboots (a command here, observed by the test), and the controller reads
//! both slots in `ZInfoDevice.swList` with EVE's states. The boot disk's partitions are files
//! (`<disk>1` the boot state, `<disk>2` slot A, `<disk>3` slot B).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_baseos_manager::bootstate::{BootState, SECTOR, Slot};
use cairn_baseos_manager::bundle::{self, SigningKey};
use cairn_config_agent::proto::{self, EdgeDevConfig, ZInfoDevSw};
use cairn_e2e::Device;
use cairn_test_controller::TestController;
use cairn_test_controller::baseos::{BundleOffer, offer_bundle};
use cairn_test_controller::datastore::TestDatastore;

const SERIAL: &str = "CAIRN-BASEOS-0001";
const STORE: &str = "ba5e0000-0000-4000-8000-00000000d501";
const TREE: &str = "ba5e0000-0000-4000-8000-0000000b0001";
const WITHIN: Duration = Duration::from_secs(60);
const SLOT_BYTES: usize = 4 << 20;
/// What slot B holds before the update (an older image): a refused update leaves it.
const OLD_BYTE: u8 = 0x5a;

struct Rig {
    device: Device,
    work: tempfile::TempDir,
    key: SigningKey,
    disk: PathBuf,
    root: Vec<u8>,
}

impl Rig {
    /// A device running slot A (version 1.0) of a boot disk of files, its update key, and a
    /// reboot command that appends a line to `rebooted`.
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let key_path = work.path().join("signing.pem");
        std::fs::write(&key_path, SigningKey::generate_pem().unwrap()).unwrap();
        let key = SigningKey::load(&key_path).unwrap();
        let pubkey = work.path().join("update-key.pub");
        std::fs::write(&pubkey, key.public_key().to_hex()).unwrap();
        let release = work.path().join("release");
        std::fs::write(&release, "NAME=\"Cairn device image\"\nVERSION=1.0\n").unwrap();
        let disk = work.path().join("disk");
        let mut sectors = vec![0u8; 2 * SECTOR];
        sectors[SECTOR..].copy_from_slice(&BootState::initial().encode());
        std::fs::write(part(&disk, 1), sectors).unwrap();
        std::fs::write(part(&disk, 2), vec![0x11; SLOT_BYTES]).unwrap();
        std::fs::write(part(&disk, 3), vec![OLD_BYTE; SLOT_BYTES]).unwrap();
        let root: Vec<u8> = (0..1_500_000usize)
            .map(|i| (i * 13 + i / 509) as u8)
            .collect();
        let mut device = Device::new();
        let rebooted = work.path().join("rebooted");
        for (key, value) in [
            ("CAIRN_BOOT_DISK", disk.to_str().unwrap()),
            ("CAIRN_BOOT_SLOT", "A"),
            ("CAIRN_BOOT_MODE", "committed"),
            ("CAIRN_UPDATE_KEY", pubkey.to_str().unwrap()),
            ("CAIRN_RELEASE_FILE", release.to_str().unwrap()),
            (
                "CAIRN_REBOOT_COMMAND",
                &format!("echo reboot >> {}", rebooted.display()),
            ),
        ] {
            device.set_agent_env("baseos-manager", key, value);
        }
        device.set_agent_env("downloader", "CAIRN_DOWNLOAD_RETRY_MS", "1000");
        Rig {
            device,
            work,
            key,
            disk,
            root,
        }
    }

    /// A bundle of this rig's root image as `version`, signed with `key`.
    fn bundle(&self, key: &SigningKey, version: &str) -> Vec<u8> {
        let root = self.work.path().join("root.squashfs");
        let manifest = self.work.path().join("manifest.txt");
        std::fs::write(&root, &self.root).unwrap();
        std::fs::write(&manifest, format!("Cairn device image {version}\n")).unwrap();
        let out = self.work.path().join(format!("update-{version}.bundle"));
        bundle::create(key, version, 42, &manifest, &root, &out).unwrap();
        std::fs::read(&out).unwrap()
    }

    fn follow(&mut self, controller: &TestController) {
        let mut args = controller
            .device_args(&self.device.root.path().join("setup"), SERIAL)
            .unwrap();
        args.extend(["--config-interval-ms", "200"].map(String::from));
        self.device.follow_controller(args);
        for agent in ["config-agent", "downloader", "baseos-manager"] {
            self.device.start(agent, None);
        }
    }

    fn reboots(&self) -> usize {
        std::fs::read_to_string(self.work.path().join("rebooted"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn state(&self) -> BootState {
        BootState::read(&part(&self.disk, 1)).unwrap()
    }

    fn slot_b(&self) -> Vec<u8> {
        std::fs::read(part(&self.disk, 3)).unwrap()
    }

    fn slot_b_holds_the_root(&self) -> bool {
        self.slot_b()[..self.root.len()] == self.root[..]
    }

    fn slot_b_untouched(&self) -> bool {
        self.slot_b().iter().all(|b| *b == OLD_BYTE)
    }
}

fn part(disk: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}{n}", disk.display()))
}

fn offer(version: &str, activate: bool, counter: u32) -> BundleOffer {
    BundleOffer {
        datastore_id: STORE.into(),
        content_tree_id: TREE.into(),
        name: format!("cairn-{version}.bundle"),
        version: version.into(),
        activate,
        retry_counter: counter,
        sha256: None,
    }
}

/// The controller's config becomes EVE's `baseos` block offering `bundle` on `store`, and
/// nothing else.
fn offer_to(
    controller: &TestController,
    store: &TestDatastore,
    offer: &BundleOffer,
    bundle: &[u8],
) {
    controller.set_config(
        SERIAL,
        offer_bundle(store, offer, bundle, EdgeDevConfig::default()),
    );
}

/// The newest `swList` the controller has, once `done` holds for it.
async fn sw_list(
    controller: &TestController,
    rig: &Rig,
    what: &str,
    done: impl Fn(&[ZInfoDevSw]) -> bool,
) -> Vec<ZInfoDevSw> {
    match controller
        .wait_for(SERIAL, WITHIN, what, |d| {
            d.device_info().is_some_and(|i| done(&i.sw_list))
        })
        .await
    {
        Ok(seen) => seen.device_info().unwrap().sw_list,
        Err(e) => panic!(
            "{e}\nlast swList: {:#?}\n{}",
            controller
                .device(SERIAL)
                .and_then(|d| d.device_info())
                .map(|i| i.sw_list),
            rig.device.log_tails(30)
        ),
    }
}

fn entry<'a>(list: &'a [ZInfoDevSw], label: &str) -> Option<&'a ZInfoDevSw> {
    list.iter().find(|s| s.partition_label == label)
}

fn user(status: proto::BaseOsStatus) -> i32 {
    status as i32
}

/// The update as EVE's controller sees it after `activate`: slot B `updating` with the new
/// version, INSTALLED, "About to reboot"; slot A still the active, UPDATED one.
fn installed_and_rebooting(list: &[ZInfoDevSw]) -> bool {
    let (Some(a), Some(b)) = (entry(list, "IMGA"), entry(list, "IMGB")) else {
        return false;
    };
    a.activated
        && a.partition_state == "active"
        && a.user_status == user(proto::BaseOsStatus::Updated)
        && !b.activated
        && b.partition_state == "updating"
        && b.short_version == "2.0"
        && b.status == proto::ZSwState::Installed as i32
        && b.user_status == user(proto::BaseOsStatus::Updating)
        && b.sub_status == proto::BaseOsSubStatus::UpdateRebooting as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activated_baseos_is_downloaded_verified_installed_into_the_other_slot_and_rebooted_into()
 {
    let store = TestDatastore::start(true).await.unwrap();
    let controller = TestController::start().await.unwrap();
    let mut rig = Rig::new();
    let bundle = rig.bundle(&rig.key, "2.0");
    offer_to(&controller, &store, &offer("2.0", true, 0), &bundle);
    rig.follow(&controller);

    let list = sw_list(&controller, &rig, "slot B updating, about to reboot", |l| {
        installed_and_rebooting(l)
    })
    .await;
    assert_eq!(
        list[0].partition_label, "IMGA",
        "the running slot first, as EVE"
    );
    assert!(rig.slot_b_holds_the_root());
    let state = rig.state();
    assert_eq!(
        (state.committed, state.trial, state.tries),
        (Slot::A, Some(Slot::B), 1)
    );
    rig.device
        .until(WITHIN, "the reboot command ran", || rig.reboots() == 1)
        .await;
    // Fetched once, from the content tree's datastore.
    let gets = store
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("cairn-2.0.bundle") && s.status < 300)
        .count();
    assert_eq!(gets, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_signed_by_another_key_is_refused_in_swerr_and_nothing_is_written() {
    let store = TestDatastore::start(true).await.unwrap();
    let controller = TestController::start().await.unwrap();
    let mut rig = Rig::new();
    let stranger_path = rig.work.path().join("stranger.pem");
    std::fs::write(&stranger_path, SigningKey::generate_pem().unwrap()).unwrap();
    let stranger = SigningKey::load(&stranger_path).unwrap();
    let bundle = rig.bundle(&stranger, "2.0");
    let before = rig.state();
    offer_to(&controller, &store, &offer("2.0", true, 0), &bundle);
    rig.follow(&controller);

    let list = sw_list(&controller, &rig, "the refusal in swErr", |l| {
        l.iter().any(|s| {
            s.sw_err
                .as_ref()
                .is_some_and(|e| e.description.contains("signature does not verify"))
        })
    })
    .await;
    let refused = list
        .iter()
        .find(|s| s.sw_err.is_some() && s.short_version == "2.0")
        .unwrap();
    assert_eq!(refused.user_status, user(proto::BaseOsStatus::Failed));
    assert!(
        refused.partition_label.is_empty(),
        "no slot was assigned: {refused:?}"
    );
    let error = &refused.sw_err.as_ref().unwrap().description;
    assert!(
        error.contains(TREE) && error.contains("/content/blobs/"),
        "{error}"
    );
    assert!(rig.slot_b_untouched());
    assert_eq!(rig.state(), before);
    assert_eq!(rig.reboots(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_whose_sha256_is_not_the_content_trees_is_refused_in_swerr_and_nothing_is_written()
{
    let store = TestDatastore::start(true).await.unwrap();
    let controller = TestController::start().await.unwrap();
    let mut rig = Rig::new();
    let bundle = rig.bundle(&rig.key, "2.0");
    let before = rig.state();
    let wrong = BundleOffer {
        sha256: Some("ab".repeat(32)),
        ..offer("2.0", true, 0)
    };
    offer_to(&controller, &store, &wrong, &bundle);
    rig.follow(&controller);

    let list = sw_list(&controller, &rig, "the sha256 refusal in swErr", |l| {
        l.iter().any(|s| {
            s.sw_err
                .as_ref()
                .is_some_and(|e| e.description.contains("sha256"))
        })
    })
    .await;
    let refused = list.iter().find(|s| s.sw_err.is_some()).unwrap();
    assert_eq!(refused.user_status, user(proto::BaseOsStatus::Failed));
    assert_eq!(refused.short_version, "2.0");
    assert!(rig.slot_b_untouched());
    assert_eq!(rig.state(), before);
    assert_eq!(rig.reboots(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_false_downloads_and_verifies_but_installs_only_once_activated() {
    let store = TestDatastore::start(true).await.unwrap();
    let controller = TestController::start().await.unwrap();
    let mut rig = Rig::new();
    let bundle = rig.bundle(&rig.key, "2.0");
    let before = rig.state();
    offer_to(&controller, &store, &offer("2.0", false, 0), &bundle);
    rig.follow(&controller);

    let list = sw_list(&controller, &rig, "downloaded and verified", |l| {
        l.iter().any(|s| s.sub_status_str.contains("verified"))
    })
    .await;
    // EVE's entry for a BaseOsStatus with no partition: LOADED as DELIVERED, not activated.
    let pending = list.iter().find(|s| s.short_version == "2.0").unwrap();
    assert!(pending.partition_label.is_empty(), "{pending:?}");
    assert_eq!(pending.status, proto::ZSwState::Delivered as i32);
    assert_eq!(pending.user_status, user(proto::BaseOsStatus::None));
    assert!(pending.sw_err.is_none(), "{pending:?}");
    assert_eq!(entry(&list, "IMGB").unwrap().partition_state, "unused");
    assert!(rig.slot_b_untouched());
    assert_eq!(rig.state(), before);
    assert_eq!(rig.reboots(), 0);

    // Activated: installed from the bundle already in the content store.
    offer_to(&controller, &store, &offer("2.0", true, 0), &bundle);
    sw_list(
        &controller,
        &rig,
        "installed once activated",
        installed_and_rebooting,
    )
    .await;
    assert!(rig.slot_b_holds_the_root());
    let gets = store
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("cairn-2.0.bundle") && s.status < 300)
        .count();
    assert_eq!(gets, 1, "not downloaded again");
}

/// The trial boot of slot B failed (the initramfs took its last try and fell back to A): the
/// device reports the failure and does nothing until the controller changes `retry_update`'s
/// counter, then marks slot B for one more trial boot and reboots into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_retry_update_counter_retries_an_update_whose_trial_failed() {
    let store = TestDatastore::start(true).await.unwrap();
    let controller = TestController::start().await.unwrap();
    let mut rig = Rig::new();
    let bundle = rig.bundle(&rig.key, "2.0");
    offer_to(&controller, &store, &offer("2.0", true, 3), &bundle);
    rig.follow(&controller);
    sw_list(&controller, &rig, "installed", installed_and_rebooting).await;
    rig.device
        .until(WITHIN, "the reboot command ran", || rig.reboots() == 1)
        .await;

    // What the device goes through: slot B's trial boot never commits, the selector marks it
    // failed and boots A again (mode fallback).
    rig.device.kill("baseos-manager");
    let state = rig.state();
    let state_file = part(&rig.disk, 1);
    state
        .mark_trial(Slot::B, 0)
        .fail_trial(Slot::B)
        .write_next(&state_file, state.seq)
        .unwrap();
    rig.device
        .set_agent_env("baseos-manager", "CAIRN_BOOT_MODE", "fallback");
    rig.device.start("baseos-manager", None);
    let list = sw_list(&controller, &rig, "slot B failed", |l| {
        entry(l, "IMGB").is_some_and(|b| {
            b.user_status == user(proto::BaseOsStatus::Failed)
                && b.sw_err
                    .as_ref()
                    .is_some_and(|e| e.description.contains("retry_update"))
        })
    })
    .await;
    assert_eq!(entry(&list, "IMGB").unwrap().partition_state, "unused");
    // The same counter: nothing is tried again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.state().trial, None);
    assert_eq!(rig.reboots(), 1);

    offer_to(&controller, &store, &offer("2.0", true, 4), &bundle);
    sw_list(
        &controller,
        &rig,
        "slot B on trial again",
        installed_and_rebooting,
    )
    .await;
    let state = rig.state();
    assert_eq!(
        (state.committed, state.trial, state.tries, state.failed),
        (Slot::A, Some(Slot::B), 1, None)
    );
    rig.device
        .until(WITHIN, "rebooted into slot B again", || rig.reboots() == 2)
        .await;
    assert!(rig.slot_b_holds_the_root());
}

/// The baseos-manager SIGKILLed with half the slot written, and again right after the trial
/// mark: each restart converges on the installed slot marked for trial, the first by writing
/// the slot again from its start, the second without writing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseos_manager_killed_mid_install_converges_after_a_restart() {
    for point in ["slot-half-written", "after-trial-mark"] {
        let store = TestDatastore::start(true).await.unwrap();
        let controller = TestController::start().await.unwrap();
        let mut rig = Rig::new();
        let bundle = rig.bundle(&rig.key, "2.0");
        offer_to(&controller, &store, &offer("2.0", true, 0), &bundle);
        let mut args = controller
            .device_args(&rig.device.root.path().join("setup"), SERIAL)
            .unwrap();
        args.extend(["--config-interval-ms", "200"].map(String::from));
        rig.device.follow_controller(args);
        rig.device.start("config-agent", None);
        rig.device.start("downloader", None);
        rig.device
            .start("baseos-manager", Some(&format!("baseos-manager:{point}")));
        assert!(
            rig.device.died_within("baseos-manager", WITHIN),
            "{point}: no kill\n{}",
            rig.device.log_tails(30)
        );
        let state = rig.state();
        let slot_file = part(&rig.disk, 3);
        let written_at = std::fs::metadata(&slot_file).unwrap().modified().unwrap();
        match point {
            "slot-half-written" => {
                assert_eq!(state.trial, None, "a half-written slot is never marked");
                assert!(!rig.slot_b_holds_the_root() && !rig.slot_b_untouched());
            }
            _ => assert_eq!(state.trial, Some(Slot::B)),
        }
        assert_eq!(rig.reboots(), 0);

        rig.device.start("baseos-manager", None);
        sw_list(&controller, &rig, "converged", installed_and_rebooting).await;
        rig.device
            .until(WITHIN, "the reboot command ran", || rig.reboots() == 1)
            .await;
        assert!(rig.slot_b_holds_the_root(), "{point}");
        let state = rig.state();
        assert_eq!(
            (state.committed, state.trial, state.tries),
            (Slot::A, Some(Slot::B), 1),
            "{point}"
        );
        let now = std::fs::metadata(&slot_file).unwrap().modified().unwrap();
        if point == "after-trial-mark" {
            assert_eq!(now, written_at, "the finished install is not written again");
        } else {
            assert!(now > written_at, "the half-written slot is written again");
        }
    }
}

/// The local file's `baseos` is EVE's `BaseOS` in protobuf's JSON form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_config_file_updates_the_base_os_with_eves_json_fields() {
    let store = TestDatastore::start(true).await.unwrap();
    let mut rig = Rig::new();
    let bundle = rig.bundle(&rig.key, "2.0");
    store.put("eve/cairn-2.0.bundle", bundle.clone());
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bundle)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let config = serde_json::json!({
        "apps": [],
        "volumes": [],
        "datastores": [{
            "id": STORE, "ds_type": "https", "fqdn": store.url(), "dpath": "eve",
            "ds_cert_pem": [store.ca_pem()],
        }],
        "content_trees": [{
            "uuid": TREE, "ds_id": STORE, "url": "cairn-2.0.bundle", "format": "raw",
            "sha256": sha,
        }],
        "baseos": {
            "contentTreeUuid": TREE,
            "retryUpdate": {"counter": 1},
            "activate": true,
            "baseOsVersion": "2.0",
        },
    });
    rig.device.write_config(&config.to_string());
    for agent in ["config-agent", "downloader", "baseos-manager"] {
        rig.device.start(agent, None);
    }
    let status = rig
        .device
        .wait_for::<cairn_types::BaseOsStatus>("baseos-manager", WITHIN, |s| {
            s.slots
                .iter()
                .any(|slot| slot.partition_label == "IMGB" && slot.partition_state == "updating")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.device.log_tails(30)));
    let update = status.update.unwrap();
    assert_eq!(update.base_os_version, "2.0");
    assert_eq!(update.partition_label, "IMGB");
    assert_eq!(update.state, cairn_types::BaseOsUpdateState::Installed);
    assert!(rig.slot_b_holds_the_root());
    rig.device
        .until(WITHIN, "the reboot command ran", || rig.reboots() == 1)
        .await;
}

//! The real cairn-downloader binary over the real bus against a real HTTP(S) datastore
//! (`cairn_test_controller::datastore`), killed with SIGKILL where it matters.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_test_controller::datastore::{DatastoreFault, TestDatastore};
use cairn_types::{
    ConfigItemValueMap, ContentFormat, ContentTreeConfig, ContentTreeStatus, DatastoreConfig,
};
use sha2::Digest;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

fn sha256(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Content that is not all one byte, so a splice at the wrong offset changes its hash.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

struct Agent(Child);

impl Agent {
    fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }

    /// Waits for the agent to kill itself at its crash point.
    fn wait_killed(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(9), "ended by {status}, not SIGKILL");
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "the agent never reached its crash point"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Harness {
    _root: tempfile::TempDir,
    persist: PathBuf,
    run: PathBuf,
    configs: Publication<ContentTreeConfig>,
    statuses: Subscription<ContentTreeStatus>,
    store: TestDatastore,
    datastore: DatastoreConfig,
}

impl Harness {
    async fn new(https: bool) -> Self {
        let root = tempfile::tempdir().unwrap();
        let persist = root.path().join("persist");
        let run = root.path().join("run");
        std::fs::create_dir_all(&persist).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let config_agent = Bus::new("config-agent", &run, &persist);
        let configs = config_agent
            .publish(PublishOptions::for_requests())
            .await
            .unwrap();
        configs.signal_restarted().await.unwrap();
        let store = TestDatastore::start(https).await.unwrap();
        let datastore = DatastoreConfig {
            uuid: Uuid::new_v4(),
            ds_type: if https { "DsHttps" } else { "DsHttp" }.into(),
            fqdn: store.url(),
            dpath: "images".into(),
            ds_cert_pem: if https {
                vec![store.ca_pem().to_string()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        Self {
            statuses: Bus::new("test", &run, &persist).subscribe("downloader"),
            _root: root,
            persist,
            run,
            configs,
            store,
            datastore,
        }
    }

    fn agent(&self, stall_ms: u64, crash_at: Option<&str>) -> Agent {
        self.agent_via(&[], stall_ms, crash_at)
    }

    /// Started through `launcher` (`fiu-run -x …`), which runs the binary given after it.
    fn agent_via(&self, launcher: &[String], stall_ms: u64, crash_at: Option<&str>) -> Agent {
        let mut cmd = cairn_fiu::command_via(launcher, env!("CARGO_BIN_EXE_cairn-downloader"));
        cmd.env("CAIRN_PERSIST_DIR", &self.persist)
            .env("CAIRN_RUN_DIR", &self.run)
            .env_remove("CAIRN_CRASH_AT")
            .args(["--stall-ms", &stall_ms.to_string(), "--retry-ms", "500"])
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some(point) = crash_at {
            cmd.env("CAIRN_CRASH_AT", point);
        }
        Agent(cmd.spawn().unwrap())
    }

    /// A content tree for `/images/<path>` served with `data`.
    fn tree(&self, path: &str, data: &[u8]) -> ContentTreeConfig {
        self.store.put(&format!("images/{path}"), data.to_vec());
        ContentTreeConfig {
            content_id: Uuid::new_v4(),
            datastore_id_list: vec![self.datastore.uuid],
            relative_url: path.into(),
            format: ContentFormat::Raw,
            content_sha256: sha256(data),
            display_name: path.into(),
            datastores: vec![self.datastore.clone()],
            ..Default::default()
        }
    }

    async fn status_where(
        &mut self,
        tree: Uuid,
        what: &str,
        pred: impl Fn(&ContentTreeStatus) -> bool,
    ) -> ContentTreeStatus {
        common::status_where(&mut self.statuses, tree, what, WAIT, pred).await
    }

    async fn loaded(&mut self, tree: Uuid) -> ContentTreeStatus {
        self.status_where(tree, "LOADED", |s| s.is_loaded()).await
    }

    async fn error_containing(&mut self, tree: Uuid, text: &str) -> ContentTreeStatus {
        self.status_where(tree, &format!("in error with {text:?}"), |s| {
            s.error.error.contains(text)
        })
        .await
    }

    fn content_dir(&self) -> PathBuf {
        cairn_types::layout::content_dir(&self.persist)
    }

    fn files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.content_dir().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Waits until `path` holds at least `len` bytes.
fn wait_for_size(path: &Path, len: u64) -> u64 {
    let start = Instant::now();
    loop {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size >= len {
            return size;
        }
        assert!(
            start.elapsed() < WAIT,
            "{} stayed at {size} bytes",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_midway_resumes_with_a_range_request_and_is_verified_before_use() {
    let mut h = Harness::new(true).await;
    let data = content(8 * MIB, 1);
    let tree = h.tree("disk.raw", &data);
    let sha = tree.content_sha256.clone();
    // The server stops after 3 MiB and keeps the connection open: the agent is mid-download.
    h.store.set_fault(
        "images/disk.raw",
        Some(DatastoreFault::StallAfter(3 * MIB as u64)),
    );
    let mut agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    let partial = h.content_dir().join("partial").join(&sha);
    wait_for_size(&partial, 3 * MIB as u64);
    agent.kill();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(h.files("blobs").is_empty(), "nothing unverified in blobs/");

    h.store.set_fault("images/disk.raw", None);
    let _agent = h.agent(60_000, None);
    let status = h.loaded(tree.content_id).await;
    let resumed = h
        .store
        .seen()
        .into_iter()
        .filter(|s| s.range.is_some())
        .collect::<Vec<_>>();
    assert_eq!(
        resumed.first().and_then(|s| s.range.clone()),
        Some(format!("bytes={kept}-")),
        "the restarted agent asks for the rest only: {resumed:?}"
    );
    assert_eq!(resumed[0].status, 206);
    let blob = h.content_dir().join("blobs").join(&sha);
    assert_eq!(status.file_location, blob.display().to_string());
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        data,
        "resumed bytes spliced right"
    );
    assert_eq!(
        std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert!(h.files("partial").is_empty());
    assert_eq!(status.current_size, data.len() as i64);
    assert_eq!(status.progress, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_range_makes_the_resume_start_over_and_still_verify() {
    let mut h = Harness::new(false).await;
    let data = content(4 * MIB, 2);
    let tree = h.tree("plain.raw", &data);
    let partial = h.content_dir().join("partial").join(&tree.content_sha256);
    h.store.set_fault(
        "images/plain.raw",
        Some(DatastoreFault::StallAfter(MIB as u64)),
    );
    let mut agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    wait_for_size(&partial, MIB as u64);
    agent.kill();
    h.store
        .set_fault("images/plain.raw", Some(DatastoreFault::IgnoreRange));
    let _agent = h.agent(60_000, None);
    h.loaded(tree.content_id).await;
    let blob = h.content_dir().join("blobs").join(&tree.content_sha256);
    assert_eq!(std::fs::read(blob).unwrap(), data);
    assert!(
        h.store
            .seen()
            .iter()
            .any(|s| s.range.is_some() && s.status == 200),
        "the resume asked for a range and got the whole file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_never_enters_the_store_and_is_reported_until_the_datastore_mends() {
    let mut h = Harness::new(false).await;
    let data = content(MIB, 3);
    let tree = h.tree("bad.raw", &data);
    h.store
        .set_fault("images/bad.raw", Some(DatastoreFault::WrongContent));
    let _agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    let status = h.error_containing(tree.content_id, "sha256 mismatch").await;
    assert!(
        status.error.error.contains(&tree.content_id.to_string()),
        "the error names the content tree: {}",
        status.error.error
    );
    assert!(
        status
            .error
            .error_retry_condition
            .starts_with("will retry in")
    );
    assert!(!status.is_loaded());
    assert!(h.files("blobs").is_empty(), "nothing unverified in blobs/");
    // EVE retries failed downloads: once the datastore serves the right bytes, it loads.
    h.store.set_fault("images/bad.raw", None);
    let status = h.loaded(tree.content_id).await;
    assert!(!status.error.is_error(), "the error is cleared once loaded");
    assert_eq!(h.files("blobs"), vec![tree.content_sha256.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_stalls_lying_lengths_limits_and_unusable_datastores_are_reported_by_name() {
    let mut h = Harness::new(false).await;
    let data = content(2 * MIB, 4);
    let missing = h.tree("missing.raw", &data);
    h.store
        .set_fault("images/missing.raw", Some(DatastoreFault::NotFound));
    let stalled = h.tree("stalled.raw", &content(2 * MIB, 5));
    h.store
        .set_fault("images/stalled.raw", Some(DatastoreFault::StallAfter(1000)));
    let cut = h.tree("cut.raw", &content(2 * MIB, 6));
    h.store
        .set_fault("images/cut.raw", Some(DatastoreFault::TruncateAfter(1000)));
    let mut big = h.tree("big.raw", &content(2 * MIB, 7));
    big.max_download_size = MIB as u64;
    let mut s3 = h.tree("s3.raw", &content(10, 8));
    s3.datastores[0].ds_type = "DsS3".into();
    let mut nowhere = h.tree("nowhere.raw", &content(10, 9));
    nowhere.datastores.clear();
    let _agent = h.agent(500, None);
    for tree in [&missing, &stalled, &cut, &big, &s3, &nowhere] {
        h.configs.publish(tree.clone()).await.unwrap();
    }
    h.error_containing(missing.content_id, "HTTP 404 Not Found")
        .await;
    h.error_containing(stalled.content_id, "no data for").await;
    h.error_containing(cut.content_id, "of the 2097152 bytes announced")
        .await;
    h.error_containing(big.content_id, "larger than maxSizeBytes 1048576")
        .await;
    h.error_containing(s3.content_id, "of type DsS3").await;
    h.error_containing(
        nowhere.content_id,
        &format!(
            "datastore {} is not in the config's datastores",
            h.datastore.uuid
        ),
    )
    .await;
    assert!(h.files("blobs").is_empty(), "nothing unverified in blobs/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trees_with_one_sha256_share_one_blob_removed_when_the_last_leaves_the_config() {
    let mut h = Harness::new(false).await;
    let data = content(2 * MIB, 10);
    let first = h.tree("one.raw", &data);
    let second = h.tree("two.raw", &data);
    let _agent = h.agent(60_000, None);
    h.configs.publish(first.clone()).await.unwrap();
    h.configs.publish(second.clone()).await.unwrap();
    let a = h.loaded(first.content_id).await;
    let b = h.loaded(second.content_id).await;
    assert_eq!(a.file_location, b.file_location, "one blob for one sha256");
    assert_eq!(h.files("blobs").len(), 1);
    let gets = h.store.seen().len();
    assert_eq!(gets, 1, "one download: {:?}", h.store.seen());

    h.configs
        .unpublish(&first.content_id.to_string())
        .await
        .unwrap();
    h.gone(first.content_id).await;
    assert_eq!(
        h.files("blobs").len(),
        1,
        "the second tree still holds the blob"
    );
    assert!(h.loaded(second.content_id).await.is_loaded());
    h.configs
        .unpublish(&second.content_id.to_string())
        .await
        .unwrap();
    h.gone(second.content_id).await;
    wait_until("the blob is removed", || h.files("blobs").is_empty());
    let refs = cairn_persist::load::<cairn_downloader::store::ContentRefs>(
        &h.content_dir().join("refs.json"),
    )
    .unwrap()
    .record;
    assert!(refs.blobs.is_empty(), "{refs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_url_is_downloaded_at_once_not_after_the_old_ones_retries() {
    let mut h = Harness::new(false).await;
    let data = content(MIB, 13);
    let mut tree = h.tree("right.raw", &data);
    tree.relative_url = "wrong.raw".into();
    let _agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    h.error_containing(tree.content_id, "HTTP 404").await;
    tree.relative_url = "right.raw".into();
    h.configs.publish(tree.clone()).await.unwrap();
    let status = h.loaded(tree.content_id).await;
    assert_eq!(std::fs::read(status.file_location).unwrap(), data);
}

/// EVE: a datastore's `dsCertPEM` are its trust anchors; without them the system's roots
/// are, and they do not know the test datastore's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_datastore_is_trusted_through_its_ds_cert_pem_only() {
    let mut h = Harness::new(true).await;
    let data = content(MIB, 14);
    let mut tree = h.tree("tls.raw", &data);
    let pem = std::mem::take(&mut tree.datastores[0].ds_cert_pem);
    let _agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    let status = h.error_containing(tree.content_id, "TLS with").await;
    assert!(
        status.error.error.contains("127.0.0.1"),
        "{}",
        status.error.error
    );
    tree.datastores[0].ds_cert_pem = pem;
    h.configs.publish(tree.clone()).await.unwrap();
    h.loaded(tree.content_id).await;
}

/// A kill at each step that changes the store leaves a store the restarted agent finishes:
/// the blob loaded and verified, or (for a release) removed, never a half state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_each_store_step_converges_after_a_restart() {
    use cairn_downloader::store::{
        CRASH_AFTER_BLOB_RENAME, CRASH_AFTER_REF_REMOVE, CRASH_AFTER_REF_WRITE, CRASH_AFTER_VERIFY,
    };
    for point in [
        CRASH_AFTER_REF_WRITE,
        CRASH_AFTER_VERIFY,
        CRASH_AFTER_BLOB_RENAME,
    ] {
        let mut h = Harness::new(false).await;
        let data = content(MIB, 11);
        let tree = h.tree("crash.raw", &data);
        let mut agent = h.agent(60_000, Some(point));
        h.configs.publish(tree.clone()).await.unwrap();
        agent.wait_killed();
        let _agent = h.agent(60_000, None);
        let status = h.loaded(tree.content_id).await;
        assert_eq!(
            std::fs::read(&status.file_location).unwrap(),
            data,
            "{point}"
        );
        assert!(h.files("partial").is_empty(), "{point}");
    }
    let mut h = Harness::new(false).await;
    let tree = h.tree("released.raw", &content(MIB, 12));
    let agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    h.loaded(tree.content_id).await;
    drop(agent);
    let mut agent = h.agent(60_000, Some(CRASH_AFTER_REF_REMOVE));
    h.configs
        .unpublish(&tree.content_id.to_string())
        .await
        .unwrap();
    agent.wait_killed();
    assert_eq!(h.files("blobs").len(), 1, "killed before the blob went");
    let _agent = h.agent(60_000, None);
    wait_until("the unreferenced blob is collected at start", || {
        h.files("blobs").is_empty()
    });
}

/// EVE's `doDownload`: a tree's datastores are tried in the order of its `ds_ids_list`, and
/// one that fails is passed over for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_datastore_is_passed_over_for_the_next_in_ds_ids_list() {
    let mut h = Harness::new(false).await;
    let data = content(MIB, 15);
    let mut tree = h.tree("twice.raw", &data);
    h.store
        .set_fault("images/twice.raw", Some(DatastoreFault::NotFound));
    let second = TestDatastore::start(false).await.unwrap();
    second.put("images/twice.raw", data.clone());
    let fallback = DatastoreConfig {
        uuid: Uuid::new_v4(),
        ds_type: "DsHttp".into(),
        fqdn: second.url(),
        dpath: "images".into(),
        ds_cert_pem: Vec::new(),
        ..Default::default()
    };
    tree.datastore_id_list.push(fallback.uuid);
    tree.datastores.push(fallback);
    let _agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    let status = h.loaded(tree.content_id).await;
    assert_eq!(std::fs::read(status.file_location).unwrap(), data);
    let statuses =
        |store: &TestDatastore| -> Vec<u16> { store.seen().iter().map(|s| s.status).collect() };
    assert_eq!(
        statuses(&h.store),
        [404],
        "the first datastore was asked first"
    );
    assert_eq!(statuses(&second), [200], "the second one served it");
}

/// EVE's `timer.defer.content.delete`: a blob no tree holds any more is kept that long (across
/// a restart), a tree with the same sha256 takes it without a download, then it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unheld_blob_is_kept_for_the_deferred_delete_time_and_reused_without_a_download() {
    let mut h = Harness::new(false).await;
    let items = Bus::new("config-agent", &h.run, &h.persist)
        .publish::<ConfigItemValueMap>(PublishOptions::default())
        .await
        .unwrap();
    items
        .publish(ConfigItemValueMap {
            items: [("timer.defer.content.delete".to_string(), "20".to_string())].into(),
        })
        .await
        .unwrap();
    items.signal_restarted().await.unwrap();
    let data = content(MIB, 16);
    let tree = h.tree("kept.raw", &data);
    let mut agent = h.agent(60_000, None);
    h.configs.publish(tree.clone()).await.unwrap();
    h.loaded(tree.content_id).await;
    h.configs
        .unpublish(&tree.content_id.to_string())
        .await
        .unwrap();
    h.gone(tree.content_id).await;
    assert_eq!(
        h.files("blobs"),
        vec![tree.content_sha256.clone()],
        "kept, though no tree holds it"
    );
    agent.kill();
    let _agent = h.agent(60_000, None);
    let again = ContentTreeConfig {
        content_id: Uuid::new_v4(),
        ..tree.clone()
    };
    h.configs.publish(again.clone()).await.unwrap();
    h.loaded(again.content_id).await;
    assert_eq!(
        h.store.seen().len(),
        1,
        "no second download: {:?}",
        h.store.seen()
    );
    h.configs
        .unpublish(&again.content_id.to_string())
        .await
        .unwrap();
    h.gone(again.content_id).await;
    wait_until("the kept blob goes at its deadline", || {
        h.files("blobs").is_empty()
    });
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Harness {
    async fn gone(&mut self, tree: Uuid) {
        let key = tree.to_string();
        let deadline = Instant::now() + WAIT;
        while self.statuses.get(&key).is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "content tree {tree}: status never removed");
            let _ = tokio::time::timeout(left, self.statuses.recv()).await;
        }
    }
}

/// An OCI image archive (an `oci-layout` tar) of one image whose only layer is `layer`; its
/// manifest's sha256.
fn oci_archive(layer: &[u8]) -> (Vec<u8>, String) {
    let layer_sha = sha256(layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_sha = sha256(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_sha}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_sha}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_sha = sha256(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_sha}","size":{}}}]}}"#,
        manifest.len()
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    add(&format!("blobs/sha256/{manifest_sha}"), manifest.as_bytes());
    add(&format!("blobs/sha256/{config_sha}"), config);
    add(&format!("blobs/sha256/{layer_sha}"), layer);
    (tar.into_inner().unwrap(), manifest_sha)
}

/// An OCI archive's load (each blob hashed, written and fsynced into the store) runs off the
/// agent's event loop, the tree LOADING meanwhile: a small tree configured while a big archive
/// loads is LOADED before the archive is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tree_is_loaded_while_a_big_oci_archive_loads() {
    let mut h = Harness::new(false).await;
    let _agent = h.agent(60_000, None);
    let (archive, manifest) = oci_archive(&content(128 * MIB, 5));
    let mut big = h.tree("image.tar", &archive);
    big.format = ContentFormat::Container;
    h.configs.publish(big.clone()).await.unwrap();
    h.status_where(big.content_id, "LOADING", |s| {
        s.state == cairn_types::ContentTreeState::Loading
    })
    .await;
    let small = h.tree("small.img", &content(MIB, 9));
    h.configs.publish(small.clone()).await.unwrap();
    h.loaded(small.content_id).await;
    let archive_state = h.statuses.get(&big.content_id.to_string()).map(|s| s.state);
    assert_eq!(
        archive_state,
        Some(cairn_types::ContentTreeState::Loading),
        "the archive was still loading when the small tree was loaded"
    );
    let loaded = h.loaded(big.content_id).await;
    assert!(
        loaded.file_location.ends_with(&manifest),
        "its file is the image's manifest: {loaded:?}"
    );
    assert_eq!(loaded.blobs.len(), 4, "manifest, config, layer, archive");
}

/// The agent's own file calls failing (libfiu's POSIX preload, `fiu-run -x`; `fiu-ctrl` arms
/// one fault while the agent is idle, as a new tree arrives): the first such call is the
/// recording of the tree's reference (`refs.json`: open ENOSPC, fsync EIO, rename EIO). Each
/// is reported on the tree, naming it and the fault, and tried again by the agent itself: the
/// tree ends LOADED with the verified bytes, nothing left in `partial/`. Before, the tree
/// waited for the next config change or agent start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_failing_disk_under_the_store_is_reported_and_the_download_retried() {
    use cairn_fiu::{EIO, ENOSPC, Fiu, fault_words};
    for (point, errno) in [
        ("posix/io/oc/open", ENOSPC),
        ("posix/io/sync/fsync", EIO),
        ("posix/io/dir/rename", EIO),
    ] {
        let words = fault_words(errno);
        let mut h = Harness::new(false).await;
        let fiu = Fiu::new(&h.persist);
        let agent = h.agent_via(&fiu.launcher(), 60_000, None);
        let first = h.tree("first.raw", &content(MIB, 5));
        h.configs.publish(first.clone()).await.unwrap();
        h.loaded(first.content_id).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        fiu.fail_once(agent.0.id(), point, errno);
        let data = content(2 * MIB, 6);
        let tree = h.tree("second.raw", &data);
        h.configs.publish(tree.clone()).await.unwrap();
        let failed = h
            .status_where(tree.content_id, words, |s| {
                s.error.error.to_lowercase().contains(words)
            })
            .await;
        let text = &failed.error.error;
        assert!(
            text.contains(&tree.content_id.to_string()) || text.contains("second.raw"),
            "{point}: the tree is not named: {text}"
        );
        let status = h.loaded(tree.content_id).await;
        assert_eq!(
            std::fs::read(&status.file_location).unwrap(),
            data,
            "{point}: the stored blob"
        );
        assert!(
            h.files("partial").is_empty(),
            "{point}: a partial file left"
        );
        println!("fiu downloader {point} errno={errno}: {text}");
        drop(agent);
    }
}

//! The real cairn-downloader pulling container images (format CONTAINER) from Debian's
//! `docker-registry` with TLS (a test CA) and htpasswd basic auth or the distribution token
//! scheme (a token server of the test's own issuing the JWTs the registry checks), images built from
//! busybox-static with umoci and pushed with skopeo (`cairn_test_controller::registry`).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use cairn_pubsub::{Bus, Publication, PublishOptions, Subscription};
use cairn_test_controller::registry::{TOKEN_SERVICE, TestRegistry, busybox_image};
use cairn_types::{ContentFormat, ContentTreeConfig, ContentTreeStatus, DatastoreConfig};
use sha2::Digest;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Harness {
    root: tempfile::TempDir,
    persist: PathBuf,
    run: PathBuf,
    configs: Publication<ContentTreeConfig>,
    statuses: Subscription<ContentTreeStatus>,
    registry: TestRegistry,
    digest: String,
}

impl Harness {
    /// A registry (basic auth) holding `app:v1` (busybox plus a file), and the bus.
    async fn new() -> Self {
        Self::with_registry(TestRegistry::start).await
    }

    /// [`Self::new`] with a registry that takes tokens from a token server.
    async fn new_token() -> Self {
        Self::with_registry(TestRegistry::start_token).await
    }

    async fn with_registry(start: fn(&Path) -> anyhow::Result<TestRegistry>) -> Self {
        let root = tempfile::tempdir().unwrap();
        let persist = root.path().join("persist");
        let run = root.path().join("run");
        std::fs::create_dir_all(&persist).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let registry = start(&root.path().join("registry")).unwrap();
        let image = busybox_image(&root.path().join("image"), "v1").unwrap();
        image
            .layer(|r| Ok(std::fs::write(r.join("etc/greeting"), "hello\n")?))
            .unwrap();
        let digest = registry.push(&image, "cairn/app:v1").unwrap();
        let config_agent = Bus::new("config-agent", &run, &persist);
        let configs = config_agent
            .publish(PublishOptions::for_requests())
            .await
            .unwrap();
        configs.signal_restarted().await.unwrap();
        Self {
            statuses: Bus::new("test", &run, &persist).subscribe("downloader"),
            root,
            persist,
            run,
            configs,
            registry,
            digest,
        }
    }

    fn agent(&self) -> Agent {
        Agent(self.agent_command().spawn().unwrap())
    }

    fn agent_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-downloader"));
        cmd.env("CAIRN_PERSIST_DIR", &self.persist)
            .env("CAIRN_RUN_DIR", &self.run)
            .env_remove("CAIRN_CRASH_AT")
            .args(["--retry-ms", "500"])
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            );
        cmd
    }

    fn datastore(&self, password: &str) -> DatastoreConfig {
        DatastoreConfig {
            uuid: Uuid::new_v4(),
            ds_type: "DsContainerRegistry".into(),
            fqdn: format!("docker://{}", self.registry.host()),
            dpath: "cairn".into(),
            ds_cert_pem: vec![self.registry.ca_pem().to_string()],
            api_key: self.registry.user().into(),
            password: password.into(),
        }
    }

    fn tree(&self, url: &str, sha: &str, password: &str) -> ContentTreeConfig {
        let ds = self.datastore(password);
        ContentTreeConfig {
            content_id: Uuid::new_v4(),
            datastore_id_list: vec![ds.uuid],
            relative_url: url.into(),
            format: ContentFormat::Container,
            content_sha256: sha.into(),
            display_name: url.into(),
            datastores: vec![ds],
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

    fn blobs(&self) -> PathBuf {
        cairn_types::layout::content_dir(&self.persist).join("blobs")
    }
}

fn manifest_layers(blobs: &Path, manifest: &str) -> Vec<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(manifest)).unwrap()).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_pulled_by_tag_and_by_digest_verified_and_its_layers_shared() {
    let mut h = Harness::new().await;
    let _agent = h.agent();
    let password = h.registry.password().to_string();
    let by_tag = h.tree("app:v1", "", &password);
    h.configs.publish(by_tag.clone()).await.unwrap();
    let loaded = h
        .status_where(by_tag.content_id, "LOADED", |s| s.is_loaded())
        .await;
    let manifest = h.digest.trim_start_matches("sha256:").to_string();
    assert_eq!(
        loaded.content_sha256, manifest,
        "the tag's manifest digest is recorded"
    );
    let layers = manifest_layers(&h.blobs(), &manifest);
    assert_eq!(layers.len(), 2);
    assert_eq!(loaded.blobs[0], manifest);
    for layer in &layers {
        assert!(
            loaded.blobs.contains(layer),
            "{layer} in {:?}",
            loaded.blobs
        );
        assert!(h.blobs().join(layer).exists(), "layer {layer} in the store");
    }
    // By digest: a second tree, the same blobs, held by both.
    let by_digest = h.tree(&format!("app@{}", h.digest), &manifest, &password);
    h.configs.publish(by_digest.clone()).await.unwrap();
    let second = h
        .status_where(by_digest.content_id, "LOADED", |s| s.is_loaded())
        .await;
    assert_eq!(second.blobs, loaded.blobs);
    let refs: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cairn_types::layout::content_dir(&h.persist).join("refs.json")).unwrap(),
    )
    .unwrap();
    let held = refs["record"]["Blobs"][&layers[0]]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        held, 2,
        "the shared layer is counted for both trees: {refs}"
    );
    // The same image as Docker v2 schema 2 (Docker's media types), by tag.
    let image = busybox_image(&h.root.path().join("docker-image"), "v1").unwrap();
    let docker_digest = h.registry.push_docker(&image, "cairn/docker:v1").unwrap();
    let manifest_text = std::fs::read_to_string(h.registry.blob_path(&docker_digest)).unwrap();
    assert!(
        manifest_text.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{manifest_text}"
    );
    let docker = h.tree("docker:v1", "", &password);
    h.configs.publish(docker.clone()).await.unwrap();
    let loaded = h
        .status_where(docker.content_id, "LOADED (Docker v2)", |s| s.is_loaded())
        .await;
    assert_eq!(
        loaded.content_sha256,
        docker_digest.trim_start_matches("sha256:")
    );
    // A digest the registry does not have for that repository is refused.
    let wrong = h.tree("app:v1", &"0".repeat(64), &password);
    h.configs.publish(wrong.clone()).await.unwrap();
    h.status_where(wrong.content_id, "refused", |s| {
        s.error.error.contains("manifest") && !s.is_loaded()
    })
    .await;
    drop(h.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_and_a_tampered_layer_is_refused_by_name() {
    let mut h = Harness::new().await;
    let _agent = h.agent();
    let denied = h.tree("app:v1", "", "not-the-password");
    h.configs.publish(denied.clone()).await.unwrap();
    let status = h
        .status_where(denied.content_id, "refused for its credentials", |s| {
            s.error.is_error()
        })
        .await;
    assert!(
        status.error.error.contains("credentials")
            && status
                .error
                .error
                .contains(&denied.datastores[0].uuid.to_string()),
        "says the credentials of that datastore were refused: {}",
        status.error.error
    );
    assert!(!status.is_loaded());

    // The registry's copy of the last layer changes: the pull names that layer and stores
    // nothing of it.
    let manifest = h.digest.trim_start_matches("sha256:").to_string();
    let layer = {
        // Read the manifest from the registry's own storage.
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(h.registry.blob_path(&manifest)).unwrap())
                .unwrap();
        m["layers"][1]["digest"].as_str().unwrap().to_string()
    };
    let path = h.registry.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let password = h.registry.password().to_string();
    let tampered = h.tree("app:v1", "", &password);
    h.configs.publish(tampered.clone()).await.unwrap();
    let status = h
        .status_where(tampered.content_id, "refused for the tampered layer", |s| {
            s.error.error.contains(&layer)
        })
        .await;
    assert!(!status.is_loaded(), "{status:?}");
    let hex = layer.trim_start_matches("sha256:");
    assert!(
        !h.blobs().join(hex).exists(),
        "nothing unverified enters the store"
    );
    drop(h.root);
}

/// Issue 21: the registry SIGKILLed while a layer downloads, then started again. The pull
/// fails (said in the status, with the retry), keeps the bytes it had, resumes from them with a
/// Range request once the registry is back, and the layer it completes is the verified one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_killed_mid_pull_is_resumed_from_where_it_broke_off() {
    let mut h = Harness::new().await;
    // A 128 MiB layer of noise (gzip cannot shrink it): the download takes long enough to be
    // cut in the middle.
    let image = busybox_image(&h.root.path().join("big-image"), "v1").unwrap();
    image
        .layer(|r| {
            let mut data = vec![0u8; 128 << 20];
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            Ok(std::fs::write(r.join("noise"), data)?)
        })
        .unwrap();
    let digest = h.registry.push(&image, "cairn/big:v1").unwrap();
    let manifest = digest.trim_start_matches("sha256:").to_string();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.registry.blob_path(&manifest)).unwrap()).unwrap();
    let big = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap()
        .clone();
    let (layer, size) = (
        big["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string(),
        big["size"].as_u64().unwrap(),
    );
    let log = h.root.path().join("downloader.log");
    let mut cmd = h.agent_command();
    cmd.env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let _agent = Agent(cmd.spawn().unwrap());
    let password = h.registry.password().to_string();
    let tree = h.tree("big:v1", "", &password);
    h.configs.publish(tree.clone()).await.unwrap();

    // Killed once a part of the layer, not all of it, is down.
    let partial = cairn_types::layout::content_dir(&h.persist)
        .join("partial")
        .join(&layer);
    let len = || std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let deadline = std::time::Instant::now() + WAIT;
    while len() < 4 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the layer download never began"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    h.registry.kill();
    let kept = len();
    assert!(
        kept < size,
        "killed before the layer was down ({kept} of {size})"
    );
    let failed = h
        .status_where(tree.content_id, "failed with the registry gone", |s| {
            s.error.is_error()
        })
        .await;
    assert!(!failed.is_loaded());
    assert!(
        failed.error.error_retry_condition.contains("retry"),
        "{:?}",
        failed.error
    );
    assert!(
        len() >= kept,
        "the bytes already down are kept for the resume"
    );

    h.registry.restart().unwrap();
    let loaded = h
        .status_where(tree.content_id, "LOADED after the restart", |s| {
            s.is_loaded()
        })
        .await;
    assert_eq!(loaded.content_sha256, manifest);
    let stored = h.blobs().join(&layer);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), size);
    let sha: String = sha2::Sha256::digest(std::fs::read(&stored).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sha, layer, "the resumed layer is the registry's, verified");
    let text = std::fs::read_to_string(&log).unwrap();
    let resumed: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("resuming a layer download") && l.contains(&layer))
        .filter_map(|l| {
            l.split("from=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        resumed.iter().any(|from| *from >= kept),
        "resumed from the {kept} bytes kept, not from the start: {resumed:?}"
    );
    assert!(
        !text.contains("downloading the layer from its start"),
        "the registry honoured the Range request"
    );
    drop(h.root);
}

fn sha256_of(path: &Path) -> String {
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The distribution token scheme: the registry answers 401 with a Bearer challenge, the
/// downloader takes the datastore's apiKey/password to the token server's realm and pulls
/// with the token it gets. The image named by its digest arrives with every blob verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_auth_registry_is_pulled_from_with_a_token_for_the_datastores_credentials() {
    let mut h = Harness::new_token().await;
    let pushes = h.registry.token_requests().len();
    assert!(pushes > 0, "skopeo's push went through the token server");
    let _agent = h.agent();
    let manifest = h.digest.trim_start_matches("sha256:").to_string();
    let password = h.registry.password().to_string();
    let tree = h.tree("app:v1", &manifest, &password);
    h.configs.publish(tree.clone()).await.unwrap();
    let loaded = h
        .status_where(tree.content_id, "LOADED", |s| s.is_loaded())
        .await;
    assert_eq!(loaded.content_sha256, manifest);
    assert_eq!(loaded.blobs[0], manifest);
    let layers = manifest_layers(&h.blobs(), &manifest);
    assert_eq!(layers.len(), 2);
    for blob in &loaded.blobs {
        assert_eq!(
            sha256_of(&h.blobs().join(blob)),
            *blob,
            "blob {blob} is stored under its own sha256"
        );
    }
    let asked: Vec<_> = h.registry.token_requests().split_off(pushes);
    assert!(
        asked.iter().any(|r| r.status == 200
            && r.user.as_deref() == Some(h.registry.user())
            && r.service.as_deref() == Some(TOKEN_SERVICE)
            && r.scopes.iter().any(|s| s == "repository:cairn/app:pull")),
        "the downloader got a pull token for the datastore's user: {asked:?}"
    );
    drop(h.root);
}

/// A password the token server refuses: the tree's error says the credentials of that
/// datastore were refused (not a bare 401 of the registry), and the request did reach the
/// token server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_server_refusing_the_credentials_is_reported_naming_the_datastore() {
    let mut h = Harness::new_token().await;
    let pushes = h.registry.token_requests().len();
    let _agent = h.agent();
    let denied = h.tree("app:v1", "", "not-the-password");
    let datastore = denied.datastores[0].uuid.to_string();
    h.configs.publish(denied.clone()).await.unwrap();
    let status = h
        .status_where(denied.content_id, "refused for its credentials", |s| {
            s.error.is_error()
        })
        .await;
    let error = &status.error.error;
    assert!(!status.is_loaded());
    assert!(error.contains(&datastore), "names the datastore: {error}");
    assert!(
        error.contains("token server refused the credentials"),
        "says what refused what: {error}"
    );
    let asked: Vec<_> = h.registry.token_requests().split_off(pushes);
    assert!(
        asked
            .iter()
            .any(|r| r.status == 401 && r.user.as_deref() == Some(h.registry.user())),
        "the token server saw the request and refused it: {asked:?}"
    );
    assert!(
        asked.iter().all(|r| r.status != 200),
        "no token was issued for a wrong password: {asked:?}"
    );
    drop(h.root);
}

/// The registry up, its token server down: the error says the token server cannot be reached
/// (its URL, the datastore), not that the registry refused the credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_server_that_is_down_is_reported_as_unreachable() {
    let mut h = Harness::new_token().await;
    h.registry.stop_token_server();
    let _agent = h.agent();
    let password = h.registry.password().to_string();
    let tree = h.tree("app:v1", "", &password);
    let datastore = tree.datastores[0].uuid.to_string();
    h.configs.publish(tree.clone()).await.unwrap();
    let status = h
        .status_where(tree.content_id, "failed without its token server", |s| {
            s.error.is_error()
        })
        .await;
    let error = &status.error.error;
    assert!(!status.is_loaded());
    assert!(error.contains(&datastore), "names the datastore: {error}");
    assert!(
        error.contains("/token") && error.contains("could not be reached"),
        "says the token server is unreachable: {error}"
    );
    assert!(
        !error.contains("refused the"),
        "not reported as refused credentials: {error}"
    );
    assert!(
        status.error.error_retry_condition.contains("retry"),
        "{:?}",
        status.error
    );
    drop(h.root);
}

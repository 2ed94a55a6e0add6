//! Figures, printed, never asserted: the downloader's throughput against `curl` fetching the
//! same file from the same test datastore in the same run, and its verify throughput against
//! `sha256sum` of the same file. Rounds alternate curl and the downloader (the machine's load
//! varies); the medians are printed. Run by hand:
//!
//! ```text
//! cargo nextest run -p cairn-downloader --test figures --run-ignored only --no-capture
//! CAIRN_FIGURES_MIB=1024 CAIRN_FIGURES_ROUNDS=5 cargo nextest run ...   # default 256 MiB, 3
//! ```

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, PublishOptions, Subscription};
use cairn_test_controller::datastore::TestDatastore;
use cairn_types::{
    ContentFormat, ContentTreeConfig, ContentTreeState, ContentTreeStatus, DatastoreConfig,
};
use sha2::Digest;
use uuid::Uuid;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn timed(program: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

/// Publishes a new tree for the blob and waits for LOADED: (download incl. fsync, verify
/// incl. the rename into the store), then unpublishes it, which removes the blob.
async fn agent_round(
    configs: &cairn_pubsub::Publication<ContentTreeConfig>,
    statuses: &mut Subscription<ContentTreeStatus>,
    tree: &ContentTreeConfig,
) -> (Duration, Duration) {
    let tree = ContentTreeConfig {
        content_id: Uuid::new_v4(),
        ..tree.clone()
    };
    let start = Instant::now();
    configs.publish(tree.clone()).await.unwrap();
    let (mut downloaded, mut verifying) = (None, None);
    let verify = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            let (Event::Create { value, .. } | Event::Modify { new: value, .. }) =
                statuses.recv().await
            else {
                continue;
            };
            if value.content_id != tree.content_id {
                continue;
            }
            assert!(!value.error.is_error(), "{:?}", value.error);
            if value.state >= ContentTreeState::Downloaded && downloaded.is_none() {
                downloaded = Some(start.elapsed());
            }
            if value.state >= ContentTreeState::Verifying && verifying.is_none() {
                verifying = Some(Instant::now());
            }
            if value.is_loaded() {
                return verifying.map(|v| v.elapsed()).unwrap_or_default();
            }
        }
    })
    .await
    .expect("loaded within 10 minutes");
    configs
        .unpublish(&tree.content_id.to_string())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while statuses.get(&tree.content_id.to_string()).is_some() {
            statuses.recv().await;
        }
    })
    .await
    .expect("released");
    (downloaded.unwrap_or_default(), verify)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: run by hand (see the file's doc)"]
async fn download_and_verify_throughput_against_curl_and_sha256sum() {
    let mib = env("CAIRN_FIGURES_MIB", 256);
    let rounds = env("CAIRN_FIGURES_ROUNDS", 3).max(1);
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 16) as u8)
        .collect();
    let sha: String = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for https in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let (persist, run) = (root.path().join("persist"), root.path().join("run"));
        std::fs::create_dir_all(&persist).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let store = TestDatastore::start(https).await.unwrap();
        store.put("big.raw", data.clone());
        let ca = root.path().join("ca.pem");
        std::fs::write(&ca, store.ca_pem()).unwrap();
        let configs = Bus::new("config-agent", &run, &persist)
            .publish::<ContentTreeConfig>(PublishOptions::for_requests())
            .await
            .unwrap();
        configs.signal_restarted().await.unwrap();
        let mut statuses =
            Bus::new("test", &run, &persist).subscribe::<ContentTreeStatus>("downloader");
        let mut agent = Command::new(env!("CARGO_BIN_EXE_cairn-downloader"))
            .env("CAIRN_PERSIST_DIR", &persist)
            .env("CAIRN_RUN_DIR", &run)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let datastore = DatastoreConfig {
            uuid: Uuid::new_v4(),
            ds_type: if https { "DsHttps" } else { "DsHttp" }.into(),
            fqdn: store.url(),
            dpath: String::new(),
            ds_cert_pem: if https {
                vec![store.ca_pem().into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let tree = ContentTreeConfig {
            datastore_id_list: vec![datastore.uuid],
            relative_url: "big.raw".into(),
            format: ContentFormat::Raw,
            content_sha256: sha.clone(),
            datastores: vec![datastore],
            ..Default::default()
        };
        let curl_out = root.path().join("curl.raw");
        let url = format!("{}/big.raw", store.url());
        let mut args = vec!["-sSf", "-o", curl_out.to_str().unwrap(), url.as_str()];
        if https {
            args.extend(["--cacert", ca.to_str().unwrap()]);
        }
        let (mut curl, mut curl_synced, mut sums) = (Vec::new(), Vec::new(), Vec::new());
        let (mut downloads, mut verifies) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let took = timed("curl", &args);
            // The downloader fsyncs its file before it verifies it; curl does not.
            let fsync = timed("sync", &[curl_out.to_str().unwrap()]);
            curl.push(took);
            curl_synced.push(took + fsync);
            sums.push(timed("sha256sum", &[curl_out.to_str().unwrap()]));
            std::fs::remove_file(&curl_out).unwrap();
            let (download, verify) = agent_round(&configs, &mut statuses, &tree).await;
            downloads.push(download);
            verifies.push(verify);
        }
        let _ = agent.kill();
        let _ = agent.wait();
        let (curl, curl_synced, sum) = (median(curl), median(curl_synced), median(sums));
        let (download, verify) = (median(downloads), median(verifies));
        let scheme = if https { "https" } else { "http" };
        println!(
            "figure: {scheme} {mib} MiB, median of {rounds}: downloader {:.0} MiB/s ({download:.2?}, fsync included); curl {:.0} MiB/s ({curl:.2?}) = {:.2}x curl; curl + fsync {curl_synced:.2?} = {:.2}x",
            mib_per_s(data.len(), download),
            mib_per_s(data.len(), curl),
            curl.as_secs_f64() / download.as_secs_f64(),
            curl_synced.as_secs_f64() / download.as_secs_f64()
        );
        println!(
            "figure: verify {mib} MiB, median of {rounds}: downloader {:.0} MiB/s ({verify:.2?}, incl. the rename into the store); sha256sum {:.0} MiB/s ({sum:.2?}) = {:.2}x sha256sum",
            mib_per_s(data.len(), verify),
            mib_per_s(data.len(), sum),
            sum.as_secs_f64() / verify.as_secs_f64()
        );
    }
}

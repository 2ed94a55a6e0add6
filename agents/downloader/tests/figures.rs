//! Figures, printed, never asserted: the downloader's throughput against `curl` fetching the
//! same file from the same test datastore in the same run, and its verify throughput against
//! `sha256sum` of the same blob. Run by hand:
//!
//! ```text
//! cargo nextest run -p cairn-downloader --test figures --run-ignored only --no-capture
//! CAIRN_FIGURES_MIB=1024 cargo nextest run ...   # a bigger file (default 256 MiB)
//! ```

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, Event, PublishOptions};
use cairn_test_controller::datastore::TestDatastore;
use cairn_types::{
    ContentFormat, ContentTreeConfig, ContentTreeState, ContentTreeStatus, DatastoreConfig,
};
use sha2::Digest;
use uuid::Uuid;

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: run by hand (see the file's doc)"]
async fn download_and_verify_throughput_against_curl_and_sha256sum() {
    let mib: usize = std::env::var("CAIRN_FIGURES_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
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

        // curl first, into the same file system.
        let curl_out = root.path().join("curl.raw");
        let url = format!("{}/big.raw", store.url());
        let mut args = vec!["-sSf", "-o", curl_out.to_str().unwrap(), url.as_str()];
        if https {
            args.extend(["--cacert", ca.to_str().unwrap()]);
        }
        let curl = timed("curl", &args);
        // The downloader fsyncs its file before it verifies it; curl does not.
        let fsync = timed("sync", &[curl_out.to_str().unwrap()]);
        let sha256sum = timed("sha256sum", &[curl_out.to_str().unwrap()]);
        std::fs::remove_file(&curl_out).unwrap();

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
        };
        let tree = ContentTreeConfig {
            content_id: Uuid::new_v4(),
            datastore_id_list: vec![datastore.uuid],
            relative_url: "big.raw".into(),
            format: ContentFormat::Raw,
            content_sha256: sha.clone(),
            datastores: vec![datastore],
            ..Default::default()
        };
        let start = Instant::now();
        configs.publish(tree).await.unwrap();
        let (mut downloaded, mut verifying) = (None, None);
        let loaded = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                    statuses.recv().await
                {
                    if value.state >= ContentTreeState::Downloaded && downloaded.is_none() {
                        downloaded = Some(start.elapsed());
                    }
                    if value.state >= ContentTreeState::Verifying && verifying.is_none() {
                        verifying = Some(Instant::now());
                    }
                    assert!(!value.error.is_error(), "{:?}", value.error);
                    if value.is_loaded() {
                        return verifying.map(|v| v.elapsed());
                    }
                }
            }
        })
        .await
        .expect("loaded within 10 minutes")
        .unwrap_or_default();
        let _ = agent.kill();
        let _ = agent.wait();
        let download = downloaded.unwrap_or_default();
        let scheme = if https { "https" } else { "http" };
        println!(
            "figure: {scheme} {mib} MiB: downloader {:.0} MiB/s ({download:.2?}, fsync included), curl {:.0} MiB/s ({curl:.2?}): {:.2}x curl; curl + fsync {:.2?}: {:.2}x",
            mib_per_s(data.len(), download),
            mib_per_s(data.len(), curl),
            curl.as_secs_f64() / download.as_secs_f64(),
            curl + fsync,
            (curl + fsync).as_secs_f64() / download.as_secs_f64()
        );
        println!(
            "figure: verify {mib} MiB: downloader {:.0} MiB/s ({loaded:.2?}, incl. promote), sha256sum {:.0} MiB/s ({sha256sum:.2?}): {:.2}x sha256sum",
            mib_per_s(data.len(), loaded),
            mib_per_s(data.len(), sha256sum),
            sha256sum.as_secs_f64() / loaded.as_secs_f64()
        );
    }
}

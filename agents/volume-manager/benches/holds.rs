//! The apps' holds at scale, in process (the manager's own API, no bus): the time an
//! `AppVolumeRefs` event takes with 100 and with 1,000 configured directory volumes, each app
//! taking and letting go of its own volume's hold. An event concerns its app's volumes only, so
//! its cost should not grow with the device; the ratio of the two medians says whether it does
//! (a pass over every volume, hold and config at each event made populating 1,000 apps
//! quadratic). Never fails on timing. Run: `cargo bench -p cairn-volume-manager --bench holds
//! --profile dev`.
#![allow(clippy::disallowed_methods)] // bench code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cairn_types::volume::{AppVolumeRefs, VolumeFormat};
use cairn_volume_manager::{Tools, VolumeManager};
use common::*;
use uuid::Uuid;

/// Per app, events timed: take the hold, let go, twice.
const EVENTS_PER_APP: usize = 4;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The median time of one `AppVolumeRefs` event on a device of `apps` apps and volumes.
async fn per_event(tools: &Tools, apps: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut m = VolumeManager::open(dir.path(), tools.clone(), Vec::new()).await;
    immediate_deletion(&mut m).await;
    m.handle_app_volume_refs_complete().await;
    let mut keys = Vec::new();
    for _ in 0..apps {
        let config = volume(VolumeFormat::Dir, MIB);
        keys.push(config.key());
        m.handle_volume_config(config).await;
    }
    let mut times = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let app = Uuid::from_u128(n as u128 + 1);
        for k in 0..EVENTS_PER_APP {
            let volume_keys = if k % 2 == 0 {
                [key.clone()].into()
            } else {
                Default::default()
            };
            let began = Instant::now();
            let out = m
                .handle_app_volume_refs(AppVolumeRefs {
                    app_uuid: app,
                    volume_keys,
                })
                .await;
            times.push(began.elapsed());
            // A configured volume stays, held or not.
            assert!(out.is_empty(), "{out:?}");
        }
    }
    median(times)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let tools = Tools::detect().await;
    let small = per_event(&tools, 100).await;
    let large = per_event(&tools, 1000).await;
    println!(
        "AppVolumeRefs event, median: {:.1} µs with 100 apps, {:.1} µs with 1,000: {:.2}x (a cost independent of the device: ~1x)",
        small.as_secs_f64() * 1e6,
        large.as_secs_f64() * 1e6,
        large.as_secs_f64() / small.as_secs_f64()
    );
}

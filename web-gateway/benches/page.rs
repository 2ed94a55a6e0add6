//! The web read-out's cost, run by hand:
//!
//! ```sh
//! cargo bench -p cairn-web --bench page
//! ```
//!
//! Real bus publications (this process publishes the status topics the page follows as the
//! agents would, with 100 apps × 10 available snapshots; volumes, domains, exports and
//! downloads empty), the real server on loopback, plain HTTP/1.1 clients.
//! Prints: render time of `/` and `/api/v1/status` (p50, p99 of 200 requests each, one client
//! at a time, without and with `Accept-Encoding: gzip` as a browser sends it); the process RSS
//! before the server, after serving those requests and with 20 pages holding their event
//! streams open (and of it, the anonymous memory: the file-backed rest is the binary's code
//! run for the first time); the CPU the process spends idle, in % of one core, with the page
//! served and with the 20 pages open; change events delivered per second to those 20 pages
//! while one app's status changes 10 times a second. Figures only: nothing here fails on
//! timing.

#![allow(clippy::unwrap_used)] // bench code: a failed unwrap is a failed run
#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_pubsub::{Bus, PublishOptions};
use cairn_readout::readout::Roots;
use cairn_types::export::ExportStatus;
use cairn_types::snapshot::{SnapshotDesc, SnapshotInstanceStatus, SnapshotMode};
use cairn_types::{
    AppInstanceStatus, ContentTreeStatus, DeviceStatus, DomainStatus, SwState, VolumeStatus,
};
use uuid::Uuid;

const APPS: usize = 100;
const SNAPSHOTS: usize = 10;
const REQUESTS: usize = 200;
const PAGES: usize = 20;

const IDLE: Duration = Duration::from_secs(16);

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib() -> (u64, u64) {
    (status_kib("VmRSS:"), status_kib("RssAnon:"))
}

/// CPU time (user and system) of the whole process so far.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    #[allow(unsafe_code)]
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The process's CPU use over [`IDLE`] of nothing happening, in % of one core (it includes this
/// bench's idle publishers and clients: an upper bound for the server).
fn idle_cpu_percent() -> f64 {
    let (cpu, start) = (cpu_time(), Instant::now());
    std::thread::sleep(IDLE);
    (cpu_time() - cpu).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0
}

fn app(n: usize) -> AppInstanceStatus {
    let uuid = Uuid::from_u128(0xa000_0000 + n as u128);
    let mut status = AppInstanceStatus {
        display_name: format!("app-{n:03}"),
        state: SwState::Running,
        ..Default::default()
    };
    status.uuid_and_version.uuid = uuid;
    status.uuid_and_version.version = "1".into();
    for s in 0..SNAPSHOTS {
        let mut snapshot = SnapshotInstanceStatus {
            snapshot: SnapshotDesc {
                snapshot_id: Uuid::from_u128((n as u128) << 32 | s as u128),
                name: format!("nightly-{s}"),
                mode: SnapshotMode::Stopped,
                ..Default::default()
            },
            app_instance_id: uuid,
            time_created: Some(chrono::Utc::now()),
            ..Default::default()
        };
        snapshot.config_version.version = "1".into();
        status.snap_status.available_snapshots.push(snapshot);
    }
    status
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> usize {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    stream.read_to_end(&mut body).unwrap();
    assert!(body.starts_with(b"HTTP/1.1 200"), "{path} failed");
    body.len()
}

fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    (at(0.50), at(0.99))
}

fn main() {
    let root = tempfile::tempdir().unwrap();
    let roots = Roots::under(root.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let apps = runtime.block_on(async {
        let device = Bus::new("config-agent", &roots.run, &roots.persist)
            .publish::<DeviceStatus>(PublishOptions::default())
            .await
            .unwrap();
        device.publish(DeviceStatus::default()).await.unwrap();
        let apps = Bus::new("app-manager", &roots.run, &roots.persist)
            .publish::<AppInstanceStatus>(PublishOptions::default())
            .await
            .unwrap();
        for n in 0..APPS {
            apps.publish(app(n)).await.unwrap();
        }
        // Every topic the page follows has its publisher, as on a device whose agents run.
        let volume_manager = Bus::new("volume-manager", &roots.run, &roots.persist);
        let others = (
            volume_manager
                .publish::<VolumeStatus>(PublishOptions::default())
                .await
                .unwrap(),
            volume_manager
                .publish::<ExportStatus>(PublishOptions::default())
                .await
                .unwrap(),
            Bus::new("domain-manager", &roots.run, &roots.persist)
                .publish::<DomainStatus>(PublishOptions::default())
                .await
                .unwrap(),
            Bus::new("downloader", &roots.run, &roots.persist)
                .publish::<ContentTreeStatus>(PublishOptions::default())
                .await
                .unwrap(),
        );
        (device, apps, others)
    });
    let before = rss_kib();

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let router = runtime
        .block_on(cairn_web::router(addr, roots.clone()))
        .unwrap();
    runtime.spawn(async move {
        let mut stopping = stopping;
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopping.wait_for(|s| *s).await;
        })
        .await
        .unwrap();
    });

    println!("web read-out, {APPS} apps x {SNAPSHOTS} snapshots, {REQUESTS} requests each:");
    let gzip = "Accept-Encoding: gzip\r\n";
    let mut requests = 0;
    for (path, extra) in [
        ("/", ""),
        ("/api/v1/status", ""),
        ("/api/v1/snapshots", ""),
        ("/", gzip),
        ("/api/v1/status", gzip),
    ] {
        let size = get(addr, path, extra);
        let times: Vec<Duration> = (0..REQUESTS)
            .map(|_| {
                let start = Instant::now();
                get(addr, path, extra);
                start.elapsed()
            })
            .collect();
        requests += REQUESTS + 1;
        let (p50, p99) = percentiles(times);
        let how = if extra.is_empty() { "" } else { " (gzip)" };
        println!(
            "  {:<27} p50 {p50:>10.2?}  p99 {p99:>10.2?}  ({size} bytes with head)",
            format!("{path}{how}")
        );
    }
    let served = rss_kib();
    let idle_served = idle_cpu_percent();

    // 20 open pages, each counting the change events it receives.
    let received = Arc::new(AtomicU64::new(0));
    for _ in 0..PAGES {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            write!(stream, "GET /api/v1/events HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if line == "event: change" {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_device, apps, _others) = apps;
    let seconds = 5;
    let start = Instant::now();
    runtime.block_on(async {
        for tick in 0..seconds * 10 {
            let mut changed = app(0);
            changed.restarts = tick as u32;
            apps.publish(changed).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = start.elapsed().as_secs_f64();
    let events = received.load(Ordering::Relaxed);
    let pages_open = rss_kib();
    let idle_pages = idle_cpu_percent();
    println!(
        "  events: {events} delivered to {PAGES} pages in {elapsed:.1} s of 10 changes/s \
         ({:.0}/s in all, {:.1}/s per page)",
        events as f64 / elapsed,
        events as f64 / elapsed / PAGES as f64
    );
    let grown = |(rss, anon): (u64, u64)| {
        format!(
            "{rss} KiB (+{} KiB, anonymous +{} KiB)",
            rss.saturating_sub(before.0),
            anon.saturating_sub(before.1)
        )
    };
    println!(
        "  RSS: {} KiB before the server, {} after {requests} requests, {} with {PAGES} pages open",
        before.0,
        grown(served),
        grown(pages_open)
    );
    println!(
        "  idle CPU over {IDLE:?}: {idle_served:.2}% of one core with the page served, \
         {idle_pages:.2}% with {PAGES} pages open"
    );
    let _ = stop.send(true);
}

//! The web read-out's cost, run by hand:
//!
//! ```sh
//! cargo bench -p cairn-web --bench page --profile dev   # debug build, as the tests run
//! cargo bench -p cairn-web --bench page                 # release build, as a device runs
//! ```
//!
//! Real bus publications (this process publishes the status topics the page follows as the
//! agents would, with 100 apps × 10 available snapshots, each with its record on disk under
//! `<persist>/snapshots/`; volumes, domains, exports and downloads empty), the real server on
//! loopback, plain HTTP/1.1 clients. The clients run in a second process (this bench run again
//! with `CAIRN_WEB_BENCH_CLIENT` set, told the server's address and each step on its stdin), so
//! their threads, stacks and malloc arenas are not counted in the server's memory. The server
//! runs as `cairn up` runs it: on a current-thread runtime on the process's main thread; the
//! publishers share that runtime (on a device they are the agents' processes), so their
//! memory is counted with the server's: the figures are an upper bound for the server's.
//! Prints: render time of `/` and `/api/v1/status` (p50, p99 of 200 requests each, one client
//! at a time, without and with `Accept-Encoding: gzip` as a browser sends it, timed by the
//! client); the server process's RSS before the server, after serving those requests, and after
//! 20 open pages followed 5 s of snapshot activity (and of it, the anonymous memory: the
//! file-backed rest is the binary's code run for the first time), and where it grew (main
//! heap, glibc's per-thread malloc arenas, stacks, other anonymous memory, file-backed pages,
//! from `/proc/self/smaps`); the CPU the server process
//! spends idle, in % of one core, with the page served and with the 20 pages open; the change
//! events delivered per second to those 20 pages, and the contents they fetched, while
//! snapshots are taken: 5 a second, each requested (the app's status published with it), then
//! taken (its record written, the status published with it available and the app's oldest
//! snapshot gone, its record removed), as the app-manager does. Each page does what the page's
//! script does: on an event it fetches `/content` again, one fetch at a time, events during a
//! fetch making one more.
//! Figures only: nothing here fails on timing. With `CAIRN_WEB_BENCH_PAUSE=SECONDS` the server
//! process prints its pid and waits that long at the end, the pages still open, for a look at
//! its `/proc/PID/smaps` (or `heaptrack`).
//!
//! Last figures (release, load average ~15-20 from other builds): RSS growth after the 20
//! pages followed the activity +3.5 MiB (anonymous +2.3 MiB; main heap +1.7, arenas +0.1,
//! file-backed +1.3 MiB), against +5.2 MiB (arenas +1.5 MiB) with the server's file work on
//! tokio's blocking pool and the record check on every core. See the README's table.

#![allow(clippy::unwrap_used)] // bench code: a failed unwrap is a failed run
#![allow(clippy::expect_used)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::mpsc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

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
/// Snapshots taken per second during the activity, and for how long.
const SNAPSHOTS_PER_SECOND: usize = 5;
const ACTIVITY: Duration = Duration::from_secs(5);

/// Set in the client process this bench runs beside the server.
const CLIENT_ENV: &str = "CAIRN_WEB_BENCH_CLIENT";

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

/// The process's resident memory by where it sits, in KiB, from `/proc/self/smaps`: the main
/// heap (`brk`), glibc's per-thread malloc arenas (anonymous maps starting on a 64 MiB
/// boundary, as glibc aligns them), thread stacks (the main one and those behind a guard
/// page), the rest of the anonymous memory, and the file-backed pages (the binary's code and
/// data run or read for the first time; shared with any process running the same binary).
#[derive(Clone, Copy, Default)]
struct Where {
    heap: u64,
    arenas: u64,
    stacks: u64,
    other_anon: u64,
    files: u64,
}

fn where_kib() -> Where {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut at = Where::default();
    // (start, end, is a guard page (no access), name) of the map being read
    let mut map: Option<(u64, u64, String)> = None;
    let mut guard_end = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or_default();
            let name = fields.nth(3).unwrap_or_default().to_string();
            if let Some((_, end, name)) = &map
                && name == "guard"
            {
                guard_end = *end;
            }
            let name = if perms.starts_with("---") && name.is_empty() {
                "guard".to_string()
            } else {
                name
            };
            map = Some((start, end, name));
            continue;
        }
        if first != "Rss:" {
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let Some((start, end, name)) = &map else {
            continue;
        };
        let slot = match name.as_str() {
            "[heap]" => &mut at.heap,
            "[stack]" => &mut at.stacks,
            n if n.starts_with('/') => &mut at.files,
            "" if start % (64 << 20) == 0 => &mut at.arenas,
            "" if guard_end == *start && end - start >= 1 << 20 => &mut at.stacks,
            _ => &mut at.other_anon,
        };
        *slot += kib;
    }
    at
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
/// bench's idle publishers: an upper bound for the server).
async fn idle_cpu_percent() -> f64 {
    let (cpu, start) = (cpu_time(), Instant::now());
    tokio::time::sleep(IDLE).await;
    (cpu_time() - cpu).as_secs_f64() / start.elapsed().as_secs_f64() * 100.0
}

fn app_uuid(n: usize) -> Uuid {
    Uuid::from_u128(0xa000_0000 + n as u128)
}

/// Snapshot `s` of app `n`, taken.
fn snapshot(n: usize, s: usize) -> SnapshotInstanceStatus {
    let mut snapshot = SnapshotInstanceStatus {
        snapshot: SnapshotDesc {
            snapshot_id: Uuid::from_u128((n as u128) << 32 | s as u128),
            name: format!("nightly-{s}"),
            mode: SnapshotMode::Stopped,
            ..Default::default()
        },
        app_instance_id: app_uuid(n),
        time_triggered: Some(chrono::Utc::now()),
        time_created: Some(chrono::Utc::now()),
        ..Default::default()
    };
    snapshot.config_version.version = "1".into();
    snapshot
}

fn app(n: usize) -> AppInstanceStatus {
    let mut status = AppInstanceStatus {
        display_name: format!("app-{n:03}"),
        state: SwState::Running,
        ..Default::default()
    };
    status.uuid_and_version.uuid = app_uuid(n);
    status.uuid_and_version.version = "1".into();
    status.snap_status.available_snapshots = (0..SNAPSHOTS).map(|s| snapshot(n, s)).collect();
    status
}

/// Where the app-manager keeps a snapshot's record.
fn record_path(persist: &std::path::Path, s: &SnapshotInstanceStatus) -> std::path::PathBuf {
    cairn_types::layout::snapshots_dir(persist)
        .join(s.snapshot.snapshot_id.to_string())
        .join(cairn_types::layout::SNAPSHOT_INSTANCE_STATUS_FILE)
}

// The publisher's file work runs on the bench's main thread (`block_on`), not on the
// server's workers.
#[allow(clippy::disallowed_methods)]
fn write_record(persist: &std::path::Path, s: &SnapshotInstanceStatus) {
    let path = record_path(persist, s);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    cairn_persist::store_unsynced(&path, s).unwrap();
}

#[allow(clippy::disallowed_methods)]
fn remove_record(persist: &std::path::Path, s: &SnapshotInstanceStatus) {
    let path = record_path(persist, s);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// One open page: holds the event stream and, on each event, fetches `/content` again as the
/// page's script does (one fetch at a time; events during a fetch make one more).
fn open_page(addr: SocketAddr, events: Arc<AtomicU64>, fetches: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET /api/v1/events HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if line == "event: change" {
                events.fetch_add(1, Ordering::Relaxed);
                if tx.send(()).is_err() {
                    return;
                }
            }
        }
    });
    std::thread::spawn(move || {
        while rx.recv().is_ok() {
            while rx.try_recv().is_ok() {}
            get(addr, "/content", "Accept-Encoding: gzip\r\n");
            fetches.fetch_add(1, Ordering::Relaxed);
        }
    });
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

/// The client process: given the server's address on stdin, the timed requests, then the open
/// pages, each step when the server process says so on stdin (one word a line); it answers on
/// stdout, where the server process prints what is not an answer.
fn client() {
    let mut orders = std::io::stdin().lines();
    let addr: SocketAddr = orders.next().unwrap().unwrap().parse().unwrap();
    let mut order = |word: &str| {
        let line = orders.next().and_then(Result::ok);
        assert_eq!(line.as_deref(), Some(word), "the client's order");
    };
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
    println!("served {requests}");

    // 20 open pages, each counting the change events it receives and the contents it fetches.
    order("open");
    let events = Arc::new(AtomicU64::new(0));
    let fetches = Arc::new(AtomicU64::new(0));
    for _ in 0..PAGES {
        open_page(addr, events.clone(), fetches.clone());
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("open");
    order("count");
    println!(
        "counts {} {}",
        events.load(Ordering::Relaxed),
        fetches.load(Ordering::Relaxed)
    );
    // The pages stay open until the server process is done measuring (it closes stdin).
    let _ = orders.next();
}

/// Reads the client's output up to its answer `word`, printing the rest; returns what follows
/// the word.
async fn answer(from: &mut Lines<BufReader<ChildStdout>>, word: &str) -> String {
    loop {
        let line = from.next_line().await.unwrap();
        let line =
            line.unwrap_or_else(|| panic!("the client process ended before answering {word:?}"));
        let line = line.trim_end();
        match line.strip_prefix(word) {
            Some(rest) => return rest.trim().to_string(),
            None => println!("{line}"),
        }
    }
}

/// Tells the client process its next step.
async fn order(to: &mut ChildStdin, line: &str) {
    to.write_all(format!("{line}\n").as_bytes()).await.unwrap();
}

fn main() {
    if std::env::var_os(CLIENT_ENV).is_some() {
        return client();
    }
    // The server runs as `cairn up` runs it: on a current-thread runtime on the process's main
    // thread (`cairn up`'s `main` is `#[tokio::main(flavor = "current_thread")]`), here with
    // the publishers and this bench's steps beside it.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(server());
}

async fn server() {
    let root = tempfile::tempdir().unwrap();
    let roots = Roots::under(root.path());
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
        let status = app(n);
        for s in &status.snap_status.available_snapshots {
            write_record(&roots.persist, s);
        }
        apps.publish(status).await.unwrap();
    }
    // Every topic the page follows has its publisher, as on a device whose agents run.
    let volume_manager = Bus::new("volume-manager", &roots.run, &roots.persist);
    let _others = (
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
    // The statuses the activity below publishes, made before the first reading: they are the
    // publisher's, not the server's.
    let mut statuses: Vec<AppInstanceStatus> = (0..APPS).map(app).collect();
    // The clients' process, started before the first reading so that starting it is not
    // counted either.
    let mut clients = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env(CLIENT_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_clients = clients.stdin.take().unwrap();
    let mut from_clients = BufReader::new(clients.stdout.take().unwrap()).lines();
    // Read first: the reading's own scratch is then in the RSS read after it, every time.
    let before_where = where_kib();
    let before = rss_kib();

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = cairn_web::router(addr, roots.clone()).await.unwrap();
    let served = tokio::spawn(async move {
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

    order(&mut to_clients, &addr.to_string()).await;
    println!("web read-out, {APPS} apps x {SNAPSHOTS} snapshots, {REQUESTS} requests each:");
    let requests: usize = answer(&mut from_clients, "served").await.parse().unwrap();
    // Read first: the reading's own scratch is then in the RSS read after it, every time.
    let after_requests_where = where_kib();
    let after_requests = rss_kib();
    let idle_served = idle_cpu_percent().await;

    order(&mut to_clients, "open").await;
    answer(&mut from_clients, "open").await;
    let taken = (ACTIVITY.as_secs() as usize) * SNAPSHOTS_PER_SECOND;
    let step = Duration::from_secs(1) / (2 * SNAPSHOTS_PER_SECOND as u32);
    let start = Instant::now();
    for t in 0..taken {
        let n = t % APPS;
        let next = SNAPSHOTS + t / APPS;
        let status = &mut statuses[n];
        // Requested: listed with the app's requests.
        let mut new = snapshot(n, next);
        new.time_created = None;
        status.snap_status.requested_snapshots.push(new.clone());
        apps.publish(status.clone()).await.unwrap();
        tokio::time::sleep(step).await;
        // Taken: its record written, available; the oldest rotated out, its record gone.
        new.time_created = Some(chrono::Utc::now());
        write_record(&roots.persist, &new);
        status.snap_status.requested_snapshots.clear();
        status.snap_status.available_snapshots.push(new);
        let oldest = status.snap_status.available_snapshots.remove(0);
        remove_record(&roots.persist, &oldest);
        apps.publish(status.clone()).await.unwrap();
        tokio::time::sleep(step).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = start.elapsed().as_secs_f64();
    order(&mut to_clients, "count").await;
    let counts = answer(&mut from_clients, "counts").await;
    let (events, fetches) = counts.split_once(' ').unwrap();
    let (events, fetches): (u64, u64) = (events.parse().unwrap(), fetches.parse().unwrap());
    // Read first: the reading's own scratch is then in the RSS read after it, every time.
    let pages_open_where = where_kib();
    let pages_open = rss_kib();
    let idle_pages = idle_cpu_percent().await;
    println!(
        "  snapshot activity: {taken} snapshots in {elapsed:.1} s ({SNAPSHOTS_PER_SECOND}/s, \
         {} status changes/s): {events} events delivered to {PAGES} pages \
         ({:.1}/s per page, {:.0}/s in all), {fetches} contents fetched ({:.1}/s per page)",
        2 * SNAPSHOTS_PER_SECOND,
        events as f64 / elapsed / PAGES as f64,
        events as f64 / elapsed,
        fetches as f64 / elapsed / PAGES as f64
    );
    let grown = |(rss, anon): (u64, u64)| {
        format!(
            "{rss} KiB (+{} KiB, anonymous +{} KiB)",
            rss.saturating_sub(before.0),
            anon.saturating_sub(before.1)
        )
    };
    println!(
        "  server process RSS: {} KiB before the server, {} after {requests} requests, {} after {PAGES} pages \
         followed the snapshot activity",
        before.0,
        grown(after_requests),
        grown(pages_open)
    );
    let grown_where = |now: Where| {
        let d = |now: u64, then: u64| now as i64 - then as i64;
        format!(
            "main heap {:+}, malloc arenas {:+}, stacks {:+}, other anonymous {:+}, \
             file-backed {:+} KiB",
            d(now.heap, before_where.heap),
            d(now.arenas, before_where.arenas),
            d(now.stacks, before_where.stacks),
            d(now.other_anon, before_where.other_anon),
            d(now.files, before_where.files),
        )
    };
    println!(
        "  where it grew (smaps): after the requests {}; after the pages {}",
        grown_where(after_requests_where),
        grown_where(pages_open_where)
    );
    println!(
        "  idle CPU over {IDLE:?}: {idle_served:.2}% of one core with the page served, \
         {idle_pages:.2}% with {PAGES} pages open"
    );
    if let Some(pause) = std::env::var_os("CAIRN_WEB_BENCH_PAUSE") {
        // For a look at the server's /proc/PID/smaps with the pages open.
        println!("  pid {} paused {pause:?} s", std::process::id());
        tokio::time::sleep(Duration::from_secs(
            pause.to_str().unwrap().parse().unwrap(),
        ))
        .await;
    }
    drop(to_clients);
    assert!(
        clients.wait().await.unwrap().success(),
        "the client process failed"
    );
    let _ = stop.send(true);
    served.await.unwrap();
}

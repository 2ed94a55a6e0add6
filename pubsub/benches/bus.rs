//! Bus figures, all measured in one run against baselines measured in the same run:
//! - publish → subscriber event latency (p50/p99) for 256 B and 64 KiB values, next to the
//!   one-way time (echo round trip / 2) of the same bytes over a raw Unix socket pair;
//! - throughput of small updates for a run-root topic;
//! - durable updates of a persistent topic, group commit (64 publishers at once, each told
//!   only once its update is durable) vs the per-key write+fsync+rename+dir-fsync pattern of
//!   the same records in the same directory, and one publisher alone (a group of one);
//! - RSS of an idle process holding one publication and one subscription.
//!
//! `cargo bench -p cairn-pubsub --bench bus`. Targets: p50 ≤ 2× raw one-way; ≥ 100,000 small
//! run-root updates/s delivered; durable updates ≥ 3× the per-key pattern; idle pair < 5 MiB
//! RSS. Timing never fails the run. `CAIRN_BENCH_ONLY=durable` runs the durable part alone;
//! `CAIRN_BENCH_DIR` puts its files on another file system (default: the temp directory).

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up has nothing to report

use std::time::{Duration, Instant};

use cairn_persist::Persist;
use cairn_pubsub::{Bus, Event, PublishOptions, Subscription, Topic};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default)]
#[persist(record = "BenchStatus", version = 1)]
struct BenchStatus {
    #[persist(mandatory)]
    key: String,
    seq: u64,
    #[serde(with = "serde_bytes")]
    pad: Vec<u8>,
}

impl Topic for BenchStatus {
    const NAME: &'static str = "BenchStatus";
    fn key(&self) -> String {
        self.key.clone()
    }
}

fn value(key: &str, seq: u64, size: usize) -> BenchStatus {
    BenchStatus {
        key: key.to_string(),
        seq,
        pad: vec![0xab; size],
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn wait_seq(sub: &mut Subscription<BenchStatus>, key: &str, seq: u64) {
    loop {
        match sub.recv().await {
            Event::Create { value, .. } | Event::Modify { new: value, .. }
                if value.key == key && value.seq >= seq =>
            {
                return;
            }
            _ => {}
        }
    }
}

async fn bus_latency(root: &std::path::Path, size: usize, rounds: usize) -> Vec<Duration> {
    let run = root.join(format!("lat-{size}"));
    let bus = Bus::new("volume-manager", &run, root.join("persist"));
    let publication = bus
        .publish::<BenchStatus>(PublishOptions::default())
        .await
        .unwrap();
    let mut sub = Bus::new("app-manager", &run, root.join("persist"))
        .subscribe::<BenchStatus>("volume-manager");
    sub.wait_synchronized().await;
    let template = value("lat", 0, size);
    let mut samples = Vec::with_capacity(rounds);
    for seq in 1..=(rounds as u64 + 50) {
        let mut v = template.clone();
        v.seq = seq;
        let t = Instant::now();
        publication.publish(v).await.unwrap();
        wait_seq(&mut sub, "lat", seq).await;
        if seq > 50 {
            samples.push(t.elapsed());
        }
    }
    samples
}

/// One-way time of `size` bytes (framed like the bus) over a raw Unix socket: echo RTT / 2.
async fn raw_one_way(size: usize, rounds: usize) -> Vec<Duration> {
    let (mut client, mut server) = tokio::net::UnixStream::pair().unwrap();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if server.read_exact(&mut len).await.is_err() {
                return;
            }
            buf.resize(u32::from_be_bytes(len) as usize, 0);
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(&len).await.unwrap();
            server.write_all(&buf).await.unwrap();
        }
    });
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(0xabu8, size));
    let mut back = vec![0u8; frame.len()];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + 50 {
        let t = Instant::now();
        client.write_all(&frame).await.unwrap();
        client.read_exact(&mut back).await.unwrap();
        if i >= 50 {
            samples.push(t.elapsed() / 2);
        }
    }
    samples
}

/// Publishes `updates` small values over `keys` keys; returns (elapsed until the subscriber
/// holds every key's last value, events the subscriber received).
async fn throughput(
    root: &std::path::Path,
    persistent: bool,
    updates: u64,
    keys: u64,
) -> (Duration, u64) {
    let run = root.join(format!("tp-{persistent}"));
    let persist = root.join(format!("tp-persist-{persistent}"));
    let bus = Bus::new("config-agent", &run, &persist);
    let publication = bus
        .publish::<BenchStatus>(PublishOptions {
            persistent,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut sub = Bus::new("app-manager", &run, &persist).subscribe::<BenchStatus>("config-agent");
    sub.wait_synchronized().await;
    let names: Vec<String> = (0..keys).map(|k| format!("k{k}")).collect();
    let counter = tokio::spawn(async move {
        let mut events = 0u64;
        let mut done = 0u64;
        let last_round = updates - keys;
        while done < keys {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } = sub.recv().await
            {
                events += 1;
                if value.seq >= last_round {
                    done += 1;
                }
            }
        }
        events
    });
    let t = Instant::now();
    for seq in 0..updates {
        let key = &names[(seq % keys) as usize];
        publication.publish(value(key, seq, 16)).await.unwrap();
    }
    let events = counter.await.unwrap();
    (t.elapsed(), events)
}

/// Durable updates/s: `publishers` tasks each publish `per_publisher` updates of their own key,
/// one after another; each publish returns once its update is durable.
async fn durable_updates(
    root: &std::path::Path,
    publishers: u64,
    per_publisher: u64,
) -> (f64, cairn_pubsub::CommitStats) {
    let run = root.join(format!("durable-run-{publishers}"));
    let persist = root.join(format!("durable-persist-{publishers}"));
    let publication = std::sync::Arc::new(
        Bus::new("config-agent", &run, &persist)
            .publish::<BenchStatus>(PublishOptions {
                persistent: true,
                ..Default::default()
            })
            .await
            .unwrap(),
    );
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let publication = publication.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{p}");
            for seq in 0..per_publisher {
                publication.publish(value(&key, seq, 256)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rate = (publishers * per_publisher) as f64 / t.elapsed().as_secs_f64();
    (rate, publication.commit_stats())
}

/// The per-key pattern a persistent topic used before group commit, on the same records in
/// the same kind of directory: encode, write a temporary file, fsync, rename, fsync the
/// directory; one update after another.
fn per_key_pattern(root: &std::path::Path, keys: u64, updates: u64) -> f64 {
    let dir = root.join("pattern");
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    for seq in 0..updates {
        let key = format!("k{}", seq % keys);
        cairn_persist::store(&dir.join(format!("{key}.json")), &value(&key, seq, 256)).unwrap();
    }
    updates as f64 / t.elapsed().as_secs_f64()
}

fn durable(runtime: &tokio::runtime::Runtime, root: &std::path::Path) {
    let root = match std::env::var_os("CAIRN_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir_in(root).unwrap(),
    };
    let root = root.path();
    println!(
        "durable updates of a persistent topic, 256 B values, on {}",
        root.display()
    );
    let pattern = per_key_pattern(root, 64, 600);
    let (alone, _) = runtime.block_on(durable_updates(root, 1, 600));
    let (grouped, stats) = runtime.block_on(durable_updates(root, 64, 40));
    let pattern_after = per_key_pattern(root, 64, 600);
    let baseline = (pattern + pattern_after) / 2.0;
    println!(
        "  per-key write+fsync+rename+dir-fsync, 600 updates over 64 keys: {pattern:.0} / {pattern_after:.0} updates/s (before / after)"
    );
    println!(
        "  bus, one publisher, 600 updates: {alone:.0} updates/s ({:.2}x the pattern)",
        alone / baseline
    );
    println!(
        "  bus, 64 publishers x 40 updates: {grouped:.0} updates/s, {} groups of {:.1} on average: {:.2}x the pattern (target >= 3x)",
        stats.groups,
        stats.updates as f64 / stats.groups.max(1) as f64,
        grouped / baseline
    );
}

fn idle_pair_child(root: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let run = std::path::Path::new(root).join("idle");
        let publication = Bus::new("volume-manager", &run, root)
            .publish::<BenchStatus>(PublishOptions::default())
            .await
            .unwrap();
        for k in 0..10 {
            publication
                .publish(value(&format!("k{k}"), 0, 256))
                .await
                .unwrap();
        }
        let mut sub =
            Bus::new("app-manager", &run, root).subscribe::<BenchStatus>("volume-manager");
        sub.wait_synchronized().await;
        println!("READY");
        std::future::pending::<()>().await;
    });
}

fn idle_pair_rss_kib(root: &std::path::Path) -> u64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--idle-pair", root.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--idle-pair") {
        idle_pair_child(&args[i + 1]);
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("CAIRN_BENCH_ONLY").as_deref() == Ok("durable") {
        durable(&runtime, root.path());
        return;
    }

    println!("bus bench (2 worker threads, one process, real Unix sockets)");
    println!("{:<44} {:>10} {:>10}", "latency", "p50 µs", "p99 µs");
    let mut ratios = Vec::new();
    for (size, rounds) in [(256usize, 3000usize), (64 << 10, 1000)] {
        let mut bus = runtime.block_on(bus_latency(root.path(), size, rounds));
        let mut raw = runtime.block_on(raw_one_way(size, rounds));
        let (b50, b99) = (percentile(&mut bus, 0.5), percentile(&mut bus, 0.99));
        let (r50, r99) = (percentile(&mut raw, 0.5), percentile(&mut raw, 0.99));
        println!(
            "{:<44} {:>10.1} {:>10.1}",
            format!("publish -> subscriber event, {size} B"),
            us(b50),
            us(b99)
        );
        println!(
            "{:<44} {:>10.1} {:>10.1}",
            format!("raw unix socket one-way (echo/2), {size} B"),
            us(r50),
            us(r99)
        );
        let ratio = us(b50) / us(r50);
        println!("{:<44} {:>10.2}x (target <= 2x)", "  ratio p50", ratio);
        ratios.push(ratio);
    }

    let (elapsed, events) = runtime.block_on(throughput(root.path(), false, 300_000, 1000));
    let rate = 300_000.0 / elapsed.as_secs_f64();
    println!(
        "run-root topic: 300000 updates over 1000 keys in {:.0} ms: {:.0} updates/s delivered \
         ({events} events reached the subscriber, the rest coalesced) (target >= 100000/s)",
        elapsed.as_secs_f64() * 1e3,
        rate
    );
    durable(&runtime, root.path());

    let rss = idle_pair_rss_kib(root.path());
    println!(
        "idle process with one publication and one subscription: RSS {:.2} MiB (target < 5 MiB)",
        rss as f64 / 1024.0
    );
}

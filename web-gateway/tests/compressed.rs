//! The bodies the read-out keeps compressed: a client that takes gzip gets them compressed, one
//! that does not gets the same bytes plain, and a change on the bus still reaches an open page
//! (its followers keep digests, not tables). Real bus publications, the real server on
//! loopback, plain HTTP/1.1 over TCP.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use cairn_pubsub::{Bus, PublishOptions};
use cairn_readout::readout::Roots;
use cairn_types::snapshot::{SnapshotDesc, SnapshotInstanceStatus, SnapshotMode};
use cairn_types::{AppInstanceStatus, DeviceStatus, SwState};
use uuid::Uuid;

fn app(n: u128, restarts: u32) -> AppInstanceStatus {
    let mut status = AppInstanceStatus {
        display_name: format!("app-{n:03}"),
        state: SwState::Running,
        restarts,
        ..Default::default()
    };
    let uuid = Uuid::from_u128(0xa000_0000 + n);
    status.uuid_and_version.uuid = uuid;
    status.uuid_and_version.version = "1".into();
    for s in 0..5 {
        let mut snapshot = SnapshotInstanceStatus {
            snapshot: SnapshotDesc {
                snapshot_id: Uuid::from_u128(n << 32 | s),
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

/// (head, body) of one GET.
fn get(addr: SocketAddr, path: &str, extra: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
    let mut body = answer[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = unchunk(&body);
    }
    (head, body)
}

fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut text)
        .unwrap();
    text
}

#[test]
fn gzip_takers_get_the_same_bytes_compressed_and_changes_still_reach_open_pages() {
    let root = tempfile::tempdir().unwrap();
    let roots = Roots::under(root.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_device, apps) = runtime.block_on(async {
        let device = Bus::new("config-agent", &roots.run, &roots.persist)
            .publish::<DeviceStatus>(PublishOptions::default())
            .await
            .unwrap();
        device.publish(DeviceStatus::default()).await.unwrap();
        let apps = Bus::new("app-manager", &roots.run, &roots.persist)
            .publish::<AppInstanceStatus>(PublishOptions::default())
            .await
            .unwrap();
        for n in 0..20 {
            apps.publish(app(n, 0)).await.unwrap();
        }
        (device, apps)
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let router = runtime
        .block_on(cairn_web::router(addr, roots.clone()))
        .unwrap();
    runtime.spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });

    // The three requests of one attempt share a rendering unless the change counter moved
    // between them (the followers' first sync may still be arriving) or the rendering expired:
    // then the text may differ (the disk's free bytes, "0 s ago"), and the comparison is made
    // again on the next rendering, five times at most.
    for path in ["/", "/content", "/api/v1/status", "/api/v1/snapshots"] {
        for attempt in 0.. {
            let (head, plain) = get(addr, path, "");
            assert!(!head.contains("content-encoding"), "{path}: {head}");
            // Sent with its length, not chunked: the simplest client reads it whole.
            assert!(
                head.contains(&format!("content-length: {}", plain.len())),
                "{path}: {head}"
            );
            assert!(head.contains("vary: accept-encoding"), "{path}: {head}");
            let (head, gzip) = get(addr, path, "Accept-Encoding: br, gzip;q=0.8\r\n");
            assert!(head.contains("content-encoding: gzip"), "{path}: {head}");
            assert!(
                gzip.len() * 4 < plain.len(),
                "{path}: {} compressed bytes of {}",
                gzip.len(),
                plain.len()
            );
            // A client that refuses gzip gets it plain.
            let (head, refused) = get(addr, path, "Accept-Encoding: gzip;q=0\r\n");
            assert!(!head.contains("content-encoding"), "{path}: {head}");
            if attempt < 4 && (gunzip(&gzip) != plain || refused != plain) {
                continue;
            }
            assert_eq!(gunzip(&gzip), plain, "{path}: the same bytes");
            assert_eq!(refused, plain, "{path}");
            break;
        }
    }
    let (_, status) = get(addr, "/api/v1/status", "");
    let status = String::from_utf8(status).unwrap();
    assert!(
        status.ends_with("}\n") && status.contains("\"app-019\""),
        "{status}"
    );

    // An open page learns of a change, and the next body shows it.
    let mut events = TcpStream::connect(addr).unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(events, "GET /api/v1/events HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut events = BufReader::new(events);
    let mut line = String::new();
    while line.trim_end() != "" {
        line.clear();
        events.read_line(&mut line).unwrap();
    }
    runtime.block_on(apps.publish(app(7, 41))).unwrap();
    // A change noticed before this one (the followers' first sync may still be arriving) may
    // come first: each event is followed by a read, until one shows the change. No event
    // within the stream's 30 s read timeout fails the test.
    let mut status = String::new();
    for _ in 0..20 {
        line.clear();
        assert_ne!(
            events.read_line(&mut line).unwrap(),
            0,
            "event stream ended"
        );
        if line.trim_end() != "event: change" {
            continue;
        }
        let (_, gzip) = get(addr, "/api/v1/status", "Accept-Encoding: gzip\r\n");
        status = String::from_utf8(gunzip(&gzip)).unwrap();
        if status.contains("\"Restarts\": 41") {
            return;
        }
    }
    panic!("no change event was followed by a body showing the change: {status}");
}

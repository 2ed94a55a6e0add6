//! The bus within one process: event order, re-publish, resync, size, persistence, coalescing,
//! scale, socket ownership, and garbage from peers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::io::Write as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_pubsub::{BusError, Event, PublishOptions, frame};
use support::{Roots, TestStatus, assert_quiet, next, status, until};
use tokio::io::AsyncWriteExt;

fn created(key: &str, value: u64) -> Event<TestStatus> {
    Event::Create {
        key: key.into(),
        value: status(key, value),
    }
}

#[tokio::test]
async fn subscriber_gets_the_table_then_synchronized_then_live_changes_in_order() {
    let roots = Roots::new();
    let publisher = roots.bus("volume-manager");
    let publication = publisher
        .publish::<TestStatus>(PublishOptions::default())
        .await
        .unwrap();
    publication.publish(status("a", 1)).await.unwrap();
    publication.publish(status("b", 2)).await.unwrap();

    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut sub).await, created("a", 1));
    assert_eq!(next(&mut sub).await, created("b", 2));
    assert_eq!(next(&mut sub).await, Event::Synchronized);

    publication.publish(status("a", 10)).await.unwrap();
    publication.unpublish("b").await.unwrap();
    publication.publish(status("c", 3)).await.unwrap();
    publication.signal_restarted().await.unwrap();
    assert_eq!(
        next(&mut sub).await,
        Event::Modify {
            key: "a".into(),
            old: status("a", 1),
            new: status("a", 10),
            skipped: 0
        }
    );
    assert_eq!(
        next(&mut sub).await,
        Event::Delete {
            key: "b".into(),
            last: status("b", 2)
        }
    );
    assert_eq!(next(&mut sub).await, created("c", 3));
    assert_eq!(next(&mut sub).await, Event::Restarted);
    assert_eq!(sub.get("a"), Some(&status("a", 10)));
    assert_eq!(sub.get("b"), None);
}

#[tokio::test]
async fn an_equal_value_is_not_sent_again_but_republish_delivers_it() {
    let roots = Roots::new();
    let publication = roots.publish("app-manager").await;
    publication.publish(status("rollback", 1)).await.unwrap();
    let mut sub = roots
        .bus("volume-manager")
        .subscribe::<TestStatus>("app-manager");
    until(&mut sub, |e| *e == Event::Synchronized).await;

    publication.publish(status("rollback", 1)).await.unwrap();
    assert_quiet(&mut sub, Duration::from_millis(200)).await;

    publication.republish(status("rollback", 1)).await.unwrap();
    assert_eq!(
        next(&mut sub).await,
        Event::Modify {
            key: "rollback".into(),
            old: status("rollback", 1),
            new: status("rollback", 1),
            skipped: 0
        }
    );
}

/// A follower that only notices changes keeps a digest per key, yet sees every change a full
/// subscriber sees: a changed value, an explicit re-publish, a removal.
#[tokio::test]
async fn a_notice_follower_keeps_digests_and_sees_every_change() {
    let roots = Roots::new();
    let publication = roots.publish("app-manager").await;
    publication.publish(status("a", 1)).await.unwrap();
    let mut sub = roots.bus("web").notice::<TestStatus>("app-manager");
    let first = match next(&mut sub).await {
        Event::Create { key, value } if key == "a" => value,
        other => panic!("expected a's creation, got {other:?}"),
    };
    assert_eq!(next(&mut sub).await, Event::Synchronized);
    assert_eq!(sub.get("a"), Some(&first));

    publication.publish(status("a", 2)).await.unwrap();
    let second = match next(&mut sub).await {
        Event::Modify { key, old, new, .. } if key == "a" && old == first => new,
        other => panic!("expected a's change, got {other:?}"),
    };
    assert_ne!(first, second, "a changed value has another digest");

    publication.republish(status("a", 2)).await.unwrap();
    assert_eq!(
        next(&mut sub).await,
        Event::Modify {
            key: "a".into(),
            old: second,
            new: second,
            skipped: 0
        }
    );
    publication.unpublish("a").await.unwrap();
    assert_eq!(
        next(&mut sub).await,
        Event::Delete {
            key: "a".into(),
            last: second
        }
    );
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn two_subscribers_each_get_everything() {
    let roots = Roots::new();
    let publication = roots.publish("domain-manager").await;
    let mut first = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("domain-manager");
    let mut second = roots.bus("cli").subscribe::<TestStatus>("domain-manager");
    assert_eq!(next(&mut first).await, Event::Synchronized);
    assert_eq!(next(&mut second).await, Event::Synchronized);
    publication.publish(status("vm", 7)).await.unwrap();
    assert_eq!(next(&mut first).await, created("vm", 7));
    assert_eq!(next(&mut second).await, created("vm", 7));
    assert_eq!(publication.subscribers().len(), 2);
}

#[tokio::test]
async fn a_new_subscriber_gets_the_full_table() {
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    for i in 0..50 {
        publication
            .publish(status(&format!("k{i:02}"), i))
            .await
            .unwrap();
    }
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    until(&mut sub, |e| *e == Event::Synchronized).await;
    drop(sub);
    publication.unpublish("k07").await.unwrap();

    let mut again = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    let events = until(&mut again, |e| *e == Event::Synchronized).await;
    let creates = events
        .iter()
        .filter(|e| matches!(e, Event::Create { .. }))
        .count();
    assert_eq!(creates, 49);
    assert_eq!(again.len(), 49);
    assert!(again.get("k07").is_none());
}

#[tokio::test]
async fn a_sixteen_mib_value_is_delivered_whole_and_its_file_is_not_written_after_the_drop() {
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut sub).await, Event::Synchronized);
    let big = TestStatus {
        name: "big".into(),
        value: 1,
        blob: "z".repeat(16 << 20),
        ..Default::default()
    };
    publication.publish(big.clone()).await.unwrap();
    match next(&mut sub).await {
        Event::Create { value, .. } => assert_eq!(value, big),
        other => panic!("expected the big value, got {other:?}"),
    }
    // Its 16 MiB key file is written behind, on the blocking pool: once the publication is
    // dropped nothing may be written (a write that ran on made the run directory again).
    drop(sub);
    drop(publication);
    let root = roots.dir.path().to_path_buf();
    drop(roots);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !root.exists(),
        "a key file was written after the publication was dropped"
    );
}

#[tokio::test]
async fn a_persistent_publication_survives_a_wiped_run_root() {
    let roots = Roots::new();
    let options = PublishOptions {
        persistent: true,
        ..Default::default()
    };
    {
        let publication = roots
            .bus("app-manager")
            .publish::<TestStatus>(options.clone())
            .await
            .unwrap();
        publication.publish(status("app", 3)).await.unwrap();
        publication.publish(status("gone", 4)).await.unwrap();
        publication.unpublish("gone").await.unwrap();
    }
    // A reboot: /run is empty again, /persist is kept.
    std::fs::remove_dir_all(roots.run()).unwrap();
    let reopened = roots
        .bus("app-manager")
        .publish::<TestStatus>(options)
        .await
        .unwrap();
    assert_eq!(reopened.keys(), vec!["app".to_string()]);
    let mut sub = roots.bus("cli").subscribe::<TestStatus>("app-manager");
    assert_eq!(next(&mut sub).await, created("app", 3));
    assert!(
        roots
            .persist()
            .join("status/app-manager/TestStatus/app.json")
            .is_file()
    );
}

#[tokio::test]
async fn a_restarted_publisher_reloads_its_run_root_table_and_reports_unreadable_files() {
    let roots = Roots::new();
    {
        let publication = roots.publish("volume-manager").await;
        publication.publish(status("v1", 1)).await.unwrap();
        publication.flush().await.unwrap();
    }
    let dir = roots.run().join("volume-manager/TestStatus");
    std::fs::write(dir.join("broken.json"), "{\"schema\": ").unwrap();
    let publication = roots.publish("volume-manager").await;
    assert_eq!(publication.get("v1"), Some(status("v1", 1)));
    let problems = publication.load_problems();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].0.ends_with("broken.json"));
    assert!(problems[0].1.contains("truncated"), "{}", problems[0].1);
}

/// A run-root key file that cannot be written (a directory in its place here; EIO or a full
/// run file system on a device) is written once it can, with no further publish: before, the
/// value was delivered but its file kept the older one, which a restarted publisher reloads.
#[tokio::test]
async fn a_key_file_that_could_not_be_written_is_written_once_it_can() {
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    publication.publish(status("v1", 1)).await.unwrap();
    publication.flush().await.unwrap();
    let dir = roots.run().join("volume-manager/TestStatus");
    let blocker = dir.join("v2.json");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("in-the-way"), "x").unwrap();

    publication.publish(status("v2", 2)).await.unwrap();
    let failed = publication.flush().await;
    assert!(failed.is_err(), "the blocked key file was reported written");
    assert!(failed.unwrap_err().to_string().contains("v2"));
    // The publication's own flush fails too meanwhile (it runs 20 ms after a publish).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocker.is_file());

    std::fs::remove_dir_all(&blocker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !blocker.is_file() {
        assert!(Instant::now() < deadline, "the key file was never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(publication);
    let reopened = roots.publish("volume-manager").await;
    assert_eq!(reopened.get("v2"), Some(status("v2", 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_costs_at_most_one_pending_value_per_key() {
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut sub).await, Event::Synchronized);

    // The subscriber does not read while 200,000 updates to 10 keys are published, each
    // carrying 1 KiB so the socket buffers fill quickly.
    let pad = "p".repeat(1024);
    let keys = 10u64;
    for i in 0..200_000u64 {
        let key = format!("k{}", i % keys);
        publication
            .publish(TestStatus {
                name: key,
                value: i,
                blob: pad.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let stats = publication.subscribers();
    assert_eq!(stats.len(), 1);
    assert!(stats[0].pending <= keys as usize, "{stats:?}");
    assert!(stats[0].skipped > 100_000, "{stats:?}");

    // Catching up yields the latest value of every key, with the skips visible.
    let mut skipped_seen = 0;
    loop {
        let event = next(&mut sub).await;
        if let Event::Modify { skipped, .. } = event {
            skipped_seen += skipped;
        }
        if (0..keys).all(|k| {
            sub.get(&format!("k{k}"))
                .is_some_and(|v| v.value == 200_000 - keys + k)
        }) {
            break;
        }
    }
    assert!(skipped_seen > 0);
    assert!(sub.stats().skipped > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_publications_in_one_process_each_reach_their_subscriber() {
    let roots = Roots::new();
    let mut publications = Vec::new();
    let mut subs = Vec::new();
    for i in 0..1000 {
        let agent = format!("agent{i:04}");
        let publication = roots
            .bus(&agent)
            .publish::<TestStatus>(PublishOptions::default())
            .await
            .unwrap();
        publication.publish(status("k", i)).await.unwrap();
        publications.push(publication);
        subs.push(roots.bus("reader").subscribe::<TestStatus>(&agent));
    }
    let started = Instant::now();
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(next(sub).await, created("k", i as u64));
        assert_eq!(next(sub).await, Event::Synchronized);
    }
    eprintln!(
        "1000 publications synchronized {:?} after the last open",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_publisher_is_not_stolen() {
    let roots = Roots::new();
    let dir = roots.run().join("volume-manager");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("TestStatus.sock");
    // A dead publisher's socket: the file stays, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(StdUnixStream::connect(&socket).is_err());

    let bus = roots.bus("volume-manager");
    let live = bus
        .publish::<TestStatus>(PublishOptions::default())
        .await
        .unwrap();
    live.publish(status("x", 1)).await.unwrap();
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut sub).await, created("x", 1));
    assert_eq!(next(&mut sub).await, Event::Synchronized);

    match bus.publish::<TestStatus>(PublishOptions::default()).await {
        Err(err @ BusError::AlreadyPublished { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("volume-manager/TestStatus")
                    && text.contains(&format!("pid {}", std::process::id())),
                "{text}"
            );
        }
        Err(other) => panic!("expected AlreadyPublished, got {other}"),
        Ok(_) => panic!("a second publisher took a live topic"),
    }
    // The live publisher still serves.
    live.publish(status("x", 2)).await.unwrap();
    let event = next(&mut sub).await;
    assert!(matches!(event, Event::Modify { .. }), "{event:?}");
}

/// Collects tracing output so tests can assert the log line a fault produced.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        let capture = Self::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (capture, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn garbage_from_peers_is_dropped_with_a_log_line_and_disturbs_no_subscriber() {
    let (logs, _guard) = LogCapture::install();
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    let mut good = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut good).await, Event::Synchronized);
    let socket = publication.socket_path().to_path_buf();

    // Plain garbage instead of a hello.
    let mut garbage = StdUnixStream::connect(&socket).unwrap();
    garbage.write_all(b"\x00\x00\x00\x05hello world").unwrap();
    // A length prefix claiming 4 GiB.
    let mut huge = StdUnixStream::connect(&socket).unwrap();
    huge.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    // A frame cut short, then the peer leaves.
    let mut cut = StdUnixStream::connect(&socket).unwrap();
    cut.write_all(&[0, 0, 0, 40, 1, 2, 3]).unwrap();
    drop(cut);
    // A valid hello, then bytes a subscriber must never send.
    let mut writer = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut hello = Vec::new();
    frame::encode_into(
        &mut hello,
        &frame::Hello::Subscribe {
            protocol: frame::PROTOCOL,
            topic: "TestStatus".into(),
        },
    )
    .unwrap();
    writer.write_all(&hello).await.unwrap();
    writer.write_all(b"let me write").await.unwrap();

    publication.publish(status("still", 1)).await.unwrap();
    assert_eq!(next(&mut good).await, created("still", 1));

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = logs.text();
        let all = text.contains("bad hello: malformed frame")
            && text.contains("exceeds the 65536 byte limit")
            && text.contains("in the middle of a 40 byte frame")
            && text.contains("wrote to a read-only topic");
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "missing log lines in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        publication.subscribers().len(),
        1,
        "only the good subscriber remains"
    );
    drop((garbage, huge));
}

#[tokio::test]
async fn a_subscriber_drops_a_publisher_that_sends_malformed_frames_and_reconnects() {
    let (logs, _guard) = LogCapture::install();
    let roots = Roots::new();
    let dir = roots.run().join("fake");
    std::fs::create_dir_all(&dir).unwrap();
    let listener = tokio::net::UnixListener::bind(dir.join("TestStatus.sock")).unwrap();
    let mut sub = roots.bus("app-manager").subscribe::<TestStatus>("fake");

    // Another topic from a real publisher must be unaffected throughout.
    let real = roots.publish("volume-manager").await;
    let mut other = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    assert_eq!(next(&mut other).await, Event::Synchronized);

    // The fake publisher: each connection gets a welcome, one good update, then a frame whose
    // body is not MessagePack of any frame.
    let fake = tokio::spawn(async move {
        for round in 0..2u64 {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            frame::encode_into(
                &mut buf,
                &frame::ServerFrame::Welcome {
                    protocol: frame::PROTOCOL,
                    topic: "TestStatus".into(),
                    publisher: "fake".into(),
                    epoch: 1,
                },
            )
            .unwrap();
            frame::encode_into(
                &mut buf,
                &frame::ServerFrame::Update {
                    key: format!("ok{round}"),
                    value: &frame::encode_value(&status(&format!("ok{round}"), round)).unwrap(),
                    skipped: 0,
                    repeat: false,
                },
            )
            .unwrap();
            buf.extend_from_slice(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]);
            conn.write_all(&buf).await.unwrap();
            // Keep the connection open: the subscriber must be the one to drop it.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(conn);
            });
        }
    });
    assert_eq!(next(&mut sub).await, created("ok0", 0));
    assert_eq!(next(&mut sub).await, created("ok1", 1));
    fake.await.unwrap();
    // The second connection proves the subscriber reconnected after dropping the first.
    assert!(sub.stats().dropped_connections >= 1);
    assert!(
        logs.text()
            .contains("dropping the connection: malformed frame"),
        "{}",
        logs.text()
    );

    real.publish(status("fine", 1)).await.unwrap();
    assert_eq!(next(&mut other).await, created("fine", 1));
}

#[tokio::test]
async fn the_restart_barrier_removes_reloaded_keys_that_were_not_published_again() {
    let roots = Roots::new();
    {
        let publication = roots.publish("domain-manager").await;
        for key in ["kept", "changed", "stale"] {
            publication.publish(status(key, 1)).await.unwrap();
        }
    }
    let publication = roots.publish("domain-manager").await;
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("domain-manager");
    let table = until(&mut sub, |e| *e == Event::Synchronized).await;
    assert_eq!(
        table.len(),
        4,
        "the reloaded table is served at once: {table:?}"
    );

    publication.publish(status("kept", 1)).await.unwrap();
    publication.publish(status("changed", 2)).await.unwrap();
    publication.signal_restarted().await.unwrap();
    let events = until(&mut sub, |e| *e == Event::Restarted).await;
    assert_eq!(
        events,
        vec![
            Event::Modify {
                key: "changed".into(),
                old: status("changed", 1),
                new: status("changed", 2),
                skipped: 0
            },
            Event::Delete {
                key: "stale".into(),
                last: status("stale", 1)
            },
            Event::Restarted,
        ]
    );
    publication.flush().await.unwrap();
    assert!(
        !roots
            .run()
            .join("domain-manager/TestStatus/stale.json")
            .exists()
    );
}

/// A fake publisher on `<run>/fake/TestStatus.sock`, for tests of what a subscriber does with
/// a publisher's misbehaviour.
fn fake_publisher(roots: &Roots) -> tokio::net::UnixListener {
    let dir = roots.run().join("fake");
    std::fs::create_dir_all(&dir).unwrap();
    tokio::net::UnixListener::bind(dir.join("TestStatus.sock")).unwrap()
}

fn welcome() -> Vec<u8> {
    let mut buf = Vec::new();
    frame::encode_into(
        &mut buf,
        &frame::ServerFrame::Welcome {
            protocol: frame::PROTOCOL,
            topic: "TestStatus".into(),
            publisher: "fake".into(),
            epoch: 1,
        },
    )
    .unwrap();
    buf
}

#[tokio::test]
async fn a_subscriber_refused_again_and_again_logs_it_once() {
    let (logs, _guard) = LogCapture::install();
    let roots = Roots::new();
    let listener = fake_publisher(&roots);
    let mut sub = roots.bus("app-manager").subscribe::<TestStatus>("fake");
    let fake = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            frame::encode_into(
                &mut buf,
                &frame::ServerFrame::Refused {
                    reason: "uid 1000 may not read TestStatus".into(),
                },
            )
            .unwrap();
            let _ = conn.write_all(&buf).await;
        }
    });
    for _ in 0..5 {
        assert!(matches!(next(&mut sub).await, Event::Refused { .. }));
    }
    let text = logs.text();
    let warned = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refused by the publisher"))
        .count();
    assert_eq!(warned, 1, "five refusals, one warning:\n{text}");
    fake.abort();
}

#[tokio::test]
async fn a_subscriber_allocates_for_bytes_received_not_for_a_declared_frame_length() {
    let (logs, _guard) = LogCapture::install();
    let roots = Roots::new();
    let listener = fake_publisher(&roots);
    let mut sub = roots.bus("app-manager").subscribe::<TestStatus>("fake");
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let fake = tokio::spawn(async move {
        // First connection: a good update, then a frame declaring the cap of which only a few
        // bytes ever come; all in one write, so the declaration is in the subscriber's buffer
        // when the update is handed out.
        let (mut first, _) = listener.accept().await.unwrap();
        let mut buf = welcome();
        frame::encode_into(
            &mut buf,
            &frame::ServerFrame::Update {
                key: "ok".into(),
                value: &frame::encode_value(&status("ok", 1)).unwrap(),
                skipped: 0,
                repeat: false,
            },
        )
        .unwrap();
        buf.extend_from_slice(&(frame::MAX_FRAME as u32).to_be_bytes());
        buf.extend_from_slice(&[0x82, 0xa1, b'x']);
        first.write_all(&buf).await.unwrap();
        first_tx.send(first).unwrap();
        // Second connection: a length over the cap (4 GiB).
        let (mut second, _) = listener.accept().await.unwrap();
        let mut buf = welcome();
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        second.write_all(&buf).await.unwrap();
        second
    });
    assert_eq!(next(&mut sub).await, created("ok", 1));
    let first = first_rx.await.unwrap();
    // The declared frame never completes: this recv can only wait.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.recv())
            .await
            .is_err()
    );
    assert!(
        sub.buffer_capacity() < 1 << 20,
        "a declared {} byte frame reserved {} bytes",
        frame::MAX_FRAME,
        sub.buffer_capacity()
    );

    // The publisher leaves mid-frame; on the next connection it declares more than the cap:
    // that connection is dropped with a log line too, and the subscriber goes on.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !logs.text().contains("exceeds the") {
        assert!(Instant::now() < deadline, "no log line:\n{}", logs.text());
        let _ = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await;
    }
    assert!(sub.stats().dropped_connections >= 2);
    let second = fake.await.unwrap();
    drop(second);
}

/// Every record published again at an agent's start comes as one burst of durable updates; the
/// group-commit queue, which holds whole values, must not keep room for the burst afterwards.
#[tokio::test]
async fn a_burst_of_durable_updates_does_not_keep_its_peak_in_the_commit_queue() {
    let roots = Roots::new();
    let publication = std::sync::Arc::new(
        roots
            .bus("app-manager")
            .publish::<TestStatus>(PublishOptions {
                persistent: true,
                ..Default::default()
            })
            .await
            .unwrap(),
    );
    let burst: Vec<_> = (0..2000u64)
        .map(|i| {
            let publication = publication.clone();
            tokio::spawn(async move { publication.publish(status(&format!("k{i}"), i)).await })
        })
        .collect();
    for update in burst {
        update.await.unwrap().unwrap();
    }
    assert_eq!(publication.keys().len(), 2000);
    assert!(
        publication.commit_queue_capacity() < 128,
        "the queue keeps room for {} updates after the burst",
        publication.commit_queue_capacity()
    );
}

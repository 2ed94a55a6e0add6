//! The bus across real processes: a publisher SIGKILLed and restarted with fewer keys, a
//! subscriber process restarted, and access control against children running as other uids.
//!
//! Children are this test binary re-executed on the ignored test `bus_child`, configured by
//! environment; they report on stdout with lines starting `BUS `.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cairn_pubsub::{Access, Bus, Event, PublishOptions};
use support::{Roots, TestStatus, next, status, tenant_status, until};

const ROLE: &str = "CAIRN_BUS_CHILD";
const AGENT: &str = "CAIRN_BUS_AGENT";
const KEYS: &str = "CAIRN_BUS_KEYS";
const CREDS: &str = "CAIRN_BUS_CREDS"; // uid:gid:group,group
const NO_BARRIER: &str = "CAIRN_BUS_NO_BARRIER";
/// The publisher writes its key files through (`PublishOptions::for_requests`).
const WRITE_THROUGH: &str = "CAIRN_BUS_WRITE_THROUGH";
/// The publisher then publishes key `a` again with each value from 2 up to this one.
const BUMP_A_TO: &str = "CAIRN_BUS_BUMP_A_TO";
const TECHNICIANS: u32 = 4242;

// ---- the child side ----

#[test]
#[ignore = "runs only as a child process of the other tests"]
fn bus_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    if let Ok(creds) = std::env::var(CREDS) {
        drop_privileges(&creds);
    }
    let agent = std::env::var(AGENT).unwrap();
    let bus = Bus::from_env(if role == "publisher" {
        agent.as_str()
    } else {
        "reader"
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        match role.as_str() {
            "publisher" => {
                let options = if std::env::var_os(WRITE_THROUGH).is_some() {
                    PublishOptions::for_requests()
                } else {
                    PublishOptions::default()
                };
                let publication = bus.publish::<TestStatus>(options).await.unwrap();
                for key in std::env::var(KEYS)
                    .unwrap()
                    .split(',')
                    .filter(|k| !k.is_empty())
                {
                    publication.publish(status(key, 1)).await.unwrap();
                }
                let bump: u64 = std::env::var(BUMP_A_TO).map_or(0, |v| v.parse().unwrap());
                for value in 2..=bump {
                    publication.publish(status("a", value)).await.unwrap();
                }
                if std::env::var_os(NO_BARRIER).is_none() {
                    publication.signal_restarted().await.unwrap();
                }
                say(&format!("READY {}", publication.epoch()));
                std::future::pending::<()>().await;
            }
            "subscriber" => {
                let mut sub = bus.subscribe::<TestStatus>(&agent);
                say("STARTED");
                loop {
                    match sub.recv().await {
                        Event::Create { key, value } => {
                            say(&format!("CREATE {key} {}", value.value))
                        }
                        Event::Modify { key, new, .. } => {
                            say(&format!("MODIFY {key} {}", new.value))
                        }
                        Event::Delete { key, .. } => say(&format!("DELETE {key}")),
                        Event::Synchronized => say("SYNC"),
                        Event::Refused { reason } => say(&format!("REFUSED {reason}")),
                        other => say(&format!("OTHER {other:?}")),
                    }
                }
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "BUS {line}").unwrap();
    out.flush().unwrap();
}

fn drop_privileges(creds: &str) {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    let mut parts = creds.split(':');
    let uid: u32 = parts.next().unwrap().parse().unwrap();
    let gid: u32 = parts.next().unwrap().parse().unwrap();
    let groups: Vec<Gid> = parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| Gid::from_raw(g.parse().unwrap()))
        .collect();
    setgroups(&groups).unwrap();
    setgid(Gid::from_raw(gid)).unwrap();
    setuid(Uid::from_raw(uid)).unwrap();
}

// ---- the parent side ----

/// A child process and the `BUS` lines it printed; killed and reaped on drop.
struct ChildBus {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildBus {
    fn spawn(roots: &Roots, role: &str, agent: &str, keys: &str, creds: Option<&str>) -> Self {
        Self::spawn_with(roots, role, agent, keys, creds, &[])
    }

    fn spawn_with(
        roots: &Roots,
        role: &str,
        agent: &str,
        keys: &str,
        creds: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "bus_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(AGENT, agent)
            .env(KEYS, keys)
            .env("CAIRN_RUN_DIR", roots.run())
            .env("CAIRN_PERSIST_DIR", roots.persist())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .envs(env.iter().copied());
        if let Some(creds) = creds {
            command.env(CREDS, creds);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, line)) = line.split_once("BUS ")
                    && tx.send(line.to_string()).is_err()
                {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line starting with `prefix`, skipping others; fails after `within`.
    fn expect(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no line starting with {prefix:?} within {within:?}"),
            }
        }
    }

    /// The next `count` lines, failing after `within`.
    fn next_lines(&self, count: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        (0..count)
            .map(|i| {
                self.lines
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|_| panic!("line {i} of {count} not within {within:?}"))
            })
            .collect()
    }

    /// Every line up to (without) the first that starts with `prefix`, sorted.
    fn lines_before(&self, prefix: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => break,
                Ok(line) if line == "STARTED" => continue,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no line starting with {prefix:?} within {within:?}: {seen:?}"),
            }
        }
        seen.sort();
        seen
    }

    /// Asserts that no line starting with `prefix` comes within `quiet`.
    fn expect_none(&self, prefix: &str, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            assert!(!line.starts_with(prefix), "unexpected line {line:?}");
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ChildBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the publisher of a,b,c, restarts it with a,b (`wipe`: without its key files, so it
/// cannot know c), and returns the subscriber's events up to `stop` and their latency.
async fn restart_without_c(
    wipe: bool,
    stop: fn(&Event<TestStatus>) -> bool,
) -> (Vec<Event<TestStatus>>, Duration) {
    let roots = Roots::new();
    let first = ChildBus::spawn(&roots, "publisher", "volume-manager", "a,b,c", None);
    first.expect("READY", Duration::from_secs(10));
    let mut sub = roots
        .bus("app-manager")
        .subscribe::<TestStatus>("volume-manager");
    let events = until(&mut sub, |e| *e == Event::Restarted).await;
    assert_eq!(events.len(), 5, "{events:?}");

    if !wipe {
        // Let the key files catch up, so the restarted publisher reloads c and only its
        // restart barrier can remove it.
        let file = roots.run().join("volume-manager/TestStatus/c.json");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never written",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    first.kill();
    if wipe {
        // Key files trail publishes by a few ms, so they may not exist yet.
        match std::fs::remove_dir_all(roots.run().join("volume-manager/TestStatus")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }
    let second = if wipe {
        ChildBus::spawn_with(
            &roots,
            "publisher",
            "volume-manager",
            "a,b",
            None,
            &[(NO_BARRIER, "1")],
        )
    } else {
        ChildBus::spawn(&roots, "publisher", "volume-manager", "a,b", None)
    };
    second.expect("READY", Duration::from_secs(10));
    let ready = Instant::now();
    let events = until(&mut sub, stop).await;
    let latency = ready.elapsed();
    assert!(
        matches!(events.first(), Some(Event::PublisherRestarted { .. })),
        "{events:?}"
    );
    assert!(
        events.contains(&Event::Delete {
            key: "c".into(),
            last: status("c", 1)
        }),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Create { .. } | Event::Modify { .. })),
        "unchanged keys produced events: {events:?}"
    );
    (events, latency)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_publisher_that_returns_without_a_key_produces_a_delete_within_a_second() {
    // The restarted publisher reloads a,b,c from its key files, re-publishes a,b, and its
    // restart barrier removes c.
    let (events, latency) = restart_without_c(false, |e| *e == Event::Restarted).await;
    eprintln!(
        "delete of the vanished key seen {latency:?} after the new publisher was ready: {events:?}"
    );
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publisher_epoch_without_the_key_sweeps_it_at_resync() {
    // No key files and no barrier: only the epoch change and the resync can remove c.
    let (events, latency) = restart_without_c(true, |e| *e == Event::Synchronized).await;
    assert!(!events.contains(&Event::Restarted), "{events:?}");
    eprintln!("swept {latency:?} after the new publisher was ready");
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_subscriber_process_resyncs_the_full_table() {
    let roots = Roots::new();
    let publication = roots.publish("volume-manager").await;
    for key in ["a", "b", "c"] {
        publication.publish(status(key, 1)).await.unwrap();
    }
    let reader = ChildBus::spawn(&roots, "subscriber", "volume-manager", "", None);
    for _ in 0..3 {
        reader.expect("CREATE", Duration::from_secs(10));
    }
    reader.expect("SYNC", Duration::from_secs(10));
    reader.kill();

    publication.unpublish("b").await.unwrap();
    publication.publish(status("d", 2)).await.unwrap();
    publication.publish(status("a", 5)).await.unwrap();

    let reader = ChildBus::spawn(&roots, "subscriber", "volume-manager", "", None);
    let mut creates: Vec<String> = (0..3)
        .map(|_| reader.expect("CREATE", Duration::from_secs(10)))
        .collect();
    creates.sort();
    assert_eq!(creates, vec!["CREATE a 5", "CREATE c 1", "CREATE d 2"]);
    reader.expect("SYNC", Duration::from_secs(10));
}

fn drop_privileges_works() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_uids_are_refused_and_the_allowed_group_is_served() {
    assert!(
        drop_privileges_works(),
        "this test starts children as other uids and needs root (CI runs as root)"
    );
    let roots = Roots::new();
    // A status topic opened to the technicians' group.
    let status_topic = roots
        .bus("app-manager")
        .publish::<TestStatus>(PublishOptions {
            access: Access::with_group_readers(TECHNICIANS),
            ..Default::default()
        })
        .await
        .unwrap();
    status_topic.publish(status("app", 1)).await.unwrap();
    // A topic whose socket the group can reach, but whose access list does not name it:
    // only the SO_PEERCRED check stands in the way.
    let internal = roots
        .bus("domain-manager")
        .publish::<TestStatus>(PublishOptions {
            access: Access {
                socket_group: Some(TECHNICIANS),
                ..Access::agents()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    internal.publish(status("vm", 1)).await.unwrap();
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(status_topic.socket_path()), 0o660);

    let technician = ChildBus::spawn(
        &roots,
        "subscriber",
        "app-manager",
        "",
        Some(&format!("4302:4302:{TECHNICIANS}")),
    );
    assert_eq!(
        technician.expect("CREATE", Duration::from_secs(10)),
        "CREATE app 1"
    );

    let stranger = ChildBus::spawn(&roots, "subscriber", "app-manager", "", Some("4301:4301:"));
    stranger.expect("STARTED", Duration::from_secs(10));
    stranger.expect_none("CREATE", Duration::from_secs(1));

    let nosy = ChildBus::spawn(
        &roots,
        "subscriber",
        "domain-manager",
        "",
        Some(&format!("4303:{TECHNICIANS}:")),
    );
    let refused = nosy.expect("REFUSED", Duration::from_secs(10));
    assert!(refused.contains("uid 4303"), "{refused}");
    nosy.expect_none("CREATE", Duration::from_millis(500));

    // Root, and the publisher's own uid, are always served.
    let mut own = roots.bus("cli").subscribe::<TestStatus>("domain-manager");
    assert!(matches!(next(&mut own).await, Event::Create { .. }));
}

const TENANT_A: u32 = 4411;
const TENANT_B: u32 = 4412;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_technicians_read_only_their_tenants_keys() {
    if !drop_privileges_works() {
        eprintln!(
            "skipped: this test starts children as other uids and needs root (CI runs as root)"
        );
        return;
    }
    let roots = Roots::new();
    let publication = roots
        .bus("app-manager")
        .publish::<TestStatus>(PublishOptions {
            access: Access::with_group_readers(TECHNICIANS)
                .with_tenant_readers([("a", TENANT_A), ("b", TENANT_B)]),
            ..Default::default()
        })
        .await
        .unwrap();
    // Tenant technicians are in neither the socket's group nor each other's: the socket file
    // is open to all, and SO_PEERCRED decides.
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(publication.socket_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o666);
    for value in [
        tenant_status("a1", 1, "a"),
        tenant_status("a2", 1, "a"),
        tenant_status("b1", 1, "b"),
        status("device", 1),
    ] {
        publication.publish(value).await.unwrap();
    }
    let spawn = |creds: String| {
        let child = ChildBus::spawn(&roots, "subscriber", "app-manager", "", Some(&creds));
        child.expect("STARTED", Duration::from_secs(10));
        child
    };
    let tenant_a = spawn(format!("4401:4401:{TENANT_A}"));
    let tenant_b = spawn(format!("4402:4402:{TENANT_B}"));
    let technician = spawn(format!("4403:4403:{TECHNICIANS}"));
    let stranger = spawn("4404:4404:".to_string());

    let within = Duration::from_secs(10);
    assert_eq!(
        tenant_a.lines_before("SYNC", within),
        ["CREATE a1 1", "CREATE a2 1", "CREATE device 1"]
    );
    assert_eq!(
        tenant_b.lines_before("SYNC", within),
        ["CREATE b1 1", "CREATE device 1"]
    );
    assert_eq!(
        technician.lines_before("SYNC", within),
        [
            "CREATE a1 1",
            "CREATE a2 1",
            "CREATE b1 1",
            "CREATE device 1"
        ]
    );
    let refused = stranger.expect("REFUSED", within);
    assert!(refused.contains("uid 4404"), "{refused}");

    // Live: a new app of a, a change of b's app, an app moving from a to b, a removal of b's
    // app, then a device-wide mark. Each reader sees its part, in order, and nothing else.
    publication
        .publish(tenant_status("a3", 1, "a"))
        .await
        .unwrap();
    publication
        .publish(tenant_status("b1", 2, "b"))
        .await
        .unwrap();
    publication
        .publish(tenant_status("a2", 2, "b"))
        .await
        .unwrap();
    publication.unpublish("b1").await.unwrap();
    publication.publish(status("mark", 1)).await.unwrap();

    assert_eq!(
        tenant_a.next_lines(3, within),
        ["CREATE a3 1", "DELETE a2", "CREATE mark 1"]
    );
    assert_eq!(
        tenant_b.next_lines(4, within),
        ["MODIFY b1 2", "CREATE a2 2", "DELETE b1", "CREATE mark 1"]
    );
    assert_eq!(
        technician.next_lines(5, within),
        [
            "CREATE a3 1",
            "MODIFY b1 2",
            "MODIFY a2 2",
            "DELETE b1",
            "CREATE mark 1"
        ]
    );
    // Back from b to a: a create for a, a delete for b.
    publication
        .publish(tenant_status("a2", 3, "a"))
        .await
        .unwrap();
    assert_eq!(tenant_a.next_lines(1, within), ["CREATE a2 3"]);
    assert_eq!(tenant_b.next_lines(1, within), ["DELETE a2"]);
    stranger.expect_none("CREATE", Duration::from_millis(300));
}

/// A config or request publisher SIGKILLed right after its last publish comes back with that
/// value: its key files are written before delivery, so the restarted publisher cannot hand
/// its subscribers an older value to act on (seen in CI: an app-manager killed just after
/// starting an app came back with the key file of the stop before, and the app was stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_publisher_killed_right_after_a_publish_comes_back_with_that_value() {
    let roots = Roots::new();
    let child = ChildBus::spawn_with(
        &roots,
        "publisher",
        "app-manager",
        "a",
        None,
        &[(WRITE_THROUGH, "1"), (BUMP_A_TO, "300")],
    );
    child.expect("READY", Duration::from_secs(10));
    child.kill();
    let file = roots.run().join("app-manager/TestStatus/a.json");
    let stored = cairn_persist::load::<TestStatus>(&file).unwrap().record;
    assert_eq!(
        stored.value, 300,
        "the key file holds the last value published"
    );

    // The restarted publisher serves it to a subscriber as it was: no older value, no churn.
    let again = ChildBus::spawn_with(
        &roots,
        "publisher",
        "app-manager",
        "",
        None,
        &[(WRITE_THROUGH, "1"), (NO_BARRIER, "1")],
    );
    again.expect("READY", Duration::from_secs(10));
    let mut sub = roots
        .bus("domain-manager")
        .subscribe::<TestStatus>("app-manager");
    let events = until(&mut sub, |e| *e == Event::Synchronized).await;
    assert_eq!(
        events,
        [
            Event::Create {
                key: "a".into(),
                value: status("a", 300)
            },
            Event::Synchronized
        ]
    );
}

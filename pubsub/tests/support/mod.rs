//! Shared by the bus tests: a test topic, roots in a temp dir, and waiting with a deadline.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::time::Duration;

use cairn_persist::Persist;
use cairn_pubsub::{Bus, Event, Kept, Publication, PublishOptions, Subscription, Topic};
use serde::{Deserialize, Serialize};

/// A small topic for tests: `Name` is the key; a non-empty `Tenant` is the value's tenant (empty:
/// device-wide, unlike the real app topics where empty is the default tenant).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
#[persist(record = "TestStatus", version = 1)]
pub struct TestStatus {
    #[persist(mandatory)]
    pub name: String,
    pub value: u64,
    pub blob: String,
    pub tenant: String,
}

impl Topic for TestStatus {
    const NAME: &'static str = "TestStatus";
    fn key(&self) -> String {
        self.name.clone()
    }
    fn tenant(&self) -> Option<&str> {
        (!self.tenant.is_empty()).then_some(self.tenant.as_str())
    }
}

pub fn status(name: &str, value: u64) -> TestStatus {
    TestStatus {
        name: name.into(),
        value,
        blob: String::new(),
        tenant: String::new(),
    }
}

/// A value of `tenant`.
pub fn tenant_status(name: &str, value: u64, tenant: &str) -> TestStatus {
    TestStatus {
        tenant: tenant.into(),
        ..status(name, value)
    }
}

/// Run and persist roots in one temp dir, readable by other uids (the access tests).
pub struct Roots {
    pub dir: tempfile::TempDir,
}

impl Roots {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Self { dir }
    }

    pub fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn persist(&self) -> PathBuf {
        self.dir.path().join("persist")
    }

    pub fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, self.run(), self.persist())
    }

    /// `agent`'s run-root publication of the test topic.
    pub async fn publish(&self, agent: &str) -> Publication<TestStatus> {
        self.bus(agent)
            .publish::<TestStatus>(PublishOptions::default())
            .await
            .expect("publication opens")
    }
}

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The next event, failing the test after `DEADLINE`.
pub async fn next<T: Topic, V: Kept>(sub: &mut Subscription<T, V>) -> Event<V> {
    tokio::time::timeout(DEADLINE, sub.recv())
        .await
        .expect("an event within the deadline")
}

/// Events until (and including) the first that `stop` accepts.
pub async fn until<T: Topic>(
    sub: &mut Subscription<T>,
    stop: impl Fn(&Event<T>) -> bool,
) -> Vec<Event<T>> {
    let mut seen = Vec::new();
    loop {
        let event = next(sub).await;
        let done = stop(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Asserts that no event arrives within `quiet`.
pub async fn assert_quiet<T: Topic, V: Kept + std::fmt::Debug>(
    sub: &mut Subscription<T, V>,
    quiet: Duration,
) {
    if let Ok(event) = tokio::time::timeout(quiet, sub.recv()).await {
        panic!("unexpected event {event:?}");
    }
}

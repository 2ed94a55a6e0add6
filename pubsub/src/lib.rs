//! Cairn's local bus: broker-less, typed publications over Unix sockets.
//!
//! A publisher owns a topic (named by its type) and serves it on `<run>/<agent>/<Topic>.sock`,
//! keeping one JSON file per key under the run root, or under `<persist>/status/` for a
//! persistent topic, so that a restarted publisher gets its table back. A subscriber receives the
//! whole table, then `Synchronized`, then live changes, as length-prefixed MessagePack frames.
//!
//! Beyond EVE's bus: a publisher epoch so that subscribers notice a restart and sweep keys the
//! new publisher no longer has; reconnection within milliseconds; no message size cap below
//! [`frame::MAX_FRAME`]; explicit re-publish of an equal value; per-key coalescing that bounds
//! what a slow subscriber costs; `SO_PEERCRED` access control, down to per-tenant scopes. The read-only
//! D-Bus gateway over these subscriptions is its own crate, `cairn-dbus`.

pub mod access;
pub mod frame;
mod journal;
mod publisher;
mod store;
mod subscriber;

use std::path::{Path, PathBuf};

pub use access::{Access, Peer, Scope};
pub use cairn_types::Topic;
pub use publisher::{CommitStats, Publication, PublishOptions, SubscriberStats};
pub use store::escape_key;
pub use subscriber::{Digest, Event, Kept, Subscription, SubscriptionStats};

/// One agent's handle on the bus: its name and the two roots.
#[derive(Debug, Clone)]
pub struct Bus {
    agent: String,
    run_dir: PathBuf,
    persist_dir: PathBuf,
}

impl Bus {
    pub fn new(
        agent: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        persist_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            agent: agent.into(),
            run_dir: run_dir.into(),
            persist_dir: persist_dir.into(),
        }
    }

    /// Roots from `CAIRN_RUN_DIR` and `CAIRN_PERSIST_DIR`, else `/run/cairn` and `/persist`.
    pub fn from_env(agent: impl Into<String>) -> Self {
        use cairn_types::layout::*;
        let root = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self::new(
            agent,
            root(RUN_DIR_ENV, DEFAULT_RUN_DIR),
            root(PERSIST_DIR_ENV, DEFAULT_PERSIST_DIR),
        )
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn persist_dir(&self) -> &Path {
        &self.persist_dir
    }

    /// Opens this agent's publication of `T`. Fails if another live process publishes it.
    pub async fn publish<T: Topic>(
        &self,
        options: PublishOptions,
    ) -> Result<Publication<T>, BusError> {
        Publication::open(self, options).await
    }

    /// Subscribes to `publisher`'s topic `T`. Never fails: it connects (and reconnects) in the
    /// background, and events start once the publisher is there.
    pub fn subscribe<T: Topic>(&self, publisher: &str) -> Subscription<T> {
        Subscription::open(
            socket_path(&self.run_dir, publisher, T::NAME),
            publisher.to_string(),
        )
    }

    /// As [`subscribe`](Self::subscribe), for a follower that only notices changes: it keeps
    /// a [`Digest`] per key instead of a copy of the table, and decodes no value.
    pub fn notice<T: Topic>(&self, publisher: &str) -> Subscription<T, Digest> {
        Subscription::open(
            socket_path(&self.run_dir, publisher, T::NAME),
            publisher.to_string(),
        )
    }
}

/// `<run>/<agent>/<Topic>.sock`.
pub fn socket_path(run_dir: &Path, agent: &str, topic: &str) -> PathBuf {
    run_dir.join(agent).join(format!("{topic}.sock"))
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("topic {topic} is already published by {holder}: one publisher per topic")]
    AlreadyPublished { topic: String, holder: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Persist(#[from] cairn_persist::PersistError),
    #[error("topic {topic}: value of key {key} cannot be encoded: {message}")]
    Encode {
        topic: String,
        key: String,
        message: String,
    },
}

impl BusError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

//! A subscription to (publisher agent, topic). A background task keeps the connection up
//! (reconnecting within milliseconds, with capped backoff) and decodes frames; the agent's own
//! task turns them into events in [`Subscription::recv`], against its local copy of the table,
//! so handlers never run concurrently and `get` agrees with the events handed out so far.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_types::Topic;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::frame::{self, FrameError, Hello, MAX_FRAME, PROTOCOL, ServerFrame};

const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(200);
/// How many decoded frames may wait for the agent; beyond it the socket applies back-pressure
/// and the publisher coalesces.
const QUEUE: usize = 256;

/// What a subscriber sees, in publication order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    Create {
        key: String,
        value: T,
    },
    /// `skipped` counts intermediate values this subscriber never saw (it was slow).
    Modify {
        key: String,
        old: T,
        new: T,
        skipped: u64,
    },
    Delete {
        key: String,
        last: T,
    },
    /// The whole table has been received (after each connect).
    Synchronized,
    /// The publisher has re-published everything after its restart.
    Restarted,
    /// The publisher process is a new one (new epoch); keys it no longer has are deleted once
    /// its table has been received.
    PublisherRestarted {
        epoch: u64,
    },
    /// The publisher refused this subscriber; retried at the backoff cap.
    Refused {
        reason: String,
    },
}

enum Wire<T> {
    Welcome {
        epoch: u64,
    },
    Update {
        key: String,
        value: T,
        skipped: u64,
        repeat: bool,
    },
    Delete {
        key: String,
    },
    Synchronized,
    Restarted,
    Refused {
        reason: String,
    },
}

/// Counters a technician or a benchmark can read.
#[derive(Debug, Default)]
pub struct SubscriptionStats {
    pub connects: AtomicU64,
    pub frames: AtomicU64,
    pub dropped_connections: AtomicU64,
    pub skipped: AtomicU64,
}

pub struct Subscription<T: Topic> {
    publisher: String,
    rx: mpsc::Receiver<Wire<T>>,
    task: JoinHandle<()>,
    table: BTreeMap<String, T>,
    epoch: Option<u64>,
    /// Keys received since the last welcome, until the table is complete.
    resync: Option<HashSet<String>>,
    out: VecDeque<Event<T>>,
    synchronized: bool,
    stats: Arc<SubscriptionStats>,
}

impl<T: Topic> Subscription<T> {
    pub(crate) fn open(socket: PathBuf, publisher: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(SubscriptionStats::default());
        let label = format!("{publisher}/{}", T::NAME);
        let task = tokio::spawn(connection_loop::<T>(socket, label, tx, stats.clone()));
        Self {
            publisher,
            rx,
            task,
            table: BTreeMap::new(),
            epoch: None,
            resync: None,
            out: VecDeque::new(),
            synchronized: false,
            stats,
        }
    }

    /// The next event. Never ends while the subscription lives (reconnects are internal).
    pub async fn recv(&mut self) -> Event<T> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return event;
            }
            match self.rx.recv().await {
                Some(wire) => self.apply(wire),
                // The connection task only stops when aborted by drop.
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Handles events until the first complete table has been received.
    pub async fn wait_synchronized(&mut self) {
        while !self.synchronized {
            let _ = self.recv().await;
        }
    }

    pub fn get(&self, key: &str) -> Option<&T> {
        self.table.get(key)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.table.values()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn is_synchronized(&self) -> bool {
        self.synchronized
    }

    pub fn publisher(&self) -> &str {
        &self.publisher
    }

    pub fn stats(&self) -> &SubscriptionStats {
        &self.stats
    }

    fn apply(&mut self, wire: Wire<T>) {
        match wire {
            Wire::Welcome { epoch } => {
                if self.epoch.is_some_and(|old| old != epoch) {
                    self.out.push_back(Event::PublisherRestarted { epoch });
                }
                self.epoch = Some(epoch);
                self.resync = Some(HashSet::new());
            }
            Wire::Update {
                key,
                value,
                skipped,
                repeat,
            } => {
                if let Some(seen) = &mut self.resync {
                    seen.insert(key.clone());
                }
                match self.table.insert(key.clone(), value.clone()) {
                    None => self.out.push_back(Event::Create { key, value }),
                    Some(old) if old == value && !repeat => {}
                    Some(old) => self.out.push_back(Event::Modify {
                        key,
                        old,
                        new: value,
                        skipped,
                    }),
                }
            }
            Wire::Delete { key } => {
                if let Some(last) = self.table.remove(&key) {
                    self.out.push_back(Event::Delete { key, last });
                }
            }
            Wire::Synchronized => {
                if let Some(seen) = self.resync.take() {
                    let gone: Vec<String> = self
                        .table
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        if let Some(last) = self.table.remove(&key) {
                            self.out.push_back(Event::Delete { key, last });
                        }
                    }
                }
                self.synchronized = true;
                self.out.push_back(Event::Synchronized);
            }
            Wire::Restarted => self.out.push_back(Event::Restarted),
            Wire::Refused { reason } => self.out.push_back(Event::Refused { reason }),
        }
    }
}

impl<T: Topic> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection_loop<T: Topic>(
    socket: PathBuf,
    label: String,
    tx: mpsc::Sender<Wire<T>>,
    stats: Arc<SubscriptionStats>,
) {
    let mut retry = FIRST_RETRY;
    let mut announced = false;
    loop {
        match UnixStream::connect(&socket).await {
            Ok(stream) => {
                stats.connects.fetch_add(1, Ordering::Relaxed);
                match session::<T>(stream, &tx, &stats).await {
                    Ok(welcomed) => {
                        if welcomed {
                            retry = FIRST_RETRY;
                        }
                        tracing::debug!(topic = %label, "publisher closed the connection");
                    }
                    Err(SessionError::Refused) => retry = MAX_RETRY,
                    Err(SessionError::Receiver) => return,
                    Err(SessionError::Frame(e)) => {
                        stats.dropped_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(topic = %label, "dropping the connection: {e}");
                    }
                }
                announced = false;
            }
            Err(e) => {
                if !announced {
                    tracing::debug!(topic = %label, socket = %socket.display(), "waiting for the publisher: {e}");
                    announced = true;
                }
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

enum SessionError {
    Refused,
    Receiver,
    Frame(String),
}

/// One connection: hello, then frames until it ends. `Ok(true)` if the publisher welcomed us.
async fn session<T: Topic>(
    mut stream: UnixStream,
    tx: &mpsc::Sender<Wire<T>>,
    stats: &SubscriptionStats,
) -> Result<bool, SessionError> {
    let mut hello = Vec::new();
    let request = Hello::Subscribe {
        protocol: PROTOCOL,
        topic: T::NAME.to_string(),
    };
    frame::encode_into(&mut hello, &request).map_err(|e| SessionError::Frame(e.to_string()))?;
    if stream.write_all(&hello).await.is_err() {
        return Ok(false);
    }
    let (reader, _writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let mut welcomed = false;
    loop {
        let body = match frame::read_frame(&mut reader, MAX_FRAME).await {
            Ok(body) => body,
            Err(FrameError::Closed) => return Ok(welcomed),
            Err(e) => return Err(SessionError::Frame(e.to_string())),
        };
        let decoded: ServerFrame = frame::decode(&body)
            .map_err(|e| SessionError::Frame(format!("malformed frame: {e}")))?;
        stats.frames.fetch_add(1, Ordering::Relaxed);
        let wire = match decoded {
            ServerFrame::Welcome {
                protocol,
                topic,
                epoch,
                ..
            } => {
                if protocol != PROTOCOL || topic != T::NAME {
                    return Err(SessionError::Frame(format!(
                        "publisher speaks protocol {protocol} for {topic}, expected {PROTOCOL} for {}",
                        T::NAME
                    )));
                }
                welcomed = true;
                Wire::Welcome { epoch }
            }
            ServerFrame::Refused { reason } => {
                tracing::warn!(topic = T::NAME, "refused by the publisher: {reason}");
                let _ = tx.send(Wire::Refused { reason }).await;
                return Err(SessionError::Refused);
            }
            _ if !welcomed => {
                return Err(SessionError::Frame("data before the welcome".into()));
            }
            ServerFrame::Update {
                key,
                value,
                skipped,
                repeat,
            } => {
                let value: T = frame::decode(&value).map_err(|e| {
                    SessionError::Frame(format!("value of key {key} does not decode: {e}"))
                })?;
                stats.skipped.fetch_add(skipped, Ordering::Relaxed);
                Wire::Update {
                    key,
                    value,
                    skipped,
                    repeat,
                }
            }
            ServerFrame::Delete { key, skipped } => {
                stats.skipped.fetch_add(skipped, Ordering::Relaxed);
                Wire::Delete { key }
            }
            ServerFrame::Synchronized => Wire::Synchronized,
            ServerFrame::Restarted => Wire::Restarted,
        };
        if tx.send(wire).await.is_err() {
            return Err(SessionError::Receiver);
        }
    }
}

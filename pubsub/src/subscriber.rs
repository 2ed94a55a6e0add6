//! A subscription to (publisher agent, topic), driven by the agent's own task: [`recv`] connects
//! (and reconnects within milliseconds, with capped backoff), reads frames and turns them into
//! events against the subscription's copy of the table. No background task: handlers never run
//! concurrently, `get` agrees with the events handed out so far, and a subscriber that is busy
//! simply stops reading, so its publisher coalesces instead of this side buffering.
//!
//! [`recv`] is cancel-safe: a partly read frame stays in the subscription's buffer, so it can be
//! used in `tokio::select!` across several subscriptions.
//!
//! [`recv`]: Subscription::recv

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use cairn_types::Topic;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::frame::{self, Hello, MAX_FRAME, PROTOCOL, ServerFrame};

/// What a subscription keeps of each value: the value itself ([`Bus::subscribe`]), or only a
/// digest of its encoding ([`Digest`], [`Bus::notice`]) for a follower that needs to notice
/// changes and never reads the values.
///
/// [`Bus::subscribe`]: crate::Bus::subscribe
/// [`Bus::notice`]: crate::Bus::notice
pub trait Kept: Clone + PartialEq + Send + 'static {
    /// From a value's encoding in a frame.
    fn from_frame(bytes: &[u8]) -> Result<Self, String>;
}

impl<T: Topic> Kept for T {
    fn from_frame(bytes: &[u8]) -> Result<Self, String> {
        frame::decode(bytes).map_err(|e| e.to_string())
    }
}

/// A digest of a value's encoding: 8 bytes per key instead of the value, and nothing decoded.
/// Values that encode alike are alike; two encodings of one value (a map in another order)
/// merely count as a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u64);

impl Kept for Digest {
    fn from_frame(bytes: &[u8]) -> Result<Self, String> {
        use std::hash::Hasher;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        hasher.write(bytes);
        Ok(Self(hasher.finish()))
    }
}

const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(200);
const READ_CHUNK: usize = 64 << 10;

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

/// Counters a technician or a benchmark can read.
#[derive(Debug, Default, Clone)]
pub struct SubscriptionStats {
    pub connects: u64,
    pub frames: u64,
    /// Connections given up because of a protocol fault (malformed, oversized, cut frames).
    pub dropped_connections: u64,
    /// Values the publisher coalesced away because this subscriber was slow.
    pub skipped: u64,
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    start: usize,
    welcomed: bool,
}

/// A subscription to one publisher's topic `T`, keeping `V` of each value: the values
/// themselves, or their [`Digest`]s.
pub struct Subscription<T: Topic, V: Kept = T> {
    publisher: String,
    label: String,
    socket: PathBuf,
    connection: Option<Connection>,
    next_attempt: Option<Instant>,
    retry: Duration,
    waiting_logged: bool,
    /// The last refusal logged at warn level: a refused subscriber retries five times a second,
    /// and only a change of reason (or a refusal after a welcome) is logged again.
    refusal_logged: Option<String>,
    table: BTreeMap<String, V>,
    epoch: Option<u64>,
    /// Keys received since the last welcome, until the table is complete.
    resync: Option<HashSet<String>>,
    out: VecDeque<Event<V>>,
    synchronized: bool,
    stats: SubscriptionStats,
    topic: std::marker::PhantomData<fn() -> T>,
}

/// A frame decoded into owned values, so the connection buffer can be released.
enum Received<T> {
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
        skipped: u64,
    },
    Synchronized,
    Restarted,
    Refused {
        reason: String,
    },
}

impl<T: Topic, V: Kept> Subscription<T, V> {
    pub(crate) fn open(socket: PathBuf, publisher: String) -> Self {
        Self {
            label: format!("{publisher}/{}", T::NAME),
            publisher,
            socket,
            connection: None,
            next_attempt: None,
            retry: FIRST_RETRY,
            waiting_logged: false,
            refusal_logged: None,
            table: BTreeMap::new(),
            epoch: None,
            resync: None,
            out: VecDeque::new(),
            synchronized: false,
            stats: SubscriptionStats::default(),
            topic: std::marker::PhantomData,
        }
    }

    /// The next event. Reconnects as needed; never returns an error (faults are logged and
    /// counted, and the connection is made again).
    pub async fn recv(&mut self) -> Event<V> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return event;
            }
            if self.connection.is_none() {
                self.connect().await;
                continue;
            }
            match self.read_frame().await {
                Ok(Some(received)) => self.apply(received),
                Ok(None) => {
                    tracing::debug!(topic = %self.label, "publisher closed the connection");
                    self.disconnect();
                }
                Err(fault) => {
                    self.stats.dropped_connections += 1;
                    tracing::warn!(topic = %self.label, "dropping the connection: {fault}");
                    self.disconnect();
                }
            }
        }
    }

    /// Handles events until the first complete table has been received.
    pub async fn wait_synchronized(&mut self) {
        while !self.synchronized {
            let _ = self.recv().await;
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.table.get(key)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
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

    /// Whether the publisher is connected now (as of the last `recv()`): a dead publisher is
    /// noticed when `recv()` reads its socket's end.
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    pub fn publisher(&self) -> &str {
        &self.publisher
    }

    pub fn stats(&self) -> &SubscriptionStats {
        &self.stats
    }

    /// Bytes reserved for the current connection's unread frames: bounded by what the publisher
    /// sent, never by the length a frame declares.
    pub fn buffer_capacity(&self) -> usize {
        self.connection.as_ref().map_or(0, |c| c.buf.capacity())
    }

    fn disconnect(&mut self) {
        self.connection = None;
        self.next_attempt = Some(Instant::now() + self.retry);
        self.retry = (self.retry * 2).min(MAX_RETRY);
    }

    /// One connection attempt, after the backoff delay. The connect and the hello are made
    /// synchronously (a local socket answers at once and a fresh socket takes a small hello
    /// whole), so no `select!` can cancel an attempt halfway and leave the publisher a
    /// connection without a hello; only the backoff sleep is a cancellation point.
    async fn connect(&mut self) {
        if let Some(at) = self.next_attempt {
            tokio::time::sleep_until(at).await;
        }
        let attempt = || -> std::io::Result<UnixStream> {
            let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
            let mut hello = Vec::new();
            frame::encode_into(
                &mut hello,
                &Hello::Subscribe {
                    protocol: PROTOCOL,
                    topic: T::NAME.to_string(),
                },
            )
            .map_err(std::io::Error::other)?;
            std::io::Write::write_all(&mut stream, &hello)?;
            stream.set_nonblocking(true)?;
            UnixStream::from_std(stream)
        };
        match attempt() {
            Ok(stream) => {
                self.stats.connects += 1;
                self.waiting_logged = false;
                self.next_attempt = None;
                self.connection = Some(Connection {
                    stream,
                    buf: Vec::with_capacity(READ_CHUNK),
                    start: 0,
                    welcomed: false,
                });
            }
            Err(e) => {
                if !self.waiting_logged {
                    tracing::debug!(topic = %self.label, socket = %self.socket.display(), "waiting for the publisher: {e}");
                    self.waiting_logged = true;
                }
                self.next_attempt = Some(Instant::now() + self.retry);
                self.retry = (self.retry * 2).min(MAX_RETRY);
            }
        }
    }

    /// The next frame of the current connection, `None` at a clean end. Cancel-safe: bytes are
    /// only ever appended to the connection's buffer by `read_buf`.
    async fn read_frame(&mut self) -> Result<Option<Received<V>>, String> {
        let Some(conn) = self.connection.as_mut() else {
            return Ok(None);
        };
        loop {
            let available = &conn.buf[conn.start..];
            if available.len() >= 4 {
                let len =
                    u32::from_be_bytes([available[0], available[1], available[2], available[3]])
                        as usize;
                if len > MAX_FRAME {
                    return Err(format!(
                        "frame of {len} bytes exceeds the {MAX_FRAME} byte limit"
                    ));
                }
                if available.len() >= 4 + len {
                    let body_start = conn.start + 4;
                    conn.start = body_start + len;
                    let received =
                        decode::<T, V>(&conn.buf[body_start..body_start + len], conn.welcomed);
                    if conn.start == conn.buf.len() {
                        conn.buf.clear();
                        conn.start = 0;
                    }
                    let received = received?;
                    if matches!(received, Received::Welcome { .. }) {
                        conn.welcomed = true;
                    }
                    self.stats.frames += 1;
                    return Ok(Some(received));
                }
            }
            if conn.start > 0 && conn.start >= conn.buf.len() / 2 {
                conn.buf.drain(..conn.start);
                conn.start = 0;
            }
            // Room for what may arrive, never for what a frame merely declares: a garbage or
            // hostile length under the cap costs nothing until its bytes are actually sent
            // (the buffer still grows geometrically for a large frame that does arrive).
            conn.buf.reserve(READ_CHUNK);
            let read = conn
                .stream
                .read_buf(&mut conn.buf)
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return if conn.buf.len() == conn.start {
                    Ok(None)
                } else {
                    Err(format!(
                        "connection closed in the middle of a frame ({} bytes pending)",
                        conn.buf.len() - conn.start
                    ))
                };
            }
        }
    }

    fn apply(&mut self, received: Received<V>) {
        match received {
            Received::Welcome { epoch } => {
                self.retry = FIRST_RETRY;
                if self.refusal_logged.take().is_some() {
                    tracing::info!(topic = %self.label, "admitted by the publisher after being refused");
                }
                if self.epoch.is_some_and(|old| old != epoch) {
                    self.out.push_back(Event::PublisherRestarted { epoch });
                }
                self.epoch = Some(epoch);
                self.resync = Some(HashSet::new());
            }
            Received::Update {
                key,
                value,
                skipped,
                repeat,
            } => {
                self.stats.skipped += skipped;
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
            Received::Delete { key, skipped } => {
                self.stats.skipped += skipped;
                if let Some(last) = self.table.remove(&key) {
                    self.out.push_back(Event::Delete { key, last });
                }
            }
            Received::Synchronized => {
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
            Received::Restarted => self.out.push_back(Event::Restarted),
            Received::Refused { reason } => {
                if self.refusal_logged.as_deref() == Some(reason.as_str()) {
                    tracing::debug!(topic = %self.label, "refused by the publisher again: {reason}");
                } else {
                    tracing::warn!(topic = %self.label, "refused by the publisher (retrying every {} ms; logged once): {reason}", MAX_RETRY.as_millis());
                    self.refusal_logged = Some(reason.clone());
                }
                self.connection = None;
                self.retry = MAX_RETRY;
                self.next_attempt = Some(Instant::now() + MAX_RETRY);
                self.out.push_back(Event::Refused { reason });
            }
        }
    }
}

fn decode<T: Topic, V: Kept>(body: &[u8], welcomed: bool) -> Result<Received<V>, String> {
    let decoded: ServerFrame<'_> =
        frame::decode(body).map_err(|e| format!("malformed frame: {e}"))?;
    Ok(match decoded {
        ServerFrame::Welcome {
            protocol,
            topic,
            epoch,
            ..
        } => {
            if protocol != PROTOCOL || topic != T::NAME {
                return Err(format!(
                    "publisher speaks protocol {protocol} for {topic}, expected {PROTOCOL} for {}",
                    T::NAME
                ));
            }
            Received::Welcome { epoch }
        }
        ServerFrame::Refused { reason } => Received::Refused { reason },
        _ if !welcomed => return Err("data before the welcome".into()),
        ServerFrame::Update {
            key,
            value,
            skipped,
            repeat,
        } => Received::Update {
            value: V::from_frame(value)
                .map_err(|e| format!("value of key {key} does not decode: {e}"))?,
            key,
            skipped,
            repeat,
        },
        ServerFrame::Delete { key, skipped } => Received::Delete { key, skipped },
        ServerFrame::Synchronized => Received::Synchronized,
        ServerFrame::Restarted => Received::Restarted,
    })
}

//! A publication: the owner of one topic. It keeps the table of keys, serves it on its socket to
//! every subscriber (whole table, then synchronized, then live changes) and keeps it in files.
//!
//! Memory per subscriber is bounded: each subscriber has an outbox holding at most one pending
//! value per key (the latest); values it had no time to read are counted as skipped.
//!
//! A subscriber admitted for some tenants only ([`Scope::Tenants`]) gets just the keys whose
//! value is in its scope: in the table sent on connect, in updates, and in deletes. A value that
//! moves out of its scope is a delete for it; one that moves in is a create.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cairn_types::Topic;
use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::access::{Access, Peer, Scope};
use crate::frame::{self, Hello, PROTOCOL, ServerFrame};
use crate::journal::{self, Change, Journal};
use crate::store::{KeyFiles, LoadProblem, run_topic_dir};
use crate::{Bus, BusError};

/// How long a connecting peer has to say what it wants.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A hello is tiny; anything bigger is garbage.
const MAX_HELLO: usize = 64 << 10;
/// Run-root key files trail publishes by about this much: a burst of publishes costs one
/// file write per key, and latency-sensitive delivery never waits on the disk.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// A key file that could not be written (EIO, a full run file system) is tried again this
/// often until it is, unless a newer value of its key came first.
const KEY_FILE_RETRY: Duration = Duration::from_secs(1);
/// Frames are batched into writes of about this size.
const WRITE_BATCH: usize = 256 << 10;

/// How a topic is published.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Keep key files under the persist root (survive reboots) and write them durably before
    /// delivery; otherwise under the run root.
    pub persistent: bool,
    pub access: Access,
    /// Run-root topics: write the key file (atomically, without fsync) before delivering, not
    /// behind. A publisher SIGKILLed right after a publish then comes back with that value and
    /// not an older one, which its subscribers would act on before the agent corrects it (a
    /// stopped app started again, an old request answered). For configs and requests; a
    /// status may lag, and is written behind for throughput.
    pub write_through: bool,
    /// Persistent topics: journal bytes after which a checkpoint makes the key files durable
    /// and empties the journal (default 1 MiB). Tests set it small to cut the power inside one.
    pub checkpoint_bytes: Option<u64>,
}

impl PublishOptions {
    /// A run-root publication for configs and requests: key files written before delivery
    /// ([`PublishOptions::write_through`]), default access.
    pub fn for_requests() -> Self {
        Self {
            write_through: true,
            ..Self::default()
        }
    }
}

/// Group commits of a persistent topic since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Journal appends, each made durable by one fdatasync.
    pub groups: u64,
    /// Updates and removals they carried.
    pub updates: u64,
    pub largest_group: u64,
    /// Checkpoints: key files made durable, journal emptied.
    pub checkpoints: u64,
}

/// What one subscriber connection has cost so far.
#[derive(Debug, Clone)]
pub struct SubscriberStats {
    pub peer: String,
    /// Keys waiting in its outbox (at most one entry per key).
    pub pending: usize,
    /// Values replaced in its outbox before it read them.
    pub skipped: u64,
}

pub struct Publication<T: Topic> {
    shared: Arc<Shared<T>>,
    accept: JoinHandle<()>,
    flusher: Option<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
    socket: PathBuf,
    /// Held for the publication's lifetime: a second publisher of the topic fails to take it.
    _lock: Flock<File>,
}

struct Shared<T: Topic> {
    label: String,
    agent: String,
    epoch: u64,
    uid: u32,
    access: Access,
    files: KeyFiles,
    /// Key files written before delivery ([`PublishOptions::write_through`]; always when
    /// durable).
    write_through: bool,
    state: Mutex<State<T>>,
    /// Serializes writers so that file order and delivery order agree.
    gate: tokio::sync::Mutex<()>,
    dirty: Mutex<BTreeMap<String, Option<T>>>,
    dirty_notify: Notify,
    /// Held by a write-behind flush while it writes on the blocking pool: the publication's
    /// drop waits for it, so that no key file is written once the publication is gone.
    writing: Arc<Mutex<()>>,
    /// Persistent topics: updates waiting for the committer's next group.
    queue: Mutex<CommitQueue<T>>,
    queue_notify: Notify,
    /// Persistent topics: the journal, used on the blocking pool by the committer alone.
    journal: Option<Arc<Mutex<Journal>>>,
}

/// Updates of a persistent topic queued for group commit.
struct CommitQueue<T> {
    ops: Vec<CommitOp<T>>,
    /// The newest queued state of each key with an update in `ops` or in the group being
    /// committed: what a new publish is compared with, ahead of the table.
    latest: HashMap<String, (u64, Option<T>)>,
    tickets: u64,
}

struct CommitOp<T> {
    ticket: u64,
    key: String,
    value: Option<T>,
    wire: Option<Arc<Vec<u8>>>,
    envelope: Option<Vec<u8>>,
    repeat: bool,
    done: tokio::sync::oneshot::Sender<Result<(), BusError>>,
}

struct State<T> {
    table: BTreeMap<String, Entry<T>>,
    /// Keys reloaded from files at open and not published again since: the agent's restart
    /// barrier ([`Publication::signal_restarted`]) removes them.
    unconfirmed: std::collections::HashSet<String>,
    outboxes: Vec<Arc<Outbox>>,
    restarted: bool,
    load_problems: Vec<LoadProblem>,
}

struct Entry<T> {
    value: T,
    wire: Arc<Vec<u8>>,
}

fn lock<M>(mutex: &Mutex<M>) -> MutexGuard<'_, M> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: Topic> Publication<T> {
    pub(crate) async fn open(bus: &Bus, options: PublishOptions) -> Result<Self, BusError> {
        let agent_dir = bus.run_dir().join(bus.agent());
        let socket = agent_dir.join(format!("{}.sock", T::NAME));
        let label = format!("{}/{}", bus.agent(), T::NAME);
        create_public_dir(&agent_dir)?;
        let lock = take_lock(&agent_dir.join(format!("{}.lock", T::NAME)), &label)?;

        let files = KeyFiles {
            dir: if options.persistent {
                cairn_types::layout::persistent_topic_dir(bus.persist_dir(), bus.agent(), T::NAME)
            } else {
                run_topic_dir(bus.run_dir(), bus.agent(), T::NAME)
            },
            durable: options.persistent,
        };
        let dir = files.clone();
        let checkpoint_bytes = options
            .checkpoint_bytes
            .unwrap_or(journal::DEFAULT_CHECKPOINT_BYTES);
        let (loaded, load_problems, journal) =
            tokio::task::spawn_blocking(move || load_key_files::<T>(&dir, checkpoint_bytes))
                .await
                .map_err(|e| BusError::io("loading", &files.dir, std::io::Error::other(e)))?
                .map_err(|e| BusError::io("loading", &files.dir, e))?;
        for problem in &load_problems {
            tracing::warn!(topic = %label, file = %problem.path.display(), "unreadable key file: {}", problem.error);
        }
        let mut table = BTreeMap::new();
        for (key, value) in loaded {
            let wire = Arc::new(encode(&label, &key, &value)?);
            table.insert(key, Entry { value, wire });
        }

        let listener = bind_socket(&socket, &options.access)?;
        let shared = Arc::new(Shared {
            label: label.clone(),
            agent: bus.agent().to_string(),
            epoch: new_epoch(),
            uid: nix::unistd::geteuid().as_raw(),
            access: options.access,
            write_through: options.write_through || files.durable,
            files,
            state: Mutex::new(State {
                unconfirmed: table.keys().cloned().collect(),
                table,
                outboxes: Vec::new(),
                restarted: false,
                load_problems,
            }),
            gate: tokio::sync::Mutex::new(()),
            dirty: Mutex::new(BTreeMap::new()),
            dirty_notify: Notify::new(),
            writing: Arc::new(Mutex::new(())),
            queue: Mutex::new(CommitQueue {
                ops: Vec::new(),
                latest: HashMap::new(),
                tickets: 0,
            }),
            queue_notify: Notify::new(),
            journal: journal.map(|j| Arc::new(Mutex::new(j))),
        });
        tracing::debug!(topic = %label, epoch = shared.epoch, keys = lock_len(&shared), "publishing");
        let accept = tokio::spawn(accept_loop(shared.clone(), listener));
        let flusher = (!options.persistent).then(|| tokio::spawn(flush_loop(shared.clone())));
        let committer = shared
            .journal
            .clone()
            .map(|journal| tokio::spawn(commit_loop(shared.clone(), journal)));
        Ok(Self {
            shared,
            accept,
            flusher,
            committer,
            socket,
            _lock: lock,
        })
    }

    /// How many updates the group-commit queue has room for without growing (diagnostics and
    /// tests: a burst must not keep its peak).
    pub fn commit_queue_capacity(&self) -> usize {
        let queue = lock(&self.shared.queue);
        queue.latest.capacity().max(queue.ops.capacity())
    }

    /// Publishes `value` under its key. An equal value is not sent again (see [`republish`]).
    /// For a persistent topic the key file is durable before any subscriber sees the value.
    ///
    /// [`republish`]: Self::republish
    pub async fn publish(&self, value: T) -> Result<(), BusError> {
        self.put(value, false).await
    }

    /// Publishes `value` and delivers it even if equal to the current one: a repeated request
    /// must reach its handler (EVE suppresses it and a second identical rollback hangs).
    pub async fn republish(&self, value: T) -> Result<(), BusError> {
        self.put(value, true).await
    }

    async fn put(&self, value: T, repeat: bool) -> Result<(), BusError> {
        if self.shared.journal.is_some() {
            return self.commit(value.key(), Some(value), repeat).await;
        }
        let shared = &self.shared;
        let _gate = shared.gate.lock().await;
        let key = value.key();
        {
            let mut state = lock(&shared.state);
            state.unconfirmed.remove(&key);
            if !repeat && state.table.get(&key).is_some_and(|e| e.value == value) {
                return Ok(());
            }
        }
        let wire = Arc::new(encode(&shared.label, &key, &value)?);
        if shared.write_through {
            let files = shared.files.clone();
            let stored = value.clone();
            tokio::task::spawn_blocking(move || files.write(&stored))
                .await
                .map_err(|e| BusError::io("writing", &shared.files.dir, std::io::Error::other(e)))?
                .map_err(BusError::Persist)?;
        } else {
            lock(&shared.dirty).insert(key.clone(), Some(value.clone()));
            shared.dirty_notify.notify_one();
        }
        deliver_update(&mut lock(&shared.state), key, value, wire, repeat);
        Ok(())
    }

    /// A persistent topic's update or removal: queued for the committer's next group, and
    /// acknowledged once that group is durable and delivered.
    async fn commit(&self, key: String, value: Option<T>, repeat: bool) -> Result<(), BusError> {
        let shared = &self.shared;
        let (wire, envelope) = match &value {
            Some(value) => (
                Some(Arc::new(encode(&shared.label, &key, value)?)),
                Some(cairn_persist::encode(value).map_err(|e| BusError::Encode {
                    topic: shared.label.clone(),
                    key: key.clone(),
                    message: e.to_string(),
                })?),
            ),
            None => (None, None),
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        {
            let mut queue = lock(&shared.queue);
            let queue = &mut *queue;
            {
                let mut state = lock(&shared.state);
                state.unconfirmed.remove(&key);
                let current = match queue.latest.get(&key) {
                    Some((_, queued)) => queued.as_ref(),
                    None => state.table.get(&key).map(|e| &e.value),
                };
                let unchanged = match &value {
                    Some(value) => !repeat && current == Some(value),
                    None => current.is_none(),
                };
                if unchanged {
                    return Ok(());
                }
            }
            queue.tickets += 1;
            let ticket = queue.tickets;
            queue.latest.insert(key.clone(), (ticket, value.clone()));
            queue.ops.push(CommitOp {
                ticket,
                key,
                value,
                wire,
                envelope,
                repeat,
                done,
            });
        }
        shared.queue_notify.notify_one();
        outcome.await.unwrap_or_else(|_| {
            Err(BusError::io(
                "committing to",
                &shared.files.dir,
                std::io::Error::other("the publication closed before the update was durable"),
            ))
        })
    }

    /// Removes `key`; subscribers get a delete with the last value. Removing an absent key is
    /// a no-op.
    pub async fn unpublish(&self, key: &str) -> Result<(), BusError> {
        if self.shared.journal.is_some() {
            return self.commit(key.to_string(), None, false).await;
        }
        let shared = &self.shared;
        let _gate = shared.gate.lock().await;
        {
            let mut state = lock(&shared.state);
            state.unconfirmed.remove(key);
            if !state.table.contains_key(key) {
                return Ok(());
            }
        }
        if shared.write_through {
            let files = shared.files.clone();
            let owned = key.to_string();
            tokio::task::spawn_blocking(move || files.remove(&owned))
                .await
                .map_err(|e| BusError::io("removing", &shared.files.dir, std::io::Error::other(e)))?
                .map_err(|e| BusError::io("removing", &shared.files.path_of(key), e))?;
        } else {
            lock(&shared.dirty).insert(key.to_string(), None);
            shared.dirty_notify.notify_one();
        }
        deliver_delete(&mut lock(&shared.state), key);
        Ok(())
    }

    /// The restart barrier: this publisher has re-published its state after a restart. Keys
    /// reloaded from files that were not published again since the publication opened are
    /// removed (subscribers get their deletes), then subscribers get `Restarted`.
    pub async fn signal_restarted(&self) -> Result<(), BusError> {
        let stale: Vec<String> = lock(&self.shared.state)
            .unconfirmed
            .iter()
            .cloned()
            .collect();
        for key in stale {
            tracing::debug!(topic = %self.shared.label, key = %key, "not re-published after restart: removing");
            self.unpublish(&key).await?;
        }
        let mut state = lock(&self.shared.state);
        state.restarted = true;
        for outbox in &state.outboxes {
            outbox.push_control(Control::Restarted);
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<T> {
        lock(&self.shared.state)
            .table
            .get(key)
            .map(|e| e.value.clone())
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.shared.state).table.keys().cloned().collect()
    }

    pub fn values(&self) -> Vec<T> {
        lock(&self.shared.state)
            .table
            .values()
            .map(|e| e.value.clone())
            .collect()
    }

    /// Key files that could not be read when this publication opened.
    pub fn load_problems(&self) -> Vec<(PathBuf, String)> {
        lock(&self.shared.state)
            .load_problems
            .iter()
            .map(|p| (p.path.clone(), p.error.to_string()))
            .collect()
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn subscribers(&self) -> Vec<SubscriberStats> {
        lock(&self.shared.state)
            .outboxes
            .iter()
            .map(|o| o.stats())
            .collect()
    }

    /// Persistent topics: how many group commits carried how many updates.
    pub fn commit_stats(&self) -> CommitStats {
        self.shared
            .journal
            .as_ref()
            .map(|journal| {
                let journal = lock(journal);
                CommitStats {
                    groups: journal.groups,
                    updates: journal.updates,
                    largest_group: journal.largest_group,
                    checkpoints: journal.checkpoints,
                }
            })
            .unwrap_or_default()
    }

    /// Waits until the run-root key files reflect every publish so far.
    pub async fn flush(&self) -> Result<(), BusError> {
        flush_dirty(&self.shared).await
    }
}

impl<T: Topic> Drop for Publication<T> {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(flusher) = &self.flusher {
            flusher.abort();
        }
        // Queued updates were never acknowledged; their publishers get an error. Waits for a
        // journal step already on the blocking pool (one group at most), so that no file is
        // written once the publication is gone.
        if let Some(committer) = &self.committer {
            committer.abort();
        }
        if let Some(journal) = &self.shared.journal {
            lock(journal).closed = true;
        }
        for outbox in lock(&self.shared.state).outboxes.drain(..) {
            outbox.close();
        }
        let _ = std::fs::remove_file(&self.socket);
        // A flush already on the blocking pool runs on after its task is aborted: waited for.
        let _writing = lock(&self.shared.writing);
        // Best effort: values published just before the drop reach their files.
        let pending = std::mem::take(&mut *lock(&self.shared.dirty));
        for (key, (_, e)) in write_dirty(&self.shared.files, pending) {
            tracing::warn!(dir = %self.shared.files.dir.display(), key = %key, "key file not written at close: {e}");
        }
    }
}

/// The key files of a topic, and for a persistent one its journal replayed over them: a key
/// the journal holds is what the journal says, whatever its key file holds after a power cut.
#[allow(clippy::type_complexity)]
fn load_key_files<T: Topic>(
    files: &KeyFiles,
    checkpoint_bytes: u64,
) -> std::io::Result<(BTreeMap<String, T>, Vec<LoadProblem>, Option<Journal>)> {
    let (mut table, mut problems) = files.load_all::<T>()?;
    if !files.durable {
        return Ok((table, problems, None));
    }
    let (journal, changes) = Journal::open(&files.dir, checkpoint_bytes)?;
    for change in changes {
        let path = files.path_of(&change.key);
        problems.retain(|p| p.path != path);
        match change.envelope {
            None => {
                table.remove(&change.key);
            }
            Some(bytes) => match cairn_persist::decode::<T>(&bytes) {
                Ok(decoded) => {
                    table.insert(change.key, decoded.record);
                }
                Err(e) => problems.push(LoadProblem {
                    path: files.dir.join(journal::JOURNAL_FILE),
                    error: cairn_persist::PersistError {
                        schema: T::SCHEMA,
                        path,
                        kind: cairn_persist::ErrorKind::Decode(e),
                    },
                }),
            },
        }
    }
    Ok((table, problems, Some(journal)))
}

fn deliver_update<T: Topic>(
    state: &mut State<T>,
    key: String,
    value: T,
    wire: Arc<Vec<u8>>,
    repeat: bool,
) {
    let tenant = value.tenant();
    for outbox in &state.outboxes {
        if !outbox.scope.is_all() && !outbox.scope.admits(tenant) {
            // Out of this subscriber's scope: if it could see the old value, the key is
            // gone for it.
            let old = state.table.get(&key).map(|e| e.value.tenant());
            if old.is_some_and(|old| outbox.scope.admits(old)) {
                outbox.push(&key, Pending::Delete);
            }
            continue;
        }
        outbox.push(
            &key,
            Pending::Update {
                wire: wire.clone(),
                repeat,
            },
        );
    }
    state.table.insert(key, Entry { value, wire });
}

fn deliver_delete<T: Topic>(state: &mut State<T>, key: &str) {
    let Some(old) = state.table.remove(key) else {
        return;
    };
    let tenant = old.value.tenant();
    for outbox in &state.outboxes {
        if outbox.scope.admits(tenant) {
            outbox.push(key, Pending::Delete);
        }
    }
}

/// Group commit: whatever publishers queued while the last group was on disk becomes the
/// next group, one journal append and one fdatasync, then delivered in queue order and
/// acknowledged; its key files follow without fsync.
async fn commit_loop<T: Topic>(shared: Arc<Shared<T>>, journal: Arc<Mutex<Journal>>) {
    loop {
        let mut ops = std::mem::take(&mut lock(&shared.queue).ops);
        if ops.is_empty() {
            shared.queue_notify.notified().await;
            continue;
        }
        let changes: Vec<Change> = ops
            .iter_mut()
            .map(|op| Change {
                key: op.key.clone(),
                envelope: op.envelope.take(),
            })
            .collect();
        let on_disk = journal.clone();
        let appended = tokio::task::spawn_blocking(move || {
            let result = lock(&on_disk).append(&changes);
            (changes, result)
        })
        .await;
        let (changes, result) = match appended {
            Ok((changes, result)) => (changes, result.map_err(|e| e.to_string())),
            Err(e) => (Vec::new(), Err(e.to_string())),
        };
        if let Err(e) = &result {
            tracing::warn!(topic = %shared.label, updates = ops.len(), "journal append failed: {e}");
        }
        {
            let mut queue = lock(&shared.queue);
            let mut state = lock(&shared.state);
            for op in &ops {
                if queue
                    .latest
                    .get(&op.key)
                    .is_some_and(|(t, _)| *t == op.ticket)
                {
                    queue.latest.remove(&op.key);
                }
            }
            // The map holds whole values: a burst (every record published again at start) must
            // not keep its peak for the life of the agent.
            if queue.latest.capacity() > 4 * queue.latest.len().max(16) {
                let keep = queue.latest.len() * 2;
                queue.latest.shrink_to(keep);
            }
            if result.is_ok() {
                for op in &mut ops {
                    match (op.value.take(), op.wire.take()) {
                        (Some(value), Some(wire)) => {
                            deliver_update(&mut state, op.key.clone(), value, wire, op.repeat)
                        }
                        _ => deliver_delete(&mut state, &op.key),
                    }
                }
            }
        }
        for op in ops {
            let outcome = result.clone().map_err(|e| {
                BusError::io(
                    "appending to the journal in",
                    &shared.files.dir,
                    std::io::Error::other(e),
                )
            });
            let _ = op.done.send(outcome);
        }
        if result.is_ok() {
            let on_disk = journal.clone();
            let _ = tokio::task::spawn_blocking(move || lock(&on_disk).settle(changes)).await;
        }
    }
}

fn lock_len<T: Topic>(shared: &Shared<T>) -> usize {
    lock(&shared.state).table.len()
}

fn encode<T: Topic>(label: &str, key: &str, value: &T) -> Result<Vec<u8>, BusError> {
    frame::encode_value(value).map_err(|e| BusError::Encode {
        topic: label.to_string(),
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn new_epoch() -> u64 {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    high ^ low
}

/// The agent's directory under the run root: created 0755 so that permitted readers can reach
/// the sockets, whose own mode and owner-checks guard them.
fn create_public_dir(dir: &Path) -> Result<(), BusError> {
    std::fs::create_dir_all(dir).map_err(|e| BusError::io("creating", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| BusError::io("setting permissions of", dir, e))
}

fn take_lock(path: &Path, label: &str) -> Result<Flock<File>, BusError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| BusError::io("opening", path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            let _ = locked.set_len(0);
            let _ = write!(locked, "{}", std::process::id());
            Ok(locked)
        }
        Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            Err(BusError::AlreadyPublished {
                topic: label.to_string(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    format!("pid {holder}")
                },
            })
        }
        Err((_, errno)) => Err(BusError::io("locking", path, errno.into())),
    }
}

/// Binds under a temporary name, sets mode and group, then renames into place, so the socket
/// never exists with looser permissions. A stale socket of a dead publisher (whose lock we now
/// hold) is replaced by the rename.
fn bind_socket(socket: &Path, access: &Access) -> Result<UnixListener, BusError> {
    let tmp = socket.with_extension("sock.new");
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| BusError::io("binding", &tmp, e))?;
    // 0660 at most, or 0666 for a topic with tenant readers (SO_PEERCRED is then the gate).
    let mode = access.effective_socket_mode();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| BusError::io("setting permissions of", &tmp, e))?;
    if let Some(gid) = access.socket_group {
        std::os::unix::fs::chown(&tmp, None, Some(gid))
            .map_err(|e| BusError::io("changing the group of", &tmp, e))?;
    }
    std::fs::rename(&tmp, socket).map_err(|e| BusError::io("renaming", socket, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| BusError::io("configuring", socket, e))?;
    UnixListener::from_std(listener).map_err(|e| BusError::io("registering", socket, e))
}

async fn accept_loop<T: Topic>(shared: Arc<Shared<T>>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(shared.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(topic = %shared.label, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve<T: Topic>(shared: Arc<Shared<T>>, stream: UnixStream) {
    let peer = match Peer::of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(topic = %shared.label, "dropping a connection without credentials: {e}");
            return;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, frame::read_frame(&mut reader, MAX_HELLO))
        .await
    {
        Ok(Ok(body)) => frame::decode::<Hello>(&body).map_err(|e| format!("malformed frame: {e}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no hello within {HELLO_TIMEOUT:?}")),
    };
    let admitted = match &hello {
        Err(e) => Err(format!("bad hello: {e}")),
        Ok(Hello::Subscribe { protocol, .. }) if *protocol != PROTOCOL => Err(format!(
            "protocol {protocol} is not supported (this publisher speaks {PROTOCOL})"
        )),
        Ok(Hello::Subscribe { topic, .. }) if topic != T::NAME => {
            Err(format!("this socket publishes {}, not {topic}", T::NAME))
        }
        Ok(_) => shared.access.check(&peer, shared.uid),
    };
    let scope = match admitted {
        Ok(scope) => scope,
        Err(reason) => {
            tracing::warn!(topic = %shared.label, peer = %peer, "refused: {reason}");
            let mut buf = Vec::new();
            if frame::encode_into(&mut buf, &ServerFrame::Refused { reason }).is_ok() {
                let _ = writer.write_all(&buf).await;
            }
            return;
        }
    };

    let mut buf = Vec::new();
    let welcome = ServerFrame::Welcome {
        protocol: PROTOCOL,
        topic: T::NAME.to_string(),
        publisher: shared.agent.clone(),
        epoch: shared.epoch,
    };
    if frame::encode_into(&mut buf, &welcome).is_err() || writer.write_all(&buf).await.is_err() {
        return;
    }
    buf.clear();
    let outbox = Arc::new(Outbox::new(peer.to_string(), writer, scope));
    {
        let mut state = lock(&shared.state);
        for (key, entry) in &state.table {
            if !outbox.scope.admits(entry.value.tenant()) {
                continue;
            }
            outbox.push(
                key,
                Pending::Update {
                    wire: entry.wire.clone(),
                    repeat: false,
                },
            );
        }
        outbox.push_control(Control::Synchronized);
        if state.restarted {
            outbox.push_control(Control::Restarted);
        }
        state.outboxes.push(outbox.clone());
    }
    tracing::debug!(topic = %shared.label, peer = %peer, scope = %outbox.scope, "subscriber connected");

    // A subscriber sends nothing after its hello: a byte from it is a violation, EOF a goodbye.
    let watcher = {
        let outbox = outbox.clone();
        let label = shared.label.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut byte = [0u8; 1];
            match tokio::io::AsyncReadExt::read(&mut reader, &mut byte).await {
                Ok(0) | Err(_) => {}
                Ok(_) => {
                    tracing::warn!(topic = %label, peer = %peer, "subscriber wrote to a read-only topic; dropping it")
                }
            }
            outbox.close();
        })
    };

    // Whatever the publish path could not write directly is written here.
    loop {
        let (offset, closed) = outbox.take_work(&mut buf, WRITE_BATCH);
        if buf.len() > offset {
            if let Err(e) = outbox.write_all(&buf[offset..]).await {
                tracing::debug!(topic = %shared.label, peer = %peer, "subscriber gone: {e}");
                break;
            }
            buf.clear();
            outbox.done_writing();
            continue;
        }
        if closed {
            break;
        }
        outbox.notify.notified().await;
    }
    outbox.close();
    watcher.abort();
    lock(&shared.state)
        .outboxes
        .retain(|o| !Arc::ptr_eq(o, &outbox));
}

async fn flush_loop<T: Topic>(shared: Arc<Shared<T>>) {
    let mut failing = false;
    loop {
        if failing {
            // Woken by a new publish or by the retry, whichever comes first.
            let _ = tokio::time::timeout(KEY_FILE_RETRY, shared.dirty_notify.notified()).await;
        } else {
            shared.dirty_notify.notified().await;
        }
        tokio::time::sleep(FLUSH_DELAY).await;
        match flush_dirty(&shared).await {
            Ok(()) => {
                if failing {
                    tracing::info!(topic = %shared.label, "key files written again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(topic = %shared.label, "writing key files failed, retried every {} s: {e}", KEY_FILE_RETRY.as_secs());
                }
                failing = true;
            }
        }
    }
}

/// Writes the key files of every key published since the last flush. A key whose file could
/// not be written goes back to be written again, unless a newer value is already waiting:
/// a reader of the files (and the publisher after a restart) never keeps an older value than
/// the one delivered.
async fn flush_dirty<T: Topic>(shared: &Arc<Shared<T>>) -> Result<(), BusError> {
    let pending = std::mem::take(&mut *lock(&shared.dirty));
    if pending.is_empty() {
        return Ok(());
    }
    let files = shared.files.clone();
    let writing = shared.writing.clone();
    let failed = tokio::task::spawn_blocking(move || {
        let _writing = lock(&writing);
        write_dirty(&files, pending)
    })
    .await
    .map_err(|e| BusError::io("writing", &shared.files.dir, std::io::Error::other(e)))?;
    let Some((first_key, first_error)) = failed
        .iter()
        .next()
        .map(|(key, (_, error))| (key.clone(), error.clone()))
    else {
        return Ok(());
    };
    let count = failed.len();
    let mut dirty = lock(&shared.dirty);
    for (key, (value, _)) in failed {
        dirty.entry(key).or_insert(value);
    }
    Err(BusError::io(
        "writing",
        &shared.files.dir,
        std::io::Error::other(format!(
            "{count} key file(s) not written, the first {first_key}: {first_error}"
        )),
    ))
}

/// Writes the key files of `pending`; returns those that could not be written, with why.
#[allow(clippy::type_complexity)]
fn write_dirty<T: Topic>(
    files: &KeyFiles,
    pending: BTreeMap<String, Option<T>>,
) -> BTreeMap<String, (Option<T>, String)> {
    let mut failed = BTreeMap::new();
    for (key, value) in pending {
        let result = match &value {
            Some(value) => files.write(value).map_err(|e| e.to_string()),
            None => files.remove(&key).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(dir = %files.dir.display(), key = %key, "key file: {e}");
            failed.insert(key, (value, e));
        }
    }
    failed
}

// ---- Outbox: per-subscriber queue with per-key coalescing ----

#[derive(Clone)]
enum Pending {
    Update { wire: Arc<Vec<u8>>, repeat: bool },
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Synchronized,
    Restarted,
}

enum Slot {
    Key(String),
    Control(Control),
}

struct Outbox {
    peer: String,
    /// What this subscriber may read; the publish path filters by it.
    scope: Scope,
    writer: OwnedWriteHalf,
    inner: Mutex<OutboxState>,
    notify: Notify,
}

#[derive(Default)]
struct OutboxState {
    order: VecDeque<Slot>,
    pending: HashMap<String, (Pending, u64)>,
    /// Bytes of a frame the publish path began writing and the socket did not take whole.
    partial: Vec<u8>,
    /// The writer task holds bytes taken from this outbox and is writing them.
    writing: bool,
    skipped: u64,
    closed: bool,
}

impl Outbox {
    fn new(peer: String, writer: OwnedWriteHalf, scope: Scope) -> Self {
        Self {
            peer,
            scope,
            writer,
            inner: Mutex::new(OutboxState::default()),
            notify: Notify::new(),
        }
    }

    /// Queues the latest state of `key`, replacing an undelivered older one in place. When
    /// nothing is queued or being written, the frame goes straight into the socket instead:
    /// no task switch, which is what keeps delivery close to a raw socket write.
    fn push(&self, key: &str, op: Pending) {
        let mut state = lock(&self.inner);
        if state.closed {
            return;
        }
        if let Some((queued, skipped)) = state.pending.get_mut(key) {
            let repeat = matches!(queued, Pending::Update { repeat: true, .. });
            *queued = match op {
                Pending::Update {
                    wire,
                    repeat: again,
                } => Pending::Update {
                    wire,
                    repeat: repeat || again,
                },
                Pending::Delete => Pending::Delete,
            };
            *skipped += 1;
            state.skipped += 1;
            return;
        }
        let frame = match &op {
            Pending::Update { wire, repeat } => ServerFrame::Update {
                key: key.to_string(),
                value: wire,
                skipped: 0,
                repeat: *repeat,
            },
            Pending::Delete => ServerFrame::Delete {
                key: key.to_string(),
                skipped: 0,
            },
        };
        if self.write_directly(&mut state, &frame) {
            return;
        }
        state.pending.insert(key.to_string(), (op, 0));
        state.order.push_back(Slot::Key(key.to_string()));
        drop(state);
        self.notify.notify_one();
    }

    fn push_control(&self, control: Control) {
        let mut state = lock(&self.inner);
        if state.closed || matches!(state.order.back(), Some(Slot::Control(c)) if *c == control) {
            return;
        }
        let frame = match control {
            Control::Synchronized => ServerFrame::Synchronized,
            Control::Restarted => ServerFrame::Restarted,
        };
        if self.write_directly(&mut state, &frame) {
            return;
        }
        state.order.push_back(Slot::Control(control));
        drop(state);
        self.notify.notify_one();
    }

    /// Writes `frame` now if nothing is ahead of it. Returns false if it must be queued.
    fn write_directly(&self, state: &mut OutboxState, frame: &ServerFrame<'_>) -> bool {
        if state.writing || !state.partial.is_empty() || !state.order.is_empty() {
            return false;
        }
        let mut bytes = Vec::new();
        if let Err(e) = frame::encode_into(&mut bytes, frame) {
            tracing::error!(peer = %self.peer, "cannot encode a frame: {e}");
            return true;
        }
        match self.writer.try_write(&bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => {
                bytes.drain(..n);
                state.partial = bytes;
                self.notify.notify_one();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                state.partial = bytes;
                self.notify.notify_one();
            }
            Err(_) => {
                state.closed = true;
                self.notify.notify_one();
            }
        }
        true
    }

    fn close(&self) {
        lock(&self.inner).closed = true;
        self.notify.notify_one();
    }

    /// Hands the writer task its next bytes: the unfinished direct write first, then queued
    /// frames up to about `limit` bytes. Returns where the new bytes start in `buf` and
    /// whether the outbox is closed.
    fn take_work(&self, buf: &mut Vec<u8>, limit: usize) -> (usize, bool) {
        let mut state = lock(&self.inner);
        let offset = buf.len();
        if !state.partial.is_empty() {
            buf.append(&mut state.partial);
        }
        while buf.len() < limit {
            let Some(slot) = state.order.pop_front() else {
                break;
            };
            let encoded = match slot {
                Slot::Control(Control::Synchronized) => {
                    frame::encode_into(buf, &ServerFrame::Synchronized)
                }
                Slot::Control(Control::Restarted) => {
                    frame::encode_into(buf, &ServerFrame::Restarted)
                }
                Slot::Key(key) => match state.pending.remove(&key) {
                    Some((Pending::Update { wire, repeat }, skipped)) => frame::encode_into(
                        buf,
                        &ServerFrame::Update {
                            key,
                            value: &wire,
                            skipped,
                            repeat,
                        },
                    ),
                    Some((Pending::Delete, skipped)) => {
                        frame::encode_into(buf, &ServerFrame::Delete { key, skipped })
                    }
                    None => continue,
                },
            };
            if let Err(e) = encoded {
                tracing::error!(peer = %self.peer, "cannot encode a frame: {e}");
            }
        }
        state.writing = buf.len() > offset;
        (offset, state.closed)
    }

    fn done_writing(&self) {
        lock(&self.inner).writing = false;
    }

    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            self.writer.writable().await?;
            match self.writer.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn stats(&self) -> SubscriberStats {
        let state = lock(&self.inner);
        SubscriberStats {
            peer: self.peer.clone(),
            pending: state.pending.len(),
            skipped: state.skipped,
        }
    }
}

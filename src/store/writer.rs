//! The daemon's one writer thread: group-commits agent statistics and connection records sent by
//! the shards, and enforces the connection records' retention.
//!
//! Must stay true:
//! - [`WriterHandle::send`] never blocks and never allocates beyond the op itself: a bounded
//!   channel and `try_send`; when full it returns `false` and the op is lost (statistics only).
//! - One batch = one write transaction = one commit: block for the first op, then gather up to
//!   [`WRITER_BATCH_MAX`] more or until [`WRITER_BATCH_WINDOW`] has passed.
//! - [`WriterHandle::shutdown`] commits everything queued before it returns.
//! - A failed commit loses that batch only; the thread keeps going and counts the error.
//! - Ops are committed in the order they were queued: once [`WriterStats::ops`] (plus
//!   [`WriterStats::lost_ops`]) reaches n, the first n ops queued have been handled.
//! - Retention runs between batches, at most every [`RetentionPolicy::check_interval`] (sooner
//!   while a backlog remains), deleting at most [`RETENTION_MAX_DELETES`] rows per transaction.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::{unix_now, AgentRecord, ConnectionRecord, RetentionPolicy, Store, RETENTION_MAX_DELETES};

/// How long a failed commit keeps `/readyz` red (seconds).
pub const PROBE_ERROR_WINDOW: u64 = 30;

/// Capacity of the writer's queue, in ops.
pub const WRITER_QUEUE_CAPACITY: usize = 65536;
/// Most ops gathered after the first one before committing.
pub const WRITER_BATCH_MAX: usize = 1024;
/// Longest wait for more ops after the first one before committing.
pub const WRITER_BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Pause between retention passes while a backlog remains (lets batches through in between).
const RETENTION_BACKLOG_PAUSE: Duration = Duration::from_millis(20);

/// What a shard asks the writer to commit. Times are Unix seconds.
///
/// Agent ops update the agent's row; ops for agents that no longer exist are skipped. Shards
/// should send `AgentSeen` sparingly (e.g. at most once a minute per connection): each one is a
/// record rewrite.
///
/// Connection ops maintain one [`ConnectionRecord`] per connection, named by `conn_id` (the
/// relay's `c_…` id for agents, the session id `s_…` for clients) and `opened` (the record's open
/// time, which is part of its key): `ConnectionOpened` once after the upgrade, optionally
/// `ConnectionSeen` now and then, `ConnectionClosed` once at the end. An op for a connection with
/// no record (never opened, the open was dropped, or retention deleted it) is skipped; so is a
/// second `ConnectionOpened` with the same `conn_id` and `opened`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Sets `last_connected` (and `last_seen`).
    AgentConnected { agent_id: String, at: u64 },
    /// Raises `last_seen`.
    AgentSeen { agent_id: String, at: u64 },
    /// Sets `last_disconnected` (and raises `last_seen`).
    AgentDisconnected { agent_id: String, at: u64 },
    /// Stores a new connection record (boxed: keeps every queue slot small). Build it with
    /// [`ConnectionRecord::new`]. Skipped when `conn_id` or `agent_id` is not a relay id, `user`
    /// is not 1 to 128 bytes, or `remote` is over [`MAX_REMOTE_BYTES`](super::MAX_REMOTE_BYTES).
    ConnectionOpened(Box<ConnectionRecord>),
    /// A live connection's running totals: raises `last_seen`, sets the counters. Optional, and
    /// like `AgentSeen` a rewrite: at most about once a minute per connection. Ignored once closed.
    ConnectionSeen {
        conn_id: String,
        /// The `opened` of the record sent in `ConnectionOpened`.
        opened: u64,
        at: u64,
        frames_in: u64,
        frames_out: u64,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// The connection is gone: its final totals. Sets `closed`, the counters and `close_code`,
    /// raises `last_seen`.
    /// Writes a marker in `meta`: proves the store can commit (`/readyz`).
    Probe { at: u64 },
    ConnectionClosed {
        conn_id: String,
        /// The `opened` of the record sent in `ConnectionOpened`.
        opened: u64,
        last_seen: u64,
        closed: u64,
        frames_in: u64,
        frames_out: u64,
        bytes_in: u64,
        bytes_out: u64,
        close_code: Option<u16>,
    },
}

impl WriteOp {
    /// The agent an agent op is for; `None` for connection ops.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            WriteOp::AgentConnected { agent_id, .. }
            | WriteOp::AgentSeen { agent_id, .. }
            | WriteOp::AgentDisconnected { agent_id, .. } => Some(agent_id),
            WriteOp::ConnectionOpened(_)
            | WriteOp::ConnectionSeen { .. }
            | WriteOp::ConnectionClosed { .. }
            | WriteOp::Probe { .. } => None,
        }
    }

    /// The connection a connection op is for; `None` for agent ops.
    pub fn conn_id(&self) -> Option<&str> {
        match self {
            WriteOp::ConnectionOpened(rec) => Some(&rec.conn_id),
            WriteOp::ConnectionSeen { conn_id, .. } | WriteOp::ConnectionClosed { conn_id, .. } => {
                Some(conn_id)
            }
            _ => None,
        }
    }

    pub(super) fn apply_to(&self, rec: &mut AgentRecord) {
        let seen = |rec: &mut AgentRecord, at: u64| {
            rec.last_seen = Some(rec.last_seen.map_or(at, |s| s.max(at)));
        };
        match *self {
            WriteOp::AgentConnected { at, .. } => {
                rec.last_connected = Some(at);
                seen(rec, at);
            }
            WriteOp::AgentSeen { at, .. } => seen(rec, at),
            WriteOp::AgentDisconnected { at, .. } => {
                rec.last_disconnected = Some(at);
                seen(rec, at);
            }
            WriteOp::ConnectionOpened(_)
            | WriteOp::ConnectionSeen { .. }
            | WriteOp::ConnectionClosed { .. }
            | WriteOp::Probe { .. } => {}
        }
    }
}

enum Msg {
    Op(WriteOp),
    /// Commit what is queued before this, then signal.
    Flush(Sender<()>),
    /// Commit everything queued, then exit.
    Shutdown,
}

/// A snapshot of the writer's counters (monotonic unless said otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Committed write transactions.
    pub batches: u64,
    /// Ops in committed batches (applied or skipped). Ops commit in queue order, so with one
    /// sending thread and no [`lost_ops`](Self::lost_ops), the first `ops` ops it queued are
    /// durable.
    pub ops: u64,
    /// Ops skipped: their agent or connection record does not exist, or the record is
    /// malformed or a duplicate.
    pub skipped: u64,
    /// Size of the last committed batch (a gauge).
    pub last_batch_size: u64,
    /// Duration of the last commit, microseconds (a gauge).
    pub last_commit_micros: u64,
    /// Batches lost to an LMDB error.
    pub commit_errors: u64,
    /// Ops in batches lost to an LMDB error.
    pub lost_ops: u64,
    /// Connection records deleted by retention.
    pub pruned: u64,
    /// Retention passes that failed (retried at the next interval).
    pub prune_errors: u64,
    /// Ops refused by [`WriterHandle::send`] (queue full or writer shut down).
    pub dropped: u64,
    /// Ops waiting in the queue now (a gauge).
    pub queued: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    skipped: AtomicU64,
    last_batch_size: AtomicU64,
    last_commit_micros: AtomicU64,
    commit_errors: AtomicU64,
    /// Unix seconds of the last failed commit (0: never).
    last_error_at: AtomicU64,
    lost_ops: AtomicU64,
    pruned: AtomicU64,
    prune_errors: AtomicU64,
    dropped: AtomicU64,
}

struct Shared {
    counters: Counters,
    closed: AtomicBool,
    /// Set by the writer thread when it stops reading the queue.
    exited: AtomicBool,
    join: Mutex<Option<JoinHandle<()>>>,
}

/// Sends statistics to the writer thread. `Clone + Send + Sync`; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle").field("stats", &self.writer_stats()).finish()
    }
}

/// Start the writer thread for `store` (one per daemon) with the default retention
/// ([`RetentionPolicy::default`]: 100 000 records, 30 days).
///
/// # Panics
/// If the OS refuses to create a thread.
pub fn spawn_writer(store: Store) -> WriterHandle {
    spawn_writer_with(store, RetentionPolicy::default())
}

/// Start the writer thread for `store` (one per daemon), keeping connection records within
/// `retention` (from the `[records]` config section:
/// `RetentionPolicy::new(c.records.max_records, c.records.max_age_days)`).
///
/// # Panics
/// If the OS refuses to create a thread.
pub fn spawn_writer_with(store: Store, retention: RetentionPolicy) -> WriterHandle {
    let (tx, rx) = crossbeam_channel::bounded(WRITER_QUEUE_CAPACITY);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        closed: AtomicBool::new(false),
        exited: AtomicBool::new(false),
        join: Mutex::new(None),
    });
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("sb-store-writer".into())
        .spawn(move || {
            run(&store, &rx, &thread_shared.counters, &retention);
            thread_shared.exited.store(true, Release);
        })
        .expect("spawning the store writer thread");
    *shared.join.lock().unwrap_or_else(PoisonError::into_inner) = Some(join);
    WriterHandle { tx, shared }
}

impl WriterHandle {
    /// Queue `op` without blocking. `false` when the queue is full or the writer is shut down
    /// (the op is dropped and counted in [`WriterStats::dropped`]).
    pub fn send(&self, op: WriteOp) -> bool {
        if !self.shared.closed.load(Relaxed) && self.tx.try_send(Msg::Op(op)).is_ok() {
            return true;
        }
        self.shared.counters.dropped.fetch_add(1, Relaxed);
        false
    }

    /// Readiness of the store (`/readyz`): a marker committed through the writer, and no
    /// batch lost to a failed commit in the last [`PROBE_ERROR_WINDOW`] (a full map or disk
    /// refuses records long before it refuses an 8-byte marker).
    pub fn probe(&self) -> bool {
        let last_error = self.shared.counters.last_error_at.load(Relaxed);
        let recent_error =
            last_error != 0 && super::unix_now().saturating_sub(last_error) < PROBE_ERROR_WINDOW;
        self.send(WriteOp::Probe { at: super::unix_now() }) && self.flush() && !recent_error
    }

    /// Block until everything queued before this call is committed (tests, `/readyz`, drain).
    /// `false` if the writer is gone, or if a commit failed while waiting (then some of what was
    /// queued before may be lost).
    pub fn flush(&self) -> bool {
        if self.shared.closed.load(Relaxed) {
            return false;
        }
        let errors_before = self.shared.counters.commit_errors.load(Acquire);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(done_tx)).is_err() {
            return false;
        }
        loop {
            match done_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return self.shared.counters.commit_errors.load(Acquire) == errors_before,
                Err(RecvTimeoutError::Disconnected) => return false,
                // The writer may have exited after our message was queued: it will never answer.
                Err(RecvTimeoutError::Timeout) if self.shared.exited.load(Acquire) => return false,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Commit everything queued and join the thread. Call once, from the daemon's shutdown; other
    /// clones become inert (their `send` returns `false`).
    pub fn shutdown(self) {
        self.shared.closed.store(true, Relaxed);
        let join = self.shared.join.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(join) = join {
            // Blocking send: the writer is draining, so there will be room. An error means the
            // thread is already gone.
            let _ = self.tx.send(Msg::Shutdown);
            if join.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }

    /// The writer's counters, for metrics.
    pub fn writer_stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            batches: c.batches.load(Relaxed),
            ops: c.ops.load(Relaxed),
            skipped: c.skipped.load(Relaxed),
            last_batch_size: c.last_batch_size.load(Relaxed),
            last_commit_micros: c.last_commit_micros.load(Relaxed),
            commit_errors: c.commit_errors.load(Relaxed),
            lost_ops: c.lost_ops.load(Relaxed),
            pruned: c.pruned.load(Relaxed),
            prune_errors: c.prune_errors.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            queued: self.tx.len() as u64,
        }
    }
}

#[cfg(test)]
impl WriterHandle {
    pub(super) fn take_join_for_test(&self) -> Option<JoinHandle<()>> {
        self.shared.join.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// What to do after gathering one batch.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    /// Shutdown requested: drain without waiting, then exit.
    Drain,
    /// Every sender is gone and the queue is empty.
    Exit,
}

fn run(store: &Store, rx: &Receiver<Msg>, counters: &Counters, retention: &RetentionPolicy) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(WRITER_BATCH_MAX + 1);
    let mut flushes: Vec<Sender<()>> = Vec::new();
    // The first retention pass runs at start (bounds may have been lowered since the last run).
    let mut next_retention = Instant::now();
    loop {
        let first = match rx.recv_deadline(next_retention) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => {
                next_retention = retain(store, retention, counters);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut next = Next::Continue;
        let mut window_open = accept(first, &mut batch, &mut flushes, &mut next);
        let deadline = Instant::now() + WRITER_BATCH_WINDOW;
        while window_open && batch.len() <= WRITER_BATCH_MAX {
            match rx.recv_deadline(deadline) {
                Ok(msg) => window_open = accept(msg, &mut batch, &mut flushes, &mut next),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    next = Next::Exit;
                    break;
                }
            }
        }
        commit(store, &mut batch, counters);
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        match next {
            Next::Continue => {}
            Next::Exit => return,
            Next::Drain => {
                drain(store, rx, &mut batch, counters);
                return;
            }
        }
        if Instant::now() >= next_retention {
            next_retention = retain(store, retention, counters);
        }
    }
}

/// One retention pass; returns when the next one is due.
fn retain(store: &Store, retention: &RetentionPolicy, counters: &Counters) -> Instant {
    let pause = match store.prune_connections(retention, unix_now(), RETENTION_MAX_DELETES) {
        Ok(outcome) => {
            counters.pruned.fetch_add(outcome.deleted as u64, Relaxed);
            if outcome.deleted > 0 {
                tracing::debug!(deleted = outcome.deleted, more = outcome.more, "store retention pass");
            }
            if outcome.more {
                RETENTION_BACKLOG_PAUSE
            } else {
                retention.check_interval
            }
        }
        Err(e) => {
            counters.prune_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "store retention: pass failed");
            retention.check_interval
        }
    };
    Instant::now() + pause
}

/// Take one message into the batch; returns whether to keep waiting for more.
fn accept(msg: Msg, batch: &mut Vec<WriteOp>, flushes: &mut Vec<Sender<()>>, next: &mut Next) -> bool {
    match msg {
        Msg::Op(op) => {
            batch.push(op);
            true
        }
        Msg::Flush(done) => {
            flushes.push(done);
            false
        }
        Msg::Shutdown => {
            *next = Next::Drain;
            false
        }
    }
}

fn drain(store: &Store, rx: &Receiver<Msg>, batch: &mut Vec<WriteOp>, counters: &Counters) {
    loop {
        match rx.try_recv() {
            Ok(Msg::Op(op)) => {
                batch.push(op);
                if batch.len() > WRITER_BATCH_MAX {
                    commit(store, batch, counters);
                }
            }
            Ok(Msg::Flush(done)) => {
                commit(store, batch, counters);
                let _ = done.send(());
            }
            Ok(Msg::Shutdown) => {}
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
    commit(store, batch, counters);
}

fn commit(store: &Store, batch: &mut Vec<WriteOp>, counters: &Counters) {
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    match store.apply_batch(batch) {
        Ok(outcome) => {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            counters.batches.fetch_add(1, Relaxed);
            counters.ops.fetch_add(batch.len() as u64, Relaxed);
            counters.skipped.fetch_add(outcome.skipped as u64, Relaxed);
            counters.last_batch_size.store(batch.len() as u64, Relaxed);
            counters.last_commit_micros.store(micros, Relaxed);
        }
        Err(e) => {
            counters.lost_ops.fetch_add(batch.len() as u64, Relaxed);
            counters.last_error_at.store(super::unix_now(), Relaxed);
            counters.commit_errors.fetch_add(1, Release);
            tracing::error!(error = %e, ops = batch.len(), "store writer: commit failed, batch lost");
        }
    }
    batch.clear();
}

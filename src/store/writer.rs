//! The daemon's one writer thread: group-commits agent statistics, connection records and the
//! offline-delivery records (history, mailboxes, closed sessions) sent by the shards, tells the
//! shards which of their ticketed ops are committed, and enforces retention.
//!
//! Must stay true:
//! - [`WriterHandle::send`] and [`WriterHandle::send_durable`] never block and never allocate
//!   beyond the op itself: a bounded channel and `try_send`; when full they return `false` and
//!   the op is lost (the caller of `send_durable` must treat that as "not stored").
//! - One batch = one write transaction = one commit: block for the first op, then gather up to
//!   [`WRITER_BATCH_MAX`] more or until [`WRITER_BATCH_WINDOW`] has passed.
//! - [`WriterHandle::shutdown`] commits everything queued before it returns.
//! - A failed commit loses that batch only; the thread keeps going and counts the error.
//! - Every op queued with a [`Ticket`] is settled exactly once, after its batch's commit attempt
//!   (shutdown and drain included): if the commit failed its `n` is pushed to the shard's failed
//!   list first, then the shard's `settled` is raised (a monotonic max, `Release`) to the
//!   highest `n` of that shard in the batch, then the shard's waker (if registered) is woken.
//!   So a shard that reads [`WriterHandle::settled`] and then [`WriterHandle::take_failed`]
//!   knows the fate of every ticket up to `settled`: committed unless taken as failed. No
//!   message carries this, so none can be lost.
//! - Tickets of one shard are settled in `n` order only if the shard sends them in `n` order
//!   from one thread (queue order is commit order).
//! - Ops are committed in the order they were queued: once [`WriterStats::ops`] (plus
//!   [`WriterStats::lost_ops`]) reaches n, the first n ops queued have been handled.
//! - Retention runs between batches, at most every [`RetentionPolicy::check_interval`] (sooner
//!   while a backlog remains), deleting at most [`RETENTION_MAX_DELETES`] connection rows and
//!   [`RETENTION_MAX_DELETES`] offline-delivery rows per transaction.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::{
    unix_now, AgentRecord, ConnectionRecord, RetentionPolicy, SessionClosed, Store, StreamKey, Ticket,
    RETENTION_MAX_DELETES,
};

/// How long a failed commit keeps `/readyz` red (seconds).
pub const PROBE_ERROR_WINDOW: u64 = 30;

/// Capacity of the writer's queue, in ops.
pub const WRITER_QUEUE_CAPACITY: usize = 65536;
/// Most ops gathered after the first one before committing.
pub const WRITER_BATCH_MAX: usize = 1024;
/// Longest wait for more ops after the first one before committing.
pub const WRITER_BATCH_WINDOW: Duration = Duration::from_millis(5);
/// How long the writer naps between polls of its queue while gathering a batch.
const WRITER_POLL_NAP: Duration = Duration::from_micros(500);
/// Pause between retention passes while a backlog remains (lets batches through in between).
const RETENTION_BACKLOG_PAUSE: Duration = Duration::from_millis(20);
/// Shards whose tickets the writer tracks: [`Ticket::shard`] must be below this.
pub const MAX_TICKET_SHARDS: usize = SLOT_CHUNK * SLOT_CHUNKS;
const SLOT_CHUNK: usize = 64;
const SLOT_CHUNKS: usize = 64;

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
///
/// Offline-delivery ops (spec §8) maintain a stream's history, an agent's mailbox and the
/// closed sessions; read them back with [`Store::load_user`]. Send them with
/// [`WriterHandle::send_durable`] to learn when they are committed. They are skipped (counted)
/// when a key part is malformed: the user empty, over 128 bytes or containing NUL; the agent,
/// session, epoch, `to` or `from` not a relay id ([`crate::ids::is_valid_id`]). Shared strings
/// are `Arc`s and frames [`Bytes`], so a shard's clone is a refcount.
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
    /// Appends message `seq` to a stream's history. If the stream has no meta or another
    /// epoch, its history is deleted first and its meta restarted as `{epoch, last_seq: seq,
    /// clean: false}`; else `last_seq` is raised to `seq`. Then the stream's entries with
    /// `seq < trim_below` are deleted (0: none).
    HistoryAppend {
        key: Arc<StreamKey>,
        epoch: Arc<str>,
        seq: u64,
        at: u64,
        /// The session it is addressed to; `None` for a broadcast.
        to: Option<Arc<str>>,
        /// The frame as sent, stored byte-exact.
        frame: Bytes,
        trim_below: u64,
    },
    /// `clean: false` (a lease): marks the stream dirty if it has a meta (any epoch).
    /// `clean: true`: if the meta has this epoch, `clean = (last_seq == through)`; otherwise
    /// skipped. Also skipped (nothing to mark) when the stream has no meta.
    StreamMark { key: Arc<StreamKey>, epoch: Arc<str>, clean: bool, through: u64 },
    /// Deletes the stream's entries with `seq < below`, if its meta has this epoch (else skipped).
    HistoryTrim { key: Arc<StreamKey>, epoch: Arc<str>, below: u64 },
    /// Stores message `seq` in an agent's mailbox (`key.agent`) and raises the mailbox's
    /// `last_seq` (a new mailbox starts at `{last_seq: seq, acked: 0}`). Skipped when
    /// `seq <= acked` (already confirmed).
    MailboxPut { key: Arc<StreamKey>, seq: u64, at: u64, from: Arc<str>, frame: Bytes },
    /// The agent confirmed everything through `through`: deletes those entries and raises
    /// `acked` — to at most the mailbox's `last_seq`, so a confirmation beyond what is stored
    /// never swallows a later message. Skipped when the mailbox has no meta.
    MailboxDrop { key: Arc<StreamKey>, through: u64 },
    /// Stores (or overwrites) a closed, resumable session under `(user, session.session)`.
    SessionClosed(Box<SessionClosed>),
    /// Deletes a closed session (it was resumed, or is no longer resumable). Skipped when none
    /// is stored.
    SessionForget { user: Box<str>, session: Box<str> },
}

impl WriteOp {
    /// The agent an agent op is for; `None` for connection ops.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            WriteOp::AgentConnected { agent_id, .. }
            | WriteOp::AgentSeen { agent_id, .. }
            | WriteOp::AgentDisconnected { agent_id, .. } => Some(agent_id),
            _ => None,
        }
    }

    /// Whether this is an offline-delivery op (history, mailbox, closed session).
    pub fn is_durable(&self) -> bool {
        matches!(
            self,
            WriteOp::HistoryAppend { .. }
                | WriteOp::StreamMark { .. }
                | WriteOp::HistoryTrim { .. }
                | WriteOp::MailboxPut { .. }
                | WriteOp::MailboxDrop { .. }
                | WriteOp::SessionClosed(_)
                | WriteOp::SessionForget { .. }
        )
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
            _ => {}
        }
    }
}

enum Msg {
    Op(WriteOp),
    /// An op whose commit the shard `ticket.shard` wants to hear about.
    Durable(WriteOp, Ticket),
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
    /// malformed or a duplicate; offline-delivery ops with a malformed key part or nothing to
    /// act on (see [`WriteOp`]).
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
    /// History entries deleted by retention (older than `history_ttl_secs`).
    pub expired_history: u64,
    /// Mailbox entries deleted by retention (older than `mailbox_ttl_secs`).
    pub expired_mail: u64,
    /// Closed sessions deleted by retention (closed more than `history_ttl_secs` ago).
    pub expired_sessions: u64,
    /// Retention passes that failed (retried at the next interval).
    pub prune_errors: u64,
    /// Ops refused by [`WriterHandle::send`] or [`WriterHandle::send_durable`] (queue full,
    /// writer shut down, or a ticket's shard not below [`MAX_TICKET_SHARDS`]).
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
    expired_history: AtomicU64,
    expired_mail: AtomicU64,
    expired_sessions: AtomicU64,
    prune_errors: AtomicU64,
    dropped: AtomicU64,
}

/// One shard's commit notifications.
#[derive(Default)]
struct ShardSlot {
    /// Highest ticket `n` whose batch's commit was attempted.
    settled: AtomicU64,
    /// Whether `failed` may be non-empty (lets [`WriterHandle::take_failed`] skip the lock).
    has_failed: AtomicBool,
    failed: Mutex<Vec<u64>>,
}

/// The writer's side of the tickets: per-shard slots, allocated 64 shards at a time on first use
/// (reads never lock), and the shards' wakers.
struct Settlement {
    chunks: [OnceLock<Box<[ShardSlot]>>; SLOT_CHUNKS],
    wakers: Mutex<Arc<[Arc<AtomicWaker>]>>,
}

impl Default for Settlement {
    fn default() -> Self {
        Settlement { chunks: std::array::from_fn(|_| OnceLock::new()), wakers: Mutex::new(Arc::new([])) }
    }
}

impl Settlement {
    fn slot(&self, shard: usize) -> Option<&ShardSlot> {
        self.chunks.get(shard / SLOT_CHUNK)?.get().map(|chunk| &chunk[shard % SLOT_CHUNK])
    }

    fn slot_or_create(&self, shard: usize) -> Option<&ShardSlot> {
        let chunk = self.chunks.get(shard / SLOT_CHUNK)?;
        let chunk = chunk.get_or_init(|| (0..SLOT_CHUNK).map(|_| ShardSlot::default()).collect());
        Some(&chunk[shard % SLOT_CHUNK])
    }

    /// The bookkeeping after one commit attempt of a batch holding `tickets` (in queue order):
    /// failures first, then `settled`, then the wakes (see the module header).
    fn settle(&self, tickets: &[Ticket], committed: bool) {
        if tickets.is_empty() {
            return;
        }
        // (shard, highest n in this batch), in order of first appearance: a handful of shards.
        let mut highest: Vec<(usize, u64)> = Vec::new();
        for t in tickets {
            match highest.iter_mut().find(|(shard, _)| *shard == t.shard) {
                Some((_, n)) => *n = (*n).max(t.n),
                None => highest.push((t.shard, t.n)),
            }
        }
        for &(shard, n) in &highest {
            let Some(slot) = self.slot_or_create(shard) else { continue };
            if !committed {
                let mut failed = slot.failed.lock().unwrap_or_else(PoisonError::into_inner);
                failed.extend(tickets.iter().filter(|t| t.shard == shard).map(|t| t.n));
                slot.has_failed.store(true, Release);
            }
            slot.settled.fetch_max(n, Release);
        }
        let wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for &(shard, _) in &highest {
            if let Some(waker) = wakers.get(shard) {
                waker.wake();
            }
        }
    }

    fn settled(&self, shard: usize) -> u64 {
        self.slot(shard).map_or(0, |slot| slot.settled.load(Acquire))
    }

    fn take_failed(&self, shard: usize) -> Vec<u64> {
        let Some(slot) = self.slot(shard) else { return Vec::new() };
        if !slot.has_failed.load(Acquire) {
            return Vec::new();
        }
        let mut failed = slot.failed.lock().unwrap_or_else(PoisonError::into_inner);
        slot.has_failed.store(false, Relaxed);
        std::mem::take(&mut *failed)
    }
}

struct Shared {
    counters: Counters,
    settlement: Settlement,
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
        settlement: Settlement::default(),
        closed: AtomicBool::new(false),
        exited: AtomicBool::new(false),
        join: Mutex::new(None),
    });
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("sb-store-writer".into())
        .spawn(move || {
            run(&store, &rx, &thread_shared, &retention);
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

    /// Queue `op` like [`send`](Self::send) (never blocks; `false` when refused, counted in
    /// [`WriterStats::dropped`]), and settle `ticket` after the commit attempt of its batch.
    ///
    /// The shard then learns the outcome without any message: after a wake (or at any time) it
    /// reads [`settled`](Self::settled) **first**, then [`take_failed`](Self::take_failed):
    /// every ticket of that shard with `n <= settled` was attempted, and it failed exactly when
    /// its `n` was taken from `take_failed` (now or earlier; a failed `n` may be taken before
    /// `settled` reaches it). `ticket.n` must strictly increase per shard in send order; an
    /// `n` whose send returned `false` is never settled. Refused when `ticket.shard` is not
    /// below [`MAX_TICKET_SHARDS`].
    pub fn send_durable(&self, op: WriteOp, ticket: Ticket) -> bool {
        if ticket.shard < MAX_TICKET_SHARDS
            && !self.shared.closed.load(Relaxed)
            && self.tx.try_send(Msg::Durable(op, ticket)).is_ok()
        {
            return true;
        }
        self.shared.counters.dropped.fetch_add(1, Relaxed);
        false
    }

    /// Register the shards' wakers (index = shard), woken after each commit attempt that settled
    /// tickets of that shard. Called once by the server after creating the shards' channels (a
    /// second call replaces the list). A shard registers its task's waker, then reads
    /// [`settled`](Self::settled), so no settlement goes unnoticed. Tickets of shards without a
    /// waker are settled all the same.
    pub fn set_wakers(&self, wakers: Vec<Arc<AtomicWaker>>) {
        *self.shared.settlement.wakers.lock().unwrap_or_else(PoisonError::into_inner) = wakers.into();
    }

    /// The highest ticket `n` of `shard` whose commit was attempted (0 before any, or for a
    /// shard that never sent one). Monotonic. Cheap: one atomic load, no lock.
    pub fn settled(&self, shard: usize) -> u64 {
        self.shared.settlement.settled(shard)
    }

    /// The `n` of `shard`'s tickets whose commit failed since the last call, in send order (the
    /// ops are lost). Read [`settled`](Self::settled) before calling this. Cheap when there are
    /// none (one atomic load).
    pub fn take_failed(&self, shard: usize) -> Vec<u64> {
        self.shared.settlement.take_failed(shard)
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

    /// Block until everything queued before this call is committed (tests, `/readyz`, drain),
    /// and the tickets of those ops settled.
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

    /// Commit everything queued, settle every ticket queued, and join the thread. Call once, from
    /// the daemon's shutdown, after the shards have stopped sending; other clones become inert
    /// (their `send` and `send_durable` return `false`).
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
            expired_history: c.expired_history.load(Relaxed),
            expired_mail: c.expired_mail.load(Relaxed),
            expired_sessions: c.expired_sessions.load(Relaxed),
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

/// The ops gathered for one commit, and the tickets among them (queue order).
struct Batch {
    ops: Vec<WriteOp>,
    tickets: Vec<Ticket>,
}

impl Batch {
    fn len(&self) -> usize {
        self.ops.len()
    }
}

fn run(store: &Store, rx: &Receiver<Msg>, shared: &Shared, retention: &RetentionPolicy) {
    let counters = &shared.counters;
    let mut batch = Batch { ops: Vec::with_capacity(WRITER_BATCH_MAX + 1), tickets: Vec::new() };
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
        // Gather without blocking in the channel: a receiver parked in `recv` makes every
        // `try_send` of a shard pay a futex wake (a syscall per relayed message). Polling in
        // short naps costs the writer a few wake-ups per window instead.
        while window_open && batch.len() <= WRITER_BATCH_MAX {
            match rx.try_recv() {
                Ok(msg) => window_open = accept(msg, &mut batch, &mut flushes, &mut next),
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::sleep((deadline - now).min(WRITER_POLL_NAP));
                }
                Err(TryRecvError::Disconnected) => {
                    next = Next::Exit;
                    break;
                }
            }
        }
        commit(store, &mut batch, shared);
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        match next {
            Next::Continue => {}
            Next::Exit => return,
            Next::Drain => {
                drain(store, rx, &mut batch, shared);
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
    let now = unix_now();
    let mut more = false;
    match store.prune_connections(retention, now, RETENTION_MAX_DELETES) {
        Ok(outcome) => {
            counters.pruned.fetch_add(outcome.deleted as u64, Relaxed);
            if outcome.deleted > 0 {
                tracing::debug!(deleted = outcome.deleted, more = outcome.more, "store retention pass");
            }
            more |= outcome.more;
        }
        Err(e) => {
            counters.prune_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "store retention: pass failed");
        }
    }
    if retention.history_ttl_secs > 0 || retention.mailbox_ttl_secs > 0 {
        match store.prune_durable(retention, now, RETENTION_MAX_DELETES) {
            Ok(o) => {
                counters.expired_history.fetch_add(o.history as u64, Relaxed);
                counters.expired_mail.fetch_add(o.mail as u64, Relaxed);
                counters.expired_sessions.fetch_add(o.sessions as u64, Relaxed);
                if o.history + o.mail + o.sessions > 0 {
                    tracing::debug!(
                        history = o.history,
                        mail = o.mail,
                        sessions = o.sessions,
                        more = o.more,
                        "store retention pass (offline delivery)"
                    );
                }
                more |= o.more;
            }
            Err(e) => {
                counters.prune_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "store retention: offline-delivery pass failed");
            }
        }
    }
    Instant::now() + if more { RETENTION_BACKLOG_PAUSE } else { retention.check_interval }
}

/// Take one message into the batch; returns whether to keep waiting for more.
fn accept(msg: Msg, batch: &mut Batch, flushes: &mut Vec<Sender<()>>, next: &mut Next) -> bool {
    match msg {
        Msg::Op(op) => {
            batch.ops.push(op);
            true
        }
        Msg::Durable(op, ticket) => {
            batch.ops.push(op);
            batch.tickets.push(ticket);
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

fn drain(store: &Store, rx: &Receiver<Msg>, batch: &mut Batch, shared: &Shared) {
    loop {
        match rx.try_recv() {
            Ok(msg @ (Msg::Op(_) | Msg::Durable(..))) => {
                let mut next = Next::Drain;
                accept(msg, batch, &mut Vec::new(), &mut next);
                if batch.len() > WRITER_BATCH_MAX {
                    commit(store, batch, shared);
                }
            }
            Ok(Msg::Flush(done)) => {
                commit(store, batch, shared);
                let _ = done.send(());
            }
            Ok(Msg::Shutdown) => {}
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
    commit(store, batch, shared);
}

/// Commit the batch (one transaction), then settle its tickets, whatever the outcome.
fn commit(store: &Store, batch: &mut Batch, shared: &Shared) {
    if batch.ops.is_empty() {
        return;
    }
    let counters = &shared.counters;
    let started = Instant::now();
    let result = store.apply_batch(&batch.ops);
    let committed = result.is_ok();
    match result {
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
    shared.settlement.settle(&batch.tickets, committed);
    batch.ops.clear();
    batch.tickets.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    fn t(shard: usize, n: u64) -> Ticket {
        Ticket { shard, n }
    }

    #[test]
    fn settle_bookkeeping() {
        let s = Settlement::default();
        let counts: Vec<Arc<Count>> = (0..2).map(|_| Arc::new(Count(AtomicUsize::new(0)))).collect();
        let wakers: Vec<Arc<AtomicWaker>> = counts
            .iter()
            .map(|c| {
                let w = Arc::new(AtomicWaker::new());
                w.register(&Waker::from(c.clone()));
                w
            })
            .collect();
        *s.wakers.lock().unwrap() = wakers.clone().into();
        let woken = |i: usize| counts[i].0.load(Relaxed);

        // Nothing settled yet; unknown shards read 0 and have no failures.
        assert_eq!((s.settled(0), s.settled(70), s.settled(usize::MAX)), (0, 0, 0));
        assert!(s.take_failed(0).is_empty() && s.take_failed(usize::MAX).is_empty());
        s.settle(&[], false);
        assert_eq!(woken(0) + woken(1), 0);

        // A committed batch: settled rises to each shard's highest n, each shard woken once.
        s.settle(&[t(0, 1), t(1, 1), t(0, 2), t(70, 5)], true);
        assert_eq!((s.settled(0), s.settled(1), s.settled(70)), (2, 1, 5));
        assert_eq!((woken(0), woken(1)), (1, 1));
        assert!(s.take_failed(0).is_empty() && s.take_failed(70).is_empty());

        // A failed batch: every n of it is reported, in order, and settled still rises.
        wakers[0].register(&Waker::from(counts[0].clone()));
        s.settle(&[t(0, 3), t(70, 6), t(0, 4), t(0, 5)], false);
        assert_eq!((s.settled(0), s.settled(70)), (5, 6));
        assert_eq!(s.take_failed(0), [3, 4, 5]);
        assert!(s.take_failed(0).is_empty(), "taken once");
        assert_eq!(s.take_failed(70), [6]);
        assert_eq!(s.settled(1), 1);
        assert!(s.take_failed(1).is_empty());
        assert_eq!((woken(0), woken(1)), (2, 1));

        // Failures accumulate until taken; settled never goes down.
        s.settle(&[t(0, 6)], false);
        s.settle(&[t(0, 7)], true);
        s.settle(&[t(0, 1)], true);
        assert_eq!(s.settled(0), 7);
        assert_eq!(s.take_failed(0), [6]);

        // Shards beyond the table are ignored, not a panic; the last one in range works.
        s.settle(&[t(MAX_TICKET_SHARDS, 1), t(usize::MAX, 1), t(MAX_TICKET_SHARDS - 1, 9)], false);
        assert_eq!((s.settled(MAX_TICKET_SHARDS), s.settled(MAX_TICKET_SHARDS - 1)), (0, 9));
        assert_eq!(s.take_failed(MAX_TICKET_SHARDS - 1), [9]);
    }

    #[test]
    fn queue_slots_stay_small() {
        // One relayed message = one op in a 65536-slot queue.
        assert!(std::mem::size_of::<WriteOp>() <= 104, "{}", std::mem::size_of::<WriteOp>());
        assert!(std::mem::size_of::<Msg>() <= 120, "{}", std::mem::size_of::<Msg>());
    }
}

//! One WebSocket session on its home shard: its task, its outbound queue, its close.
//!
//! I/O is readiness-driven: the task awaits `readable` (or `writable` while output is
//! blocked) and a wake-up from the shard; bytes are `recv`d into the shard's one scratch
//! buffer and fed to [`crate::ws`]. Output is queued as shared [`Bytes`] frames and written
//! with one gathered `sendmsg` per connection per batch of input (see
//! [`ShardCtx::flush_dirty`]).
//!
//! Invariants:
//! - The outbound queue never holds more than `send_buffer_bytes` of data frames; a frame
//!   that would overflow it closes the connection with 4008 instead (counted).
//! - A connection's task is the only place that drops its socket, after the close handshake
//!   (or its deadline) and after [`unregister`] has removed it from the user's state.
//! - No borrow of a connection's state is held across an `.await`.

use crate::auth::agent::AgentKey;
use crate::handshake::Authenticated;
use crate::listener::ConnSlot;
use crate::router::{self, UserState};
use crate::shard::local::ShardCtx;
use crate::ws::{self, Event, Ws};
use bytes::Bytes;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

pub type ConnRef = Rc<Conn>;

/// How long a close handshake may take before the socket is dropped anyway.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Who is on the other end; fixed for the connection's life.
pub enum Ident {
    Agent {
        agent_id: Rc<str>,
        conn_id: Box<str>,
    },
    Client {
        session: Rc<str>,
    },
    /// The test-only echo endpoint.
    Echo,
}

pub enum RoleState {
    Agent {
        key: AgentKey,
        /// Highest accepted message counter (spec §3.2).
        last_ctr: u64,
        expires: Option<u64>,
    },
    Client {
        /// The agent this session is bound to (`agent=`), if any.
        bound: Option<Rc<str>>,
        /// The token's `agents` allowlist, if any.
        allow: Option<Box<[Box<str>]>>,
        exp: u64,
        warned: bool,
        /// What the client asked to resume (spec §8); taken by the welcome.
        resume: Option<Box<crate::handshake::ResumeReq>>,
    },
    Echo,
}

impl RoleState {
    /// Whether a client session may exchange messages with `agent_id`.
    pub fn can_reach(&self, agent_id: &str) -> bool {
        match self {
            RoleState::Client { bound, allow, .. } => {
                bound.as_deref().is_none_or(|b| b == agent_id)
                    && allow.as_deref().is_none_or(|a| a.iter().any(|x| &**x == agent_id))
            }
            RoleState::Agent { .. } | RoleState::Echo => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// We sent a close frame; waiting for the peer's until the deadline.
    Closing(Instant),
    /// Write what is queued (a close reply), then drop the socket (by the deadline at most).
    FlushThenClose(Instant),
    /// Our last bytes are written and our side is shut down (FIN); read and discard until the
    /// peer's EOF (or the deadline), so unread input cannot turn the close into a reset that
    /// destroys our close frame before the peer reads it.
    Draining(Instant),
    Dead,
}

pub struct ConnState {
    pub ws: Ws,
    outq: VecDeque<Bytes>,
    /// Bytes in `outq` not yet written.
    out_bytes: usize,
    /// How much of `outq[0]` is already written.
    head_off: usize,
    dirty: bool,
    want_write: bool,
    pub phase: Phase,
    pub close_code: Option<u16>,
    /// Last frame of any kind from the peer (heartbeat).
    pub last_rx: Instant,
    /// Last data frame from the peer (idle timeout).
    pub last_data: Instant,
    pub last_ping: Instant,
    pub role: RoleState,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes written since the shard last collected them (for its statistics).
    flushed: u64,
    /// The TLS session on a `wss://` listener.
    tls: Option<Box<crate::tls::TlsIo>>,
    /// Frames that wait, in order, behind a store commit or a replay (spec §8): once this is
    /// non-empty every further frame queues behind it, so order is kept.
    backlog: VecDeque<Pending>,
    /// Bytes of budgeted (live) frames in `backlog`; they count toward the outbound budget.
    backlog_bytes: usize,
    /// On the shard's list of connections waiting for a commit.
    pub waiting: bool,
}

/// A frame that waits in a connection's backlog.
pub struct Pending {
    /// The shard's commit ticket this frame waits for (0: none, only for what is ahead).
    pub after: u64,
    pub frame: Bytes,
    /// What to do instead when that commit failed.
    pub on_fail: OnFail,
    /// Counted toward the outbound budget (live traffic); replayed frames are not (they are
    /// shared with the history) and are paced instead.
    pub budgeted: bool,
}

pub enum OnFail {
    /// Send this frame instead (an `error` instead of an `ack … queued`).
    Send(Bytes),
    /// Drop the frame (a mailbox message that was never stored).
    Skip,
    /// Close with 1011: the stream's lease was not committed, so its frames must not go out.
    Close,
}

/// What [`ConnState::pump`] stopped at.
#[derive(Debug, PartialEq, Eq)]
pub enum Pump {
    /// The backlog is empty (or the connection is closing).
    Done,
    /// The front waits for a commit.
    Gated,
    /// The outbound queue is full enough; continue after the next write.
    Full,
}

pub struct Conn {
    pub fd: RawFd,
    /// Index in the shard's connection slab.
    pub key: Cell<usize>,
    pub user: Rc<RefCell<UserState>>,
    pub ident: Ident,
    pub peer: SocketAddr,
    pub opened: Instant,
    /// Unix seconds at open: part of the connection record's key.
    pub opened_unix: u64,
    pub st: RefCell<ConnState>,
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
    _slot: ConnSlot,
}

impl Conn {
    pub fn is_agent(&self) -> bool {
        matches!(self.ident, Ident::Agent { .. })
    }

    pub fn role_label(&self) -> &'static str {
        match self.ident {
            Ident::Agent { .. } => "agent",
            Ident::Client { .. } => "client",
            Ident::Echo => "echo",
        }
    }

    /// Wakes the connection's task (to notice a close, or to wait for writability).
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn notified(&self) {
        poll_fn(|cx| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Result of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The connection is closing or closed: nothing was queued.
    Closed,
    /// The frame would overflow the outbound budget: the connection is now closing (4008).
    Overflow,
}

impl ConnState {
    /// Queues a data frame within the outbound budget (behind the backlog, if any).
    pub fn enqueue(&mut self, frame: Bytes, budget: usize, now: Instant) -> Queued {
        self.enqueue_after(frame, 0, budget, now)
    }

    /// Queues a data frame within the outbound budget, to be written once commit ticket
    /// `after` has settled (0: at once), behind the backlog if any. A frame that waits for a
    /// stream's lease must not go out if that lease was never stored: closes with 1011.
    pub fn enqueue_after(&mut self, frame: Bytes, after: u64, budget: usize, now: Instant) -> Queued {
        if self.phase != Phase::Open {
            return Queued::Closed;
        }
        if self.out_bytes + self.backlog_bytes + frame.len() > budget {
            self.close_slow_consumer(now);
            return Queued::Overflow;
        }
        if self.backlog.is_empty() && after == 0 {
            self.push(frame);
        } else {
            self.backlog_bytes += frame.len();
            self.backlog.push_back(Pending { after, frame, on_fail: OnFail::Close, budgeted: true });
        }
        Queued::Yes
    }

    /// Queues a frame at the back of the backlog, outside the budget: a replayed or queued
    /// message (shared with the history or mailbox, so it costs no copy), or a frame that
    /// waits for commit `after`. False when the connection is closing.
    pub fn defer(&mut self, p: Pending) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        if p.budgeted {
            self.backlog_bytes += p.frame.len();
        }
        self.backlog.push_back(p);
        true
    }

    /// Whether frames wait in the backlog.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Moves backlog frames whose commit has settled onto the outbound queue, in order;
    /// unbudgeted (replayed) frames only while less than half the budget is queued.
    pub fn pump(
        &mut self,
        settled: u64,
        failed: &std::collections::HashSet<u64>,
        budget: usize,
        now: Instant,
    ) -> Pump {
        loop {
            if self.phase != Phase::Open {
                self.backlog.clear();
                self.backlog_bytes = 0;
                return Pump::Done;
            }
            let Some(front) = self.backlog.front() else { return Pump::Done };
            if front.after > settled {
                return Pump::Gated;
            }
            if !front.budgeted && self.out_bytes > budget / 2 {
                return Pump::Full;
            }
            let p = self.backlog.pop_front().expect("front checked");
            if p.budgeted {
                self.backlog_bytes -= p.frame.len();
            }
            let frame = if p.after != 0 && failed.contains(&p.after) {
                match p.on_fail {
                    OnFail::Send(f) => f,
                    OnFail::Skip => continue,
                    OnFail::Close => {
                        self.close(1011, "internal error: store commit failed", now);
                        continue;
                    }
                }
            } else {
                p.frame
            };
            self.push(frame);
        }
    }

    fn push(&mut self, frame: Bytes) {
        self.out_bytes += frame.len();
        self.frames_out += 1;
        self.outq.push_back(frame);
    }

    /// Moves what tungstenite wants to send (pongs, close replies) onto the queue. They count
    /// toward the budget like data: a peer that pings without ever reading is a slow consumer
    /// (4008), not a way to grow our memory.
    pub fn pump_control(&mut self, budget: usize, now: Instant) {
        let Some(b) = self.ws.take_output() else { return };
        if self.out_bytes + b.len() > budget {
            if self.phase == Phase::Open {
                self.close_slow_consumer(now);
            }
            // Closing already: our close frame is queued; what the peer provokes now is dropped.
            return;
        }
        self.push_unbudgeted(b);
    }

    /// Queues bytes outside the budget (the 101 response, control frames).
    fn push_unbudgeted(&mut self, b: Bytes) {
        self.out_bytes += b.len();
        self.outq.push_back(b);
    }

    /// The deadline already running, or a new one from `now`.
    fn close_deadline(&self, now: Instant) -> Instant {
        match self.phase {
            Phase::Closing(d) | Phase::FlushThenClose(d) | Phase::Draining(d) => d,
            _ => now + CLOSE_DEADLINE,
        }
    }

    /// TLS: moves queued frames into rustls one batch (≤ 64 KiB) at a time, writing the
    /// records out before taking the next batch, so rustls never holds more than a batch.
    fn flush_tls(&mut self, fd: RawFd) -> std::io::Result<bool> {
        const BATCH: usize = 64 * 1024;
        let ConnState { tls, outq, out_bytes, head_off, bytes_out, flushed, .. } = self;
        let Some(t) = tls.as_deref_mut() else { return Ok(true) };
        loop {
            if t.wants_write() {
                if !t.write_to(fd)? {
                    return Ok(false);
                }
                continue;
            }
            if outq.is_empty() {
                return Ok(true);
            }
            let mut moved = 0;
            while moved < BATCH {
                let Some(f) = outq.pop_front() else { break };
                let part = &f[*head_off..];
                t.encrypt(part)?;
                moved += part.len();
                *head_off = 0;
            }
            *out_bytes -= moved;
            *bytes_out += moved as u64;
            *flushed += moved as u64;
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes
    }

    /// Starts the close handshake with `code`.
    pub fn close(&mut self, code: u16, reason: &'static str, now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        self.ws.close(code, reason);
        // The close frame itself always goes out (behind a partly written frame at most).
        if let Some(b) = self.ws.take_output() {
            self.push_unbudgeted(b);
        }
        self.close_code = Some(code);
        self.phase = Phase::Closing(now + CLOSE_DEADLINE);
    }

    /// Drops queued frames (keeping one partly written, so the stream stays well-formed)
    /// and closes with 4008.
    fn close_slow_consumer(&mut self, now: Instant) {
        let keep = if self.head_off > 0 { 1 } else { 0 };
        self.backlog.clear();
        self.backlog_bytes = 0;
        while self.outq.len() > keep {
            let b = self.outq.pop_back().expect("len checked");
            self.out_bytes -= b.len();
        }
        crate::metrics::dropped("slow_consumer");
        self.close(4008, "outbound budget exceeded", now);
    }

    /// Writes as much of the queue as the socket takes. Ok(true) when the queue is empty.
    fn flush(&mut self, fd: RawFd) -> std::io::Result<bool> {
        if self.tls.is_some() {
            return self.flush_tls(fd);
        }
        while !self.outq.is_empty() {
            let n = match ws::send_vectored(fd, self.head_off, self.outq.iter()) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.bytes_out += n as u64;
            self.flushed += n as u64;
            self.out_bytes -= n;
            let mut n = n + self.head_off;
            self.head_off = 0;
            while let Some(front) = self.outq.front() {
                if n >= front.len() {
                    n -= front.len();
                    self.outq.pop_front();
                } else {
                    self.head_off = n;
                    break;
                }
            }
        }
        if self.outq.capacity() > 64 {
            self.outq.shrink_to(8);
        }
        Ok(true)
    }
}

impl ShardCtx {
    /// Queues `frame` on `conn` (whose state the caller has borrowed as `st`) and schedules
    /// a flush at the end of the current batch.
    pub fn deliver(&self, conn: &ConnRef, st: &mut ConnState, frame: Bytes) -> Queued {
        self.deliver_after(conn, st, frame, 0)
    }

    /// [`deliver`](Self::deliver), written only once commit ticket `after` has settled
    /// (0: no wait, only behind the backlog if there is one).
    pub fn deliver_after(&self, conn: &ConnRef, st: &mut ConnState, frame: Bytes, after: u64) -> Queued {
        let budget = self.cfg().limits.send_buffer_bytes;
        let q = st.enqueue_after(frame, after, budget, self.now());
        if q == Queued::Yes {
            crate::metrics::ShardStats::add(&self.stats.frames_out, 1);
            if after != 0 {
                self.pump_backlog(conn, st);
            }
        }
        self.mark_dirty(conn, st);
        q
    }

    /// Moves what may go from `conn`'s backlog to its queue; puts it on the waiting list when
    /// its front waits for a commit.
    pub fn pump_backlog(&self, conn: &ConnRef, st: &mut ConnState) {
        let budget = self.cfg().limits.send_buffer_bytes;
        let before = st.queued_bytes();
        let r = st.pump(self.settled.get(), &self.failed.borrow(), budget, self.now());
        if r == Pump::Gated && !st.waiting {
            st.waiting = true;
            self.waiting.borrow_mut().push(conn.clone());
        }
        if st.queued_bytes() != before {
            self.mark_dirty(conn, st);
        }
    }

    /// Queues `p` behind `conn`'s backlog and moves what may go.
    pub fn defer(&self, conn: &ConnRef, st: &mut ConnState, p: Pending) -> bool {
        if !st.defer(p) {
            return false;
        }
        self.pump_backlog(conn, st);
        true
    }

    /// Schedules `conn` for a flush at the end of the current batch.
    pub fn mark_dirty(&self, conn: &ConnRef, st: &mut ConnState) {
        if !st.dirty {
            st.dirty = true;
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    /// Writes every connection that got output during this batch: one `sendmsg` each.
    pub fn flush_dirty(&self) {
        let mut list = std::mem::take(&mut *self.dirty.borrow_mut());
        for conn in list.drain(..) {
            let mut st = conn.st.borrow_mut();
            st.dirty = false;
            if st.want_write || st.phase == Phase::Dead {
                continue;
            }
            let mut r = st.flush(conn.fd);
            // Refill from the backlog as the queue drains (replays are paced by the budget).
            while matches!(r, Ok(true)) && st.has_backlog() {
                let before = st.queued_bytes();
                self.pump_backlog(&conn, &mut st);
                if st.queued_bytes() == before {
                    break;
                }
                r = st.flush(conn.fd);
            }
            crate::metrics::ShardStats::add(&self.stats.bytes_out, std::mem::take(&mut st.flushed));
            match r {
                Ok(true) => {
                    if let Phase::FlushThenClose(deadline) = st.phase {
                        // SAFETY: shutdown(2) on the connection's own descriptor.
                        unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
                        st.phase = Phase::Draining(deadline);
                    }
                }
                Ok(false) => {
                    st.want_write = true;
                    conn.notify();
                }
                Err(_) => {
                    st.phase = Phase::Dead;
                    st.close_code.get_or_insert(1006);
                    conn.notify();
                }
            }
        }
        let mut d = self.dirty.borrow_mut();
        if d.is_empty() {
            *d = list;
        }
    }
}

/// Creates the connection on its home shard: 101, welcome, presence; early frames fed.
/// An upgrade that passed every check, ready to become a connection.
pub struct Accepted {
    pub peer: SocketAddr,
    pub slot: ConnSlot,
    pub who: Authenticated,
    /// The `101 Switching Protocols` response, sent first.
    pub response: Vec<u8>,
    /// Bytes the peer sent after its request head.
    pub leftover: Vec<u8>,
    pub tls: Option<Box<crate::tls::TlsIo>>,
}

pub fn register(shard: &Rc<ShardCtx>, stream: &TcpStream, accepted: Accepted) -> ConnRef {
    let Accepted { peer, slot, who, response, leftover, tls } = accepted;
    let now = shard.now();
    let cfg = shard.cfg().clone();
    let (user_name, ident, role) = match who {
        Authenticated::Agent { record, key, .. } => {
            let ident = Ident::Agent {
                agent_id: record.agent_id.as_str().into(),
                conn_id: crate::ids::conn_id().into(),
            };
            let role = RoleState::Agent { key, last_ctr: 0, expires: record.expires };
            (record.user.clone(), ident, role)
        }
        Authenticated::Client { claims, bound, resume } => {
            let ident = Ident::Client { session: crate::ids::session_id().into() };
            let role = RoleState::Client {
                bound: bound.map(Into::into),
                allow: claims.agents.map(|a| a.into_iter().map(Into::into).collect()),
                exp: claims.exp,
                warned: false,
                resume: resume.map(Box::new),
            };
            (claims.user, ident, role)
        }
        Authenticated::Echo => (crate::handshake::ECHO_USER.to_string(), Ident::Echo, RoleState::Echo),
    };
    let user = shard.user_entry(&user_name);
    let mut ws = Ws::new(cfg.server.ws_read_buffer_bytes, cfg.limits.max_frame_bytes);
    if !leftover.is_empty() {
        ws.feed(Bytes::from(leftover));
    }
    let st = ConnState {
        ws,
        outq: VecDeque::new(),
        out_bytes: 0,
        head_off: 0,
        dirty: false,
        want_write: false,
        phase: Phase::Open,
        close_code: None,
        last_rx: now,
        last_data: now,
        last_ping: now,
        role,
        frames_in: 0,
        frames_out: 0,
        bytes_in: 0,
        bytes_out: 0,
        flushed: 0,
        tls,
        backlog: VecDeque::new(),
        backlog_bytes: 0,
        waiting: false,
    };
    let conn = Rc::new(Conn {
        fd: stream.as_raw_fd(),
        key: Cell::new(usize::MAX),
        user,
        ident,
        peer,
        opened: now,
        opened_unix: crate::shard::local::unix_now(),
        st: RefCell::new(st),
        notified: Cell::new(false),
        waker: Cell::new(None),
        _slot: slot,
    });
    conn.key.set(shard.conns.borrow_mut().insert(conn.clone()));
    conn.user.borrow_mut().conns += 1;
    {
        let mut st = conn.st.borrow_mut();
        st.push_unbudgeted(Bytes::from(response));
        router::on_open(shard, &conn, &mut st);
        shard.mark_dirty(&conn, &mut st);
    }
    crate::metrics::conn_opened(conn.role_label());
    record_open(shard, &conn);
    match &conn.ident {
        Ident::Agent { agent_id, conn_id } => {
            tracing::info!(role = "agent", agent = %agent_id, conn = %conn_id, peer = %peer, "connection opened");
            shard.global.writer.send(crate::store::WriteOp::AgentConnected {
                agent_id: agent_id.to_string(),
                at: crate::shard::local::unix_now(),
            });
        }
        Ident::Client { session } => {
            tracing::info!(role = "client", session = %session, peer = %peer, "connection opened");
        }
        Ident::Echo => tracing::debug!(role = "echo", peer = %peer, "connection opened"),
    }
    conn
}

/// The connection's task: reads, waits for writability when output is blocked, and cleans
/// up when the connection is done.
pub async fn run(shard: Rc<ShardCtx>, stream: TcpStream, conn: ConnRef) {
    // Frames that arrived with the request head.
    if !conn.st.borrow().ws.input_drained() {
        process(&shard, &conn, None);
    }
    shard.flush_dirty();
    loop {
        let (dead, want_write) = {
            let st = conn.st.borrow();
            (st.phase == Phase::Dead, st.want_write)
        };
        if dead {
            break;
        }
        if want_write {
            monoio::select! {
                r = stream.readable(false) => on_readable(&shard, &conn, r.is_ok()),
                w = stream.writable(false) => {
                    let mut st = conn.st.borrow_mut();
                    st.want_write = false;
                    if w.is_err() {
                        st.phase = Phase::Dead;
                    } else {
                        shard.mark_dirty(&conn, &mut st);
                    }
                    drop(st);
                    shard.flush_dirty();
                }
                _ = conn.notified() => {}
            }
        } else {
            monoio::select! {
                r = stream.readable(false) => on_readable(&shard, &conn, r.is_ok()),
                _ = conn.notified() => {}
            }
        }
    }
    unregister(&shard, &conn);
    drop(stream);
}

/// Size of one `recv` into the shard's scratch buffer.
const RECV_CHUNK: usize = 64 * 1024;

fn on_readable(shard: &ShardCtx, conn: &ConnRef, ok: bool) {
    if !ok {
        let mut st = conn.st.borrow_mut();
        st.phase = Phase::Dead;
        st.close_code.get_or_insert(1006);
        return;
    }
    shard.refresh_now();
    loop {
        let chunk = {
            let mut scratch = shard.scratch.borrow_mut();
            if scratch.capacity() - scratch.len() < RECV_CHUNK / 4 {
                scratch.reserve(RECV_CHUNK);
            }
            match ws::recv(conn.fd, &mut scratch) {
                Ok(0) => None,
                Ok(n) => Some(scratch.split_to(n).freeze()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => None,
            }
        };
        let Some(chunk) = chunk else {
            let mut st = conn.st.borrow_mut();
            st.phase = Phase::Dead;
            st.close_code.get_or_insert(1006);
            break;
        };
        let full = chunk.len() >= RECV_CHUNK / 4;
        let chunk = match decrypt(shard, conn, chunk) {
            Some(plain) => plain,
            None => break,
        };
        process(shard, conn, Some(chunk));
        if !full {
            break;
        }
    }
    shard.flush_dirty();
}

/// For a TLS connection, the plaintext in `chunk` (None: the session failed, the connection
/// is dead); otherwise `chunk` itself.
fn decrypt(shard: &ShardCtx, conn: &ConnRef, chunk: Bytes) -> Option<Bytes> {
    let mut st = conn.st.borrow_mut();
    let Some(t) = st.tls.as_deref_mut() else { return Some(chunk) };
    let mut plain = shard.plain.borrow_mut();
    let ok = t.decrypt(&chunk, &mut plain).is_ok();
    let wants_write = t.wants_write();
    if !ok {
        let _ = t.write_to(conn.fd);
        st.phase = Phase::Dead;
        st.close_code.get_or_insert(1006);
        conn.notify();
        return None;
    }
    if wants_write {
        // Session tickets, key updates, alerts: sent by the next flush.
        shard.mark_dirty(conn, &mut st);
    }
    Some(plain.split().freeze())
}

/// Feeds `chunk` (if any) to the WebSocket and acts on every complete frame.
fn process(shard: &ShardCtx, conn: &ConnRef, chunk: Option<Bytes>) {
    let now = shard.now();
    let mut st = conn.st.borrow_mut();
    if matches!(st.phase, Phase::FlushThenClose(_) | Phase::Draining(_) | Phase::Dead) {
        // Our last words are queued; what the peer still sends is discarded.
        return;
    }
    let budget = shard.cfg().limits.send_buffer_bytes;
    if let Some(chunk) = chunk {
        st.bytes_in += chunk.len() as u64;
        crate::metrics::ShardStats::add(&shard.stats.bytes_in, chunk.len() as u64);
        st.ws.feed(chunk);
    }
    loop {
        match st.ws.next_event() {
            Event::NeedMore => break,
            Event::Text(text) => {
                crate::metrics::ShardStats::add(&shard.stats.frames_in, 1);
                st.last_rx = now;
                st.last_data = now;
                st.frames_in += 1;
                if st.phase == Phase::Open {
                    router::on_text(shard, conn, &mut st, text.as_bytes(), now);
                }
            }
            Event::Control => {
                crate::metrics::ShardStats::add(&shard.stats.frames_in, 1);
                st.last_rx = now;
                // A pong goes out in order with what we send after it (RFC 6455 §5.5.2, and
                // Autobahn 5.6/5.19/5.20: ping between fragments, pong before the echo).
                st.pump_control(budget, now);
            }
            Event::Binary(payload) => {
                st.last_rx = now;
                st.last_data = now;
                st.frames_in += 1;
                if matches!(conn.ident, Ident::Echo) {
                    shard.deliver(conn, &mut st, crate::protocol::frames::data_frame(true, &payload));
                } else {
                    st.close(1003, "binary frames are not accepted", now);
                }
            }
            Event::PeerClose(code) => {
                st.close_code.get_or_insert(code.unwrap_or(1005));
                if st.phase == Phase::Open {
                    st.phase = Phase::FlushThenClose(now + CLOSE_DEADLINE);
                }
            }
            Event::Closed => {
                st.phase = Phase::FlushThenClose(st.close_deadline(now));
                break;
            }
            Event::Fatal(code) => {
                let reason = match code {
                    1009 => "frame too big",
                    1007 => "invalid UTF-8",
                    1002 => "protocol error",
                    _ => "internal error",
                };
                st.close(code, reason, now);
                st.phase = Phase::FlushThenClose(st.close_deadline(now));
                break;
            }
        }
    }
    st.pump_control(budget, now);
    shard.mark_dirty(conn, &mut st);
}

/// The connection's record (spec: who connected, from where, when): its id, user, role,
/// agent (the bound one for a client) and remote address.
fn record_open(shard: &ShardCtx, conn: &Conn) {
    use crate::store::{ConnectionRecord, Role, WriteOp};
    let (id, role, agent) = match &conn.ident {
        Ident::Agent { agent_id, conn_id } => (conn_id.to_string(), Role::Agent, Some(agent_id.to_string())),
        Ident::Client { session } => {
            let bound = match &conn.st.borrow().role {
                RoleState::Client { bound, .. } => bound.as_deref().map(str::to_string),
                _ => None,
            };
            (session.to_string(), Role::Client, bound)
        }
        Ident::Echo => return,
    };
    let user = conn.user.borrow().user.to_string();
    let rec = ConnectionRecord::new(id, user, role, agent, conn.peer, conn.opened_unix);
    // A full writer queue drops the record; the writer counts it
    // (switchboard_store_ops_dropped_total).
    shard.global.writer.send(WriteOp::ConnectionOpened(Box::new(rec)));
}

fn record_close(shard: &ShardCtx, conn: &Conn, st: &ConnState, code: u16) {
    let id = match &conn.ident {
        Ident::Agent { conn_id, .. } => conn_id.to_string(),
        Ident::Client { session } => session.to_string(),
        Ident::Echo => return,
    };
    let now = crate::shard::local::unix_now();
    let last_seen = now.saturating_sub(shard.now().saturating_duration_since(st.last_rx).as_secs());
    let op = crate::store::WriteOp::ConnectionClosed {
        conn_id: id,
        opened: conn.opened_unix,
        last_seen,
        closed: now,
        frames_in: st.frames_in,
        frames_out: st.frames_out,
        bytes_in: st.bytes_in,
        bytes_out: st.bytes_out,
        close_code: Some(code),
    };
    shard.global.writer.send(op);
}

/// Removes the connection from its shard and user; tells the others.
fn unregister(shard: &ShardCtx, conn: &ConnRef) {
    shard.conns.borrow_mut().try_remove(conn.key.get());
    router::on_close(shard, conn);
    let st = conn.st.borrow();
    let code = st.close_code.unwrap_or(1006);
    crate::metrics::conn_closed(conn.role_label(), code);
    record_close(shard, conn, &st, code);
    match &conn.ident {
        Ident::Agent { agent_id, conn_id } => {
            tracing::info!(role = "agent", agent = %agent_id, conn = %conn_id, code, frames_in = st.frames_in, frames_out = st.frames_out, "connection closed");
            shard.global.writer.send(crate::store::WriteOp::AgentDisconnected {
                agent_id: agent_id.to_string(),
                at: crate::shard::local::unix_now(),
            });
        }
        Ident::Client { session } => {
            tracing::info!(role = "client", session = %session, code, frames_in = st.frames_in, frames_out = st.frames_out, "connection closed");
        }
        Ident::Echo => tracing::debug!(role = "echo", code, "connection closed"),
    }
    drop(st);
    shard.flush_dirty();
}

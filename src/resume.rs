//! Offline delivery and resume (spec §8, docs/protocol.md §10): client streams with `seq` and
//! `epoch` and their history, closed sessions that stay resumable, and agent mailboxes.
//!
//! Everything here belongs to the user's home shard (`Rc`, no locks) and is written behind to
//! LMDB through the store writer, each op with a commit ticket of this shard.
//!
//! Must stay true:
//! - **No seq is ever reused within an epoch, across crashes.** A stream whose LMDB meta says
//!   *clean* has every `seq` up to its `last_seq` committed and has delivered nothing beyond
//!   it. Before a stream frame goes to any session (live or replayed), the stream holds a
//!   *lease*: its meta is committed *dirty* (or the epoch is new and not in LMDB at all). A
//!   dirty stream gets a new epoch at the next load. The lease is given back (meta marked clean
//!   through the last `seq`) when no connected session can reach the stream any more.
//! - Frames that wait for a commit (the lease, a `queued:true` ack, a mailbox message) wait in
//!   the recipient connection's backlog, in order with everything sent after them.
//! - A mailbox message is delivered to its agent only once committed, so an agent never sees a
//!   `seq` that a crash could give to another message.
//! - A replay is complete or not sent at all (`recovered:false`).
//! - Everything is per user: streams, history, closed sessions and mailboxes are only ever
//!   looked up in the authenticated user's own state.

use crate::connection::{ConnRef, ConnState, Ident, OnFail, Pending, RoleState};
use crate::router::UserState;
use crate::shard::local::{unix_now, ShardCtx};
use crate::store::{SessionClosed, StoredSession, StreamKey, StreamMark, WriteOp};
use bytes::Bytes;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

/// One message of a stream's history.
pub struct Entry {
    pub seq: u64,
    /// Unix seconds when it was sent.
    pub at: u64,
    /// The session it was addressed to; `None` for a broadcast.
    pub to: Option<Rc<str>>,
    /// The frame as sent (shared with every recipient and with the writer).
    pub frame: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// LMDB says clean: nothing beyond the committed `last_seq` has been delivered.
    Clean,
    /// The dirty mark is on its way (this ticket).
    Arming(u64),
    /// Committed dirty, or an epoch LMDB has never seen: frames may go out at once.
    Held,
}

/// The messages of one agent to its user's sessions.
pub struct Stream {
    pub key: Arc<StreamKey>,
    pub epoch: Arc<str>,
    pub next_seq: u64,
    pub entries: VecDeque<Entry>,
    /// Bytes of frames in `entries`.
    pub bytes: usize,
    pub lease: Lease,
    /// LMDB holds no entry below this seq (trims are sent in steps of [`TRIM_STEP`]).
    db_first: u64,
}

/// History records are deleted from LMDB in steps of this many (one range delete instead of
/// one delete per message); a load trims the few extra.
const TRIM_STEP: u64 = 32;

impl Stream {
    fn new(user: &str, agent: &str) -> Stream {
        Stream {
            key: Arc::new(StreamKey { user: user.into(), agent: agent.into() }),
            epoch: crate::ids::epoch_id().into(),
            next_seq: 1,
            entries: VecDeque::new(),
            bytes: 0,
            // A new epoch is in no one's hands yet: no lease needed.
            lease: Lease::Held,
            db_first: 1,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Forgets the history and starts a new epoch (history lost).
    fn rotate(&mut self, shard: &ShardCtx, reason: &'static str) {
        shard.stats.history_entries.set(shard.stats.history_entries.get() - self.entries.len() as i64);
        shard.stats.history_bytes.set(shard.stats.history_bytes.get() - self.bytes as i64);
        self.entries.clear();
        self.bytes = 0;
        self.epoch = crate::ids::epoch_id().into();
        self.next_seq = 1;
        self.lease = Lease::Held;
        self.db_first = 1;
        crate::metrics::stream_rotated(reason);
    }

    /// Drops entries from the front while over the bounds or older than the TTL; returns the
    /// first seq kept (or the next seq when none is).
    fn trim(&mut self, shard: &ShardCtx, max_messages: usize, max_bytes: usize, oldest: u64) -> u64 {
        let mut n = 0u64;
        while let Some(front) = self.entries.front() {
            if self.entries.len() > max_messages || self.bytes > max_bytes || front.at < oldest {
                self.bytes -= front.frame.len();
                shard.stats.history_bytes.set(shard.stats.history_bytes.get() - front.frame.len() as i64);
                self.entries.pop_front();
                n += 1;
            } else {
                break;
            }
        }
        if n > 0 {
            shard.stats.history_entries.set(shard.stats.history_entries.get() - n as i64);
            crate::metrics::ShardStats::add(&shard.stats.history_trimmed, n);
        }
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The frames after `since` that a session sees (broadcasts, and those addressed to
    /// `to`), or `None` when some of them are no longer kept.
    fn after(&self, since: u64, to: Option<&str>, only_addressed: bool) -> Option<Vec<Bytes>> {
        if since > self.last_seq() {
            return None;
        }
        if since == self.last_seq() {
            return Some(Vec::new());
        }
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        if first > since + 1 {
            return None;
        }
        let start = (since + 1 - first) as usize;
        Some(
            self.entries
                .range(start..)
                .filter(|e| match (&e.to, to) {
                    (None, _) => !only_addressed,
                    (Some(t), Some(r)) => **t == *r,
                    (Some(_), None) => false,
                })
                .map(|e| e.frame.clone())
                .collect(),
        )
    }
}

/// Most closed sessions one user keeps resumable (the oldest are forgotten first).
pub const MAX_CLOSED_PER_USER: usize = 1024;

/// A closed session that can still be resumed (for `history.ttl_secs`).
pub struct ClosedSession {
    pub closed_at: u64,
    pub bound: Option<Rc<str>>,
    pub allow: Option<Box<[Box<str>]>>,
    /// Each reachable stream's epoch and last seq when the session closed.
    pub marks: Vec<(Rc<str>, Arc<str>, u64)>,
}

impl ClosedSession {
    fn can_reach(&self, agent: &str) -> bool {
        self.bound.as_deref().is_none_or(|b| b == agent)
            && self.allow.as_deref().is_none_or(|a| a.iter().any(|x| &**x == agent))
    }
}

/// One queued client message for an agent.
pub struct Mail {
    pub seq: u64,
    pub at: u64,
    /// The commit ticket of its `MailboxPut` (0: loaded from the store).
    pub ticket: u64,
    pub frame: Bytes,
    /// Already handed to a connection of the agent once (a later delivery is a redelivery).
    pub delivered: bool,
}

/// An agent's queued messages (spec §8).
pub struct Mailbox {
    pub key: Arc<StreamKey>,
    pub last_seq: u64,
    pub acked: u64,
    pub entries: VecDeque<Mail>,
    pub bytes: usize,
}

impl Mailbox {
    fn new(user: &str, agent: &str) -> Mailbox {
        Mailbox {
            key: Arc::new(StreamKey { user: user.into(), agent: agent.into() }),
            last_seq: 0,
            acked: 0,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }
}

/// Durable state a user keeps on its home shard.
#[derive(Default)]
pub struct Durable {
    pub streams: std::collections::HashMap<Rc<str>, Stream>,
    pub closed: std::collections::HashMap<Rc<str>, ClosedSession>,
    /// Sessions taken over by a resume: old id → new id.
    pub aliases: std::collections::HashMap<Rc<str>, Rc<str>>,
    pub mailboxes: std::collections::HashMap<Rc<str>, Mailbox>,
    /// The last commit ticket of an op for this user: the state may only be dropped from
    /// memory once it has settled (so a reload from LMDB sees all of it).
    pub last_ticket: u64,
}

impl Durable {
    /// Nothing here needs to stay in memory (streams without history reload from LMDB).
    pub fn is_idle(&self, settled: u64) -> bool {
        self.closed.is_empty()
            && self.mailboxes.values().all(|m| m.entries.is_empty())
            && self.streams.values().all(|s| s.entries.is_empty() && s.lease == Lease::Clean)
            && self.last_ticket <= settled
    }
}

fn history_on(shard: &ShardCtx) -> bool {
    shard.cfg().history.max_messages > 0
}

/// Sends `op` to the writer with this shard's next ticket; `None` when the writer refused it.
fn send(shard: &ShardCtx, d: &mut Durable, op: WriteOp) -> Option<u64> {
    let t = shard.send_durable(op)?;
    d.last_ticket = t;
    Some(t)
}

/// Loads the user's durable state from LMDB (on the user's first connection to this shard).
pub fn load(shard: &ShardCtx, user: &str) -> Durable {
    let mut d = Durable::default();
    let stored = match shard.global.store.load_user(user) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "store: loading history and mailboxes failed; starting empty");
            return d;
        }
    };
    let now = unix_now();
    let (h, m) = {
        let cfg = shard.cfg();
        (cfg.history.clone(), cfg.mailbox.clone())
    };
    let oldest = now.saturating_sub(h.ttl_secs);
    for s in stored.streams {
        let agent: Rc<str> = s.agent.as_str().into();
        let mut st = Stream::new(user, &s.agent);
        // (A seq near 2^64 can only come from a damaged record: start over rather than wrap.)
        if !s.clean || h.max_messages == 0 || !crate::ids::is_valid_id(&s.epoch) || s.last_seq >= 1 << 62 {
            // The daemon stopped while sessions were receiving this stream (or history is
            // off): messages may have gone out that LMDB never saw. New epoch.
            if s.clean || !s.entries.is_empty() || s.last_seq > 0 {
                crate::metrics::stream_rotated(if s.clean { "config" } else { "crash" });
            }
            d.streams.insert(agent, st);
            continue;
        }
        st.epoch = s.epoch.as_str().into();
        st.next_seq = s.last_seq + 1;
        st.lease = Lease::Clean;
        st.db_first = s.entries.first().map_or(st.next_seq, |e| e.seq);
        // Keep the young, contiguous run that ends at last_seq; anything before a gap counts
        // as trimmed.
        let mut kept: Vec<Entry> = Vec::new();
        let mut expect = s.last_seq;
        for e in s.entries.into_iter().rev() {
            if e.seq != expect || e.at < oldest || expect == 0 {
                break;
            }
            kept.push(Entry { seq: e.seq, at: e.at, to: e.to.map(|t| t.as_str().into()), frame: e.frame });
            expect -= 1;
        }
        for e in kept.into_iter().rev() {
            st.bytes += e.frame.len();
            st.entries.push_back(e);
        }
        shard.stats.history_entries.set(shard.stats.history_entries.get() + st.entries.len() as i64);
        shard.stats.history_bytes.set(shard.stats.history_bytes.get() + st.bytes as i64);
        // Bounds may have been lowered since they were written.
        st.trim(shard, h.max_messages, h.max_bytes, oldest);
        d.streams.insert(agent, st);
    }
    for c in stored.closed {
        if c.closed_at < oldest || !crate::ids::is_valid_id(&c.session) {
            continue;
        }
        let marks =
            c.marks.iter().map(|mk| (mk.agent.as_str().into(), mk.epoch.as_str().into(), mk.seq)).collect();
        d.closed.insert(
            c.session.as_str().into(),
            ClosedSession {
                closed_at: c.closed_at,
                bound: c.bound.as_deref().map(Into::into),
                allow: c.allow.map(|a| a.into_iter().map(Into::into).collect()),
                marks,
            },
        );
    }
    if m.max_messages > 0 {
        let oldest_mail = now.saturating_sub(m.ttl_secs);
        for s in stored.mailboxes {
            if s.last_seq >= 1 << 62 {
                tracing::warn!("store: skipping a mailbox with an impossible seq");
                continue;
            }
            let mut mb = Mailbox::new(user, &s.agent);
            mb.last_seq = s.last_seq;
            mb.acked = s.acked;
            for e in s.entries {
                if e.seq <= mb.acked || e.at < oldest_mail {
                    continue;
                }
                mb.bytes += e.frame.len();
                mb.entries.push_back(Mail {
                    seq: e.seq,
                    at: e.at,
                    ticket: 0,
                    frame: e.frame,
                    delivered: false,
                });
            }
            shard.stats.mailbox_entries.set(shard.stats.mailbox_entries.get() + mb.entries.len() as i64);
            shard.stats.mailbox_bytes.set(shard.stats.mailbox_bytes.get() + mb.bytes as i64);
            d.mailboxes.insert(s.agent.as_str().into(), mb);
        }
    }
    shard.stats.streams.set(shard.stats.streams.get() + d.streams.len() as i64);
    d
}

fn stream_entry<'a>(shard: &ShardCtx, d: &'a mut Durable, user: &str, agent: &Rc<str>) -> &'a mut Stream {
    d.streams.entry(agent.clone()).or_insert_with(|| {
        shard.stats.streams.set(shard.stats.streams.get() + 1);
        Stream::new(user, agent)
    })
}

/// Whether delivering a frame of `agent`'s stream now would first need its lease (the
/// stream exists and does not hold it; a new stream's epoch needs none).
pub fn lease_needed(user: &UserState, agent: &str) -> bool {
    user.durable.streams.get(agent).is_some_and(|s| s.lease != Lease::Held)
}

/// Makes sure `stream` may deliver now; `Some(ticket)` when its frames must wait for that
/// commit first. When the store cannot take the lease, the stream starts a new epoch (which
/// needs none).
fn lease(shard: &ShardCtx, d: &mut Durable, agent: &str) -> Option<u64> {
    if !history_on(shard) {
        return None;
    }
    let stream = d.streams.get_mut(agent)?;
    match stream.lease {
        Lease::Held => None,
        Lease::Arming(t) if t <= shard.settled.get() && !shard.failed.borrow().contains(&t) => {
            stream.lease = Lease::Held;
            None
        }
        Lease::Arming(t) if t > shard.settled.get() => Some(t),
        Lease::Arming(_) | Lease::Clean => {
            let op = WriteOp::StreamMark {
                key: stream.key.clone(),
                epoch: stream.epoch.clone(),
                clean: false,
                through: stream.last_seq(),
            };
            match send(shard, d, op) {
                Some(t) => {
                    d.streams.get_mut(agent).expect("present").lease = Lease::Arming(t);
                    Some(t)
                }
                None => {
                    d.streams.get_mut(agent).expect("present").rotate(shard, "store");
                    None
                }
            }
        }
    }
}

/// Gives the lease back when no connected session can reach the stream any more.
fn release(shard: &ShardCtx, d: &mut Durable, agent: &str) {
    if !history_on(shard) {
        return;
    }
    let Some(stream) = d.streams.get_mut(agent) else { return };
    if stream.lease == Lease::Clean {
        return;
    }
    let op = WriteOp::StreamMark {
        key: stream.key.clone(),
        epoch: stream.epoch.clone(),
        clean: true,
        through: stream.last_seq(),
    };
    if send(shard, d, op).is_some() {
        d.streams.get_mut(agent).expect("present").lease = Lease::Clean;
    }
}

/// Where an agent's `send` goes.
pub enum Target {
    /// A connected session.
    Live(ConnRef),
    /// A closed, resumable session: kept in the stream, acked `queued:true` after commit.
    Queued(Rc<str>),
    /// Every connected session that can reach the agent.
    Broadcast,
}

/// Finds where an agent's `send` addressed to `to` goes: `Err(code)` is `not_allowed` or
/// `offline` (spec §5).
pub fn target(shard: &ShardCtx, user: &UserState, agent: &str, to: &str) -> Result<Target, &'static str> {
    let to = user.durable.aliases.get(to).map_or(to, |n| &**n);
    if let Some(t) = user.sessions.get(to) {
        return if t.st.borrow().role.can_reach(agent) {
            Ok(Target::Live(t.clone()))
        } else {
            Err("not_allowed")
        };
    }
    let ttl = shard.cfg().history.ttl_secs;
    match user.durable.closed.get_key_value(to) {
        Some((id, c)) if history_on(shard) && shard.unix().saturating_sub(c.closed_at) < ttl => {
            if c.can_reach(agent) {
                Ok(Target::Queued(id.clone()))
            } else {
                Err("not_allowed")
            }
        }
        _ => Err("offline"),
    }
}

/// Gives an agent's message its place in the stream: a `seq`, the frame, a history entry
/// written behind to LMDB. `live`: it is about to be delivered to a session, so the stream
/// must hold its lease first. Returns the frame, the ticket of its history record (0 when
/// none was written) and the lease ticket live frames must wait for.
pub fn stamp(
    shard: &ShardCtx,
    user: &mut UserState,
    agent: &Rc<str>,
    to: Option<&Rc<str>>,
    data: &[u8],
    live: bool,
) -> (Bytes, u64, Option<u64>) {
    let UserState { user: name, durable: d, .. } = user;
    stream_entry(shard, d, name, agent);
    let gate = if live { lease(shard, d, agent) } else { None };
    let stream = d.streams.get_mut(&**agent).expect("created above");
    let seq = stream.next_seq;
    stream.next_seq += 1;
    let frame = crate::protocol::frames::stream_message(agent, seq, &stream.epoch, data);
    let (max_messages, max_bytes, ttl) = {
        let h = &shard.cfg().history;
        (h.max_messages, h.max_bytes, h.ttl_secs)
    };
    if max_messages == 0 {
        return (frame, 0, gate);
    }
    let at = shard.unix();
    stream.entries.push_back(Entry { seq, at, to: to.cloned(), frame: frame.clone() });
    stream.bytes += frame.len();
    shard.stats.history_entries.set(shard.stats.history_entries.get() + 1);
    shard.stats.history_bytes.set(shard.stats.history_bytes.get() + frame.len() as i64);
    let first = stream.trim(shard, max_messages, max_bytes, at.saturating_sub(ttl));
    let trim_below = if first >= stream.db_first + TRIM_STEP {
        stream.db_first = first;
        first
    } else {
        0
    };
    let op = WriteOp::HistoryAppend {
        key: stream.key.clone(),
        epoch: stream.epoch.clone(),
        seq,
        at,
        to: to.map(|s| Arc::from(&**s)),
        frame: frame.clone(),
        trim_below,
    };
    let ticket = send(shard, d, op).unwrap_or(0);
    (frame, ticket, gate)
}

/// The welcome is out: replay what a resuming client asked for (docs/protocol.md §10.2).
pub fn on_client_open(
    shard: &ShardCtx,
    conn: &ConnRef,
    st: &mut ConnState,
    user: &mut UserState,
    session: &Rc<str>,
) {
    let RoleState::Client { resume, bound, .. } = &mut st.role else { return };
    let Some(req) = resume.take() else { return };
    let bound = bound.clone();
    let now = unix_now();
    let ttl = shard.cfg().history.ttl_secs;
    let UserState { user: name, durable: d, sessions, .. } = user;
    // Take over the old session: it is no longer resumable, and sends to it reach this one.
    let old: Option<(Rc<str>, Option<ClosedSession>)> = req.old_session.as_deref().map(|r| {
        let r: Rc<str> = r.into();
        if let Some(prev) = sessions.get(&r).filter(|c| !Rc::ptr_eq(c, conn)) {
            // Still open here — typically a phone whose connection died without a close,
            // not yet noticed by the heartbeat. Its client is back on this connection: the
            // old one is closed (4009) and its sends come here. What it had received is
            // unknown, so only a `since` can recover it.
            let mut pst = prev.st.borrow_mut();
            pst.close(4009, "resumed by a newer connection", shard.now());
            shard.mark_dirty(prev, &mut pst);
            d.aliases.insert(r.clone(), session.clone());
            return (r, None);
        }
        let c = d.closed.remove(&r).filter(|c| now.saturating_sub(c.closed_at) < ttl);
        if c.is_some() {
            send(shard, d, WriteOp::SessionForget { user: (**name).into(), session: (*r).into() });
            d.aliases.insert(r.clone(), session.clone());
        }
        (r, c)
    });
    let mut plan: Vec<(Rc<str>, Option<Vec<Bytes>>)> = Vec::new();
    match (&req.since, &bound) {
        (Some((since, epoch)), Some(agent)) => {
            let frames = d.streams.get(&**agent).and_then(|s| {
                if *s.epoch != **epoch {
                    return None;
                }
                s.after(*since, old.as_ref().map(|(r, _)| &**r), false)
            });
            plan.push((agent.clone(), frames));
        }
        _ => {
            let Some((r, closed)) = &old else { return };
            let agents: Vec<Rc<str>> = match &bound {
                Some(a) => vec![a.clone()],
                None => d.streams.keys().filter(|a| st.role.can_reach(a)).cloned().collect(),
            };
            for agent in agents {
                let frames = closed.as_ref().and_then(|c| {
                    let Some(s) = d.streams.get(&*agent) else { return Some(Vec::new()) };
                    let since = match c.marks.iter().find(|(a, _, _)| *a == agent) {
                        Some((_, e, seq)) if *e == s.epoch => *seq,
                        Some(_) => return None,
                        None => 0,
                    };
                    s.after(since, Some(r), true)
                });
                plan.push((agent, frames));
            }
        }
    }
    for (agent, frames) in plan {
        let mut recovered = frames.is_some();
        let mut gate = None;
        if let Some(frames) = &frames {
            if !frames.is_empty() {
                let epoch = d.streams.get(&*agent).map(|s| s.epoch.clone());
                gate = lease(shard, d, &agent);
                if d.streams.get(&*agent).map(|s| s.epoch.clone()) != epoch {
                    // The lease could not be stored and the stream started over.
                    recovered = false;
                }
            }
        }
        let after = gate.unwrap_or(0);
        if recovered {
            let frames = frames.unwrap_or_default();
            crate::metrics::ShardStats::add(&shard.stats.replayed, frames.len() as u64);
            for frame in frames {
                st.defer(Pending { after, frame, on_fail: OnFail::Close, budgeted: false });
            }
            crate::metrics::ShardStats::add(&shard.stats.resumed_ok, 1);
        } else {
            crate::metrics::ShardStats::add(&shard.stats.resumed_lost, 1);
        }
        let frame = crate::protocol::frames::resumed(&agent, recovered);
        st.defer(Pending { after, frame, on_fail: OnFail::Close, budgeted: false });
    }
    shard.pump_backlog(conn, st);
}

/// A client session closed: it stays resumable for `history.ttl_secs`, and streams no
/// connected session can reach give their lease back.
pub fn on_client_close(shard: &ShardCtx, user: &mut UserState, session: &Rc<str>, role: &RoleState) {
    let RoleState::Client { bound, allow, .. } = role else { return };
    let UserState { user: name, sessions, durable: d, .. } = user;
    let reachable: Vec<Rc<str>> = d.streams.keys().filter(|a| role.can_reach(a)).cloned().collect();
    for agent in &reachable {
        // A session whose state is busy elsewhere is counted as reaching: keeping a lease is
        // always safe, giving it back early is not.
        let still = sessions.values().any(|s| s.st.try_borrow().map_or(true, |st| st.role.can_reach(agent)));
        if !still {
            release(shard, d, agent);
        }
    }
    if !history_on(shard) {
        return;
    }
    let marks: Vec<(Rc<str>, Arc<str>, u64)> = reachable
        .iter()
        .filter_map(|a| d.streams.get(a).map(|s| (a.clone(), s.epoch.clone(), s.last_seq())))
        .collect();
    let closed_at = unix_now();
    let stored = StoredSession {
        session: session.to_string(),
        closed_at,
        bound: bound.as_deref().map(str::to_string),
        allow: allow.as_deref().map(|a| a.iter().map(|x| x.to_string()).collect()),
        marks: marks
            .iter()
            .map(|(a, e, s)| StreamMark { agent: a.to_string(), epoch: e.to_string(), seq: *s })
            .collect(),
    };
    send(
        shard,
        d,
        WriteOp::SessionClosed(Box::new(SessionClosed { user: (**name).into(), session: stored })),
    );
    if d.closed.len() >= MAX_CLOSED_PER_USER {
        // A client that reconnects in a tight loop must not grow this without bound: the
        // oldest resumable session goes first.
        if let Some(oldest) = d.closed.iter().min_by_key(|(_, c)| c.closed_at).map(|(k, _)| k.clone()) {
            d.closed.remove(&oldest);
            send(shard, d, WriteOp::SessionForget { user: (**name).into(), session: (*oldest).into() });
        }
    }
    d.closed.insert(
        session.clone(),
        ClosedSession { closed_at, bound: bound.clone(), allow: allow.clone(), marks },
    );
}

/// What became of a client's `send` to an agent that is offline or has unconfirmed mail.
pub enum Queue {
    /// Stored (once this ticket commits) with this `seq`.
    Queued {
        ticket: u64,
    },
    Full,
    /// The store did not take it.
    Unavailable,
}

/// Whether `agent` has queued messages not yet confirmed (new ones must queue behind them).
pub fn has_unconfirmed(user: &UserState, agent: &str) -> bool {
    user.durable.mailboxes.get(agent).is_some_and(|m| !m.entries.is_empty())
}

pub fn mailbox_on(shard: &ShardCtx) -> bool {
    shard.cfg().mailbox.max_messages > 0
}

/// Queues a client message for `agent`; when the agent is connected (`online`), it gets the
/// message behind the commit.
pub fn enqueue_mail(
    shard: &ShardCtx,
    user: &mut UserState,
    agent: &Rc<str>,
    from_session: &str,
    data: &[u8],
    online: Option<&ConnRef>,
) -> Queue {
    let (max_messages, max_bytes, ttl) = {
        let m = &shard.cfg().mailbox;
        (m.max_messages, m.max_bytes, m.ttl_secs)
    };
    let now = shard.unix();
    let UserState { user: name, durable: d, .. } = user;
    let mb = d.mailboxes.entry(agent.clone()).or_insert_with(|| Mailbox::new(name, agent));
    expire_mail(shard, mb, now.saturating_sub(ttl));
    let frame = crate::protocol::frames::mailbox_message(from_session, mb.last_seq + 1, data);
    if mb.entries.len() >= max_messages || mb.bytes + frame.len() > max_bytes {
        crate::metrics::dropped("mailbox_full");
        return Queue::Full;
    }
    let seq = mb.last_seq + 1;
    let op = WriteOp::MailboxPut {
        key: mb.key.clone(),
        seq,
        at: now,
        from: from_session.into(),
        frame: frame.clone(),
    };
    let Some(ticket) = shard.send_durable(op) else { return Queue::Unavailable };
    d.last_ticket = ticket;
    let mb = d.mailboxes.get_mut(&**agent).expect("created above");
    mb.last_seq = seq;
    mb.bytes += frame.len();
    mb.entries.push_back(Mail { seq, at: now, ticket, frame: frame.clone(), delivered: online.is_some() });
    shard.stats.mailbox_entries.set(shard.stats.mailbox_entries.get() + 1);
    shard.stats.mailbox_bytes.set(shard.stats.mailbox_bytes.get() + frame.len() as i64);
    crate::metrics::ShardStats::add(&shard.stats.mail_queued, 1);
    if let Some(a) = online {
        let mut ast = a.st.borrow_mut();
        shard.defer(a, &mut ast, Pending { after: ticket, frame, on_fail: OnFail::Skip, budgeted: false });
        crate::metrics::ShardStats::add(&shard.stats.mail_delivered, 1);
    }
    Queue::Queued { ticket }
}

fn expire_mail(shard: &ShardCtx, mb: &mut Mailbox, oldest: u64) {
    let mut n = 0;
    while mb.entries.front().is_some_and(|e| e.at < oldest) {
        let e = mb.entries.pop_front().expect("front checked");
        mb.bytes -= e.frame.len();
        shard.stats.mailbox_bytes.set(shard.stats.mailbox_bytes.get() - e.frame.len() as i64);
        n += 1;
    }
    if n > 0 {
        shard.stats.mailbox_entries.set(shard.stats.mailbox_entries.get() - n);
        crate::metrics::ShardStats::add(&shard.stats.mail_expired, n as u64);
    }
}

/// The agent's welcome is out: its unconfirmed mail follows, in order.
pub fn on_agent_open(
    shard: &ShardCtx,
    conn: &ConnRef,
    st: &mut ConnState,
    user: &mut UserState,
    agent: &str,
) {
    let ttl = shard.cfg().mailbox.ttl_secs;
    let Some(mb) = user.durable.mailboxes.get_mut(agent) else { return };
    expire_mail(shard, mb, unix_now().saturating_sub(ttl));
    for e in mb.entries.iter_mut() {
        let counter = if e.delivered { &shard.stats.mail_redelivered } else { &shard.stats.mail_delivered };
        crate::metrics::ShardStats::add(counter, 1);
        e.delivered = true;
        st.defer(Pending { after: e.ticket, frame: e.frame.clone(), on_fail: OnFail::Skip, budgeted: false });
    }
    shard.pump_backlog(conn, st);
}

/// `{"type":"ack","seq":n}` from an agent: everything up to `n` is confirmed.
pub fn on_agent_ack(shard: &ShardCtx, user: &mut UserState, agent: &str, n: u64) {
    let UserState { durable: d, .. } = user;
    let Some(mb) = d.mailboxes.get_mut(agent) else { return };
    let n = n.min(mb.last_seq);
    if n <= mb.acked {
        return;
    }
    let mut dropped = 0;
    while mb.entries.front().is_some_and(|e| e.seq <= n) {
        let e = mb.entries.pop_front().expect("front checked");
        mb.bytes -= e.frame.len();
        shard.stats.mailbox_bytes.set(shard.stats.mailbox_bytes.get() - e.frame.len() as i64);
        dropped += 1;
    }
    shard.stats.mailbox_entries.set(shard.stats.mailbox_entries.get() - dropped);
    mb.acked = n;
    let op = WriteOp::MailboxDrop { key: mb.key.clone(), through: n };
    send(shard, d, op);
}

/// Commits failed (rare: an LMDB error): mail that was never stored is forgotten (its
/// senders got an error, its agent never sees it), and leases that were never stored are
/// taken again before the next delivery.
pub fn on_failed(shard: &ShardCtx, user: &mut UserState, failed: &std::collections::HashSet<u64>) {
    for mb in user.durable.mailboxes.values_mut() {
        let before = mb.entries.len();
        mb.entries.retain(|e| !failed.contains(&e.ticket));
        let gone = (before - mb.entries.len()) as i64;
        if gone > 0 {
            mb.bytes = mb.entries.iter().map(|e| e.frame.len()).sum();
            shard.stats.mailbox_entries.set(shard.stats.mailbox_entries.get() - gone);
        }
    }
    for s in user.durable.streams.values_mut() {
        if let Lease::Arming(t) = s.lease {
            if failed.contains(&t) {
                s.lease = Lease::Clean;
            }
        }
    }
}

/// Once a second for every user of the shard: expire history, closed sessions and mail.
pub fn sweep(shard: &ShardCtx, user: &mut UserState, now: u64) {
    let (h_ttl, h_max, h_bytes, m_ttl) = {
        let c = shard.cfg();
        (c.history.ttl_secs, c.history.max_messages, c.history.max_bytes, c.mailbox.ttl_secs)
    };
    // Streams no connected session can reach give their lease back (a stream created while
    // its sessions were away, a session whose allowlist shrank).
    let held: Vec<Rc<str>> = user
        .durable
        .streams
        .iter()
        .filter(|(_, s)| s.lease != Lease::Clean)
        .map(|(a, _)| a.clone())
        .collect();
    for agent in held {
        let reached =
            user.sessions.values().any(|s| s.st.try_borrow().map_or(true, |st| st.role.can_reach(&agent)));
        if !reached {
            release(shard, &mut user.durable, &agent);
        }
    }
    let d = &mut user.durable;
    let oldest = now.saturating_sub(h_ttl);
    for s in d.streams.values_mut() {
        let first_before = s.entries.front().map(|e| e.seq);
        let first = s.trim(shard, h_max, h_bytes, oldest);
        if first_before.is_some_and(|f| f < first) && h_max > 0 {
            // The writer's retention deletes by age as well; this keeps LMDB in step sooner.
            s.db_first = first;
            let op = WriteOp::HistoryTrim { key: s.key.clone(), epoch: s.epoch.clone(), below: first };
            if let Some(t) = shard.send_durable(op) {
                d.last_ticket = t;
            }
        }
    }
    d.closed.retain(|_, c| c.closed_at >= oldest);
    d.aliases.retain(|_, new| user.sessions.contains_key(new) || d.closed.contains_key(new));
    let oldest_mail = now.saturating_sub(m_ttl);
    for mb in d.mailboxes.values_mut() {
        expire_mail(shard, mb, oldest_mail);
    }
}

/// Shutting down: every stream gives its lease back (everything it sent has been handed to
/// the writer, which commits it all before the process exits).
pub fn release_all(shard: &ShardCtx, user: &mut UserState) {
    let agents: Vec<Rc<str>> = user.durable.streams.keys().cloned().collect();
    for a in agents {
        release(shard, &mut user.durable, &a);
    }
}

/// Drops the user's counted state from the shard's gauges (the user leaves memory).
pub fn forget(shard: &ShardCtx, d: &Durable) {
    let s = &shard.stats;
    s.streams.set(s.streams.get() - d.streams.len() as i64);
    for st in d.streams.values() {
        s.history_entries.set(s.history_entries.get() - st.entries.len() as i64);
        s.history_bytes.set(s.history_bytes.get() - st.bytes as i64);
    }
    for mb in d.mailboxes.values() {
        s.mailbox_entries.set(s.mailbox_entries.get() - mb.entries.len() as i64);
        s.mailbox_bytes.set(s.mailbox_bytes.get() - mb.bytes as i64);
    }
}

/// Whether a connection is a client session (for the routing code's convenience).
pub fn session_of(conn: &ConnRef) -> Option<&Rc<str>> {
    match &conn.ident {
        Ident::Client { session } => Some(session),
        _ => None,
    }
}

//! Per-user state on the home shard and the routing rules of spec §4–5.
//!
//! Invariants:
//! - A user's state lives only on its home shard; every lookup here is shard-local, so a
//!   relayed message never leaves the thread that read it.
//! - A message reaches only connections of the sender's user, and only those the rules of
//!   §5 allow (binding and allowlist); anything else gets `not_allowed` or `offline`, which
//!   reveal nothing about other users.
//! - One outbound frame is built per relayed message and shared by every recipient.
//! - Every `message` frame is built by [`crate::protocol`]'s single builder, so resume (§8)
//!   can add `seq`/`epoch` in one place.

use crate::connection::{ConnRef, ConnState, Ident, OnFail, Pending, Phase, Queued, RoleState};
use crate::protocol::{self, frames, Inbound, Kind};
use crate::resume::{self, Target};
use crate::shard::local::{unix_now, ShardCtx};
use crate::shard::TokenBucket;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A warning is sent this long before a client's token expires.
pub const EXPIRY_WARNING_SECS: u64 = 30;

/// One of the user's agents that is online, or offline within its grace period.
pub struct AgentSlot {
    pub conn: Option<ConnRef>,
    pub offline_since: Option<Instant>,
}

pub struct UserState {
    pub user: Rc<str>,
    pub agents: HashMap<Rc<str>, AgentSlot>,
    pub sessions: HashMap<Rc<str>, ConnRef>,
    /// Live connections (agents and clients) of this user on this shard.
    pub conns: usize,
    bucket: TokenBucket,
    /// When the user started being continuously over its rate, and when it last was.
    over_since: Option<Instant>,
    last_limited: Option<Instant>,
    /// Whether this user is on its shard's list of users with an agent in offline grace.
    pub in_grace_list: bool,
    /// Streams, closed sessions and mailboxes (spec §8).
    pub durable: resume::Durable,
}

impl UserState {
    pub fn new(user: Rc<str>, burst: u32, now: Instant, durable: resume::Durable) -> Self {
        UserState {
            user,
            agents: HashMap::new(),
            sessions: HashMap::new(),
            conns: 0,
            bucket: TokenBucket::new(burst, now),
            over_since: None,
            last_limited: None,
            in_grace_list: false,
            durable,
        }
    }

    /// True when nothing keeps this state alive in memory (`settled`: the shard's last
    /// settled commit ticket).
    pub fn is_empty(&self, settled: u64) -> bool {
        self.conns == 0 && self.agents.is_empty() && self.durable.is_idle(settled)
    }

    /// Whether an agent of this user is offline within its grace period.
    pub fn has_agent_in_grace(&self) -> bool {
        self.agents.values().any(|s| s.conn.is_none())
    }
}

enum Rate {
    Ok,
    Limited,
    /// Over the rate for longer than `rate_abuse_close_secs`: close with 4029.
    Abuse,
}

fn take_rate(shard: &ShardCtx, conn: &ConnRef, now: Instant) -> Rate {
    let cfg = shard.cfg();
    let l = &cfg.limits;
    let mut u = conn.user.borrow_mut();
    if u.bucket.take(now, l.messages_per_sec_per_user, l.messages_burst_per_user) {
        if u.last_limited.is_some_and(|t| now.duration_since(t) > Duration::from_secs(1)) {
            u.over_since = None;
        }
        return Rate::Ok;
    }
    // Continuously over the limit (no gap over 1 s) since `over_since`.
    let continuing = u.last_limited.is_some_and(|t| now.duration_since(t) <= Duration::from_secs(1));
    if !continuing || u.over_since.is_none() {
        u.over_since = Some(now);
    }
    u.last_limited = Some(now);
    let abuse = Duration::from_secs(l.rate_abuse_close_secs);
    if u.over_since.is_some_and(|s| now.duration_since(s) >= abuse) {
        Rate::Abuse
    } else {
        Rate::Limited
    }
}

/// Charges one `send` to the user's rate. False: the send is dropped (answered
/// `rate_limited`, or the connection closed with 4029 after sustained abuse).
fn within_rate(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, m: &Inbound, now: Instant) -> bool {
    let rate = take_rate(shard, conn, now);
    if !matches!(rate, Rate::Ok) {
        crate::metrics::dropped("rate");
    }
    match rate {
        Rate::Ok => return true,
        Rate::Limited => error(shard, conn, st, "rate_limited", m.id, "message rate exceeded; dropped"),
        Rate::Abuse => st.close(4029, "message rate abuse", now),
    }
    false
}

/// Queues a frame for the connection itself (acks, errors, pongs).
fn reply(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, frame: bytes::Bytes) {
    if shard.deliver(conn, st, frame) == Queued::Overflow {
        crate::metrics::dropped("slow_consumer");
    }
}

fn error(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, code: &str, id: Option<&RawValue>, msg: &str) {
    reply(shard, conn, st, frames::error(code, id, msg));
}

/// A text frame from the peer.
pub fn on_text(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, text: &[u8], now: Instant) {
    if matches!(conn.ident, Ident::Echo) {
        shard.deliver(conn, st, frames::data_frame(false, text));
        return;
    }
    let inbound = match protocol::parse_inbound(text) {
        Ok(i) => i,
        Err(e) => {
            crate::metrics::dropped("bad_frame");
            return reply(shard, conn, st, frames::bad_frame(&e));
        }
    };
    match inbound.kind {
        Kind::Ping => reply(shard, conn, st, frames::pong()),
        // A cumulative mailbox ack (spec §8); from a client it means nothing and is ignored.
        Kind::Ack => {
            if let (Ident::Agent { agent_id, .. }, Some(n)) = (&conn.ident, inbound.seq) {
                resume::on_agent_ack(shard, &mut conn.user.borrow_mut(), agent_id, n);
            }
        }
        Kind::Refresh => refresh(shard, conn, st, &inbound),
        Kind::Send => match &conn.ident {
            Ident::Agent { agent_id, conn_id } => {
                agent_send(shard, conn, st, &inbound, agent_id, conn_id, now)
            }
            Ident::Client { session } => client_send(shard, conn, st, &inbound, session, now),
            Ident::Echo => {}
        },
    }
}

fn agent_send(
    shard: &ShardCtx,
    conn: &ConnRef,
    st: &mut ConnState,
    m: &Inbound,
    agent_id: &Rc<str>,
    conn_id: &str,
    now: Instant,
) {
    let data = m.data.expect("parser requires data in send").get().as_bytes();
    let to = m.to.as_deref();
    let required = shard.cfg().auth.agent_message_signatures == crate::config::MessageSignatures::Required;
    if required {
        let RoleState::Agent { key, last_ctr, .. } = &mut st.role else { return };
        let verdict = match (&m.ctr, m.sig) {
            (Some(ctr), Some(sig)) if ctr.value > *last_ctr => {
                let mut scratch = shard.sig_scratch.borrow_mut();
                if crate::auth::agent::verify_message(
                    key,
                    conn_id,
                    ctr.decimal,
                    to.unwrap_or(""),
                    data,
                    sig,
                    &mut scratch,
                ) {
                    *last_ctr = ctr.value;
                    None
                } else {
                    Some("signature does not verify")
                }
            }
            (Some(_), Some(_)) => Some("ctr must increase"),
            _ => Some("ctr and sig are required"),
        };
        if let Some(msg) = verdict {
            crate::metrics::dropped("bad_signature");
            return error(shard, conn, st, "bad_signature", m.id, msg);
        }
    }
    if !within_rate(shard, conn, st, m, now) {
        return;
    }
    let mut user_ref = conn.user.borrow_mut();
    let user = &mut *user_ref;
    let target = match to {
        Some(session) => match resume::target(shard, user, agent_id, session) {
            Ok(t) => t,
            Err(code) => {
                drop(user_ref);
                crate::metrics::dropped(code);
                let msg = if code == "offline" {
                    "no such session"
                } else {
                    "that session cannot reach this agent"
                };
                return error(shard, conn, st, code, m.id, msg);
            }
        },
        None => Target::Broadcast,
    };
    let (live, to_session) = match &target {
        Target::Live(c) => (true, resume::session_of(c).cloned()),
        Target::Queued(s) => (false, Some(s.clone())),
        // Only a stream without its lease needs to know whether anyone will see this now
        // (the common case, a held lease, skips the scan).
        Target::Broadcast => (
            resume::lease_needed(user, agent_id)
                && user.sessions.values().any(|s| s.st.borrow().role.can_reach(agent_id)),
            None,
        ),
    };
    // Every message of the agent to its user is part of its stream (spec §8): seq, epoch,
    // history. Live frames wait behind the stream's lease when it has to be taken first.
    let (frame, ticket, gate) = resume::stamp(shard, user, agent_id, to_session.as_ref(), data, live);
    let after = gate.unwrap_or(0);
    let mut deliveries = 0;
    match target {
        Target::Live(target) => {
            drop(user_ref);
            let mut tst = target.st.borrow_mut();
            match shard.deliver_after(&target, &mut tst, frame, after) {
                Queued::Yes => deliveries = 1,
                // The session is closing (or was just closed as too slow to receive, 4008):
                // the message is in its stream, addressed to it, and a resume of the session
                // gets it — so it is answered like a send to a closed session.
                Queued::Closed | Queued::Overflow if ticket != 0 => {
                    drop(tst);
                    return ack_queued(shard, conn, st, m, ticket, now);
                }
                Queued::Closed => {
                    drop(tst);
                    crate::metrics::dropped("offline");
                    return error(shard, conn, st, "offline", m.id, "no such session");
                }
                Queued::Overflow => {
                    // The recipient could not keep up and is being closed (4008): the
                    // message is lost, so the sender hears it instead of an ack.
                    drop(tst);
                    return error(
                        shard,
                        conn,
                        st,
                        "offline",
                        m.id,
                        "the session was closed: too slow to receive",
                    );
                }
            }
        }
        Target::Queued(_) => {
            drop(user_ref);
            if ticket == 0 {
                crate::metrics::dropped("offline");
                return error(
                    shard,
                    conn,
                    st,
                    "offline",
                    m.id,
                    "the session is closed and the store is busy",
                );
            }
            return ack_queued(shard, conn, st, m, ticket, now);
        }
        Target::Broadcast => {
            for target in user.sessions.values() {
                let mut tst = target.st.borrow_mut();
                if tst.role.can_reach(agent_id)
                    && shard.deliver_after(target, &mut tst, frame.clone(), after) == Queued::Yes
                {
                    deliveries += 1;
                }
            }
            drop(user_ref);
        }
    }
    shard.stats.relayed(now, deliveries);
    if let Some(id) = m.id {
        reply(shard, conn, st, frames::ack(id));
    }
}

/// An agent's message kept for a closed (or closing) session: `ack … queued:true` once its
/// history record is committed.
fn ack_queued(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, m: &Inbound, ticket: u64, now: Instant) {
    crate::metrics::ShardStats::add(&shard.stats.queued_for_session, 1);
    shard.stats.relayed(now, 0);
    if let Some(id) = m.id {
        let p = Pending {
            after: ticket,
            frame: frames::ack_queued(id),
            on_fail: OnFail::Send(frames::error("offline", Some(id), "the message could not be stored")),
            budgeted: false,
        };
        shard.defer(conn, st, p);
    }
}

fn client_send(
    shard: &ShardCtx,
    conn: &ConnRef,
    st: &mut ConnState,
    m: &Inbound,
    session: &str,
    now: Instant,
) {
    let data = m.data.expect("parser requires data in send").get().as_bytes();
    let RoleState::Client { bound, .. } = &st.role else { return };
    // An Rc clone, not a copy of the string: no allocation per message.
    let bound = bound.clone();
    let target: &str = match (&m.to, &bound) {
        (Some(t), _) => t,
        (None, Some(b)) => b,
        (None, None) => {
            crate::metrics::dropped("bad_frame");
            return error(
                shard,
                conn,
                st,
                "bad_frame",
                m.id,
                "\"to\" is required: this session is not bound to an agent",
            );
        }
    };
    if !within_rate(shard, conn, st, m, now) {
        return;
    }
    if !st.role.can_reach(target) {
        crate::metrics::dropped("not_allowed");
        return error(shard, conn, st, "not_allowed", m.id, "this session cannot reach that agent");
    }
    let user = conn.user.borrow();
    let agent = user.agents.get(target).and_then(|s| s.conn.clone());
    let unconfirmed = resume::has_unconfirmed(&user, target);
    let user_name = user.user.clone();
    drop(user);
    let mut online = None;
    if let Some(agent) = agent {
        if !unconfirmed {
            let mut ast = agent.st.borrow_mut();
            match shard.deliver(&agent, &mut ast, frames::message_to_agent(session, data)) {
                Queued::Yes => {
                    drop(ast);
                    shard.stats.relayed(now, 1);
                    if let Some(id) = m.id {
                        reply(shard, conn, st, frames::ack(id));
                    }
                    return;
                }
                // Closing: it is as good as offline.
                Queued::Closed => {}
                Queued::Overflow => {
                    drop(ast);
                    return error(
                        shard,
                        conn,
                        st,
                        "offline",
                        m.id,
                        "the agent was closed: too slow to receive",
                    );
                }
            }
        } else {
            // Unconfirmed mail waits for this agent: new messages queue behind it.
            online = Some(agent);
        }
    }
    if online.is_none() {
        // Not online here: is it this user's agent at all? Only this path reads the store.
        let mine = matches!(shard.global.store.get_agent(target), Ok(Some(r)) if *r.user == *user_name && r.is_usable(unix_now()));
        if !mine {
            crate::metrics::dropped("not_allowed");
            return error(shard, conn, st, "not_allowed", m.id, "no such agent for this user");
        }
        if !resume::mailbox_on(shard) {
            crate::metrics::dropped("offline");
            return error(shard, conn, st, "offline", m.id, "that agent is not connected");
        }
    }
    let mut user = conn.user.borrow_mut();
    let agent_key: Rc<str> = match user.agents.get_key_value(target) {
        Some((k, _)) => k.clone(),
        None => target.into(),
    };
    let queued = resume::enqueue_mail(shard, &mut user, &agent_key, session, data, online.as_ref());
    drop(user);
    match queued {
        resume::Queue::Queued { ticket } => {
            shard.stats.relayed(now, 0);
            if let Some(id) = m.id {
                let p = Pending {
                    after: ticket,
                    frame: frames::ack_queued(id),
                    on_fail: OnFail::Send(frames::error(
                        "offline",
                        Some(id),
                        "the message could not be stored",
                    )),
                    budgeted: false,
                };
                shard.defer(conn, st, p);
            }
        }
        resume::Queue::Full => error(
            shard,
            conn,
            st,
            "mailbox_full",
            m.id,
            "the agent's mailbox is full; the message was not stored",
        ),
        resume::Queue::Unavailable => {
            crate::metrics::dropped("offline");
            error(shard, conn, st, "offline", m.id, "the agent is not connected and the store is busy")
        }
    }
}

fn refresh(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, m: &Inbound) {
    let RoleState::Client { bound, .. } = &st.role else {
        return error(shard, conn, st, "bad_frame", m.id, "agents do not refresh tokens");
    };
    let token = m.token.as_deref().unwrap_or("");
    let claims = match shard.global.jwt().verify(token) {
        Ok(c) if *c.user == *conn.user.borrow().user => c,
        _ => {
            return error(shard, conn, st, "unauthorized", m.id, "refresh refused; the session is unchanged")
        }
    };
    if let (Some(b), Some(a)) = (bound, &claims.agents) {
        if !a.iter().any(|x| **x == **b) {
            return error(
                shard,
                conn,
                st,
                "unauthorized",
                m.id,
                "the new token does not allow the bound agent",
            );
        }
    }
    let remaining = claims.exp.saturating_sub(unix_now());
    if let RoleState::Client { allow, exp, warned, .. } = &mut st.role {
        *allow = claims.agents.map(|a| a.into_iter().map(Into::into).collect());
        *exp = claims.exp;
        *warned = remaining <= EXPIRY_WARNING_SECS;
    }
    if remaining <= EXPIRY_WARNING_SECS {
        warn_expiry(shard, conn, st, remaining);
    }
}

pub fn warn_expiry(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState, remaining: u64) {
    let msg = format!("token expires in {remaining} s; send a refresh");
    error(shard, conn, st, "token_expiring", None, &msg);
}

/// A new connection on its home shard: welcome, then tell the others.
pub fn on_open(shard: &ShardCtx, conn: &ConnRef, st: &mut ConnState) {
    let hb = shard.cfg().limits.heartbeat_secs;
    let now = shard.now();
    match &conn.ident {
        Ident::Echo => {}
        Ident::Agent { agent_id, conn_id } => {
            let mut user = conn.user.borrow_mut();
            let came_online = match user.agents.get_mut(agent_id) {
                Some(slot) => {
                    if let Some(old) = slot.conn.replace(conn.clone()) {
                        let mut ost = old.st.borrow_mut();
                        ost.close(4009, "replaced by a newer connection", now);
                        shard.mark_dirty(&old, &mut ost);
                    }
                    slot.offline_since = None;
                    false
                }
                None => {
                    user.agents.insert(
                        agent_id.clone(),
                        AgentSlot { conn: Some(conn.clone()), offline_since: None },
                    );
                    true
                }
            };
            let mut sessions = Vec::new();
            for s in user.sessions.values() {
                let mut sst = s.st.borrow_mut();
                if sst.role.can_reach(agent_id) {
                    if let Ident::Client { session } = &s.ident {
                        sessions.push(session.clone());
                    }
                    if came_online {
                        shard.deliver(s, &mut sst, frames::presence(agent_id, true));
                    }
                }
            }
            let names: Vec<&str> = sessions.iter().map(|s| &**s).collect();
            let welcome = frames::welcome_agent(conn_id, agent_id, &user.user, &names, hb);
            drop(user);
            shard.deliver(conn, st, welcome);
            resume::on_agent_open(shard, conn, st, &mut conn.user.borrow_mut(), agent_id);
        }
        Ident::Client { session } => {
            let mut user = conn.user.borrow_mut();
            user.sessions.insert(session.clone(), conn.clone());
            let records = shard.global.store.agents_of_user(&user.user).unwrap_or_default();
            let unix = unix_now();
            let reachable: Vec<(&str, &str, bool)> = records
                .iter()
                .filter(|r| r.is_usable(unix) && st.role.can_reach(&r.agent_id))
                .map(|r| {
                    (r.agent_id.as_str(), r.name.as_str(), user.agents.contains_key(r.agent_id.as_str()))
                })
                .collect();
            let welcome = frames::welcome_client(session, &user.user, &reachable, hb);
            for (id, slot) in user.agents.iter() {
                if let Some(a) = &slot.conn {
                    if st.role.can_reach(id) {
                        let mut ast = a.st.borrow_mut();
                        shard.deliver(a, &mut ast, frames::session_event(session, true));
                    }
                }
            }
            drop(user);
            shard.deliver(conn, st, welcome);
            if let RoleState::Client { exp, warned, .. } = &mut st.role {
                let remaining = exp.saturating_sub(unix);
                if remaining <= EXPIRY_WARNING_SECS {
                    *warned = true;
                    warn_expiry(shard, conn, st, remaining);
                }
            }
            resume::on_client_open(shard, conn, st, &mut conn.user.borrow_mut(), session);
        }
    }
}

/// A connection is gone: update presence and sessions, release the user when unused.
pub fn on_close(shard: &ShardCtx, conn: &ConnRef) {
    let now = shard.now();
    let mut user = conn.user.borrow_mut();
    user.conns -= 1;
    match &conn.ident {
        Ident::Echo => {}
        Ident::Agent { agent_id, .. } => {
            if let Some(slot) = user.agents.get_mut(agent_id) {
                if slot.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, conn)) {
                    slot.conn = None;
                    slot.offline_since = Some(now);
                }
            }
            if shard.cfg().presence.offline_grace_ms == 0 {
                drop(user);
                expire_grace(shard, &conn.user, now);
                user = conn.user.borrow_mut();
            } else if !user.in_grace_list {
                // The sweeper visits only users with an agent in its grace period.
                user.in_grace_list = true;
                shard.grace_users.borrow_mut().push(conn.user.clone());
            }
        }
        Ident::Client { session } => {
            if user.sessions.get(session).is_some_and(|c| Rc::ptr_eq(c, conn)) {
                user.sessions.remove(session);
                let st = conn.st.borrow();
                for (id, slot) in user.agents.iter() {
                    if let Some(a) = &slot.conn {
                        if st.role.can_reach(id) {
                            let mut ast = a.st.borrow_mut();
                            shard.deliver(a, &mut ast, frames::session_event(session, false));
                        }
                    }
                }
                resume::on_client_close(shard, &mut user, session, &st.role);
            }
        }
    }
    if user.is_empty(shard.settled.get()) {
        let name = user.user.clone();
        drop(user);
        shard.drop_user(&name, &conn.user);
    }
}

/// Announces agents whose offline grace has run out, and forgets them.
pub fn expire_grace(shard: &ShardCtx, user: &Rc<std::cell::RefCell<UserState>>, now: Instant) {
    let grace = Duration::from_millis(shard.cfg().presence.offline_grace_ms);
    let mut u = user.borrow_mut();
    let gone: Vec<Rc<str>> = u
        .agents
        .iter()
        .filter(|(_, s)| s.conn.is_none() && s.offline_since.is_some_and(|t| now.duration_since(t) >= grace))
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        u.agents.remove(&id);
        for s in u.sessions.values() {
            let mut sst = s.st.borrow_mut();
            if sst.role.can_reach(&id) {
                shard.deliver(s, &mut sst, frames::presence(&id, false));
            }
        }
    }
}

/// `switchboard agent revoke` committed: close the agent's live connection with 4003.
pub fn revoke(shard: &ShardCtx, user: &str, agent_id: &str) {
    let Some(u) = shard.users.borrow().get(user).cloned() else { return };
    let u = u.borrow();
    if let Some(conn) = u.agents.get(agent_id).and_then(|s| s.conn.clone()) {
        let mut st = conn.st.borrow_mut();
        st.close(4003, "agent revoked", shard.now());
        shard.mark_dirty(&conn, &mut st);
        tracing::info!(agent = %agent_id, "revoked agent disconnected");
    }
}

/// Whether the connection is still open (for sweeps).
pub fn is_open(st: &ConnState) -> bool {
    st.phase == Phase::Open
}

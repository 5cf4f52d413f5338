//! What one shard owns: its connections, its users' state, its scratch buffers, and the tasks
//! that run on it (accept loop, inbox, sweeper).
//!
//! Invariants:
//! - Touched only from the shard's own thread (`Rc`/`RefCell`, no locks).
//! - Timers are not per connection: one sweeper per shard checks heartbeats, idle and token
//!   deadlines, close deadlines and presence grace every [`SWEEP_INTERVAL`].

use super::{Global, ShardMsg};
use crate::auth::agent::NonceWindow;
use crate::config::Config;
use crate::connection::{ConnRef, Phase, RoleState};
use crate::router::{self, UserState};
use bytes::BytesMut;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the sweeper visits every connection. Its cost is one borrow and a few clock
/// comparisons per connection; deadlines (heartbeat, idle, token expiry, close) are kept to
/// within this granularity.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn trusted_nets(cfg: &Config) -> crate::proxy::TrustedNets {
    crate::proxy::TrustedNets::parse(&cfg.server.trusted_proxies).unwrap_or_default()
}

pub struct ShardCtx {
    pub idx: usize,
    pub global: Arc<Global>,
    /// This shard's copy of the configuration in force (replaced by [`ShardMsg::Reload`]).
    cfg: RefCell<Arc<Config>>,
    /// `server.trusted_proxies`, parsed (validated with the configuration).
    trusted: RefCell<crate::proxy::TrustedNets>,
    pub users: RefCell<HashMap<Rc<str>, Rc<RefCell<UserState>>>>,
    pub conns: RefCell<Slab<ConnRef>>,
    /// Users with an agent offline within its grace period (the sweeper's only user scan).
    pub grace_users: RefCell<Vec<Rc<RefCell<UserState>>>>,
    /// Connections with output queued during the current batch.
    pub dirty: RefCell<Vec<ConnRef>>,
    /// The one receive buffer of this shard.
    pub scratch: RefCell<BytesMut>,
    /// Plaintext decrypted from TLS connections (its own buffer, shared likewise).
    pub plain: RefCell<BytesMut>,
    /// Reused by Ed25519 message verification.
    pub sig_scratch: RefCell<Vec<u8>>,
    /// Accepted upgrade nonces per agent, with the last time each window was used.
    nonces: RefCell<HashMap<String, (NonceWindow, u64)>>,
    now: Cell<Instant>,
    /// Wall-clock seconds at `unix_base.1` (re-read by every sweep), so per-message
    /// timestamps cost no clock read.
    unix_base: Cell<(u64, Instant)>,
    /// The last commit ticket this shard handed the store writer (spec §8 durability).
    next_ticket: Cell<u64>,
    /// Every ticket up to this one has been through a commit (see `failed`).
    pub settled: Cell<u64>,
    /// Tickets whose commit failed (rare; kept for the frames that still wait on them).
    pub failed: RefCell<HashSet<u64>>,
    /// Connections whose backlog waits for a commit.
    pub waiting: RefCell<Vec<ConnRef>>,
    pub stats: crate::metrics::ShardStats,
    metrics: crate::metrics::ShardMetrics,
}

impl ShardCtx {
    pub fn new(idx: usize, global: Arc<Global>) -> Self {
        ShardCtx {
            idx,
            cfg: RefCell::new(global.config()),
            trusted: RefCell::new(trusted_nets(&global.config())),
            global,
            users: RefCell::default(),
            conns: RefCell::new(Slab::new()),
            dirty: RefCell::default(),
            grace_users: RefCell::default(),
            scratch: RefCell::new(BytesMut::with_capacity(64 * 1024)),
            plain: RefCell::new(BytesMut::new()),
            sig_scratch: RefCell::default(),
            nonces: RefCell::default(),
            now: Cell::new(Instant::now()),
            unix_base: Cell::new((unix_now(), Instant::now())),
            next_ticket: Cell::new(0),
            settled: Cell::new(0),
            failed: RefCell::default(),
            waiting: RefCell::default(),
            stats: Default::default(),
            metrics: crate::metrics::ShardMetrics::new(idx),
        }
    }

    /// The configuration in force on this shard.
    pub fn cfg(&self) -> std::cell::Ref<'_, Arc<Config>> {
        self.cfg.borrow()
    }

    /// Whether `ip` may send a PROXY header.
    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.borrow().contains(ip)
    }

    /// The time at the start of the current batch (one clock read per batch).
    pub fn now(&self) -> Instant {
        self.now.get()
    }

    /// Unix seconds at the start of the current batch (wall clock re-read once a second).
    pub fn unix(&self) -> u64 {
        let (base, at) = self.unix_base.get();
        base + self.now().saturating_duration_since(at).as_secs()
    }

    pub fn refresh_now(&self) -> Instant {
        let n = Instant::now();
        self.now.set(n);
        n
    }

    /// The user's state, created on first use.
    pub fn user_entry(&self, user: &str) -> Rc<RefCell<UserState>> {
        let mut users = self.users.borrow_mut();
        if let Some(u) = users.get(user) {
            return u.clone();
        }
        let burst = self.cfg().limits.messages_burst_per_user;
        let name: Rc<str> = user.into();
        // Streams, closed sessions and mailboxes come back from LMDB on the user's first
        // connection (one read transaction).
        let durable = crate::resume::load(self, user);
        let u = Rc::new(RefCell::new(UserState::new(name.clone(), burst, self.now(), durable)));
        users.insert(name, u.clone());
        u
    }

    /// Forgets a user whose state is empty, if the map still holds this very state.
    pub fn drop_user(&self, name: &str, u: &Rc<RefCell<UserState>>) {
        let mut users = self.users.borrow_mut();
        if users.get(name).is_some_and(|cur| Rc::ptr_eq(cur, u)) {
            users.remove(name);
            drop(users);
            if let Ok(state) = u.try_borrow() {
                crate::resume::forget(self, &state.durable);
            }
        }
    }

    /// Hands `op` to the store writer with this shard's next commit ticket; `None` when the
    /// writer's queue refused it.
    pub fn send_durable(&self, op: crate::store::WriteOp) -> Option<u64> {
        let n = self.next_ticket.get() + 1;
        let ticket = crate::store::Ticket { shard: self.idx, n };
        if self.global.writer.send_durable(op, ticket) {
            self.next_ticket.set(n);
            Some(n)
        } else {
            None
        }
    }

    /// Whether the writer has settled tickets this shard has not acted on yet.
    fn commits_pending(&self) -> bool {
        self.global.writer.settled(self.idx) > self.settled.get()
    }

    /// Acts on settled commits: frames that waited for them move on.
    fn check_commits(&self) {
        let settled = self.global.writer.settled(self.idx);
        if settled <= self.settled.get() {
            return;
        }
        // Failures are reported before `settled` moves past them.
        let failed = self.global.writer.take_failed(self.idx);
        if !failed.is_empty() {
            tracing::error!(ops = failed.len(), "store commits failed; their acks become errors");
            self.failed.borrow_mut().extend(failed);
            let set = self.failed.borrow();
            for u in self.users.borrow().values() {
                if let Ok(mut u) = u.try_borrow_mut() {
                    crate::resume::on_failed(self, &mut u, &set);
                }
            }
        }
        self.settled.set(settled);
        let list = std::mem::take(&mut *self.waiting.borrow_mut());
        for conn in list {
            let mut st = conn.st.borrow_mut();
            st.waiting = false;
            self.pump_backlog(&conn, &mut st);
        }
        self.flush_dirty();
    }

    pub fn user_conn_count(&self, user: &str) -> usize {
        self.users.borrow().get(user).map_or(0, |u| u.borrow().conns)
    }

    /// Records `nonce` for `agent_id`; false when it was already accepted (a replay).
    pub fn check_nonce(&self, agent_id: &str, nonce: &str, now: u64) -> bool {
        let skew = self.cfg().auth.max_skew_secs;
        let mut nonces = self.nonces.borrow_mut();
        let entry = nonces.entry(agent_id.to_string()).or_insert_with(|| (NonceWindow::new(2 * skew), now));
        entry.1 = now;
        entry.0.check_and_insert(nonce, now)
    }

    fn prune_nonces(&self, now: u64) {
        let keep = 2 * self.cfg().auth.max_skew_secs;
        self.nonces.borrow_mut().retain(|_, (_, last)| now.saturating_sub(*last) <= keep);
    }

    /// Heartbeats, idle and token deadlines, close deadlines; then presence grace.
    fn sweep(&self) {
        self.check_commits();
        let now = self.refresh_now();
        let unix = unix_now();
        self.unix_base.set((unix, now));
        let (hb, idle, budget) = {
            let l = &self.cfg().limits;
            (
                Duration::from_secs(l.heartbeat_secs),
                Duration::from_secs(l.idle_timeout_secs),
                l.send_buffer_bytes,
            )
        };
        let mut outbound = 0;
        for (_, conn) in self.conns.borrow().iter() {
            let mut st = conn.st.borrow_mut();
            let queued = st.queued_bytes();
            outbound += queued;
            match st.phase {
                Phase::Closing(deadline) | Phase::FlushThenClose(deadline) | Phase::Draining(deadline)
                    if now >= deadline =>
                {
                    st.phase = Phase::Dead;
                    conn.notify();
                    continue;
                }
                Phase::Open => {}
                _ => continue,
            }
            if now.duration_since(st.last_rx) >= 2 * hb {
                st.close(1011, "heartbeat lost", now);
            } else if now.duration_since(st.last_data) >= idle {
                st.close(4000, "idle timeout", now);
            } else {
                match &mut st.role {
                    RoleState::Client { exp, warned, .. } => {
                        if unix >= *exp {
                            st.close(4001, "token expired", now);
                        } else if !*warned && *exp - unix <= router::EXPIRY_WARNING_SECS {
                            *warned = true;
                            let remaining = *exp - unix;
                            router::warn_expiry(self, conn, &mut st, remaining);
                        }
                    }
                    RoleState::Agent { expires: Some(e), .. } if unix >= *e => {
                        st.close(4003, "agent expired", now);
                    }
                    RoleState::Agent { .. } | RoleState::Echo => {}
                }
                if st.phase == Phase::Open && now.duration_since(st.last_ping) >= hb {
                    st.last_ping = now;
                    st.ws.ping();
                    st.pump_control(budget, now);
                }
            }
            if st.queued_bytes() != queued {
                // A ping, a warning or a close frame to write.
                self.mark_dirty(conn, &mut st);
            }
        }
        let settled = self.settled.get();
        let mut grace = std::mem::take(&mut *self.grace_users.borrow_mut());
        grace.retain(|u| {
            router::expire_grace(self, u, now);
            let mut state = u.borrow_mut();
            if state.is_empty(settled) {
                let name = state.user.clone();
                state.in_grace_list = false;
                drop(state);
                // Only if the map still holds this very state (not a newer one of the user).
                self.drop_user(&name, u);
                return false;
            }
            state.in_grace_list = state.has_agent_in_grace();
            state.in_grace_list
        });
        self.grace_users.borrow_mut().append(&mut grace);
        // History, closed sessions and mail expire; users with nothing left leave memory.
        let mut idle = Vec::new();
        for u in self.users.borrow().values() {
            let Ok(mut state) = u.try_borrow_mut() else { continue };
            crate::resume::sweep(self, &mut state, unix);
            if !state.in_grace_list && state.is_empty(settled) {
                idle.push((state.user.clone(), u.clone()));
            }
        }
        for (name, u) in idle {
            self.drop_user(&name, &u);
        }
        self.flush_dirty();
        self.stats.outbound_bytes.set(outbound as i64);
        self.metrics.publish(&self.stats, self.global.inboxes[self.idx].depth());
    }

    /// Closes every connection with 1001 and waits (bounded) for them to go.
    async fn drain(&self, deadline: Instant) {
        let now = self.refresh_now();
        for (_, conn) in self.conns.borrow().iter() {
            let mut st = conn.st.borrow_mut();
            st.close(1001, "shutting down", now);
            self.mark_dirty(conn, &mut st);
        }
        self.flush_dirty();
        while !self.conns.borrow().is_empty() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(20)).await;
            self.check_commits();
            self.sweep();
        }
        // Everything sent is with the writer, which commits it all before the process exits:
        // every stream may be marked clean.
        for u in self.users.borrow().values() {
            if let Ok(mut state) = u.try_borrow_mut() {
                crate::resume::release_all(self, &mut state);
            }
        }
    }
}

/// The body of a shard: spawns its tasks, then serves its inbox until told to stop.
pub async fn shard_main(
    idx: usize,
    global: Arc<Global>,
    listener: std::net::TcpListener,
    (rx, bell): super::InboxRx,
) -> std::io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(listener)?;
    let ctx = Rc::new(ShardCtx::new(idx, global.clone()));
    monoio::spawn(crate::listener::accept_loop(ctx.clone(), listener));
    let sweeper = ctx.clone();
    monoio::spawn(async move {
        let mut ticks = 0u64;
        loop {
            monoio::time::sleep(SWEEP_INTERVAL).await;
            sweeper.sweep();
            ticks += 1;
            if ticks % 10 == 0 {
                sweeper.prune_nonces(unix_now());
                if sweeper.idx == 0 {
                    sweeper.global.prune_ip_buckets(Instant::now(), &sweeper.cfg().limits);
                }
            }
        }
    });
    global.shards_accepting.fetch_add(1, Ordering::SeqCst);
    loop {
        while let Ok(msg) = rx.try_recv() {
            ctx.refresh_now();
            match msg {
                ShardMsg::Handoff(h) => crate::handshake::finish(&ctx, h),
                ShardMsg::RevokeAgent { user, agent_id } => router::revoke(&ctx, &user, &agent_id),
                ShardMsg::Reload(cfg) => {
                    *ctx.trusted.borrow_mut() = trusted_nets(&cfg);
                    *ctx.cfg.borrow_mut() = cfg;
                }
                ShardMsg::Shutdown { deadline } => {
                    global.shards_accepting.fetch_sub(1, Ordering::SeqCst);
                    ctx.drain(deadline).await;
                    return Ok(());
                }
            }
        }
        ctx.check_commits();
        ctx.flush_dirty();
        poll_fn(|cx| {
            bell.register(cx.waker());
            if rx.is_empty() && !ctx.commits_pending() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }
}

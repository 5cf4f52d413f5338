//! Shards: one pinned OS thread per core, each running its own monoio runtime (io_uring, or
//! the epoll driver when io_uring is refused), its own `SO_REUSEPORT` listener, and the state
//! of the users whose home it is.
//!
//! Invariants:
//! - A user's home shard is `hash(user) % N`, fixed for the life of the process; all of a
//!   user's state lives there and only there.
//! - Cross-shard traffic is explicit and bounded: each shard has one inbound crossbeam
//!   channel (handed-off connections and control messages) and a doorbell the runtime awaits;
//!   nothing on the per-message path crosses shards.
//! - No busy polling: a shard with nothing to do sleeps in its driver.

pub mod local;

use crate::auth::jwt::JwtVerifier;
use crate::config::{Config, Driver};
use crate::handshake::Handoff;
use crate::store::{Store, WriterHandle};
use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Bound of each shard's inbound channel; a full channel refuses the handoff with 503.
pub const INBOX_CAPACITY: usize = 4096;

/// What one shard sends another.
pub enum ShardMsg {
    /// An authenticated upgrade, to be finished on the user's home shard.
    Handoff(Box<Handoff>),
    /// `switchboard agent revoke` committed: close this agent's connection with 4003.
    RevokeAgent { user: String, agent_id: String },
    /// SIGHUP: use this configuration (limits, auth, presence) from now on.
    Reload(Arc<Config>),
    /// Stop: close every connection with 1001 and return by the deadline.
    Shutdown { deadline: Instant },
}

/// One shard's inbound channel and the doorbell that wakes its runtime.
pub struct Inbox {
    tx: Sender<ShardMsg>,
    bell: Arc<AtomicWaker>,
}

impl Inbox {
    /// Sends `msg` and rings the doorbell. Returns the message back when the channel is full.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.bell.wake();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

/// State shared by every shard: configuration, store, keys, caps. Nothing here is touched per
/// relayed message.
pub struct Global {
    /// The configuration in force; replaced on SIGHUP. Shards keep their own copy, updated
    /// by a [`ShardMsg::Reload`], so the message path never touches this lock.
    pub config: RwLock<Arc<Config>>,
    pub store: Store,
    pub writer: WriterHandle,
    pub jwt: RwLock<Arc<JwtVerifier>>,
    /// TLS configuration for new connections (None: plain `ws://`); replaced on SIGHUP.
    pub tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    pub inboxes: Vec<Inbox>,
    /// Public connections open (handshaking or upgraded), for the global cap.
    pub open_conns: AtomicUsize,
    pub draining: AtomicBool,
    /// Per-IP handshake token buckets. Global because one IP's connections land on every
    /// shard; touched once per HTTP request, never per message.
    pub ip_buckets: dashmap::DashMap<IpAddr, TokenBucket>,
    /// Shards whose listener is accepting.
    pub shards_accepting: AtomicUsize,
    /// Which driver each shard ended up on (true = io_uring).
    pub uring_shards: AtomicUsize,
}

impl Global {
    pub fn shard_count(&self) -> usize {
        self.inboxes.len()
    }

    /// The user's home shard.
    pub fn home_shard(&self, user: &str) -> usize {
        home_shard(user, self.inboxes.len())
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn jwt(&self) -> Arc<JwtVerifier> {
        self.jwt.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes one handshake token for `ip`; false means 429.
    pub fn allow_handshake(&self, ip: IpAddr, now: Instant, l: &crate::config::Limits) -> bool {
        let (rate, burst) = (l.handshakes_per_sec_per_ip, l.handshakes_burst_per_ip);
        let mut b = self.ip_buckets.entry(ip).or_insert_with(|| TokenBucket::new(burst, now));
        b.take(now, rate, burst)
    }

    /// Forgets IPs whose bucket has refilled (called periodically).
    pub fn prune_ip_buckets(&self, now: Instant, l: &crate::config::Limits) {
        let (rate, burst) = (l.handshakes_per_sec_per_ip, l.handshakes_burst_per_ip);
        self.ip_buckets.retain(|_, b| !b.is_full(now, rate, burst));
    }
}

/// The fixed, seeded hash that places users on shards.
pub fn home_shard(user: &str, shards: usize) -> usize {
    // SipHash with fixed keys: stable within a process, spreads adversarial ids.
    let mut h = std::hash::DefaultHasher::new();
    user.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// A token bucket refilled continuously. Rate and burst are passed on each use, so a
/// reloaded configuration applies to existing buckets at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, now: Instant) -> Self {
        TokenBucket { tokens: burst as f64, last: now }
    }

    pub fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f64).min(burst as f64);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant, rate: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * rate as f64 >= burst as f64
    }
}

/// The receiving end of a shard's inbox: the channel and the doorbell it awaits.
pub type InboxRx = (Receiver<ShardMsg>, Arc<AtomicWaker>);

/// Creates the channels: the senders go into [`Global`], each receiver to its shard.
pub fn channels(n: usize) -> (Vec<Inbox>, Vec<InboxRx>) {
    (0..n)
        .map(|_| {
            let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
            let bell = Arc::new(AtomicWaker::new());
            (Inbox { tx, bell: bell.clone() }, (rx, bell))
        })
        .unzip()
}

/// The CPUs this process may run on (`sched_getaffinity`), so systemd `AllowedCPUs=` and
/// container cpusets are respected.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) {
    // SAFETY: as above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin shard thread");
        }
    }
}

/// Whether this shard should run on io_uring.
pub fn want_uring(driver: Driver) -> bool {
    match driver {
        Driver::Uring => true,
        Driver::Legacy => false,
        Driver::Auto => monoio::utils::detect_uring(),
    }
}

/// Runs shard `idx` to completion on the calling thread.
pub fn run(
    idx: usize,
    global: Arc<Global>,
    listener: std::net::TcpListener,
    inbox: InboxRx,
) -> std::io::Result<()> {
    let driver = global.config().server.driver;
    if want_uring(driver) {
        let mut ring = io_uring::IoUring::builder();
        ring.setup_coop_taskrun().setup_single_issuer();
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .uring_builder(ring)
            .enable_timer()
            .build();
        match rt {
            Ok(mut rt) => {
                global.uring_shards.fetch_add(1, Ordering::Relaxed);
                tracing::info!(shard = idx, driver = "io_uring", "shard starting");
                return rt.block_on(local::shard_main(idx, global, listener, inbox));
            }
            Err(e) if driver == Driver::Auto => {
                tracing::warn!(shard = idx, error = %e, "io_uring refused, falling back to epoll");
            }
            Err(e) => return Err(e),
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build()?;
    tracing::info!(shard = idx, driver = "legacy", "shard starting");
    rt.block_on(local::shard_main(idx, global, listener, inbox))
}

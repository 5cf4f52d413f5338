//! The generator's engine: a few threads, each running a monoio runtime, each owning a slice
//! of the plan's connections (all of user `u`'s connections live on thread `u % threads`, so
//! a message's sender and recipients are always on the same thread).
//!
//! Every connection is two tasks over one socket: a reader that parses the relay's frames
//! and does the accounting, and a writer that sends what is due (pongs, close frames and,
//! while the run lasts, `send` frames within the window of unanswered ones). The coordinator
//! (the main thread) moves every thread through the phases with one atomic:
//! CONNECT → READY (everyone connected, idle) → RUN (traffic) → STOP (no new sends; answers
//! and deliveries drain) → CLOSE (close handshakes, then each thread returns its
//! [`ThreadResult`]).
//!
//! Invariants:
//! - Each message's `data` names its sender connection (`s`), its recipient connection (`r`,
//!   -1 for a broadcast), its sequence number within the (sender, recipient) stream (`q`,
//!   1, 2, 3, … with no gaps on the sending side) and its send time (`t`, ns since the
//!   engine's base instant, shared by all threads).
//! - A connection never has more than `window` sends without an `ack` or `error`; the id of a
//!   send is its per-connection number, so `id % window` names its slot. With
//!   `Traffic::window_on_delivery`, it also never has more than `window` sends' worth of
//!   deliveries outstanding (sent, not yet received by the generator, not answered `error`).
//! - Counters are thread-local cells, published to the coordinator's atomics every 10 ms.

use crate::auth::{self, MsgSigner};
use crate::plan::{Plan, Role};
use crate::wsproto::{self, Masker, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PH_CONNECT: u8 = 0;
pub const PH_READY: u8 = 1;
pub const PH_RUN: u8 = 2;
pub const PH_STOP: u8 = 3;
pub const PH_CLOSE: u8 = 4;

/// The `r` of a broadcast and the target of a broadcast stream.
pub const BROADCAST: u32 = u32::MAX;

/// Largest frame the generator accepts from the relay.
const MAX_FRAME: usize = 16 << 20;
/// Most frames one writer builds before writing them.
const MAX_BATCH: usize = 256;

/// What the connections send during RUN.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Agents send to their user's clients.
    pub agents_send: bool,
    /// Clients send to their user's agents.
    pub clients_send: bool,
    /// Agents broadcast (no `to`) instead of addressing each client in turn.
    pub broadcast: bool,
    /// Bytes of each message's `data` value.
    pub size: usize,
    /// Most sends per connection without an answer.
    pub window: usize,
    /// The window also counts sends until they are delivered (closed loop end to end), not
    /// only until the relay acks them (the relay acks once it has queued the message, so an
    /// ack-only window lets its outbound queues grow when it writes slower than it reads).
    pub window_on_delivery: bool,
    /// Sends per second per sending connection; 0 = as fast as the window allows.
    pub rate: f64,
}

#[derive(Debug, Clone)]
pub struct EngineCfg {
    pub addr: SocketAddr,
    pub threads: usize,
    pub uring: bool,
    /// Connection `i` binds to `sources[i % len]` before connecting.
    pub sources: Vec<Ipv4Addr>,
    /// Upgrades in progress at once, per thread.
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub traffic: Option<Traffic>,
    /// Initial read buffer per connection (it grows for large frames).
    pub read_buf: usize,
}

/// One thread's counters as the coordinator sees them.
#[repr(align(128))]
#[derive(Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub received: AtomicU64,
    /// Deliveries the acks announced (1 per unicast ack, the user's clients per broadcast).
    pub expected: AtomicU64,
    pub inflight: AtomicU64,
    pub dead: AtomicU64,
    pub live: AtomicU64,
    pub connect_done: AtomicBool,
    pub done: AtomicBool,
}

/// Sums of every thread's [`Counters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub connected: u64,
    pub failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub received: u64,
    pub expected: u64,
    pub inflight: u64,
    pub dead: u64,
    pub live: u64,
    pub threads_connected: usize,
}

pub struct Shared {
    pub cfg: EngineCfg,
    pub plan: Arc<Plan>,
    phase: AtomicU8,
    pub counters: Vec<Counters>,
    /// Each client connection's `session` (from its welcome); "" until connected.
    pub sessions: Mutex<Vec<String>>,
    /// Every timestamp in messages is ns since this instant.
    pub base: Instant,
    /// RUN started this many ns after `base` (0 = not yet).
    run_start_ns: AtomicU64,
    /// The worker threads' kernel ids (for per-thread CPU), by thread index.
    pub tids: Mutex<Vec<i32>>,
}

impl Shared {
    pub fn phase(&self) -> u8 {
        self.phase.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.counters {
            t.connected += c.connected.load(Relaxed);
            t.failed += c.failed.load(Relaxed);
            t.sent += c.sent.load(Relaxed);
            t.acked += c.acked.load(Relaxed);
            t.errors += c.errors.load(Relaxed);
            t.received += c.received.load(Relaxed);
            t.expected += c.expected.load(Relaxed);
            t.inflight += c.inflight.load(Relaxed);
            t.dead += c.dead.load(Relaxed);
            t.live += c.live.load(Relaxed);
            t.threads_connected += c.connect_done.load(Relaxed) as usize;
        }
        t
    }

    fn run_start(&self) -> Option<Duration> {
        match self.run_start_ns.load(Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

/// What one (sender, target) stream sent and how the relay answered.
#[derive(Debug, Clone)]
pub struct SendStreamOut {
    pub sender: u32,
    /// The recipient connection, or [`BROADCAST`].
    pub target: u32,
    /// Sequence numbers 1..=sent were sent.
    pub sent: u64,
    pub acked: u64,
    /// (seq, error code) for every send answered with `error`.
    pub errors: Vec<(u64, String)>,
    /// Sequence numbers that got neither `ack` nor `error`.
    pub unanswered: Vec<u64>,
}

/// What one receiver saw of one (sender, target) stream.
#[derive(Debug, Clone, Default)]
pub struct RecvStream {
    bits: Vec<u64>,
    pub max: u64,
    pub count: u64,
    pub dups: u64,
    pub out_of_order: u64,
}

impl RecvStream {
    /// Records `q`; returns (duplicate, out of order).
    fn record(&mut self, q: u64) -> (bool, bool) {
        let (w, b) = ((q / 64) as usize, q % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.dups += 1;
            return (true, false);
        }
        self.bits[w] |= 1 << b;
        self.count += 1;
        let ooo = q < self.max;
        if ooo {
            self.out_of_order += 1;
        }
        self.max = self.max.max(q);
        (false, ooo)
    }

    pub fn has(&self, q: u64) -> bool {
        self.bits.get((q / 64) as usize).is_some_and(|w| w & (1 << (q % 64)) != 0)
    }
}

/// Everything one worker thread observed.
pub struct ThreadResult {
    /// End-to-end latency in ns.
    pub hist: Histogram<u64>,
    pub send_streams: Vec<SendStreamOut>,
    /// (sender, target, receiver) → stream.
    pub recv_streams: HashMap<(u32, u32, u32), RecvStream>,
    /// `error` frames by code (with or without an id).
    pub error_codes: BTreeMap<String, u64>,
    /// Connections the relay closed (or that broke) before CLOSE, by reason.
    pub closes: BTreeMap<String, u64>,
    /// (connection, reason) for every connection that died before CLOSE.
    pub dead: Vec<(usize, String)>,
    pub connect_failures: BTreeMap<String, u64>,
    /// Frames received that are neither `message`, `ack` nor `error`, by type.
    pub other_frames: BTreeMap<String, u64>,
    pub wrong_user: u64,
    pub misdirected: u64,
    pub from_mismatch: u64,
    pub unparseable: u64,
    pub unexpected_answers: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Deliveries per second of RUN (index = whole seconds since RUN started).
    pub timeline_received: Vec<u64>,
    pub timeline_sent: Vec<u64>,
    /// Sends answered with `ack` per second of RUN (inbound frames the relay took).
    pub timeline_acked: Vec<u64>,
    /// End-to-end latency in µs of the deliveries of each second of RUN (2 significant digits).
    pub lat_per_sec: Vec<Histogram<u32>>,
    /// Time from TCP connect to `welcome` of every connection that opened, in µs.
    pub connect_hist: Histogram<u64>,
    /// Connections that got their `welcome` per 100 ms since the engine started.
    pub connect_timeline: Vec<u64>,
    pub connect_secs: f64,
    /// Connections that completed the closing handshake or were gone when CLOSE ended.
    pub closed_cleanly: u64,
    /// Every connection of this thread that got its `welcome`.
    pub connected: Vec<usize>,
}

/// A flag plus one waker: the writer sleeps on it, everyone else pokes it.
#[derive(Default)]
struct Notify {
    flag: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.replace(false) {
            Poll::Ready(())
        } else {
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }

    async fn notified(&self) {
        poll_fn(|cx| self.poll(cx)).await
    }

    /// Returns on a notification or after `d`, whichever comes first.
    async fn notified_or(&self, d: Duration) {
        let mut sleep = pin!(monoio::time::sleep(d));
        poll_fn(|cx| {
            if self.poll(cx).is_ready() {
                return Poll::Ready(());
            }
            sleep.as_mut().poll(cx)
        })
        .await
    }
}

struct SendTarget {
    target: u32,
    to: Option<String>,
    /// Deliveries one acked send stands for.
    recipients: u64,
    seq: u64,
    acked: u64,
    errors: Vec<(u64, String)>,
}

#[derive(Default)]
struct ConnSt {
    /// Control frames (pong, close) waiting for the writer.
    ctrl: Vec<u8>,
    /// The writer exits after writing `ctrl`.
    close_after_ctrl: bool,
    /// We sent the close frame (CLOSE phase).
    closing: bool,
    /// No more traffic: closed by the relay, EOF, or an I/O error.
    dead: bool,
    reader_done: bool,
    inflight: usize,
    /// `(id, target index, seq)` by `id % window`.
    slots: Vec<Option<(u64, u32, u64)>>,
    next_id: u64,
    ctr: u64,
    targets: Vec<SendTarget>,
    rr: usize,
    sent: u64,
    /// Deliveries of this connection's sends not yet seen (nor answered with `error`).
    undelivered: u64,
    /// Deliveries one send stands for (1, or the user's clients for a broadcast).
    per_send: u64,
    /// (sender, target) → what arrived here.
    recv: HashMap<(u32, u32), RecvStream>,
}

struct Conn {
    idx: usize,
    user: usize,
    agent: bool,
    /// `conn` (agents, bound into signatures) or `session` (clients), from the welcome.
    ident: String,
    signer: Option<MsgSigner>,
    notify: Notify,
    st: RefCell<ConnSt>,
}

#[derive(Default)]
struct Local {
    connected: Cell<u64>,
    failed: Cell<u64>,
    sent: Cell<u64>,
    acked: Cell<u64>,
    errors: Cell<u64>,
    received: Cell<u64>,
    expected: Cell<u64>,
    inflight: Cell<u64>,
    dead: Cell<u64>,
    live: Cell<u64>,
}

fn inc(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

struct Acc {
    hist: Histogram<u64>,
    error_codes: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    dead: Vec<(usize, String)>,
    connect_failures: BTreeMap<String, u64>,
    other_frames: BTreeMap<String, u64>,
    wrong_user: u64,
    misdirected: u64,
    from_mismatch: u64,
    unparseable: u64,
    unexpected_answers: u64,
    duplicates: u64,
    out_of_order: u64,
    timeline_received: Vec<u64>,
    timeline_sent: Vec<u64>,
    timeline_acked: Vec<u64>,
    lat_per_sec: Vec<Histogram<u32>>,
    connect_hist: Histogram<u64>,
    connect_timeline: Vec<u64>,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("histogram bounds"),
            error_codes: BTreeMap::new(),
            closes: BTreeMap::new(),
            dead: Vec::new(),
            connect_failures: BTreeMap::new(),
            other_frames: BTreeMap::new(),
            wrong_user: 0,
            misdirected: 0,
            from_mismatch: 0,
            unparseable: 0,
            unexpected_answers: 0,
            duplicates: 0,
            out_of_order: 0,
            timeline_received: Vec::new(),
            timeline_sent: Vec::new(),
            timeline_acked: Vec::new(),
            lat_per_sec: Vec::new(),
            connect_hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            connect_timeline: Vec::new(),
        }
    }
}

/// A per-second latency histogram: µs, 1 µs … 1 h, 2 significant digits (about 12 KiB).
pub fn sec_hist() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("histogram bounds")
}

/// Adds `n` to `v[i]`, growing `v` as needed.
fn bump_at(v: &mut Vec<u64>, i: usize, n: u64) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] += n;
}

struct ThreadCtx {
    t: usize,
    shared: Arc<Shared>,
    conns: RefCell<Vec<Rc<Conn>>>,
    /// This thread's connections by plan index (None elsewhere).
    by_idx: RefCell<Vec<Option<Rc<Conn>>>>,
    sessions: RefCell<Arc<Vec<String>>>,
    run_start: Cell<Option<Instant>>,
    stop: Cell<bool>,
    masker: RefCell<Masker>,
    local: Local,
    acc: RefCell<Acc>,
}

impl ThreadCtx {
    fn now_ns(&self) -> u64 {
        self.shared.base.elapsed().as_nanos() as u64
    }

    fn mask(&self) -> [u8; 4] {
        self.masker.borrow_mut().next()
    }

    fn publish(&self) {
        let c = &self.shared.counters[self.t];
        let l = &self.local;
        c.connected.store(l.connected.get(), Relaxed);
        c.failed.store(l.failed.get(), Relaxed);
        c.sent.store(l.sent.get(), Relaxed);
        c.acked.store(l.acked.get(), Relaxed);
        c.errors.store(l.errors.get(), Relaxed);
        c.received.store(l.received.get(), Relaxed);
        c.expected.store(l.expected.get(), Relaxed);
        c.inflight.store(l.inflight.get(), Relaxed);
        c.dead.store(l.dead.get(), Relaxed);
        c.live.store(l.live.get(), Relaxed);
    }

    fn second(&self) -> usize {
        self.run_start.get().map(|s| s.elapsed().as_secs() as usize).unwrap_or(0)
    }

    fn mark_dead(&self, conn: &Conn, st: &mut ConnSt, reason: String) {
        if st.dead {
            return;
        }
        st.dead = true;
        if !st.closing {
            inc(&self.local.dead, 1);
            let mut acc = self.acc.borrow_mut();
            *acc.closes.entry(reason.clone()).or_default() += 1;
            acc.dead.push((conn.idx, reason));
        }
    }
}

/// Starts the worker threads. The coordinator drives them with [`Engine::set_phase`].
pub struct Engine {
    pub shared: Arc<Shared>,
    handles: Vec<JoinHandle<ThreadResult>>,
}

impl Engine {
    pub fn start(cfg: EngineCfg, plan: Arc<Plan>) -> anyhow::Result<Engine> {
        let threads = cfg.threads.max(1);
        let shared = Arc::new(Shared {
            counters: (0..threads).map(|_| Counters::default()).collect(),
            sessions: Mutex::new(vec![String::new(); plan.conns.len()]),
            plan,
            cfg,
            phase: AtomicU8::new(PH_CONNECT),
            base: Instant::now(),
            run_start_ns: AtomicU64::new(0),
            tids: Mutex::new(vec![0; threads]),
        });
        let mut handles = Vec::new();
        for t in 0..threads {
            let sh = shared.clone();
            let h = std::thread::Builder::new().name(format!("loadgen-{t}")).spawn(move || {
                sh.tids.lock().unwrap()[t] = crate::sys::gettid();
                if sh.cfg.uring {
                    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(8192)
                        .enable_timer()
                        .build()
                        .expect("io_uring runtime (use --gen-driver legacy where io_uring is refused)");
                    rt.block_on(thread_main(t, sh))
                } else {
                    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .expect("epoll runtime");
                    rt.block_on(thread_main(t, sh))
                }
            })?;
            handles.push(h);
        }
        // The coordinator's CPU snapshots need every worker's kernel id.
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.tids.lock().unwrap().contains(&0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Engine { shared, handles })
    }

    pub fn set_phase(&self, p: u8) {
        if p == PH_RUN {
            let ns = self.shared.base.elapsed().as_nanos().max(1) as u64;
            self.shared.run_start_ns.store(ns, Relaxed);
        }
        self.shared.phase.store(p, std::sync::atomic::Ordering::Release);
    }

    pub fn totals(&self) -> Totals {
        self.shared.totals()
    }

    pub fn tids(&self) -> Vec<i32> {
        self.shared.tids.lock().unwrap().clone()
    }

    /// Whether a worker thread has ended (it only does after CLOSE, or by panicking).
    pub fn any_thread_finished(&self) -> bool {
        self.handles.iter().any(|h| h.is_finished())
    }

    /// Moves to CLOSE and collects every thread's result.
    pub fn finish(self) -> anyhow::Result<Vec<ThreadResult>> {
        self.set_phase(PH_CLOSE);
        self.handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a generator thread panicked")))
            .collect()
    }
}

async fn sleep_ms(ms: u64) {
    monoio::time::sleep(Duration::from_millis(ms)).await
}

async fn thread_main(t: usize, shared: Arc<Shared>) -> ThreadResult {
    let threads = shared.counters.len();
    let n = shared.plan.conns.len();
    let ctx = Rc::new(ThreadCtx {
        t,
        shared: shared.clone(),
        conns: RefCell::new(Vec::new()),
        by_idx: RefCell::new(vec![None; n]),
        sessions: RefCell::new(Arc::new(Vec::new())),
        run_start: Cell::new(None),
        stop: Cell::new(false),
        masker: RefCell::new(Masker::new(u64::from_ne_bytes(auth::random_bytes::<8>()))),
        local: Local::default(),
        acc: RefCell::new(Acc::new()),
    });

    // CONNECT: a few connector tasks pull from this thread's share of the plan.
    let started = Instant::now();
    let plan = &shared.plan;
    let mine: Rc<Vec<usize>> = Rc::new((0..n).filter(|&i| plan.conns[i].user % threads == t).collect());
    let next = Rc::new(Cell::new(0usize));
    let k = shared.cfg.connect_concurrency.clamp(1, mine.len().max(1));
    let handles: Vec<_> =
        (0..k).map(|_| monoio::spawn(connector(ctx.clone(), mine.clone(), next.clone()))).collect();
    for h in handles {
        h.await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    ctx.publish();
    shared.counters[t].connect_done.store(true, Relaxed);

    while shared.phase() < PH_RUN {
        ctx.publish();
        sleep_ms(10).await;
    }
    if shared.phase() == PH_RUN {
        let offset = shared.run_start().unwrap_or_default();
        ctx.run_start.set(Some(shared.base + offset));
        *ctx.sessions.borrow_mut() = Arc::new(shared.sessions.lock().unwrap().clone());
        if shared.cfg.traffic.is_some() {
            for c in ctx.conns.borrow().iter() {
                setup_targets(&ctx, c);
                c.notify.notify();
            }
        }
    }
    while shared.phase() < PH_STOP {
        ctx.publish();
        sleep_ms(10).await;
    }
    ctx.stop.set(true);
    while shared.phase() < PH_CLOSE {
        ctx.publish();
        sleep_ms(10).await;
    }

    // CLOSE: a close handshake on every live connection, bounded by 3 s.
    for c in ctx.conns.borrow().iter() {
        let mut st = c.st.borrow_mut();
        if !st.dead && !st.closing {
            st.closing = true;
            let m = ctx.mask();
            wsproto::push_close(&mut st.ctrl, 1000, m);
            st.close_after_ctrl = true;
            drop(st);
            c.notify.notify();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while ctx.local.live.get() > 0 && Instant::now() < deadline {
        sleep_ms(10).await;
    }
    ctx.publish();
    shared.counters[t].done.store(true, Relaxed);
    collect(&ctx, connect_secs)
}

fn collect(ctx: &ThreadCtx, connect_secs: f64) -> ThreadResult {
    let mut send_streams = Vec::new();
    let mut recv_streams = HashMap::new();
    let mut closed_cleanly = 0;
    let mut connected = Vec::new();
    for c in ctx.conns.borrow().iter() {
        connected.push(c.idx);
        let mut st = c.st.borrow_mut();
        if st.reader_done && st.closing {
            closed_cleanly += 1;
        }
        let mut unanswered: Vec<Vec<u64>> = vec![Vec::new(); st.targets.len()];
        for (_, tpos, seq) in st.slots.iter().flatten() {
            unanswered[*tpos as usize].push(*seq);
        }
        for (tg, mut un) in std::mem::take(&mut st.targets).into_iter().zip(unanswered) {
            un.sort_unstable();
            send_streams.push(SendStreamOut {
                sender: c.idx as u32,
                target: tg.target,
                sent: tg.seq,
                acked: tg.acked,
                errors: tg.errors,
                unanswered: un,
            });
        }
        for ((s, r), rs) in std::mem::take(&mut st.recv) {
            recv_streams.insert((s, r, c.idx as u32), rs);
        }
    }
    let acc = ctx.acc.replace(Acc::new());
    ThreadResult {
        hist: acc.hist,
        send_streams,
        recv_streams,
        error_codes: acc.error_codes,
        closes: acc.closes,
        dead: acc.dead,
        connect_failures: acc.connect_failures,
        other_frames: acc.other_frames,
        wrong_user: acc.wrong_user,
        misdirected: acc.misdirected,
        from_mismatch: acc.from_mismatch,
        unparseable: acc.unparseable,
        unexpected_answers: acc.unexpected_answers,
        duplicates: acc.duplicates,
        out_of_order: acc.out_of_order,
        timeline_received: acc.timeline_received,
        timeline_sent: acc.timeline_sent,
        timeline_acked: acc.timeline_acked,
        lat_per_sec: acc.lat_per_sec,
        connect_hist: acc.connect_hist,
        connect_timeline: acc.connect_timeline,
        connect_secs,
        closed_cleanly,
        connected,
    }
}

fn setup_targets(ctx: &ThreadCtx, c: &Conn) {
    let Some(tr) = &ctx.shared.cfg.traffic else { return };
    let plan = &ctx.shared.plan;
    let user = &plan.users[c.user];
    let sessions = ctx.sessions.borrow();
    let mut st = c.st.borrow_mut();
    let mut add = |target: u32, to: Option<String>, recipients: u64| {
        st.targets.push(SendTarget { target, to, recipients, seq: 0, acked: 0, errors: Vec::new() })
    };
    if c.agent && tr.agents_send && !user.clients.is_empty() {
        if tr.broadcast {
            add(BROADCAST, None, user.clients.len() as u64);
        } else {
            for &k in &user.clients {
                if !sessions[k].is_empty() {
                    add(k as u32, Some(sessions[k].clone()), 1);
                }
            }
        }
    }
    if !c.agent && tr.clients_send {
        for &a in &user.agents {
            if let Role::Agent { agent_id, .. } = &plan.conns[a].role {
                add(a as u32, Some(agent_id.clone()), 1);
            }
        }
    }
    st.per_send = st.targets.first().map(|t| t.recipients).unwrap_or(1).max(1);
}

/// Connects the next connection of this thread's share until none is left.
async fn connector(ctx: Rc<ThreadCtx>, mine: Rc<Vec<usize>>, next: Rc<Cell<usize>>) {
    loop {
        let i = next.get();
        if i >= mine.len() || ctx.shared.phase() >= PH_CLOSE {
            return;
        }
        next.set(i + 1);
        let idx = mine[i];
        let began = Instant::now();
        let r = monoio::time::timeout(ctx.shared.cfg.connect_timeout, open(&ctx, idx)).await;
        match r {
            Ok(Ok(opened)) => {
                let mut acc = ctx.acc.borrow_mut();
                let _ = acc.connect_hist.record((began.elapsed().as_micros() as u64).max(1));
                let slot = (ctx.shared.base.elapsed().as_millis() / 100) as usize;
                bump_at(&mut acc.connect_timeline, slot, 1);
                drop(acc);
                start_conn(&ctx, idx, opened)
            }
            Ok(Err(reason)) => {
                inc(&ctx.local.failed, 1);
                *ctx.acc.borrow_mut().connect_failures.entry(reason).or_default() += 1;
            }
            Err(_) => {
                inc(&ctx.local.failed, 1);
                *ctx.acc.borrow_mut().connect_failures.entry("timeout".into()).or_default() += 1;
            }
        }
        if i % 64 == 0 {
            ctx.publish();
        }
    }
}

struct Opened {
    stream: TcpStream,
    buf: Vec<u8>,
    ident: String,
}

fn io_reason(what: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{what}: errno {n} ({})", io::Error::from_raw_os_error(n).kind()),
        None => format!("{what}: {}", e.kind()),
    }
}

/// Non-blocking connect from `src` (port chosen at connect time, so many connections can
/// share one source address as long as their 4-tuples differ).
async fn tcp_connect(src: Ipv4Addr, dst: SocketAddr, uring: bool) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    let fd = sock.as_raw_fd();
    if !src.is_unspecified() {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::from((src, 0)).into())?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std_stream: std::net::TcpStream = sock.into();
    let stream = TcpStream::from_std(std_stream)?;
    stream.writable(false).await?;
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    if uring {
        // io_uring answers EAGAIN on O_NONBLOCK sockets instead of waiting; make it blocking.
        // SAFETY: fcntl on our own fd.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(stream)
}

/// Reads more bytes onto the end of `buf` (growing it when nearly full).
async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    mut buf: Vec<u8>,
    min_spare: usize,
) -> (io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare.max(buf.len()));
    }
    let len = buf.len();
    let (r, s) = rd.read(buf.slice_mut(len..)).await;
    (r, s.into_inner())
}

/// TCP connect, WebSocket upgrade with the role's credentials, and the `welcome` frame.
async fn open(ctx: &ThreadCtx, idx: usize) -> Result<Opened, String> {
    let cfg = &ctx.shared.cfg;
    let cp = &ctx.shared.plan.conns[idx];
    let src = cfg.sources[idx % cfg.sources.len()];
    let mut stream = tcp_connect(src, cfg.addr, cfg.uring).await.map_err(|e| io_reason("connect", &e))?;
    let _ = stream.set_nodelay(true);
    let key = auth::ws_key();
    let mut req = String::with_capacity(768);
    match &cp.role {
        Role::Agent { agent_id, key } => {
            req.push_str("GET /v1/agent HTTP/1.1\r\n");
            for (k, v) in auth::agent_upgrade_headers(agent_id, key) {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        Role::Client { token } => {
            req.push_str("GET /v1/client HTTP/1.1\r\n");
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
    }
    req.push_str(&format!(
        "Host: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        cfg.addr
    ));
    let (r, _) = stream.write_all(req.into_bytes()).await;
    r.map_err(|e| io_reason("write upgrade", &e))?;

    let mut buf = Vec::with_capacity(cfg.read_buf.max(1024));
    let head = loop {
        match wsproto::parse_response_head(&buf) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() > 16 << 10 => return Err("upgrade answer head too long".into()),
            Ok(None) => {}
            Err(e) => return Err(format!("bad upgrade answer: {e}")),
        }
        let (r, b) = read_more(&mut stream, buf, 1024).await;
        buf = b;
        match r {
            Ok(0) => return Err("eof during upgrade".into()),
            Ok(_) => {}
            Err(e) => return Err(io_reason("read upgrade", &e)),
        }
    };
    if head.status != 101 {
        // A refusal: read its JSON body (bounded) for the error code.
        let want = head.header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0).min(4096);
        while buf.len() < head.len + want {
            let (r, b) = read_more(&mut stream, buf, 1024).await;
            buf = b;
            if !matches!(r, Ok(n) if n > 0) {
                break;
            }
        }
        let body = &buf[head.len.min(buf.len())..(head.len + want).min(buf.len())];
        let code = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_default();
        return Err(format!("http {} {code}", head.status));
    }
    if head.header("sec-websocket-accept") != Some(auth::ws_accept(&key).as_str()) {
        return Err("bad Sec-WebSocket-Accept".into());
    }
    buf.drain(..head.len);
    let welcome = loop {
        match wsproto::parse_head(&buf, MAX_FRAME) {
            Ok(Some(h)) if h.opcode == OP_TEXT && h.fin => {
                let v: serde_json::Value = serde_json::from_slice(&buf[h.payload_at..h.total()])
                    .map_err(|_| "first frame is not JSON".to_string())?;
                buf.drain(..h.total());
                break v;
            }
            Ok(Some(h)) => return Err(format!("first frame has opcode {}", h.opcode)),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame: {e}")),
        }
        let (r, b) = read_more(&mut stream, buf, 1024).await;
        buf = b;
        match r {
            Ok(0) => return Err("eof before welcome".into()),
            Ok(_) => {}
            Err(e) => return Err(io_reason("read welcome", &e)),
        }
    };
    if welcome.get("type").and_then(|t| t.as_str()) != Some("welcome") {
        return Err("first frame is not a welcome".into());
    }
    let field = if cp.is_agent() { "conn" } else { "session" };
    let ident = welcome.get(field).and_then(|v| v.as_str()).unwrap_or("").to_string();
    if ident.is_empty() {
        return Err(format!("welcome without {field}"));
    }
    Ok(Opened { stream, buf, ident })
}

fn start_conn(ctx: &Rc<ThreadCtx>, idx: usize, o: Opened) {
    let cp = &ctx.shared.plan.conns[idx];
    let traffic = ctx.shared.cfg.traffic.as_ref();
    let signer = match (&cp.role, traffic) {
        (Role::Agent { key, .. }, Some(_)) => Some(MsgSigner::new(key)),
        _ => None,
    };
    if !cp.is_agent() {
        ctx.shared.sessions.lock().unwrap()[idx] = o.ident.clone();
    }
    let window = traffic.map(|t| t.window.max(1)).unwrap_or(0);
    let conn = Rc::new(Conn {
        idx,
        user: cp.user,
        agent: cp.is_agent(),
        ident: o.ident,
        signer,
        notify: Notify::default(),
        st: RefCell::new(ConnSt { slots: vec![None; window], ..ConnSt::default() }),
    });
    inc(&ctx.local.connected, 1);
    inc(&ctx.local.live, 1);
    ctx.conns.borrow_mut().push(conn.clone());
    ctx.by_idx.borrow_mut()[idx] = Some(conn.clone());
    let (rd, wr) = o.stream.into_split();
    monoio::spawn(reader(ctx.clone(), conn.clone(), rd, o.buf));
    monoio::spawn(writer(ctx.clone(), conn, wr));
}

async fn reader(ctx: Rc<ThreadCtx>, conn: Rc<Conn>, mut rd: OwnedReadHalf<TcpStream>, mut buf: Vec<u8>) {
    let min_spare = ctx.shared.cfg.read_buf.clamp(256, 64 << 10);
    'outer: loop {
        let mut pos = 0;
        loop {
            match wsproto::parse_head(&buf[pos..], MAX_FRAME) {
                Ok(Some(h)) => {
                    let payload = &buf[pos + h.payload_at..pos + h.total()];
                    let finished = handle_frame(&ctx, &conn, h.opcode, h.fin, payload);
                    pos += h.total();
                    if finished {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let mut st = conn.st.borrow_mut();
                    ctx.mark_dead(&conn, &mut st, format!("protocol: {e}"));
                    break 'outer;
                }
            }
        }
        if pos > 0 {
            buf.drain(..pos);
        }
        let (r, b) = read_more(&mut rd, buf, min_spare).await;
        buf = b;
        let reason = match r {
            Ok(0) => "eof without close".to_string(),
            Ok(_) => continue,
            Err(e) => io_reason("read", &e),
        };
        let mut st = conn.st.borrow_mut();
        ctx.mark_dead(&conn, &mut st, reason);
        break;
    }
    {
        let mut st = conn.st.borrow_mut();
        st.reader_done = true;
        st.dead = true;
    }
    conn.notify.notify();
    ctx.local.live.set(ctx.local.live.get() - 1);
}

/// Handles one frame; true when the connection is finished.
fn handle_frame(ctx: &ThreadCtx, conn: &Conn, opcode: u8, fin: bool, payload: &[u8]) -> bool {
    match opcode {
        OP_TEXT if fin => {
            handle_text(ctx, conn, payload);
            false
        }
        OP_PING => {
            let m = ctx.mask();
            wsproto::push_frame(&mut conn.st.borrow_mut().ctrl, OP_PONG, payload, m);
            conn.notify.notify();
            false
        }
        OP_PONG => false,
        OP_CLOSE => {
            let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
            let mut st = conn.st.borrow_mut();
            if !st.closing {
                ctx.mark_dead(conn, &mut st, format!("close {code}"));
                // Answer the relay's close, then the writer ends.
                let m = ctx.mask();
                wsproto::push_close(&mut st.ctrl, if code == 1005 { 1000 } else { code }, m);
                st.close_after_ctrl = true;
                drop(st);
                conn.notify.notify();
            }
            true
        }
        OP_BINARY | OP_CONT | OP_TEXT => {
            let mut st = conn.st.borrow_mut();
            ctx.mark_dead(conn, &mut st, format!("unexpected frame opcode {opcode} fin {fin}"));
            true
        }
        _ => {
            let mut st = conn.st.borrow_mut();
            ctx.mark_dead(conn, &mut st, format!("unknown opcode {opcode}"));
            true
        }
    }
}

#[derive(serde::Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    from: Option<&'a str>,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    id: Option<&'a str>,
    #[serde(default)]
    code: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct Payload {
    s: u64,
    r: i64,
    q: u64,
    t: u64,
}

fn handle_text(ctx: &ThreadCtx, conn: &Conn, payload: &[u8]) {
    let f: InFrame<'_> = match serde_json::from_slice(payload) {
        Ok(f) => f,
        Err(_) => {
            // Escaped strings cannot be borrowed; such frames are rare (error messages have
            // their own field, not parsed here). Fall back to a full parse for the type.
            let ty = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| "<not json>".into());
            *ctx.acc.borrow_mut().other_frames.entry(format!("unparsed {ty}")).or_default() += 1;
            return;
        }
    };
    match f.ty {
        "message" => handle_message(ctx, conn, f.from.unwrap_or(""), f.data),
        "ack" => answer(ctx, conn, f.id, None),
        "error" => {
            let code = f.code.unwrap_or("<no code>");
            inc(&ctx.local.errors, 1);
            *ctx.acc.borrow_mut().error_codes.entry(code.to_string()).or_default() += 1;
            if f.id.is_some() {
                answer(ctx, conn, f.id, Some(code));
            }
        }
        other => *ctx.acc.borrow_mut().other_frames.entry(other.to_string()).or_default() += 1,
    }
}

/// An `ack` (code None) or `error` for the send with this id.
fn answer(ctx: &ThreadCtx, conn: &Conn, id: Option<&str>, code: Option<&str>) {
    let mut st = conn.st.borrow_mut();
    let id = id.and_then(|s| s.parse::<u64>().ok());
    let window = st.slots.len() as u64;
    let slot = match id {
        Some(id) if window > 0 => match st.slots[(id % window) as usize] {
            Some((sid, tpos, seq)) if sid == id => Some((id, tpos, seq)),
            _ => None,
        },
        _ => None,
    };
    let Some((id, tpos, seq)) = slot else {
        ctx.acc.borrow_mut().unexpected_answers += 1;
        return;
    };
    st.slots[(id % window) as usize] = None;
    st.inflight -= 1;
    ctx.local.inflight.set(ctx.local.inflight.get() - 1);
    let tg = &mut st.targets[tpos as usize];
    match code {
        None => {
            tg.acked += 1;
            inc(&ctx.local.acked, 1);
            inc(&ctx.local.expected, tg.recipients);
            bump_at(&mut ctx.acc.borrow_mut().timeline_acked, ctx.second(), 1);
        }
        Some(code) => {
            let r = tg.recipients;
            tg.errors.push((seq, code.to_string()));
            st.undelivered = st.undelivered.saturating_sub(r);
        }
    }
    drop(st);
    conn.notify.notify();
}

fn handle_message(ctx: &ThreadCtx, conn: &Conn, from: &str, data: Option<&serde_json::value::RawValue>) {
    let now = ctx.now_ns();
    let plan = &ctx.shared.plan;
    let p = data.and_then(|d| serde_json::from_str::<Payload>(d.get()).ok());
    let mut acc = ctx.acc.borrow_mut();
    let Some(p) = p.filter(|p| (p.s as usize) < plan.conns.len() && p.r >= -1) else {
        acc.unparseable += 1;
        return;
    };
    let sender = &plan.conns[p.s as usize];
    if sender.user != conn.user {
        acc.wrong_user += 1;
        return;
    }
    let here = if p.r == -1 { sender.is_agent() && !conn.agent } else { p.r as usize == conn.idx };
    if !here {
        acc.misdirected += 1;
        return;
    }
    let from_ok = match &sender.role {
        Role::Agent { agent_id, .. } => from == agent_id,
        Role::Client { .. } => {
            let known = |ctx: &ThreadCtx| ctx.sessions.borrow().get(p.s as usize).is_some_and(|s| s == from);
            // This thread's copy of the sessions may predate the sender's connect (another
            // thread can start sending before this one has looked at the phase): refresh once.
            known(ctx) || {
                *ctx.sessions.borrow_mut() = Arc::new(ctx.shared.sessions.lock().unwrap().clone());
                known(ctx)
            }
        }
    };
    if !from_ok {
        acc.from_mismatch += 1;
    }
    let target = if p.r == -1 { BROADCAST } else { p.r as u32 };
    let (dup, ooo) = conn.st.borrow_mut().recv.entry((p.s as u32, target)).or_default().record(p.q);
    if dup {
        acc.duplicates += 1;
        return;
    }
    if ooo {
        acc.out_of_order += 1;
    }
    let lat = now.saturating_sub(p.t).max(1);
    let _ = acc.hist.record(lat);
    let sec = ctx.second();
    while acc.lat_per_sec.len() <= sec {
        acc.lat_per_sec.push(sec_hist());
    }
    acc.lat_per_sec[sec].saturating_record((lat / 1000).max(1));
    if let Some(s) = ctx.by_idx.borrow().get(p.s as usize).and_then(Option::as_ref) {
        let mut st = s.st.borrow_mut();
        st.undelivered = st.undelivered.saturating_sub(1);
        drop(st);
        s.notify.notify();
    }
    inc(&ctx.local.received, 1);
    bump_at(&mut acc.timeline_received, sec, 1);
}

/// A connection's offset within the sending interval, in [0, 1): the fractional parts of
/// multiples of the golden ratio, so any number of connections is spread evenly.
fn rate_phase(idx: usize) -> f64 {
    (idx as f64 * 0.618_033_988_749_894_9).fract()
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut b = [0u8; 20];
    out.extend_from_slice(fmt_u64(&mut b, n));
}

fn fmt_u64(b: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = b.len();
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &b[i..];
        }
    }
}

struct Scratch {
    data: Vec<u8>,
    frame: Vec<u8>,
}

/// Builds one signed (agents) or plain (clients) `send` frame onto `out`.
fn build_send(
    ctx: &ThreadCtx,
    conn: &Conn,
    st: &mut ConnSt,
    size: usize,
    out: &mut Vec<u8>,
    sc: &mut Scratch,
) {
    let tpos = st.rr % st.targets.len();
    st.rr = st.rr.wrapping_add(1);
    let id = st.next_id;
    st.next_id += 1;
    let window = st.slots.len() as u64;
    st.targets[tpos].seq += 1;
    let seq = st.targets[tpos].seq;
    st.slots[(id % window) as usize] = Some((id, tpos as u32, seq));
    st.inflight += 1;
    st.sent += 1;
    st.undelivered += st.targets[tpos].recipients;
    let tg = &st.targets[tpos];

    let d = &mut sc.data;
    d.clear();
    d.extend_from_slice(br#"{"s":"#);
    push_u64(d, conn.idx as u64);
    d.extend_from_slice(br#","r":"#);
    if tg.target == BROADCAST {
        d.extend_from_slice(b"-1");
    } else {
        push_u64(d, tg.target as u64);
    }
    d.extend_from_slice(br#","q":"#);
    push_u64(d, seq);
    d.extend_from_slice(br#","t":"#);
    push_u64(d, ctx.now_ns());
    d.extend_from_slice(br#","p":""#);
    let pad = size.saturating_sub(d.len() + 2);
    d.resize(d.len() + pad, b'x');
    d.extend_from_slice(b"\"}");

    let f = &mut sc.frame;
    f.clear();
    f.extend_from_slice(br#"{"type":"send""#);
    if let Some(to) = &tg.to {
        f.extend_from_slice(br#","to":""#);
        f.extend_from_slice(to.as_bytes());
        f.push(b'"');
    }
    f.extend_from_slice(br#","data":"#);
    f.extend_from_slice(d);
    f.extend_from_slice(br#","id":""#);
    push_u64(f, id);
    f.push(b'"');
    if let Some(signer) = &conn.signer {
        let to = tg.to.as_deref().unwrap_or("");
        st.ctr += 1;
        let mut cb = [0u8; 20];
        let ctr = fmt_u64(&mut cb, st.ctr);
        f.extend_from_slice(br#","ctr":"#);
        f.extend_from_slice(ctr);
        f.extend_from_slice(br#","sig":""#);
        signer.push_sig(f, &conn.ident, ctr, to, d);
        f.push(b'"');
    }
    f.push(b'}');
    wsproto::push_frame(out, OP_TEXT, f, ctx.mask());
}

async fn writer(ctx: Rc<ThreadCtx>, conn: Rc<Conn>, mut wr: OwnedWriteHalf<TcpStream>) {
    let traffic = ctx.shared.cfg.traffic.clone();
    let mut out: Vec<u8> = Vec::new();
    let mut sc = Scratch { data: Vec::new(), frame: Vec::new() };
    loop {
        let mut wait: Option<Duration> = None;
        let mut finish = false;
        let mut n_sent = 0u64;
        {
            let mut st = conn.st.borrow_mut();
            out.clear();
            out.extend_from_slice(&st.ctrl);
            st.ctrl.clear();
            if st.close_after_ctrl {
                finish = true;
            } else if st.dead {
                return;
            } else if let (Some(tr), Some(start)) = (&traffic, ctx.run_start.get()) {
                if !ctx.stop.get() && !st.targets.is_empty() {
                    let mut room = st.slots.len() - st.inflight;
                    if tr.window_on_delivery {
                        let cap = st.slots.len() as u64 * st.per_send;
                        room = room.min((cap.saturating_sub(st.undelivered) / st.per_send) as usize);
                    }
                    let mut n = room.min(MAX_BATCH);
                    if tr.rate > 0.0 && room > 0 {
                        // Send k (0, 1, 2, …) is due at (phase + k) / rate: each connection
                        // has its own phase, so the senders are spread over the interval
                        // instead of all firing at once (synchronised senders would measure
                        // the relay's burst queueing, not its latency).
                        let phase = rate_phase(conn.idx);
                        let ticks = start.elapsed().as_secs_f64() * tr.rate - phase;
                        let due = if ticks < 0.0 { 0 } else { (ticks as u64 + 1).saturating_sub(st.sent) };
                        n = n.min(due as usize);
                        if n == 0 {
                            let wait_ticks = (st.sent as f64 - ticks).max(0.0);
                            wait = Some(Duration::from_secs_f64((wait_ticks / tr.rate).max(0.0002)));
                        }
                    }
                    for _ in 0..n {
                        build_send(&ctx, &conn, &mut st, tr.size, &mut out, &mut sc);
                    }
                    n_sent = n as u64;
                }
            }
        }
        if n_sent > 0 {
            inc(&ctx.local.sent, n_sent);
            inc(&ctx.local.inflight, n_sent);
            bump_at(&mut ctx.acc.borrow_mut().timeline_sent, ctx.second(), n_sent);
        }
        if !out.is_empty() {
            let (r, b) = wr.write_all(std::mem::take(&mut out)).await;
            out = b;
            if let Err(e) = r {
                let mut st = conn.st.borrow_mut();
                ctx.mark_dead(&conn, &mut st, io_reason("write", &e));
                return;
            }
            if finish {
                return;
            }
            continue;
        }
        if finish {
            return;
        }
        match wait {
            Some(d) => conn.notify.notified_or(d).await,
            None => conn.notify.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_stream_counts_duplicates_and_reordering() {
        let mut r = RecvStream::default();
        assert_eq!(r.record(1), (false, false));
        assert_eq!(r.record(3), (false, false));
        assert_eq!(r.record(2), (false, true));
        assert_eq!(r.record(3), (true, false));
        assert_eq!(r.record(200), (false, false));
        assert!(r.has(1) && r.has(2) && r.has(200) && !r.has(4) && !r.has(100_000));
        assert_eq!((r.count, r.dups, r.out_of_order, r.max), (4, 1, 1, 200));
    }

    #[test]
    fn rate_phases_spread_the_senders() {
        // 1,000 connections: every tenth of the interval holds about a tenth of them.
        let mut bins = [0u32; 10];
        for i in 0..1000 {
            let p = rate_phase(i);
            assert!((0.0..1.0).contains(&p));
            bins[(p * 10.0) as usize] += 1;
        }
        assert!(bins.iter().all(|&b| (90..=110).contains(&b)), "{bins:?}");
    }

    #[test]
    fn decimal_formatting() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut v = Vec::new();
            push_u64(&mut v, n);
            assert_eq!(v, n.to_string().into_bytes());
        }
    }
}

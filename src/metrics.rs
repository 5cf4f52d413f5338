//! Metric names and the events that record them. Each observable event has one function here
//! that is the only place its metric is named. Labels are bounded (role, reason, code,
//! direction, shard, status) and never carry a user, agent, session or address.
//!
//! The message path never touches a shared atomic: each shard counts frames, bytes and relay
//! latency in plain `Cell`s ([`ShardStats`]) and its sweeper publishes the deltas every
//! second through handles cached per shard ([`ShardMetrics`]). Rare events (connections,
//! refusals, drops) record directly.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use std::cell::Cell;
use std::time::{Duration, Instant};

pub const CONNECTIONS_ACCEPTED: &str = "switchboard_connections_accepted_total";
pub const CONNECTIONS_OPENED: &str = "switchboard_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "switchboard_connections_closed_total";
pub const CONNECTIONS_LIVE: &str = "switchboard_connections";
pub const HANDSHAKES_REFUSED: &str = "switchboard_handshakes_refused_total";
pub const HANDSHAKE_TIMEOUTS: &str = "switchboard_handshake_timeouts_total";
pub const HANDSHAKE_SECONDS: &str = "switchboard_handshake_duration_seconds";
pub const HANDOFFS: &str = "switchboard_shard_handoffs_total";
pub const INBOX_DEPTH: &str = "switchboard_shard_inbox_depth";
pub const MESSAGES_RELAYED: &str = "switchboard_messages_relayed_total";
pub const DELIVERIES: &str = "switchboard_deliveries_total";
pub const MESSAGES_DROPPED: &str = "switchboard_messages_dropped_total";
pub const FRAMES: &str = "switchboard_frames_total";
pub const BYTES: &str = "switchboard_bytes_total";
pub const RELAY_SECONDS: &str = "switchboard_relay_latency_seconds";
pub const OUTBOUND_BYTES: &str = "switchboard_outbound_queue_bytes";
pub const STORE_COMMITS: &str = "switchboard_store_commits_total";
pub const STORE_OPS: &str = "switchboard_store_ops_total";
pub const STORE_COMMIT_ERRORS: &str = "switchboard_store_commit_errors_total";
pub const STORE_OPS_DROPPED: &str = "switchboard_store_ops_dropped_total";
pub const STORE_LAST_COMMIT_SECONDS: &str = "switchboard_store_last_commit_seconds";
pub const STORE_LAST_BATCH: &str = "switchboard_store_last_batch_size";
pub const STREAMS: &str = "switchboard_streams";
pub const HISTORY_MESSAGES: &str = "switchboard_history_messages";
pub const HISTORY_BYTES: &str = "switchboard_history_bytes";
pub const HISTORY_TRIMMED: &str = "switchboard_history_trimmed_total";
pub const STREAM_ROTATIONS: &str = "switchboard_stream_rotations_total";
pub const RESUMES: &str = "switchboard_resumes_total";
pub const REPLAYED: &str = "switchboard_replayed_messages_total";
pub const QUEUED_FOR_SESSION: &str = "switchboard_session_queued_total";
pub const MAILBOX_MESSAGES: &str = "switchboard_mailbox_messages";
pub const MAILBOX_BYTES: &str = "switchboard_mailbox_bytes";
pub const MAILBOX_QUEUED: &str = "switchboard_mailbox_queued_total";
pub const MAILBOX_DELIVERED: &str = "switchboard_mailbox_deliveries_total";
pub const MAILBOX_EXPIRED: &str = "switchboard_mailbox_expired_total";
pub const BUILD_INFO: &str = "switchboard_build_info";
pub const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
pub const OPEN_FDS: &str = "process_open_fds";
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";

/// Histogram buckets (seconds) for relay latency and handshake duration.
const LATENCY_BUCKETS: [f64; 14] =
    [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.1, 1.0];

/// Counts kept by one shard's thread in plain cells; published by [`ShardMetrics::publish`].
#[derive(Default)]
pub struct ShardStats {
    pub frames_in: Cell<u64>,
    pub frames_out: Cell<u64>,
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    /// Inbound `send` frames relayed (one per frame, however many recipients).
    pub relayed: Cell<u64>,
    /// Frames queued to recipients by relayed sends (a broadcast to ten is ten).
    pub deliveries: Cell<u64>,
    /// Bytes queued on this shard's connections and not yet written.
    pub outbound_bytes: Cell<i64>,
    /// Relay latency counts by bucket index of [`LATENCY_BUCKETS`] (last = overflow).
    latency: [Cell<u32>; LATENCY_BUCKETS.len() + 1],
    // Spec §8, gauges (current totals on this shard) then counters.
    pub streams: Cell<i64>,
    pub history_entries: Cell<i64>,
    pub history_bytes: Cell<i64>,
    pub mailbox_entries: Cell<i64>,
    pub mailbox_bytes: Cell<i64>,
    pub history_trimmed: Cell<u64>,
    pub replayed: Cell<u64>,
    pub resumed_ok: Cell<u64>,
    pub resumed_lost: Cell<u64>,
    pub queued_for_session: Cell<u64>,
    pub mail_queued: Cell<u64>,
    pub mail_delivered: Cell<u64>,
    pub mail_redelivered: Cell<u64>,
    pub mail_expired: Cell<u64>,
}

impl ShardStats {
    #[inline]
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }

    /// One relayed frame: read at `read_at`, queued for every recipient now.
    #[inline]
    pub fn relayed(&self, read_at: Instant, deliveries: u64) {
        Self::add(&self.relayed, 1);
        Self::add(&self.deliveries, deliveries);
        let secs = read_at.elapsed().as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].set(self.latency[i].get().saturating_add(1));
    }
}

/// One shard's cached metric handles (labelled with the shard index).
pub struct ShardMetrics {
    frames_in: Counter,
    frames_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    relayed: Counter,
    deliveries: Counter,
    outbound: Gauge,
    inbox_depth: Gauge,
    latency: Histogram,
    streams: Gauge,
    history_entries: Gauge,
    history_bytes: Gauge,
    mailbox_entries: Gauge,
    mailbox_bytes: Gauge,
    history_trimmed: Counter,
    replayed: Counter,
    resumed_ok: Counter,
    resumed_lost: Counter,
    queued_for_session: Counter,
    mail_queued: Counter,
    mail_delivered: Counter,
    mail_redelivered: Counter,
    mail_expired: Counter,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        let s = shard.to_string();
        ShardMetrics {
            frames_in: counter!(FRAMES, "direction" => "in", "shard" => s.clone()),
            frames_out: counter!(FRAMES, "direction" => "out", "shard" => s.clone()),
            bytes_in: counter!(BYTES, "direction" => "in", "shard" => s.clone()),
            bytes_out: counter!(BYTES, "direction" => "out", "shard" => s.clone()),
            relayed: counter!(MESSAGES_RELAYED, "shard" => s.clone()),
            deliveries: counter!(DELIVERIES, "shard" => s.clone()),
            outbound: gauge!(OUTBOUND_BYTES, "shard" => s.clone()),
            inbox_depth: gauge!(INBOX_DEPTH, "shard" => s.clone()),
            latency: histogram!(RELAY_SECONDS, "shard" => s.clone()),
            streams: gauge!(STREAMS, "shard" => s.clone()),
            history_entries: gauge!(HISTORY_MESSAGES, "shard" => s.clone()),
            history_bytes: gauge!(HISTORY_BYTES, "shard" => s.clone()),
            mailbox_entries: gauge!(MAILBOX_MESSAGES, "shard" => s.clone()),
            mailbox_bytes: gauge!(MAILBOX_BYTES, "shard" => s.clone()),
            history_trimmed: counter!(HISTORY_TRIMMED, "shard" => s.clone()),
            replayed: counter!(REPLAYED, "shard" => s.clone()),
            resumed_ok: counter!(RESUMES, "recovered" => "true", "shard" => s.clone()),
            resumed_lost: counter!(RESUMES, "recovered" => "false", "shard" => s.clone()),
            queued_for_session: counter!(QUEUED_FOR_SESSION, "shard" => s.clone()),
            mail_queued: counter!(MAILBOX_QUEUED, "shard" => s.clone()),
            mail_delivered: counter!(MAILBOX_DELIVERED, "kind" => "first", "shard" => s.clone()),
            mail_redelivered: counter!(MAILBOX_DELIVERED, "kind" => "redelivery", "shard" => s.clone()),
            mail_expired: counter!(MAILBOX_EXPIRED, "shard" => s),
        }
    }

    /// Moves the shard's counts into the exporter.
    pub fn publish(&self, s: &ShardStats, inbox_depth: usize) {
        let take = |c: &Cell<u64>| c.replace(0);
        self.frames_in.increment(take(&s.frames_in));
        self.frames_out.increment(take(&s.frames_out));
        self.bytes_in.increment(take(&s.bytes_in));
        self.bytes_out.increment(take(&s.bytes_out));
        self.relayed.increment(take(&s.relayed));
        self.deliveries.increment(take(&s.deliveries));
        self.outbound.set(s.outbound_bytes.get() as f64);
        self.streams.set(s.streams.get() as f64);
        self.history_entries.set(s.history_entries.get() as f64);
        self.history_bytes.set(s.history_bytes.get() as f64);
        self.mailbox_entries.set(s.mailbox_entries.get() as f64);
        self.mailbox_bytes.set(s.mailbox_bytes.get() as f64);
        self.history_trimmed.increment(take(&s.history_trimmed));
        self.replayed.increment(take(&s.replayed));
        self.resumed_ok.increment(take(&s.resumed_ok));
        self.resumed_lost.increment(take(&s.resumed_lost));
        self.queued_for_session.increment(take(&s.queued_for_session));
        self.mail_queued.increment(take(&s.mail_queued));
        self.mail_delivered.increment(take(&s.mail_delivered));
        self.mail_redelivered.increment(take(&s.mail_redelivered));
        self.mail_expired.increment(take(&s.mail_expired));
        self.inbox_depth.set(inbox_depth as f64);
        for (i, c) in s.latency.iter().enumerate() {
            let n = c.replace(0);
            if n > 0 {
                let v = LATENCY_BUCKETS.get(i).copied().unwrap_or(2.0);
                self.latency.record_many(v, n as usize);
            }
        }
    }
}

pub fn accepted(_shard: usize) {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

pub fn handoff(shard: usize) {
    counter!(HANDOFFS, "shard" => shard.to_string()).increment(1);
}

pub fn handshake_timeout() {
    counter!(HANDSHAKE_TIMEOUTS).increment(1);
}

pub fn refused(refusal: crate::http::Refusal, reason: &'static str) {
    counter!(HANDSHAKES_REFUSED, "status" => refusal.status().to_string(), "reason" => reason).increment(1);
}

pub fn handshake_done(took: Duration) {
    histogram!(HANDSHAKE_SECONDS).record(took.as_secs_f64());
}

pub fn conn_opened(role: &'static str) {
    counter!(CONNECTIONS_OPENED, "role" => role).increment(1);
    gauge!(CONNECTIONS_LIVE, "role" => role).increment(1.0);
}

pub fn conn_closed(role: &'static str, code: u16) {
    counter!(CONNECTIONS_CLOSED, "role" => role, "code" => code.to_string()).increment(1);
    gauge!(CONNECTIONS_LIVE, "role" => role).decrement(1.0);
}

/// A message that was not relayed, by reason: rate, offline, not_allowed, bad_signature,
/// bad_frame, slow_consumer.
pub fn dropped(reason: &'static str) {
    counter!(MESSAGES_DROPPED, "reason" => reason).increment(1);
}

/// A stream started a new epoch, its history lost: `crash` (found dirty at load), `store`
/// (the writer could not take its lease), `config` (history turned off).
pub fn stream_rotated(reason: &'static str) {
    counter!(STREAM_ROTATIONS, "reason" => reason).increment(1);
}

/// Installs the Prometheus recorder (no HTTP server of its own: the admin listener serves
/// its rendering).
pub fn install() -> metrics_exporter_prometheus::PrometheusHandle {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)
        .expect("non-empty buckets")
        .install_recorder()
        .expect("metrics recorder installed once")
}

/// Version and the I/O driver the shards run on.
pub fn build_info(driver: &'static str) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "driver" => driver).set(1.0);
}

/// Values read at scrape time: the store writer's statistics and the process's resources.
pub fn record_scrape(writer: &crate::store::WriterStats) {
    counter!(STORE_COMMITS).absolute(writer.batches);
    counter!(STORE_OPS).absolute(writer.ops);
    counter!(STORE_COMMIT_ERRORS).absolute(writer.commit_errors);
    counter!(STORE_OPS_DROPPED).absolute(writer.dropped);
    gauge!(STORE_LAST_COMMIT_SECONDS).set(writer.last_commit_micros as f64 / 1e6);
    gauge!(STORE_LAST_BATCH).set(writer.last_batch_size as f64);
    if let Some(rss) = proc_status_kib("VmRSS:") {
        gauge!(RESIDENT_BYTES).set((rss * 1024) as f64);
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        gauge!(OPEN_FDS).set(d.count() as f64);
    }
    if let Some(cpu) = proc_cpu_seconds() {
        // A float that only grows; the `metrics` facade has no float counter, so it is
        // exported as a gauge under the conventional counter name.
        gauge!(CPU_SECONDS).set(cpu);
    }
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

fn proc_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

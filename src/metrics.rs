//! Metric names and the events that record them. Each observable event has one function here
//! that is the only place its metric is named. Labels are bounded (role, reason, code, shard)
//! and never carry a user, agent, session or address.
//!
//! Hot-path counters use handles cached per thread (a registry lookup costs ~60 ns, a cached
//! handle ~6 ns).

use metrics::{counter, gauge, histogram, Counter};
use std::time::{Duration, Instant};

pub const CONNECTIONS_ACCEPTED: &str = "switchboard_connections_accepted_total";
pub const CONNECTIONS_OPENED: &str = "switchboard_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "switchboard_connections_closed_total";
pub const CONNECTIONS_LIVE: &str = "switchboard_connections";
pub const HANDSHAKES_REFUSED: &str = "switchboard_handshakes_refused_total";
pub const HANDSHAKE_TIMEOUTS: &str = "switchboard_handshake_timeouts_total";
pub const HANDSHAKE_SECONDS: &str = "switchboard_handshake_duration_seconds";
pub const HANDOFFS: &str = "switchboard_shard_handoffs_total";
pub const MESSAGES_RELAYED: &str = "switchboard_messages_relayed_total";
pub const MESSAGES_DROPPED: &str = "switchboard_messages_dropped_total";

thread_local! {
    static RELAYED: Counter = counter!(MESSAGES_RELAYED);
}

pub fn accepted(_shard: usize) {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

pub fn handoff(_shard: usize) {
    counter!(HANDOFFS).increment(1);
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

/// One inbound `send` relayed (per frame, not per recipient).
#[inline]
pub fn relayed(_shard: usize, _now: Instant) {
    RELAYED.with(|c| c.increment(1));
}

/// Installs the Prometheus recorder (no HTTP server of its own: the admin listener serves
/// its rendering).
pub fn install() -> metrics_exporter_prometheus::PrometheusHandle {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("metrics recorder installed once");
    gauge!("switchboard_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle
}

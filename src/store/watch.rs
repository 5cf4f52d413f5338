//! The revocation watch: how the running daemon learns that `switchboard agent revoke` (another
//! process) revoked an agent, so it can close that agent's connection with 4003.
//!
//! Must stay true:
//! - Cheap when nothing changes: one read transaction and one `meta` get per interval.
//! - The generation and the revoked set are read from one snapshot, so a revocation committed
//!   after start-up is reported exactly once, and none committed before start-up is reported.
//! - A panicking callback is logged and does not stop the watch.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{AgentRecord, Store};

/// Longest single sleep, so `stop` is noticed promptly whatever the interval.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Start a thread that every `interval` checks the store's change generation and, when it moved,
/// calls `on_revoked` once for each agent revoked since the watch started. Agents already revoked
/// at start are remembered silently (their upgrades are refused by the record itself). Returns
/// when `stop` is set. Use an interval well under the 2 s the spec allows (e.g. 250 ms).
///
/// # Panics
/// If the OS refuses to create a thread.
pub fn spawn_revocation_watcher(
    store: Store,
    interval: Duration,
    on_revoked: impl Fn(&AgentRecord) + Send + 'static,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("sb-revoke-watch".into())
        .spawn(move || watch(&store, interval, &on_revoked, &stop))
        .expect("spawning the revocation watcher thread")
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(STOP_POLL));
    }
}

fn watch(store: &Store, interval: Duration, on_revoked: &dyn Fn(&AgentRecord), stop: &AtomicBool) {
    let (mut generation, mut reported) = loop {
        match store.revoked_snapshot() {
            Ok((generation, revoked)) => {
                let ids: HashSet<String> = revoked.into_iter().map(|r| r.agent_id).collect();
                break (generation, ids);
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation watch: reading the store failed; retrying");
                if !sleep_unless_stopped(interval.max(Duration::from_millis(100)), stop) {
                    return;
                }
            }
        }
    };
    while sleep_unless_stopped(interval, stop) {
        match store.change_generation() {
            Ok(g) if g == generation => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "revocation watch: reading the change generation failed");
                continue;
            }
        }
        let (g, revoked) = match store.revoked_snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(error = %e, "revocation watch: listing revoked agents failed");
                continue;
            }
        };
        generation = g;
        for rec in revoked {
            if reported.contains(&rec.agent_id) {
                continue;
            }
            if catch_unwind(AssertUnwindSafe(|| on_revoked(&rec))).is_err() {
                tracing::error!(agent = %rec.agent_id, "revocation watch: callback panicked");
            }
            reported.insert(rec.agent_id);
        }
    }
}

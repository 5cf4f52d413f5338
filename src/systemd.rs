//! Every sd_notify(3) message the daemon sends, and the watchdog thread. Nothing else in the
//! crate talks to systemd.
//!
//! The protocol: newline-separated `KEY=value` assignments in one datagram to the unix socket
//! named by `$NOTIFY_SOCKET` (an absolute path, or `@name` for the abstract namespace).
//! systemd accepts it from the unit's main pid (`NotifyAccess=main`), which every thread of
//! this process shares.
//!
//! Invariants:
//! - Without `$NOTIFY_SOCKET` every call is a no-op returning `Ok(false)`: running outside
//!   systemd (a terminal, the tests, a container) is normal.
//! - A failed notification is logged, never fatal: the relay keeps serving, and systemd's own
//!   timeouts (start, watchdog) decide what happens to it.
//! - The first `READY=1` goes out after every shard accepts — the moment the `{"listening":…}`
//!   line is printed — so whatever is ordered `After=switchboard.service` can connect. Later
//!   ones only end a reload (`RELOADING=1` … `READY=1`).
//! - `WATCHDOG=1` goes out only while every shard thread is alive. A shard that died stops the
//!   pings, and systemd kills and restarts the service (`WatchdogSec=`, `Restart=on-failure`).
//! - The environment is only read (no `unset_environment`): other threads are running.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set once `STOPPING=1` has been sent: from then on shard threads ending is expected.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Sends `msg` (one or more `KEY=value` lines) to `$NOTIFY_SOCKET`. `Ok(false)` when the
/// variable is unset or empty, `Ok(true)` when the datagram was sent.
pub fn notify(msg: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => send_to(&addr, msg).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `msg` to the notification socket `addr`, written as systemd writes `$NOTIFY_SOCKET`.
pub fn send_to(addr: &OsStr, msg: &str) -> io::Result<()> {
    if msg.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty sd_notify message"));
    }
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        sock.send_to_addr(msg.as_bytes(), &SocketAddr::from_abstract_name(name)?)?
    } else if bytes.starts_with(b"/") {
        sock.send_to(msg.as_bytes(), Path::new(addr))?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {addr:?} is neither an absolute path nor @abstract"),
        ));
    };
    if sent != msg.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "sd_notify datagram truncated"));
    }
    Ok(())
}

/// `READY=1`: startup finished; systemd moves the unit from activating to active.
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// `STOPPING=1`: shutdown began; systemd moves the unit to deactivating.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `STATUS=…`: the one-line state `systemctl status` shows.
pub fn status(text: &str) -> io::Result<bool> {
    notify(&status_line(text))
}

/// `WATCHDOG=1`: still alive; must arrive at least once per `WatchdogSec=`.
pub fn watchdog() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// A `STATUS=` assignment; a newline would end it early, so newlines become spaces.
fn status_line(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// The watchdog timeout systemd enforces (`WatchdogSec=`, passed as `$WATCHDOG_USEC`), when it
/// applies to this process: `$WATCHDOG_PID`, when set, must be our pid. Ping at half of it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

fn log_failure(what: &str, r: io::Result<bool>) {
    if let Err(e) = r {
        tracing::warn!(message_sent = what, error = %e, "sd_notify failed");
    }
}

/// Every shard accepts: `READY=1` with a `STATUS=` line saying where and on what driver.
pub fn serving(
    public: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    shards: usize,
    uring_shards: usize,
) {
    let driver = match uring_shards {
        0 => "epoll".to_string(),
        u if u == shards => "io_uring".to_string(),
        u => format!("io_uring on {u}, epoll on {}", shards - u),
    };
    let status = status_line(&format!("serving on {public} (admin {admin}), {shards} shards, {driver}"));
    log_failure("READY=1", notify(&format!("READY=1\n{status}")));
}

/// SIGTERM/SIGINT taken: `STOPPING=1` and a `STATUS=` line; shard threads may now end.
pub fn draining() {
    STOPPING.store(true, Ordering::SeqCst);
    let status = status_line("draining: closing connections with 1001, then flushing the store");
    log_failure("STOPPING=1", notify(&format!("STOPPING=1\n{status}")));
}

/// SIGHUP taken: `RELOADING=1`, with the `MONOTONIC_USEC=` stamp that `Type=notify-reload`
/// (systemd 253+) requires. systemd shows the unit as reloading until [`reloaded`].
pub fn reloading() {
    log_failure("RELOADING=1", notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec())));
}

/// The reload finished, applied or refused (say which in `status`): `READY=1` and `STATUS=`.
pub fn reloaded(status: &str) {
    log_failure("READY=1", notify(&format!("READY=1\n{}", status_line(status))));
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares reload stamps against.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Counts live shard threads for the watchdog. Each shard thread holds a [`ShardAlive`] for
/// its whole life; it is dropped when the thread returns or unwinds.
#[derive(Clone, Default)]
pub struct ShardLiveness(Arc<AtomicUsize>);

/// One shard thread's share of [`ShardLiveness`].
pub struct ShardAlive(Arc<AtomicUsize>);

impl ShardLiveness {
    /// A token to move into a shard thread (taken before the spawn, so the count is complete
    /// before any thread runs).
    pub fn guard(&self) -> ShardAlive {
        self.0.fetch_add(1, Ordering::SeqCst);
        ShardAlive(self.0.clone())
    }

    /// Shard threads still running.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for ShardAlive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the thread that sends `WATCHDOG=1` at half of `$WATCHDOG_USEC` for as long as
/// `alive()` holds. `None` when systemd asked for no watchdog (or there is no socket).
pub fn spawn_watchdog(alive: impl Fn() -> bool + Send + 'static) -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
    let timeout = watchdog_interval()?;
    let period = timeout / 2;
    tracing::info!(timeout_ms = timeout.as_millis() as u64, "systemd watchdog enabled");
    let spawned = std::thread::Builder::new()
        .name("switchboard-watchdog".into())
        .spawn(move || run_watchdog(period, alive, watchdog));
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "could not start the watchdog thread; systemd will restart us");
            None
        }
    }
}

/// Pings every `period` while `alive()`; returns the first time it is not.
fn run_watchdog(period: Duration, alive: impl Fn() -> bool, mut ping: impl FnMut() -> io::Result<bool>) {
    let mut next = Instant::now();
    let mut failing = false;
    loop {
        if !alive() {
            if !STOPPING.load(Ordering::SeqCst) {
                tracing::error!("a shard thread is gone: withholding WATCHDOG=1 so systemd restarts us");
                log_failure("STATUS=", status("a shard thread exited; waiting for the watchdog to restart"));
            }
            return;
        }
        match ping() {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "sd_notify WATCHDOG=1 failed");
            }
            Err(_) => {}
            Ok(_) => failing = false,
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Fell behind (a stalled machine): ping at once and restart the schedule from now.
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("switchboard-test-{}-{:?}", std::process::id(), Instant::now());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn refuses_relative_addresses_and_empty_messages() {
        let e = send_to(OsStr::new("notify.sock"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = send_to(OsStr::new("/nonexistent/notify.sock"), "").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(send_to(dir.path().join("absent.sock").as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn monotonic_usec_is_the_monotonic_clock() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(5));
        let b = monotonic_usec();
        assert!(a > 0 && b >= a + 5_000, "{a} then {b}");
    }

    #[test]
    fn status_stays_one_assignment() {
        assert_eq!(status_line("a\nb\r\nc"), "STATUS=a b  c");
    }

    #[test]
    fn watchdog_usec_and_pid() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), ms(30_000));
        assert_eq!(parse_watchdog(Some("400000"), Some("7"), 7), ms(400));
        assert_eq!(parse_watchdog(Some("400000"), Some("8"), 7), None, "meant for another process");
        assert_eq!(parse_watchdog(Some("400000"), Some("x"), 7), None);
    }

    #[test]
    fn liveness_counts_guards_until_dropped() {
        let l = ShardLiveness::default();
        let a = l.guard();
        let b = l.guard();
        assert_eq!(l.count(), 2);
        drop(a);
        assert_eq!(l.count(), 1);
        std::thread::spawn(move || {
            let _b = b;
            panic!("a shard thread unwinding still gives its guard back");
        })
        .join()
        .unwrap_err();
        assert_eq!(l.count(), 0);
    }

    #[test]
    fn watchdog_pings_while_alive_then_stops() {
        let checks = Cell::new(0);
        let pings = Cell::new(0);
        run_watchdog(
            Duration::from_millis(5),
            || {
                checks.set(checks.get() + 1);
                checks.get() <= 3
            },
            || {
                pings.set(pings.get() + 1);
                Ok(true)
            },
        );
        assert_eq!(pings.get(), 3);
    }
}

//! Run under a `NOTIFY_SOCKET`, the daemon says READY=1 only once every shard answers,
//! WATCHDOG=1 at half of `WATCHDOG_USEC` while it serves, and STOPPING=1 when SIGTERM starts
//! the drain; then it exits 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// `WATCHDOG_USEC` given to the daemon: pings are due every 200 ms.
const WATCHDOG: Duration = Duration::from_millis(400);

/// The daemon, killed if the test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the notify socket on its own thread, stamping each datagram on arrival (so the test's
/// own pauses do not bunch up the watchdog timings).
fn receive(sock: UnixDatagram) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8(buf[..n].to_vec()).expect("sd_notify message is UTF-8");
            if tx.send((Instant::now(), msg)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Takes messages until one contains `line` (as a whole line), returning every message seen
/// on the way; panics with them after `within`.
fn wait_for(rx: &mpsc::Receiver<(Instant, String)>, line: &str, within: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, msg)) => {
                let hit = msg.lines().any(|l| l == line);
                seen.push((at, msg));
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no {line:?} within {within:?}; got {seen:?}"),
        }
    }
}

/// `GET path` over a fresh connection; returns the status line.
fn http_status(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    resp.lines().next().unwrap_or_default().to_string()
}

#[test]
fn ready_watchdog_and_stopping_arrive_at_the_right_moments() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let notes = receive(UnixDatagram::bind(&sock_path).unwrap());
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "").unwrap();
    let mut child = Daemon(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--shards", "2"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            // .ci/run runs the suite on both drivers.
            .arg("--driver")
            .arg(std::env::var("SWITCHBOARD_TEST_DRIVER").unwrap_or_else(|_| "auto".into()))
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn switchboard serve"),
    );

    // stdout carries the JSON logs and the listening line; a thread hands the latter over.
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let (Some(l), Some(a)) = (v["listening"].as_str(), v["admin"].as_str()) {
                    let _ = tx.send((l.parse::<SocketAddr>().unwrap(), a.parse::<SocketAddr>().unwrap()));
                }
            }
        }
    });

    // READY=1 first; nothing may claim readiness earlier.
    let before_ready = wait_for(&notes, "READY=1", Duration::from_secs(20));
    let ready_msg = &before_ready.last().unwrap().1;
    assert!(ready_msg.contains("STATUS=serving on 127.0.0.1:"), "READY carries a status: {ready_msg:?}");
    // The listening line was printed before READY was sent, so it is already in the pipe.
    let (public, admin) = rx.recv_timeout(Duration::from_secs(5)).expect("listening line before READY");
    // At READY every shard answers: a request on the public port is served, /readyz is green.
    assert!(http_status(public, "/healthz").contains(" 200 "), "public port serves at READY");
    assert!(http_status(admin, "/readyz").contains(" 200 "), "/readyz is 200 at READY");

    // WATCHDOG=1 repeatedly, at half of WATCHDOG_USEC, never a whole timeout apart.
    let mut pings = Vec::new();
    while pings.len() < 8 {
        let got = wait_for(&notes, "WATCHDOG=1", Duration::from_secs(5));
        pings.push(got.last().unwrap().0);
    }
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g < WATCHDOG),
        "a watchdog gap reached WATCHDOG_USEC (systemd would have killed us): {gaps:?}"
    );
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        (Duration::from_millis(150)..=Duration::from_millis(300)).contains(&median),
        "pings every ~200 ms, got a median gap of {median:?} ({gaps:?})"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let stopping = wait_for(&notes, "STOPPING=1", Duration::from_secs(5));
    assert!(
        stopping.iter().all(|(_, m)| !m.contains("READY=1")),
        "no second READY after SIGTERM: {stopping:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("daemon did not exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

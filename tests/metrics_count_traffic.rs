//! `/metrics` on the admin listener tells the truth: around real traffic, the counters move
//! by exactly the amounts that happened, labels stay bounded, and no id or credential
//! appears in the exposition.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn scrape(d: &Daemon) -> (HashMap<String, f64>, String) {
    let mut s = TcpStream::connect(d.admin_addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("Content-Type: text/plain; version=0.0.4"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    let mut m = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        if let Some((k, v)) = line.rsplit_once(' ') {
            m.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
        }
    }
    (m, body)
}

/// Sum of every series of `name` whose labels contain all of `labels`.
fn sum(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn counters_move_by_what_happened() {
    let d = Daemon::start_default();
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let (before, _) = scrape(&d);

    let mut ag = d.agent(&a);
    let mut c1 = d.client(&t, None);
    let session1 = c1.welcome.value["session"].as_str().unwrap().to_string();
    let mut c2 = d.client(&t, None);
    expect_type(&mut ag, "session");
    expect_type(&mut ag, "session");
    // 3 unicast client -> agent, 2 broadcasts agent -> 2 clients, 1 not_allowed.
    for i in 0..3 {
        c1.send(Some(a.agent_id()), &json!(i), None).unwrap();
        expect_type(&mut ag, "message");
    }
    for i in 0..2 {
        ag.send(None, &json!(i), None).unwrap();
        expect_type(&mut c1, "message");
        expect_type(&mut c2, "message");
    }
    c2.send(Some("ag_doesnotexist"), &json!(0), Some("x")).unwrap();
    assert_eq!(expect_type(&mut c2, "error").str("code"), "not_allowed");
    // One refused upgrade.
    let bad = d.mint(&json!({"sub": "u1"}));
    assert_refused(
        switchboard::client::ClientConn::connect(d.addr, &bad, switchboard::client::TokenPlace::Header, None),
        401,
        "unauthorized",
    );
    drop(c2);

    let (after, body) = eventually(Duration::from_secs(5), || {
        let (m, body) = scrape(&d);
        let relayed = sum(&m, "switchboard_messages_relayed_total", &[])
            - sum(&before, "switchboard_messages_relayed_total", &[]);
        let closed = sum(&m, "switchboard_connections_closed_total", &["role=\"client\""]);
        (relayed >= 5.0 && closed >= 1.0).then_some((m, body))
    })
    .expect("metrics published");
    let delta = |name: &str, labels: &[&str]| sum(&after, name, labels) - sum(&before, name, labels);
    assert_eq!(delta("switchboard_messages_relayed_total", &[]), 5.0);
    assert_eq!(delta("switchboard_deliveries_total", &[]), 3.0 + 2.0 * 2.0);
    assert_eq!(delta("switchboard_connections_opened_total", &["role=\"agent\""]), 1.0);
    assert_eq!(delta("switchboard_connections_opened_total", &["role=\"client\""]), 2.0);
    assert_eq!(delta("switchboard_connections_closed_total", &["role=\"client\""]), 1.0);
    assert_eq!(sum(&after, "switchboard_connections", &["role=\"agent\""]), 1.0);
    assert_eq!(sum(&after, "switchboard_connections", &["role=\"client\""]), 1.0);
    assert_eq!(delta("switchboard_messages_dropped_total", &["reason=\"not_allowed\""]), 1.0);
    assert_eq!(delta("switchboard_handshakes_refused_total", &["status=\"401\""]), 1.0);
    // Frames in: 3 + 2 + 1 sends (pings/pongs may add a few).
    assert!(delta("switchboard_frames_total", &["direction=\"in\""]) >= 6.0);
    assert!(delta("switchboard_bytes_total", &["direction=\"out\""]) > 0.0);
    assert_eq!(sum(&after, "switchboard_relay_latency_seconds_count", &[]), 5.0);
    assert!(sum(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sum(&after, "process_open_fds", &[]) > 3.0);
    assert!(body.contains("switchboard_build_info{"), "{body}");
    // Bounded labels: no user, agent, session or token anywhere in the exposition.
    for secret in [a.agent_id(), "u1", &t, &bad] {
        assert!(!body.contains(secret), "{secret:?} leaked into /metrics");
    }
    assert!(!body.contains(&session1), "a session id leaked into /metrics");
}

#[test]
fn admin_health_and_readiness() {
    let d = Daemon::start_default();
    for (path, want) in [("/healthz", "200"), ("/readyz", "200"), ("/nope", "404")] {
        let mut s = TcpStream::connect(d.admin_addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with(&format!("HTTP/1.1 {want}")), "{path}: {text}");
    }
}

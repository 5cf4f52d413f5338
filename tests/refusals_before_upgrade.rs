//! Every refused upgrade is an ordinary HTTP response with the spec's status and exact JSON
//! body, decided cheapest-check-first in the order of §2, and no credential ever shows up in
//! a response or in the daemon's output.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use switchboard::client::{
    raw_http, unix_now, AgentConn, ClientConn, ClientOpts, RawHttpError, TokenPlace, UpgradeOverrides,
};

#[track_caller]
fn assert_answer(d: &Daemon, request: &str, status: u16, code: &str) -> switchboard::client::RawResponse {
    let r = raw_http(d.addr, request.as_bytes()).unwrap_or_else(|e| panic!("no answer to {request:?}: {e}"));
    assert_eq!(r.status, status, "status for {request:?}: {r:?}");
    assert_eq!(r.json(), json!({"error": code}), "body for {request:?}: {r:?}");
    r
}

#[test]
fn healthz_and_admin_endpoints_answer() {
    let d = Daemon::start_default();
    let r = raw_http(d.addr, plain_head("GET", "/healthz", &[]).as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ok"}));
    for path in ["/healthz", "/readyz"] {
        let r = raw_http(d.admin_addr, plain_head("GET", path, &[]).as_bytes()).unwrap();
        assert_eq!(r.status, 200, "admin {path}: {r:?}");
    }
    let r = raw_http(d.admin_addr, plain_head("GET", "/metrics", &[]).as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "metrics content type {ct:?}");
}

#[test]
fn unknown_path_is_404_and_other_methods_405_before_path() {
    let d = Daemon::start_default();
    assert_answer(&d, &plain_head("GET", "/nope", &[]), 404, "not_found");
    assert_answer(&d, &upgrade_head("/nope", &[]), 404, "not_found");
    assert_answer(&d, &upgrade_head("/v1/agents", &[]), 404, "not_found");
    assert_answer(&d, &plain_head("POST", "/v1/agent", &["Content-Length: 0"]), 405, "method_not_allowed");
    assert_answer(&d, &plain_head("PUT", "/v1/client", &["Content-Length: 0"]), 405, "method_not_allowed");
    // Method is checked before path: a POST to an unknown path is 405, not 404.
    assert_answer(&d, &plain_head("POST", "/nope", &["Content-Length: 0"]), 405, "method_not_allowed");
}

#[test]
fn bad_upgrade_headers_are_426_or_400_before_credentials() {
    let d = Daemon::start_default();
    // None of these carry credentials: answering 401 would mean credentials were checked first.
    for path in ["/v1/agent", "/v1/client"] {
        let no_upgrade = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        assert_answer(&d, &no_upgrade, 426, "upgrade_required");
        let no_version = "GET PATH HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            .replace("PATH", path);
        assert_answer(&d, &no_version, 426, "upgrade_required");
        let v8 = upgrade_head(path, &[]).replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
        let r = assert_answer(&d, &v8, 426, "upgrade_required");
        assert_eq!(r.header("sec-websocket-version"), Some("13"), "426 must name version 13: {r:?}");

        let no_connection = upgrade_head(path, &[]).replace("Connection: Upgrade\r\n", "");
        assert_answer(&d, &no_connection, 400, "bad_request");
        let no_key = upgrade_head(path, &[]).replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_answer(&d, &no_key, 400, "bad_request");
        // "the sample" is 10 bytes, not the 16 that RFC 6455 requires.
        let short_key = upgrade_head(path, &[]).replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ==");
        assert_answer(&d, &short_key, 400, "bad_request");
        let junk_key = upgrade_head(path, &[]).replace("dGhlIHNhbXBsZSBub25jZQ==", "not*base64!");
        assert_answer(&d, &junk_key, 400, "bad_request");
        assert_answer(&d, &upgrade_head(path, &["Sec-WebSocket-Protocol: chat"]), 400, "bad_request");
    }

    // With valid credentials the same header problems still win over 101.
    let cred = d.hmac_agent("u1", "a");
    let o = UpgradeOverrides {
        extra_headers: vec![("Sec-WebSocket-Protocol".into(), "chat, superchat".into())],
        ..Default::default()
    };
    assert_refused(AgentConn::connect_with(d.addr, &cred, &o), 400, "bad_request");
    // A token offered as bearer.<jwt> without switchboard.v1 is a malformed upgrade.
    let tok = d.token("u1", &[], "1h");
    let opts = ClientOpts {
        extra_headers: vec![("Sec-WebSocket-Protocol".into(), format!("bearer.{tok}"))],
        ..Default::default()
    };
    assert_refused(ClientConn::connect_with(d.addr, None, &opts), 400, "bad_request");
    // And the same token in the right shape is fine.
    ClientConn::connect(d.addr, &tok, TokenPlace::Subprotocol, None).expect("subprotocol token");
}

#[test]
fn missing_or_bad_credentials_are_401() {
    let d = Daemon::start_default();
    assert_answer(&d, &upgrade_head("/v1/agent", &[]), 401, "unauthorized");
    assert_answer(&d, &upgrade_head("/v1/client", &[]), 401, "unauthorized");
    assert_answer(&d, &upgrade_head("/v1/client", &["Authorization: Bearer not.a.jwt"]), 401, "unauthorized");
    assert_answer(
        &d,
        &upgrade_head("/v1/client", &["Authorization: Basic dXNlcjpwYXNz"]),
        401,
        "unauthorized",
    );
    assert_answer(&d, &upgrade_head("/v1/client?access_token=", &[]), 401, "unauthorized");
}

#[test]
fn oversized_head_is_431_before_anything_else() {
    let d = Daemon::start_default();
    let big = format!("X-Filler: {}", "a".repeat(9000));
    assert_answer(&d, &upgrade_head("/v1/agent", &[&big]), 431, "headers_too_large");
    // Checked first: an unknown path or a wrong method with a huge head is still 431.
    assert_answer(&d, &plain_head("POST", "/nope", &[&big]), 431, "headers_too_large");
    // Many small headers adding up over 8 KiB count too.
    let many: Vec<String> = (0..200).map(|i| format!("X-H{i}: {}", "b".repeat(40))).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_answer(&d, &plain_head("GET", "/healthz", &refs), 431, "headers_too_large");
    // A head under the limit is not refused for its size.
    let fine = format!("X-Filler: {}", "a".repeat(6000));
    let r = raw_http(d.addr, plain_head("GET", "/healthz", &[&fine]).as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn per_ip_rate_is_checked_before_method_path_and_credentials() {
    let d = Daemon::with_config("[limits]\nhandshakes_per_sec_per_ip = 1\nhandshakes_burst_per_ip = 3\n");
    let bad_cred = upgrade_head("/v1/client", &["Authorization: Bearer x.y.z"]);
    let start = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = raw_http(d.addr, bad_cred.as_bytes()).expect("answer");
        match r.status {
            401 => assert_eq!(r.json(), json!({"error": "unauthorized"})),
            429 => assert_eq!(r.json(), json!({"error": "too_many_requests"}), "{r:?}"),
            s => panic!("unexpected status {s}: {r:?}"),
        }
        statuses.push(r.status);
    }
    // Requests to other paths and methods are refused by the rate too, before 405/404.
    let post = raw_http(d.addr, plain_head("POST", "/nope", &["Content-Length: 0"]).as_bytes()).unwrap();
    let elapsed = start.elapsed().as_secs();
    assert_eq!(&statuses[..3], &[401, 401, 401], "the burst of 3 passes to the credential check");
    let passed = statuses.iter().filter(|s| **s == 401).count() as u64;
    assert!(
        passed <= 3 + elapsed + 1,
        "{passed} bad-credential requests reached the crypto in {elapsed}s: {statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    // Every HTTP request counts, /healthz included.
    let health = raw_http(d.addr, plain_head("GET", "/healthz", &[]).as_bytes()).unwrap();
    if start.elapsed() < Duration::from_millis(900) {
        assert_eq!(post.status, 429, "{post:?}");
        assert_eq!(post.json(), json!({"error": "too_many_requests"}));
        assert_eq!(health.status, 429, "{health:?}");
    }
}

#[test]
fn global_cap_is_checked_before_rate_method_and_credentials() {
    let d = Daemon::with_config("[server]\nmax_connections = 2\n");
    let t = d.token("u1", &[], "1h");
    let _c1 = d.client(&t, None);
    let _c2 = d.client(&t, None);
    assert_answer(&d, &plain_head("POST", "/nope", &["Content-Length: 0"]), 503, "unavailable");
    assert_answer(&d, &upgrade_head("/v1/client", &[]), 503, "unavailable");
    assert_refused(ClientConn::connect(d.addr, &t, TokenPlace::Header, None), 503, "unavailable");
}

#[test]
fn credentials_before_permission_before_user_cap() {
    let d = Daemon::with_config("[limits]\nmax_connections_per_user = 1\n");
    let other = d.hmac_agent("u2", "theirs");
    let good = d.token("u1", &[], "1h");
    let bad = d.mint(&json!({"sub": "u1", "exp": unix_now() - 3600}));
    // Bad credentials naming someone else's agent: 401, not 403.
    assert_refused(
        ClientConn::connect(d.addr, &bad, TokenPlace::Header, Some(other.agent_id())),
        401,
        "unauthorized",
    );
    let _held = d.client(&good, None);
    // At the user's cap, a forbidden agent is still 403 (permission is checked first) ...
    assert_refused(
        ClientConn::connect(d.addr, &good, TokenPlace::Header, Some(other.agent_id())),
        403,
        "forbidden",
    );
    // ... and an allowed request is 429.
    assert_refused(ClientConn::connect(d.addr, &good, TokenPlace::Header, None), 429, "too_many_requests");
}

#[test]
fn handshake_timeout_drops_a_slow_head_without_an_answer() {
    let d = Daemon::with_config("[server]\nhandshake_timeout_ms = 1000\n");
    // A head that stops half-way.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET /v1/client HTTP/1.1\r\nHost: x\r\n").unwrap();
    match switchboard::client::read_http_response(&mut s, Duration::from_secs(6)) {
        Err(RawHttpError::NoAnswer { received: 0 }) => {}
        other => panic!("expected the socket to be dropped without an answer, got {other:?}"),
    }

    // A head trickled one byte at a time: the timeout bounds the whole head, not each read.
    let head = upgrade_head("/v1/client", &["X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]);
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(150))).unwrap();
    let start = Instant::now();
    let mut closed = false;
    for b in head.as_bytes() {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => panic!("a slow head got an answer: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    assert!(closed, "a head trickled for {:?} was not dropped", start.elapsed());
}

#[test]
fn credentials_never_appear_in_responses_or_logs() {
    let d = Daemon::with_config("[log]\nlevel = \"debug\"\n");
    let (agent_id, secret) = d.create_agent("u1", "a");
    let cred =
        switchboard::client::AgentCredential::Hmac { agent_id: agent_id.clone(), secret: secret.clone() };
    let token = d.token("u1", &[], "1h");
    let expired = d.mint(&json!({"sub": "u1", "exp": unix_now() - 3600}));
    let forged = mint(b"not-the-key", &json!({"sub": "u1", "exp": unix_now() + 3600}));
    let mut secrets: Vec<String> = vec![secret.clone(), token.clone(), expired.clone(), forged.clone()];
    for t in [&token, &expired, &forged] {
        secrets.push(t.rsplit('.').next().unwrap().to_string());
    }
    secrets.push(String::from_utf8(d.jwt_secret()).unwrap());
    let mut bodies = Vec::new();

    // A good agent upgrade and a few bad ones, each with a real signature to look for.
    let mut agent = d.agent(&cred);
    secrets.push(agent.upgrade_signature.clone());
    let ts = unix_now().to_string();
    let sign =
        |ts: &str, nonce: &str| cred.sign(&switchboard::client::upgrade_signed_string(&agent_id, ts, nonce));
    for (ts, nonce) in [("12".to_string(), "stale-timestamp-nonce-1"), (ts.clone(), agent.nonce.as_str())] {
        let sig = sign(&ts, nonce);
        let o = UpgradeOverrides {
            timestamp: Some(ts.clone()),
            nonce: Some(nonce.to_string()),
            signature: Some(sig.clone()),
            ..Default::default()
        };
        let e = AgentConn::connect_with(d.addr, &cred, &o).err().expect("refused");
        bodies.push(e.to_string());
        secrets.push(sig);
    }
    let wrong = UpgradeOverrides { signature: Some("A".repeat(43)), ..Default::default() };
    bodies.push(AgentConn::connect_with(d.addr, &cred, &wrong).err().expect("refused").to_string());
    // Signed messages carry sigs too.
    let mut client = d.client(&token, None);
    agent.send(Some(&client.session), &json!({"hello": 1}), Some("m1")).unwrap();
    let sig_of_m1 = agent.signature(agent.last_ctr(), Some(&client.session), r#"{"hello":1}"#);
    secrets.push(sig_of_m1);
    let bad_frame_sig = agent.signature(999, None, "1");
    agent.send_raw_text(&format!(r#"{{"type":"send","data":1,"ctr":1,"sig":"{bad_frame_sig}"}}"#)).unwrap();
    secrets.push(bad_frame_sig);
    // Client tokens in every place, good and bad.
    for place in [TokenPlace::Header, TokenPlace::Subprotocol, TokenPlace::Query] {
        for t in [&expired, &forged] {
            let e = ClientConn::connect(d.addr, t, place, None).err().expect("refused");
            bodies.push(e.to_string());
        }
        ClientConn::connect(d.addr, &token, place, None).expect("good token");
    }
    client.refresh(&forged).unwrap();
    let f = next_skipping(&mut client, &["message"], WAIT);
    assert_eq!(f.str("code"), "unauthorized", "{}", f.text);
    bodies.push(f.text.clone());
    // Give the daemon a moment to write any log lines about these events.
    assert_pong(&mut client);
    agent.ws.ping().unwrap();
    assert_eq!(next_skipping(&mut agent, &["ack", "error", "session"], WAIT).ty(), "pong");
    std::thread::sleep(Duration::from_millis(200));

    let metrics = raw_http(d.admin_addr, plain_head("GET", "/metrics", &[]).as_bytes()).unwrap();
    bodies.push(metrics.body);
    let logs = d.logs();
    for s in &secrets {
        assert!(s.len() >= 16, "a secret worth searching for");
        assert!(!logs.contains(s.as_str()), "the daemon's output contains a credential ({}…)", &s[..8]);
        for b in &bodies {
            assert!(!b.contains(s.as_str()), "a response contains a credential: {b}");
        }
    }
}

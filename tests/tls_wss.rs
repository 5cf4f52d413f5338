//! With `server.tls_cert_file`/`tls_key_file`, the public listener speaks `wss://` (TLS 1.2
//! minimum): agents and clients authenticate and relay as over plain sockets, a plain-text
//! request gets nothing useful, and SIGHUP swaps the certificate for new connections while
//! existing sessions stay up.

mod common;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;
use switchboard::client::{new_nonce, unix_now, upgrade_signed_string, AgentCredential};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

type Wss = WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

struct Certs {
    dir: tempfile::TempDir,
    der: Vec<CertificateDer<'static>>,
}

fn write_cert(dir: &std::path::Path, name: &str) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), ck.cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.der().clone()
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let der = vec![write_cert(dir.path(), "a")];
    Certs { dir, der }
}

fn tls_daemon(c: &Certs) -> Daemon {
    let p = |f: &str| c.dir.path().join(f).display().to_string();
    Daemon::with_config(&format!(
        "[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        p("a.crt"),
        p("a.key")
    ))
}

fn tls_stream(
    d: &Daemon,
    root: &CertificateDer<'static>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn wss(d: &Daemon, root: &CertificateDer<'static>, path: &str, headers: &[(&'static str, String)]) -> Wss {
    let mut req = format!("wss://localhost:{}{path}", d.addr.port()).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (ws, resp) = tungstenite::client::client(req, tls_stream(d, root)).unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

fn agent_headers(cred: &AgentCredential) -> Vec<(&'static str, String)> {
    let ts = unix_now().to_string();
    let nonce = new_nonce();
    let sig = cred.sign(&upgrade_signed_string(cred.agent_id(), &ts, &nonce));
    vec![
        ("X-Switchboard-Agent", cred.agent_id().to_string()),
        ("X-Switchboard-Timestamp", ts),
        ("X-Switchboard-Nonce", nonce),
        ("X-Switchboard-Signature", sig),
    ]
}

fn read_json(ws: &mut Wss) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn agents_and_clients_relay_over_wss() {
    let c = certs();
    let d = tls_daemon(&c);
    let a = d.hmac_agent("u1", "a");
    let t = d.token("u1", &[], "1h");
    let mut ag = wss(&d, &c.der[0], "/v1/agent", &agent_headers(&a));
    let welcome = read_json(&mut ag);
    assert_eq!(welcome["type"], "welcome");
    let mut cl = wss(&d, &c.der[0], "/v1/client", &[("Authorization", format!("Bearer {t}"))]);
    assert_eq!(read_json(&mut cl)["type"], "welcome");
    assert_eq!(read_json(&mut ag)["type"], "session");
    let big = "x".repeat(40_000);
    let msg = json!({"type": "send", "to": a.agent_id(), "data": {"big": big}, "id": "m1"}).to_string();
    cl.send(Message::text(msg)).unwrap();
    let got = read_json(&mut ag);
    assert_eq!(got["data"]["big"].as_str().map(str::len), Some(40_000));
    assert_eq!(read_json(&mut cl), json!({"type": "ack", "id": "m1"}));
    // A refusal travels over TLS too.
    let mut req = format!("wss://localhost:{}/v1/client", d.addr.port()).into_client_request().unwrap();
    req.headers_mut().insert("Authorization", "Bearer nope".parse().unwrap());
    match tungstenite::client::client(req, tls_stream(&d, &c.der[0])) {
        Err(tungstenite::handshake::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn plain_text_gets_no_upgrade_and_sighup_rotates_the_certificate() {
    let c = certs();
    let d = tls_daemon(&c);
    // Plain HTTP on a TLS listener: no 101 (the TLS layer refuses the bytes).
    let r = switchboard::client::raw_http(d.addr, upgrade_head("/v1/client", &[]).as_bytes());
    assert!(r.map(|r| r.status).unwrap_or(0) != 101);

    let t = d.token("u1", &[], "1h");
    let mut before = wss(&d, &c.der[0], "/v1/client", &[("Authorization", format!("Bearer {t}"))]);
    assert_eq!(read_json(&mut before)["type"], "welcome");
    // Replace the certificate files and reload.
    let new_der = write_cert(c.dir.path(), "a");
    // SAFETY: plain kill(2) on the daemon's pid.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    eventually(WAIT, || d.logs().contains("configuration reloaded").then_some(())).expect("reloaded");
    // New connections present the new certificate (the old root no longer verifies) …
    let mut after = wss(&d, &new_der, "/v1/client", &[("Authorization", format!("Bearer {t}"))]);
    assert_eq!(read_json(&mut after)["type"], "welcome");
    let mut s = tls_stream(&d, &c.der[0]);
    assert!(std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n")
        .and_then(|_| std::io::Write::flush(&mut s))
        .is_err());
    // … and the session opened before the reload still works.
    before.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    assert_eq!(read_json(&mut before), json!({"type": "pong"}));
}

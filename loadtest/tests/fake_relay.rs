//! The generator against a deliberately faulty relay: a tiny in-process relay that speaks the
//! wire protocol (upgrade, welcome, send → ack + message) and, on request, loses or
//! misdelivers every fifth message without saying so, or drops it with an `error` answer.
//! The run must fail (exit 1) exactly when the relay did not report what it did.
//!
//! It also shows that the generator drives "another relay that speaks the protocol" through
//! `--addr`, `--agents-file` and `--jwt-secret-file`.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// Every fifth `send` is acked but never forwarded.
    LoseSilently,
    /// Every fifth `send` is acked and forwarded to a connection of another user.
    Misdeliver,
    /// Every fifth `send` is answered with `error` (`offline`) and not forwarded.
    ReportedDrop,
}

struct Peer {
    user: String,
    out: Arc<Mutex<TcpStream>>,
    is_client: bool,
}

#[derive(Default)]
struct State {
    /// Routing key (agent id, or client session) → peer.
    peers: HashMap<String, Peer>,
}

struct Relay {
    fault: Fault,
    agents: HashMap<String, String>,
    state: Mutex<State>,
    sends: AtomicU64,
    next_id: AtomicU64,
}

fn frame(payload: &[u8], opcode: u8) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(n as u8);
    } else if n <= 65535 {
        f.push(126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

fn send_text(out: &Mutex<TcpStream>, v: &Value) {
    let _ = out.lock().unwrap().write_all(&frame(v.to_string().as_bytes(), 1));
}

/// Reads one masked client frame: (opcode, payload); None at EOF.
fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).ok()?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    s.read_exact(&mut mask).ok()?;
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).ok()?;
    for (i, b) in p.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((h[0] & 0x0f, p))
}

fn serve(relay: Arc<Relay>, mut s: TcpStream) {
    // The upgrade request head.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut b).is_err() {
            return;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let key = header("Sec-WebSocket-Key").unwrap_or_default();
    let mut sha = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = STANDARD.encode(sha.finish().as_ref());
    let n = relay.next_id.fetch_add(1, Ordering::Relaxed);
    let (route, user, from, welcome) = if head.starts_with("GET /v1/agent") {
        let agent = header("X-Switchboard-Agent").unwrap_or_default();
        let user = relay.agents.get(&agent).cloned().unwrap_or_default();
        let welcome = json!({"type": "welcome", "conn": format!("c{n}"), "agent": agent});
        (agent.clone(), user, agent, welcome)
    } else {
        let token = header("Authorization").unwrap_or_default();
        let claims = token.split('.').nth(1).unwrap_or("");
        let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap_or_default())
            .unwrap_or(Value::Null);
        let user = claims["sub"].as_str().unwrap_or("").to_string();
        let session = format!("s{n}");
        (
            session.clone(),
            user.clone(),
            session.clone(),
            json!({"type": "welcome", "session": session, "user": user}),
        )
    };
    let is_client = !head.starts_with("GET /v1/agent");
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let out = Arc::new(Mutex::new(s.try_clone().unwrap()));
    let _ = out.lock().unwrap().write_all(resp.as_bytes());
    send_text(&out, &welcome);
    relay.state.lock().unwrap().peers.insert(route, Peer { user: user.clone(), out: out.clone(), is_client });

    while let Some((op, payload)) = read_frame(&mut s) {
        match op {
            1 => {
                let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                if v["type"] != "send" {
                    continue;
                }
                let id = v["id"].clone();
                let msg = json!({"type": "message", "from": from, "data": v["data"]});
                let k = relay.sends.fetch_add(1, Ordering::Relaxed) + 1;
                let faulty = k % 5 == 0;
                if faulty && relay.fault == Fault::ReportedDrop {
                    send_text(
                        &out,
                        &json!({"type": "error", "id": id, "code": "offline", "message": "test"}),
                    );
                    continue;
                }
                let targets: Vec<Arc<Mutex<TcpStream>>> = {
                    let st = relay.state.lock().unwrap();
                    if faulty && relay.fault == Fault::Misdeliver {
                        st.peers.values().filter(|p| p.user != user).map(|p| p.out.clone()).take(1).collect()
                    } else if let Some(to) = v["to"].as_str() {
                        st.peers.get(to).map(|p| p.out.clone()).into_iter().collect()
                    } else {
                        st.peers
                            .values()
                            .filter(|p| p.user == user && p.is_client)
                            .map(|p| p.out.clone())
                            .collect()
                    }
                };
                send_text(&out, &json!({"type": "ack", "id": id}));
                if !(faulty && relay.fault == Fault::LoseSilently) {
                    for t in targets {
                        send_text(&t, &msg);
                    }
                }
            }
            8 => {
                let _ = out.lock().unwrap().write_all(&frame(&payload, 8));
                break;
            }
            9 => {
                let _ = out.lock().unwrap().write_all(&frame(&payload, 10));
            }
            _ => {}
        }
    }
}

/// Starts a relay with `fault` for `users` users, each with one agent; returns its address
/// and the agents file's content.
fn start_relay(fault: Fault, users: usize) -> (SocketAddr, Value) {
    let agents: Vec<Value> = (0..users)
        .map(|u| json!({"agent_id": format!("ag{u}"), "user": format!("user{u}"), "secret": "sbk_unused"}))
        .collect();
    let relay = Arc::new(Relay {
        fault,
        agents: (0..users).map(|u| (format!("ag{u}"), format!("user{u}"))).collect(),
        state: Mutex::default(),
        sends: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
    });
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let r = relay.clone();
            std::thread::spawn(move || serve(r, s));
        }
    });
    (addr, Value::Array(agents))
}

/// Runs a 1-second relay run against a faulty relay: (exit code, report, output).
fn run_against(fault: Fault, extra: &[&str]) -> (i32, Value, String) {
    let (addr, agents) = start_relay(fault, 3);
    let dir = tempfile::tempdir().unwrap();
    let agents_file = dir.path().join("agents.json");
    std::fs::write(&agents_file, agents.to_string()).unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, "not-checked-by-this-relay").unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("report.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-loadtest"))
        .args(["relay", "--users", "3", "--clients-per-user", "2", "--duration", "1", "--window", "4"])
        .args(["--settle", "0.1", "--drain-timeout", "1", "--source-addrs", "1", "--quiet"])
        .args(extra)
        .arg(format!("--addr={addr}"))
        .arg("--agents-file")
        .arg(&agents_file)
        .arg("--jwt-secret-file")
        .arg(&secret)
        .arg("--json-out")
        .arg(&json)
        .arg("--svg-out")
        .arg(&svg)
        .output()
        .expect("run switchboard-loadtest");
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
        .unwrap_or_else(|_| panic!("no JSON report; {text}"));
    let chart = std::fs::read_to_string(&svg).unwrap_or_else(|_| panic!("no SVG; {text}"));
    assert!(chart.starts_with("<svg") && chart.ends_with("</svg>\n"), "{chart}");
    (out.status.code().unwrap_or(-1), report, text)
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

#[test]
fn a_faithful_relay_passes() {
    let (code, r, text) = run_against(Fault::None, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(n(&r, "/accounting/delivered") > 0, "{text}");
    assert_eq!(n(&r, "/accounting/lost_unreported"), 0, "{text}");
}

#[test]
fn silent_losses_fail_the_run() {
    let (code, r, text) = run_against(Fault::LoseSilently, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(n(&r, "/accounting/lost_unreported") > 0, "{text}");
    assert!(!r["ok"].as_bool().unwrap());
    assert!(text.contains("FAIL: ") && text.contains("lost without a report"), "{text}");
}

#[test]
fn misdeliveries_to_another_user_fail_the_run() {
    let (code, r, text) = run_against(Fault::Misdeliver, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(n(&r, "/accounting/wrong_user") > 0, "{text}");
    assert!(text.contains("delivered to another user"), "{text}");
}

#[test]
fn drops_the_relay_reports_do_not_fail_the_run() {
    // Broadcast 1 → 2 here: a reported drop accounts for both of its deliveries.
    let (code, r, text) = run_against(Fault::ReportedDrop, &["--broadcast"]);
    assert_eq!(code, 0, "{text}");
    let errors = r["accounting"]["answered_error"]["offline"].as_u64().unwrap_or(0);
    assert!(errors > 0, "{text}");
    assert_eq!(n(&r, "/accounting/dropped_reported"), 2 * errors, "{text}");
    assert_eq!(n(&r, "/accounting/delivered"), 2 * n(&r, "/accounting/acked"), "{text}");
}
